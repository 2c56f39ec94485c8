// Backward of the local rows on tensor cores (fp16 / bf16 in, fp32 accumulation), head dims up to
// 128: the two parts of banded_attention_backward.cu's local_rows_kernel, each with one owner per
// output tile (deterministic, no atomics). With p_ij = exp(scale * q_i . k_j - lse_i),
// dP_ij = dO_i . v_j and delta_i = dO_i . O_i (the workspace's delta, from delta_kernel):
//   dQ_i = scale * sum_j p_ij (dP_ij - delta_i) k_j   over the band keys and global keys of local row i
//   dK_j = scale * sum_i p_ij (dP_ij - delta_i) q_i   over the local rows i whose band holds local key j
//   dV_j =         sum_i p_ij dO_i
// (The global keys' dK/dV from the local rows stay with the SIMT kernels 3 and 4 there.)
//
// Both kernels take a block of 64 rows of one dilation residue (mma_tiles.h) and walk tiles of 64
// rows through mma_tiles::KeyTilePipeline (cp.async, two stages):
// * local_dq_mma_kernel: 64 query rows; the tiles are their band keys then the global keys, as in
//   the forward. Per tile S = Q K^T and dP = dO V^T (mma), P = exp2(S scale log2e - lse log2e),
//   dS = P (dP - delta), dQ += dS K (mma, dS rounded to 16 bits as the A fragment).
// * local_dkdv_mma_kernel: 64 key rows; the tiles are the local queries that see them (query
//   subsequence indices [s - right, s + left], the window's sides swapped), staged from q and grad_out
//   with their lse and delta. Per tile S^T = K Q^T and dP^T = V dO^T, P^T and dS^T as above,
//   dV += P^T dO and dK += dS^T Q.
// Masked pairs are a select to 0 (never 0 * x), and excluded rows are zero in shared memory, so NaN
// in padding rows cannot reach a result.
#include <cstdint>

#include "mma_tiles.h"

namespace longformer::cuda {
namespace {

using namespace mma_tiles;

constexpr float kLog2e = 1.4426950408889634f;

// Compile-time shape of one head-dim tile, and the shared memory of both kernels: the tile
// pipeline (key tiles for dQ, query tiles for dK/dV), then the block's own 64 rows of two operands
// (dQ: q and grad_out; dK/dV: k and v) and their flags.
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
  static constexpr int64_t kRowOkOffset = kBOffset + Rows<DP>::bytes(kBlockRows);
  static constexpr int64_t kSmemBytes = kRowOkOffset + kBlockRows;
};

// Stages the block's rows of operands a and b (local rows, and for queries only those with a
// finite lse; others zero with flag 0) as one cp.async group.
template <int DP>
__device__ __forceinline__ void stage_block_rows(const AttentionParams& p, const BlockRows& w,
                                                 const RowMajorHeads& a, const RowMajorHeads& b, bool need_lse,
                                                 bool vec, uint16_t* sA, uint16_t* sB, unsigned char* row_ok) {
  const uint8_t* roles = p.roles + w.b * p.seqlen;
  const float* lse = static_cast<const float*>(p.lse) + (w.b * p.heads + w.h) * p.seqlen;
  const uint16_t* a_base = static_cast<const uint16_t*>(a.data);
  const uint16_t* b_base = static_cast<const uint16_t*>(b.data);
  for (int c = static_cast<int>(threadIdx.x); c < kBlockRows * Rows<DP>::kChunks; c += kThreads) {
    const int row = c / Rows<DP>::kChunks, chunk = c % Rows<DP>::kChunks;
    bool ok = false;
    int64_t pos = 0;
    if (row < w.rows) {
      pos = w.r + (w.s0 + row) * w.d;
      ok = roles[pos] == kLocal && (!need_lse || lse[pos] != -INFINITY);
    }
    if (chunk == 0) row_ok[row] = ok;
    stage_row_chunk(sA + row * Rows<DP>::kPitch, ok ? a_base + head_row_offset(a, w.b, w.h, pos) : nullptr, chunk,
                    p.head_dim, vec, a_base);
    stage_row_chunk(sB + row * Rows<DP>::kPitch, ok ? b_base + head_row_offset(b, w.b, w.h, pos) : nullptr, chunk,
                    p.head_dim, vec, b_base);
  }
  cp_async_commit();
}

// Writes this thread's part of a 16 x DP accumulator tile (rows g and g + 8 of its warp) to `dst`
// rows, times `scale`, for the rows with row_ok.
template <typename T, int DP>
__device__ __forceinline__ void store_rows(const float (&acc)[DP / 8][4], const RowMajorHeads& dst,
                                           const BlockRows& w, const int64_t (&row_pos)[2],
                                           const bool (&row_ok)[2], int64_t D, float scale, int lane) {
  const int t = lane & 3;
  uint16_t* base = static_cast<uint16_t*>(dst.data);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!row_ok[i]) continue;
    uint16_t* out = base + head_row_offset(dst, w.b, w.h, row_pos[i]);
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
      const int col = 8 * n + 2 * t;
      if (col < D) out[col] = float_to_bits<T>(acc[n][2 * i] * scale);
      if (col + 1 < D) out[col + 1] = float_to_bits<T>(acc[n][2 * i + 1] * scale);
    }
  }
}

