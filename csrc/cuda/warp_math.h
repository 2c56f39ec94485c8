// Device helpers shared by the SIMT kernels (forward, backward, global attention, banded matmuls):
// a head-dim row split across the 32 lanes of a warp, warp reductions, the online-softmax state,
// and the dtype / head-dim dispatch of the launchers.
//
// Row layout: lane l holds elements l, l + 32, ..., l + 32 * (E - 1) of a row of D <= 32 * E values.
// Every load instruction of the warp then reads 32 consecutive elements of the row (coalesced),
// whatever the row's alignment, and a dot product is E fused multiply-adds per lane plus one
// butterfly reduction. kFull (D == 32 * E) drops the bounds checks for the specialised head dims.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device.h"
#include "launchers.h"
#include "longformer/score_modifiers.h"

namespace longformer::cuda {

// Every kernel declares its block size; the minimum of one resident block stops ptxas from capping
// the register count at 64 (which it did for some instantiations, spilling to local memory).
#ifdef LONGFORMER_HOST_EMULATION
#define LONGFORMER_LAUNCH_BOUNDS(threads)
#else
#define LONGFORMER_LAUNCH_BOUNDS(threads) __launch_bounds__(threads, 1)
#endif

// `#pragma unroll` for nvcc; g++ (host emulation) spells it differently and warns on the CUDA form.
#ifdef LONGFORMER_HOST_EMULATION
#define LONGFORMER_UNROLL _Pragma("GCC unroll 16")
#else
#define LONGFORMER_UNROLL _Pragma("unroll")
#endif

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}
template <typename A>
__device__ __forceinline__ A max_of(A a, A b) {
  return a > b ? a : b;
}

// Sum over the 32 lanes; every lane gets the result. All lanes of the warp must call it.
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
LONGFORMER_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// G sums over the 32 lanes at once: the G butterflies are interleaved so their shuffles overlap.
template <typename A, int G>
__device__ __forceinline__ void warp_sum_n(A (&x)[G]) {
LONGFORMER_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) {
LONGFORMER_UNROLL
    for (int c = 0; c < G; ++c) x[c] += __shfl_xor_sync(kFullMask, x[c], offset);
  }
}

template <typename A, typename T>
__device__ __forceinline__ A load_acc(const T* p) {
  return static_cast<A>(to_float(*p));
}

// One row of D values held by the warp (see the layout at the top of the file).
template <typename A, int E, bool kFull>
struct RowFrag {
  A x[E];

  __device__ __forceinline__ void zero() {
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) x[e] = A(0);
  }
  template <typename T>
  __device__ __forceinline__ void load(const T* row, int D, int lane) {
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) {
      const int d = e * kWarpSize + lane;
      x[e] = (kFull || d < D) ? load_acc<A>(row + d) : A(0);
    }
  }
  // Loads row `n` (stride `stride`) of `base`, or zeros when n < 0 (an absent row).
  template <typename T>
  __device__ __forceinline__ void load_row(const T* base, int64_t n, int64_t stride, int D, int lane) {
    if (n >= 0) {
      load(base + n * stride, D, lane);
    } else {
      zero();
    }
  }
  template <typename T>
  __device__ __forceinline__ void store(T* row, int D, int lane, A factor) const {
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) {
      const int d = e * kWarpSize + lane;
      if (kFull || d < D) row[d] = from_acc<T>(x[e] * factor);
    }
  }
  // This lane's part of the dot product with `o` (finish with warp_sum).
  __device__ __forceinline__ A partial_dot(const RowFrag& o) const {
    A s = A(0);
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) s += x[e] * o.x[e];
    return s;
  }
  __device__ __forceinline__ void scale(A f) {
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) x[e] *= f;
  }
  // this += a * o
  __device__ __forceinline__ void axpy(A a, const RowFrag& o) {
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) x[e] += a * o.x[e];
  }
};

// Online softmax of one query row held by one warp: running max m, running sum l of exp(s - m),
// and the running output o = sum exp(s - m) v. Keys arrive in groups of G; a slot whose key
// position is negative is absent.
template <typename A, int E, bool kFull>
struct OnlineRow {
  A m, l;
  RowFrag<A, E, kFull> o;

  __device__ __forceinline__ void reset() {
    m = neg_inf<A>();
    l = A(0);
    o.zero();
  }

