// Fused backward of the local rows, recomputing the probabilities p_ij = exp(s_ij - lse_i) from the
// saved log-sum-exp, s_ij being the modified scaled score (docs/design.md §2.2). With
// dP_ij = dO_i . v_j, delta_i = dO_i . O_i - dlse_i and c_ij the softcap's derivative (1 without):
//   dQ_i = scale * sum_j p_ij (dP_ij - delta_i) c_ij k_j      over the keys of local row i
//   dK_j = scale * sum_i p_ij (dP_ij - delta_i) c_ij q_i      over the local rows i that see key j
//   dV_j =         sum_i p_ij dO_i
// Rows whose lse is -inf (no key) contribute nothing; global and padding rows get no dQ here. Rows
// are indexed by position (query row i at q_offset + i); with grouped KV heads dK, dV go to one
// slice per query head (params.h: grad_kv_per_query_head), summed per group afterwards.
//
// Deterministic: every output value is written by one owner that sums in a fixed order; no
// floating-point atomics. Four kernels:
//   1. delta_kernel: one warp per query row, delta_i into the workspace (0 for non-local rows).
//   2. local_rows_kernel: one warp per position n of (b, h), two independent parts (on tensor cores
//      instead for float16/bfloat16 with D <= 64: banded_attention_backward_mma.cu):
//        dQ_n  over its band keys then the global keys (n a local query);
//        dK_n, dV_n over the local queries whose band contains n (n a local key):
//        i = n - t * dilation, -left <= t <= right (so i >= n when causal), in n's sequence.
//      Global keys are never band keys, so this writes every local key's dK/dV completely.
//   3. global_key_partial_kernel: dK/dV of the global keys, which every local query of their
//      sequence may see. A (b, h) has at most N partial slots; each of the count[b] global keys gets
//      `chunks` = min(N / count, ceil(N / kChunkRows)) of them (decided on the device, the host does
//      not know count), one block per slot summing one contiguous chunk of queries: its warps take
//      queries round-robin and are combined in shared memory in warp order (on tensor cores
//      instead for float16/bfloat16 with D <= 128: tiles of 64 global keys per chunk,
//      banded_attention_backward_mma.cu; the same partials).
//   4. global_key_combine_kernel: one warp per global key sums its chunks in chunk order and writes
//      dK/dV.
// After the global rows' backward, sinks_backward sums the sinks' gradient from every row's delta.
// Workspace: delta [B*H*Nq] then partials [B*H][N][2*D], both in the accumulation dtype.
#include "backward_split.h"
#include "device.h"
#include "launchers.h"
#include "warp_math.h"

namespace longformer::cuda {
namespace {

constexpr int kRowWarps = 4;     // rows per block in the warp-per-row kernels
constexpr int kGroup = 2;        // keys (queries) processed together for instruction-level parallelism
constexpr int kChunkWarps = 8;   // warps of a global-key partial block

// ---- 1. delta_i = dO_i . O_i - dlse_i ------------------------------------------------------------

template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kRowWarps * kWarpSize) delta_kernel(const AttentionParams p, void* workspace) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t Nq = p.queries, rows = p.batch * p.heads * Nq;
  A* delta = delta_of<A>(workspace);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int64_t i = row % Nq, bh = row / Nq, h = bh % p.heads, b = bh / p.heads;
    A value = A(0);
    if (p.roles[b * p.seqlen + p.q_offset + i] == kLocal) {
      RowFrag<A, E, kFull> dout, out;
      dout.load(static_cast<const T*>(p.grad_out.data) + p.grad_out.offset(b, h, i), D, lane);
      out.load(static_cast<const T*>(p.out.data) + p.out.offset(b, h, i), D, lane);
      value = warp_sum(dout.partial_dot(out));
      if (p.grad_lse) value -= static_cast<const A*>(p.grad_lse)[row];
    }
    if (lane == 0) delta[row] = value;  // row == p.lse_offset(b, h, i)
  }
}

// ---- 2. dQ of local rows; dK, dV of local keys -------------------------------------------------

