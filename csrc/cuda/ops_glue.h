// Op glue shared by the CUDA build (ops_cuda.cpp) and the host-emulated build of the same kernels
// (emulation/ops_emulated.cpp): input checks, output allocation and initialisation, the parameter
// blocks, and the launch. The including file first defines, in namespace longformer::cuda:
//   void* glue_stream(const at::Tensor&)          the stream to launch on
//   void glue_check(int error, const char* op)    raises on a nonzero launcher result
//   struct GlueDeviceGuard { explicit GlueDeviceGuard(const at::Tensor&); }
// and afterwards registers the functions below with TORCH_LIBRARY_IMPL.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "launchers.h"
#include "longformer/checks.h"

namespace longformer::cuda {
namespace {

constexpr int64_t kMaxHeadDim = 256;

DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "longformer: CUDA kernels support float32, float64, float16 and bfloat16, got ",
                  t.scalar_type());
  }
}

// Whether the tiled kernels run (launchers.h; tensor cores for float16/bfloat16, FMA tiles for
// float32, each where its *_mma_supports allows): yes unless `variable` (LONGFORMER_CUDA_FORWARD,
// LONGFORMER_CUDA_BACKWARD) says simt (kept so the two paths can be compared on the same inputs;
// float64 always uses SIMT).
bool use_tiled_kernels(DType dtype, const char* variable) {
  if (dtype == DType::kFloat64) return false;
  const char* choice = std::getenv(variable);
  if (choice == nullptr || std::strcmp(choice, "mma") == 0 || std::strcmp(choice, "auto") == 0) return true;
  TORCH_CHECK(std::strcmp(choice, "simt") == 0, "longformer: ", variable, " must be auto, mma or simt, got ", choice);
  return false;
}

// The attention kernels' dtype: float32 becomes kFloat32Tf32 (its tiled products as TF32 on tensor
// cores) where PyTorch allows TF32 matmuls (torch.backends.cuda.matmul.allow_tf32, or
// torch.set_float32_matmul_precision("high" / "medium")). Read at every call, on the host, from the
// same global context cuBLAS reads, so it follows the setting under torch.compile too.
DType attention_dtype(DType dtype) {
  return dtype == DType::kFloat32 && at::globalContext().allowTF32CuBLAS() ? DType::kFloat32Tf32 : dtype;
}

MaskView mask_view(const std::optional<at::Tensor>& mask) {
  if (!mask) return {};
  return MaskView{mask->data_ptr(), mask->stride(0), mask->stride(1), static_cast<int>(mask->element_size())};
}

// Everything the attention launchers read besides the operands, kept alive for the call.
struct Prepared {
  AttentionParams params;
  GlobalKeys globals;
  at::Tensor roles;
  at::Tensor global_tokens;  // int64 [B * N + B]: global_index [B, N], then global_count [B]
  DType dtype = DType::kFloat32;
  bool empty = false;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_left,
                 int64_t window_right, at::IntArrayRef dilation, const std::optional<at::Tensor>& attention_mask,
                 const std::optional<at::Tensor>& global_attention_mask, bool causal, double scale) {
  check_heads_tensor(q, "q", q);
  check_heads_tensor(k, "k", q);
  check_heads_tensor(v, "v", q);
  check_window(window_left, window_right);
  check_mask(attention_mask, "attention_mask", q);
  check_mask(global_attention_mask, "global_attention_mask", q);
  Prepared out;
  out.dtype = kernel_dtype(q);
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, "longformer: CUDA kernels support head dims up to ", kMaxHeadDim, ", got ",
              q.size(3));
  std::vector<int64_t> per_head = per_head_dilation(dilation, q.size(1));
  out.empty = q.numel() == 0;
  if (out.empty) return out;
  // Token roles and the sorted global positions, prepared on the device from the masks as they are.
  const int64_t B = q.size(0), N = q.size(2);
  out.roles = at::empty({B, N}, q.options().dtype(at::kByte));
  out.global_tokens = at::empty({B * N + B}, q.options().dtype(at::kLong));
  int64_t* tokens = out.global_tokens.data_ptr<int64_t>();
  out.globals = GlobalKeys{tokens, tokens + B * N};
  glue_check(prepare_token_roles(mask_view(attention_mask), mask_view(global_attention_mask), B, N,
                                 out.roles.data_ptr<uint8_t>(), tokens, tokens + B * N, glue_stream(q)),
             "token roles");

  AttentionParams& p = out.params;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.seqlen = q.size(2);
  p.head_dim = q.size(3);
  p.q = heads_view(q);
  p.k = heads_view(k);
  p.v = heads_view(v);
  p.roles = out.roles.data_ptr<uint8_t>();
  set_dilation(p, per_head);  // by value: no host-to-device copy, no stream synchronisation
  p.window_left = window_left;
  p.window_right = window_right;
  p.causal = causal;
  p.scale = scale;
  return out;
}

