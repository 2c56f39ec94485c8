// Rows of global queries, tiled (fp16 / bf16 on tensor cores, fp32 on FMA tiles: mma_tiles.h; fp32
// softmax and accumulation): each global row g of (b, h) attends to every real key of its batch row
// (keys j <= g when causal), with the global projections when the op has them (p.q/k/v are then
// global_q/k/v).
//
// A work item is (tile of 64 of the batch row's global rows, gathered by position in ascending
// order; b, h; chunk c of the keys, global_split.h). Its block walks the chunk's key range through
// mma_tiles::KeyTilePipeline as band tiles of the undilated sequence (residue 0, dilation 1) with a
// window that reaches every key, its right side 0 when causal (which masks the keys after each
// row); band tiles stage the range's local keys, and chunk 0 also takes every global key as global
// tiles, so each key belongs to exactly one chunk. The softmax is the local rows' forward's
// (mma_tiles::OnlineSoftmaxRows). With one chunk per row (C_b == 1) the block writes the rows and
// their lse; else it writes each row's partial (max and sum in natural-log units, unnormalised
// output) for the combine kernel of global_attention.cu, which merges a row's chunks in order:
// deterministic, no atomics. The chunk's key range comes from the tile's last (largest) row when
// causal, so it is the same for the tile's rows and covers each row's keys.
//
// The general op's arguments run in a second instantiation (kGeneral, as for the local rows): only
// the global rows among the queries [q_offset, q_offset + Nq) are staged, the launcher moves the
// query-indexed pointers back by q_offset rows (mma_tiles::indexed_by_position), a row sees only
// the keys of its own packed sequence, softcap and ALiBi apply per score
// (mma_tiles::TileModifiers), and a sink joins the denominator of a row written whole (C_b == 1;
// the combine kernel adds it to a split row).
//
// The grid is a capped grid-stride loop over the items, tile-major, so blocks stop at the largest
// global count of the batch (the count lives on the device; the host knows only N).
#include <cstdint>

#include "global_split.h"
#include "mma_tiles.h"

