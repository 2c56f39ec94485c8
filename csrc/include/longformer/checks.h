// Input checks and tensor helpers of the op glue (longformer/glue.h), on LibTorch's stable ABI.
// Failures raise RuntimeError in Python with a message that names the argument (never abort or
// print): LONGFORMER_CHECK throws std::runtime_error with exactly the text given (the stable ABI's
// own STD_TORCH_CHECK would prepend the C++ function, file and line).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "longformer/params.h"

namespace longformer {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Sizes = torch::headeronly::IntHeaderOnlyArrayRef;

// Message pieces: shapes print as [2, 3], devices as cpu / cuda:0, dtypes by their torch names.
inline void append(std::ostringstream& os, Sizes sizes) {
  os << '[';
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << ']';
}
inline void append(std::ostringstream& os, const torch::stable::Device& d) {
  os << (d.is_cpu() ? "cpu" : d.is_cuda() ? "cuda" : "device");
  if (!d.is_cpu()) os << ':' << static_cast<int>(d.index());
}
inline void append(std::ostringstream& os, ScalarType t) { os << torch::headeronly::toString(t); }
template <typename T>
void append(std::ostringstream& os, const T& value) {
  os << value;
}

template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream os;
  (append(os, args), ...);
  return os.str();
}

#define LONGFORMER_CHECK(cond, ...)                                      \
  do {                                                                   \
    if (!(cond)) throw std::runtime_error(::longformer::message(__VA_ARGS__)); \
  } while (false)

