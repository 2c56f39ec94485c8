// The op glue, written once for every backend (CPU: csrc/cpu/ops_cpu.cpp; CUDA and its host
// emulation: csrc/cuda/cuda_backend.h): input checks, output allocation, the output contract and
// the parameter blocks. A backend only supplies its launchers, as static members of one struct:
//
//   static constexpr bool kZeroFilledOutputs;  its kernels expect out (forward, pv, pv_transposed)
//                                              zero-filled, instead of writing every element
//   struct DeviceScope { explicit DeviceScope(const Tensor& q); };  held for the call
//   static void check_supported(const Tensor& q, bool attention);  dtypes (and, for the
//                                              attention ops, head dims)
//   struct Tokens;  static Tokens prepare_tokens(const Tensor& q, const MaskView& attention,
//                                                const MaskView& global,
//                                                const std::optional<Tensor>& cu_seqlens,
//                                                AttentionParams& p);
//                  the roles of p (and whatever else the kernels read, e.g. the packed
//                  sequences' bounds, checked there), alive for the call
//   static int64_t forward_workspace_bytes(const AttentionCall&);
//   static void forward(const AttentionCall&, const Tokens&);
//   static int64_t backward_workspace_bytes(const AttentionCall&);
//   static void backward(const AttentionCall&, const Tokens&);
//   static void sum_kv_groups(const AttentionParams&, const Tensor& per_query_head, const Tensor& out);
//                  grouped KV heads: out [B, H_kv, N, D] = the sum over each group of query heads
//                  of per_query_head [B, H, N, D], in a fixed order
//   static void banded_matmul(BandedMatmulOp, const BandedMatmulParams&, const Tensor& heads);
//
// The output contract (the same on every backend; semantics in longformer/schemas.h): out is
// [B, H, Nq, D] as a view of a contiguous [B, Nq, H, D], every row written (padding rows 0); lse is
// [B, H, Nq] in the accumulation dtype, -inf for rows without keys; each gradient has its input's
// shape in the same layout, zero where no gradient flows; grad_global_* are [0] without global
// projections, grad_sinks [0] without sinks. Empty inputs return these shapes without launching
// anything.
#pragma once

#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "longformer/checks.h"

namespace longformer {

// One attention call as a backend's launchers see it.
struct AttentionCall {
  AttentionParams local;     // the local rows; out/lse (forward) or the gradients (backward) set
  AttentionParams global;    // the global rows: local's, with the global projections when given
  bool has_global_rows = false;     // a global_attention_mask was given
  bool accumulate_global = false;   // backward: the global rows' dK, dV add to the local rows' (no projections)
  ScalarType dtype = ScalarType::Float;
  bool allow_tf32 = false;   // float32 products may run as TF32 (the caller's torch setting)
  void* workspace = nullptr; // the bytes *_workspace_bytes asked for, uninitialised (null for none)
};

enum class BandedMatmulOp { kQK, kPV, kPVTransposed };

// The general op's arguments (docs/design.md §2.2) as the schemas pass them.
struct GeneralArgs {
  int64_t q_offset = -1;  // -1: Nk - Nq
  std::optional<Tensor> cu_seqlens;
  double softcap = 0.0;
  std::optional<Tensor> alibi_slopes, sinks;
};

template <typename Backend>
struct Glue {
  using Tokens = typename Backend::Tokens;

  struct Prepared {
    AttentionCall call;
    std::optional<Tokens> tokens;  // none for empty inputs
  };

