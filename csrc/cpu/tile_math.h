// Building blocks shared by the fused CPU kernels: tiles of rows (views of the input, or copies
// in the accumulation dtype), exp, and for the backward score tiles from one GEMM,
// interval masks and the update of one (query rows x key block) tile. The forward's tile, on
// its own micro-kernels, is in forward_tile.h.
//
// Every fused kernel is a loop over such tiles; what differs between them is only which rows form
// the query tile, which keys form a block, and which (row, key) pairs the mask keeps.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

#include "gemm.h"
#include "longformer/params.h"
#include "longformer/score_modifiers.h"
#include "vector_math.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)

// Softmax and accumulation run in float for float and the half-precision inputs (float16,
// bfloat16: converted on load, rounded back on store) and in double for double.
template <typename scalar_t> struct Accumulate { using type = float; };
template <> struct Accumulate<double> { using type = double; };
template <typename scalar_t> using acc_type = typename Accumulate<scalar_t>::type;

template <typename T> constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

constexpr int64_t kRowTile = 64;     // query (or key) rows owned by one parallel task
constexpr int64_t kBlockLimit = 640; // most keys (or queries) scored against a tile at once

// A block of positions of one sequence: either first, first+step, ... or an explicit list.
struct Positions {
  int64_t first = 0, step = 1;
  const int64_t* list = nullptr;
  int64_t operator[](int64_t r) const { return list ? list[r] : first + r * step; }
  // The same sequence starting at its entry r.
  Positions from(int64_t r) const { return list ? Positions{0, 1, list + r} : Positions{first + r * step, step}; }
  bool operator==(const Positions&) const = default;
};

// Runs f(first, last) over task ranges on torch's thread pool, one task per grain, with BLAS kept
// single-threaded inside (see gemm.h). torch::stable::parallel_for runs at::parallel_for inside
// libtorch: torch's pool, its chunking and its nesting rules.
template <typename F>
void parallel_tasks(int64_t count, F&& f) {
  torch::stable::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
    SingleThreadedBlas guard;
    f(first, last);
  });
}

// 64-byte aligned scratch; alignment keeps BLAS results independent of where malloc lands.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t count) {
    size_t bytes = ((std::max<int64_t>(count, 1) * sizeof(T) + 63) / 64) * 64;
    ptr_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!ptr_) throw std::bad_alloc();
  }
  T* get() const { return ptr_.get(); }

 private:
  struct Free { void operator()(T* p) const { std::free(p); } };
  std::unique_ptr<T, Free> ptr_;
};

// The half-precision storage types (float16, bfloat16): held as float while computing.
template <typename scalar_t>
constexpr bool is_half_precision = std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>;

// GCC 12 takes the placeholder operands of its own AVX-512 conversion intrinsics (the
// _mm512_undefined_* values that c10::Half's scalar conversion passes them) for uninitialised
// variables and warns wherever they are inlined; nothing here is read uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// dst[0, n) = src[0, n) as acc. The half-precision types are widened a vector at a time where the
// instruction set can (vector_math.h), not one element per instruction.
template <typename scalar_t, typename acc>
void widen(acc* dst, const scalar_t* src, int64_t n) {
  int64_t c = 0;
  if constexpr (kVectorConversion<scalar_t> && std::is_same_v<acc, float>) {
    for (; c + FloatLanes::size <= n; c += FloatLanes::size) FloatLanes::store(dst + c, load_as_float(src + c));
  }
  for (; c < n; ++c) dst[c] = static_cast<acc>(src[c]);
}