template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kRowWarps * kWarpSize)
    local_rows_kernel(const AttentionParams p, const GlobalKeys globals, void* workspace) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, left = p.window_left, right = p.effective_right();
  const int64_t rows = p.batch * p.heads * N;
  const A scale = static_cast<A>(p.scale);
  const A* delta_all = delta_of<A>(workspace);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int64_t n = row % N, bh = row / N, h = bh % p.heads, b = bh / p.heads;
    const uint8_t* roles = p.roles + b * N;
    if (roles[n] != kLocal) continue;  // warp-uniform
    const int64_t d = p.dilation[h];
    const AttentionParams::Span seq = p.sequence_of(n);
    const Head<T> hd(p, b, h);
    const ScoreModifiers<A> mods(p, h);
    const A* lse = static_cast<const A*>(p.lse) + p.lse_position_offset(b, h, 0);
    const A* delta = delta_all + p.lse_position_offset(b, h, 0);

    // dQ_n: n as a query (nothing flows through a row without keys).
    if (p.is_query(n) && lse[n] != neg_inf<A>()) {
      RowFrag<A, E, kFull> q, dout, dq;
      q.load(hd.q + n * hd.qs, D, lane);
      dout.load(hd.dout + n * hd.ds, D, lane);
      dq.zero();
      const A lse_n = lse[n], delta_n = delta[n];
      for (int64_t t0 = -left; t0 <= right; t0 += kGroup) {
        int64_t key[kGroup];
LONGFORMER_UNROLL
        for (int c = 0; c < kGroup; ++c) {
          const int64_t t = t0 + c, j = n + t * d;
          key[c] = (t <= right && j >= seq.start && j < seq.end && roles[j] == kLocal) ? j : -1;
        }
        dq_keys(dq, q, dout, lse_n, delta_n, hd, key, scale, D, lane, mods, n);
      }
      const GlobalRange range = global_range(globals, b, N, seq.start, seq.end);
      const int64_t* index = globals.index + b * N;
      for (int64_t g0 = range.begin; g0 < range.end; g0 += kGroup) {
        if (p.causal && index[g0] > n) break;
        int64_t key[kGroup];
LONGFORMER_UNROLL
        for (int c = 0; c < kGroup; ++c) {
          const int64_t g = g0 + c;
          key[c] = (g < range.end && (!p.causal || index[g] <= n)) ? index[g] : -1;
        }
        dq_keys(dq, q, dout, lse_n, delta_n, hd, key, scale, D, lane, mods, n);
      }
      dq.store(static_cast<T*>(p.grad_q.data) + p.query_offset(p.grad_q, b, h, n), D, lane, scale);
    }

    // dK_n, dV_n: n as a key, over the local queries i = n - t * d of its sequence whose band holds it.
    {
      RowFrag<A, E, kFull> k, v, dk, dv;
      k.load(hd.k + n * hd.ks, D, lane);
      v.load(hd.v + n * hd.vs, D, lane);
      dk.zero();
      dv.zero();
      for (int64_t t0 = -left; t0 <= right; t0 += kGroup) {
        int64_t query[kGroup];
LONGFORMER_UNROLL
        for (int c = 0; c < kGroup; ++c) {
          const int64_t t = t0 + c, i = n - t * d;
          query[c] = (t <= right && i >= seq.start && i < seq.end && p.is_query(i) && roles[i] == kLocal &&
                      lse[i] != neg_inf<A>())
                         ? i
                         : -1;
        }
        dkdv_queries(dk, dv, k, v, hd, lse, delta, query, scale, D, lane, mods, n);
      }
      dk.store(static_cast<T*>(p.grad_k.data) + p.grad_k.offset(b, p.grad_kv_head(h), n), D, lane, scale);
      dv.store(static_cast<T*>(p.grad_v.data) + p.grad_v.offset(b, p.grad_kv_head(h), n), D, lane, A(1));
    }
  }
}

// ---- 3./4. dK, dV of global keys ----------------------------------------------------------------