template <typename T, int DP>
__global__ void LONGFORMER_MMA_BOUNDS local_dq_mma_kernel(const AttentionParams p, const GlobalKeys gk,
                                                              const float* delta, int64_t slots, bool vec) {
  using S = BwdTiles<DP, false>;
  constexpr int kPitch = Rows<DP>::kPitch;
  constexpr int kBlockK = S::kBlockK;
  constexpr int kNT = kBlockK / 8;
  const BlockRows w = decode_block(p, slots);
  if (!w.valid) return;
  const int64_t N = p.seqlen, D = p.head_dim;

  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem + S::kAOffset);
  uint16_t* sdO = reinterpret_cast<uint16_t*>(smem + S::kBOffset);
  unsigned char* query_ok = smem + S::kRowOkOffset;
  typename S::Tiles keys;
  keys.setup(p, p.k, p.v, w.b, w.h, w.r, w.d, w.L, w.s0, w.rows, p.window_left, p.causal ? 0 : p.window_right,
             gk.index + w.b * N, gk.count[w.b], vec, smem);

  stage_block_rows<DP>(p, w, p.q, p.grad_out, true, vec, sQ, sdO, query_ok);
  keys.issue(0);
  cp_async_wait<1>();  // the block's rows landed (key tile 0 may still be in flight)
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const ThreadRows rows = thread_rows(w.s0, w.r, w.d, query_ok);
  const int64_t(&row_pos)[2] = rows.pos;
  const bool(&row_ok)[2] = rows.ok;
  float lse_log2[2], row_delta[2];
  const int64_t lse_row = (w.b * p.heads + w.h) * N;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    lse_log2[i] = row_ok[i] ? static_cast<const float*>(p.lse)[lse_row + row_pos[i]] * kLog2e : 0.0f;
    row_delta[i] = row_ok[i] ? delta[lse_row + row_pos[i]] : 0.0f;
  }
  const OperandFragments<DP, S::kOperandsInRegisters> qf(sQ + warp * 16 * kPitch, lane);
  const OperandFragments<DP, S::kOperandsInRegisters> dof(sdO + warp * 16 * kPitch, lane);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  float dq[DP / 8][4] = {};

  keys.run(rows, [&](const uint16_t* sK, const uint16_t* sV, int, auto allowed) {
    float s[kNT][4] = {}, dp[kNT][4] = {};
    mma_times_rows_transposed<T, DP, kNT>(s, qf, sK, lane);
    mma_times_rows_transposed<T, DP, kNT>(dp, dof, sV, lane);
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, c = 8 * j + (e & 1);
        const float pv = allowed(i, c) ? exp2f(s[j][e] * scale_log2 - lse_log2[i]) : 0.0f;
        s[j][e] = pv * (dp[j][e] - row_delta[i]);  // dS
      }
    }
    mma_accumulate_rows<T, DP, kBlockK>(dq, s, sK, lane);
  });
  store_rows<T, DP>(dq, p.grad_q, w, row_pos, row_ok, D, static_cast<float>(p.scale), lane);
}

