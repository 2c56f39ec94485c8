// Rows of global queries: each global row g of (b, h) attends to every real key of its batch row
// (keys j <= g when causal) with the global projections (p.q/k/v are global_q/k/v):
//   out_g = softmax(scale * q_g . K^T) V,  lse_g = log of the softmax denominator.
// Backward, with p_gj recomputed from lse_g, dP_gj = dO_g . v_j and delta_g = dO_g . O_g:
//   dQ_g = scale * sum_j p_gj (dP_gj - delta_g) k_j
//   dK_j = scale * sum_g p_gj (dP_gj - delta_g) q_g,  dV_j = sum_g p_gj dO_g   (over the global rows g)
//
// Work split. There are few global rows, each over all N keys, so a row is spread over a whole
// block: one block per (b, h, global slot) (grid over B*H*N slots, slots past count[b] exit), its
// kWarps warps take key groups round-robin with their own online-softmax state (forward) or dQ
// partial sum (backward) in registers, and the warps are combined in shared memory in warp order
// (deterministic, no workspace). dK/dV: one warp per key row, looping over the count[b] global rows
// in ascending order. Workspace of the backward: delta [B*H*N] (accumulation dtype; only the
// global rows are written and read).
#include "device.h"
#include "launchers.h"
#include "warp_math.h"

namespace longformer::cuda {
namespace {

constexpr int kWarps = 8;     // warps sharing one global row
constexpr int kGroup = 2;     // keys per step of a warp
constexpr int kRowWarps = 4;  // rows per block in the warp-per-row kernels

// ---- forward --------------------------------------------------------------------------------------

template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kWarps * kWarpSize)
    global_forward_kernel(const AttentionParams p, const GlobalKeys globals) {
  using A = acc_t<T>;
  __shared__ A part_o[kWarps][E * kWarpSize];
  __shared__ A part_m[kWarps], part_l[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, slots = p.batch * p.heads * N;
  const A scale = static_cast<A>(p.scale);

  for (int64_t slot = blockIdx.x; slot < slots; slot += gridDim.x) {  // block-uniform loop
    const int64_t g = slot % N, bh = slot / N, h = bh % p.heads, b = bh / p.heads;
    if (g >= globals.count[b]) continue;  // block-uniform
    const int64_t qi = globals.index[b * N + g];
    const uint8_t* roles = p.roles + b * N;
    const T* kh = static_cast<const T*>(p.k.data) + row_offset(p.k, b, h, 0);
    const T* vh = static_cast<const T*>(p.v.data) + row_offset(p.v, b, h, 0);
    const int64_t key_end = p.causal ? qi + 1 : N;

    RowFrag<A, E, kFull> q;
    q.load(static_cast<const T*>(p.q.data) + row_offset(p.q, b, h, qi), D, lane);
    OnlineRow<A, E, kFull> state;
    state.reset();
    for (int64_t j0 = warp * kGroup; j0 < key_end; j0 += kWarps * kGroup) {
      int64_t key[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t j = j0 + c;
        key[c] = (j < key_end && roles[j] != kPadding) ? j : -1;
      }
      state.template absorb<kGroup>(q, kh, p.k.stride_n, vh, p.v.stride_n, key, scale, D, lane);
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
      if (m != neg_inf<A>()) {
        A l = A(0);
        RowFrag<A, E, kFull> o;
        o.zero();
        for (int w = 0; w < kWarps; ++w) {
          const A f = acc_exp(part_m[w] - m);  // 0 for a warp without keys
          l += part_l[w] * f;
LONGFORMER_UNROLL
          for (int e = 0; e < E; ++e) o.x[e] += part_o[w][e * kWarpSize + lane] * f;
        }
        o.store(static_cast<T*>(p.out.data) + row_offset(p.out, b, h, qi), D, lane, A(1) / l);
        if (lane == 0) static_cast<A*>(p.lse)[lse_index(p, b, h, qi)] = m + acc_log(l);
      }
    }
    __syncthreads();  // the shared buffers are reused by the block's next slot
  }
}

// ---- backward -------------------------------------------------------------------------------------

// delta_g = dO_g . O_g for the global rows (warp per row; other rows are skipped).
template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kRowWarps * kWarpSize) global_delta_kernel(const AttentionParams p, void* workspace) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, rows = p.batch * p.heads * N;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int64_t i = row % N, bh = row / N, h = bh % p.heads, b = bh / p.heads;
    if (p.roles[b * N + i] != kGlobal) continue;
    RowFrag<A, E, kFull> dout, out;
    dout.load(static_cast<const T*>(p.grad_out.data) + row_offset(p.grad_out, b, h, i), D, lane);
    out.load(static_cast<const T*>(p.out.data) + row_offset(p.out, b, h, i), D, lane);
    const A value = warp_sum(dout.partial_dot(out));
    if (lane == 0) static_cast<A*>(workspace)[row] = value;  // row == lse_index(p, b, h, i)
  }
}

