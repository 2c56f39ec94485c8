// Rows of global queries: each global row g of (b, h) (a global token among the queries, at
// position g) attends to every real key of its sequence (keys j <= g when causal) with the global
// projections (p.q/k/v are global_q/k/v; k, v of the query head's KV head); s_gj is the modified
// scaled score (docs/design.md §2.2), a sink's logit joins the denominator when given:
//   out_g = softmax(s_g) V,  lse_g = log of the softmax denominator.
// Backward, with p_gj recomputed from lse_g, dP_gj = dO_g . v_j, delta_g = dO_g . O_g - dlse_g and
// c_gj the softcap's derivative (1 without):
//   dQ_g = scale * sum_j p_gj (dP_gj - delta_g) c_gj k_j
//   dK_j = scale * sum_g p_gj (dP_gj - delta_g) c_gj q_g,  dV_j = sum_g p_gj dO_g   (over the global rows g)//
// Work split. There are few global rows, each over all N keys, so the keys of a row are split into
// chunks processed by separate blocks (split-K, flash-decoding style). A work item is (b, h, global
// slot g, chunk c); the grid is a capped grid-stride loop over the items ordered g-major, so the
// items of the first global slots of every (b, h) come first and a block stops at the largest
// count[b]. Inside a block the kWarps warps take key groups of the chunk round-robin, with their
// own online-softmax state (forward) or dQ partial sum (backward) in registers, combined in shared
// memory in warp order.
//
// Chunks per global row of batch b: C_b = min(max_chunks, rows / count[b]) (SplitShape, from N on
// the host: max_chunks = ceil(N / kChunkKeys) capped at kMaxChunks, rows = min(N, max_chunks *
// kSplitRows)), so the count[b] * C_b partials of a (b, h) fit in `rows` workspace slots whatever
// the number of global tokens. The keys [0, key_end) of a row are cut into C_b equal ranges. With
// C_b >= 2 each chunk block writes a partial (forward: running max m, sum l, unnormalised o[D];
// backward: unscaled dq[D]) to the workspace in the accumulation dtype, and a combine kernel (one
// warp per global row) merges the C_b partials in chunk order and writes the row: deterministic, no
// atomics. With C_b == 1 (many global tokens, which fill the GPU anyway) the single chunk block
// writes the row itself.
//
// dK/dV: one warp per key row, looping over the count[b] global rows in ascending order; written,
// or added to the local rows' part when the global rows share k and v with them.
// Workspaces (accumulation dtype A): forward [B*H, rows, D + 2] partials; backward delta [B*H*N]
// (only the global rows are written and read) followed by [B*H, rows, D] partials.
#include "device.h"
#include "global_split.h"
#include "launchers.h"
#include "warp_math.h"

