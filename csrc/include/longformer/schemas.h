// The schemas of every longformer op, in one place. csrc/ops.cpp defines them for the `longformer`
// library; the host-emulated CUDA build (csrc/cuda/emulation) defines the same schemas under its own
// namespace so its kernels can be called and tested side by side with the real ones.
//
// Shapes: q, k, v, global_q/k/v, out, grads: [B, H, N, D] with a contiguous last dimension.
// Every [B, H, N, D] result is a view of a contiguous [B, N, H, D] tensor (merging heads is free);
// lse is [B, H, N] contiguous in the accumulation dtype (float32; float64 for float64 inputs).
// Masks are [B, N] bool/integer: attention_mask nonzero = real token, global_attention_mask
// nonzero = global token (a padding token is never global). dilation has 1 or H entries.
#pragma once

#include <torch/library.h>

namespace longformer {

inline void define_schemas(torch::Library& m) {
  // Local rows: band keys (j = i + t*dilation[h], -left <= t <= right, local and real) plus every
  // real global key; global and padding rows are 0 with lse = -inf.
  m.def(
      "banded_attn(Tensor q, Tensor k, Tensor v, int window_left, int window_right, int[] dilation, "
      "Tensor? attention_mask, Tensor? global_attention_mask, bool causal, float scale) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "banded_attn_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int window_left, int window_right, int[] dilation, Tensor? attention_mask, "
      "Tensor? global_attention_mask, bool causal, float scale) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // Global rows over every real key, with the global projections, written into a copy of `out`;
  // lse holds the global rows' log-sum-exp and -inf elsewhere.
  m.def(
      "global_attn(Tensor global_q, Tensor global_k, Tensor global_v, Tensor global_attention_mask, "
      "Tensor? attention_mask, bool causal, float scale, Tensor out) -> (Tensor out, Tensor lse)");
  m.def(
      "global_attn_backward(Tensor grad_out, Tensor global_q, Tensor global_k, Tensor global_v, "
      "Tensor out, Tensor lse, Tensor global_attention_mask, Tensor? attention_mask, bool causal, "
      "float scale) -> (Tensor grad_global_q, Tensor grad_global_k, Tensor grad_global_v, "
      "Tensor grad_out_in)");

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
