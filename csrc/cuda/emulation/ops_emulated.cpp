// The CUDA kernels compiled for the host (emulation/host_cuda.h) behind the same glue as the CUDA
// build (cuda_backend.h), as the op library `longformer_emulated` on CPU tensors. Tests call
// torch.ops.longformer_emulated.* side by side with torch.ops.longformer.* and the oracle; it is
// how the CUDA kernel source is verified on machines without a GPU. Launches run synchronously.
#include "cuda_backend.h"
#include "longformer/schemas.h"

namespace longformer::cuda {

struct EmulatedDevice {
  static void* stream(const Tensor&) { return nullptr; }

  static void check(int error, const char* op) {
    LONGFORMER_CHECK(error == 0, "longformer: emulated launch of ", op, " failed with error ", error);
  }

  struct Scope {
    explicit Scope(const Tensor& t) {
      LONGFORMER_CHECK(t.is_cpu(), "longformer_emulated: the host emulation takes CPU tensors, got ", t.device());
    }
  };
};

}  // namespace longformer::cuda

STABLE_TORCH_LIBRARY(longformer_emulated, m) { longformer::define_schemas(m); }

LONGFORMER_REGISTER_GLUE(longformer_emulated, CPU, longformer::cuda::CudaBackend<longformer::cuda::EmulatedDevice>)