namespace longformer::cuda {
namespace {

constexpr int kWarps = 8;          // warps sharing one chunk of a global row
constexpr int kGroup = 2;          // keys per step of a warp
constexpr int kRowWarps = 4;       // rows per block in the warp-per-row kernels
// Work item -> (b, h, slot g, chunk c), g-major.
struct Item {
  int64_t b, h, bh, g, c;
  __device__ Item(const AttentionParams& p, const SplitShape& s, int64_t item) {
    c = item % s.max_chunks;
    const int64_t rest = item / s.max_chunks;
    bh = rest % (p.batch * p.heads);
    g = rest / (p.batch * p.heads);
    h = bh % p.heads;
    b = bh / p.heads;
  }
};

// The keys of chunk c (of `chunks`) of the global row at position qi: its sequence's keys, up to qi
// when causal, cut into equal ranges.
struct KeyChunk {
  int64_t begin, end;
};
__device__ __forceinline__ KeyChunk key_chunk(const AttentionParams& p, int64_t qi, int64_t c, int64_t chunks) {
  const AttentionParams::Span seq = p.sequence_of(qi);
  const int64_t key_end = p.causal ? qi + 1 : seq.end;
  const int64_t len = ceil_div(key_end - seq.start, chunks);
  const int64_t begin = seq.start + c * len;
  return {begin, min_i64(key_end, begin + len)};
}

// Writes the global row at position qi from its softmax state over all its keys (running max m,
// sum l, unnormalised o), with the head's sink; a row without keys or sink keeps out 0, lse -inf.
template <typename T, typename A, int E, bool kFull>
__device__ __forceinline__ void write_row(const AttentionParams& p, int64_t b, int64_t h, int64_t qi, A m, A l,
                                          const RowFrag<A, E, kFull>& o, int lane) {
  OnlineRow<A, E, kFull> state{m, l, o};
  state.finish(sink_logit<A>(p, h));
  if (state.m == neg_inf<A>()) return;
  state.o.store(static_cast<T*>(p.out.data) + p.query_offset(p.out, b, h, qi), static_cast<int>(p.head_dim), lane, A(1) / state.l);
  if (lane == 0) static_cast<A*>(p.lse)[p.lse_position_offset(b, h, qi)] = state.lse();
}

// ---- forward --------------------------------------------------------------------------------------

template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kWarps * kWarpSize)
    global_forward_kernel(const AttentionParams p, const GlobalKeys globals, const SplitShape split, void* workspace) {
  using A = acc_t<T>;
  __shared__ A part_o[kWarps][E * kWarpSize];
  __shared__ A part_m[kWarps], part_l[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen;
  const A scale = static_cast<A>(p.scale);
  const int64_t slots = max_count(p, globals);

  for (int64_t item = blockIdx.x;; item += gridDim.x) {  // block-uniform loop
    const Item it(p, split, item);
    if (it.g >= slots) break;  // block-uniform; no barrier follows the loop
    const int64_t b = it.b, h = it.h, count = globals.count[b];
    if (it.g >= count) continue;  // block-uniform
    const int64_t chunks = chunks_of(split, count);
    if (it.c >= chunks) continue;  // block-uniform
    const int64_t qi = globals.index[b * N + it.g];
    if (!p.is_query(qi)) continue;  // block-uniform: a global key before the queries
    const uint8_t* roles = p.roles + b * N;
    const T* kh = static_cast<const T*>(p.k.data) + p.k.offset(b, p.kv_head(h), 0);
    const T* vh = static_cast<const T*>(p.v.data) + p.v.offset(b, p.kv_head(h), 0);
    const KeyChunk chunk = key_chunk(p, qi, it.c, chunks);
    const ScoreModifiers<A> mods(p, h);

    RowFrag<A, E, kFull> q;
    q.load(static_cast<const T*>(p.q.data) + p.query_offset(p.q, b, h, qi), D, lane);
    OnlineRow<A, E, kFull> state;
    state.reset();
    for (int64_t j0 = chunk.begin + warp * kGroup; j0 < chunk.end; j0 += kWarps * kGroup) {
      int64_t key[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t j = j0 + c;
        key[c] = (j < chunk.end && roles[j] != kPadding) ? j : -1;
      }
      state.template absorb<kGroup>(q, kh, p.k.stride_n, vh, p.v.stride_n, key, scale, D, lane, mods, qi);
    }
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) part_o[warp][e * kWarpSize + lane] = state.o.x[e];
    if (lane == 0) {
      part_m[warp] = state.m;
      part_l[warp] = state.l;
    }
    __syncthreads();
    if (warp == 0) {  // combine the warps in warp order
      A m = neg_inf<A>();
      for (int w = 0; w < kWarps; ++w) m = max_of(m, part_m[w]);
      A l = A(0);
      RowFrag<A, E, kFull> o;
      o.zero();
      if (m != neg_inf<A>()) {
        for (int w = 0; w < kWarps; ++w) {
          const A f = acc_exp(part_m[w] - m);  // 0 for a warp without keys
          l += part_l[w] * f;
LONGFORMER_UNROLL
          for (int e = 0; e < E; ++e) o.x[e] += part_o[w][e * kWarpSize + lane] * f;
        }
      }
      if (chunks == 1) {  // the whole row: write it
        write_row<T>(p, b, h, qi, m, l, o, lane);
      } else {  // partial of chunk c (m = -inf, l = 0, o = 0 for a chunk without keys)
        A* part = static_cast<A*>(workspace) + ((it.bh * split.rows) + it.g * chunks + it.c) * (D + 2);
        if (lane == 0) {
          part[0] = m;
          part[1] = l;
        }
        o.store(part + 2, D, lane, A(1));
      }
    }
    __syncthreads();  // the shared buffers are reused by the block's next item
  }
}

// Merges the chunk partials of each split global row in chunk order: one warp per (b, h, slot).
template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kRowWarps * kWarpSize)
    global_forward_combine_kernel(const AttentionParams p, const GlobalKeys globals, const SplitShape split,
                                  const void* workspace) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, BH = p.batch * p.heads;
  const int64_t slots = max_count(p, globals);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp;; row += step) {
    const int64_t g = row / BH, bh = row % BH, h = bh % p.heads, b = bh / p.heads;
    if (g >= slots) break;  // warp-uniform; no barrier in this kernel
    const int64_t count = globals.count[b];
    if (g >= count) continue;
    const int64_t chunks = chunks_of(split, count);
    if (chunks == 1) continue;  // written by the chunk kernel
    const int64_t qi = globals.index[b * N + g];
    if (!p.is_query(qi)) continue;
    const A* part = static_cast<const A*>(workspace) + (bh * split.rows + g * chunks) * (D + 2);
    A m = neg_inf<A>();
    for (int64_t c = 0; c < chunks; ++c) m = max_of(m, part[c * (D + 2)]);
    A l = A(0);
    RowFrag<A, E, kFull> o, x;
    o.zero();
    if (m != neg_inf<A>()) {
      for (int64_t c = 0; c < chunks; ++c) {
        const A* pc = part + c * (D + 2);
        const A f = acc_exp(pc[0] - m);  // 0 for a chunk without keys
        l += pc[1] * f;
        x.load(pc + 2, D, lane);
        o.axpy(f, x);
      }
    }
    write_row<T>(p, b, h, qi, m, l, o, lane);
  }
}

