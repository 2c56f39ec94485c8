// What the tiled backward kernels share (banded_attention_backward_mma.cu for the local rows,
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
template <typename T, int DP, bool kQueryTiles, bool kGeneral = false>
struct BwdTiles {
  static_assert(DP == 32 || DP == 64 || DP == 128, "the tiled backward takes head dims up to 128");
  // 16-bit tiles: up to D = 64 the block's two operands live in registers as A fragments and
  // tiles hold 64 rows. At 128 the two accumulators alone (dK and dV) take 128 registers: the
  // operands are re-read from shared memory per tile and tiles hold 32 rows for dQ, 16 for dK/dV
  // (with 32, ptxas spilled 16-32 bytes there). Float tiles hold 32 rows, 16 for dK/dV at DP = 64
  // and for both at 128 (with more the dK/dV kernels took 228-254 registers at DP <= 64): 37-69
  // KiB of shared memory per block up to DP = 64, 100 KiB at 128, which only GPUs that allow a
  // block more than 99 KiB run (sm_80, sm_90; see float_backward_fits).
  static constexpr int kFloatRows = DP == 128 || (DP == 64 && kQueryTiles) ? 16 : 32;
  // The general op's dK/dV kernels (kGeneral: score modifiers per element, each row's sequence)
  // take 32 rows at DP = 64 (with 64, ptxas spilled 48-56 bytes).
  static constexpr int kHalfRows = DP <= 64 ? (kQueryTiles && kGeneral ? 32 : 64) : (kQueryTiles ? 16 : 32);
  static constexpr int kBlockK = kFloatTiles<T> ? kFloatRows : kHalfRows;
  static constexpr bool kOperandsInRegisters = DP <= 64;
  using Tiles = KeyTilePipeline<T, DP, kBlockK, kQueryTiles, kGeneral>;
  static constexpr int64_t kAOffset = Tiles::kBytes;
  static constexpr int64_t kBOffset = kAOffset + Rows<T, DP>::bytes(kBlockRows);
  static constexpr int64_t kRowPosOffset = kBOffset + Rows<T, DP>::bytes(kBlockRows);
  static constexpr int64_t kRowOkOffset = kRowPosOffset + int64_t{kBlockRows} * 8;
  static constexpr int64_t kSmemBytes = kRowOkOffset + kBlockRows;
};

// One key tile of a dQ kernel (a warp's 16 query rows, fragments qf of Q and dof of dO): S = Q K^T,
// dP = dO V^T, P = exp2(S scale log2e - lse log2e) where allowed (else 0: never 0 * x),
// dS = P (dP - delta), dQ += dS K. lse_log2 / row_delta are this thread's two rows'. kGeneral: the
// scores go through `mods` (TileModifiers: the rows' positions `rows`, the tile's key positions
// from this lane's first column `lane_keys`) and dS takes the softcap's derivative, so that it is
// the gradient of the scaled score.
template <typename T, int DP, int kBlockK, bool kGeneral = false, typename Fragments, typename Allowed>
__device__ __forceinline__ void accumulate_dq_tile(float (&dq)[DP / 8][4], const Fragments& qf, const Fragments& dof,
                                                   const TileElem<T>* sK, const TileElem<T>* sV,
                                                   const float (&lse_log2)[2], const float (&row_delta)[2],
                                                   float scale_log2, Allowed&& allowed, int lane,
                                                   TileModifiers mods = {}, RowPositions rows = {},
                                                   const int64_t* lane_keys = nullptr) {
  constexpr int kNT = kBlockK / 8;
  float s[kNT][4] = {}, dp[kNT][4] = {};
  warp_times_rows_transposed<T, DP, kNT>(s, qf, sK, lane);
  warp_times_rows_transposed<T, DP, kNT>(dp, dof, sV, lane);
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e >> 1, c = 8 * j + (e & 1);
      if constexpr (kGeneral) {
        float t;
        const float x = mods.log2_score(s[j][e], rows.pos[i], lane_keys[c], t);
        const float pv = allowed(i, c) ? exp2f(x - lse_log2[i]) : 0.0f;
        s[j][e] = pv * (dp[j][e] - row_delta[i]) * (mods.capped ? 1.0f - t * t : 1.0f);  // dS
      } else {
        const float pv = allowed(i, c) ? exp2f(s[j][e] * scale_log2 - lse_log2[i]) : 0.0f;
        s[j][e] = pv * (dp[j][e] - row_delta[i]);  // dS
      }
    }
  }
  warp_accumulate_rows<T, DP, kBlockK>(dq, s, sK, lane);
}

