// Fused banded attention forward on tensor cores (fp16 / bf16 in, fp32 softmax and accumulation):
// the rows of LOCAL queries (docs/design.md §2). A local query i of head h attends to its band keys
// j = i + t * dilation[h], t in [-left, right], 0 <= j < N, that are real and local, plus every real
// global key once; with causal no key j > i. Global and padding rows are left as the glue
// initialised them (out 0, lse -inf), and so is a row that ends up with no key.
//
// Work decomposition. With dilation d, query i only meets band keys j = i (mod d): the dilated band
// over N positions is d undilated bands over the strided subsequences r, r + d, r + 2d, ...
// (docs/design.md §2.1, the dilation identity). A thread block takes (batch b, head h, residue r < d,
// tile of 64 consecutive rows s of subsequence r, i.e. positions r + s*d). Its band keys are
// subsequence indices [s0 - left, s_last + right], processed in key tiles gathered into shared
// memory; then come tiles of the gathered global keys (GlobalKeys), whose positions are arbitrary.
// K/V tiles go through a two-stage cp.async pipeline (async_copy.h): while the warps compute on one
// stage, the copies of the next tile are in flight into the other. A tile's roles become one bit
// mask per warp (a ballot over the tile's key flags), and tiles wholly inside every row's band with
// only real keys skip per-element masking.
// Four warps hold 16 query rows each. Per key tile a warp computes S = Q K^T with mma.sync
// m16n8k16 (K and V fragments through ldmatrix, V with .trans), masks it (-inf, never NaN),
// updates a per-row online softmax (running max and sum in fp32, rows spread over lane quads), and
// accumulates O += P V with P rounded to 16 bits and reused in registers as the A fragment.
//
// Head dims 32, 64, 128 are compile-time tiles; any other D <= 256 runs in the next tile (32, 64,
// 128, 256) with the missing columns zero in shared memory, so they add nothing to Q K^T and their
// output columns are never written.
#include <cstdint>

#include "async_copy.h"
#include "device.h"
#include "launchers.h"
#include "mma.h"

#ifdef LONGFORMER_HOST_EMULATION
#define LONGFORMER_MMA_FWD_BOUNDS
#else
// 128 threads per block; lets ptxas use up to 255 registers per thread (no forced spills).
#define LONGFORMER_MMA_FWD_BOUNDS __launch_bounds__(128)
#endif

namespace longformer::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockQ = kWarps * 16;  // query rows per block: 16 per warp (the mma M dimension)

// Compile-time shape of one instantiation; DP is the padded head dim.
template <int DP>
struct FwdTiles {
  static_assert(DP == 32 || DP == 64 || DP == 128 || DP == 256, "padded head dims");
  // Keys per tile: 64 keeps S at 32 registers per thread; at DP = 256 the O accumulator alone is
  // 128 registers, so S shrinks to 32 keys.
  static constexpr int kBlockK = DP <= 128 ? 64 : 32;
  // Shared-memory row pitch in 16-bit elements. The extra 8 elements (16 bytes) shift consecutive
  // rows by 4 banks, so the 8 row addresses of one ldmatrix phase (and the 32-bit Q fragment loads
  // of 8 rows x 4 column pairs) hit distinct banks, while rows stay 16-byte aligned.
  static constexpr int kPitch = DP + 8;
  // Q fragments live in registers up to DP = 128 (32 registers); at 256 they are re-read from shared
  // memory per key tile to leave room for the accumulator.
  static constexpr bool kQInRegisters = DP <= 128;
  static constexpr int kChunksPerRow = DP / 8;  // 16-byte chunks
  static constexpr int kStages = 2;  // K/V pipeline depth
  static constexpr int64_t kQBytes = int64_t{kBlockQ} * kPitch * 2;
  static constexpr int64_t kKVBytes = int64_t{kBlockK} * kPitch * 2;
  // Layout: Q | K stages | V stages | key positions (int64) per stage | key flags per stage | query
  // flags. Every K/V row starts 16-byte aligned (kPitch * 2 is a multiple of 16), as cp.async needs.
  static constexpr int64_t kQOffset = 0;
  static constexpr int64_t kKOffset = kQOffset + kQBytes;
  static constexpr int64_t kVOffset = kKOffset + kStages * kKVBytes;
  static constexpr int64_t kKeyPosOffset = kVOffset + kStages * kKVBytes;
  static constexpr int64_t kKeyOkOffset = kKeyPosOffset + int64_t{kStages} * kBlockK * 8;
  static constexpr int64_t kQueryOkOffset = kKeyOkOffset + int64_t{kStages} * kBlockK;
  static constexpr int64_t kSmemBytes = kQueryOkOffset + kBlockQ;
  // All kBlockK keys of a tile real and in the tile's kind (the ballot mask of a full tile).
  static constexpr uint64_t kAllKeys = kBlockK == 64 ? ~uint64_t{0} : (uint64_t{1} << kBlockK) - 1;
};