  // Absorbs the keys key[c] >= 0 (rows of kh / vh with strides ks / vs) into the state of query q,
  // at position `query`, its scores modified by `mods`.
  template <int G, typename T>
  __device__ __forceinline__ void absorb(const RowFrag<A, E, kFull>& q, const T* kh, int64_t ks, const T* vh,
                                         int64_t vs, const int64_t (&key)[G], A scale, int D, int lane,
                                         const ScoreModifiers<A>& mods, int64_t query) {
    RowFrag<A, E, kFull> k[G];
    A s[G];
LONGFORMER_UNROLL
    for (int c = 0; c < G; ++c) k[c].load_row(kh, key[c], ks, D, lane);
LONGFORMER_UNROLL
    for (int c = 0; c < G; ++c) s[c] = q.partial_dot(k[c]);
    warp_sum_n(s);
    A mx = m;
LONGFORMER_UNROLL
    for (int c = 0; c < G; ++c) {
      s[c] = key[c] < 0 ? neg_inf<A>() : mods.any() ? mods.apply(s[c] * scale, query, key[c]) : s[c] * scale;
      mx = max_of(mx, s[c]);
    }
    if (mx == neg_inf<A>()) return;  // no key so far: nothing to rescale (and exp(-inf - -inf) is NaN)
    const A correction = acc_exp(m - mx);  // 0 for the first keys (m = -inf)
    l *= correction;
    o.scale(correction);
    m = mx;
LONGFORMER_UNROLL
    for (int c = 0; c < G; ++c) {
      if (key[c] >= 0) {
        const A pc = acc_exp(s[c] - mx);
        RowFrag<A, E, kFull> v;
        v.load(vh + key[c] * vs, D, lane);
        l += pc;
        o.axpy(pc, v);
      }
    }
  }

  // Adds a sink's logit (a zero value) to the denominator; -inf: none. A row without keys then has
  // l = 1, o = 0 and lse = sink.
  __device__ __forceinline__ void finish(A sink) {
    if (sink == neg_inf<A>()) return;
    const A top = max_of(m, sink);
    const A correction = acc_exp(m - top);  // 0 when there was no key (m = -inf)
    l = l * correction + acc_exp(sink - top);
    o.scale(correction);
    m = top;
  }
  __device__ __forceinline__ A lse() const { return m + acc_log(l); }
};

// ---- softmax backward of row groups (recomputing p from the saved lse) ---------------------------

// Pointers of one (b, h), all indexed by position: the query-side ones (q, dout) through
// params.h's query_offset, the key-side ones (k, v) in the query head's KV head.
template <typename T>
struct Head {
  const T *q, *k, *v, *dout;
  int64_t qs, ks, vs, ds;
  __device__ Head(const AttentionParams& p, int64_t b, int64_t h)
      : q(static_cast<const T*>(p.q.data) + p.query_offset(p.q, b, h, 0)),
        k(static_cast<const T*>(p.k.data) + p.k.offset(b, p.kv_head(h), 0)),
        v(static_cast<const T*>(p.v.data) + p.v.offset(b, p.kv_head(h), 0)),
        dout(static_cast<const T*>(p.grad_out.data) + p.query_offset(p.grad_out, b, h, 0)),
        qs(p.q.stride_n), ks(p.k.stride_n), vs(p.v.stride_n), ds(p.grad_out.stride_n) {}
};

// p_c = exp(modified score - lse) and the softcap's derivative of the score (1 without one).
template <typename A>
__device__ __forceinline__ A probability(A dot, A scale, A lse, const ScoreModifiers<A>& mods, int64_t query,
                                         int64_t key, A& dcap) {
  dcap = A(1);
  const A s = mods.any() ? mods.apply(dot * scale, query, key, &dcap) : dot * scale;
  return acc_exp(s - lse);
}