inline ScalarType accumulation_dtype(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline void check_heads_tensor(const Tensor& t, const char* name, const Tensor& like) {
  LONGFORMER_CHECK(t.dim() == 4, "longformer: ", name, " must be [B, H, N, D], got ", t.sizes());
  LONGFORMER_CHECK(t.sizes().equals(like.sizes()), "longformer: ", name, " has shape ", t.sizes(), " but expected ",
                   like.sizes());
  LONGFORMER_CHECK(t.scalar_type() == like.scalar_type(), "longformer: ", name, " has dtype ", t.scalar_type(),
                   " but expected ", like.scalar_type());
  LONGFORMER_CHECK(t.device() == like.device(), "longformer: ", name, " is on ", t.device(), " but expected ",
                   like.device());
  LONGFORMER_CHECK(t.numel() == 0 || t.size(3) <= 1 || t.stride(3) == 1, "longformer: ", name,
                   " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

// k, v (and global_k, global_v, grad_k, ...) of the general op: [B, H_kv, Nk, D] with q's B, D,
// dtype and device, H % H_kv == 0, Nk >= Nq; and the shape of `like` when given.
inline void check_kv_tensor(const Tensor& t, const char* name, const Tensor& q, const Tensor* like) {
  LONGFORMER_CHECK(t.dim() == 4, "longformer: ", name, " must be [B, H_kv, Nk, D], got ", t.sizes());
  if (like != nullptr) {
    LONGFORMER_CHECK(t.sizes().equals(like->sizes()), "longformer: ", name, " has shape ", t.sizes(),
                     " but expected ", like->sizes());
  }
  LONGFORMER_CHECK(t.size(0) == q.size(0) && t.size(3) == q.size(3), "longformer: ", name, " has shape ", t.sizes(),
                   " but q has ", q.sizes(), ": B and D must match");
  LONGFORMER_CHECK((t.size(1) > 0 && q.size(1) % t.size(1) == 0) || (t.size(1) == 0 && q.size(1) == 0),
                   "longformer: q has H = ", q.size(1), " heads, which must be a multiple of ", name, "'s H_kv = ",
                   t.size(1));
  LONGFORMER_CHECK(t.size(2) >= q.size(2), "longformer: ", name, " has Nk = ", t.size(2),
                   " keys, fewer than q's Nq = ", q.size(2), " queries");
  LONGFORMER_CHECK(t.scalar_type() == q.scalar_type(), "longformer: ", name, " has dtype ", t.scalar_type(),
                   " but expected ", q.scalar_type());
  LONGFORMER_CHECK(t.device() == q.device(), "longformer: ", name, " is on ", t.device(), " but expected ",
                   q.device());
  LONGFORMER_CHECK(t.numel() == 0 || t.size(3) <= 1 || t.stride(3) == 1, "longformer: ", name,
                   " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

// One [H] float array of the general op (alibi_slopes, sinks): the accumulation dtype of q (the
// Python wrappers convert), on q's device, contiguous.
inline void check_per_head(const std::optional<Tensor>& t, const char* name, const Tensor& q) {
  if (!t) return;
  LONGFORMER_CHECK(t->dim() == 1 && t->size(0) == q.size(1), "longformer: ", name, " must be [H] = [", q.size(1),
                   "], got ", t->sizes());
  LONGFORMER_CHECK(t->scalar_type() == accumulation_dtype(q.scalar_type()), "longformer: ", name, " must be ",
                   accumulation_dtype(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ", t->scalar_type());
  LONGFORMER_CHECK(t->device() == q.device(), "longformer: ", name, " is on ", t->device(), " but q is on ",
                   q.device());
  LONGFORMER_CHECK(t->is_contiguous(), "longformer: ", name, " must be contiguous");
}

inline bool is_bool_or_integer(ScalarType t) {
  switch (t) {
    case ScalarType::Bool:
    case ScalarType::Byte:
    case ScalarType::Char:
    case ScalarType::Short:
    case ScalarType::Int:
    case ScalarType::Long:
    case ScalarType::UInt16:
    case ScalarType::UInt32:
    case ScalarType::UInt64:
      return true;
    default:
      return false;
  }
}

// A [B, N] role mask over the key positions (N = keys).
inline void check_mask(const std::optional<Tensor>& mask, const char* name, const Tensor& q, int64_t keys) {
  if (!mask) return;
  LONGFORMER_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == keys, "longformer: ",
                   name, " must be [B, N] = [", q.size(0), ", ", keys, "], got ", mask->sizes());
  LONGFORMER_CHECK(is_bool_or_integer(mask->scalar_type()), "longformer: ", name,
                   " must be bool or integer (nonzero = set), got ", mask->scalar_type(),
                   "; float (additive) masks are rejected to avoid misreading them");
  LONGFORMER_CHECK(mask->device() == q.device(), "longformer: ", name, " is on ", mask->device(), " but q is on ",
                   q.device());
}

// The mask as the kernels read it (params.h): raw elements through their strides.
inline MaskView mask_view(const std::optional<Tensor>& mask) {
  if (!mask) return {};
  return MaskView{mask->const_data_ptr(), mask->stride(0), mask->stride(1), static_cast<int>(mask->element_size())};
}

// The optional global projections of banded_attn: all three or none (none: the rows of global
// tokens use q, k, v). Returns whether they were given.
inline bool check_global_projections(const std::optional<Tensor>& global_q, const std::optional<Tensor>& global_k,
                                     const std::optional<Tensor>& global_v, const Tensor& q, const Tensor& k) {
  LONGFORMER_CHECK(global_q.has_value() == global_k.has_value() && global_k.has_value() == global_v.has_value(),
                   "longformer: global_q, global_k and global_v must be given together (all three or none)");
  if (!global_q) return false;
  check_heads_tensor(*global_q, "global_q", q);
  check_kv_tensor(*global_k, "global_k", q, &k);
  check_kv_tensor(*global_v, "global_v", q, &k);
  return true;
}

// One dilation per head (a single value applies to all heads), each in [1, 2^31); at most
// kMaxHeads heads (the parameter blocks hold the dilations by value).
inline std::vector<int64_t> per_head_dilation(const std::vector<int64_t>& dilation, int64_t heads) {
  LONGFORMER_CHECK(heads <= kMaxHeads, "longformer: at most ", kMaxHeads, " heads are supported, got ", heads);
  LONGFORMER_CHECK(dilation.size() == 1 || static_cast<int64_t>(dilation.size()) == heads,
                   "longformer: dilation must have 1 or H = ", heads, " entries, got ", dilation.size());
  std::vector<int64_t> out = dilation;
  if (out.size() == 1) out.assign(heads, out[0]);
  for (int64_t d : out) {
    LONGFORMER_CHECK(d >= 1 && d <= std::numeric_limits<int32_t>::max(),
                     "longformer: dilation must be in [1, 2^31), got ", d);
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
  LONGFORMER_CHECK(left >= 0 && right >= 0, "longformer: window sides must be >= 0, got (", left, ", ", right, ")");
}

// The band operand of the unfused matmuls: [B, H, N, width] with the dtype and device of `heads`.
inline void check_band(const Tensor& band, const Tensor& heads, int64_t width) {
  LONGFORMER_CHECK(band.dim() == 4 && band.size(0) == heads.size(0) && band.size(1) == heads.size(1) &&
                       band.size(2) == heads.size(2) && band.size(3) == width,
                   "longformer: band must be [B, H, N, left + right + 1] = [", heads.size(0), ", ", heads.size(1),
                   ", ", heads.size(2), ", ", width, "], got ", band.sizes());
  LONGFORMER_CHECK(band.scalar_type() == heads.scalar_type() && band.device() == heads.device(),
                   "longformer: band must have the dtype and device of the other operand");
}

// t itself when contiguous (torch::stable::contiguous is a dispatcher call even then), else a copy.
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// The forward's lse (or its gradient) as the backward takes it: [B, H, Nq] in the accumulation
// dtype on q's device.
inline Tensor checked_lse(const Tensor& lse, const Tensor& q, const char* name = "lse") {
  LONGFORMER_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                       lse.size(2) == q.size(2) && lse.scalar_type() == accumulation_dtype(q.scalar_type()) &&
                       lse.device() == q.device(),
                   "longformer: ", name, " must be [B, H, Nq] in the accumulation dtype on q's device, as ",
                   "banded_attn returns lse");
  return as_contiguous(lse);
}

// Allocation through the C shim directly (aoti_torch_empty_strided, aoti_torch_zero_): one call
// each, where torch::stable::empty/transpose/zero_ are dispatcher calls that look the operator up by
// name every time (a few microseconds per op call on small inputs).
inline Tensor empty_strided_on(const Tensor& like, Sizes sizes, Sizes strides, ScalarType dtype) {
  namespace detail = torch::stable::detail;
  AtenTensorHandle handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), detail::to<int32_t>(detail::from(dtype)),
      detail::to<int32_t>(detail::from(like.device().type())), like.get_device_index(), &handle));
  return Tensor(handle);
}

// The strides of a contiguous tensor of `sizes`, as torch computes them (a 0-size dimension counts as 1).
inline std::vector<int64_t> contiguous_strides(Sizes sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<int64_t>(sizes[i], 1);
  }
  return strides;
}

// An uninitialised contiguous tensor of `sizes` with `dtype` on the device of `like`.
inline Tensor empty_on(const Tensor& like, Sizes sizes, ScalarType dtype) {
  return empty_strided_on(like, sizes, contiguous_strides(sizes), dtype);
}

// An uninitialised [B, H, N, D] tensor laid out as a contiguous [B, N, H, D] (H heads if given,
// else like's), with like's dtype and device.
inline Tensor empty_heads(const Tensor& like, int64_t heads = -1) {
  const int64_t B = like.size(0), H = heads < 0 ? like.size(1) : heads, N = like.size(2), D = like.size(3);
  const std::vector<int64_t> bnhd = contiguous_strides({B, N, H, D});
  return empty_strided_on(like, {B, H, N, D}, {bnhd[0], bnhd[2], bnhd[1], bnhd[3]}, like.scalar_type());
}

inline Tensor zero_(Tensor t) {
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_zero_(t.get()));
  return t;
}

inline Tensor zeros_heads(const Tensor& like, int64_t heads = -1) { return zero_(empty_heads(like, heads)); }

// A [B, H, N] log-sum-exp in the accumulation dtype, -inf everywhere (rows without keys keep it).
inline Tensor lse_like(const Tensor& q) {
  return torch::stable::full({q.size(0), q.size(1), q.size(2)}, -std::numeric_limits<double>::infinity(),
                             accumulation_dtype(q.scalar_type()), std::nullopt, q.device());
}

inline RowMajorHeads heads_view(const Tensor& t) {
  return RowMajorHeads{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

}  // namespace longformer