// Device twin of RowMajorHeads::offset (host-only in params.h): int64 so big tensors cannot wrap.
__device__ __forceinline__ int64_t head_row_offset(const RowMajorHeads& x, int64_t b, int64_t h, int64_t n) {
  return b * x.stride_b + h * x.stride_h + n * x.stride_n;
}

// Starts the copy of one 16-byte chunk (8 elements) of a row of D 16-bit elements into shared
// memory; columns D..DP-1, and the whole row when src_row is null, become zero. With `vec`
// (D % 8 == 0 and 16-byte aligned rows: a chunk lies wholly inside or outside the row) it is a
// cp.async that lands at the next cp_async_wait covering it; otherwise a plain copy, there at once.
// `any_row` is a valid address for the zero-filling cp.async to name.
__device__ __forceinline__ void stage_row_chunk(uint16_t* dst_row, const uint16_t* src_row, int chunk, int64_t D,
                                                bool vec, const uint16_t* any_row) {
  const int col = chunk * 8;
  uint16_t* dst = dst_row + col;
  if (vec) {
    const bool from_source = src_row != nullptr && col < D;
    cp_async_16(dst, from_source ? src_row + col : any_row, from_source);
    return;
  }
  if (src_row != nullptr && col < D) {
    uint16_t tmp[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) tmp[e] = (col + e < D) ? src_row[col + e] : uint16_t{0};
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = tmp[e];
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) dst[e] = 0;
}

// Where a block's work lies, decoded from its linear index.
struct BlockWork {
  int64_t b, h, d, r, L, s0;  // subsequence r has L rows; this block's rows are s0 .. s0 + 63
};

// Decodes slot `slot` of head h (dilation d) into (residue, tile). Residues r < N % d have
// q + 1 = ceil((N - r) / d) rows and come first; the rest have q = N / d. Slots past the last tile exit.
__device__ __forceinline__ bool decode_slot(int64_t slot, int64_t N, int64_t d, int64_t& r, int64_t& L,
                                            int64_t& tile) {
  const int64_t q = N / d, rem = N % d;
  const int64_t t1 = (q + 1 + kBlockQ - 1) / kBlockQ, t0 = (q + kBlockQ - 1) / kBlockQ;
  if (slot < rem * t1) {
    r = slot / t1;
    tile = slot % t1;
    L = q + 1;
    return true;
  }
  if (t0 == 0) return false;
  const int64_t s = slot - rem * t1;
  r = rem + s / t0;
  tile = s % t0;
  L = q;
  return r < d;
}

