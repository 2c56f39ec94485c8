// Grouped KV heads on the tiled kernels. Those kernels read KV head h for query head h; with
// group = H / H_kv query heads per KV head, the query heads g, g + group, g + 2 group, ... read the
// KV heads 0, 1, 2, ... So each g is a call over H_kv heads without grouping: q, out and their
// gradients (and the per-query-head dK/dV slices, params.h) as strided views that pick those heads,
// k and v as they are. The backend runs one such slice per g. The per-head float arrays go through
// contiguous buffers per slice (copy_group_heads): the lse, [B, H, Nq] in the kernels' indexing
// (lse_offset), and its gradient; the ALiBi slopes and the sinks [H], and the sinks' gradient, which
// each slice computes for its heads from its own rows' delta (sinks_backward).
#pragma once

#include "longformer/params.h"

namespace longformer::cuda {

// The buffers of one slice for the call's per-head arrays (null where the call has none): lse and
// grad_lse [B, H_kv, Nq], alibi_slopes, sinks and grad_sinks [H_kv].
struct SliceArrays {
  void* lse = nullptr;
  void* grad_lse = nullptr;
  void* alibi_slopes = nullptr;
  void* sinks = nullptr;
  void* grad_sinks = nullptr;
};

// Heads g, g + group, ... of a [B, H, N, D] operand (data null stays null).
inline RowMajorHeads every_group_head(RowMajorHeads t, int64_t g, int64_t group, int64_t element_bytes) {
  if (t.data != nullptr) t.data = static_cast<char*>(t.data) + g * t.stride_h * element_bytes;
  t.stride_h *= group;
  return t;
}

// Slice g of a grouped call: H_kv query heads, each reading its own KV head; the per-head arrays
// are the slice's buffers.
inline AttentionParams kv_group_slice(const AttentionParams& p, int64_t g, int64_t element_bytes,
                                      const SliceArrays& arrays) {
  const int64_t group = p.heads / p.heads_kv;
  AttentionParams s = p;
  s.heads = s.heads_kv = p.heads_kv;
  s.q = every_group_head(p.q, g, group, element_bytes);
  s.out = every_group_head(p.out, g, group, element_bytes);
  s.grad_out = every_group_head(p.grad_out, g, group, element_bytes);
  s.grad_q = every_group_head(p.grad_q, g, group, element_bytes);
  if (p.grad_kv_per_query_head) {  // the [B, H, N, D] per-query-head slices: this slice's heads
    s.grad_k = every_group_head(p.grad_k, g, group, element_bytes);
    s.grad_v = every_group_head(p.grad_v, g, group, element_bytes);
    s.grad_kv_per_query_head = false;  // within the slice, head h writes row h of those views
  }
  s.lse = arrays.lse;
  s.grad_lse = p.grad_lse == nullptr ? nullptr : arrays.grad_lse;
  s.alibi_slopes = p.alibi_slopes == nullptr ? nullptr : arrays.alibi_slopes;
  s.sinks = p.sinks == nullptr ? nullptr : arrays.sinks;
  s.grad_sinks = p.grad_sinks == nullptr ? nullptr : arrays.grad_sinks;
  s.max_dilation = 1;
  for (int64_t h = 0; h < s.heads; ++h) {
    s.dilation[h] = p.dilation[h * group + g];
    if (s.dilation[h] > s.max_dilation) s.max_dilation = s.dilation[h];
  }
  for (int64_t h = s.heads; h < p.heads; ++h) s.dilation[h] = 0;
  return s;
}

}  // namespace longformer::cuda