  // Checks of the general arguments (docs/design.md §2.2).
  static void check_general(const Tensor& q, const Tensor& k, const GeneralArgs& g) {
    const int64_t nq = q.size(2), nk = k.size(2);
    LONGFORMER_CHECK(g.q_offset == -1 || (g.q_offset >= 0 && g.q_offset <= nk - nq),
                     "longformer: q_offset must be -1 (Nk - Nq) or in [0, Nk - Nq] = [0, ", nk - nq, "], got ",
                     g.q_offset);
    LONGFORMER_CHECK(g.softcap >= 0.0 && g.softcap < std::numeric_limits<double>::infinity(),
                     "longformer: softcap must be finite and >= 0 (0: none), got ", g.softcap);
    check_per_head(g.alibi_slopes, "alibi_slopes", q);
    check_per_head(g.sinks, "sinks", q);
    if (g.cu_seqlens) {
      const Tensor& cu = *g.cu_seqlens;
      LONGFORMER_CHECK(cu.dim() == 1 && cu.size(0) >= 2 &&
                           (cu.scalar_type() == ScalarType::Int || cu.scalar_type() == ScalarType::Long),
                       "longformer: cu_seqlens must be an int32 or int64 [S + 1] tensor with S >= 1, got ",
                       cu.scalar_type(), " ", cu.sizes());
      LONGFORMER_CHECK(cu.device() == q.device(), "longformer: cu_seqlens is on ", cu.device(), " but q is on ",
                       q.device());
      LONGFORMER_CHECK(q.size(0) == 1, "longformer: cu_seqlens packs the sequences along N and needs B == 1, got B = ",
                       q.size(0));
      LONGFORMER_CHECK(nq == nk, "longformer: cu_seqlens needs Nq == Nk, but q has Nq = ", nq, " and k Nk = ", nk);
      LONGFORMER_CHECK(g.q_offset <= 0, "longformer: cu_seqlens and q_offset = ", g.q_offset,
                       " cannot be combined");
    }
  }

  static Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window_left,
                          int64_t window_right, const std::vector<int64_t>& dilation,
                          const std::optional<Tensor>& attention_mask,
                          const std::optional<Tensor>& global_attention_mask, bool causal, double scale,
                          bool allow_tf32, const GeneralArgs& general) {
    check_heads_tensor(q, "q", q);
    check_kv_tensor(k, "k", q, nullptr);
    check_kv_tensor(v, "v", q, &k);
    Backend::check_supported(q, /*attention=*/true);
    check_window(window_left, window_right);
    check_mask(attention_mask, "attention_mask", q, k.size(2));
    check_mask(global_attention_mask, "global_attention_mask", q, k.size(2));
    check_general(q, k, general);
    const std::vector<int64_t> per_head = per_head_dilation(dilation, q.size(1));
    Prepared out;
    AttentionCall& c = out.call;
    c.dtype = q.scalar_type();
    c.allow_tf32 = allow_tf32;
    c.has_global_rows = global_attention_mask.has_value();
    AttentionParams& p = c.local;
    p.batch = q.size(0);
    p.heads = q.size(1);
    p.heads_kv = k.size(1);
    p.queries = q.size(2);
    p.seqlen = k.size(2);
    p.q_offset = general.q_offset < 0 ? p.seqlen - p.queries : general.q_offset;
    p.head_dim = q.size(3);
    p.q = heads_view(q);
    p.k = heads_view(k);
    p.v = heads_view(v);
    set_dilation(p, per_head);  // by value: no host-to-device copy, no stream synchronisation
    p.window_left = window_left;
    p.window_right = window_right;
    p.causal = causal;
    p.scale = scale;
    p.softcap = general.softcap;
    p.alibi_slopes = general.alibi_slopes ? general.alibi_slopes->const_data_ptr() : nullptr;
    p.sinks = general.sinks ? general.sinks->const_data_ptr() : nullptr;
    if (q.numel() != 0 && k.numel() != 0) {
      out.tokens.emplace(Backend::prepare_tokens(q, mask_view(attention_mask), mask_view(global_attention_mask),
                                                 general.cu_seqlens, p));
    }
    return out;
  }

  // The global rows' parameters: the local rows' with the global projections, if given.
  static void set_global_rows(AttentionCall& c, const std::optional<Tensor>& global_q,
                              const std::optional<Tensor>& global_k, const std::optional<Tensor>& global_v) {
    c.global = c.local;
    if (global_q) {
      c.global.q = heads_view(*global_q);
      c.global.k = heads_view(*global_k);
      c.global.v = heads_view(*global_v);
    }
  }

  // The backend's scratch, alive for the call; none when it asks for no bytes.
  static std::optional<Tensor> workspace(AttentionCall& c, const Tensor& like, int64_t bytes) {
    if (bytes <= 0) return std::nullopt;
    Tensor t = empty_on(like, {bytes}, ScalarType::Byte);
    c.workspace = t.data_ptr();
    return t;
  }

