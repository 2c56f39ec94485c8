// Tensor-core matrix multiply-accumulate (mma.sync m16n8k16 for f16/bf16 and m16n8k8 for TF32,
// row.col, fp32 accumulation) behind a wrapper, plus the packing helpers the fragments need.
//
// Why a wrapper: the host emulation (emulation/host_cuda.h) runs kernel source on the CPU and cannot
// execute inline PTX. Under LONGFORMER_HOST_EMULATION the same call gathers the 32 lanes' fragments
// with __shfl_sync, following the fragment layouts of the PTX ISA ("Matrix fragments for
// mma.m16n8k16 with floating point type"), and computes each lane's part of D in fp32. So a fragment
// indexing mistake in a kernel gives wrong results in the emulated tests exactly as it would on a GPU.
//
// Fragment layouts (groupID g = lane >> 2, threadID_in_group t = lane % 4); every 32-bit register
// holds two 16-bit elements, the lower column/row index in the low half:
//   A (16x16, row-major): a[0] = A[g][2t..2t+1]     a[1] = A[g+8][2t..2t+1]
//                         a[2] = A[g][2t+8..2t+9]   a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, "col": B[k][n] with k fastest): b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C, D (16x8, fp32):    c[0], c[1] = C[g][2t], C[g][2t+1]    c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
// Note that the C/D layout of two adjacent n-tiles (16x16) equals the A layout, which is what lets a
// flash-attention kernel feed its probabilities P (a C fragment of S = Q K^T) straight back as the A
// operand of P V without a trip through shared memory.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device.h"

namespace longformer::cuda {

// ---------------------------------------------------------------------------------------------
// 16-bit element helpers (tensors are handled as raw 16-bit patterns in shared memory so that the
// kernels never do arithmetic on __half / __nv_bfloat16 values themselves).

template <typename T>
__host__ __device__ __forceinline__ uint16_t float_to_bits(float x) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "16-bit types only");
  if constexpr (std::is_same_v<T, __half>) {
    return __half_as_ushort(__float2half_rn(x));
  } else {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
}

template <typename T>
__host__ __device__ __forceinline__ float bits_to_float(uint16_t x) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "16-bit types only");
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(x));
  } else {
    return __bfloat162float(__ushort_as_bfloat16(x));
  }
}

// Two 16-bit patterns into one fragment register; `lo` is the element with the lower index.
__host__ __device__ __forceinline__ uint32_t pack_bits(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Two floats rounded (to nearest even) into one f16x2 / bf16x2 register; `lo` goes to the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_f32x2(float lo, float hi) {
#ifdef LONGFORMER_HOST_EMULATION
  return pack_bits(float_to_bits<T>(lo), float_to_bits<T>(hi));
#else
  // One cvt.rn.{f16x2,bf16x2}.f32 instead of two conversions and a permute.
  if constexpr (std::is_same_v<T, __half>) {
    __half2 v = __floats2half2_rn(lo, hi);  // .x = lo is the low half
    uint32_t r;
    memcpy(&r, &v, sizeof(r));
    return r;
  } else {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, sizeof(r));
    return r;
  }
#endif
}