template <typename T, int DP>
__global__ void LONGFORMER_MMA_FWD_BOUNDS banded_attention_forward_mma_kernel(const AttentionParams p,
                                                                              const GlobalKeys gk,
                                                                              int64_t slots, bool vec) {
  using Tiles = FwdTiles<DP>;
  constexpr int kBlockK = Tiles::kBlockK;
  constexpr int kPitch = Tiles::kPitch;
  constexpr int kNT = kBlockK / 8;  // n-tiles of S per key tile
  constexpr int kKS = DP / 16;      // k-steps of Q K^T
  constexpr int kON = DP / 8;       // n-tiles of O
  constexpr float kLn2 = 0.693147180559945309f;
  constexpr unsigned kFull = 0xffffffffu;

  // ---- which (b, h, r, tile) this block owns
  const int64_t linear = int64_t{blockIdx.x} + int64_t{blockIdx.y} * int64_t{gridDim.x};
  const int64_t H = p.heads, N = p.seqlen, D = p.head_dim;
  if (linear >= p.batch * H * slots) return;
  const int64_t slot = linear % slots;
  const int64_t h = (linear / slots) % H;
  const int64_t b = linear / (slots * H);
  const int64_t d = p.dilation[h];
  int64_t r, L, query_tile;
  if (!decode_slot(slot, N, d, r, L, query_tile)) return;
  const int64_t s0 = query_tile * kBlockQ;
  const int rows = static_cast<int>(L - s0 < kBlockQ ? L - s0 : kBlockQ);
  // Windows wider than the subsequence act like L; clamping keeps all index arithmetic small.
  const int64_t left = p.window_left < L ? p.window_left : L;
  const int64_t right_raw = p.causal ? 0 : p.window_right;  // causal: no band key right of the diagonal
  const int64_t right = right_raw < L ? right_raw : L;
  const int64_t band_begin = s0 - left > 0 ? s0 - left : 0;
  const int64_t band_end_raw = s0 + rows + right;  // exclusive
  const int64_t band_end = band_end_raw < L ? band_end_raw : L;

  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem + Tiles::kQOffset);
  // Stage s of each: base + s * kBlockK rows (or entries).
  uint16_t* sK_stages = reinterpret_cast<uint16_t*>(smem + Tiles::kKOffset);
  uint16_t* sV_stages = reinterpret_cast<uint16_t*>(smem + Tiles::kVOffset);
  int64_t* key_pos_stages = reinterpret_cast<int64_t*>(smem + Tiles::kKeyPosOffset);
  unsigned char* key_ok_stages = smem + Tiles::kKeyOkOffset;
  unsigned char* query_ok = smem + Tiles::kQueryOkOffset;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const uint8_t* roles = p.roles + b * N;
  const uint16_t* q_base = static_cast<const uint16_t*>(p.q.data);
  const uint16_t* k_base = static_cast<const uint16_t*>(p.k.data);
  const uint16_t* v_base = static_cast<const uint16_t*>(p.v.data);

  // ---- Q tile (rows that are not local real queries are zero: they are never written)
  for (int c = tid; c < kBlockQ * Tiles::kChunksPerRow; c += kThreads) {
    const int row = c / Tiles::kChunksPerRow, chunk = c % Tiles::kChunksPerRow;
    const uint16_t* src = nullptr;
    if (row < rows) {
      const int64_t pos = r + (s0 + row) * d;
      if (roles[pos] == kLocal) src = q_base + head_row_offset(p.q, b, h, pos);
    }
    if (chunk == 0) query_ok[row] = src != nullptr;
    stage_row_chunk(sQ + row * kPitch, src, chunk, D, vec, q_base);
  }
  cp_async_commit();

  // ---- key tiles: band tiles (subsequence indices [band_begin, band_end)), then global key tiles
  const int64_t band_tiles = band_end > band_begin ? (band_end - band_begin + kBlockK - 1) / kBlockK : 0;
  const int64_t global_count = gk.count[b];
  const int64_t* global_index = gk.index + b * N;
  const int64_t tiles = band_tiles + (global_count + kBlockK - 1) / kBlockK;
  // Starts the copies of key tile `tile` into stage tile % 2 and commits them as one group (an empty
  // group past the last tile, so that every iteration waits for the same count). Keys that are not
  // real keys of the tile's kind (band tiles: local; global tiles: global) are zero rows with flag
  // 0, so that a NaN in a padding row cannot reach P V through 0 * NaN.
  auto issue_tile = [&](int64_t tile) {
    if (tile < tiles) {
      const int stage = static_cast<int>(tile % Tiles::kStages);
      uint16_t* sK = sK_stages + stage * kBlockK * kPitch;
      uint16_t* sV = sV_stages + stage * kBlockK * kPitch;
      const bool band = tile < band_tiles;
      const int64_t first = band ? band_begin + tile * kBlockK : (tile - band_tiles) * kBlockK;
      for (int c = tid; c < kBlockK * Tiles::kChunksPerRow; c += kThreads) {
        const int row = c / Tiles::kChunksPerRow, chunk = c % Tiles::kChunksPerRow;
        const int64_t index = first + row;
        int64_t pos = 0;
        bool ok = false;
        if (band) {
          if (index < band_end) {
            pos = r + index * d;
            ok = roles[pos] == kLocal;  // globals come once, from the global tiles
          }
        } else if (index < global_count) {
          pos = global_index[index];
          ok = roles[pos] == kGlobal;  // a padding token marked global is padding (the list should agree)
        }
        if (chunk == 0) {
          key_ok_stages[stage * kBlockK + row] = ok;
          key_pos_stages[stage * kBlockK + row] = pos;
        }
        stage_row_chunk(sK + row * kPitch, ok ? k_base + head_row_offset(p.k, b, h, pos) : nullptr, chunk, D, vec,
                        k_base);
        stage_row_chunk(sV + row * kPitch, ok ? v_base + head_row_offset(p.v, b, h, pos) : nullptr, chunk, D, vec,
                        v_base);
      }
    }
    cp_async_commit();
  };
  issue_tile(0);
  cp_async_wait<1>();  // the Q group landed (tile 0 may still be in flight)
  __syncthreads();

  // ---- this thread's two rows: rr[0] = warp*16 + g, rr[1] = rr[0] + 8
  int64_t row_s[2], row_pos[2];
  bool row_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int rr = warp * 16 + g + 8 * i;
    row_s[i] = s0 + rr;
    row_pos[i] = r + row_s[i] * d;
    row_ok[i] = query_ok[rr] != 0;
  }
  // A warp whose 16 rows are all padding/global/out of range does no math (it still joins barriers).
  const bool warp_active = __any_sync(kFull, row_ok[0] || row_ok[1]);
  // Subsequence indices this warp's rows can reach in the band (for skipping whole key tiles).
  const int64_t warp_s_first = s0 + warp * 16;
  const int64_t warp_key_lo = warp_s_first - left, warp_key_hi = warp_s_first + 15 + right;

  uint32_t qf[Tiles::kQInRegisters ? kKS : 1][4];
  if constexpr (Tiles::kQInRegisters) {
    const uint16_t* q0 = sQ + (warp * 16 + g) * kPitch + 2 * t;
#pragma unroll
    for (int ks = 0; ks < kKS; ++ks) {
      qf[ks][0] = load_u32(q0 + ks * 16);
      qf[ks][1] = load_u32(q0 + 8 * kPitch + ks * 16);
      qf[ks][2] = load_u32(q0 + ks * 16 + 8);
      qf[ks][3] = load_u32(q0 + 8 * kPitch + ks * 16 + 8);
    }
  }

  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  float o[kON][4];
