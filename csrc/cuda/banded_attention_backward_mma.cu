// Tiled backward of the local rows (fp16 / bf16 on tensor cores, head dims up to 128; fp32 on FMA
// tiles, head dims up to 64; fp32 accumulation; mma_tiles.h): the two parts of
// banded_attention_backward.cu's local_rows_kernel, each with one owner per output tile
// (deterministic, no atomics). With p_ij = exp(scale * q_i . k_j - lse_i), dP_ij = dO_i . v_j and
// delta_i = dO_i . O_i (the workspace's delta, from delta_kernel):
//   dQ_i = scale * sum_j p_ij (dP_ij - delta_i) k_j   over the band keys and global keys of local row i
//   dK_j = scale * sum_i p_ij (dP_ij - delta_i) q_i   over the local rows i whose band holds local key j
//   dV_j =         sum_i p_ij dO_i
// and the global keys' dK/dV from the local rows (kernel 3 there; its combine, kernel 4, sums the
// chunk partials of either).
//
// Both kernels take a block of 64 rows of one dilation residue (mma_tiles.h) and walk tiles of 64
// rows through mma_tiles::KeyTilePipeline (cp.async, two stages):
// * local_dq_mma_kernel: 64 query rows; the tiles are their band keys then the global keys, as in
//   the forward. Per tile S = Q K^T and dP = dO V^T (mma), P = exp2(S scale log2e - lse log2e),
//   dS = P (dP - delta), dQ += dS K (16-bit tiles: dS rounded to 16 bits as the A fragment).
// * local_dkdv_mma_kernel: 64 key rows; the tiles are the local queries that see them (query
//   subsequence indices [s - right, s + left], the window's sides swapped), staged from q and grad_out
//   with their lse and delta. Per tile S^T = K Q^T and dP^T = V dO^T, P^T and dS^T as above,
//   dV += P^T dO and dK += dS^T Q.
// Masked pairs are a select to 0 (never 0 * x), and excluded rows are zero in shared memory, so NaN
// in padding rows cannot reach a result.
//
// The general op's arguments (docs/design.md §2.2) run in a second instantiation of each kernel
// (kGeneral), as in the forward: the dQ kernel's blocks take the query rows
// [q_offset, q_offset + Nq) and the query tiles of the dK/dV kernels only those rows; a pair sees
// only its own packed sequence (cu_seqlens); P goes through softcap and ALiBi
// (mma_tiles::TileModifiers) and dS takes the softcap's derivative. Sinks change nothing here: the
// lse holds them, and their gradient comes from delta afterwards (sinks_backward). Grouped KV heads
// run as slices of query heads (kv_group_slices.h).
#include <cstdint>

#include "backward_split.h"
#include "global_split.h"
#include "mma_backward.h"

namespace longformer::cuda {
namespace {

using namespace mma_tiles;

// Stages the block's rows of operands a and b (local rows, and for queries only those with a
// finite lse; others zero with flag 0) as one cp.async group.
template <typename T, int DP>
__device__ __forceinline__ void stage_block_rows(const AttentionParams& p, const BlockRows& w,
                                                 const RowMajorHeads& a, const RowMajorHeads& b, bool need_lse,
                                                 bool vec, TileElem<T>* sA, TileElem<T>* sB, unsigned char* row_ok) {
  const uint8_t* roles = p.roles + w.b * p.seqlen;
  const float* lse = static_cast<const float*>(p.lse) + p.lse_offset(w.b, w.h, 0);
  stage_rows<T, DP>(w.b, w.h, p.head_dim, a, sA, &b, sB, vec, row_ok, nullptr, [&](int row, int64_t& pos) {
    pos = w.r + (w.s0 + row) * w.d;
    return row < w.rows && roles[pos] == kLocal && (!need_lse || lse[pos] != -INFINITY);
  });
  cp_async_commit();
}

template <typename T, int DP, bool kGeneral>
__global__ void LONGFORMER_MMA_BOUNDS(T, kGeneral) local_dq_mma_kernel(const AttentionParams p, const GlobalKeys gk,
                                                              const float* delta, int64_t slots, bool vec) {
  using S = BwdTiles<T, DP, false, kGeneral>;
  constexpr int kPitch = Rows<T, DP>::kPitch;
  constexpr int kBlockK = S::kBlockK;
  const BlockRows w = decode_block(p, slots, query_rows(p));
  if (!w.valid) return;
  const int64_t N = p.seqlen, D = p.head_dim;

  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  TileElem<T>* sQ = reinterpret_cast<TileElem<T>*>(smem + S::kAOffset);
  TileElem<T>* sdO = reinterpret_cast<TileElem<T>*>(smem + S::kBOffset);
  unsigned char* query_ok = smem + S::kRowOkOffset;
  typename S::Tiles keys;
  keys.setup(p, p.k, p.v, w.b, w.h, w.r, w.d, w.L, w.s0, w.rows, p.window_left, p.causal ? 0 : p.window_right,
             gk.index + w.b * N, gk.count[w.b], vec, smem);

  stage_block_rows<T, DP>(p, w, p.q, p.grad_out, true, vec, sQ, sdO, query_ok);
  keys.issue(0);
  cp_async_wait<1>();  // the block's rows landed (key tile 0 may still be in flight)
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const ThreadRows rows = thread_rows(w.s0, w.r, w.d, query_ok);
  const int64_t(&row_pos)[2] = rows.pos;
  const bool(&row_ok)[2] = rows.ok;
  float lse_log2[2], row_delta[2];
  const int64_t lse_row = p.lse_offset(w.b, w.h, 0);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    lse_log2[i] = row_ok[i] ? static_cast<const float*>(p.lse)[lse_row + row_pos[i]] * kLog2e : 0.0f;
    row_delta[i] = row_ok[i] ? delta[lse_row + row_pos[i]] : 0.0f;
  }
  const OperandFragments<T, DP, S::kOperandsInRegisters> qf(sQ + warp * 16 * kPitch, lane);
  const OperandFragments<T, DP, S::kOperandsInRegisters> dof(sdO + warp * 16 * kPitch, lane);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  float dq[DP / 8][4] = {};

