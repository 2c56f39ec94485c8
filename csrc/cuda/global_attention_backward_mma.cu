// Tiled backward of the rows of global queries (fp16 / bf16 on tensor cores, head dims up to 128;
// fp32 on FMA tiles, head dims up to 64; fp32 accumulation; mma_tiles.h) (p.q/k/v are the global
// projections when the op has them). With p_gj = exp(scale * q_g . k_j - lse_g), dP_gj = dO_g . v_j
// and delta_g = dO_g . O_g (the workspace's delta, from global_attention.cu's delta kernel):
//   dQ_g = scale * sum_j p_gj (dP_gj - delta_g) k_j   over every real key j of global row g
//   dK_j = scale * sum_g p_gj (dP_gj - delta_g) q_g,  dV_j = sum_g p_gj dO_g   over the global rows g
// * global_dq_mma_kernel: the work items of the forward (global_split.h: 64 gathered global rows,
//   one chunk of keys; the same key tiles through KeyTilePipeline). Per tile S = Q K^T and
//   dP = dO V^T, P = exp2(S scale log2e - lse log2e), dS = P (dP - delta), dQ += dS K. With one
//   chunk per row the block writes the rows' dQ; else the chunk's unscaled partial, which the SIMT
//   combine kernel of global_attention.cu sums in chunk order.
// * global_dkdv_mma_kernel: a block per 64 consecutive key positions (every real key, local or
//   global) of a (b, h), walking the batch row's global rows as query tiles (KeyTilePipeline with
//   kQueryRows, global tiles only): S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q. The
//   result is written, or added to the local rows' part when the global rows share k and v with
//   them.
// One owner per output tile: deterministic, no atomics. Excluded rows are zero in shared memory.
//
// The general op's arguments run in a second instantiation of each kernel (kGeneral), as for the
// local rows (banded_attention_backward_mma.cu): only the global rows among the queries are rows
// (dQ) or query tiles (dK/dV), indexed by position (indexed_by_position), a pair sees only its own
// packed sequence, P goes through softcap and ALiBi and dS takes the cap's derivative
// (mma_tiles::TileModifiers).
#include <cstdint>

#include "global_split.h"
#include "mma_backward.h"

