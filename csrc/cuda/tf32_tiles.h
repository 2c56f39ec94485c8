// The two warp-level tile products of mma_tiles.h for float32 tiles on tensor cores as TF32 (the
// opt-in of torch.backends.cuda.matmul.allow_tf32): mma.sync m16n8k8 .tf32 with fp32 accumulation,
// every operand element rounded to TF32 (10 mantissa bits) as it is loaded, outputs in the mma C
// fragments that the exact FMA products (fma_tiles.h) also produce.
//
// Shared-memory rows are the float tiles' (kPitch = DP + 4 floats): the A and B fragment loads of
// Q K^T (row 8j + g, column 8ks + t) hit 32 distinct banks; those of P B (row 8kk + t, column
// 8n + g) are 2-way conflicted, which a pitch of DP + 8 would move to the other product.
#pragma once

#include "device.h"
#include "mma.h"

namespace longformer::cuda::tf32_tiles {

constexpr unsigned kFull = 0xffffffffu;

// acc[j][e] += A[r_e] . B[8j + 2t + (e & 1)] over the DP columns (r_e = g + 8 (e >> 1)), A's 16 rows
// at a_rows and B's rows at b_rows, kPitch floats apart: S = Q K^T, dP = dO V^T.
template <int DP, int kNT, int kPitch>
__device__ __forceinline__ void times_rows_transposed(float (&acc)[kNT][4], const float* a_rows, const float* b_rows,
                                                      int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float* a0 = a_rows + g * kPitch + t;  // A[g][t]; row g + 8 is 8 rows down
  const float* b0 = b_rows + g * kPitch + t;  // B row 8j + g, column t
#pragma unroll 1
  for (int col = 0; col < DP; col += 8) {
    const uint32_t a[4] = {float_to_tf32(a0[col]), float_to_tf32(a0[8 * kPitch + col]), float_to_tf32(a0[col + 4]),
                           float_to_tf32(a0[8 * kPitch + col + 4])};
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const float* b = b0 + 8 * j * kPitch + col;
      const uint32_t bb[2] = {float_to_tf32(b[0]), float_to_tf32(b[4])};
      mma_m16n8k8_tf32(acc[j], a, bb, acc[j]);
    }
  }
}

// acc[n] += P B for the DP / 8 n-tiles of B's columns, where P (16 x kRows) is given as C fragments
// p[j][e] = P[r_e][8j + 2t + (e & 1)] and B's kRows rows are at b_rows: O = P V, dQ = dS K,
// dV = P^T dO, dK = dS^T Q. The A fragment of keys 8kk.. needs P[r][8kk + t] and P[r][8kk + t + 4],
// which lanes t / 2 and 2 + t / 2 of the quad hold (element t % 2): eight shuffles per 8 keys.
// Every lane of the warp must call it.
template <int DP, int kRows, int kPitch>
__device__ __forceinline__ void times_rows(float (&acc)[DP / 8][4], const float (&p)[kRows / 8][4],
                                           const float* b_rows, int lane) {
  const int g = lane >> 2, t = lane & 3, quad = lane & ~3;
  const int low = quad | (t >> 1), high = quad | (2 + (t >> 1));
  const bool odd = (t & 1) != 0;
#pragma unroll
  for (int kk = 0; kk < kRows / 8; ++kk) {
    float x[4], y[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[e] = __shfl_sync(kFull, p[kk][e], low);
      y[e] = __shfl_sync(kFull, p[kk][e], high);
    }
    const uint32_t a[4] = {float_to_tf32(odd ? x[1] : x[0]), float_to_tf32(odd ? x[3] : x[2]),
                           float_to_tf32(odd ? y[1] : y[0]), float_to_tf32(odd ? y[3] : y[2])};
    const float* b = b_rows + (8 * kk + t) * kPitch + g;  // B[8kk + t][g]; row + 4 is 4 rows down
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
      const uint32_t bb[2] = {float_to_tf32(b[8 * n]), float_to_tf32(b[4 * kPitch + 8 * n])};
      mma_m16n8k8_tf32(acc[n], a, bb, acc[n]);
    }
  }
}

}  // namespace longformer::cuda::tf32_tiles