  if constexpr (kGeneral) {
    const TileModifiers mods(p, w.h);
    const RowPositions positions{{row_pos[0], row_pos[1]}};
    const int t = lane & 3;
    keys.run(rows, [&](const TileElem<T>* sK, const TileElem<T>* sV, int stage, auto allowed) {
      accumulate_dq_tile<T, DP, kBlockK, true>(dq, qf, dof, sK, sV, lse_log2, row_delta, scale_log2, allowed, lane,
                                               mods, positions, keys.key_pos(stage) + 2 * t);
    });
  } else {
    keys.run(rows, [&](const TileElem<T>* sK, const TileElem<T>* sV, int, auto allowed) {
      accumulate_dq_tile<T, DP, kBlockK>(dq, qf, dof, sK, sV, lse_log2, row_delta, scale_log2, allowed, lane);
    });
  }
  store_rows<T, DP>(dq, p.grad_q, w.b, w.h, row_pos, row_ok, D, static_cast<float>(p.scale), false, lane);
}

template <typename T, int DP, bool kGeneral>
__global__ void LONGFORMER_MMA_BOUNDS(T, kGeneral) local_dkdv_mma_kernel(const AttentionParams p, const float* delta,
                                                                int64_t slots, bool vec) {
  using S = BwdTiles<T, DP, true, kGeneral>;
  constexpr int kPitch = Rows<T, DP>::kPitch;
  const BlockRows w = decode_block(p, slots, key_rows(p));
  if (!w.valid) return;
  const int64_t D = p.head_dim;

  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  TileElem<T>* sK = reinterpret_cast<TileElem<T>*>(smem + S::kAOffset);
  TileElem<T>* sV = reinterpret_cast<TileElem<T>*>(smem + S::kBOffset);
  unsigned char* key_ok = smem + S::kRowOkOffset;
  // The tiles are the local queries whose band holds these keys: key s is in query i's band iff
  // i - left <= s <= i + right, i.e. i in [s - right, s + left]: the pipeline's window with its sides
  // swapped, and no global tiles (global rows have their own backward).
  typename S::Tiles queries;
  queries.setup(p, p.q, p.grad_out, w.b, w.h, w.r, w.d, w.L, w.s0, w.rows, p.causal ? 0 : p.window_right,
                p.window_left, nullptr, 0, vec, smem);
  queries.lse = static_cast<const float*>(p.lse);
  queries.delta = delta;

  stage_block_rows<T, DP>(p, w, p.k, p.v, false, vec, sK, sV, key_ok);
  queries.issue(0);
  cp_async_wait<1>();
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const ThreadRows rows = thread_rows(w.s0, w.r, w.d, key_ok);
  const int64_t(&row_pos)[2] = rows.pos;
  const bool(&row_ok)[2] = rows.ok;
  const OperandFragments<T, DP, S::kOperandsInRegisters> kf(sK + warp * 16 * kPitch, lane);
  const OperandFragments<T, DP, S::kOperandsInRegisters> vf(sV + warp * 16 * kPitch, lane);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  float dk[DP / 8][4] = {}, dv[DP / 8][4] = {};

  accumulate_dkdv<T, DP, kGeneral>(dk, dv, kf, vf, queries, rows, p, w.h, scale_log2, lane);
  store_rows<T, DP>(dk, p.grad_k, w.b, w.h, row_pos, row_ok, D, static_cast<float>(p.scale), false, lane);
  store_rows<T, DP>(dv, p.grad_v, w.b, w.h, row_pos, row_ok, D, 1.0f, false, lane);
}

// dK/dV of the global keys from the local rows: a block takes a tile of 64 of a batch row's global
// keys (gathered, ascending) and one chunk of its queries (backward_split.h), walking the chunk's
// local queries as band tiles of the undilated sequence whose window reaches every query (only
// those at or after the key when causal), and writes the chunk's partials for the SIMT combine
// kernel of banded_attention_backward.cu. Items are ordered tile-major over a capped grid.
template <typename T, int DP, bool kGeneral>
__global__ void LONGFORMER_MMA_BOUNDS(T, kGeneral) global_keys_dkdv_mma_kernel(const AttentionParams p, const GlobalKeys gk,
                                                                  const float* delta, float* partials,
                                                                  int64_t max_chunks, bool vec) {
  using S = BwdTiles<T, DP, true, kGeneral>;
  constexpr int kPitch = Rows<T, DP>::kPitch;
  const int64_t N = p.seqlen, D = p.head_dim, BH = p.batch * p.heads;
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  TileElem<T>* sK = reinterpret_cast<TileElem<T>*>(smem + S::kAOffset);
  TileElem<T>* sV = reinterpret_cast<TileElem<T>*>(smem + S::kBOffset);
  int64_t* key_pos = reinterpret_cast<int64_t*>(smem + S::kRowPosOffset);
  unsigned char* key_ok = smem + S::kRowOkOffset;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int t = lane & 3;
  const float scale = static_cast<float>(p.scale), scale_log2 = scale * kLog2e;
  static_assert(kRowTile == kBlockRows, "a tile of global keys is one block of rows");
  const int64_t key_tiles = global_row_tiles(p, gk);

  for (int64_t item = blockIdx.x;; item += gridDim.x) {  // block-uniform loop
    const int64_t chunk = item % max_chunks, rest = item / max_chunks;
    const int64_t bh = rest % BH, tile = rest / BH;
    if (tile >= key_tiles) break;  // block-uniform; no barrier follows the loop
    const int64_t b = bh / p.heads, h = bh % p.heads, count = gk.count[b], g0 = tile * kBlockRows;
    if (g0 >= count) continue;  // block-uniform
    const int64_t chunks = chunks_per_global(count, N);
    if (chunk >= chunks) continue;  // block-uniform
    const int rows = static_cast<int>(min_i64(count - g0, kBlockRows));
    const int64_t len = ceil_div(N, chunks), query_begin = min_i64(chunk * len, N);
    const int64_t* index = gk.index + b * N;
    const uint8_t* roles = p.roles + b * N;
    typename S::Tiles queries;
    queries.setup_band(p, p.q, p.grad_out, b, h, 0, 1, query_begin, min_i64(N, query_begin + len), p.causal ? 0 : N,
                       N, nullptr, 0, vec, smem);
    queries.lse = static_cast<const float*>(p.lse);
    queries.delta = delta;
    stage_rows<T, DP>(b, h, D, p.k, sK, &p.v, sV, vec, key_ok, key_pos, [&](int row, int64_t& pos) {
      pos = row < rows ? index[g0 + row] : 0;
      return row < rows && roles[pos] == kGlobal;
    });
    cp_async_commit();
    queries.issue(0);
    cp_async_wait<1>();
    __syncthreads();

    // This thread's two partial rows, computed before the walk so that little else stays live.
    const int slot0 = warp * 16 + (lane >> 2);
    float* const part0 = partials + (bh * N + (g0 + slot0) * chunks + chunk) * 2 * D;
    const int64_t part_step = 8 * chunks * 2 * D;  // slot0 + 8
    const bool write0 = slot0 < rows, write1 = slot0 + 8 < rows;
    const ThreadRows mine = gathered_rows(key_pos, key_ok, rows);
    const OperandFragments<T, DP, S::kOperandsInRegisters> kf(sK + warp * 16 * kPitch, lane);
    const OperandFragments<T, DP, S::kOperandsInRegisters> vf(sV + warp * 16 * kPitch, lane);
    float dk[DP / 8][4] = {}, dv[DP / 8][4] = {};
    accumulate_dkdv<T, DP, kGeneral>(dk, dv, kf, vf, queries, mine, p, h, scale_log2, lane);

    // The chunk's partial of each key of the tile: dK (times scale), then dV; zeros for a key that
    // is not global (its rows were not staged).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!(i == 0 ? write0 : write1)) continue;
      float* part = part0 + i * part_step;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * n + 2 * t + e;
          if (col >= D) continue;
          part[col] = mine.ok[i] ? dk[n][2 * i + e] * scale : 0.0f;
          part[D + col] = mine.ok[i] ? dv[n][2 * i + e] : 0.0f;
        }
      }
    }
    __syncthreads();  // the block's next item restages its rows and query tiles
  }
}

