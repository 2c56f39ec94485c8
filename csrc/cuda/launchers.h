// Host-side entry points of the CUDA kernels. Each is defined at the bottom of its kernel file
// (kernel-only .cu, no torch headers) and called from the op glue (longformer/glue.h through cuda_backend.h), which checks the
// inputs, allocates and initialises every output, and turns a nonzero return (a cudaError_t value)
// into a Python exception. All pointers in the parameter blocks are device memory (host memory in
// the host emulation); `stream` is a cudaStream_t.
#pragma once

#include <cstdint>

#include "longformer/params.h"

namespace longformer::cuda {

// kFloat32Tf32: float32 tensors whose tiled products may run as TF32 on tensor cores (the op glue
// passes it when PyTorch allows TF32 matmuls); the SIMT kernels compute it in full fp32.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3, kFloat32Tf32 = 4 };

// roles [B, N] (Role values), global_index [B, N] (each row's global positions ascending, entries
// past the count unspecified) and global_count [B] from the masks, in one launch (token_roles.cu).
int prepare_token_roles(const MaskView& attention_mask, const MaskView& global_attention_mask, int64_t batch,
                        int64_t seqlen, uint8_t* roles, int64_t* global_index, int64_t* global_count, void* stream);

// The global tokens of each batch: index[b * seqlen + g] for g < count[b] are their positions in
// ascending order (int64, [B, N]; entries past count[b] are unspecified); count is int64 [B].
struct GlobalKeys {
  const int64_t* index = nullptr;
  const int64_t* count = nullptr;
};

// The global tokens of batch row b at positions [start, end) (one packed sequence, or the whole
// row): entries [begin, end) of its index, found by binary search.
struct GlobalRange {
  int64_t begin, end;
};
LONGFORMER_HOST_DEVICE int64_t first_global_at(const GlobalKeys& g, int64_t b, int64_t n, int64_t position) {
  const int64_t* index = g.index + b * n;
  int64_t lo = 0, hi = g.count[b];
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (index[mid] < position) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}
LONGFORMER_HOST_DEVICE GlobalRange global_range(const GlobalKeys& g, int64_t b, int64_t n, int64_t start,
                                                int64_t end) {
  if (start == 0 && end == n) return {0, g.count[b]};  // the whole row: no search
  return {first_global_at(g, b, n, start), first_global_at(g, b, n, end)};
}

// Packed sequences' bounds as int64 on the device (`dst`, [count]) from cu_seqlens of either
// integer width (`element_bytes` 4 or 8, elements `stride` apart) (token_roles.cu).
int copy_cu_seqlens(const void* src, int element_bytes, int64_t stride, int64_t count, int64_t* dst, void* stream);

// Grouped KV heads on the tiled kernels, one slice of query heads at a time (kv_group_slices.h):
// copies slice g's heads of a per-head float array between the call's [batch, H, n] array and the
// slice's contiguous [batch, H_kv, n] buffer (to_slice: call -> slice); the lse is [B, H, Nq], the
// ALiBi slopes and sinks [1, H, 1].
int copy_group_heads(const AttentionParams& p, int64_t g, int64_t batch, int64_t n, void* full, void* slice,
                     bool to_slice, void* stream);

// Grouped KV heads: out [B, H_kv, N, D] = per_query_head [B, H, N, D] summed over each group of
// query heads in head order (kv_groups.cu).
int sum_kv_groups(const AttentionParams& p, const RowMajorHeads& per_query_head, const RowMajorHeads& out,
                  DType dtype, void* stream);

// The sinks' gradient, after both backward launches: grad_sinks[h] = -sum over the rows of head h
// with a key or a sink of exp(sink_h - lse) * delta, delta being the rows' term in the workspace
// (banded_attention_backward.cu).
int sinks_backward(const AttentionParams& p, const void* workspace, DType dtype, void* stream);

// Contract shared by the attention launchers (semantics: docs/design.md §2, csrc/include/longformer/schemas.h):
// * forward: `out` arrives zero-filled and `lse` filled with -inf; the kernel writes the rows it
//   computes (local rows for banded, global rows for global).
// * backward: grad_q, grad_k, grad_v arrive zero-filled; `workspace` has the size the matching
//   *_workspace_bytes function asked for (uninitialised). Results are deterministic: no
//   order-dependent floating-point atomics.

// Two families of kernels. SIMT: one warp per row (every dtype and head dim; the float64 path).
// Tiled (the *_mma kernels, mma_tiles.h): blocks of 64 rows that walk tiles of 64 or fewer keys
// through a cp.async pipeline, multiplying on tensor cores (mma.sync m16n8k16, fp32 accumulation)
// for float16/bfloat16 and on FMA in the same fragment layout for float32 (exact fp32; as TF32 on
// tensor cores for kFloat32Tf32); each *_mma_supports says which inputs a tiled kernel takes.

// Local rows, SIMT: band keys plus every global key.
int banded_attention_forward_simt(const AttentionParams& p, const GlobalKeys& g, DType dtype, void* stream);
// Local rows, tiled: float16/bfloat16 with D <= 256, float32 with D <= 128.
bool banded_attention_forward_mma_supports(const AttentionParams& p, DType dtype);
int banded_attention_forward_mma(const AttentionParams& p, const GlobalKeys& g, DType dtype, void* stream);

int64_t banded_attention_backward_workspace_bytes(const AttentionParams& p, DType dtype);
// `tiled`: the local rows' dQ, the local keys' dK/dV and the global keys' dK/dV on the tiled
// kernels where banded_attention_backward_mma_supports (float16/bfloat16 with D <= 128, float32
// with D <= 64, or <= 128 where the GPU allows a block 100 KiB of shared memory); SIMT otherwise and for the rest (delta, the combine of the global keys' dK/dV).
int banded_attention_backward(const AttentionParams& p, const GlobalKeys& g, void* workspace, DType dtype,
                              bool tiled, void* stream);
bool banded_attention_backward_mma_supports(const AttentionParams& p, DType dtype);
// The tiled part: `delta` is [B, H, N] float (delta_i = dO_i . O_i, 0 off local rows).
int banded_attention_backward_mma_local(const AttentionParams& p, const GlobalKeys& g, const float* delta,
                                        DType dtype, void* stream);
// The global keys' dK/dV from the local rows, tiled: the chunk partials of the workspace
// (backward_split.h), delta filled; the SIMT combine kernel sums them.
int banded_attention_backward_mma_global_keys(const AttentionParams& p, const GlobalKeys& g, void* workspace,
                                              DType dtype, void* stream);

// Rows of global queries over every real key; p.q/k/v are the global projections when the op has
// them. They run after the local rows' kernels, on the same out and lse. The keys of each global
// row are split across blocks; `workspace` (uninitialised, the size asked for) holds the chunk
// partials that a second kernel combines in a fixed order.
int64_t global_attention_forward_workspace_bytes(const AttentionParams& p, DType dtype);
// `tiled`: the chunks as tiles of 64 gathered global rows where the inputs allow (float16/bfloat16
// with D <= 256, float32 with D <= 128); SIMT otherwise (one warp per row and key group).
int global_attention_forward(const AttentionParams& p, const GlobalKeys& g, void* workspace, DType dtype,
                             bool tiled, void* stream);
int64_t global_attention_backward_workspace_bytes(const AttentionParams& p, DType dtype);
// grad_q: the global rows; grad_k, grad_v: every key row (their part from the global rows), written,
// or with `accumulate` added to what they hold (the local rows' part, when both share q, k, v).
// `tiled`: dQ and dK/dV on the tiled kernels where the inputs allow (float16/bfloat16 with D <= 128,
// float32 with D <= 64, or <= 128 where the GPU allows a block 100 KiB of shared memory).
int global_attention_backward(const AttentionParams& p, const GlobalKeys& g, void* workspace, DType dtype,
                              bool accumulate, bool tiled, void* stream);

// Unfused banded products (BandedMatmulParams; formulas in longformer/schemas.h).
// qk: a = q, b = k -> band (every slot written, `fill` off the sequence). pv: band, b = v -> out.
// pv_transposed: band, a = x -> out. The `out` of pv and pv_transposed arrives zero-filled.
int banded_matmul_qk(const BandedMatmulParams& p, DType dtype, void* stream);
int banded_matmul_pv(const BandedMatmulParams& p, DType dtype, void* stream);
int banded_matmul_pv_transposed(const BandedMatmulParams& p, DType dtype, void* stream);

}  // namespace longformer::cuda
