// Entry points of the CPU kernels, instantiated for every storage dtype of
// LONGFORMER_CPU_FOR_EACH_DTYPE. They take plain parameter blocks (longformer/params.h);
// the op glue (longformer/glue.h, through ops_cpu.cpp) turns tensors into those.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "longformer/params.h"

// The storage dtypes of the CPU kernels, with their names in error messages: the one list that
// the kernel sources instantiate and ops_cpu.cpp checks and dispatches over. float and double are
// computed in their own dtype; the half-precision types (float16, bfloat16) share one path:
// converted to float on load, accumulated in float, rounded back on store (acc_type in
// tile_math.h).
#define LONGFORMER_CPU_FOR_EACH_DTYPE(X) \
  X(float, "float32") X(double, "float64") X(c10::Half, "float16") X(c10::BFloat16, "bfloat16")

// The kernel sources are compiled once per instruction set, each into its own namespace
// (CPU_CAPABILITY = DEFAULT, AVX2, AVX512; the same scheme as ATen's at::vec). A kernel source sees
// the declarations of its own set; ops_cpu.cpp sees all of them and picks one at run time.
#define LONGFORMER_CPU_KERNELS                                                                       \
  /* out, lse of the local rows (global and padding rows: 0 and -inf). */                           \
  template <typename scalar_t> void banded_attention_forward(const AttentionParams& p);              \
  /* The backward's row terms, before the two backward kernels: `delta` ([B, H, Nq] scratch in */   \
  /* the accumulation dtype) = rowsum(grad_out * out) - grad_lse; and grad_sinks when p has sinks. */ \
  template <typename scalar_t> void backward_row_terms(const AttentionParams& p, void* delta);        \
  /* grad_q, grad_k, grad_v (zero-initialised) of the local rows from grad_out, the forward lse */   \
  /* and delta. */                                                                                   \
  template <typename scalar_t> void banded_attention_backward(const AttentionParams& p, const void* delta); \
  /* Grouped KV heads: out [B, H_kv, N, D] = per_query_head [B, H, N, D] summed over each group. */  \
  template <typename scalar_t>                                                                       \
  void sum_kv_groups(const AttentionParams& p, RowMajorHeads per_query_head, RowMajorHeads out);     \
  /* Rows of global queries over all real keys (q, k, v of p are the global projections when */   \
  /* the op has them); writes those rows of out and lse only. */                                   \
  template <typename scalar_t> void global_attention_forward(const AttentionParams& p);              \
  /* Their gradients: grad_q at the global rows; grad_k, grad_v written, or with `accumulate` */    \
  /* added to what they hold (the local rows' gradients, when both share q, k, v). */               \
  template <typename scalar_t>                                                                       \
  void global_attention_backward(const AttentionParams& p, const void* delta, bool accumulate);     \
  /* Unfused banded products (formulas in ops.cpp). */                                               \
  template <typename scalar_t> void banded_matmul_qk(const BandedMatmulParams& p);                   \
  template <typename scalar_t> void banded_matmul_pv(const BandedMatmulParams& p);                   \
  template <typename scalar_t> void banded_matmul_pv_transposed(const BandedMatmulParams& p);

namespace longformer::cpu {
#ifdef CPU_CAPABILITY
inline namespace CPU_CAPABILITY { LONGFORMER_CPU_KERNELS }
#else
namespace DEFAULT { LONGFORMER_CPU_KERNELS }
#ifdef LONGFORMER_CPU_AVX2
namespace AVX2 { LONGFORMER_CPU_KERNELS }
#endif
#ifdef LONGFORMER_CPU_AVX512
namespace AVX512 { LONGFORMER_CPU_KERNELS }
#endif
#endif
}  // namespace longformer::cpu

#undef LONGFORMER_CPU_KERNELS