// dQ of the global rows: one block per (b, h, global slot), warps over key groups.
template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kWarps * kWarpSize)
    global_dq_kernel(const AttentionParams p, const GlobalKeys globals, void* workspace) {
  using A = acc_t<T>;
  __shared__ A part[kWarps][E * kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, slots = p.batch * p.heads * N;
  const A scale = static_cast<A>(p.scale);

  for (int64_t slot = blockIdx.x; slot < slots; slot += gridDim.x) {  // block-uniform loop
    const int64_t g = slot % N, bh = slot / N, h = bh % p.heads, b = bh / p.heads;
    if (g >= globals.count[b]) continue;  // block-uniform
    const int64_t qi = globals.index[b * N + g];
    const A lse = static_cast<const A*>(p.lse)[lse_index(p, b, h, qi)];
    if (lse == neg_inf<A>()) continue;  // no key: no gradient (block-uniform)
    const A delta = static_cast<const A*>(workspace)[lse_index(p, b, h, qi)];
    const uint8_t* roles = p.roles + b * N;
    const Head<T> hd(p, b, h);
    const int64_t key_end = p.causal ? qi + 1 : N;

    RowFrag<A, E, kFull> q, dout, dq;
    q.load(hd.q + qi * hd.qs, D, lane);
    dout.load(hd.dout + qi * hd.ds, D, lane);
    dq.zero();
    for (int64_t j0 = warp * kGroup; j0 < key_end; j0 += kWarps * kGroup) {
      int64_t key[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t j = j0 + c;
        key[c] = (j < key_end && roles[j] != kPadding) ? j : -1;
      }
      dq_keys(dq, q, dout, lse, delta, hd, key, scale, D, lane);
    }
LONGFORMER_UNROLL
    for (int e = 0; e < E; ++e) part[warp][e * kWarpSize + lane] = dq.x[e];
    __syncthreads();
    T* out = static_cast<T*>(p.grad_q.data) + row_offset(p.grad_q, b, h, qi);
    for (int x = threadIdx.x; x < D; x += kWarps * kWarpSize) {
      A sum = A(0);
      for (int w = 0; w < kWarps; ++w) sum += part[w][x];  // warp order: deterministic
      out[x] = from_acc<T>(sum * scale);
    }
    __syncthreads();  // `part` is reused by the block's next slot
  }
}

// dK, dV of every real key j from the global rows: one warp per key, global rows in ascending order.
template <typename T, int E, bool kFull>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kRowWarps * kWarpSize)
    global_dkdv_kernel(const AttentionParams p, const GlobalKeys globals, void* workspace) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int D = static_cast<int>(p.head_dim);
  const int64_t N = p.seqlen, rows = p.batch * p.heads * N;
  const A scale = static_cast<A>(p.scale);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const int64_t j = row % N, bh = row / N, h = bh % p.heads, b = bh / p.heads;
    const int64_t count = globals.count[b];
    if (count == 0 || p.roles[b * N + j] == kPadding) continue;  // warp-uniform
    const int64_t* index = globals.index + b * N;
    const Head<T> hd(p, b, h);
    const A* lse = static_cast<const A*>(p.lse) + lse_index(p, b, h, 0);
    const A* delta = static_cast<const A*>(workspace) + lse_index(p, b, h, 0);

    RowFrag<A, E, kFull> k, v, dk, dv;
    k.load(hd.k + j * hd.ks, D, lane);
    v.load(hd.v + j * hd.vs, D, lane);
    dk.zero();
    dv.zero();
    for (int64_t g0 = 0; g0 < count; g0 += kGroup) {
      int64_t query[kGroup];
LONGFORMER_UNROLL
      for (int c = 0; c < kGroup; ++c) {
        const int64_t g = g0 + c;
        const int64_t qi = g < count ? index[g] : -1;
        // Causal: global row qi sees key j only when j <= qi.
        query[c] = (qi >= 0 && (!p.causal || qi >= j) && lse[qi] != neg_inf<A>()) ? qi : -1;
      }
      dkdv_queries(dk, dv, k, v, hd, lse, delta, query, scale, D, lane);
    }
    dk.store(static_cast<T*>(p.grad_k.data) + row_offset(p.grad_k, b, h, j), D, lane, scale);
    dv.store(static_cast<T*>(p.grad_v.data) + row_offset(p.grad_v, b, h, j), D, lane, A(1));
  }
}

}  // namespace

int global_attention_forward(const AttentionParams& p, const GlobalKeys& g, DType dtype, void* stream) {
  const int64_t slots = p.batch * p.heads * p.seqlen;
  if (slots == 0 || p.head_dim == 0) return 0;
  return dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return dispatch_head_dim(p.head_dim, [&](auto dim) {
      auto kernel = &global_forward_kernel<T, decltype(dim)::E, decltype(dim)::kFull>;
      return LONGFORMER_LAUNCH(kernel, dim3(grid_for(slots, 1)), dim3(kWarps * kWarpSize), 0, stream, p, g);
    });
  });
}

int64_t global_attention_backward_workspace_bytes(const AttentionParams& p, DType dtype) {
  const int64_t acc_size = dtype == DType::kFloat64 ? 8 : 4;
  return p.batch * p.heads * p.seqlen * acc_size;
}

int global_attention_backward(const AttentionParams& p, const GlobalKeys& g, void* workspace, DType dtype,
                              void* stream) {
  const int64_t rows = p.batch * p.heads * p.seqlen;
  if (rows == 0 || p.head_dim == 0) return 0;
  return dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return dispatch_head_dim(p.head_dim, [&](auto dim) {
      constexpr int E = decltype(dim)::E;
      constexpr bool kFull = decltype(dim)::kFull;
      const dim3 row_grid(grid_for(rows, kRowWarps)), row_block(kRowWarps * kWarpSize);
      auto delta = &global_delta_kernel<T, E, kFull>;
      auto dq = &global_dq_kernel<T, E, kFull>;
      auto dkdv = &global_dkdv_kernel<T, E, kFull>;
      int err = LONGFORMER_LAUNCH(delta, row_grid, row_block, 0, stream, p, workspace);
      if (err != 0) return err;
      err = LONGFORMER_LAUNCH(dq, dim3(grid_for(rows, 1)), dim3(kWarps * kWarpSize), 0, stream, p, g, workspace);
      if (err != 0) return err;
      return LONGFORMER_LAUNCH(dkdv, row_grid, row_block, 0, stream, p, g, workspace);
    });
  });
}

}  // namespace longformer::cuda
