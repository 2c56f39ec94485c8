// The workspace of the local rows' backward (banded_attention_backward.cu) and how the dK/dV of the
// global keys from the local rows is split over chunks of queries, shared by the SIMT partial
// kernel there and the tensor-core one (banded_attention_backward_mma.cu), which write the same
// partials for the same combine kernel.
//
// Workspace: delta [B*H*N], then (256-byte aligned) partials [B*H][N][2*D], both in the
// accumulation dtype. A (b, h) has N partial slots; each of its count global keys gets
// chunks_per_global(count, N) of them (slot g * chunks + c: dK times scale, then dV), chunk c
// covering queries [c * ceil(N / chunks), ...) of the batch row.
#pragma once

#include <cstdint>

#include "device.h"
#include "launchers.h"

namespace longformer::cuda {

constexpr int64_t kChunkRows = 512;  // smallest query chunk worth its own block

template <typename A>
__host__ __device__ __forceinline__ A* delta_of(void* workspace) {
  return static_cast<A*>(workspace);
}
template <typename A>
__host__ __device__ __forceinline__ A* partials_of(const AttentionParams& p, void* workspace) {
  const int64_t offset = ceil_div(p.batch * p.heads * p.seqlen * static_cast<int64_t>(sizeof(A)), 256) * 256;
  return reinterpret_cast<A*>(static_cast<unsigned char*>(workspace) + offset);
}

// Chunks per global key when a batch row has `count` of them: the partials of all fit in N slots.
__host__ __device__ __forceinline__ int64_t chunks_per_global(int64_t count, int64_t n) {
  if (count <= 0) return 1;
  return max_i64(1, min_i64(n / count, ceil_div(n, kChunkRows)));
}

}  // namespace longformer::cuda
