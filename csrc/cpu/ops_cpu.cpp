// CPU implementations of the longformer ops: check inputs, build the parameter block, dispatch
// on dtype to the kernels in this folder.
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels.h"
#include "longformer/checks.h"

namespace longformer::cpu {
namespace {

// The kernels of one instruction set, for one dtype.
template <typename scalar_t>
struct KernelTable {
  void (*banded_forward)(const AttentionParams&);
  void (*banded_backward)(const AttentionParams&, void*);
  void (*global_forward)(const AttentionParams&);
  void (*global_backward)(const AttentionParams&, void*, bool);
  void (*qk)(const BandedMatmulParams&);
  void (*pv)(const BandedMatmulParams&);
  void (*pv_transposed)(const BandedMatmulParams&);
};

#define LONGFORMER_KERNEL_TABLE(isa)                                                                      \
  KernelTable<scalar_t> {                                                                               \
    &isa::banded_attention_forward<scalar_t>, &isa::banded_attention_backward<scalar_t>,                \
        &isa::global_attention_forward<scalar_t>, &isa::global_attention_backward<scalar_t>,            \
        &isa::banded_matmul_qk<scalar_t>, &isa::banded_matmul_pv<scalar_t>,                             \
        &isa::banded_matmul_pv_transposed<scalar_t>                                                     \
  }

// The widest instruction set that is both compiled in and allowed by ATen on this CPU (so the
// ATEN_CPU_CAPABILITY environment variable lowers it for us too).
template <typename scalar_t>
KernelTable<scalar_t> kernels() {
  static const std::string capability = at::get_cpu_capability();
#ifdef LONGFORMER_CPU_AVX512
  if (capability == "AVX512") return LONGFORMER_KERNEL_TABLE(AVX512);
#endif
#ifdef LONGFORMER_CPU_AVX2
  if (capability == "AVX2" || capability == "AVX512") return LONGFORMER_KERNEL_TABLE(AVX2);
#endif
  return LONGFORMER_KERNEL_TABLE(DEFAULT);
}
#undef LONGFORMER_KERNEL_TABLE

// "float32, float64, float16 and bfloat16": the dtypes of LONGFORMER_CPU_FOR_EACH_DTYPE.
std::string cpu_dtype_names() {
  std::vector<std::string> names;
#define LONGFORMER_NAME(T, name) names.emplace_back(name);
  LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_NAME)
#undef LONGFORMER_NAME
  std::string out = names[0];
  for (size_t i = 1; i < names.size(); ++i) out += (i + 1 == names.size() ? " and " : ", ") + names[i];
  return out;
}

void check_cpu_dtype(const at::Tensor& t) {
  bool supported = false;
#define LONGFORMER_SUPPORTED(T, name) supported = supported || t.scalar_type() == c10::CppTypeToScalarType<T>::value;
  LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_SUPPORTED)
#undef LONGFORMER_SUPPORTED
  TORCH_CHECK(supported, "longformer: CPU kernels support ", cpu_dtype_names(), ", got ", t.scalar_type());
}

// Calls f(scalar_t{}) with the storage type of `dtype`, one of LONGFORMER_CPU_FOR_EACH_DTYPE
// (checked before by check_cpu_dtype).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
#define LONGFORMER_CASE(T, name)                     \
  if (dtype == c10::CppTypeToScalarType<T>::value) { \
    f(T{});                                          \
    return;                                          \
  }
  LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_CASE)
#undef LONGFORMER_CASE
  TORCH_CHECK(false, "longformer: CPU kernels support ", cpu_dtype_names(), ", got ", dtype);
}

struct Prepared {
  AttentionParams params;
  at::Tensor roles;
  bool empty = false;
};

// Shared checks and parameter setup of the attention ops.
Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window_left,
                 int64_t window_right, at::IntArrayRef dilation, const std::optional<at::Tensor>& attention_mask,
                 const std::optional<at::Tensor>& global_attention_mask, bool causal, double scale) {
  check_heads_tensor(q, "q", q);
  check_heads_tensor(k, "k", q);
  check_heads_tensor(v, "v", q);
  check_cpu_dtype(q);
  check_window(window_left, window_right);
  check_mask(attention_mask, "attention_mask", q);
  check_mask(global_attention_mask, "global_attention_mask", q);
  Prepared out;
  const std::vector<int64_t> per_head = per_head_dilation(dilation, q.size(1));
  out.empty = q.numel() == 0;
  if (out.empty) return out;
  out.roles = token_roles(q, attention_mask, global_attention_mask);
  AttentionParams& p = out.params;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.seqlen = q.size(2);
  p.head_dim = q.size(3);
  p.q = heads_view(q);
  p.k = heads_view(k);
  p.v = heads_view(v);
  p.roles = out.roles.data_ptr<uint8_t>();
  set_dilation(p, per_head);
  p.window_left = window_left;
  p.window_right = window_right;
  p.causal = causal;
  p.scale = scale;
  return out;
}

