// The CUDA kernels compiled for the host (emulation/host_cuda.h) behind the same glue as the CUDA
// build, as the op library `longformer_emulated` on CPU tensors. Tests call
// torch.ops.longformer_emulated.* side by side with torch.ops.longformer.* and the oracle; it is
// how the CUDA kernel source is verified on machines without a GPU. Launches run synchronously.
#include <torch/library.h>

#include <stdexcept>

#include "longformer/schemas.h"

namespace longformer::cuda {

inline void* glue_stream(const at::Tensor&) { return nullptr; }

inline void glue_check(int error, const char* op) {
  TORCH_CHECK(error == 0, "longformer: emulated launch of ", op, " failed with error ", error);
}

struct GlueDeviceGuard {
  explicit GlueDeviceGuard(const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), "longformer_emulated: the host emulation takes CPU tensors, got ", t.device());
  }
};

}  // namespace longformer::cuda

#include "ops_glue.h"

TORCH_LIBRARY(longformer_emulated, m) { longformer::define_schemas(m); }

LONGFORMER_REGISTER_GLUE(longformer_emulated, CPU)