namespace longformer::cuda {
namespace {

using namespace mma_tiles;

static_assert(kRowTile == kBlockRows, "a row tile of global rows is one block of rows");

template <typename T, int DP, bool kGeneral>
struct GlobalRowTiles {
  static constexpr int kBlockK = ForwardShape<T, DP>::kBlockK;
  static constexpr bool kQInRegisters = ForwardShape<T, DP>::kQInRegisters;
  using Keys = KeyTilePipeline<T, DP, kBlockK, false, kGeneral>;
  // Layout: key tile pipeline | Q | query positions (int64) | query flags.
  static constexpr int64_t kQOffset = Keys::kBytes;
  static constexpr int64_t kQueryPosOffset = kQOffset + Rows<T, DP>::bytes(kBlockRows);
  static constexpr int64_t kQueryOkOffset = kQueryPosOffset + int64_t{kBlockRows} * 8;
  static constexpr int64_t kSmemBytes = kQueryOkOffset + kBlockRows;
};

template <typename T, int DP, bool kGeneral>
__global__ void LONGFORMER_MMA_BOUNDS(T, kGeneral) global_rows_forward_mma_kernel(const AttentionParams p, const GlobalKeys gk,
                                                                     const SplitShape split, float* workspace,
                                                                     bool vec) {
  using Tiles = GlobalRowTiles<T, DP, kGeneral>;
  constexpr int kPitch = Rows<T, DP>::kPitch;
  const int64_t N = p.seqlen, D = p.head_dim;
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  TileElem<T>* sQ = reinterpret_cast<TileElem<T>*>(smem + Tiles::kQOffset);
  int64_t* query_pos = reinterpret_cast<int64_t*>(smem + Tiles::kQueryPosOffset);
  unsigned char* query_ok = smem + Tiles::kQueryOkOffset;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5, lane = tid & 31, t = lane & 3;
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  const int64_t row_tiles = global_row_tiles(p, gk);

  for (int64_t item = blockIdx.x;; item += gridDim.x) {  // block-uniform loop
    RowTileItem it;
    const ItemState state = decode_row_tile_item(p, gk, split, item, row_tiles, it);
    if (state == ItemState::kPastLastTile) break;  // block-uniform; no barrier follows the loop
    if (state == ItemState::kIdle) continue;       // block-uniform
    const int64_t b = it.b, h = it.h, g0 = it.g0, chunks = it.chunks, c = it.c;
    const int rows = it.rows;
    const int64_t* index = gk.index + b * N;
    const uint8_t* roles = p.roles + b * N;
    typename Tiles::Keys keys;
    keys.setup_band(p, p.k, p.v, b, h, 0, 1, it.key_begin, it.key_end, N, p.causal ? 0 : N, index,
                    c == 0 ? it.count : 0, vec, smem);

    // ---- the tile's Q rows (gathered), then the first key tile; wait for Q only.
    stage_rows<T, DP>(b, h, D, p.q, sQ, nullptr, nullptr, vec, query_ok, query_pos, [&](int row, int64_t& pos) {
      pos = row < rows ? index[g0 + row] : 0;
      return row < rows && roles[pos] == kGlobal && (!kGeneral || p.is_query(pos));
    });
    cp_async_commit();
    keys.issue(0);
    cp_async_wait<1>();
    __syncthreads();

    const ThreadRows mine = gathered_rows(query_pos, query_ok, rows);
    const OperandFragments<T, DP, Tiles::kQInRegisters> q_fragment(sQ + warp * 16 * kPitch, lane);
    OnlineSoftmaxRows<T, DP, Tiles::kBlockK, kGeneral> softmax;
    if constexpr (kGeneral) {
      const TileModifiers mods(p, h);
      const RowPositions positions{{mine.pos[0], mine.pos[1]}};
      keys.run(mine, [&](const TileElem<T>* sK, const TileElem<T>* sV, int stage, auto allowed) {
        softmax.absorb(q_fragment, sK, sV, scale_log2, allowed, lane, mods, positions, keys.key_pos(stage) + 2 * t);
      });
      const bool sink = p.sinks != nullptr && chunks == 1;
      softmax.finish(sink ? static_cast<const float*>(p.sinks)[h] * 1.4426950408889634f : -INFINITY);
    } else {
      keys.run(mine, [&](const TileElem<T>* sK, const TileElem<T>* sV, int, auto allowed) {
        softmax.absorb(q_fragment, sK, sV, scale_log2, allowed, lane);
      });
      softmax.finish();
    }

    // ---- the rows (one chunk) or their partials
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int slot = warp * 16 + (lane >> 2) + 8 * i;
      if (slot >= rows) continue;
      const bool seen = mine.ok[i] && softmax.row_sum[i] > 0.0f;
      if (chunks == 1) {
        if (!seen) continue;  // no key: the row keeps out 0, lse -inf
        softmax.store_row(i, static_cast<TileElem<T>*>(p.out.data) + p.out.offset(b, h, mine.pos[i]), D,
                          lane);
        if (t == 0) static_cast<float*>(p.lse)[p.lse_offset(b, h, mine.pos[i])] = softmax.lse(i);
        continue;
      }
      // Partial of chunk c: m = -inf, l = 0, o = 0 when the row saw no key here.
      float* part = workspace + ((it.bh * split.rows) + (g0 + slot) * chunks + c) * (D + 2);
      if (t == 0) {
        part[0] = seen ? softmax.row_max[i] * 0.693147180559945309f : -INFINITY;
        part[1] = seen ? softmax.row_sum[i] : 0.0f;
      }
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) {
        const int col = 8 * n + 2 * t;
        if (col < D) part[2 + col] = seen ? softmax.o[n][2 * i] : 0.0f;
        if (col + 1 < D) part[3 + col] = seen ? softmax.o[n][2 * i + 1] : 0.0f;
      }
    }
    __syncthreads();  // the block's next item restages Q and the key tiles
  }
}

template <typename T, int DP, bool kGeneral>
int launch_global_rows_mma(const AttentionParams& call, const GlobalKeys& g, const SplitShape& split,
                           void* workspace, void* stream) {
  using Tiles = GlobalRowTiles<T, DP, kGeneral>;
  const AttentionParams p = indexed_by_position(call, sizeof(TileElem<T>));
  const int64_t items = p.batch * p.heads * ceil_div(p.seqlen, kBlockRows) * split.max_chunks;
  const RowMajorHeads* operands[] = {&call.q, &call.k, &call.v};
  const bool vec = rows_are_16_byte_aligned<T>(p.head_dim, operands, 3);
  auto kernel = global_rows_forward_mma_kernel<T, DP, kGeneral>;
  if (const int err = allow_shared_bytes(kernel, Tiles::kSmemBytes)) return err;
  return LONGFORMER_LAUNCH(kernel, dim3(static_cast<unsigned>(min_i64(items, kMmaGridCap))), dim3(kThreads, 1, 1),
                           static_cast<int>(Tiles::kSmemBytes), stream, p, g, split, static_cast<float*>(workspace),
                           vec);
}

}  // namespace

bool global_attention_forward_mma_supports(const AttentionParams& p, DType dtype) {
  if (!tiled_arguments(p)) return false;
  if (dtype == DType::kFloat32 || dtype == DType::kFloat32Tf32) return p.head_dim <= 128;
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && p.head_dim <= 256;
}

int global_attention_forward_mma_chunks(const AttentionParams& p, const GlobalKeys& g, const SplitShape& split,
                                        void* workspace, DType dtype, void* stream) {
  return launch_tiled<256>(p, dtype, [&](auto shape) {
    using S = decltype(shape);
    return launch_global_rows_mma<typename S::T, S::DP, S::kGeneral>(p, g, split, workspace, stream);
  });
}

}  // namespace longformer::cuda
