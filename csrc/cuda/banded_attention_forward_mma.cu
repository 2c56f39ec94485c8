// Fused banded attention forward, tiled (fp16 / bf16 on tensor cores, fp32 on FMA tiles in the same
// fragment layout: mma_tiles.h; fp32 softmax and accumulation): the rows of LOCAL queries
// (docs/design.md §2). A local query i of head h attends to its band keys j = i + t * dilation[h],
// t in [-left, right], 0 <= j < N, that are real and local, plus every real global key once; with
// causal no key j > i. Global and padding rows are left as the glue initialised them (out 0, lse
// -inf), and so is a row that ends up with no key.
//
// A block takes 64 rows of one dilation residue (mma_tiles.h: block decomposition), and walks its
// key tiles through mma_tiles::KeyTilePipeline: band keys, subsequence indices [s0 - left,
// s_last + right], then the gathered global keys, with the next tile's cp.async copies in flight
// while the current one is computed. Per key tile a warp computes S = Q K^T with mma.sync m16n8k16
// (K and V fragments through ldmatrix, V with .trans), masks it (-inf, never NaN), updates a
// per-row online softmax (running max and sum in fp32, rows spread over lane quads), and
// accumulates O += P V with P rounded to 16 bits and reused in registers as the A fragment (float
// tiles: the same steps on FMA, fma_tiles.h, P kept in fp32).
//
// The general op's arguments (docs/design.md §2.2) run in a second instantiation (kGeneral, picked
// by mma_tiles.h's launch_tiled): the blocks take the query rows [q_offset, q_offset + Nq)
// (mma_tiles.h: decode_block, indexed_by_position), a row sees only keys of its own packed sequence
// (cu_seqlens), the scores go through softcap and ALiBi (TileModifiers) and a sink's logit joins
// each row's denominator. Grouped KV heads run as slices of query heads (kv_group_slices.h).
//
// Head dims 32, 64, 128 are compile-time tiles; any other D <= 256 runs in the next tile (32, 64,
// 128, 256) with the missing columns zero in shared memory, so they add nothing to Q K^T and their
// output columns are never written.
#include <cstdint>

#include "mma_tiles.h"