// 32-bit load from a 16-bit shared-memory array (4-byte aligned). On the host a memcpy keeps the
// emulated build free of strict-aliasing assumptions; on the device it is a plain LDS.32.
__device__ __forceinline__ uint32_t load_u32(const uint16_t* p) {
#ifdef LONGFORMER_HOST_EMULATION
  uint32_t r;
  std::memcpy(&r, p, sizeof(r));
  return r;
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: four 8x8 matrices of 16-bit elements from shared
// memory. Lane l gives the address of row (l % 8) of matrix (l / 8) (16 contiguous bytes, 16-byte
// aligned). Register m of lane i (g = i / 4, t = i % 4) receives from matrix m:
//   plain:  elements [g][2t], [g][2t+1]      (a B fragment when matrix rows are the n index)
//   .trans: elements [2t][g], [2t+1][g]      (a B fragment when matrix rows are the k index)
// One instruction replaces four 32-bit (plain) or eight 16-bit (.trans) shared loads per lane.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const uint16_t* row_address) {
#ifndef LONGFORMER_HOST_EMULATION
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  // volatile: it reads shared memory, so it must stay between the barriers around it.
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#else
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = static_cast<int>((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u);
  const int g = lane >> 2, t = lane & 3;
  for (int m = 0; m < 4; ++m) {  // every lane takes part in every shuffle
    if constexpr (kTrans) {
      const uint16_t* row0 = __shfl_sync(kFull, row_address, 8 * m + 2 * t);
      const uint16_t* row1 = __shfl_sync(kFull, row_address, 8 * m + 2 * t + 1);
      r[m] = pack_bits(row0[g], row1[g]);
    } else {
      const uint16_t* row = __shfl_sync(kFull, row_address, 8 * m + g);
      r[m] = pack_bits(row[2 * t], row[2 * t + 1]);
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// d = a * b + c for one warp; a: 16x16, b: 16x8 (f16 or bf16), c, d: 16x8 fp32. Every lane of the
// warp must call it (it is a warp-collective operation, like mma.sync itself).

#ifndef LONGFORMER_HOST_EMULATION

template <typename T>
__device__ __forceinline__ void mma_m16n8k16_f32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 / bf16 only");
  // Not volatile: the instruction has no side effects, so the compiler may schedule it freely.
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  }
}

// d = a * b + c for one warp with TF32 inputs (mma.sync m16n8k8 .tf32); a: 16x8, b: 8x8, c, d:
// 16x8 fp32, elements from float_to_tf32. Fragment layouts (PTX ISA, "Matrix fragments for
// mma.m16n8k8" with .tf32), one element per register:
//   A: a[0] = A[g][t]   a[1] = A[g+8][t]   a[2] = A[g][t+4]   a[3] = A[g+8][t+4]
//   B: b[0] = B[t][g]   b[1] = B[t+4][g]
//   C, D: as for m16n8k16.
__device__ __forceinline__ void mma_m16n8k8_tf32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

// fp32 to TF32 (cvt.rna.tf32.f32: 10 mantissa bits, round to nearest with ties away from zero), as
// the 32-bit register the mma takes.
__device__ __forceinline__ uint32_t float_to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

#else  // LONGFORMER_HOST_EMULATION

namespace mma_detail {
// Lane of the calling thread within its warp (threads are numbered x fastest, as on the GPU).
inline int lane_id() {
  const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return static_cast<int>(linear & 31u);
}
}  // namespace mma_detail

template <typename T>
inline void mma_m16n8k16_f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 / bf16 only");
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = mma_detail::lane_id();
  const int g = lane >> 2, t = lane & 3;

  // This lane produces D rows g and g+8, columns 2t and 2t+1. It needs rows g and g+8 of A, which
  // lanes 4g..4g+3 hold (all four registers), and columns 2t and 2t+1 of B, which lanes
  // 4*(2t)+u and 4*(2t+1)+u (u = 0..3) hold. Every lane takes part in every shuffle.
  float arow[2][16];  // arow[0] = A[g][:], arow[1] = A[g+8][:]
  for (int u = 0; u < 4; ++u) {
    for (int reg = 0; reg < 4; ++reg) {
      const uint32_t v = __shfl_sync(kFull, a[reg], 4 * g + u);
      const int row = reg & 1;                   // a[1], a[3]: row g+8
      const int col = 2 * u + ((reg >> 1) * 8);  // a[2], a[3]: columns +8
      arow[row][col] = bits_to_float<T>(static_cast<uint16_t>(v & 0xffffu));
      arow[row][col + 1] = bits_to_float<T>(static_cast<uint16_t>(v >> 16));
    }
  }
  float bcol[2][16];  // bcol[e] = B[:][2t+e]
  for (int e = 0; e < 2; ++e) {
    for (int u = 0; u < 4; ++u) {
      for (int reg = 0; reg < 2; ++reg) {
        const uint32_t v = __shfl_sync(kFull, b[reg], 4 * (2 * t + e) + u);
        const int k = 2 * u + reg * 8;  // b[1]: rows (k) +8
        bcol[e][k] = bits_to_float<T>(static_cast<uint16_t>(v & 0xffffu));
        bcol[e][k + 1] = bits_to_float<T>(static_cast<uint16_t>(v >> 16));
      }
    }
  }
  // Products of two f16/bf16 values are exact in fp32; the sum is taken in a fixed order (k = 0..15,
  // then c), so emulated results are deterministic. (The hardware's internal order and rounding of
  // the sum are unspecified; tests compare with tolerances, not bitwise.)
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = i >> 1, col = i & 1;
    float acc = 0.0f;
    for (int k = 0; k < 16; ++k) acc += arow[row][k] * bcol[col][k];
    out[i] = acc + c[i];
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];  // d may alias c
}

// The rounding of cvt.rna.tf32.f32 on the bit pattern: adding half of the dropped 13 bits' unit
// rounds the magnitude half up, i.e. ties away from zero; inf and NaN pass unchanged.
inline uint32_t float_to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;
  return u & 0xffffe000u;
}

inline void mma_m16n8k8_tf32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = mma_detail::lane_id();
  const int g = lane >> 2, t = lane & 3;
  // Rows g and g+8 of A from lanes 4g..4g+3; columns 2t and 2t+1 of B from lanes 4(2t+e)+u.
  float arow[2][8];
  for (int u = 0; u < 4; ++u) {
    for (int reg = 0; reg < 4; ++reg) {
      const uint32_t v = __shfl_sync(kFull, a[reg], 4 * g + u);
      std::memcpy(&arow[reg & 1][u + 4 * (reg >> 1)], &v, sizeof(v));
    }
  }
  float bcol[2][8];
  for (int e = 0; e < 2; ++e) {
    for (int u = 0; u < 4; ++u) {
      for (int reg = 0; reg < 2; ++reg) {
        const uint32_t v = __shfl_sync(kFull, b[reg], 4 * (2 * t + e) + u);
        std::memcpy(&bcol[e][u + 4 * reg], &v, sizeof(v));
      }
    }
  }
  // Products of two TF32 values are exact in fp32; the sum runs in a fixed order (k = 0..7, then c).
  float out[4];
  for (int i = 0; i < 4; ++i) {
    float acc = 0.0f;
    for (int k = 0; k < 8; ++k) acc += arow[i >> 1][k] * bcol[i & 1][k];
    out[i] = acc + c[i];
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

#endif  // LONGFORMER_HOST_EMULATION

}  // namespace longformer::cuda
