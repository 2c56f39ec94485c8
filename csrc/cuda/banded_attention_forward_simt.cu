// Fused forward of the local rows on CUDA cores (every dtype; the float32/float64 path, and every
// call with the general op's arguments, docs/design.md §2.2).
//
// Computes, for every local query row i of (b, h), at position p = q_offset + i: out_i =
// softmax(modified scale * q_i . K^T) V over its keys (band keys j = p + t * dilation[h], -left <= t
// <= right, inside p's sequence, real and local, then every real global key of that sequence, only
// j <= p when causal; K, V of the query head's KV head), a sink's logit in the denominator when
// given, and lse_i = log of the softmax denominator. Global and padding rows, and local rows without
// any key or sink, are left as the launcher found them (out = 0, lse = -inf).
//
// Work split: one warp per query row, kWarps rows per block, rows in (b, h, i) order so the warps
// of a block share most of their band keys in L1/L2. The warp keeps q_i, the running output and
// the softmax state in registers (lanes split D, see warp_math.h) and walks the keys in groups of
// kGroup: the group's key rows are loaded and their dot products reduced together (independent
// shuffles overlap), then one rescale of the state per group (online softmax).
#include "device.h"
#include "launchers.h"
#include "warp_math.h"

namespace longformer::cuda {
namespace {

constexpr int kWarps = 4;  // query rows per block
constexpr int kGroup = 4;  // keys per online-softmax step

template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kWarps * kWarpSize)
    banded_forward_simt_kernel(const AttentionParams p, const GlobalKeys globals) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, Nq = p.queries, left = p.window_left, right = p.effective_right();
  const int64_t rows = p.batch * p.heads * Nq;
  const A scale = static_cast<A>(p.scale);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i = row % Nq, bh = row / Nq, h = bh % p.heads, b = bh / p.heads;
    const int64_t pos = p.q_offset + i;
    const uint8_t* roles = p.roles + b * N;
    if (roles[pos] != kLocal) continue;  // warp-uniform: the whole warp owns this row
    const int64_t d = p.dilation[h];
    const AttentionParams::Span seq = p.sequence_of(pos);
    const T* kh = static_cast<const T*>(p.k.data) + p.k.offset(b, p.kv_head(h), 0);
    const T* vh = static_cast<const T*>(p.v.data) + p.v.offset(b, p.kv_head(h), 0);
    const ScoreModifiers<A> mods(p, h);

    RowFrag<A, E, kFull> q;
    q.load(static_cast<const T*>(p.q.data) + p.q.offset(b, h, i), D, lane);
    OnlineRow<A, E, kFull> state;
    state.reset();

    // Band keys, local and inside the sequence (causal: right = 0, so j <= pos).
    for (int64_t t0 = -left; t0 <= right; t0 += kGroup) {
      int64_t key[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t t = t0 + c, j = pos + t * d;
        key[c] = (t <= right && j >= seq.start && j < seq.end && roles[j] == kLocal) ? j : -1;
      }
      state.template absorb<kGroup>(q, kh, p.k.stride_n, vh, p.v.stride_n, key, scale, D, lane, mods, pos);
    }

    // Global keys of the sequence (ascending positions; causal: only those at or before pos).
    const GlobalRange range = global_range(globals, b, N, seq.start, seq.end);
    const int64_t* index = globals.index + b * N;
    for (int64_t g0 = range.begin; g0 < range.end; g0 += kGroup) {
      if (p.causal && index[g0] > pos) break;
      int64_t key[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t g = g0 + c;
        key[c] = (g < range.end && (!p.causal || index[g] <= pos)) ? index[g] : -1;
      }
      state.template absorb<kGroup>(q, kh, p.k.stride_n, vh, p.v.stride_n, key, scale, D, lane, mods, pos);
    }

    state.finish(sink_logit<A>(p, h));
    if (state.l > A(0)) {
      T* out = static_cast<T*>(p.out.data) + p.out.offset(b, h, i);
      state.o.store(out, D, lane, A(1) / state.l);
    }
    if (lane == 0 && state.m != neg_inf<A>()) static_cast<A*>(p.lse)[p.lse_offset(b, h, i)] = state.lse();
  }
}

}  // namespace

int banded_attention_forward_simt(const AttentionParams& p, const GlobalKeys& g, DType dtype, void* stream) {
  const int64_t rows = p.batch * p.heads * p.queries;
  if (rows == 0 || p.head_dim == 0) return 0;
  return dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return dispatch_head_dim(p.head_dim, [&](auto dim) {
      auto kernel = &banded_forward_simt_kernel<T, decltype(dim)::E, decltype(dim)::kFull>;
      return LONGFORMER_LAUNCH(kernel, dim3(grid_for(rows, kWarps)), dim3(kWarps * kWarpSize), 0, stream, p, g);
    });
  });
}

}  // namespace longformer::cuda