#pragma unroll
  for (int n = 0; n < kON; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // Running max (of score * scale * log2 e) and this lane's partial sum of exp2(x - max), per row.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};

  // One key tile already in shared memory: S = Q K^T, mask, online softmax, O += P V.
  // `allowed(i, c)` says whether row i (0: g, 1: g + 8) may see key column 2t + c of the tile; c is
  // a compile-time constant after unrolling, so the lambdas fold this lane's 2t into their bounds
  // once per tile instead of per element.
  auto process_tile = [&](const uint16_t* sK, const uint16_t* sV, auto allowed) {
    float s[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKS; ++ks) {
      uint32_t a[4];
      if constexpr (Tiles::kQInRegisters) {
        a[0] = qf[ks][0], a[1] = qf[ks][1], a[2] = qf[ks][2], a[3] = qf[ks][3];
      } else {
        const uint16_t* q0 = sQ + (warp * 16 + g) * kPitch + 2 * t + ks * 16;
        a[0] = load_u32(q0);
        a[1] = load_u32(q0 + 8 * kPitch);
        a[2] = load_u32(q0 + 8);
        a[3] = load_u32(q0 + 8 * kPitch + 8);
      }
      // B[k][n] = K[key 8j + n][dim 16 ks + k]: a key row of K is a column of K^T.
      if constexpr (DP <= 128) {
        // Plain ldmatrix, rows are keys. Matrices: (keys 8j.., dims +0..7), (8j.., +8..15),
        // (8j+8.., +0..7), (8j+8.., +8..15).
#pragma unroll
        for (int j = 0; j < kNT; j += 2) {
          uint32_t kb[4];
          ldmatrix_x4<false>(kb, sK + (8 * j + 8 * (lane >> 4) + (lane & 7)) * kPitch + ks * 16 + 8 * ((lane >> 3) & 1));
          const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
          mma_m16n8k16_f32<T>(s[j], a, b0, s[j]);
          mma_m16n8k16_f32<T>(s[j + 1], a, b1, s[j + 1]);
        }
      } else {
        // DP = 256: 32-bit loads (fewer live registers than ldmatrix.x4; ptxas spilled with it).
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const uint16_t* k0 = sK + (8 * j + g) * kPitch + ks * 16 + 2 * t;
          const uint32_t bb[2] = {load_u32(k0), load_u32(k0 + 8)};
          mma_m16n8k16_f32<T>(s[j], a, bb, s[j]);
        }
      }
    }

    // Mask and scale; masked entries are -inf (exp2 gives exactly 0 for them).
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, c = 8 * j + (e & 1);
        const float x = allowed(i, c) ? s[j][e] * scale_log2 : -INFINITY;
        s[j][e] = x;
        tile_max[i] = fmaxf(tile_max[i], x);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // The four lanes of a quad hold the same two rows.
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(kFull, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(kFull, tile_max[i], 2));
      const float new_max = fmaxf(row_max[i], tile_max[i]);
      // While a row has seen no key its max is -inf; subtracting 0 instead keeps exp2(-inf - m)
      // at 0 rather than NaN (-inf - -inf).
      base[i] = new_max == -INFINITY ? 0.0f : new_max;
      alpha[i] = exp2f(row_max[i] - base[i]);  // 0 when the old max was -inf
      row_max[i] = new_max;
      row_sum[i] *= alpha[i];
    }