// ---- backward -------------------------------------------------------------------------------------

// delta_g = dO_g . O_g - dlse_g for the global rows (warp per query row; other rows are skipped).
template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kRowWarps * kWarpSize)
    global_delta_kernel(const AttentionParams p, void* workspace) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t Nq = p.queries, rows = p.batch * p.heads * Nq;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int64_t i = row % Nq, bh = row / Nq, h = bh % p.heads, b = bh / p.heads;
    if (p.roles[b * p.seqlen + p.q_offset + i] != kGlobal) continue;
    RowFrag<A, E, kFull> dout, out;
    dout.load(static_cast<const T*>(p.grad_out.data) + p.grad_out.offset(b, h, i), D, lane);
    out.load(static_cast<const T*>(p.out.data) + p.out.offset(b, h, i), D, lane);
    A value = warp_sum(dout.partial_dot(out));
    if (p.grad_lse) value -= static_cast<const A*>(p.grad_lse)[row];
    if (lane == 0) static_cast<A*>(workspace)[row] = value;  // row == p.lse_offset(b, h, i)
  }
}

// dQ of the global rows, one block per (b, h, global slot, chunk), warps over key groups; writes
// the row (one chunk) or the chunk's unscaled partial after the delta part of the workspace.
template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kWarps * kWarpSize)
    global_dq_kernel(const AttentionParams p, const GlobalKeys globals, const SplitShape split, void* workspace) {
  using A = acc_t<T>;
  __shared__ A part[kWarps][E * kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen;
  const A scale = static_cast<A>(p.scale);
  const int64_t slots = max_count(p, globals);
  A* partials = static_cast<A*>(workspace) + p.batch * p.heads * N;

  for (int64_t item = blockIdx.x;; item += gridDim.x) {  // block-uniform loop
    const Item it(p, split, item);
    if (it.g >= slots) break;  // block-uniform; no barrier follows the loop
    const int64_t b = it.b, h = it.h, count = globals.count[b];
    if (it.g >= count) continue;  // block-uniform
    const int64_t chunks = chunks_of(split, count);
    if (it.c >= chunks) continue;  // block-uniform
    const int64_t qi = globals.index[b * N + it.g];
    if (!p.is_query(qi)) continue;  // block-uniform: a global key before the queries
    const A lse = static_cast<const A*>(p.lse)[p.lse_position_offset(b, h, qi)];
    if (lse == neg_inf<A>()) continue;  // no key: no gradient (block-uniform; the combine skips it too)
    const A delta = static_cast<const A*>(workspace)[p.lse_position_offset(b, h, qi)];
    const uint8_t* roles = p.roles + b * N;
    const Head<T> hd(p, b, h);
    const ScoreModifiers<A> mods(p, h);
    const KeyChunk chunk = key_chunk(p, qi, it.c, chunks);

    RowFrag<A, E, kFull> q, dout, dq;
    q.load(hd.q + qi * hd.qs, D, lane);
    dout.load(hd.dout + qi * hd.ds, D, lane);
    dq.zero();
    for (int64_t j0 = chunk.begin + warp * kGroup; j0 < chunk.end; j0 += kWarps * kGroup) {
      int64_t key[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t j = j0 + c;
        key[c] = (j < chunk.end && roles[j] != kPadding) ? j : -1;
      }
      dq_keys(dq, q, dout, lse, delta, hd, key, scale, D, lane, mods, qi);
    }
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) part[warp][e * kWarpSize + lane] = dq.x[e];
    __syncthreads();
    if (chunks == 1) {
      T* out = static_cast<T*>(p.grad_q.data) + p.query_offset(p.grad_q, b, h, qi);
      for (int x = threadIdx.x; x < D; x += kWarps * kWarpSize) {
        A sum = A(0);
        for (int w = 0; w < kWarps; ++w) sum += part[w][x];  // warp order: deterministic
        out[x] = from_acc<T>(sum * scale);
      }
    } else {
      A* out = partials + (it.bh * split.rows + it.g * chunks + it.c) * D;
      for (int x = threadIdx.x; x < D; x += kWarps * kWarpSize) {
        A sum = A(0);
        for (int w = 0; w < kWarps; ++w) sum += part[w][x];
        out[x] = sum;
      }
    }
    __syncthreads();  // `part` is reused by the block's next item
  }
}