template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kChunkWarps * kWarpSize)
    global_key_partial_kernel(const AttentionParams p, const GlobalKeys globals, void* workspace) {
  using A = acc_t<T>;
  __shared__ A reduce[kChunkWarps][2][E * kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, slots = p.batch * p.heads * N;
  const A scale = static_cast<A>(p.scale);
  const A* delta_all = delta_of<A>(workspace);
  A* partials = partials_of<A>(p, workspace);

  for (int64_t slot = blockIdx.x; slot < slots; slot += gridDim.x) {  // block-uniform loop
    const int64_t bh = slot / N, h = bh % p.heads, b = bh / p.heads;
    const int64_t count = globals.count[b];
    const int64_t chunks = chunks_per_global(count, N);
    const int64_t g = (slot % N) / chunks, chunk = (slot % N) % chunks;
    if (g >= count) continue;  // block-uniform
    const int64_t key = globals.index[b * N + g];
    const int64_t chunk_len = ceil_div(N, chunks);
    // The chunk's queries among those of the key's sequence (and at or after the key when causal:
    // earlier queries do not see it).
    const AttentionParams::Span seq = p.sequence_of(key);
    int64_t i_begin = max_i64(chunk * chunk_len, max_i64(seq.start, p.q_offset));
    const int64_t i_end = min_i64(min_i64(N, chunk * chunk_len + chunk_len), min_i64(seq.end, p.q_offset + p.queries));
    if (p.causal) i_begin = max_i64(i_begin, key);

    const Head<T> hd(p, b, h);
    const ScoreModifiers<A> mods(p, h);
    const uint8_t* roles = p.roles + b * N;
    const A* lse = static_cast<const A*>(p.lse) + p.lse_position_offset(b, h, 0);
    const A* delta = delta_all + p.lse_position_offset(b, h, 0);
    RowFrag<A, E, kFull> k, v, dk, dv;
    k.load(hd.k + key * hd.ks, D, lane);
    v.load(hd.v + key * hd.vs, D, lane);
    dk.zero();
    dv.zero();
    // Warp w takes queries i_begin + w*kGroup + r*kChunkWarps*kGroup + c: a fixed assignment.
    for (int64_t i0 = i_begin + warp * kGroup; i0 < i_end; i0 += kChunkWarps * kGroup) {
      int64_t query[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t i = i0 + c;
        query[c] = (i < i_end && roles[i] == kLocal && lse[i] != neg_inf<A>()) ? i : -1;
      }
      dkdv_queries(dk, dv, k, v, hd, lse, delta, query, scale, D, lane, mods, key);
    }
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) {
      reduce[warp][0][e * kWarpSize + lane] = dk.x[e];
      reduce[warp][1][e * kWarpSize + lane] = dv.x[e];
    }
    __syncthreads();
    A* out = partials + (bh * N + slot % N) * 2 * D;
    for (int x = threadIdx.x; x < 2 * D; x += kChunkWarps * kWarpSize) {
      const int which = x / D, dd = x % D;
      A sum = A(0);
      for (int w = 0; w < kChunkWarps; ++w) sum += reduce[w][which][dd];  // warp order: deterministic
      out[x] = which == 0 ? sum * scale : sum;
    }
    __syncthreads();  // `reduce` is reused by the next slot of this block
  }
}

template <typename T>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kRowWarps * kWarpSize)
    global_key_combine_kernel(const AttentionParams p, const GlobalKeys globals, void* workspace) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, rows = p.batch * p.heads * N;
  const A* partials = partials_of<A>(p, workspace);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int64_t g = row % N, bh = row / N, h = bh % p.heads, b = bh / p.heads;
    const int64_t count = globals.count[b];
    if (g >= count) continue;
    const int64_t chunks = chunks_per_global(count, N);
    const int64_t key = globals.index[b * N + g];
    const A* first = partials + (bh * N + g * chunks) * 2 * D;
    T* dk = static_cast<T*>(p.grad_k.data) + p.grad_k.offset(b, p.grad_kv_head(h), key);
    T* dv = static_cast<T*>(p.grad_v.data) + p.grad_v.offset(b, p.grad_kv_head(h), key);
    for (int x = lane; x < 2 * D; x += kWarpSize) {
      A sum = A(0);
      for (int64_t c = 0; c < chunks; ++c) sum += first[c * 2 * D + x];  // chunk order: deterministic
      if (x < D) {
        dk[x] = from_acc<T>(sum);
      } else {
        dv[x - D] = from_acc<T>(sum);
      }
    }
  }
}

// ---- the sinks' gradient ----------------------------------------------------------------------

constexpr int kSinkThreads = 256;