// One query tile of a dK/dV kernel (a warp's 16 key rows, fragments kf of K and vf of V; the tile's
// queries staged from q and grad_out with their lse and delta in `tiles`' stage): S^T = K Q^T,
// dP^T = V dO^T, P^T and dS^T as in accumulate_dq_tile, dV += P^T dO, dK += dS^T Q. kGeneral: as
// there, `rows` being this thread's key rows and the queries' positions those of the stage.
template <typename T, int DP, bool kGeneral = false, typename Tiles, typename Fragments, typename Allowed>
__device__ __forceinline__ void accumulate_dkdv_tile(float (&dk)[DP / 8][4], float (&dv)[DP / 8][4],
                                                     const Fragments& kf, const Fragments& vf, const Tiles& tiles,
                                                     const TileElem<T>* sQ, const TileElem<T>* sdO, int stage,
                                                     float scale_log2, Allowed&& allowed, int lane,
                                                     TileModifiers mods = {}, RowPositions rows = {}) {
  constexpr int kNT = Tiles::kTileRows / 8;
  float st[kNT][4] = {}, dpt[kNT][4] = {};
  warp_times_rows_transposed<T, DP, kNT>(st, kf, sQ, lane);
  warp_times_rows_transposed<T, DP, kNT>(dpt, vf, sdO, lane);
  // This lane's query columns 2t + c: their lse (log2 units) and delta.
  const float* lane_lse = tiles.values(stage, 0) + 2 * (lane & 3);
  const float* lane_delta = tiles.values(stage, 1) + 2 * (lane & 3);
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e >> 1, c = 8 * j + (e & 1);
      if constexpr (kGeneral) {
        float t;
        const float x = mods.log2_score(st[j][e], tiles.key_pos(stage)[2 * (lane & 3) + c], rows.pos[i], t);
        const float pv = allowed(i, c) ? exp2f(x - lane_lse[c]) : 0.0f;
        st[j][e] = pv;                                                                            // P^T
        dpt[j][e] = pv * (dpt[j][e] - lane_delta[c]) * (mods.capped ? 1.0f - t * t : 1.0f);  // dS^T
      } else {
        const float pv = allowed(i, c) ? exp2f(st[j][e] * scale_log2 - lane_lse[c]) : 0.0f;
        st[j][e] = pv;                                  // P^T
        dpt[j][e] = pv * (dpt[j][e] - lane_delta[c]);  // dS^T
      }
    }
  }
  warp_accumulate_rows<T, DP, Tiles::kTileRows>(dv, st, sdO, lane);
  warp_accumulate_rows<T, DP, Tiles::kTileRows>(dk, dpt, sQ, lane);
}

// A dK/dV kernel's walk: accumulate_dkdv_tile over every query tile that `queries` stages for this
// thread's key rows `rows` of head h. The general instantiation takes head h's score modifiers and
// the key rows' positions.
template <typename T, int DP, bool kGeneral, typename Tiles, typename Fragments>
__device__ __forceinline__ void accumulate_dkdv(float (&dk)[DP / 8][4], float (&dv)[DP / 8][4], const Fragments& kf,
                                                const Fragments& vf, Tiles& queries, const ThreadRows& rows,
                                                const AttentionParams& p, int64_t h, float scale_log2, int lane) {
  if constexpr (kGeneral) {
    const TileModifiers mods(p, h);
    const RowPositions positions{{rows.pos[0], rows.pos[1]}};
    queries.run(rows, [&](const TileElem<T>* sQ, const TileElem<T>* sdO, int stage, auto allowed) {
      accumulate_dkdv_tile<T, DP, true>(dk, dv, kf, vf, queries, sQ, sdO, stage, scale_log2, allowed, lane, mods,
                                        positions);
    });
  } else {
    queries.run(rows, [&](const TileElem<T>* sQ, const TileElem<T>* sdO, int stage, auto allowed) {
      accumulate_dkdv_tile<T, DP>(dk, dv, kf, vf, queries, sQ, sdO, stage, scale_log2, allowed, lane);
    });
  }
}

// Writes this thread's part of a 16 x DP accumulator tile (rows g and g + 8 of its warp) to the
// `dst` rows of (b, h) at row_pos, times `scale`, for the rows with row_ok; with `accumulate` added
// to what those rows hold (in fp32, one rounding).
template <typename T, int DP>
__device__ __forceinline__ void store_rows(const float (&acc)[DP / 8][4], const RowMajorHeads& dst, int64_t b,
                                           int64_t h, const int64_t (&row_pos)[2], const bool (&row_ok)[2],
                                           int64_t D, float scale, bool accumulate, int lane) {
  const int t = lane & 3;
  TileElem<T>* base = static_cast<TileElem<T>*>(dst.data);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!row_ok[i]) continue;
    TileElem<T>* out = base + dst.offset(b, h, row_pos[i]);
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * n + 2 * t + e;
        if (col >= D) continue;
        const float value = acc[n][2 * i + e] * scale;
        out[col] = float_to_elem<T>(accumulate ? elem_to_float<T>(out[col]) + value : value);
      }
    }
  }
}

// Whether the float tiled backward fits the current GPU for this head dim: always up to 64; at
// 65-128 only where a block may have the 100 KiB its DP = 128 kernels take (else SIMT).
inline bool float_backward_fits(int64_t head_dim) {
  if (head_dim <= 64) return true;
  if (head_dim > 128) return false;
  const int64_t bytes = BwdTiles<float, 128, false>::kSmemBytes > BwdTiles<float, 128, true>::kSmemBytes
                            ? BwdTiles<float, 128, false>::kSmemBytes
                            : BwdTiles<float, 128, true>::kSmemBytes;
  return max_shared_bytes_per_block() >= bytes;
}

}  // namespace longformer::cuda::mma_tiles
