// The CPU kernels (kernels.h) behind the op glue (longformer/glue.h), on the CPU tensors' memory.
// Launches run on torch's thread pool (tile_math.h) and return when done.
#include "capability.h"
#include "kernels.h"
#include "longformer/glue.h"

#include <string>
#include <vector>

namespace longformer::cpu {
namespace {

// The kernels of one instruction set, for one dtype.
template <typename scalar_t>
struct KernelTable {
  void (*banded_forward)(const AttentionParams&);
  void (*row_terms)(const AttentionParams&, void*);
  void (*banded_backward)(const AttentionParams&, const void*);
  void (*sum_kv_groups)(const AttentionParams&, RowMajorHeads, RowMajorHeads);
  void (*global_forward)(const AttentionParams&);
  void (*global_backward)(const AttentionParams&, const void*, bool);
  void (*qk)(const BandedMatmulParams&);
  void (*pv)(const BandedMatmulParams&);
  void (*pv_transposed)(const BandedMatmulParams&);
};

#define LONGFORMER_KERNEL_TABLE(isa)                                                                      \
  KernelTable<scalar_t> {                                                                               \
    &isa::banded_attention_forward<scalar_t>, &isa::backward_row_terms<scalar_t>,                       \
        &isa::banded_attention_backward<scalar_t>, &isa::sum_kv_groups<scalar_t>,                       \
        &isa::global_attention_forward<scalar_t>, &isa::global_attention_backward<scalar_t>,            \
        &isa::banded_matmul_qk<scalar_t>, &isa::banded_matmul_pv<scalar_t>,                             \
        &isa::banded_matmul_pv_transposed<scalar_t>                                                     \
  }

// The widest instruction set that is both compiled in and runs on this CPU (capability.h).
template <typename scalar_t>
KernelTable<scalar_t> kernels() {
  [[maybe_unused]] const Capability capability = cpu_capability();
#ifdef LONGFORMER_CPU_AVX512
  if (capability == Capability::kAVX512) return LONGFORMER_KERNEL_TABLE(AVX512);
#endif
#ifdef LONGFORMER_CPU_AVX2
  if (capability >= Capability::kAVX2) return LONGFORMER_KERNEL_TABLE(AVX2);
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

// Calls f(scalar_t{}) with the storage type of `dtype`, one of LONGFORMER_CPU_FOR_EACH_DTYPE
// (raises for any other).
template <typename F>
void dispatch_dtype(ScalarType dtype, F&& f) {
#define LONGFORMER_CASE(T, name)                     \
  if (dtype == c10::CppTypeToScalarType<T>::value) { \
    f(T{});                                          \
    return;                                          \
  }
  LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_CASE)
#undef LONGFORMER_CASE
  LONGFORMER_CHECK(false, "longformer: CPU kernels support ", cpu_dtype_names(), ", got ", dtype);
}

// The packed sequences' bounds as int64 on the host, checked: rising from 0 to N, never decreasing.
std::vector<int64_t> read_cu_seqlens(const Tensor& cu, int64_t n) {
  std::vector<int64_t> bounds(cu.size(0));
  for (int64_t s = 0; s < cu.size(0); ++s) {
    const int64_t at = s * cu.stride(0);
    bounds[s] = cu.scalar_type() == ScalarType::Int ? cu.const_data_ptr<int32_t>()[at] : cu.const_data_ptr<int64_t>()[at];
  }
  bool rising = bounds.front() == 0 && bounds.back() == n;
  for (size_t s = 1; s < bounds.size(); ++s) rising = rising && bounds[s - 1] <= bounds[s];
  LONGFORMER_CHECK(rising, "longformer: cu_seqlens must rise from 0 to N = ", n, " (never decreasing)");
  return bounds;
}

struct CpuBackend {
  static constexpr bool kZeroFilledOutputs = false;  // every kernel writes every element of its output

  struct DeviceScope {
    explicit DeviceScope(const Tensor&) {}
  };

  static void check_supported(const Tensor& q, bool /*attention*/) {
    dispatch_dtype(q.scalar_type(), [](auto) {});
  }

  struct Tokens {
    Tensor roles;                      // [B, N] uint8
    std::vector<int64_t> cu_seqlens;   // the packed sequences' bounds, read once (empty: none)
  };

  static Tokens prepare_tokens(const Tensor& q, const MaskView& attention, const MaskView& global,
                               const std::optional<Tensor>& cu_seqlens, AttentionParams& p) {
    Tokens t{empty_on(q, {p.batch, p.seqlen}, ScalarType::Byte), {}};
    uint8_t* roles = t.roles.mutable_data_ptr<uint8_t>();
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t n = 0; n < p.seqlen; ++n) roles[b * p.seqlen + n] = token_role(attention, global, b, n);
    }
    p.roles = roles;
    if (cu_seqlens) {
      t.cu_seqlens = read_cu_seqlens(*cu_seqlens, p.seqlen);
      p.cu_seqlens = t.cu_seqlens.data();
      p.segments = static_cast<int64_t>(t.cu_seqlens.size()) - 1;
    }
    return t;
  }

  static int64_t forward_workspace_bytes(const AttentionCall&) { return 0; }

  // The local rows (global rows 0, lse -inf), then the global rows into the same out and lse.
  static void forward(const AttentionCall& c, const Tokens&) {
    dispatch_dtype(c.dtype, [&](auto t) {
      kernels<decltype(t)>().banded_forward(c.local);
      if (c.has_global_rows) kernels<decltype(t)>().global_forward(c.global);
    });
  }

  // delta = rowsum(dO * O) - dlse in the accumulation dtype, [B, H, Nq]: written by the row terms,
  // read by both backward kernels.
  static int64_t backward_workspace_bytes(const AttentionCall& c) {
    const int64_t rows = c.local.batch * c.local.heads * c.local.queries;
    return rows * (c.dtype == ScalarType::Double ? sizeof(double) : sizeof(float));
  }

  static void backward(const AttentionCall& c, const Tokens&) {
    dispatch_dtype(c.dtype, [&](auto t) {
      const auto table = kernels<decltype(t)>();
      table.row_terms(c.local, c.workspace);
      table.banded_backward(c.local, c.workspace);
      if (c.has_global_rows) table.global_backward(c.global, c.workspace, c.accumulate_global);
    });
  }

  static void sum_kv_groups(const AttentionParams& p, const Tensor& per_query_head, const Tensor& out) {
    dispatch_dtype(out.scalar_type(),
                   [&](auto t) { kernels<decltype(t)>().sum_kv_groups(p, heads_view(per_query_head), heads_view(out)); });
  }

  static void banded_matmul(BandedMatmulOp op, const BandedMatmulParams& p, const Tensor& heads) {
    dispatch_dtype(heads.scalar_type(), [&](auto t) {
      const auto table = kernels<decltype(t)>();
      switch (op) {
        case BandedMatmulOp::kQK: return table.qk(p);
        case BandedMatmulOp::kPV: return table.pv(p);
        case BandedMatmulOp::kPVTransposed: return table.pv_transposed(p);
      }
    });
  }
};

}  // namespace
}  // namespace longformer::cpu

LONGFORMER_REGISTER_GLUE(longformer, CPU, longformer::cpu::CpuBackend)
