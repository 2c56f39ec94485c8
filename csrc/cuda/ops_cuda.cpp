// CUDA implementations of the longformer ops: the shared glue (ops_glue.h) on the current CUDA
// stream of the inputs' device, with every launch's error checked.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace longformer::cuda {

inline void* glue_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

inline void glue_check(int error, const char* op) {
  TORCH_CHECK(error == 0, "longformer: CUDA launch of ", op, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(error)));
}

struct GlueDeviceGuard {
  explicit GlueDeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};

}  // namespace longformer::cuda

#include "ops_glue.h"

LONGFORMER_REGISTER_GLUE(longformer, CUDA)
