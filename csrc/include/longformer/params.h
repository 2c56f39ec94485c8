// Plain parameter block handed from the op glue to every kernel (CPU and CUDA alike).
// It holds raw pointers and int64 strides only, so kernels never see ATen types and all offset
// arithmetic is done in 64 bits (a [B, H, N, D] tensor may exceed 2^31 elements). The index
// helpers are the ones every kernel calls, on the host and (compiled by nvcc) on the device, so
// tests/cpp/offsets_test.cpp checks the arithmetic the GPU runs.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define LONGFORMER_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LONGFORMER_HOST_DEVICE inline
#endif

namespace longformer {

// Most heads an op takes. The per-head dilations travel inside the parameter blocks, by value: a
// CUDA kernel reads them from its arguments, so no op call copies them to the device (a host-to-
// device copy per call would synchronise the stream).
constexpr int64_t kMaxHeads = 256;

// Token roles, one byte per (batch, position): built from attention_mask / global_attention_mask.
enum Role : uint8_t { kPadding = 0, kLocal = 1, kGlobal = 2 };

// A [B, N] mask of any integer or bool dtype, read as raw elements (nonzero = set), strides in
// elements; data null: no mask (every element set). Masks are read as they are, never converted.
struct MaskView {
  const void* data = nullptr;
  int64_t stride_b = 0, stride_n = 0;
  int element_bytes = 1;

  LONGFORMER_HOST_DEVICE bool is_set(int64_t b, int64_t n) const {
    if (data == nullptr) return true;
    const unsigned char* e = static_cast<const unsigned char*>(data) + (b * stride_b + n * stride_n) * element_bytes;
    unsigned char any = 0;
    for (int i = 0; i < element_bytes; ++i) any |= e[i];
    return any != 0;
  }
};

// The role of token n of batch row b (docs/design.md §2): padding where attention_mask is 0, else
// global where global_attention_mask is set, else local (a padding token marked global is padding).
LONGFORMER_HOST_DEVICE Role token_role(const MaskView& attention_mask, const MaskView& global_attention_mask,
                                       int64_t b, int64_t n) {
  if (!attention_mask.is_set(b, n)) return kPadding;
  return global_attention_mask.data != nullptr && global_attention_mask.is_set(b, n) ? kGlobal : kLocal;
}

// A [B, H, N, D] operand whose last dimension is contiguous.
struct RowMajorHeads {
  void* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_n = 0;

  // Element offset of row n of head h in batch b; int64 throughout so large tensors cannot wrap.
  LONGFORMER_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t n) const {
    return b * stride_b + h * stride_h + n * stride_n;
  }
};

// The general op (docs/design.md §2.2) in a parameter block. Queries and keys are indexed by
// *position*: key j is position j of the [0, seqlen) key sequence, query row i sits at position
// q_offset + i. q, out, grad_out, grad_q and lse are [.., queries, ..]; the helpers below turn a
// position into their row. With grouped KV heads, query head h reads KV head kv_head(h).
struct AttentionParams {
  int64_t batch = 0, heads = 0, seqlen = 0, head_dim = 0;  // seqlen: keys (Nk), the positions
  int64_t queries = 0;                  // Nq <= seqlen: query rows
  int64_t q_offset = 0;                 // position of query row 0, in [0, seqlen - queries]
  int64_t heads_kv = 0;                 // KV heads of k, v (global_k, global_v): heads % heads_kv == 0
  // Grouped KV heads in the backward: grad_k, grad_v hold one [B, H, seqlen, D] slice per *query*
  // head (summed over each group afterwards, in a fixed order), so no two tasks write one row.
  bool grad_kv_per_query_head = false;

  RowMajorHeads q, k, v, out;           // forward operands
  RowMajorHeads grad_out;               // backward: incoming gradient
  RowMajorHeads grad_q, grad_k, grad_v; // backward: results

  // Log-sum-exp per row, [B, H, queries] contiguous, in the accumulation dtype; -inf where a row
  // has no key.
  void* lse = nullptr;

