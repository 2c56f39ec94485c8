// The CUDA kernels (launchers.h) as a backend of the op glue (longformer/glue.h), shared by the
// CUDA build (ops_cuda.cpp) and the host-emulated build of the same kernels
// (emulation/ops_emulated.cpp). They differ only in `Device`, a struct with
//   static void* stream(const Tensor& q);           the stream to launch on
//   static void check(int error, const char* op);  raises on a nonzero launcher result
//   struct Scope { explicit Scope(const Tensor& q); };  held for the call (device guard)
#pragma once

#include <cstdlib>
#include <cstring>

#include "kv_group_slices.h"
#include "launchers.h"
#include "longformer/glue.h"

namespace longformer::cuda {

constexpr int64_t kMaxHeadDim = 256;

inline DType kernel_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Double: return DType::kFloat64;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default:
      LONGFORMER_CHECK(false, "longformer: CUDA kernels support float32, float64, float16 and bfloat16, got ", t);
  }
  return DType::kFloat32;
}

// Whether the tiled kernels run (launchers.h; tensor cores for float16/bfloat16, FMA tiles for
// float32, each where its *_mma_supports allows): yes unless `variable` (LONGFORMER_CUDA_FORWARD,
// LONGFORMER_CUDA_BACKWARD) says simt (kept so the two paths can be compared on the same inputs;
// float64 always uses SIMT).
inline bool use_tiled_kernels(DType dtype, const char* variable) {
  if (dtype == DType::kFloat64) return false;
  const char* choice = std::getenv(variable);
  if (choice == nullptr || std::strcmp(choice, "mma") == 0 || std::strcmp(choice, "auto") == 0) return true;
  LONGFORMER_CHECK(std::strcmp(choice, "simt") == 0, "longformer: ", variable, " must be auto, mma or simt, got ",
                   choice);
  return false;
}

// The attention kernels' dtype: float32 becomes kFloat32Tf32 (its tiled products as TF32 on tensor
// cores) where the caller allows TF32 matmuls (the Python wrappers pass
// torch.backends.cuda.matmul.allow_tf32, which torch.set_float32_matmul_precision("high" /
// "medium") also sets; torch.compile guards on it).
inline DType attention_dtype(const AttentionCall& c) {
  const DType dtype = kernel_dtype(c.dtype);
  return dtype == DType::kFloat32 && c.allow_tf32 ? DType::kFloat32Tf32 : dtype;
}

inline int64_t storage_bytes(ScalarType t) {
  return t == ScalarType::Double ? 8 : t == ScalarType::Float ? 4 : 2;
}

// Grouped KV heads run on the tiled kernels as H / H_kv slices without grouping (kv_group_slices.h)
// where those kernels take the slices; otherwise the SIMT kernels run the call as it is.
inline bool runs_as_kv_group_slices(const AttentionCall& c, DType dtype, bool tiled, bool forward) {
  const AttentionParams& p = c.local;
  if (!tiled || p.heads_kv == p.heads) return false;
  // The slice as the kernels will see it: which per-head arrays it has is what matters here.
  const SliceArrays probe{p.lse, const_cast<void*>(p.grad_lse), const_cast<void*>(p.alibi_slopes),
                          const_cast<void*>(p.sinks), p.grad_sinks};
  const AttentionParams slice = kv_group_slice(p, 0, storage_bytes(c.dtype), probe);
  return forward ? banded_attention_forward_mma_supports(slice, dtype)
                 : banded_attention_backward_mma_supports(slice, dtype);
}

template <typename Device>
struct CudaBackend {
  static constexpr bool kZeroFilledOutputs = true;  // launchers.h: kernels write only the rows they compute
  using DeviceScope = typename Device::Scope;

  static void check_supported(const Tensor& q, bool attention) {
    kernel_dtype(q.scalar_type());
    LONGFORMER_CHECK(!attention || q.size(3) <= kMaxHeadDim, "longformer: CUDA kernels support head dims up to ",
                     kMaxHeadDim, ", got ", q.size(3));
  }

  // Token roles and the sorted global positions, prepared on the device from the masks as they are;
  // the packed sequences' bounds as int64 (cu_seqlens' values are checked by longformer_attention in
  // eager mode: reading them here would synchronise the stream).
  struct Tokens {
    Tensor roles;          // uint8 [B, N]
    Tensor global_tokens;  // int64 [B * N + B]: global_index [B, N], then global_count [B]
    std::optional<Tensor> cu_seqlens;  // int64 [S + 1]
    GlobalKeys globals;
    void* stream;          // the stream of q's device, for every launch of the call
  };

