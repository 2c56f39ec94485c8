// What every kernel file in csrc/cuda includes instead of the CUDA headers. Compiled by nvcc it is
// the CUDA runtime plus a few helpers; compiled by g++ with LONGFORMER_HOST_EMULATION it is the
// host emulation of the CUDA execution model (emulation/host_cuda.h), so the same kernel source
// runs on a CPU in tests. Kernel files therefore use only what this header and mma.h provide:
//   threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncwarp, __shfl_sync, __shfl_xor_sync,
//   __shfl_down_sync, __ballot_sync, __any_sync, __all_sync, atomicAdd (float/double/int),
//   static __shared__ arrays, dynamic shared memory through dynamic_shared_memory<T>(),
//   __half/__nv_bfloat16 with __float2half_rn/__half2float/__float2bfloat16_rn/__bfloat162float and
//   __half_as_ushort/__ushort_as_half/__bfloat16_as_ushort/__ushort_as_bfloat16,
//   <cmath> functions (expf, exp, logf, log, fmaxf, ...), INFINITY,
//   and launches through LONGFORMER_LAUNCH (never <<<...>>> directly).
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef LONGFORMER_HOST_EMULATION
#include "emulation/host_cuda.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// kernel<<<grid, block, shared_bytes, stream>>>(args...) followed by the launch's error code.
#define LONGFORMER_LAUNCH(kernel, grid, block, shared_bytes, stream, ...)                                      \
  (kernel<<<(grid), (block), (shared_bytes), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__), \
   static_cast<int>(cudaGetLastError()))

namespace longformer::cuda {
// Dynamic shared memory of the current block (sized by the launch's shared_bytes).
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char longformer_dynamic_smem[];
  return reinterpret_cast<T*>(longformer_dynamic_smem);
}

// The most dynamic shared memory a block of the current device may opt in to (99 KiB on sm_86 and
// sm_89, 163 KiB on sm_80, 227 KiB on sm_90); 0 if the device cannot be queried. A host-side
// attribute read: no synchronisation.
inline int64_t max_shared_bytes_per_block() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return 0;
  return bytes;
}

// Opting in to more than 48 KiB of dynamic shared memory; returns a cudaError_t value.
template <typename Kernel>
inline int allow_shared_bytes(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  return static_cast<int>(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}
}  // namespace longformer::cuda
#endif

namespace longformer::cuda {

__host__ __device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Accumulation type of a storage type: double for double, float for everything else.
template <typename T> struct Accumulate { using type = float; };
template <> struct Accumulate<double> { using type = double; };
template <typename T> using acc_t = typename Accumulate<T>::type;

__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__host__ __device__ __forceinline__ double to_float(double x) { return x; }
__host__ __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rounds an accumulator value to the storage type T (round to nearest even for the half types).
template <typename T, typename A>
__host__ __device__ __forceinline__ T from_acc(A x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

}  // namespace longformer::cuda