// Sums the dQ partials of each split global row in chunk order: one warp per (b, h, slot).
template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kRowWarps * kWarpSize)
    global_dq_combine_kernel(const AttentionParams p, const GlobalKeys globals, const SplitShape split,
                             const void* workspace) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, BH = p.batch * p.heads;
  const A scale = static_cast<A>(p.scale);
  const int64_t slots = max_count(p, globals);
  const A* partials = static_cast<const A*>(workspace) + BH * N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp;; row += step) {
    const int64_t g = row / BH, bh = row % BH, h = bh % p.heads, b = bh / p.heads;
    if (g >= slots) break;  // warp-uniform; no barrier in this kernel
    const int64_t count = globals.count[b];
    if (g >= count) continue;
    const int64_t chunks = chunks_of(split, count);
    if (chunks == 1) continue;  // written by the chunk kernel
    const int64_t qi = globals.index[b * N + g];
    if (!p.is_query(qi) || static_cast<const A*>(p.lse)[p.lse_position_offset(b, h, qi)] == neg_inf<A>()) {
      continue;  // no partials written
    }
    const A* part = partials + (bh * split.rows + g * chunks) * D;
    RowFrag<A, E, kFull> dq, x;
    dq.zero();
    for (int64_t c = 0; c < chunks; ++c) {
      x.load(part + c * D, D, lane);
      dq.axpy(A(1), x);
    }
    dq.store(static_cast<T*>(p.grad_q.data) + p.query_offset(p.grad_q, b, h, qi), D, lane, scale);
  }
}