at::Tensor zeros_heads(const at::Tensor& like) { return empty_heads(like.sizes(), like.options()).zero_(); }

at::Tensor checked_lse(const at::Tensor& lse, const at::Tensor& q, const char* producer) {
  at::Tensor lse_c = lse.contiguous();
  TORCH_CHECK(lse_c.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}) &&
                  lse_c.scalar_type() == accumulation_dtype(q.scalar_type()) && lse_c.device() == q.device(),
              "longformer: lse must be [B, H, N] in the accumulation dtype on q's device, as returned by ", producer);
  return lse_c;
}

void set_backward_operands(AttentionParams& p, const at::Tensor& out, const at::Tensor& grad_out, const at::Tensor& lse,
                           const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  p.out = heads_view(out);
  p.grad_out = heads_view(grad_out);
  p.lse = lse.data_ptr();
  p.grad_q = heads_view(dq);
  p.grad_k = heads_view(dk);
  p.grad_v = heads_view(dv);
}

at::Tensor workspace(int64_t bytes, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(bytes, 1)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> banded_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               int64_t window_left, int64_t window_right, at::IntArrayRef dilation,
                                               const std::optional<at::Tensor>& attention_mask,
                                               const std::optional<at::Tensor>& global_attention_mask, bool causal,
                                               double scale, const std::optional<at::Tensor>& global_q,
                                               const std::optional<at::Tensor>& global_k,
                                               const std::optional<at::Tensor>& global_v) {
  GlueDeviceGuard guard(q);
  Prepared prep = prepare(q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask,
                          causal, scale);
  check_global_projections(global_q, global_k, global_v, q);
  at::Tensor out = zeros_heads(q);
  at::Tensor lse = lse_like(q);
  if (prep.empty) return {out, lse};
  prep.params.out = heads_view(out);
  prep.params.lse = lse.data_ptr();
  const bool tiled = use_tiled_kernels(prep.dtype, "LONGFORMER_CUDA_FORWARD");
  const DType dtype = attention_dtype(prep.dtype);
  if (tiled && banded_attention_forward_mma_supports(prep.params, dtype)) {
    glue_check(banded_attention_forward_mma(prep.params, prep.globals, dtype, glue_stream(q)), "banded_attn");
  } else {
    glue_check(banded_attention_forward_simt(prep.params, prep.globals, prep.dtype, glue_stream(q)), "banded_attn");
  }
  if (global_attention_mask) {  // the global rows, into the same out and lse
    const AttentionParams g = global_rows_params(prep.params, global_q, global_k, global_v);
    at::Tensor scratch = workspace(global_attention_forward_workspace_bytes(g, prep.dtype), q);
    glue_check(global_attention_forward(g, prep.globals, scratch.data_ptr(), dtype, tiled, glue_stream(q)),
               "banded_attn (global rows)");
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> banded_attn_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t window_left, int64_t window_right, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& global_attention_mask,
    bool causal, double scale, const std::optional<at::Tensor>& global_q, const std::optional<at::Tensor>& global_k,
    const std::optional<at::Tensor>& global_v) {
  GlueDeviceGuard guard(q);
  Prepared prep = prepare(q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask,
                          causal, scale);
  const bool projections = check_global_projections(global_q, global_k, global_v, q);
  check_heads_tensor(grad_out, "grad_out", q);
  check_heads_tensor(out, "out", q);
  at::Tensor dq = zeros_heads(q), dk = zeros_heads(q), dv = zeros_heads(q);
  at::Tensor dgq = projections ? zeros_heads(q) : q.new_empty({0});
  at::Tensor dgk = projections ? zeros_heads(q) : q.new_empty({0});
  at::Tensor dgv = projections ? zeros_heads(q) : q.new_empty({0});
  if (prep.empty) return {dq, dk, dv, dgq, dgk, dgv};
  at::Tensor lse_c = checked_lse(lse, q, "banded_attn");
  AttentionParams& p = prep.params;
  set_backward_operands(p, out, grad_out, lse_c, dq, dk, dv);
  AttentionParams g = global_rows_params(p, global_q, global_k, global_v);
  if (projections) {
    g.grad_q = heads_view(dgq);
    g.grad_k = heads_view(dgk);
    g.grad_v = heads_view(dgv);
  }
  // One workspace for both launches: they run one after the other on the stream.
  const int64_t bytes = std::max(banded_attention_backward_workspace_bytes(p, prep.dtype),
                                 global_attention_mask ? global_attention_backward_workspace_bytes(g, prep.dtype) : 0);
  at::Tensor scratch = workspace(bytes, q);
  const bool tiled = use_tiled_kernels(prep.dtype, "LONGFORMER_CUDA_BACKWARD");
  const DType dtype = attention_dtype(prep.dtype);
  glue_check(banded_attention_backward(p, prep.globals, scratch.data_ptr(), dtype, tiled, glue_stream(q)),
             "banded_attn_backward");
  if (global_attention_mask) {
    // Without projections the global rows' dK, dV add to the local rows' (same tensors).
    glue_check(global_attention_backward(g, prep.globals, scratch.data_ptr(), dtype,
                                         /*accumulate=*/!projections, tiled, glue_stream(q)),
               "banded_attn_backward (global rows)");
  }
  return {dq, dk, dv, dgq, dgk, dgv};
}

// Banded matmuls: `heads` is the [B, H, N, D] operand that fixes the shapes.
struct PreparedBand {
  BandedMatmulParams params;
  DType dtype = DType::kFloat32;
};

PreparedBand banded_params(const at::Tensor& heads, int64_t window_left, int64_t window_right,
                           at::IntArrayRef dilation) {
  check_window(window_left, window_right);
  PreparedBand out;
  out.dtype = kernel_dtype(heads);
  BandedMatmulParams& p = out.params;
  set_dilation(p, per_head_dilation(dilation, heads.size(1)));
  p.batch = heads.size(0);
  p.heads = heads.size(1);
  p.seqlen = heads.size(2);
  p.head_dim = heads.size(3);
  p.window_left = window_left;
  p.window_right = window_right;
  return out;
}

at::Tensor banded_matmul_qk_op(const at::Tensor& q, const at::Tensor& k, int64_t window_left, int64_t window_right,
                               at::IntArrayRef dilation, double fill) {
  GlueDeviceGuard guard(q);
  check_heads_tensor(q, "q", q);
  check_heads_tensor(k, "k", q);
  PreparedBand prep = banded_params(q, window_left, window_right, dilation);
  BandedMatmulParams& p = prep.params;
  at::Tensor band = at::empty({q.size(0), q.size(1), q.size(2), p.band_width()}, q.options());
  if (band.numel() == 0) return band;
  p.a = heads_view(q);
  p.b = heads_view(k);
  p.band = band.data_ptr();
  p.fill = fill;
  glue_check(banded_matmul_qk(p, prep.dtype, glue_stream(q)), "banded_matmul_qk");
  return band;
}

template <bool kTransposed>
at::Tensor banded_matmul_band_times_heads(const at::Tensor& band, const at::Tensor& x, int64_t window_left,
                                          int64_t window_right, at::IntArrayRef dilation) {
  GlueDeviceGuard guard(x);
  check_heads_tensor(x, kTransposed ? "x" : "v", x);
  PreparedBand prep = banded_params(x, window_left, window_right, dilation);
  BandedMatmulParams& p = prep.params;
  check_band(band, x, p.band_width());
  at::Tensor band_c = band.contiguous();
  at::Tensor out = zeros_heads(x);
  if (out.numel() == 0) return out;
  p.band = band_c.data_ptr();
  p.out = heads_view(out);
  (kTransposed ? p.a : p.b) = heads_view(x);
  if constexpr (kTransposed) {
    glue_check(banded_matmul_pv_transposed(p, prep.dtype, glue_stream(x)), "banded_matmul_pv_transposed");
  } else {
    glue_check(banded_matmul_pv(p, prep.dtype, glue_stream(x)), "banded_matmul_pv");
  }
  return out;
}

}  // namespace
}  // namespace longformer::cuda

// Registers the glue above for one dispatch key of one library namespace.
#define LONGFORMER_REGISTER_GLUE(ns, key)                                                           \
  TORCH_LIBRARY_IMPL(ns, key, m) {                                                                  \
    m.impl("banded_attn", &longformer::cuda::banded_attn);                                          \
    m.impl("banded_attn_backward", &longformer::cuda::banded_attn_backward);                        \
    m.impl("banded_matmul_qk", &longformer::cuda::banded_matmul_qk_op);                             \
    m.impl("banded_matmul_pv", &longformer::cuda::banded_matmul_band_times_heads<false>);           \
    m.impl("banded_matmul_pv_transposed", &longformer::cuda::banded_matmul_band_times_heads<true>); \
  }
