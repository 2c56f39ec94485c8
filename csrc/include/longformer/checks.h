// Input checks and tensor helpers shared by the CPU and CUDA op glue. Failures raise
// RuntimeError in Python with a message that names the argument (never abort or print).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "longformer/params.h"

namespace longformer {

inline void check_heads_tensor(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 4, "longformer: ", name, " must be [B, H, N, D], got ", t.sizes());
  TORCH_CHECK(t.sizes() == like.sizes(), "longformer: ", name, " has shape ", t.sizes(), " but expected ",
              like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "longformer: ", name, " has dtype ", t.scalar_type(),
              " but expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "longformer: ", name, " is on ", t.device(), " but expected ",
              like.device());
  TORCH_CHECK(t.numel() == 0 || t.size(3) <= 1 || t.stride(3) == 1, "longformer: ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

inline void check_mask(const std::optional<at::Tensor>& mask, const char* name, const at::Tensor& q) {
  if (!mask) return;
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == q.size(2), "longformer: ", name,
              " must be [B, N] = [", q.size(0), ", ", q.size(2), "], got ", mask->sizes());
  TORCH_CHECK(mask->scalar_type() == at::kBool || at::isIntegralType(mask->scalar_type(), /*includeBool=*/true),
              "longformer: ", name, " must be bool or integer (nonzero = set), got ", mask->scalar_type(),
              "; float (additive) masks are rejected to avoid misreading them");
  TORCH_CHECK(mask->device() == q.device(), "longformer: ", name, " is on ", mask->device(), " but q is on ",
              q.device());
}

// The optional global projections of banded_attn: all three or none (none: the rows of global
// tokens use q, k, v). Returns whether they were given.
inline bool check_global_projections(const std::optional<at::Tensor>& global_q,
                                     const std::optional<at::Tensor>& global_k,
                                     const std::optional<at::Tensor>& global_v, const at::Tensor& q) {
  TORCH_CHECK(global_q.has_value() == global_k.has_value() && global_k.has_value() == global_v.has_value(),
              "longformer: global_q, global_k and global_v must be given together (all three or none)");
  if (!global_q) return false;
  check_heads_tensor(*global_q, "global_q", q);
  check_heads_tensor(*global_k, "global_k", q);
  check_heads_tensor(*global_v, "global_v", q);
  return true;
}

// One dilation per head (a single value applies to all heads), each in [1, 2^31); at most
// kMaxHeads heads (the parameter blocks hold the dilations by value).
inline std::vector<int64_t> per_head_dilation(at::IntArrayRef dilation, int64_t heads) {
  TORCH_CHECK(heads <= kMaxHeads, "longformer: at most ", kMaxHeads, " heads are supported, got ", heads);
  TORCH_CHECK(dilation.size() == 1 || static_cast<int64_t>(dilation.size()) == heads,
              "longformer: dilation must have 1 or H = ", heads, " entries, got ", dilation.size());
  std::vector<int64_t> out(dilation.begin(), dilation.end());
  if (out.size() == 1) out.assign(heads, out[0]);
  for (int64_t d : out) {
    TORCH_CHECK(d >= 1 && d <= std::numeric_limits<int32_t>::max(), "longformer: dilation must be in [1, 2^31), got ",
                d);
  }
  return out;
}

// Puts per-head dilations (from per_head_dilation) into a parameter block, by value.
template <typename Params>
inline void set_dilation(Params& p, const std::vector<int64_t>& per_head) {
  p.max_dilation = 1;
  for (size_t h = 0; h < per_head.size(); ++h) {
    p.dilation[h] = static_cast<int32_t>(per_head[h]);
    p.max_dilation = std::max(p.max_dilation, per_head[h]);
  }
}

inline void check_window(int64_t left, int64_t right) {
  TORCH_CHECK(left >= 0 && right >= 0, "longformer: window sides must be >= 0, got (", left, ", ", right, ")");
}

// [B, N] uint8 roles on q's device: 0 padding, 1 local, 2 global (a padding token is never global).
inline at::Tensor token_roles(const at::Tensor& q, const std::optional<at::Tensor>& attention_mask,
                              const std::optional<at::Tensor>& global_attention_mask) {
  auto opts = q.options().dtype(at::kByte);
  at::Tensor real = attention_mask ? attention_mask->ne(0).to(at::kByte) : at::ones({q.size(0), q.size(2)}, opts);
  at::Tensor roles = real;
  if (global_attention_mask) roles = real + real * global_attention_mask->ne(0).to(at::kByte);
  return roles.contiguous();
}

// An uninitialised [B, H, N, D] tensor laid out as a contiguous [B, N, H, D].
inline at::Tensor empty_heads(at::IntArrayRef bhnd, const at::TensorOptions& opts) {
  return at::empty({bhnd[0], bhnd[2], bhnd[1], bhnd[3]}, opts).permute({0, 2, 1, 3});
}

inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The band operand of the unfused matmuls: [B, H, N, width] with the dtype and device of `heads`.
inline void check_band(const at::Tensor& band, const at::Tensor& heads, int64_t width) {
  TORCH_CHECK(band.dim() == 4 && band.size(0) == heads.size(0) && band.size(1) == heads.size(1) &&
                  band.size(2) == heads.size(2) && band.size(3) == width,
              "longformer: band must be [B, H, N, left + right + 1] = [", heads.size(0), ", ", heads.size(1), ", ",
              heads.size(2), ", ", width, "], got ", band.sizes());
  TORCH_CHECK(band.scalar_type() == heads.scalar_type() && band.device() == heads.device(),
              "longformer: band must have the dtype and device of the other operand");
}

// A [B, H, N] log-sum-exp in the accumulation dtype, -inf everywhere (rows without keys keep it).
inline at::Tensor lse_like(const at::Tensor& q) {
  return at::full({q.size(0), q.size(1), q.size(2)}, -std::numeric_limits<double>::infinity(),
                  q.options().dtype(accumulation_dtype(q.scalar_type())));
}

inline RowMajorHeads heads_view(const at::Tensor& t) {
  return RowMajorHeads{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// The parameters of the global rows: those of the local rows with the global projections, if given.
inline AttentionParams global_rows_params(const AttentionParams& local, const std::optional<at::Tensor>& global_q,
                                          const std::optional<at::Tensor>& global_k,
                                          const std::optional<at::Tensor>& global_v) {
  AttentionParams p = local;
  if (global_q) {
    p.q = heads_view(*global_q);
    p.k = heads_view(*global_k);
    p.v = heads_view(*global_v);
  }
  return p;
}

}  // namespace longformer
