// The CUDA kernels behind the op glue (cuda_backend.h), on the current stream of the inputs'
// device (torch's accelerator API of the stable ABI), with every launch's error checked.
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>

#include "cuda_backend.h"

namespace longformer::cuda {

struct CudaDevice {
  static void* stream(const Tensor& t) {
    return torch::stable::accelerator::getCurrentStream(t.get_device_index()).nativeHandle();
  }

  static void check(int error, const char* op) {
    LONGFORMER_CHECK(error == 0, "longformer: CUDA launch of ", op, " failed: ",
                     cudaGetErrorString(static_cast<cudaError_t>(error)));
  }

  struct Scope {
    explicit Scope(const Tensor& t) : guard(t.get_device_index()) {}
    torch::stable::accelerator::DeviceGuard guard;
  };
};

}  // namespace longformer::cuda

LONGFORMER_REGISTER_GLUE(longformer, CUDA, longformer::cuda::CudaBackend<longformer::cuda::CudaDevice>)