// dK, dV of every real key j from the global rows of its sequence: one warp per key, global rows in
// ascending order.
template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kRowWarps * kWarpSize)
    global_dkdv_kernel(const AttentionParams p, const GlobalKeys globals, void* workspace, bool accumulate) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, rows = p.batch * p.heads * N;
  const A scale = static_cast<A>(p.scale);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int64_t j = row % N, bh = row / N, h = bh % p.heads, b = bh / p.heads;
    if (globals.count[b] == 0 || p.roles[b * N + j] == kPadding) continue;  // warp-uniform
    const AttentionParams::Span seq = p.sequence_of(j);
    // The global rows of j's sequence: global tokens among the queries.
    const GlobalRange range = global_range(globals, b, N, max_i64(seq.start, p.q_offset),
                                           min_i64(seq.end, p.q_offset + p.queries));
    const int64_t* index = globals.index + b * N;
    const Head<T> hd(p, b, h);
    const ScoreModifiers<A> mods(p, h);
    const A* lse = static_cast<const A*>(p.lse) + p.lse_position_offset(b, h, 0);
    const A* delta = static_cast<const A*>(workspace) + p.lse_position_offset(b, h, 0);

    RowFrag<A, E, kFull> k, v, dk, dv;
    k.load(hd.k + j * hd.ks, D, lane);
    v.load(hd.v + j * hd.vs, D, lane);
    dk.zero();
    dv.zero();
    for (int64_t g0 = range.begin; g0 < range.end; g0 += kGroup) {
      int64_t query[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t g = g0 + c;
        const int64_t qi = g < range.end ? index[g] : -1;
        // Causal: global row qi sees key j only when j <= qi.
        query[c] = (qi >= 0 && (!p.causal || qi >= j) && lse[qi] != neg_inf<A>()) ? qi : -1;
      }
      dkdv_queries(dk, dv, k, v, hd, lse, delta, query, scale, D, lane, mods, j);
    }
    T* grad_k = static_cast<T*>(p.grad_k.data) + p.grad_k.offset(b, p.grad_kv_head(h), j);
    T* grad_v = static_cast<T*>(p.grad_v.data) + p.grad_v.offset(b, p.grad_kv_head(h), j);
    if (accumulate) {  // onto the local rows' part: scale dK first, then one rounding per element
      RowFrag<A, E, kFull> earlier;
      earlier.load(grad_k, D, lane);
      dk.scale(scale);
      dk.axpy(A(1), earlier);
      earlier.load(grad_v, D, lane);
      dv.axpy(A(1), earlier);
      dk.store(grad_k, D, lane, A(1));
    } else {
      dk.store(grad_k, D, lane, scale);
    }
    dv.store(grad_v, D, lane, A(1));
  }
}

int64_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

// Grid of the chunk kernels: every work item up to the cap (the idle ones stop at once).
unsigned chunk_grid(const AttentionParams& p, const SplitShape& s) {
  return grid_for(min_i64(p.batch * p.heads * p.seqlen * s.max_chunks, kGridCap), 1);
}

// Grid of the combine kernels: one warp per (b, h, slot), capped like the chunk kernels.
unsigned combine_grid(const AttentionParams& p) {
  return grid_for(min_i64(p.batch * p.heads * p.seqlen, kGridCap * kRowWarps), kRowWarps);
}

}  // namespace

