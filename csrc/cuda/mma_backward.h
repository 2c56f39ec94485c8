// What the tensor-core backward kernels share (banded_attention_backward_mma.cu for the local rows,
// global_attention_backward_mma.cu for the global rows): the shape and shared memory of a block,
// and the store of an accumulator tile.
#pragma once

#include <cstdint>

#include "mma_tiles.h"

namespace longformer::cuda::mma_tiles {

constexpr float kLog2e = 1.4426950408889634f;

// Compile-time shape of one head-dim tile, and the shared memory of a block: the tile pipeline
// (key tiles for dQ, query tiles for dK/dV), then the block's own 64 rows of two operands (dQ: q
// and grad_out; dK/dV: k and v), their flags and their positions.
template <int DP, bool kQueryTiles>
struct BwdTiles {
  static_assert(DP == 32 || DP == 64 || DP == 128, "the tensor-core backward takes head dims up to 128");
  // Up to D = 64 the block's two operands live in registers as A fragments and tiles hold 64 rows.
  // At 128 the two accumulators alone (dK and dV) take 128 registers: the operands are re-read
  // from shared memory per tile and tiles hold 32 rows for dQ, 16 for dK/dV (with 32, ptxas
  // spilled 16-32 bytes there).
  static constexpr int kBlockK = DP <= 64 ? 64 : (kQueryTiles ? 16 : 32);
  static constexpr bool kOperandsInRegisters = DP <= 64;
  using Tiles = KeyTilePipeline<DP, kBlockK, kQueryTiles>;
  static constexpr int64_t kAOffset = Tiles::kBytes;
  static constexpr int64_t kBOffset = kAOffset + Rows<DP>::bytes(kBlockRows);
  static constexpr int64_t kRowPosOffset = kBOffset + Rows<DP>::bytes(kBlockRows);
  static constexpr int64_t kRowOkOffset = kRowPosOffset + int64_t{kBlockRows} * 8;
  static constexpr int64_t kSmemBytes = kRowOkOffset + kBlockRows;
};

// Writes this thread's part of a 16 x DP accumulator tile (rows g and g + 8 of its warp) to the
// `dst` rows of (b, h) at row_pos, times `scale`, for the rows with row_ok; with `accumulate` added
// to what those rows hold (in fp32, one rounding).
template <typename T, int DP>
__device__ __forceinline__ void store_rows(const float (&acc)[DP / 8][4], const RowMajorHeads& dst, int64_t b,
                                           int64_t h, const int64_t (&row_pos)[2], const bool (&row_ok)[2],
                                           int64_t D, float scale, bool accumulate, int lane) {
  const int t = lane & 3;
  uint16_t* base = static_cast<uint16_t*>(dst.data);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!row_ok[i]) continue;
    uint16_t* out = base + head_row_offset(dst, b, h, row_pos[i]);
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * n + 2 * t + e;
        if (col >= D) continue;
        const float value = acc[n][2 * i + e] * scale;
        out[col] = float_to_bits<T>(accumulate ? bits_to_float<T>(out[col]) + value : value);
      }
    }
  }
}

}  // namespace longformer::cuda::mma_tiles