// grad_sinks[h] = -sum over (b, i) of exp(sink_h - lse) * delta, over the rows of head h with a
// key or a sink (lse finite): one block per head, each thread a fixed stride of rows, then a tree
// in shared memory; the same order on every run.
template <typename A>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kSinkThreads) sinks_backward_kernel(const AttentionParams p,
                                                                            const void* workspace) {
  __shared__ A sums[kSinkThreads];
  const int64_t h = blockIdx.x, Nq = p.queries;
  const A sink = sink_logit<A>(p, h);
  const A* delta = delta_of<A>(const_cast<void*>(workspace));
  const A* lse = static_cast<const A*>(p.lse);
  A sum = A(0);
  for (int64_t r = threadIdx.x; r < p.batch * Nq; r += kSinkThreads) {
    const int64_t b = r / Nq, i = r % Nq;
    const int64_t at = p.lse_offset(b, h, i);
    if (p.roles[b * p.seqlen + p.q_offset + i] != kPadding && lse[at] != neg_inf<A>()) {
      sum -= acc_exp(sink - lse[at]) * delta[at];
    }
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kSinkThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) static_cast<A*>(p.grad_sinks)[h] = sums[0];
}

}  // namespace

int sinks_backward(const AttentionParams& p, const void* workspace, DType dtype, void* stream) {
  if (p.grad_sinks == nullptr || p.heads == 0) return 0;
  if (dtype == DType::kFloat64) {
    return LONGFORMER_LAUNCH(sinks_backward_kernel<double>, dim3(static_cast<unsigned>(p.heads)), dim3(kSinkThreads),
                             0, stream, p, workspace);
  }
  return LONGFORMER_LAUNCH(sinks_backward_kernel<float>, dim3(static_cast<unsigned>(p.heads)), dim3(kSinkThreads), 0,
                           stream, p, workspace);
}

int64_t banded_attention_backward_workspace_bytes(const AttentionParams& p, DType dtype) {
  const int64_t acc_size = dtype == DType::kFloat64 ? 8 : 4;
  const int64_t rows = p.batch * p.heads * p.seqlen;
  return ceil_div(rows * acc_size, 256) * 256 + rows * 2 * p.head_dim * acc_size;
}

int banded_attention_backward(const AttentionParams& p, const GlobalKeys& g, void* workspace, DType dtype,
                              bool tiled, void* stream) {
  const int64_t rows = p.batch * p.heads * p.seqlen;
  if (rows == 0 || p.head_dim == 0) return 0;
  const bool mma = tiled && banded_attention_backward_mma_supports(p, dtype);
  const dim3 query_grid(grid_for(p.batch * p.heads * p.queries, kRowWarps));
  return dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int E = decltype(dim)::E;
      constexpr bool kFull = decltype(dim)::kFull;
      const dim3 row_grid(grid_for(rows, kRowWarps)), row_block(kRowWarps * kWarpSize);
      auto delta = &delta_kernel<T, E, kFull>;
      auto local = &local_rows_kernel<T, E, kFull>;
      auto partial = &global_key_partial_kernel<T, E, kFull>;
      auto combine = &global_key_combine_kernel<T>;
      int err = LONGFORMER_LAUNCH(delta, query_grid, row_block, 0, stream, p, workspace);
      if (err != 0) return err;
      if constexpr (!std::is_same_v<T, double>) {
        err = mma ? banded_attention_backward_mma_local(p, g, delta_of<float>(workspace), dtype, stream)
                  : LONGFORMER_LAUNCH(local, row_grid, row_block, 0, stream, p, g, workspace);
      } else {
        err = LONGFORMER_LAUNCH(local, row_grid, row_block, 0, stream, p, g, workspace);
      }
      if (err != 0) return err;
      err = mma ? banded_attention_backward_mma_global_keys(p, g, workspace, dtype, stream)
                : LONGFORMER_LAUNCH(partial, dim3(grid_for(rows, 1)), dim3(kChunkWarps * kWarpSize), 0, stream, p,
                                    g, workspace);
      if (err != 0) return err;
      return LONGFORMER_LAUNCH(combine, row_grid, row_block, 0, stream, p, g, workspace);
    });
  });
}

}  // namespace longformer::cuda