int64_t global_attention_forward_workspace_bytes(const AttentionParams& p, DType dtype) {
  if (p.batch * p.heads * p.seqlen == 0 || p.head_dim == 0) return 0;
  return p.batch * p.heads * split_shape(p).rows * (p.head_dim + 2) * acc_bytes(dtype);
}

int global_attention_forward(const AttentionParams& p, const GlobalKeys& g, void* workspace, DType dtype,
                             bool tiled, void* stream) {
  const int64_t slots = p.batch * p.heads * p.seqlen;
  if (slots == 0 || p.head_dim == 0) return 0;
  const SplitShape split = split_shape(p);
  const bool mma = tiled && global_attention_forward_mma_supports(p, dtype);
  return dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int E = decltype(dim)::E;
      constexpr bool kFull = decltype(dim)::kFull;
      auto chunk = &global_forward_kernel<T, E, kFull>;
      auto combine = &global_forward_combine_kernel<T, E, kFull>;
      const int err = mma ? global_attention_forward_mma_chunks(p, g, split, workspace, dtype, stream)
                          : LONGFORMER_LAUNCH(chunk, dim3(chunk_grid(p, split)), dim3(kWarps * kWarpSize), 0, stream,
                                              p, g, split, workspace);
      if (err != 0 || split.max_chunks == 1) return err;
      return LONGFORMER_LAUNCH(combine, dim3(combine_grid(p)), dim3(kRowWarps * kWarpSize), 0, stream, p, g, split,
                               static_cast<const void*>(workspace));
    });
  });
}

int64_t global_attention_backward_workspace_bytes(const AttentionParams& p, DType dtype) {
  if (p.batch * p.heads * p.seqlen == 0 || p.head_dim == 0) return 0;
  return p.batch * p.heads * (p.seqlen + split_shape(p).rows * p.head_dim) * acc_bytes(dtype);
}

int global_attention_backward(const AttentionParams& p, const GlobalKeys& g, void* workspace, DType dtype,
                              bool accumulate, bool tiled, void* stream) {
  const int64_t rows = p.batch * p.heads * p.seqlen;
  if (rows == 0 || p.head_dim == 0) return 0;
  const SplitShape split = split_shape(p);
  const bool mma = tiled && global_attention_backward_mma_supports(p, dtype);
  return dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int E = decltype(dim)::E;
      constexpr bool kFull = decltype(dim)::kFull;
      const dim3 row_grid(grid_for(rows, kRowWarps)), row_block(kRowWarps * kWarpSize);
      const dim3 query_grid(grid_for(p.batch * p.heads * p.queries, kRowWarps));
      auto delta = &global_delta_kernel<T, E, kFull>;
      auto dq = &global_dq_kernel<T, E, kFull>;
      auto dq_combine = &global_dq_combine_kernel<T, E, kFull>;
      auto dkdv = &global_dkdv_kernel<T, E, kFull>;
      int err = LONGFORMER_LAUNCH(delta, query_grid, row_block, 0, stream, p, workspace);
      if (err != 0) return err;
      if (mma) {  // dQ (rows or partials), then dK/dV
        err = global_attention_backward_mma(p, g, split, workspace, dtype, accumulate, stream);
      } else {
        err = LONGFORMER_LAUNCH(dq, dim3(chunk_grid(p, split)), dim3(kWarps * kWarpSize), 0, stream, p, g, split,
                                workspace);
      }
      if (err != 0) return err;
      if (split.max_chunks > 1) {
        err = LONGFORMER_LAUNCH(dq_combine, dim3(combine_grid(p)), row_block, 0, stream, p, g, split,
                                static_cast<const void*>(workspace));
        if (err != 0) return err;
      }
      if (mma) return 0;
      return LONGFORMER_LAUNCH(dkdv, row_grid, row_block, 0, stream, p, g, workspace, accumulate);
    });
  });
}

}  // namespace longformer::cuda