  static Tokens prepare_tokens(const Tensor& q, const MaskView& attention, const MaskView& global,
                               const std::optional<Tensor>& cu_seqlens, AttentionParams& p) {
    const int64_t B = p.batch, N = p.seqlen;
    Tensor roles = empty_on(q, {B, N}, ScalarType::Byte), global_tokens = empty_on(q, {B * N + B}, ScalarType::Long);
    int64_t* tokens = global_tokens.mutable_data_ptr<int64_t>();
    p.roles = roles.mutable_data_ptr<uint8_t>();
    Tokens t{roles, global_tokens, std::nullopt, GlobalKeys{tokens, tokens + B * N}, Device::stream(q)};
    Device::check(prepare_token_roles(attention, global, B, N, roles.mutable_data_ptr<uint8_t>(), tokens,
                                      tokens + B * N, t.stream),
                  "token roles");
    if (cu_seqlens) {
      const int64_t count = cu_seqlens->size(0);
      Tensor bounds = empty_on(q, {count}, ScalarType::Long);
      Device::check(copy_cu_seqlens(cu_seqlens->const_data_ptr(), static_cast<int>(cu_seqlens->element_size()),
                                    cu_seqlens->stride(0), count, bounds.mutable_data_ptr<int64_t>(), t.stream),
                    "cu_seqlens");
      p.cu_seqlens = bounds.const_data_ptr<int64_t>();
      p.segments = count - 1;
      t.cu_seqlens = bounds;
    }
    return t;
  }

  static int64_t forward_workspace_bytes(const AttentionCall& c) {
    return c.has_global_rows ? global_attention_forward_workspace_bytes(c.global, kernel_dtype(c.dtype)) : 0;
  }

  static void forward(const AttentionCall& c, const Tokens& t) {
    void* stream = t.stream;
    const DType storage = kernel_dtype(c.dtype), dtype = attention_dtype(c);
    const bool tiled = use_tiled_kernels(storage, "LONGFORMER_CUDA_FORWARD");
    if (runs_as_kv_group_slices(c, dtype, tiled, /*forward=*/true)) return forward_kv_group_slices(c, t, dtype);
    if (tiled && banded_attention_forward_mma_supports(c.local, dtype)) {
      Device::check(banded_attention_forward_mma(c.local, t.globals, dtype, stream), "banded_attn");
    } else {
      Device::check(banded_attention_forward_simt(c.local, t.globals, storage, stream), "banded_attn");
    }
    if (c.has_global_rows) {  // the global rows, into the same out and lse
      Device::check(global_attention_forward(c.global, t.globals, c.workspace, dtype, tiled, stream),
                    "banded_attn (global rows)");
    }
  }

  // The buffers of the slices of a grouped call (kv_group_slices.h), reused by every slice, and the
  // copies of its heads' part of the call's per-head arrays into them (before its launches) and of
  // what it computed back (after them).
  struct Slices {
    Tensor lse, grad_lse, slopes, sinks, grad_sinks;  // empty where the call has no such array
    SliceArrays arrays;

    Slices(const AttentionParams& p, const Tensor& like) {
      auto buffer = [&](bool used, int64_t count, Tensor& t) -> void* {
        t = empty_on(like, {used ? count : 0}, ScalarType::Float);
        return used ? t.data_ptr() : nullptr;
      };
      const int64_t rows = p.batch * p.heads_kv * p.queries;
      arrays.lse = buffer(true, rows, lse);
      arrays.grad_lse = buffer(p.grad_lse != nullptr, rows, grad_lse);
      arrays.alibi_slopes = buffer(p.alibi_slopes != nullptr, p.heads_kv, slopes);
      arrays.sinks = buffer(p.sinks != nullptr, p.heads_kv, sinks);
      arrays.grad_sinks = buffer(p.grad_sinks != nullptr, p.heads_kv, grad_sinks);
    }
    // The lse rows (the -inf the forward kernels expect; what the backward reads), the lse's
    // gradient, the slopes and the sinks of slice g's heads.
    void load(const AttentionParams& p, int64_t g, void* stream) const {
      copy(p, g, p.batch, p.queries, p.lse, arrays.lse, true, stream);
      copy(p, g, p.batch, p.queries, const_cast<void*>(p.grad_lse), arrays.grad_lse, true, stream);
      copy(p, g, 1, 1, const_cast<void*>(p.alibi_slopes), arrays.alibi_slopes, true, stream);
      copy(p, g, 1, 1, const_cast<void*>(p.sinks), arrays.sinks, true, stream);
    }
    // The forward's lse rows, or the backward's sinks' gradient, of slice g's heads.
    void store(const AttentionParams& p, int64_t g, bool forward, void* stream) const {
      if (forward) {
        copy(p, g, p.batch, p.queries, p.lse, arrays.lse, false, stream);
      } else {
        copy(p, g, 1, 1, p.grad_sinks, arrays.grad_sinks, false, stream);
      }
    }
    static void copy(const AttentionParams& p, int64_t g, int64_t batch, int64_t n, void* full, void* slice,
                     bool to_slice, void* stream) {
      if (full == nullptr) return;
      Device::check(copy_group_heads(p, g, batch, n, full, slice, to_slice, stream), "banded_attn (grouped KV heads)");
    }
  };

