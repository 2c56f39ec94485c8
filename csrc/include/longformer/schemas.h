// The schemas of every longformer op, in one place. csrc/ops.cpp defines them for the `longformer`
// library; the host-emulated CUDA build (csrc/cuda/emulation) defines the same schemas under its own
// namespace so its kernels can be called and tested side by side with the real ones.
//
// Shapes (the general op of docs/design.md §2.2): q, global_q, out: [B, H, Nq, D]; k, v, global_k,
// global_v: [B, H_kv, Nk, D] with H % H_kv == 0 and Nq <= Nk; all with a contiguous last dimension;
// gradients have their input's shape. Every [B, H, N, D] result is a view of a contiguous
// [B, N, H, D] tensor (merging heads is free); lse is [B, H, Nq] contiguous in the accumulation
// dtype (float32; float64 for float64 inputs). Masks are [B, Nk] bool/integer over the key
// positions: attention_mask nonzero = real token, global_attention_mask nonzero = global token (a
// padding token is never global). dilation has 1 or H entries.
//
// The general arguments: query row i sits at key position q_offset + i (q_offset -1: Nk - Nq, the
// newest positions); cu_seqlens (int32/int64 [S + 1], B == 1, Nq == Nk) packs S sequences along N;
// softcap (0: none) caps the scaled scores; alibi_slopes and sinks are [H] in the accumulation
// dtype (sinks: one extra logit per row with a zero value, a gradient returned as grad_sinks).
#pragma once

#include <torch/csrc/stable/library.h>

namespace longformer {

inline void define_schemas(torch::stable::detail::StableLibrary& m) {
  // Every row. A local row attends to its band keys (j = i + t*dilation[h], -left <= t <= right,
  // local and real) plus every real global key; a global row attends to every real key, with the
  // global projections when given (all three or none; none: q, k, v); a padding row is 0. lse is
  // every row's log-sum-exp, -inf for rows without a key (padding rows among them). allow_tf32:
  // float32 products may run as TF32 on tensor cores (CUDA; the Python wrappers pass
  // torch.backends.cuda.matmul.allow_tf32); ignored elsewhere.
  m.def(
      "banded_attn(Tensor q, Tensor k, Tensor v, int window_left, int window_right, int[] dilation, "
      "Tensor? attention_mask, Tensor? global_attention_mask, bool causal, float scale, "
      "Tensor? global_q=None, Tensor? global_k=None, Tensor? global_v=None, bool allow_tf32=False, "
      "int q_offset=-1, Tensor? cu_seqlens=None, float softcap=0.0, Tensor? alibi_slopes=None, "
      "Tensor? sinks=None) -> (Tensor out, Tensor lse)");
  // Without global projections the global rows' gradients are summed into grad_q/k/v and the
  // grad_global_* are empty ([0]); with them, they have the shapes of global_q/k/v. grad_lse
  // (optional) is the gradient of the forward's lse; grad_sinks is [H] with sinks, else [0].
  m.def(
      "banded_attn_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int window_left, int window_right, int[] dilation, Tensor? attention_mask, "
      "Tensor? global_attention_mask, bool causal, float scale, Tensor? global_q=None, Tensor? global_k=None, "
      "Tensor? global_v=None, bool allow_tf32=False, int q_offset=-1, Tensor? cu_seqlens=None, "
      "float softcap=0.0, Tensor? alibi_slopes=None, Tensor? sinks=None, Tensor? grad_lse=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_global_q, Tensor grad_global_k, "
      "Tensor grad_global_v, Tensor grad_sinks)");

  // Unfused products over the band layout [B, H, N, left + right + 1], slot t of row i being key
  // j = i + (t - left) * dilation[h]:
  //   qk[i, t] = q_i . k_j (`fill` where j is outside the sequence)
  //   pv_i = sum_t p[i, t] v_j;  pv_transposed_j = sum over (i, t) reaching j of p[i, t] x_i.
  m.def(
      "banded_matmul_qk(Tensor q, Tensor k, int window_left, int window_right, int[] dilation, "
      "float fill) -> Tensor");
  m.def("banded_matmul_pv(Tensor p, Tensor v, int window_left, int window_right, int[] dilation) -> Tensor");
  m.def(
      "banded_matmul_pv_transposed(Tensor p, Tensor x, int window_left, int window_right, "
      "int[] dilation) -> Tensor");
}

}  // namespace longformer