// dst[0, n) = src[0, n) rounded to scalar_t (to nearest even), a vector at a time for the
// half-precision types.
template <typename scalar_t, typename acc>
void narrow(scalar_t* dst, const acc* src, int64_t n) {
  int64_t c = 0;
  if constexpr (kVectorConversion<scalar_t> && std::is_same_v<acc, float>) {
    for (; c + FloatLanes::size <= n; c += FloatLanes::size) store_from_float(dst + c, FloatLanes::load(src + c));
  }
  for (; c < n; ++c) dst[c] = static_cast<scalar_t>(src[c]);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// Padding rows (docs/design.md §2: a padding token's inputs reach no real token). Masking a padding
// key is not enough on its own: its probability is exactly 0, but 0 * NaN = NaN in the products
// with K and V (and a NaN score stays NaN after adding -inf); likewise in the backward a padding
// query's rows of P and dS are 0 but meet its q and dO in dK = dS^T Q, dV = P^T dO. So the rows of
// padding tokens are loaded as zeros wherever a product sums over several tokens' rows. (The
// forward's own query rows need none of this: a row's scores and output involve no other row, and
// padding rows' outputs are overwritten with 0.) `roles` is the batch row's [N] roles, indexed by
// position; null where no row can be padding.
inline bool is_padding(const uint8_t* roles, int64_t position) { return roles && roles[position] == kPadding; }

inline bool any_padding(const uint8_t* roles, Positions pos, int64_t count) {
  if (!roles) return false;
  for (int64_t r = 0; r < count; ++r) {
    if (roles[pos[r]] == kPadding) return true;
  }
  return false;
}

// Copies `count` rows of one head (rows chosen by `pos`) into dst[count][dim], converting to acc;
// rows of padding positions (per `roles`, see above) become zeros.
template <typename scalar_t, typename acc>
void load_rows(acc* dst, const scalar_t* head, int64_t stride_n, Positions pos, int64_t count, int64_t dim,
               const uint8_t* roles = nullptr) {
  for (int64_t r = 0; r < count; ++r) {
    acc* row = dst + r * dim;
    if (is_padding(roles, pos[r])) {
      std::fill(row, row + dim, acc(0));
    } else {
      widen(row, head + pos[r] * stride_n, dim);
    }
  }
}

// A row-major block of rows in the accumulation dtype: `data` with `ld` elements between rows.
template <typename acc>
struct Rows {
  const acc* data;
  int64_t ld;
};

// The rows as a view into the input when it already has the accumulation dtype and evenly spaced
// rows (BLAS reads them in place) and none of them is padding (per `roles`), else copied (and
// converted, padding rows as zeros) into `scratch`.
template <typename scalar_t, typename acc>
Rows<acc> rows_of(acc* scratch, const scalar_t* head, int64_t stride_n, Positions pos, int64_t count, int64_t dim,
                  const uint8_t* roles = nullptr) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    const int64_t ld = pos.step * stride_n;
    if (!pos.list && ld >= dim && ld <= std::numeric_limits<int32_t>::max() && !any_padding(roles, pos, count)) {
      return {head + pos[0] * stride_n, ld};
    }
  }
  load_rows(scratch, head, stride_n, pos, count, dim, roles);
  return {scratch, dim};
}

template <typename scalar_t, typename acc>
void store_rows(scalar_t* head, int64_t stride_n, Positions pos, const acc* src, int64_t count, int64_t dim) {
  for (int64_t r = 0; r < count; ++r) {
    scalar_t* dst = head + pos[r] * stride_n;
    const acc* row = src + r * dim;
    narrow(dst, row, dim);
  }
}