  static Tensor output_heads(const Tensor& like) {
    return Backend::kZeroFilledOutputs ? zeros_heads(like) : empty_heads(like);
  }

  static std::tuple<Tensor, Tensor> banded_attn(Tensor q, Tensor k, Tensor v, int64_t window_left,
                                                int64_t window_right, std::vector<int64_t> dilation,
                                                std::optional<Tensor> attention_mask,
                                                std::optional<Tensor> global_attention_mask, bool causal,
                                                double scale, std::optional<Tensor> global_q,
                                                std::optional<Tensor> global_k, std::optional<Tensor> global_v,
                                                bool allow_tf32, int64_t q_offset, std::optional<Tensor> cu_seqlens,
                                                double softcap, std::optional<Tensor> alibi_slopes,
                                                std::optional<Tensor> sinks) {
    typename Backend::DeviceScope scope(q);
    Prepared prep = prepare(q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask,
                            causal, scale, allow_tf32, {q_offset, cu_seqlens, softcap, alibi_slopes, sinks});
    check_global_projections(global_q, global_k, global_v, q, k);
    Tensor lse = lse_like(q);
    if (!prep.tokens) return {zeros_heads(q), lse};
    Tensor out = output_heads(q);
    AttentionCall& c = prep.call;
    c.local.out = heads_view(out);
    c.local.lse = lse.data_ptr();
    set_global_rows(c, global_q, global_k, global_v);
    const std::optional<Tensor> scratch = workspace(c, q, Backend::forward_workspace_bytes(c));
    Backend::forward(c, *prep.tokens);
    return {out, lse};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> banded_attn_backward(
      Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int64_t window_left,
      int64_t window_right, std::vector<int64_t> dilation, std::optional<Tensor> attention_mask,
      std::optional<Tensor> global_attention_mask, bool causal, double scale, std::optional<Tensor> global_q,
      std::optional<Tensor> global_k, std::optional<Tensor> global_v, bool allow_tf32, int64_t q_offset,
      std::optional<Tensor> cu_seqlens, double softcap, std::optional<Tensor> alibi_slopes,
      std::optional<Tensor> sinks, std::optional<Tensor> grad_lse) {
    typename Backend::DeviceScope scope(q);
    Prepared prep = prepare(q, k, v, window_left, window_right, dilation, attention_mask, global_attention_mask,
                            causal, scale, allow_tf32, {q_offset, cu_seqlens, softcap, alibi_slopes, sinks});
    const bool projections = check_global_projections(global_q, global_k, global_v, q, k);
    check_heads_tensor(grad_out, "grad_out", q);
    check_heads_tensor(out, "out", q);
    const int64_t H = q.size(1);
    Tensor dq = zeros_heads(q), dk = zeros_heads(k), dv = zeros_heads(k);
    auto projection_grad = [&](const Tensor& like) {
      return projections ? zeros_heads(like) : empty_on(q, {0}, q.scalar_type());
    };
    Tensor dgq = projection_grad(q), dgk = projection_grad(k), dgv = projection_grad(k);
    Tensor dsinks = zero_(empty_on(q, {sinks ? H : 0}, accumulation_dtype(q.scalar_type())));
    if (!prep.tokens) return {dq, dk, dv, dgq, dgk, dgv, dsinks};
    Tensor lse_c = checked_lse(lse, q);
    std::optional<Tensor> grad_lse_c;
    if (grad_lse) grad_lse_c = checked_lse(*grad_lse, q, "grad_lse");
    AttentionCall& c = prep.call;
    AttentionParams& p = c.local;
    p.out = heads_view(out);
    p.grad_out = heads_view(grad_out);
    p.lse = lse_c.data_ptr();
    p.grad_lse = grad_lse_c ? grad_lse_c->const_data_ptr() : nullptr;
    p.grad_sinks = sinks ? dsinks.data_ptr() : nullptr;
    // Grouped KV heads: the kernels write one gradient slice per query head, summed per group below.
    p.grad_kv_per_query_head = p.heads_kv != H;
    auto per_query_head = [&](const Tensor& grad, const Tensor& like) {
      return p.grad_kv_per_query_head ? zeros_heads(like, H) : grad;
    };
    const Tensor dk_h = per_query_head(dk, k), dv_h = per_query_head(dv, k);
    p.grad_q = heads_view(dq);
    p.grad_k = heads_view(dk_h);
    p.grad_v = heads_view(dv_h);
    set_global_rows(c, global_q, global_k, global_v);
    std::optional<Tensor> dgk_h, dgv_h;
    if (projections) {
      dgk_h = per_query_head(dgk, k);
      dgv_h = per_query_head(dgv, k);
      c.global.grad_q = heads_view(dgq);
      c.global.grad_k = heads_view(*dgk_h);
      c.global.grad_v = heads_view(*dgv_h);
    }
    c.accumulate_global = !projections;  // same tensors: the global rows' dK, dV add to the local rows'
    const std::optional<Tensor> scratch = workspace(c, q, Backend::backward_workspace_bytes(c));
    Backend::backward(c, *prep.tokens);
    if (p.grad_kv_per_query_head) {
      Backend::sum_kv_groups(p, dk_h, dk);
      Backend::sum_kv_groups(p, dv_h, dv);
      if (projections) {
        Backend::sum_kv_groups(p, *dgk_h, dgk);
        Backend::sum_kv_groups(p, *dgv_h, dgv);
      }
    }
    return {dq, dk, dv, dgq, dgk, dgv, dsinks};
  }

  // Banded matmuls: `heads` is the [B, H, N, D] operand that fixes the shapes.
  static BandedMatmulParams banded_params(const Tensor& heads, int64_t window_left, int64_t window_right,
                                          const std::vector<int64_t>& dilation) {
    Backend::check_supported(heads, /*attention=*/false);
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

  static Tensor banded_matmul_qk(Tensor q, Tensor k, int64_t window_left, int64_t window_right,
                                 std::vector<int64_t> dilation, double fill) {
    typename Backend::DeviceScope scope(q);
    check_heads_tensor(q, "q", q);
    check_heads_tensor(k, "k", q);
    BandedMatmulParams p = banded_params(q, window_left, window_right, dilation);
    Tensor band = empty_on(q, {q.size(0), q.size(1), q.size(2), p.band_width()}, q.scalar_type());
    if (band.numel() == 0) return band;
    p.a = heads_view(q);
    p.b = heads_view(k);
    p.band = band.data_ptr();
    p.fill = fill;
    Backend::banded_matmul(BandedMatmulOp::kQK, p, q);
    return band;
  }

  template <bool kTransposed>
  static Tensor banded_matmul_band_times_heads(Tensor band, Tensor x, int64_t window_left, int64_t window_right,
                                               std::vector<int64_t> dilation) {
    typename Backend::DeviceScope scope(x);
    check_heads_tensor(x, kTransposed ? "x" : "v", x);
    BandedMatmulParams p = banded_params(x, window_left, window_right, dilation);
    check_band(band, x, p.band_width());
    Tensor band_c = as_contiguous(band);
    if (x.numel() == 0) return zeros_heads(x);
    Tensor out = output_heads(x);
    p.band = band_c.data_ptr();
    p.out = heads_view(out);
    (kTransposed ? p.a : p.b) = heads_view(x);
    Backend::banded_matmul(kTransposed ? BandedMatmulOp::kPVTransposed : BandedMatmulOp::kPV, p, x);
    return out;
  }
};

}  // namespace longformer

// Registers the glue for one backend under one dispatch key of one library namespace.
#define LONGFORMER_REGISTER_GLUE(ns, key, Backend)                                                                \
  STABLE_TORCH_LIBRARY_IMPL(ns, key, m) {                                                                         \
    using G = ::longformer::Glue<Backend>;                                                                        \
    m.impl("banded_attn", TORCH_BOX(&G::banded_attn));                                                            \
    m.impl("banded_attn_backward", TORCH_BOX(&G::banded_attn_backward));                                          \
    m.impl("banded_matmul_qk", TORCH_BOX(&G::banded_matmul_qk));                                                  \
    m.impl("banded_matmul_pv", TORCH_BOX(&G::template banded_matmul_band_times_heads<false>));                    \
    m.impl("banded_matmul_pv_transposed", TORCH_BOX(&G::template banded_matmul_band_times_heads<true>));          \
  }
