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

// The tensor-core chunk kernel of the forward (global_attention_forward_mma.cu): whether it takes
// these inputs (float16/bfloat16, D <= 256), and its launch. It writes, for every global row and
// chunk, the row itself when C_b == 1 and else the partial (m, l, o[D]) in the workspace layout of
// the SIMT chunk kernel.
bool global_attention_forward_mma_supports(const AttentionParams& p, DType dtype);
int global_attention_forward_mma_chunks(const AttentionParams& p, const GlobalKeys& g, const SplitShape& split,
                                        void* workspace, DType dtype, void* stream);

}  // namespace longformer::cuda