namespace longformer::cuda {
namespace {

using namespace mma_tiles;

template <typename T, int DP, bool kGeneral>
__global__ void LONGFORMER_MMA_BOUNDS(T, kGeneral) global_dq_mma_kernel(const AttentionParams p, const GlobalKeys gk,
                                                                      const SplitShape split, const float* delta,
                                                                      float* partials, bool vec) {
  using S = BwdTiles<T, DP, false, kGeneral>;
  constexpr int kPitch = Rows<T, DP>::kPitch;
  const int64_t N = p.seqlen, D = p.head_dim;
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  TileElem<T>* sQ = reinterpret_cast<TileElem<T>*>(smem + S::kAOffset);
  TileElem<T>* sdO = reinterpret_cast<TileElem<T>*>(smem + S::kBOffset);
  int64_t* query_pos = reinterpret_cast<int64_t*>(smem + S::kRowPosOffset);
  unsigned char* query_ok = smem + S::kRowOkOffset;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const int64_t row_tiles = global_row_tiles(p, gk);

  for (int64_t item = blockIdx.x;; item += gridDim.x) {  // block-uniform loop
    RowTileItem it;
    const ItemState state = decode_row_tile_item(p, gk, split, item, row_tiles, it);
    if (state == ItemState::kPastLastTile) break;  // block-uniform; no barrier follows the loop
    if (state == ItemState::kIdle) continue;       // block-uniform
    const int64_t* index = gk.index + it.b * N;
    const uint8_t* roles = p.roles + it.b * N;
    const float* lse = static_cast<const float*>(p.lse) + p.lse_offset(it.b, it.h, 0);
    typename S::Tiles keys;
    keys.setup_band(p, p.k, p.v, it.b, it.h, 0, 1, it.key_begin, it.key_end, N, p.causal ? 0 : N, index,
                    it.c == 0 ? it.count : 0, vec, smem);
    // The tile's global rows with a key (finite lse); the others get no gradient.
    stage_rows<T, DP>(it.b, it.h, D, p.q, sQ, &p.grad_out, sdO, vec, query_ok, query_pos, [&](int row, int64_t& pos) {
      pos = row < it.rows ? index[it.g0 + row] : 0;
      return row < it.rows && roles[pos] == kGlobal && (!kGeneral || p.is_query(pos)) && lse[pos] != -INFINITY;
    });
    cp_async_commit();
    keys.issue(0);
    cp_async_wait<1>();  // the rows landed (key tile 0 may still be in flight)
    __syncthreads();

    const ThreadRows rows = gathered_rows(query_pos, query_ok, it.rows);
    float lse_log2[2], row_delta[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      lse_log2[i] = rows.ok[i] ? lse[rows.pos[i]] * kLog2e : 0.0f;
      row_delta[i] = rows.ok[i] ? delta[p.lse_offset(it.b, it.h, rows.pos[i])] : 0.0f;
    }
    const OperandFragments<T, DP, S::kOperandsInRegisters> qf(sQ + warp * 16 * kPitch, lane);
    const OperandFragments<T, DP, S::kOperandsInRegisters> dof(sdO + warp * 16 * kPitch, lane);
    float dq[DP / 8][4] = {};
    if constexpr (kGeneral) {
      const TileModifiers mods(p, it.h);
      const RowPositions positions{{rows.pos[0], rows.pos[1]}};
      const int t = lane & 3;
      keys.run(rows, [&](const TileElem<T>* sK, const TileElem<T>* sV, int stage, auto allowed) {
        accumulate_dq_tile<T, DP, S::kBlockK, true>(dq, qf, dof, sK, sV, lse_log2, row_delta, scale_log2, allowed,
                                                    lane, mods, positions, keys.key_pos(stage) + 2 * t);
      });
    } else {
      keys.run(rows, [&](const TileElem<T>* sK, const TileElem<T>* sV, int, auto allowed) {
        accumulate_dq_tile<T, DP, S::kBlockK>(dq, qf, dof, sK, sV, lse_log2, row_delta, scale_log2, allowed, lane);
      });
    }

    if (it.chunks == 1) {
      store_rows<T, DP>(dq, p.grad_q, it.b, it.h, rows.pos, rows.ok, D, static_cast<float>(p.scale), false, lane);
    } else {  // the chunk's unscaled partial, for the rows with a key
      const int t = lane & 3;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (!rows.ok[i]) continue;
        const int slot = warp * 16 + (lane >> 2) + 8 * i;
        float* part = partials + ((it.bh * split.rows) + (it.g0 + slot) * it.chunks + it.c) * D;
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
          const int col = 8 * n + 2 * t;
          if (col < D) part[col] = dq[n][2 * i];
          if (col + 1 < D) part[col + 1] = dq[n][2 * i + 1];
        }
      }
    }
    __syncthreads();  // the block's next item restages its rows and key tiles
  }
}

template <typename T, int DP, bool kGeneral>
__global__ void LONGFORMER_MMA_BOUNDS(T, kGeneral) global_dkdv_mma_kernel(const AttentionParams p, const GlobalKeys gk,
                                                                        const float* delta, bool accumulate,
                                                                        bool vec) {
  using S = BwdTiles<T, DP, true, kGeneral>;
  constexpr int kPitch = Rows<T, DP>::kPitch;
  const int64_t N = p.seqlen, D = p.head_dim;
  const int64_t tiles = ceil_div(N, kBlockRows);
  const int64_t linear = int64_t{blockIdx.x} + int64_t{blockIdx.y} * int64_t{gridDim.x};
  if (linear >= p.batch * p.heads * tiles) return;
  const int64_t b = linear / (p.heads * tiles), h = (linear / tiles) % p.heads, s0 = (linear % tiles) * kBlockRows;
  const int64_t count = gk.count[b];
  if (count == 0) return;  // block-uniform: no global row, nothing to add (or the zeros stay)

  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  TileElem<T>* sK = reinterpret_cast<TileElem<T>*>(smem + S::kAOffset);
  TileElem<T>* sV = reinterpret_cast<TileElem<T>*>(smem + S::kBOffset);
  unsigned char* key_ok = smem + S::kRowOkOffset;
  const uint8_t* roles = p.roles + b * N;
  // The tiles are the batch row's global queries (no band tiles); a key is seen by every global
  // query (at or after it when causal, which the pipeline's global tiles check).
  typename S::Tiles queries;
  queries.setup_band(p, p.q, p.grad_out, b, h, 0, 1, 0, 0, 0, 0, gk.index + b * N, count, vec, smem);
  queries.lse = static_cast<const float*>(p.lse);
  queries.delta = delta;

  stage_rows<T, DP>(b, h, D, p.k, sK, &p.v, sV, vec, key_ok, nullptr, [&](int row, int64_t& pos) {
    pos = s0 + row;
    return pos < N && roles[pos] != kPadding;
  });
  cp_async_commit();
  queries.issue(0);
  cp_async_wait<1>();
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const ThreadRows rows = thread_rows(s0, 0, 1, key_ok);
  const OperandFragments<T, DP, S::kOperandsInRegisters> kf(sK + warp * 16 * kPitch, lane);
  const OperandFragments<T, DP, S::kOperandsInRegisters> vf(sV + warp * 16 * kPitch, lane);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  float dk[DP / 8][4] = {}, dv[DP / 8][4] = {};

  accumulate_dkdv<T, DP, kGeneral>(dk, dv, kf, vf, queries, rows, p, h, scale_log2, lane);
  store_rows<T, DP>(dk, p.grad_k, b, h, rows.pos, rows.ok, D, static_cast<float>(p.scale), accumulate, lane);
  store_rows<T, DP>(dv, p.grad_v, b, h, rows.pos, rows.ok, D, 1.0f, accumulate, lane);
}

