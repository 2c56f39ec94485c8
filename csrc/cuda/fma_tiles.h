// The two warp-level tile products of mma_tiles.h for float32 tiles, on FMA instead of tensor
// cores: exact fp32 (every product and sum rounded as in IEEE single precision, no TF32), with the
// inputs and outputs in the same per-thread layout as the mma C fragments (mma.h: this thread holds
// rows g and g + 8 of its warp's 16 rows, columns 8j + 2t and 8j + 2t + 1 of every n-tile j). So the
// float32 kernels share every line outside the products with the float16/bfloat16 ones: the key-tile
// pipeline, its masks, the online softmax and the stores.
//
// Register tiling: a thread computes 2 rows x (2 columns per n-tile) of each product; one 16-byte
// shared load of an operand row feeds four FMAs per output element it meets, and the row reductions
// of a dot product stay inside the thread (no shuffle per pair). The only shuffles are in P B, where
// the four lanes of a quad exchange their columns of P (one shuffle per 8 keys, row and lane).
//
// Shared-memory rows are kPitch = DP + 4 floats apart: row r starts at bank 4r (mod 32), so the
// 8 rows g of a warp's A loads, the 4 rows 2t + c of its B loads and the 4 column pairs 2t of its
// row-major loads each hit distinct banks.
#pragma once

#include <cstring>

#include "device.h"

namespace longformer::cuda::fma_tiles {

constexpr unsigned kFull = 0xffffffffu;

struct alignas(16) Float4 {
  float x, y, z, w;
};
struct alignas(8) Float2 {
  float x, y;
};

// 16- and 8-byte shared-memory loads (the address aligned to match): one LDS.128 / LDS.64 on the
// device; a memcpy on the host keeps the emulated build free of aliasing assumptions.
template <typename V>
__device__ __forceinline__ V load_vector(const float* p) {
#ifdef LONGFORMER_HOST_EMULATION
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#else
  return *reinterpret_cast<const V*>(p);
#endif
}
__device__ __forceinline__ Float4 load4(const float* p) { return load_vector<Float4>(p); }
__device__ __forceinline__ Float2 load2(const float* p) { return load_vector<Float2>(p); }

__device__ __forceinline__ float dot4(float acc, const Float4& a, const Float4& b) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// acc[j][e] += A[r_e] . B[8j + 2t + (e & 1)] over the DP columns, where r_e = g + 8 (e >> 1), A's 16
// rows start at a_rows and B's rows at b_rows (both kPitch floats apart): S = Q K^T, dP = dO V^T.
template <int DP, int kNT, int kPitch>
__device__ __forceinline__ void times_rows_transposed(float (&acc)[kNT][4], const float* a_rows, const float* b_rows,
                                                      int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float* a0 = a_rows + g * kPitch;
  const float* a1 = a0 + 8 * kPitch;
  const float* b = b_rows + 2 * t * kPitch;
#pragma unroll 1
  for (int col = 0; col < DP; col += 4) {
    const Float4 x0 = load4(a0 + col), x1 = load4(a1 + col);
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const Float4 y = load4(b + (8 * j + c) * kPitch + col);
        acc[j][c] = dot4(acc[j][c], x0, y);
        acc[j][2 + c] = dot4(acc[j][2 + c], x1, y);
      }
    }
  }
}

// acc[n][e] += sum_k P[r_e][k] B[k][8n + 2t + (e & 1)] over the kRows rows k of B (row-major at
// b_rows, kPitch floats apart), where P (16 x kRows) is given as C fragments p[j][e] = P[r_e][8j +
// 2t + (e & 1)]: O = P V, dQ = dS K, dV = P^T dO, dK = dS^T Q. Every lane of the warp must call it.
template <int DP, int kRows, int kPitch>
__device__ __forceinline__ void times_rows(float (&acc)[DP / 8][4], const float (&p)[kRows / 8][4],
                                           const float* b_rows, int lane) {
  const int t = lane & 3, quad = lane & ~3;
  const float* b = b_rows + 2 * t;
#pragma unroll
  for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll 1
    for (int src = 0; src < 4; ++src) {
      // Lane `src` of the quad holds P of keys 8j + 2 src + c (c = 0, 1) for rows g and g + 8.
      float pk[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) pk[e] = __shfl_sync(kFull, p[j][e], quad | src);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float* row = b + (8 * j + 2 * src + c) * kPitch;
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
          const Float2 y = load2(row + 8 * n);
          acc[n][0] = fmaf(pk[c], y.x, acc[n][0]);
          acc[n][1] = fmaf(pk[c], y.y, acc[n][1]);
          acc[n][2] = fmaf(pk[2 + c], y.x, acc[n][2]);
          acc[n][3] = fmaf(pk[2 + c], y.y, acc[n][3]);
        }
      }
    }
  }
}

}  // namespace longformer::cuda::fma_tiles