// Softmax backward of the query row at position `query` against G keys (key[c] < 0: absent),
// p = exp(modified scale*s - lse): dq += sum_c p (dP - delta) dcap k_c (the caller multiplies by
// scale at the end).
template <int G, typename T, typename A, int E, bool kFull>
__device__ __forceinline__ void dq_keys(RowFrag<A, E, kFull>& dq, const RowFrag<A, E, kFull>& q,
                                        const RowFrag<A, E, kFull>& dout, A lse, A delta, const Head<T>& hd,
                                        const int64_t (&key)[G], A scale, int D, int lane,
                                        const ScoreModifiers<A>& mods, int64_t query) {
  RowFrag<A, E, kFull> k[G], v[G];
  A s[2 * G];
LONGFORMER_UNROLL
  for (int c = 0; c < G; ++c) {
    k[c].load_row(hd.k, key[c], hd.ks, D, lane);
    v[c].load_row(hd.v, key[c], hd.vs, D, lane);
  }
LONGFORMER_UNROLL
  for (int c = 0; c < G; ++c) {
    s[c] = q.partial_dot(k[c]);
    s[G + c] = dout.partial_dot(v[c]);
  }
  warp_sum_n(s);
LONGFORMER_UNROLL
  for (int c = 0; c < G; ++c) {
    if (key[c] >= 0) {
      A dcap;
      const A pc = probability(s[c], scale, lse, mods, query, key[c], dcap);
      dq.axpy(pc * (s[G + c] - delta) * dcap, k[c]);
    }
  }
}

// The same from the key side: the key row (k, v) at position `key` against G query rows at
// positions query[c] (< 0: absent; lse, delta indexed by position):
// dk += sum_c p (dP - delta_c) dcap q_c (times scale at the end), dv += sum_c p dO_c.
template <int G, typename T, typename A, int E, bool kFull>
__device__ __forceinline__ void dkdv_queries(RowFrag<A, E, kFull>& dk, RowFrag<A, E, kFull>& dv,
                                             const RowFrag<A, E, kFull>& k, const RowFrag<A, E, kFull>& v,
                                             const Head<T>& hd, const A* lse, const A* delta,
                                             const int64_t (&query)[G], A scale, int D, int lane,
                                             const ScoreModifiers<A>& mods, int64_t key) {
  RowFrag<A, E, kFull> q[G], dout[G];
  A s[2 * G];
LONGFORMER_UNROLL
  for (int c = 0; c < G; ++c) {
    q[c].load_row(hd.q, query[c], hd.qs, D, lane);
    dout[c].load_row(hd.dout, query[c], hd.ds, D, lane);
  }
LONGFORMER_UNROLL
  for (int c = 0; c < G; ++c) {
    s[c] = q[c].partial_dot(k);
    s[G + c] = dout[c].partial_dot(v);
  }
  warp_sum_n(s);
LONGFORMER_UNROLL
  for (int c = 0; c < G; ++c) {
    if (query[c] >= 0) {
      A dcap;
      const A pc = probability(s[c], scale, lse[query[c]], mods, query[c], key, dcap);
      dv.axpy(pc, dout[c]);
      dk.axpy(pc * (s[G + c] - delta[query[c]]) * dcap, q[c]);
    }
  }
}

// ---- launcher-side dispatch -------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the storage type of `dtype`; returns f's result (an error code).
template <typename F>
inline int dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
    case DType::kFloat32Tf32: return f(TypeTag<float>{});  // SIMT: full fp32 either way
    case DType::kFloat64: return f(TypeTag<double>{});
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return 1;  // cudaErrorInvalidValue
}

template <int E_, bool kFull_>
struct HeadDim {
  static constexpr int E = E_;
  static constexpr bool kFull = kFull_;
};

constexpr int64_t kMaxHeadDim = 256;

// Head dims 32, 64 and 128 get exact per-lane element counts; any other D <= 256 runs through the
// generic instantiation with bounds checks. Returns 1 (cudaErrorInvalidValue) for larger D.
template <typename F>
inline int dispatch_head_dim(int64_t D, F&& f) {
  if (D == 32) return f(HeadDim<1, true>{});
  if (D == 64) return f(HeadDim<2, true>{});
  if (D == 128) return f(HeadDim<4, true>{});
  if (D >= 1 && D <= kMaxHeadDim) return f(HeadDim<8, false>{});
  return 1;
}

// Grid size for a grid-stride loop over `items` work items of `per_block` items per block: the
// loops in the kernels stay correct when the grid is capped.
inline unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = ceil_div(items, per_block);
  const int64_t cap = int64_t(1) << 30;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace longformer::cuda