// Both kernels index the global rows, their lse and delta by position (indexed_by_position).
template <typename T, int DP, bool kGeneral>
int launch_global_backward_mma(const AttentionParams& call, const GlobalKeys& g, const SplitShape& split,
                               void* workspace, bool accumulate, void* stream) {
  const AttentionParams p = indexed_by_position(call, sizeof(TileElem<T>));
  const float* delta = static_cast<const float*>(workspace) - call.q_offset;
  float* partials = static_cast<float*>(workspace) + p.batch * p.heads * p.seqlen;
  const RowMajorHeads* operands[] = {&call.q, &call.k, &call.v, &call.grad_out};
  const bool vec = rows_are_16_byte_aligned<T>(p.head_dim, operands, 4);
  auto dq = global_dq_mma_kernel<T, DP, kGeneral>;
  auto dkdv = global_dkdv_mma_kernel<T, DP, kGeneral>;
  const int64_t dq_bytes = BwdTiles<T, DP, false, kGeneral>::kSmemBytes;
  const int64_t dkdv_bytes = BwdTiles<T, DP, true, kGeneral>::kSmemBytes;
  if (const int err = allow_shared_bytes(dq, dq_bytes)) return err;
  if (const int err = allow_shared_bytes(dkdv, dkdv_bytes)) return err;
  const int64_t items = p.batch * p.heads * ceil_div(p.seqlen, kRowTile) * split.max_chunks;
  if (const int err = LONGFORMER_LAUNCH(dq, dim3(static_cast<unsigned>(min_i64(items, kMmaGridCap))),
                                        dim3(kThreads, 1, 1), static_cast<int>(dq_bytes), stream, p, g, split, delta,
                                        partials, vec))
    return err;
  dim3 grid;
  if (!grid_for_blocks(p.batch * p.heads * ceil_div(p.seqlen, kBlockRows), grid)) return 1;  // cudaErrorInvalidValue
  return LONGFORMER_LAUNCH(dkdv, grid, dim3(kThreads, 1, 1), static_cast<int>(dkdv_bytes), stream, p, g, delta,
                           accumulate, vec);
}

}  // namespace

bool global_attention_backward_mma_supports(const AttentionParams& p, DType dtype) {
  if (!tiled_arguments(p)) return false;
  if (dtype == DType::kFloat32 || dtype == DType::kFloat32Tf32) return float_backward_fits(p.head_dim);
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && p.head_dim <= 128;
}

int global_attention_backward_mma(const AttentionParams& p, const GlobalKeys& g, const SplitShape& split,
                                  void* workspace, DType dtype, bool accumulate, void* stream) {
  return launch_tiled<128>(p, dtype, [&](auto shape) {
    using S = decltype(shape);
    return launch_global_backward_mma<typename S::T, S::DP, S::kGeneral>(p, g, split, workspace, accumulate, stream);
  });
}

}  // namespace longformer::cuda