#pragma unroll
    for (int n = 0; n < kON; ++n) {
      o[n][0] *= alpha[0], o[n][1] *= alpha[0];
      o[n][2] *= alpha[1], o[n][3] *= alpha[1];
    }
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = exp2f(s[j][e] - base[e >> 1]);
        s[j][e] = pv;
        row_sum[e >> 1] += pv;
      }
    }

    // O += P V. The C fragments of S n-tiles 2kk and 2kk+1 are exactly the A fragment of keys
    // 16kk .. 16kk+15 (see mma.h), so P never leaves registers.
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      const uint32_t a[4] = {pack_f32x2<T>(s[2 * kk][0], s[2 * kk][1]), pack_f32x2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack_f32x2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_f32x2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      // B[k][n] = V[key 16kk + k][dim 8n + n']: rows of V are the k index, hence ldmatrix .trans.
      // Matrices: (keys +0..7, dims 8n..), (keys +8..15, dims 8n..), then the same for n + 1.
      if constexpr (DP <= 128) {
        const uint16_t* v0 = sV + (16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7)) * kPitch + 8 * (lane >> 4);
#pragma unroll
        for (int n = 0; n < kON; n += 2) {
          uint32_t vb[4];
          ldmatrix_x4<true>(vb, v0 + 8 * n);
          const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
          mma_m16n8k16_f32<T>(o[n], a, b0, o[n]);
          mma_m16n8k16_f32<T>(o[n + 1], a, b1, o[n + 1]);
        }
      } else {
        // DP = 256: two 16-bit loads per register (with ldmatrix ptxas spilled next to the
        // 128-register accumulator).
        const uint16_t* v0 = sV + (16 * kk + 2 * t) * kPitch + g;
#pragma unroll
        for (int n = 0; n < kON; ++n) {
          const uint16_t* vn = v0 + 8 * n;
          const uint32_t bb[2] = {pack_bits(vn[0], vn[kPitch]), pack_bits(vn[8 * kPitch], vn[9 * kPitch])};
          mma_m16n8k16_f32<T>(o[n], a, bb, o[n]);
        }
      }
    }
  };

  // ---- the pipeline: copies of tile + 1 in flight while tile is computed
  const bool causal = p.causal;
  const auto every_key = [](int, int) { return true; };
  for (int64_t tile = 0; tile < tiles; ++tile) {
    issue_tile(tile + 1);
    cp_async_wait<1>();  // this thread's copies of `tile` landed (only tile + 1 may be in flight)
    __syncthreads();     // ... and every other thread's
    const int stage = static_cast<int>(tile % Tiles::kStages);
    const uint16_t* sK = sK_stages + stage * kBlockK * kPitch;
    const uint16_t* sV = sV_stages + stage * kBlockK * kPitch;
    const unsigned char* key_ok = key_ok_stages + stage * kBlockK;
    const bool band = tile < band_tiles;
    const int64_t kt0 = band_begin + tile * kBlockK;
    // Warp-uniform skip: no row is computed, or (band) no row of this warp reaches the tile.
    const bool skip = !warp_active || (band && (warp_key_hi < kt0 || warp_key_lo >= kt0 + kBlockK));
    if (!skip) {
      // The tile's key flags as one bit mask, shifted so that bit c is this lane's column 2t + c.
      uint64_t keys = __ballot_sync(kFull, key_ok[lane] != 0);
      if constexpr (kBlockK == 64) keys |= uint64_t{__ballot_sync(kFull, key_ok[32 + lane] != 0)} << 32;
      const bool all_keys = keys == Tiles::kAllKeys;
      const uint64_t lane_keys = keys >> (2 * t);
      if (band) {
        // Row i sees tile columns kt0 + col in [s_i - left, s_i + right]; as ints relative to this
        // lane's first column kt0 + 2t.
        int lo[2], hi[2];
        bool inside = true;  // every computed row of this thread sees the whole tile
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int64_t l64 = row_s[i] - left - kt0, h64 = row_s[i] + right - kt0;
          inside &= !row_ok[i] || (l64 <= 0 && h64 >= kBlockK - 1);
          lo[i] = static_cast<int>(l64 < -1 ? -1 : (l64 > kBlockK ? kBlockK : l64)) - 2 * t;
          hi[i] = static_cast<int>(h64 < -1 ? -1 : (h64 > kBlockK ? kBlockK : h64)) - 2 * t;
        }
        if (__all_sync(kFull, all_keys && inside)) {
          process_tile(sK, sV, every_key);
        } else {
          process_tile(sK, sV, [&](int i, int c) { return ((lane_keys >> c) & 1) != 0 && c >= lo[i] && c <= hi[i]; });
        }
      } else if (!causal && all_keys) {
        process_tile(sK, sV, every_key);
      } else {
        const int64_t* lane_pos = key_pos_stages + stage * kBlockK + 2 * t;
        process_tile(sK, sV, [&](int i, int c) {
          return ((lane_keys >> c) & 1) != 0 && (!causal || lane_pos[c] <= row_pos[i]);
        });
      }
    }
    __syncthreads();  // every warp is done with this stage before issue_tile(tile + 2) refills it
  }

  // ---- finish: full row sums across the quad, normalise, write local rows that saw a key
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] += __shfl_xor_sync(kFull, row_sum[i], 1);
    row_sum[i] += __shfl_xor_sync(kFull, row_sum[i], 2);
  }
  uint16_t* out_base = static_cast<uint16_t*>(p.out.data);
  float* lse = static_cast<float*>(p.lse);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!row_ok[i] || !(row_sum[i] > 0.0f)) continue;
    const float inv = 1.0f / row_sum[i];
    uint16_t* dst = out_base + head_row_offset(p.out, b, h, row_pos[i]);
