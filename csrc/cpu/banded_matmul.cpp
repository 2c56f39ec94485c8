// Unfused banded products over the "diagonal" layout band[b, h, i, t], t in [0, left + right],
// whose slot t of row i is key j = i + (t - left) * dilation[h]:
//   qk:            band[i, t] = a_i . b_j                      (fill where j is outside [0, N))
//   pv:            out_i      = sum_t band[i, t] * b_j         (slots outside the sequence skipped)
//   pv_transposed: out_j      = sum over (i, t) reaching j of band[i, t] * a_i
// The transposed form is written as a gather over the rows i = j - (t - left) * dilation that
// reach j, so every output row has one owner and the result is deterministic.
#include <torch/csrc/stable/ops.h>

#include <vector>

#include "kernels.h"
#include "tile_math.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)
namespace {

// Runs f(b, h, n) for every row, in parallel over (batch, head, chunk of rows).
template <typename F>
void for_each_row(const BandedMatmulParams& p, F&& f) {
  const int64_t rows = p.batch * p.heads * p.seqlen;
  torch::stable::parallel_for(0, rows, 256, [&](int64_t first, int64_t last) {
    for (int64_t x = first; x < last; ++x) f(x / (p.heads * p.seqlen), (x / p.seqlen) % p.heads, x % p.seqlen);
  });
}

template <typename scalar_t>
const scalar_t* row_ptr(const RowMajorHeads& t, int64_t b, int64_t h, int64_t n) {
  return static_cast<const scalar_t*>(t.data) + t.offset(b, h, n);
}

}  // namespace

template <typename scalar_t>
void banded_matmul_qk(const BandedMatmulParams& p) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim, W = p.band_width();
  for_each_row(p, [&](int64_t b, int64_t h, int64_t i) {
    std::vector<acc> a(D), k(D), scores(W);
    load_rows(a.data(), row_ptr<scalar_t>(p.a, b, h, 0), p.a.stride_n, Positions{i, 1}, 1, D);
    for (int64_t t = 0; t < W; ++t) {
      const int64_t j = i + (t - p.window_left) * p.dilation[h];
      if (j < 0 || j >= p.seqlen) {
        scores[t] = static_cast<acc>(p.fill);
        continue;
      }
      load_rows(k.data(), row_ptr<scalar_t>(p.b, b, h, 0), p.b.stride_n, Positions{j, 1}, 1, D);
      scores[t] = dot(a.data(), k.data(), D);
    }
    narrow(static_cast<scalar_t*>(p.band) + p.band_offset(b, h, i), scores.data(), W);
  });
}

template <typename scalar_t>
void banded_matmul_pv(const BandedMatmulParams& p) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim, W = p.band_width();
  for_each_row(p, [&](int64_t b, int64_t h, int64_t i) {
    std::vector<acc> sum(D, acc(0)), weights(W), row(D);
    widen(weights.data(), static_cast<const scalar_t*>(p.band) + p.band_offset(b, h, i), W);
    for (int64_t t = 0; t < W; ++t) {
      const int64_t j = i + (t - p.window_left) * p.dilation[h];
      if (j < 0 || j >= p.seqlen) continue;
      const acc* x = rows_of(row.data(), row_ptr<scalar_t>(p.b, b, h, 0), p.b.stride_n, Positions{j, 1}, 1, D).data;
      for (int64_t c = 0; c < D; ++c) sum[c] += weights[t] * x[c];
    }
    store_rows(static_cast<scalar_t*>(p.out.data) + p.out.offset(b, h, 0), p.out.stride_n, Positions{i, 1},
               sum.data(), 1, D);
  });
}

template <typename scalar_t>
void banded_matmul_pv_transposed(const BandedMatmulParams& p) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim, W = p.band_width();
  for_each_row(p, [&](int64_t b, int64_t h, int64_t j) {
    std::vector<acc> sum(D, acc(0)), row(D);
    for (int64_t t = 0; t < W; ++t) {
      const int64_t i = j - (t - p.window_left) * p.dilation[h];
      if (i < 0 || i >= p.seqlen) continue;
      acc w;
      widen(&w, static_cast<const scalar_t*>(p.band) + p.band_offset(b, h, i) + t, 1);
      const acc* x = rows_of(row.data(), row_ptr<scalar_t>(p.a, b, h, 0), p.a.stride_n, Positions{i, 1}, 1, D).data;
      for (int64_t c = 0; c < D; ++c) sum[c] += w * x[c];
    }
    store_rows(static_cast<scalar_t*>(p.out.data) + p.out.offset(b, h, 0), p.out.stride_n, Positions{j, 1},
               sum.data(), 1, D);
  });
}

#define LONGFORMER_INSTANTIATE(T, name)                          \
  template void banded_matmul_qk<T>(const BandedMatmulParams&); \
  template void banded_matmul_pv<T>(const BandedMatmulParams&); \
  template void banded_matmul_pv_transposed<T>(const BandedMatmulParams&);
LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_INSTANTIATE)
#undef LONGFORMER_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