namespace longformer::cuda {
namespace {

using namespace mma_tiles;

// Compile-time shape of one instantiation; DP is the padded head dim.
template <typename T, int DP, bool kGeneral>
struct FwdTiles {
  static constexpr int kBlockK = ForwardShape<T, DP>::kBlockK;
  static constexpr bool kQInRegisters = ForwardShape<T, DP>::kQInRegisters;
  using Keys = KeyTilePipeline<T, DP, kBlockK, false, kGeneral>;
  // Layout: key tile pipeline | Q | query flags.
  static constexpr int64_t kQOffset = Keys::kBytes;
  static constexpr int64_t kQueryOkOffset = kQOffset + Rows<T, DP>::bytes(kBlockRows);
  static constexpr int64_t kSmemBytes = kQueryOkOffset + kBlockRows;
};

template <typename T, int DP, bool kGeneral>
__global__ void LONGFORMER_MMA_BOUNDS(T, kGeneral) banded_attention_forward_mma_kernel(const AttentionParams p,
                                                                              const GlobalKeys gk,
                                                                              int64_t slots, bool vec) {
  using Tiles = FwdTiles<T, DP, kGeneral>;
  constexpr int kBlockK = Tiles::kBlockK;
  constexpr int kPitch = Rows<T, DP>::kPitch;

  // ---- which (b, h, r, tile) this block owns
  const BlockRows w = decode_block(p, slots, query_rows(p));
  if (!w.valid) return;
  const int64_t N = p.seqlen, D = p.head_dim;
  const int64_t b = w.b, h = w.h, d = w.d, r = w.r, L = w.L, s0 = w.s0;
  const int rows = w.rows;

  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  TileElem<T>* sQ = reinterpret_cast<TileElem<T>*>(smem + Tiles::kQOffset);
  unsigned char* query_ok = smem + Tiles::kQueryOkOffset;
  typename Tiles::Keys keys;
  // causal: no band key right of the diagonal
  keys.setup(p, p.k, p.v, b, h, r, d, L, s0, rows, p.window_left, p.causal ? 0 : p.window_right, gk.index + b * N,
             gk.count[b], vec, smem);

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5, lane = tid & 31;
  const int t = lane & 3;
  const uint8_t* roles = p.roles + b * N;

  // ---- Q tile (rows that are not local real queries are zero: they are never written), then the
  // first key tile; wait for Q only.
  stage_rows<T, DP>(b, h, D, p.q, sQ, nullptr, nullptr, vec, query_ok, nullptr, [&](int row, int64_t& pos) {
    pos = r + (s0 + row) * d;
    return row < rows && roles[pos] == kLocal;
  });
  cp_async_commit();
  keys.issue(0);
  cp_async_wait<1>();  // the Q group landed (tile 0 may still be in flight)
  __syncthreads();

  const ThreadRows rows_of_thread = thread_rows(s0, r, d, query_ok);

  const OperandFragments<T, DP, Tiles::kQInRegisters> q_fragment(sQ + warp * 16 * kPitch, lane);

  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  OnlineSoftmaxRows<T, DP, kBlockK, kGeneral> softmax;
  if constexpr (kGeneral) {
    const TileModifiers mods(p, h);
    const RowPositions positions{{rows_of_thread.pos[0], rows_of_thread.pos[1]}};
    keys.run(rows_of_thread, [&](const TileElem<T>* sK, const TileElem<T>* sV, int stage, auto allowed) {
      softmax.absorb(q_fragment, sK, sV, scale_log2, allowed, lane, mods, positions, keys.key_pos(stage) + 2 * t);
    });
    softmax.finish(p.sinks ? static_cast<const float*>(p.sinks)[h] * 1.4426950408889634f : -INFINITY);
  } else {
    keys.run(rows_of_thread, [&](const TileElem<T>* sK, const TileElem<T>* sV, int, auto allowed) {
      softmax.absorb(q_fragment, sK, sV, scale_log2, allowed, lane);
    });
    softmax.finish();
  }

  // ---- write the local rows that saw a key
  TileElem<T>* out_base = static_cast<TileElem<T>*>(p.out.data);
  float* lse = static_cast<float*>(p.lse);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!rows_of_thread.ok[i] || !(softmax.row_sum[i] > 0.0f)) continue;
    softmax.store_row(i, out_base + p.out.offset(b, h, rows_of_thread.pos[i]), D, lane);
    if (t == 0) lse[p.lse_offset(b, h, rows_of_thread.pos[i])] = softmax.lse(i);
  }
}

template <typename T, int DP, bool kGeneral>
int launch_forward_mma(const AttentionParams& call, const GlobalKeys& g, void* stream) {
  using Tiles = FwdTiles<T, DP, kGeneral>;
  const AttentionParams p = indexed_by_position(call, sizeof(TileElem<T>));
  const int64_t slots = slots_per_head(p, query_rows(p));
  dim3 grid;
  if (!grid_for_blocks(p.batch * p.heads * slots, grid)) return 1;  // cudaErrorInvalidValue: too many blocks
  const RowMajorHeads* operands[] = {&call.q, &call.k, &call.v};
  const bool vec = rows_are_16_byte_aligned<T>(p.head_dim, operands, 3);
  auto kernel = banded_attention_forward_mma_kernel<T, DP, kGeneral>;
  // DP = 128 and 256 need more than the default 48 KiB of dynamic shared memory.
  if (const int err = allow_shared_bytes(kernel, Tiles::kSmemBytes)) return err;
  return LONGFORMER_LAUNCH(kernel, grid, dim3(kThreads, 1, 1), static_cast<int>(Tiles::kSmemBytes), stream, p, g,
                           slots, vec);
}

}  // namespace

bool banded_attention_forward_mma_supports(const AttentionParams& p, DType dtype) {
  if (!tiled_arguments(p)) return false;
  if (dtype == DType::kFloat32 || dtype == DType::kFloat32Tf32) return p.head_dim <= 128;
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && p.head_dim <= 256;
}

int banded_attention_forward_mma(const AttentionParams& p, const GlobalKeys& g, DType dtype, void* stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen == 0) return 0;
  return launch_tiled<256>(p, dtype, [&](auto shape) {
    using S = decltype(shape);
    return launch_forward_mma<typename S::T, S::DP, S::kGeneral>(p, g, stream);
  });
}

}  // namespace longformer::cuda