  // Packed sequences: cu_seqlens[0, segments] (host memory on the CPU), positions
  // [cu_seqlens[s], cu_seqlens[s + 1]) of batch row 0 form sequence s; null: each batch row is one.
  const int64_t* cu_seqlens = nullptr;
  int64_t segments = 0;
  // Score modifiers, in this order: softcap > 0 caps s to softcap * tanh(s / softcap); alibi_slopes
  // [H] subtracts slope_h * |position distance|; sinks [H] add one logit with a zero value to each
  // row's softmax. Both [H] arrays are in the accumulation dtype; null: not used.
  double softcap = 0.0;
  const void* alibi_slopes = nullptr;
  const void* sinks = nullptr;
  // Backward only: the incoming gradient of lse ([B, H, queries], accumulation dtype; null: none),
  // and the sinks' gradient [H] (accumulation dtype) when sinks are given.
  const void* grad_lse = nullptr;
  void* grad_sinks = nullptr;

  const uint8_t* roles = nullptr;       // [B, N] contiguous, values of Role
  int32_t dilation[kMaxHeads] = {};     // [H] used, each >= 1 (by value, see kMaxHeads)
  int64_t max_dilation = 1;             // largest entry of dilation (grid sizes)
  int64_t window_left = 0, window_right = 0;
  bool causal = false;
  double scale = 1.0;

  LONGFORMER_HOST_DEVICE int64_t lse_offset(int64_t b, int64_t h, int64_t n) const {
    return (b * heads + h) * queries + n;
  }
  // The element offset of the query row at `position` (q, out, grad_out, grad_q, or any
  // [B, H, queries, D] operand t), and of the lse entry of that row.
  LONGFORMER_HOST_DEVICE int64_t query_offset(const RowMajorHeads& t, int64_t b, int64_t h, int64_t position) const {
    return t.offset(b, h, position - q_offset);
  }
  LONGFORMER_HOST_DEVICE int64_t lse_position_offset(int64_t b, int64_t h, int64_t position) const {
    return lse_offset(b, h, position - q_offset);
  }
  LONGFORMER_HOST_DEVICE int64_t kv_head(int64_t h) const { return h / (heads / heads_kv); }
  LONGFORMER_HOST_DEVICE bool is_query(int64_t position) const {
    return position >= q_offset && position < q_offset + queries;
  }
  // The key sequence holding `position`: [0, seqlen), or with packed sequences the one of
  // cu_seqlens around it (a binary search; empty sequences hold no position).
  struct Span {
    int64_t start, end;
  };
  LONGFORMER_HOST_DEVICE Span sequence_of(int64_t position) const {
    if (cu_seqlens == nullptr) return {0, seqlen};
    int64_t lo = 0, hi = segments;  // cu_seqlens[lo] <= position < cu_seqlens[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      (cu_seqlens[mid] <= position ? lo : hi) = mid;
    }
    return {cu_seqlens[lo], cu_seqlens[hi]};
  }
  // Plain Longformer attention (docs/design.md §2): none of the general op's arguments in use (the
  // lse's gradient aside, which only changes the backward's row terms). The tiled CUDA kernels'
  // plain instantiations take these calls; the local rows' kernels take the others in their
  // kGeneral instantiations (csrc/cuda/*_mma.cu).
  LONGFORMER_HOST_DEVICE bool is_longformer_only() const {
    return heads_kv == heads && queries == seqlen && cu_seqlens == nullptr && softcap == 0.0 &&
           alibi_slopes == nullptr && sinks == nullptr;
  }
  // The head index of grad_k, grad_v (and the global projections' gradients) for query head h.
  LONGFORMER_HOST_DEVICE int64_t grad_kv_head(int64_t h) const {
    return grad_kv_per_query_head ? h : kv_head(h);
  }
  // With causal attention no band slot to the right of the diagonal is ever valid.
  LONGFORMER_HOST_DEVICE int64_t effective_right() const { return causal ? 0 : window_right; }
};

// Operands of the unfused banded matmuls: `band` is [B, H, N, left + right + 1] contiguous.
struct BandedMatmulParams {
  int64_t batch = 0, heads = 0, seqlen = 0, head_dim = 0;
  RowMajorHeads a, b, out;  // the [B, H, N, D] operands / result (which ones depends on the op)
  void* band = nullptr;
  int32_t dilation[kMaxHeads] = {};  // [H] used, by value as in AttentionParams
  int64_t max_dilation = 1;
  int64_t window_left = 0, window_right = 0;
  double fill = 0.0;        // banded_matmul_qk: value written to slots whose key is outside [0, N)

  LONGFORMER_HOST_DEVICE int64_t band_width() const { return window_left + window_right + 1; }
  LONGFORMER_HOST_DEVICE int64_t band_offset(int64_t b, int64_t h, int64_t n) const {
    return ((b * heads + h) * seqlen + n) * band_width();
  }
};

}  // namespace longformer