template <typename T, int DP>
__global__ void LONGFORMER_MMA_BOUNDS local_dkdv_mma_kernel(const AttentionParams p, const float* delta,
                                                                int64_t slots, bool vec) {
  using S = BwdTiles<DP, true>;
  constexpr int kPitch = Rows<DP>::kPitch;
  constexpr int kBlockK = S::kBlockK;
  constexpr int kNT = kBlockK / 8;
  const BlockRows w = decode_block(p, slots);
  if (!w.valid) return;
  const int64_t D = p.head_dim;

  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem + S::kAOffset);
  uint16_t* sV = reinterpret_cast<uint16_t*>(smem + S::kBOffset);
  unsigned char* key_ok = smem + S::kRowOkOffset;
  // The tiles are the local queries whose band holds these keys: key s is in query i's band iff
  // i - left <= s <= i + right, i.e. i in [s - right, s + left]: the pipeline's window with its sides
  // swapped, and no global tiles (global rows have their own backward).
  typename S::Tiles queries;
  queries.setup(p, p.q, p.grad_out, w.b, w.h, w.r, w.d, w.L, w.s0, w.rows, p.causal ? 0 : p.window_right,
                p.window_left, nullptr, 0, vec, smem);
  queries.lse = static_cast<const float*>(p.lse);
  queries.delta = delta;

  stage_block_rows<DP>(p, w, p.k, p.v, false, vec, sK, sV, key_ok);
  queries.issue(0);
  cp_async_wait<1>();
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int t = lane & 3;
  const ThreadRows rows = thread_rows(w.s0, w.r, w.d, key_ok);
  const int64_t(&row_pos)[2] = rows.pos;
  const bool(&row_ok)[2] = rows.ok;
  const OperandFragments<DP, S::kOperandsInRegisters> kf(sK + warp * 16 * kPitch, lane);
  const OperandFragments<DP, S::kOperandsInRegisters> vf(sV + warp * 16 * kPitch, lane);
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  float dk[DP / 8][4] = {}, dv[DP / 8][4] = {};

  queries.run(rows, [&](const uint16_t* sQ, const uint16_t* sdO, int stage, auto allowed) {
    float st[kNT][4] = {}, dpt[kNT][4] = {};
    mma_times_rows_transposed<T, DP, kNT>(st, kf, sQ, lane);
    mma_times_rows_transposed<T, DP, kNT>(dpt, vf, sdO, lane);
    // This lane's query columns 2t + c: their lse (log2 units) and delta.
    const float* lane_lse = queries.values(stage, 0) + 2 * t;
    const float* lane_delta = queries.values(stage, 1) + 2 * t;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, c = 8 * j + (e & 1);
        const float pv = allowed(i, c) ? exp2f(st[j][e] * scale_log2 - lane_lse[c]) : 0.0f;
        st[j][e] = pv;                                  // P^T
        dpt[j][e] = pv * (dpt[j][e] - lane_delta[c]);  // dS^T
      }
    }
    mma_accumulate_rows<T, DP, kBlockK>(dv, st, sdO, lane);
    mma_accumulate_rows<T, DP, kBlockK>(dk, dpt, sQ, lane);
  });
  store_rows<T, DP>(dk, p.grad_k, w, row_pos, row_ok, D, static_cast<float>(p.scale), lane);
  store_rows<T, DP>(dv, p.grad_v, w, row_pos, row_ok, D, 1.0f, lane);
}

template <typename T, int DP>
int launch_local_backward_mma(const AttentionParams& p, const GlobalKeys& g, const float* delta, void* stream) {
  const int64_t slots = slots_per_head(p);
  dim3 grid;
  if (!grid_for_blocks(p.batch * p.heads * slots, grid)) return 1;  // cudaErrorInvalidValue: too many blocks
  const RowMajorHeads* operands[] = {&p.q, &p.k, &p.v, &p.grad_out};
  const bool vec = rows_are_16_byte_aligned(p.head_dim, operands, 4);
  auto dq = local_dq_mma_kernel<T, DP>;
  auto dkdv = local_dkdv_mma_kernel<T, DP>;
  constexpr int64_t kDqBytes = BwdTiles<DP, false>::kSmemBytes, kDkdvBytes = BwdTiles<DP, true>::kSmemBytes;
  if (const int err = allow_shared_bytes(dq, kDqBytes)) return err;
  if (const int err = allow_shared_bytes(dkdv, kDkdvBytes)) return err;
  if (const int err = LONGFORMER_LAUNCH(dq, grid, dim3(kThreads, 1, 1), static_cast<int>(kDqBytes), stream, p, g,
                                        delta, slots, vec))
    return err;
  return LONGFORMER_LAUNCH(dkdv, grid, dim3(kThreads, 1, 1), static_cast<int>(kDkdvBytes), stream, p, delta, slots,
                           vec);
}

template <typename T>
int dispatch_head_dim(const AttentionParams& p, const GlobalKeys& g, const float* delta, void* stream) {
  if (p.head_dim <= 32) return launch_local_backward_mma<T, 32>(p, g, delta, stream);
  if (p.head_dim <= 64) return launch_local_backward_mma<T, 64>(p, g, delta, stream);
  if (p.head_dim <= 128) return launch_local_backward_mma<T, 128>(p, g, delta, stream);
  return 1;  // cudaErrorInvalidValue: see banded_attention_backward_mma_supports
}

}  // namespace

bool banded_attention_backward_mma_supports(const AttentionParams& p, DType dtype) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && p.head_dim <= 128;
}

int banded_attention_backward_mma_local(const AttentionParams& p, const GlobalKeys& g, const float* delta,
                                        DType dtype, void* stream) {
  switch (dtype) {
    case DType::kFloat16:
      return dispatch_head_dim<__half>(p, g, delta, stream);
    case DType::kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(p, g, delta, stream);
    default:
      return 1;  // cudaErrorInvalidValue: tensor cores take fp16 / bf16 only
  }
}

}  // namespace longformer::cuda
