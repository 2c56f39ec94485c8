// Unfused banded products over the "diagonal" layout band[b, h, i, t] ([B, H, N, W] contiguous,
// W = left + right + 1), whose slot t of row i is key j = i + (t - left) * dilation[h]:
//   qk:            band[i, t] = a_i . b_j                      (`fill` where j is outside [0, N))
//   pv:            out_i      = sum_t band[i, t] * b_j         (slots outside the sequence skipped)
//   pv_transposed: out_j      = sum over (i, t) reaching j of band[i, t] * a_i
// No masking by roles here: these are the plain primitives (attention probabilities for
// output_attentions, parity with allenai's op).
//
// Work split: one warp per output row (b, h, n) for all three, lanes split D (warp_math.h). The
// transposed product is a gather over the rows i = j - (t - left) * dilation that reach j, so every
// output row has one owner that sums in slot order: deterministic, no atomics. Slots are taken
// kGroup at a time so the group's row loads (and qk's reductions) overlap.
#include "device.h"
#include "launchers.h"
#include "warp_math.h"

namespace longformer::cuda {
namespace {

constexpr int kWarps = 4;  // rows per block
constexpr int kGroup = 4;  // band slots per step

template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kWarps * kWarpSize) banded_qk_kernel(const BandedMatmulParams p) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, W = p.window_left + p.window_right + 1, rows = p.batch * p.heads * N;
  const T fill = from_acc<T>(static_cast<A>(p.fill));
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i = row % N, bh = row / N, h = bh % p.heads, b = bh / p.heads;
    const int64_t d = p.dilation[h];
    const T* bh_rows = static_cast<const T*>(p.b.data) + p.b.offset(b, h, 0);
    T* band = static_cast<T*>(p.band) + p.band_offset(b, h, i);
    RowFrag<A, E, kFull> a;
    a.load(static_cast<const T*>(p.a.data) + p.a.offset(b, h, i), D, lane);
    for (int64_t t0 = 0; t0 < W; t0 += kGroup) {
      int64_t key[kGroup];
      RowFrag<A, E, kFull> k[kGroup];
      A s[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t j = i + (t0 + c - p.window_left) * d;
        key[c] = (t0 + c < W && j >= 0 && j < N) ? j : -1;
        k[c].load_row(bh_rows, key[c], p.b.stride_n, D, lane);
      }
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) s[c] = a.partial_dot(k[c]);
      warp_sum_n(s);
      // Lane c writes slot t0 + c: the group's slots are consecutive in memory.
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        if (lane == c && t0 + c < W) band[t0 + c] = key[c] >= 0 ? from_acc<T>(s[c]) : fill;
      }
    }
  }
}

// out_n = sum over the slots (n's own for pv, the reaching rows' for pv_transposed) of w * x_row.
template <typename T, int E, bool kFull, bool kTransposed>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kWarps * kWarpSize) banded_pv_kernel(const BandedMatmulParams p) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, W = p.window_left + p.window_right + 1, rows = p.batch * p.heads * N;
  const RowMajorHeads& x = kTransposed ? p.a : p.b;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t n = row % N, bh = row / N, h = bh % p.heads, b = bh / p.heads;
    const int64_t d = p.dilation[h];
    const T* x_rows = static_cast<const T*>(x.data) + x.offset(b, h, 0);
    const T* band_rows = static_cast<const T*>(p.band) + p.band_offset(b, h, 0);
    RowFrag<A, E, kFull> sum;
    sum.zero();
    for (int64_t t0 = 0; t0 < W; t0 += kGroup) {
      int64_t src[kGroup];
      A w[kGroup];
      RowFrag<A, E, kFull> xr[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t t = t0 + c, off = (t - p.window_left) * d;
        // pv: row n, slot t reads x_{n + off}; transposed: row i = n - off, slot t reaches n.
        const int64_t r = kTransposed ? n - off : n + off;
        src[c] = (t < W && r >= 0 && r < N) ? r : -1;
        w[c] = src[c] >= 0 ? load_acc<A>(band_rows + (kTransposed ? src[c] : n) * W + t) : A(0);
        xr[c].load_row(x_rows, src[c], x.stride_n, D, lane);
      }
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) sum.axpy(w[c], xr[c]);  // slot order: deterministic
    }
    sum.store(static_cast<T*>(p.out.data) + p.out.offset(b, h, n), D, lane, A(1));
  }
}

template <bool kTransposed>
int launch_pv(const BandedMatmulParams& p, DType dtype, void* stream) {
  const int64_t rows = p.batch * p.heads * p.seqlen;
  if (rows == 0 || p.head_dim == 0) return 0;
  return dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return dispatch_head_dim(p.head_dim, [&](auto dim) {
      auto kernel = &banded_pv_kernel<T, decltype(dim)::E, decltype(dim)::kFull, kTransposed>;
      return LONGFORMER_LAUNCH(kernel, dim3(grid_for(rows, kWarps)), dim3(kWarps * kWarpSize), 0, stream, p);
    });
  });
}

}  // namespace

int banded_matmul_qk(const BandedMatmulParams& p, DType dtype, void* stream) {
  const int64_t rows = p.batch * p.heads * p.seqlen;
  if (rows == 0) return 0;
  return dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    // D = 0 would still have to write `fill`/0 into the band: run it through the generic path.
    return dispatch_head_dim(p.head_dim == 0 ? 1 : p.head_dim, [&](auto dim) {
      auto kernel = &banded_qk_kernel<T, decltype(dim)::E, decltype(dim)::kFull>;
      return LONGFORMER_LAUNCH(kernel, dim3(grid_for(rows, kWarps)), dim3(kWarps * kWarpSize), 0, stream, p);
    });
  });
}

int banded_matmul_pv(const BandedMatmulParams& p, DType dtype, void* stream) {
  return launch_pv<false>(p, dtype, stream);
}

int banded_matmul_pv_transposed(const BandedMatmulParams& p, DType dtype, void* stream) {
  return launch_pv<true>(p, dtype, stream);
}

}  // namespace longformer::cuda