  // One slice of query heads after the other (kv_group_slices.h), local rows then global rows.
  static void forward_kv_group_slices(const AttentionCall& c, const Tokens& t, DType dtype) {
    const AttentionParams& p = c.local;
    const Slices slices(p, t.roles);
    const int64_t bytes = storage_bytes(c.dtype);
    for (int64_t g = 0; g < p.heads / p.heads_kv; ++g) {
      slices.load(p, g, t.stream);
      Device::check(banded_attention_forward_mma(kv_group_slice(p, g, bytes, slices.arrays), t.globals, dtype,
                                                 t.stream),
                    "banded_attn");
      if (c.has_global_rows) {
        Device::check(global_attention_forward(kv_group_slice(c.global, g, bytes, slices.arrays), t.globals,
                                               c.workspace, dtype, /*tiled=*/true, t.stream),
                      "banded_attn (global rows)");
      }
      slices.store(p, g, /*forward=*/true, t.stream);
    }
  }

  // One workspace for both launches: they run one after the other on the stream.
  static int64_t backward_workspace_bytes(const AttentionCall& c) {
    const DType storage = kernel_dtype(c.dtype);
    const int64_t local = banded_attention_backward_workspace_bytes(c.local, storage);
    return c.has_global_rows ? std::max(local, global_attention_backward_workspace_bytes(c.global, storage)) : local;
  }

  static void backward(const AttentionCall& c, const Tokens& t) {
    const DType dtype = attention_dtype(c);
    const bool tiled = use_tiled_kernels(kernel_dtype(c.dtype), "LONGFORMER_CUDA_BACKWARD");
    if (runs_as_kv_group_slices(c, dtype, tiled, /*forward=*/false)) return backward_kv_group_slices(c, t, dtype);
    backward_launches(c, c.local, c.global, t, dtype, tiled);
  }

  // The local rows, then the global rows, then the sinks' gradient from every row's delta, which
  // the two have left in the workspace (at the same place).
  static void backward_launches(const AttentionCall& c, const AttentionParams& local, const AttentionParams& global,
                                const Tokens& t, DType dtype, bool tiled) {
    Device::check(banded_attention_backward(local, t.globals, c.workspace, dtype, tiled, t.stream),
                  "banded_attn_backward");
    if (c.has_global_rows) {
      Device::check(global_attention_backward(global, t.globals, c.workspace, dtype, c.accumulate_global, tiled,
                                              t.stream),
                    "banded_attn_backward (global rows)");
    }
    Device::check(sinks_backward(local, c.workspace, kernel_dtype(c.dtype), t.stream), "banded_attn_backward (sinks)");
  }

  // As forward_kv_group_slices: each slice reads its heads' lse (and lse gradient, slopes, sinks)
  // from the slice buffers and writes other rows of the gradients (its heads' dQ and
  // per-query-head dK/dV), and its heads' sinks' gradient through a buffer.
  static void backward_kv_group_slices(const AttentionCall& c, const Tokens& t, DType dtype) {
    const AttentionParams& p = c.local;
    const Slices slices(p, t.roles);
    const int64_t bytes = storage_bytes(c.dtype);
    for (int64_t g = 0; g < p.heads / p.heads_kv; ++g) {
      slices.load(p, g, t.stream);
      backward_launches(c, kv_group_slice(p, g, bytes, slices.arrays), kv_group_slice(c.global, g, bytes, slices.arrays),
                        t, dtype, /*tiled=*/true);
      slices.store(p, g, /*forward=*/false, t.stream);
    }
  }

  static void sum_kv_groups(const AttentionParams& p, const Tensor& per_query_head, const Tensor& out) {
    Device::check(cuda::sum_kv_groups(p, heads_view(per_query_head), heads_view(out), kernel_dtype(out.scalar_type()),
                                      Device::stream(out)),
                  "banded_attn_backward (grouped KV heads)");
  }

  static void banded_matmul(BandedMatmulOp op, const BandedMatmulParams& p, const Tensor& heads) {
    const DType d = kernel_dtype(heads.scalar_type());
    void* stream = Device::stream(heads);
    switch (op) {
      case BandedMatmulOp::kQK: return Device::check(banded_matmul_qk(p, d, stream), "banded_matmul_qk");
      case BandedMatmulOp::kPV: return Device::check(banded_matmul_pv(p, d, stream), "banded_matmul_pv");
      case BandedMatmulOp::kPVTransposed:
        return Device::check(banded_matmul_pv_transposed(p, d, stream), "banded_matmul_pv_transposed");
    }
  }
};

}  // namespace longformer::cuda