std::tuple<at::Tensor, at::Tensor> banded_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               int64_t window_left, int64_t window_right, at::IntArrayRef dilation,
                                               const std::optional<at::Tensor>& attention_mask,
                                               const std::optional<at::Tensor>& global_attention_mask, bool causal,
                                               double scale, const std::optional<at::Tensor>& global_q,
                                               const std::optional<at::Tensor>& global_k,
                                               const std::optional<at::Tensor>& global_v) {
  Prepared prep = prepare(q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask,
                          causal, scale);
  check_global_projections(global_q, global_k, global_v, q);
  at::Tensor out = empty_heads(q.sizes(), q.options());
  at::Tensor lse = lse_like(q);
  if (prep.empty) return {out.zero_(), lse};
  prep.params.out = heads_view(out);
  prep.params.lse = lse.data_ptr();
  dispatch_dtype(q.scalar_type(), [&](auto t) {
    kernels<decltype(t)>().banded_forward(prep.params);  // local rows; global rows 0, lse -inf
    if (global_attention_mask) {
      kernels<decltype(t)>().global_forward(global_rows_params(prep.params, global_q, global_k, global_v));
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> banded_attn_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t window_left, int64_t window_right, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& global_attention_mask,
    bool causal, double scale, const std::optional<at::Tensor>& global_q, const std::optional<at::Tensor>& global_k,
    const std::optional<at::Tensor>& global_v) {
  Prepared prep = prepare(q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask,
                          causal, scale);
  const bool projections = check_global_projections(global_q, global_k, global_v, q);
  check_heads_tensor(grad_out, "grad_out", q);
  check_heads_tensor(out, "out", q);
  auto zeros = [&] { return empty_heads(q.sizes(), q.options()).zero_(); };
  at::Tensor dq = zeros(), dk = zeros(), dv = zeros();
  at::Tensor dgq = projections ? zeros() : q.new_empty({0});
  at::Tensor dgk = projections ? zeros() : q.new_empty({0});
  at::Tensor dgv = projections ? zeros() : q.new_empty({0});
  if (prep.empty) return {dq, dk, dv, dgq, dgk, dgv};
  at::Tensor lse_c = lse.contiguous();
  TORCH_CHECK(lse_c.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}) &&
                  lse_c.scalar_type() == accumulation_dtype(q.scalar_type()),
              "longformer: lse must be [B, H, N] in the accumulation dtype, as returned by banded_attn");
  at::Tensor delta = at::empty_like(lse_c);
  AttentionParams& p = prep.params;
  p.out = heads_view(out);
  p.grad_out = heads_view(grad_out);
  p.grad_q = heads_view(dq);
  p.grad_k = heads_view(dk);
  p.grad_v = heads_view(dv);
  p.lse = lse_c.data_ptr();
  dispatch_dtype(q.scalar_type(), [&](auto t) {
    kernels<decltype(t)>().banded_backward(p, delta.data_ptr());
    if (!global_attention_mask) return;
    AttentionParams g = global_rows_params(p, global_q, global_k, global_v);
    if (projections) {
      g.grad_q = heads_view(dgq);
      g.grad_k = heads_view(dgk);
      g.grad_v = heads_view(dgv);
    }
    // Without projections the global rows' dK, dV add to the local rows' (same tensors).
    kernels<decltype(t)>().global_backward(g, delta.data_ptr(), /*accumulate=*/!projections);
  });
  return {dq, dk, dv, dgq, dgk, dgv};
}

// Banded matmuls: `heads` is the [B, H, N, D] operand that fixes the shapes.
BandedMatmulParams banded_params(const at::Tensor& heads, int64_t window_left, int64_t window_right,
                                 at::IntArrayRef dilation) {
  check_cpu_dtype(heads);
  check_window(window_left, window_right);
  BandedMatmulParams p;
  set_dilation(p, per_head_dilation(dilation, heads.size(1)));
  p.batch = heads.size(0);
  p.heads = heads.size(1);
  p.seqlen = heads.size(2);
  p.head_dim = heads.size(3);
  p.window_left = window_left;
  p.window_right = window_right;
  return p;
}

at::Tensor banded_matmul_qk_op(const at::Tensor& q, const at::Tensor& k, int64_t window_left, int64_t window_right,
                               at::IntArrayRef dilation, double fill) {
  check_heads_tensor(q, "q", q);
  check_heads_tensor(k, "k", q);
  BandedMatmulParams p = banded_params(q, window_left, window_right, dilation);
  at::Tensor band = at::empty({q.size(0), q.size(1), q.size(2), p.band_width()}, q.options());
  if (band.numel() == 0) return band;
  p.a = heads_view(q);
  p.b = heads_view(k);
  p.band = band.data_ptr();
  p.fill = fill;
  dispatch_dtype(q.scalar_type(), [&](auto t) { kernels<decltype(t)>().qk(p); });
  return band;
}

template <bool kTransposed>
at::Tensor banded_matmul_band_times_heads(const at::Tensor& band, const at::Tensor& x, int64_t window_left,
                                          int64_t window_right, at::IntArrayRef dilation) {
  check_heads_tensor(x, kTransposed ? "x" : "v", x);
  BandedMatmulParams p = banded_params(x, window_left, window_right, dilation);
  check_band(band, x, p.band_width());
  at::Tensor band_c = band.contiguous();
  at::Tensor out = empty_heads(x.sizes(), x.options());
  if (out.numel() == 0) return out.zero_();
  p.band = band_c.data_ptr();
  p.out = heads_view(out);
  (kTransposed ? p.a : p.b) = heads_view(x);
  dispatch_dtype(x.scalar_type(), [&](auto t) {
    if constexpr (kTransposed) {
      kernels<decltype(t)>().pv_transposed(p);
    } else {
      kernels<decltype(t)>().pv(p);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(longformer, CPU, m) {
  m.impl("banded_attn", &banded_attn);
  m.impl("banded_attn_backward", &banded_attn_backward);
  m.impl("banded_matmul_qk", &banded_matmul_qk_op);
  m.impl("banded_matmul_pv", &banded_matmul_band_times_heads<false>);
  m.impl("banded_matmul_pv_transposed", &banded_matmul_band_times_heads<true>);
}

}  // namespace longformer::cpu