// Both kernels index the query rows and delta by position (indexed_by_position): the dQ kernel's
// blocks take the query rows, the dK/dV kernel's the keys.
template <typename T, int DP, bool kGeneral>
int launch_local_backward_mma(const AttentionParams& call, const GlobalKeys& g, const float* call_delta,
                              void* stream) {
  const AttentionParams p = indexed_by_position(call, sizeof(TileElem<T>));
  const float* delta = call_delta - call.q_offset;
  const int64_t dq_slots = slots_per_head(p, query_rows(p)), dkdv_slots = slots_per_head(p, key_rows(p));
  dim3 dq_grid, dkdv_grid;
  if (!grid_for_blocks(p.batch * p.heads * dq_slots, dq_grid) ||
      !grid_for_blocks(p.batch * p.heads * dkdv_slots, dkdv_grid))
    return 1;  // cudaErrorInvalidValue: too many blocks
  const RowMajorHeads* operands[] = {&call.q, &call.k, &call.v, &call.grad_out};
  const bool vec = rows_are_16_byte_aligned<T>(p.head_dim, operands, 4);
  auto dq = local_dq_mma_kernel<T, DP, kGeneral>;
  auto dkdv = local_dkdv_mma_kernel<T, DP, kGeneral>;
  const int64_t dq_bytes = BwdTiles<T, DP, false, kGeneral>::kSmemBytes;
  const int64_t dkdv_bytes = BwdTiles<T, DP, true, kGeneral>::kSmemBytes;
  if (const int err = allow_shared_bytes(dq, dq_bytes)) return err;
  if (const int err = allow_shared_bytes(dkdv, dkdv_bytes)) return err;
  if (const int err = LONGFORMER_LAUNCH(dq, dq_grid, dim3(kThreads, 1, 1), static_cast<int>(dq_bytes), stream, p, g,
                                        delta, dq_slots, vec))
    return err;
  return LONGFORMER_LAUNCH(dkdv, dkdv_grid, dim3(kThreads, 1, 1), static_cast<int>(dkdv_bytes), stream, p, delta,
                           dkdv_slots, vec);
}