#pragma unroll
    for (int n = 0; n < kON; ++n) {
      const int col = 8 * n + 2 * t;
      if (col < D) dst[col] = float_to_bits<T>(o[n][2 * i] * inv);
      if (col + 1 < D) dst[col + 1] = float_to_bits<T>(o[n][2 * i + 1] * inv);
    }
    // lse = log(sum_j exp(score_j * scale)) = max * ln 2 + log(sum_j exp2(x_j - max)), x in log2 units.
    if (t == 0) lse[(b * H + h) * N + row_pos[i]] = row_max[i] * kLn2 + logf(row_sum[i]);
  }
}

template <typename T, int DP>
int launch_forward_mma(const AttentionParams& p, const GlobalKeys& g, void* stream) {
  using Tiles = FwdTiles<DP>;
  // Slots per (batch, head): every residue's tiles, summed, never exceed ceil(N / 64) + dilation.
  const int64_t slots = (p.seqlen + kBlockQ - 1) / kBlockQ + p.max_dilation;
  const int64_t blocks = p.batch * p.heads * slots;
  // Fold into x; y only for the (huge) remainder beyond 2^31 - 1 blocks.
  const int64_t max_x = 2147483647;
  const int64_t gx = blocks < max_x ? blocks : max_x;
  const int64_t gy = (blocks + gx - 1) / gx;
  if (gy > 65535) return 1;  // cudaErrorInvalidValue: more blocks than a grid can hold
  // 16-byte loads need rows of whole 16-byte chunks at 16-byte aligned addresses.
  auto aligned = [](const RowMajorHeads& x) {
    return reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && x.stride_b % 8 == 0 && x.stride_h % 8 == 0 &&
           x.stride_n % 8 == 0;
  };
  const bool vec = p.head_dim % 8 == 0 && aligned(p.q) && aligned(p.k) && aligned(p.v);
  auto kernel = banded_attention_forward_mma_kernel<T, DP>;
  // DP = 128 and 256 need more than the default 48 KiB of dynamic shared memory.
  if (const int err = allow_shared_bytes(kernel, Tiles::kSmemBytes)) return err;
  return LONGFORMER_LAUNCH(kernel, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), dim3(kThreads, 1, 1),
                           static_cast<int>(Tiles::kSmemBytes), stream, p, g, slots, vec);
}

template <typename T>
int dispatch_head_dim(const AttentionParams& p, const GlobalKeys& g, void* stream) {
  if (p.head_dim <= 32) return launch_forward_mma<T, 32>(p, g, stream);
  if (p.head_dim <= 64) return launch_forward_mma<T, 64>(p, g, stream);
  if (p.head_dim <= 128) return launch_forward_mma<T, 128>(p, g, stream);
  if (p.head_dim <= 256) return launch_forward_mma<T, 256>(p, g, stream);
  return 1;  // cudaErrorInvalidValue: head dims above 256 are not supported by this path
}

}  // namespace

int banded_attention_forward_mma(const AttentionParams& p, const GlobalKeys& g, DType dtype, void* stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen == 0) return 0;
  switch (dtype) {
    case DType::kFloat16:
      return dispatch_head_dim<__half>(p, g, stream);
    case DType::kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(p, g, stream);
    default:
      return 1;  // cudaErrorInvalidValue: tensor cores take fp16 / bf16 only (fp32/fp64: SIMT path)
  }
}

}  // namespace longformer::cuda
