// How the keys of the global rows are split over blocks (split-K, flash-decoding style), shared by
// the SIMT kernels (global_attention.cu) and the tensor-core chunk kernel
// (global_attention_forward_mma.cu), which write the same partials for the same combine kernel.
// Chunks per global row of batch b: C_b = min(max_chunks, rows / count[b]) (from N only, so results
// do not depend on the GPU); the count[b] * C_b partials of a (b, h) fit in `rows` workspace slots,
// slot g * C_b + c for global slot g and chunk c.
#pragma once

#include <cstdint>

#include "device.h"
#include "launchers.h"

namespace longformer::cuda {

constexpr int64_t kChunkKeys = 256;  // target keys per chunk (32 per warp)
constexpr int64_t kMaxChunks = 64;   // chunks per row at most (longer rows get longer chunks)
constexpr int64_t kSplitRows = 16;   // global rows per (b, h) that get every chunk
// Blocks of the chunk kernels (grid-stride loop beyond). A prime: block x takes items x, x + cap,
// x + 2 cap, ..., whose chunk indices (item % max_chunks) then cycle through every value. With a
// cap that is a multiple of max_chunks (4096 and 64) each block would always get the same chunk
// index, and the blocks of chunk indices >= chunks_of(count) (3/4 of them with 64 global tokens)
// would never get work.
constexpr int64_t kGridCap = 4093;

// How the keys of the global rows are split (from N only, so results do not depend on the GPU).
struct SplitShape {
  int64_t max_chunks;  // chunk index range of the work items
  int64_t rows;        // partial slots per (b, h) in the workspace
};

inline SplitShape split_shape(const AttentionParams& p) {
  const int64_t chunks = min_i64(max_i64(ceil_div(p.seqlen, kChunkKeys), 1), kMaxChunks);
  return SplitShape{chunks, max_i64(min_i64(p.seqlen, chunks * kSplitRows), 1)};
}

// Chunks of each global row of a batch row with `count` (>= 1) global tokens.
__device__ __forceinline__ int64_t chunks_of(const SplitShape& s, int64_t count) {
  return max_i64(min_i64(s.max_chunks, s.rows / count), 1);
}

// Largest count[b]: the work items of later global slots are all idle.
__device__ __forceinline__ int64_t max_count(const AttentionParams& p, const GlobalKeys& globals) {
  int64_t m = 0;
  for (int64_t b = 0; b < p.batch; ++b) m = max_i64(m, globals.count[b]);
  return m;
}

// A work item of the tensor-core kernels of the global rows: a tile of up to 64 (kRowTile) of a
// batch row's global rows (slots g0 .. g0 + rows - 1, positions ascending), a (b, h), and chunk c
// of the keys. Items are ordered tile-major: item = (tile * B * H + b * H + h) * max_chunks + c.
// The chunk's key range [key_begin, key_end) cuts [0, last) into C_b equal parts, `last` being N,
// or when causal the tile's last row + 1: the same range for all the tile's rows, and each row's
// keys in exactly one chunk.
struct RowTileItem {
  int64_t b, h, bh, g0, count, chunks, c, key_begin, key_end;
  int rows;
};

enum class ItemState { kWork, kIdle, kPastLastTile };

constexpr int64_t kRowTile = 64;

__device__ __forceinline__ ItemState decode_row_tile_item(const AttentionParams& p, const GlobalKeys& g,
                                                          const SplitShape& split, int64_t item,
                                                          int64_t row_tiles, RowTileItem& it) {
  it.c = item % split.max_chunks;
  const int64_t rest = item / split.max_chunks;
  it.bh = rest % (p.batch * p.heads);
  const int64_t tile = rest / (p.batch * p.heads);
  if (tile >= row_tiles) return ItemState::kPastLastTile;
  it.b = it.bh / p.heads;
  it.h = it.bh % p.heads;
  it.count = g.count[it.b];
  it.g0 = tile * kRowTile;
  if (it.g0 >= it.count) return ItemState::kIdle;
  it.chunks = chunks_of(split, it.count);
  if (it.c >= it.chunks) return ItemState::kIdle;
  it.rows = static_cast<int>(min_i64(it.count - it.g0, kRowTile));
  const int64_t last = p.causal ? g.index[it.b * p.seqlen + it.g0 + it.rows - 1] + 1 : p.seqlen;
  const int64_t len = ceil_div(last, it.chunks);
  it.key_begin = min_i64(it.c * len, last);
  it.key_end = min_i64(last, it.key_begin + len);
  return ItemState::kWork;
}

// Row tiles per (b, h) that can hold work: the largest global count, in tiles.
__device__ __forceinline__ int64_t global_row_tiles(const AttentionParams& p, const GlobalKeys& g) {
  return ceil_div(max_count(p, g), kRowTile);
}

// Blocks of the tensor-core kernels' grid-stride loop. Fewer than kGridCap: a block there holds
// tens of KiB of shared memory, so idle blocks are not free. A prime, for the reason given at
// kGridCap: every block then meets every chunk index.
constexpr int64_t kMmaGridCap = 1021;

// The tensor-core chunk kernel of the forward (global_attention_forward_mma.cu): whether it takes
// these inputs (float16/bfloat16, D <= 256), and its launch. It writes, for every global row and
// chunk, the row itself when C_b == 1 and else the partial (m, l, o[D]) in the workspace layout of
// the SIMT chunk kernel.
bool global_attention_forward_mma_supports(const AttentionParams& p, DType dtype);
int global_attention_forward_mma_chunks(const AttentionParams& p, const GlobalKeys& g, const SplitShape& split,
                                        void* workspace, DType dtype, void* stream);

// The tensor-core backward (global_attention_backward_mma.cu), float16/bfloat16 with D <= 128: dQ
// of the global rows (rows or partials, as the SIMT dQ chunk kernel writes them) and their dK/dV,
// written or with `accumulate` added; `workspace` as global_attention.cu lays it out, delta filled.
bool global_attention_backward_mma_supports(const AttentionParams& p, DType dtype);
int global_attention_backward_mma(const AttentionParams& p, const GlobalKeys& g, const SplitShape& split,
                                  void* workspace, DType dtype, bool accumulate, void* stream);

}  // namespace longformer::cuda