template <typename T, int DP, bool kGeneral>
int launch_global_keys_mma(const AttentionParams& call, const GlobalKeys& g, void* workspace, void* stream) {
  const AttentionParams p = indexed_by_position(call, sizeof(TileElem<T>));
  const int64_t max_chunks = max_i64(ceil_div(p.seqlen, kChunkRows), 1);
  const int64_t items = p.batch * p.heads * ceil_div(p.seqlen, kBlockRows) * max_chunks;
  const RowMajorHeads* operands[] = {&call.q, &call.k, &call.v, &call.grad_out};
  const bool vec = rows_are_16_byte_aligned<T>(p.head_dim, operands, 4);
  auto kernel = global_keys_dkdv_mma_kernel<T, DP, kGeneral>;
  const int64_t bytes = BwdTiles<T, DP, true, kGeneral>::kSmemBytes;
  if (const int err = allow_shared_bytes(kernel, bytes)) return err;
  // A prime number of blocks, fewer than items where there are many: see global_split.h.
  return LONGFORMER_LAUNCH(kernel, dim3(static_cast<unsigned>(min_i64(items, kMmaGridCap))), dim3(kThreads, 1, 1),
                           static_cast<int>(bytes), stream, p, g, delta_of<float>(workspace) - call.q_offset,
                           partials_of<float>(p, workspace), max_chunks, vec);
}

}  // namespace

bool banded_attention_backward_mma_supports(const AttentionParams& p, DType dtype) {
  if (!tiled_arguments(p)) return false;
  if (dtype == DType::kFloat32 || dtype == DType::kFloat32Tf32) return float_backward_fits(p.head_dim);
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && p.head_dim <= 128;
}

int banded_attention_backward_mma_local(const AttentionParams& p, const GlobalKeys& g, const float* delta,
                                        DType dtype, void* stream) {
  return launch_tiled<128>(p, dtype, [&](auto shape) {
    using S = decltype(shape);
    return launch_local_backward_mma<typename S::T, S::DP, S::kGeneral>(p, g, delta, stream);
  });
}

int banded_attention_backward_mma_global_keys(const AttentionParams& p, const GlobalKeys& g, void* workspace,
                                              DType dtype, void* stream) {
  return launch_tiled<128>(p, dtype, [&](auto shape) {
    using S = decltype(shape);
    return launch_global_keys_mma<typename S::T, S::DP, S::kGeneral>(p, g, workspace, stream);
  });
}

}  // namespace longformer::cuda