template <typename acc>
acc dot(const acc* a, const acc* b, int64_t n) {
  using S = SimdOf<acc>;
  typename S::vec sum{};
  int64_t i = 0;
  for (; i + S::size <= n; i += S::size) sum += S::load(a + i) * S::load(b + i);
  acc total = 0;
  for (int64_t l = 0; l < S::size; ++l) total += sum[l];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// s[0, n) of the query at `query` against keys at positions keys[0, n), modified (score_modifiers.h);
// where `dcap` is given it receives the softcap's derivative of each.
template <typename acc>
void modify_scores(const ScoreModifiers<acc>& mods, acc* s, int64_t n, int64_t query, Positions keys, acc* dcap) {
  for (int64_t c = 0; c < n; ++c) s[c] = mods.apply(s[c], query, keys[c], dcap ? dcap + c : nullptr);
}

// s[rows][keys] = scale * q[rows][dim] . k[keys][dim]^T
template <typename acc>
void score_tile(acc* s, Rows<acc> q, Rows<acc> k, int64_t rows, int64_t keys, int64_t dim, acc scale) {
  gemm(false, true, rows, keys, dim, scale, q.data, q.ld, k.data, k.ld, acc(0), s, keys);
}

// c[rows][dim] += alpha * a[rows][keys] . b[keys][dim]
template <typename acc>
void accumulate_ab(acc* c, const acc* a, Rows<acc> b, int64_t rows, int64_t keys, int64_t dim, acc alpha) {
  gemm(false, false, rows, dim, keys, alpha, a, keys, b.data, b.ld, acc(1), c, dim);
}

// c[keys][dim] += alpha * a[rows][keys]^T . b[rows][dim]
template <typename acc>
void accumulate_atb(acc* c, const acc* a, Rows<acc> b, int64_t rows, int64_t keys, int64_t dim, acc alpha) {
  gemm(true, false, keys, dim, rows, alpha, a, keys, b.data, b.ld, acc(1), c, dim);
}

// Keeps, in row r, only the keys in [lo[r], hi[r]) (block-relative) whose bias is not -inf.
// Everything else becomes -inf. Row bounds are clamped here so callers can pass raw arithmetic.
template <typename acc>
void mask_tile(acc* s, int64_t rows, int64_t keys, const int64_t* lo, const int64_t* hi, const acc* key_bias) {
  for (int64_t r = 0; r < rows; ++r) {
    acc* row = s + r * keys;
    int64_t a = std::clamp<int64_t>(lo[r], 0, keys);
    int64_t b = std::clamp<int64_t>(hi[r], a, keys);
    std::fill(row, row + a, neg_inf<acc>());
    std::fill(row + b, row + keys, neg_inf<acc>());
    if (key_bias) {
      for (int64_t c = a; c < b; ++c) row[c] += key_bias[c];
    }
  }
}

// row[c] = exp(row[c] - shift) in place; returns the sum. exp(-inf) = 0 takes care of masked keys.
// The vector body is exp_lanes (vector_math.h: within 2 ulp), much cheaper than the correctly
// rounded std::exp the last n % lanes elements use.
template <typename acc>
acc exp_shifted(acc* row, int64_t n, acc shift) {
  using S = SimdOf<acc>;
  typename S::vec sum{};
  int64_t c = 0;
  for (; c + S::size <= n; c += S::size) {
    const auto x = exp_lanes<acc>(S::load(row + c) - shift);
    S::store(row + c, x);
    sum += x;
  }
  acc total = 0;
  for (int64_t l = 0; l < S::size; ++l) total += sum[l];
  for (; c < n; ++c) {
    row[c] = std::exp(row[c] - shift);
    total += row[c];
  }
  return total;
}

// The scores of a backward tile: s[rows][keys] = scale * q k^T, modified (mods, for queries at
// qpos and keys at kpos; the softcap's derivative into dcap[rows][keys]), then masked (mask_tile).
template <typename acc>
void backward_scores(acc* s, acc* dcap, Rows<acc> q, Rows<acc> k, int64_t rows, int64_t keys, int64_t dim, acc scale,
                     const ScoreModifiers<acc>& mods, Positions qpos, Positions kpos, const int64_t* lo,
                     const int64_t* hi, const acc* key_bias) {
  score_tile(s, q, k, rows, keys, dim, scale);
  if (mods.any()) {
    for (int64_t r = 0; r < rows; ++r) {
      modify_scores(mods, s + r * keys, keys, qpos[r], kpos, mods.softcap > acc(0) ? dcap + r * keys : nullptr);
    }
  }
  mask_tile(s, rows, keys, lo, hi, key_bias);
}

// One backward tile. In: masked scores s[rows][keys] (overwritten with P), the softcap's
// derivative dcap[rows][keys] (null without a softcap), the tile's q, dout, lse, delta =
// rowsum(dout * out) - dlse, and the key block k, v. Out: whichever of dq[rows][dim],
// dk[keys][dim], dv[keys][dim] is non-null is accumulated into. `ds` is scratch of s's size.
template <typename acc>
void backward_tile(acc* s, acc* ds, const acc* dcap, Rows<acc> q, Rows<acc> dout, const acc* lse, const acc* delta,
                   Rows<acc> k, Rows<acc> v, int64_t rows, int64_t keys, int64_t dim, acc scale, acc* dq, acc* dk,
                   acc* dv) {
  for (int64_t r = 0; r < rows; ++r) {
    acc* row = s + r * keys;
    if (lse[r] == neg_inf<acc>()) {  // padding, global or keyless row: no gradient flows
      std::fill(row, row + keys, acc(0));
    } else {
      exp_shifted(row, keys, lse[r]);
    }
  }
  score_tile(ds, dout, v, rows, keys, dim, acc(1));  // dP = dO V^T
  for (int64_t r = 0; r < rows; ++r) {
    const acc* p = s + r * keys;
    acc* d = ds + r * keys;
    for (int64_t c = 0; c < keys; ++c) d[c] = p[c] * (d[c] - delta[r]);
    if (dcap) {
      const acc* f = dcap + r * keys;
      for (int64_t c = 0; c < keys; ++c) d[c] *= f[c];
    }
  }
  if (dv) accumulate_atb(dv, s, dout, rows, keys, dim, acc(1));
  if (dq) accumulate_ab(dq, ds, k, rows, keys, dim, scale);
  if (dk) accumulate_atb(dk, ds, q, rows, keys, dim, scale);
}

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
