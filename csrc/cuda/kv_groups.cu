// Grouped KV heads in the backward: the attention kernels write dK, dV one slice per query head
// (params.h: grad_kv_per_query_head); this sums each group of query heads into its KV head,
// out[b, g, n] = sum over h in [g * group, (g + 1) * group) of per_query_head[b, h, n], in head order
// and in the accumulation dtype, rounded once: deterministic. One thread per output element.
#include "device.h"
#include "launchers.h"
#include "warp_math.h"

namespace longformer::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kThreads)
    sum_kv_groups_kernel(const AttentionParams p, const RowMajorHeads per_query_head, const RowMajorHeads out) {
  using A = acc_t<T>;
  const int64_t D = p.head_dim, N = p.seqlen, group = p.heads / p.heads_kv;
  const int64_t total = p.batch * p.heads_kv * N * D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t d = e % D, n = (e / D) % N, g = (e / (D * N)) % p.heads_kv, b = e / (D * N * p.heads_kv);
    A sum = A(0);
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      sum += load_acc<A>(static_cast<const T*>(per_query_head.data) + per_query_head.offset(b, h, n) + d);
    }
    static_cast<T*>(out.data)[out.offset(b, g, n) + d] = from_acc<T>(sum);
  }
}

// A per-head float array of grouped-KV slice g (kv_group_slices.h): the contiguous
// [batch, H_kv, n] slice and heads g, g + group, ... of the full [batch, H, n] array (the lse and
// its gradient: n = Nq; ALiBi slopes, sinks and their gradient: batch = n = 1), copied one way or
// the other. float only: the tiled kernels that run slices never take float64.
template <bool kToSlice>
__global__ void LONGFORMER_LAUNCH_BOUNDS(kThreads)
    copy_group_heads_kernel(int64_t batch, int64_t heads, int64_t heads_kv, int64_t n, int64_t g, float* full,
                            float* slice) {
  const int64_t group = heads / heads_kv, total = batch * heads_kv * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = e % n, h = (e / n) % heads_kv, b = e / (n * heads_kv);
    const int64_t at = (b * heads + h * group + g) * n + i;
    if constexpr (kToSlice) {
      slice[e] = full[at];
    } else {
      full[at] = slice[e];
    }
  }
}

}  // namespace

int copy_group_heads(const AttentionParams& p, int64_t g, int64_t batch, int64_t n, void* full, void* slice,
                     bool to_slice, void* stream) {
  const int64_t total = batch * p.heads_kv * n;
  if (total == 0) return 0;
  float* f = static_cast<float*>(full);
  float* s = static_cast<float*>(slice);
  const dim3 grid(grid_for(total, kThreads)), block(kThreads);
  return to_slice ? LONGFORMER_LAUNCH(copy_group_heads_kernel<true>, grid, block, 0, stream, batch, p.heads,
                                      p.heads_kv, n, g, f, s)
                  : LONGFORMER_LAUNCH(copy_group_heads_kernel<false>, grid, block, 0, stream, batch, p.heads,
                                      p.heads_kv, n, g, f, s);
}

int sum_kv_groups(const AttentionParams& p, const RowMajorHeads& per_query_head, const RowMajorHeads& out, DType dtype,
                  void* stream) {
  const int64_t total = p.batch * p.heads_kv * p.seqlen * p.head_dim;
  if (total == 0) return 0;
  return dispatch_dtype(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return LONGFORMER_LAUNCH(sum_kv_groups_kernel<T>, dim3(grid_for(total, kThreads)), dim3(kThreads), 0, stream, p,
                             per_query_head, out);
  });
}

}  // namespace longformer::cuda
