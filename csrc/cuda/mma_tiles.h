// What the tiled attention kernels (the *_mma.cu files) share: the block decomposition over
// dilation residues, the shared-memory row layout, the two warp-level tile products, and the
// pipeline of key tiles that a block of 64 query rows walks (band tiles, then tiles of gathered
// global keys). Every piece takes the tiles' type T: float16 / bfloat16 tiles hold 16-bit patterns
// and multiply on tensor cores (mma.h); float32 tiles hold floats and multiply on FMA in the same
// fragment layout (fma_tiles.h), exact fp32, or, as Tf32, on tensor cores as TF32 (tf32_tiles.h).
//
// Block decomposition. With dilation d, position i only meets band positions j = i (mod d): the
// dilated band over N positions is d undilated bands over the strided subsequences r, r + d,
// r + 2d, ... (docs/design.md §2.1, the dilation identity). A block takes (batch b, head h,
// residue r < d, tile of 64 consecutive indices s of subsequence r, i.e. positions r + s*d); four
// warps hold 16 rows each (the mma M dimension).
#pragma once

#include <cstdint>

#include "async_copy.h"
#include "device.h"
#include "fma_tiles.h"
#include "launchers.h"
#include "mma.h"
#include "tf32_tiles.h"

#ifdef LONGFORMER_HOST_EMULATION
#define LONGFORMER_MMA_BOUNDS(T, kGeneral)
#else
// The tiled kernels' blocks: 128 threads, up to 255 registers per thread. Float tiles also ask for
// at least one resident block: without it ptxas aimed at 128 registers and spilled 8-16 bytes to
// local memory in some instantiations. The plain 16-bit tiles give no minimum (0), which keeps the
// counts their budgets were set with (with 1, ptxas took up to 21 more, a block fewer per SM); their
// general op's instantiations (kGeneral) ask for 1: with 0 the forwards at D = 64 stayed at 168
// registers and spilled 16-24 bytes.
#define LONGFORMER_MMA_BOUNDS(T, kGeneral) \
  __launch_bounds__(128, longformer::cuda::mma_tiles::kFloatTiles<T> || (kGeneral) ? 1 : 0)
#endif

namespace longformer::cuda::mma_tiles {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockRows = kWarps * 16;  // rows per block: 16 per warp
constexpr unsigned kFull = 0xffffffffu;

// The tiles' type of float32 inputs whose products run as TF32 (DType::kFloat32Tf32).
struct Tf32 {};

// Tiles of float32 inputs (T = float: exact FMA products; T = Tf32: TF32 tensor cores).
template <typename T>
constexpr bool kFloatTiles = std::is_same_v<T, float> || std::is_same_v<T, Tf32>;

// The element of a tile in shared memory: the 16-bit pattern of a float16 / bfloat16 value
// (kernels never do arithmetic on those types themselves), or a float.
template <typename T>
using TileElem = std::conditional_t<kFloatTiles<T>, float, uint16_t>;

template <typename T>
__device__ __forceinline__ float elem_to_float(TileElem<T> x) {
  if constexpr (kFloatTiles<T>) {
    return x;
  } else {
    return bits_to_float<T>(x);
  }
}
template <typename T>
__device__ __forceinline__ TileElem<T> float_to_elem(float x) {
  if constexpr (kFloatTiles<T>) {
    return x;
  } else {
    return float_to_bits<T>(x);
  }
}

// Shared-memory rows of a padded head dim DP. The extra 16 bytes shift consecutive rows by 4
// banks, so the 8 row addresses of one ldmatrix phase (16-bit tiles) or of one quarter of a float
// load pattern (fma_tiles.h) hit distinct banks, while rows stay 16-byte aligned (as ldmatrix,
// cp.async and 16-byte loads need).
template <typename T, int DP>
struct Rows {
  static_assert(DP == 32 || DP == 64 || DP == 128 || DP == 256, "padded head dims");
  static constexpr int kPerChunk = 16 / static_cast<int>(sizeof(TileElem<T>));  // elements per 16 bytes
  static constexpr int kPitch = DP + kPerChunk;
  static constexpr int kChunks = DP / kPerChunk;  // 16-byte chunks per row
  static constexpr int64_t bytes(int rows) { return int64_t{rows} * kPitch * int64_t{sizeof(TileElem<T>)}; }
};

// Whether 16-byte copies are legal for every operand of dtype T: whole 16-byte chunks per row
// (D % 8 == 0 for 16-bit types, D % 4 == 0 for float) and 16-byte aligned rows.
template <typename T>
inline bool rows_are_16_byte_aligned(int64_t head_dim, const RowMajorHeads* const* operands, int count) {
  constexpr int64_t kPer = 16 / sizeof(TileElem<T>);
  if (head_dim % kPer != 0) return false;
  for (int i = 0; i < count; ++i) {
    const RowMajorHeads& x = *operands[i];
    if (reinterpret_cast<uintptr_t>(x.data) % 16 != 0 || x.stride_b % kPer != 0 || x.stride_h % kPer != 0 ||
        x.stride_n % kPer != 0)
      return false;
  }
  return true;
}

// Starts the copy of one 16-byte chunk of a row of D elements into shared memory; columns
// D..DP-1, and the whole row when src_row is null, become zero. With `vec` it is a cp.async that
// lands at the next cp_async_wait covering it; otherwise a plain copy, there at once. `any_row` is a
// valid address for the zero-filling cp.async to name.
template <typename T>
__device__ __forceinline__ void stage_row_chunk(TileElem<T>* dst_row, const TileElem<T>* src_row, int chunk,
                                                int64_t D, bool vec, const TileElem<T>* any_row) {
  using E = TileElem<T>;
  constexpr int kPer = 16 / static_cast<int>(sizeof(E));
  const int col = chunk * kPer;
  E* dst = dst_row + col;
  if (vec) {  // whole chunks per row: a chunk lies wholly inside or outside the row
    const bool from_source = src_row != nullptr && col < D;
    cp_async_16(dst, from_source ? src_row + col : any_row, from_source);
    return;
  }
  if (src_row != nullptr && col < D) {
    E tmp[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) tmp[e] = (col + e < D) ? src_row[col + e] : E{0};
#pragma unroll
    for (int e = 0; e < kPer; ++e) dst[e] = tmp[e];
    return;
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e) dst[e] = E{0};
}

// Starts the copies of a block's kBlockRows rows of operand `a` (and of `b` when given) into
// shared memory rows as part of the current cp.async group. row_at(row, pos) says whether row
// `row` is staged and sets its position; rows not staged are zero with flag 0. The flags go to
// row_ok, the positions to row_pos when it is given.
template <typename T, int DP, typename RowAt>
__device__ __forceinline__ void stage_rows(int64_t batch, int64_t head, int64_t D, const RowMajorHeads& a,
                                           TileElem<T>* sA, const RowMajorHeads* b, TileElem<T>* sB, bool vec,
                                           unsigned char* row_ok, int64_t* row_pos, RowAt&& row_at) {
  using E = TileElem<T>;
  using R = Rows<T, DP>;
  const E* a_base = static_cast<const E*>(a.data);
  for (int c = static_cast<int>(threadIdx.x); c < kBlockRows * R::kChunks; c += kThreads) {
    const int row = c / R::kChunks, chunk = c % R::kChunks;
    int64_t pos = 0;
    const bool ok = row_at(row, pos);
    if (chunk == 0) {
      row_ok[row] = ok;
      if (row_pos != nullptr) row_pos[row] = pos;
    }
    stage_row_chunk<T>(sA + row * R::kPitch, ok ? a_base + a.offset(batch, head, pos) : nullptr, chunk,
                       D, vec, a_base);
    if (b != nullptr) {
      const E* b_base = static_cast<const E*>(b->data);
      stage_row_chunk<T>(sB + row * R::kPitch, ok ? b_base + b->offset(batch, head, pos) : nullptr,
                         chunk, D, vec, b_base);
    }
  }
}

// Decodes slot `slot` of a head with dilation d into (residue r, subsequence length L, tile).
// Residues r < N % d have q + 1 = ceil((N - r) / d) rows and come first; the rest have q = N / d.
// Slots past the last tile return false. Slots per (batch, head): ceil(N / 64) + d covers them all.
__device__ __forceinline__ bool decode_slot(int64_t slot, int64_t N, int64_t d, int64_t& r, int64_t& L,
                                            int64_t& tile) {
  const int64_t q = N / d, rem = N % d;
  const int64_t t1 = (q + 1 + kBlockRows - 1) / kBlockRows, t0 = (q + kBlockRows - 1) / kBlockRows;
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

// This block's (batch, head, residue r, subsequence length L, first row s0, row count), decoded
// from its linear index over batch x heads x slots; `valid` false for a slot past the last tile.
// The blocks take the positions [start, start + count): the queries [q_offset, q_offset + Nq) or
// the keys [0, N) (query_rows / key_rows). Their slots decode over that range's residues; a
// block's rows are then indices s0.. of the key subsequence r, r + d, ... of [0, N) (L of them),
// which is what the band tiles index.
struct BlockRows {
  int64_t b, h, d, r, L, s0;
  int rows;
  bool valid;
};

struct PositionRange {
  int64_t start, count;
};
LONGFORMER_HOST_DEVICE PositionRange query_rows(const AttentionParams& p) { return {p.q_offset, p.queries}; }
LONGFORMER_HOST_DEVICE PositionRange key_rows(const AttentionParams& p) { return {0, p.seqlen}; }

__device__ __forceinline__ BlockRows decode_block(const AttentionParams& p, int64_t slots, PositionRange range) {
  BlockRows w{};
  const int64_t linear = int64_t{blockIdx.x} + int64_t{blockIdx.y} * int64_t{gridDim.x};
  w.valid = false;
  if (linear >= p.batch * p.heads * slots) return w;
  const int64_t slot = linear % slots;
  w.h = (linear / slots) % p.heads;
  w.b = linear / (slots * p.heads);
  w.d = p.dilation[w.h];
  int64_t residue, length, tile;  // of the range: positions start + residue + s * d, s < length
  if (!decode_slot(slot, range.count, w.d, residue, length, tile)) return w;
  if (range.start == 0 && range.count == p.seqlen) {  // the whole sequence: no further division
    w.r = residue;
    w.L = length;
    w.s0 = tile * kBlockRows;
  } else {
    const int64_t first = range.start + residue;
    w.r = first % w.d;
    w.L = (p.seqlen - w.r + w.d - 1) / w.d;
    w.s0 = first / w.d + tile * kBlockRows;
  }
  const int64_t left_in_range = length - tile * kBlockRows;
  w.rows = static_cast<int>(left_in_range < kBlockRows ? left_in_range : kBlockRows);
  w.valid = true;
  return w;
}

inline int64_t slots_per_head(const AttentionParams& p, PositionRange range) {
  return (range.count + kBlockRows - 1) / kBlockRows + p.max_dilation;
}

// The tiled kernels index q, out, grad_out, grad_q, the lse, its gradient and delta by *position*
// (query row i at q_offset + i): this is p with those pointers moved back by q_offset rows, so
// that row `position` of the moved pointer is query row position - q_offset. Their launchers call
// it once; no kernel then adds q_offset itself.
inline AttentionParams indexed_by_position(const AttentionParams& p, int64_t element_bytes) {
  AttentionParams s = p;
  const int64_t shift = p.q_offset;
  if (shift == 0) return s;
  for (RowMajorHeads* t : {&s.q, &s.out, &s.grad_out, &s.grad_q}) {
    if (t->data != nullptr) t->data = static_cast<char*>(t->data) - shift * t->stride_n * element_bytes;
  }
  if (s.lse != nullptr) s.lse = static_cast<float*>(s.lse) - shift;
  if (s.grad_lse != nullptr) s.grad_lse = static_cast<const float*>(s.grad_lse) - shift;
  return s;
}

// A grid of `blocks` blocks: x up to 2^31 - 1, y for the (huge) rest; false when it cannot hold them.
inline bool grid_for_blocks(int64_t blocks, dim3& grid) {
  const int64_t max_x = 2147483647;
  const int64_t gx = blocks < max_x ? blocks : max_x;
  const int64_t gy = (blocks + gx - 1) / gx;
  if (gy > 65535) return false;
  grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
  return true;
}

// What a tiled launcher is instantiated for: the tiles' type T, the padded head dim DP, and whether
// the kernels take the general op's arguments (kGeneral) or only Longformer's.
template <typename TileType, int kPaddedDim, bool kIsGeneral>
struct TiledShape {
  using T = TileType;
  static constexpr int DP = kPaddedDim;
  static constexpr bool kGeneral = kIsGeneral;
};

// The one place that picks a tiled instantiation: calls launch(TiledShape<T, DP, kGeneral>{}) for
// the tiles of `dtype`, the padded head dim of p (16-bit tiles up to kMax16BitDim, float tiles up
// to 128) and the general instantiation exactly when p is not Longformer-only, so that a Longformer
// call keeps the plain kernels' code. Returns 1 (cudaErrorInvalidValue) for what no instantiation
// takes, float64 included.
template <int kMax16BitDim, typename Launch>
int launch_tiled(const AttentionParams& p, DType dtype, Launch&& launch) {
  const bool general = !p.is_longformer_only();
  auto for_type = [&](auto tile_type) {
    using T = decltype(tile_type);
    if (p.head_dim <= 32) return general ? launch(TiledShape<T, 32, true>{}) : launch(TiledShape<T, 32, false>{});
    if (p.head_dim <= 64) return general ? launch(TiledShape<T, 64, true>{}) : launch(TiledShape<T, 64, false>{});
    if (p.head_dim <= 128) return general ? launch(TiledShape<T, 128, true>{}) : launch(TiledShape<T, 128, false>{});
    if constexpr (!kFloatTiles<T> && kMax16BitDim >= 256) {
      if (p.head_dim <= 256) return general ? launch(TiledShape<T, 256, true>{}) : launch(TiledShape<T, 256, false>{});
    }
    return 1;
  };
  switch (dtype) {
    case DType::kFloat16:
      return for_type(__half{});
    case DType::kBFloat16:
      return for_type(__nv_bfloat16{});
    case DType::kFloat32:
      return for_type(float{});
    case DType::kFloat32Tf32:
      return for_type(Tf32{});
    default:
      return 1;  // float64 takes the SIMT path
  }
}

// Whether launch_tiled can take p's arguments (the *_supports functions then check dtype and head
// dim): grouped KV heads run as slices of query heads (kv_group_slices.h).
inline bool tiled_arguments(const AttentionParams& p) { return p.heads_kv == p.heads; }

// ---------------------------------------------------------------------------------------------
// Warp-level tile products, accumulated in mma C fragments (fp32). The A operand is a warp's 16
// rows, given as OperandFragments (below): for 16-bit tiles its A fragments (16 rows x 16 of the k
// dimension, mma.h layouts) for k-step ks through a_frag(ks, a); for float tiles its rows in shared
// memory. Shared-memory operands are rows of Rows<T, DP>::kPitch elements.

// acc[j] += A B^T for n-tiles j < kNT, where B's rows 8j.. are shared-memory rows (keys) and its
// k index runs along them (DP columns): S = Q K^T, dP = dO V^T.
template <typename T, int DP, int kNT, typename AFrag>
__device__ __forceinline__ void warp_times_rows_transposed(float (&acc)[kNT][4], AFrag&& a_frag,
                                                           const TileElem<T>* rows, int lane) {
  constexpr int kPitch = Rows<T, DP>::kPitch;
  if constexpr (std::is_same_v<T, Tf32>) {
    tf32_tiles::times_rows_transposed<DP, kNT, kPitch>(acc, a_frag.rows, rows, lane);
  } else if constexpr (kFloatTiles<T>) {
    fma_tiles::times_rows_transposed<DP, kNT, kPitch>(acc, a_frag.rows, rows, lane);
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ++ks) {
      uint32_t a[4];
      a_frag(ks, a);
      if constexpr (DP <= 128) {
        // Plain ldmatrix, matrix rows are keys: (keys 8j.., k +0..7), (8j.., +8..15), (8j+8.., +0..7),
        // (8j+8.., +8..15).
#pragma unroll
        for (int j = 0; j < kNT; j += 2) {
          uint32_t kb[4];
          const int key = 8 * j + 8 * (lane >> 4) + (lane & 7);
          ldmatrix_x4<false>(kb, rows + key * kPitch + ks * 16 + 8 * ((lane >> 3) & 1));
          const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
          mma_m16n8k16_f32<T>(acc[j], a, b0, acc[j]);
          mma_m16n8k16_f32<T>(acc[j + 1], a, b1, acc[j + 1]);
        }
      } else {
        // DP = 256: 32-bit loads (fewer live registers than ldmatrix.x4; ptxas spilled with it).
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const uint16_t* k0 = rows + (8 * j + g) * kPitch + ks * 16 + 2 * t;
          const uint32_t bb[2] = {load_u32(k0), load_u32(k0 + 8)};
          mma_m16n8k16_f32<T>(acc[j], a, bb, acc[j]);
        }
      }
    }
  }
}

// acc[n] += P B for the DP / 8 n-tiles of B's columns, where P is 16 x kRows given as C fragments
// of kRows / 8 n-tiles (p[j], fp32; 16-bit tiles round it to T here, float tiles keep it, Tf32
// rounds it to TF32) and B's
// kRows rows are shared-memory rows: O = P V, dQ = dS K, dV = P^T dO, dK = dS^T Q. The C fragments
// of n-tiles 2kk and 2kk+1 are exactly the A fragment of k-step kk (mma.h), so P never leaves
// registers.
template <typename T, int DP, int kRows>
__device__ __forceinline__ void warp_accumulate_rows(float (&acc)[DP / 8][4], const float (&p)[kRows / 8][4],
                                                     const TileElem<T>* rows, int lane) {
  constexpr int kPitch = Rows<T, DP>::kPitch;
  if constexpr (std::is_same_v<T, Tf32>) {
    tf32_tiles::times_rows<DP, kRows, kPitch>(acc, p, rows, lane);
  } else if constexpr (kFloatTiles<T>) {
    fma_tiles::times_rows<DP, kRows, kPitch>(acc, p, rows, lane);
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < kRows / 16; ++kk) {
      const uint32_t a[4] = {pack_f32x2<T>(p[2 * kk][0], p[2 * kk][1]), pack_f32x2<T>(p[2 * kk][2], p[2 * kk][3]),
                             pack_f32x2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                             pack_f32x2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
      if constexpr (DP <= 128) {
        // B[k][n] = rows[16kk + k][8n + n']: rows are the k index, hence ldmatrix .trans. Matrices:
        // (rows +0..7, cols 8n..), (rows +8..15, cols 8n..), then the same for n + 1.
        const uint16_t* r0 = rows + (16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7)) * kPitch + 8 * (lane >> 4);
#pragma unroll
        for (int n = 0; n < DP / 8; n += 2) {
          uint32_t vb[4];
          ldmatrix_x4<true>(vb, r0 + 8 * n);
          const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
          mma_m16n8k16_f32<T>(acc[n], a, b0, acc[n]);
          mma_m16n8k16_f32<T>(acc[n + 1], a, b1, acc[n + 1]);
        }
      } else {
        // DP = 256: two 16-bit loads per register (with ldmatrix ptxas spilled next to the
        // 128-register accumulator).
        const uint16_t* r0 = rows + (16 * kk + 2 * t) * kPitch + g;
#pragma unroll
        for (int n = 0; n < DP / 8; ++n) {
          const uint16_t* rn = r0 + 8 * n;
          const uint32_t bb[2] = {pack_bits(rn[0], rn[kPitch]), pack_bits(rn[8 * kPitch], rn[9 * kPitch])};
          mma_m16n8k16_f32<T>(acc[n], a, bb, acc[n]);
        }
      }
    }
  }
}

// The A fragment of k-step ks from 16 shared-memory rows (row-major, kPitch elements apart).
template <int DP>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const uint16_t* first_row, int ks, int lane) {
  constexpr int kPitch = Rows<__half, DP>::kPitch;
  const uint16_t* p = first_row + (lane >> 2) * kPitch + 2 * (lane & 3) + ks * 16;
  a[0] = load_u32(p);
  a[1] = load_u32(p + 8 * kPitch);
  a[2] = load_u32(p + 8);
  a[3] = load_u32(p + 8 * kPitch + 8);
}

// This thread's two rows of a block (its warp's rows g and g + 8): their subsequence indices s,
// positions, and whether they are computed; and the subsequence indices of its warp's first and
// last row (rows ascend within a warp), which bound the keys the warp can reach.
struct ThreadRows {
  int64_t s[2], pos[2];
  bool ok[2];
  int64_t warp_first, warp_last;
};

// The rows of a block of consecutive subsequence indices s0.. of residue r (flags: the block's row
// flags in shared memory).
__device__ __forceinline__ ThreadRows thread_rows(int64_t s0, int64_t r, int64_t d, const unsigned char* row_flags) {
  const int warp_row0 = (static_cast<int>(threadIdx.x) >> 5) * 16;
  const int rr0 = warp_row0 + ((static_cast<int>(threadIdx.x) & 31) >> 2);
  ThreadRows rows;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    rows.s[i] = s0 + rr0 + 8 * i;
    rows.pos[i] = r + rows.s[i] * d;
    rows.ok[i] = row_flags[rr0 + 8 * i] != 0;
  }
  rows.warp_first = s0 + warp_row0;
  rows.warp_last = rows.warp_first + 15;
  return rows;
}

// This thread's two rows of a tile of gathered rows (positions ascending, `rows` of them), whose
// subsequence index is their position (dilation 1), and its warp's first and last row.
__device__ __forceinline__ ThreadRows gathered_rows(const int64_t* positions, const unsigned char* row_flags,
                                                    int rows) {
  const int warp_row0 = (static_cast<int>(threadIdx.x) >> 5) * 16;
  const int rr0 = warp_row0 + ((static_cast<int>(threadIdx.x) & 31) >> 2);
  ThreadRows out;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    out.s[i] = out.pos[i] = positions[rr0 + 8 * i];
    out.ok[i] = row_flags[rr0 + 8 * i] != 0;
  }
  // A warp without rows has no computed row and skips every tile; its bounds are never used.
  const int last = warp_row0 + 15 < rows - 1 ? warp_row0 + 15 : (rows > 0 ? rows - 1 : 0);
  out.warp_first = positions[warp_row0];
  out.warp_last = positions[last];
  return out;
}

// The A operand of the products above: a warp's 16 rows in shared memory. For 16-bit tiles, their
// A fragments for every k-step as a_frag: held in registers (kInRegisters) or re-read from shared
// memory per use (when registers are short). Float tiles read the rows themselves.
template <typename T, int DP, bool kInRegisters>
struct OperandFragments {
  static constexpr bool kHeld = kInRegisters && !kFloatTiles<T>;
  uint32_t f[kHeld ? DP / 16 : 1][4];
  const TileElem<T>* rows;
  int lane;
  __device__ __forceinline__ OperandFragments(const TileElem<T>* first_row, int lane_id)
      : rows(first_row), lane(lane_id) {
    if constexpr (kHeld) {
#pragma unroll
      for (int ks = 0; ks < DP / 16; ++ks) load_a_fragment<DP>(f[ks], rows, ks, lane);
    }
  }
  __device__ __forceinline__ void operator()(int ks, uint32_t (&a)[4]) const {
    static_assert(!kFloatTiles<T>, "float tiles have no A fragments");
    if constexpr (kHeld) {
      a[0] = f[ks][0], a[1] = f[ks][1], a[2] = f[ks][2], a[3] = f[ks][3];
    } else {
      load_a_fragment<DP>(a, rows, ks, lane);
    }
  }
};

// The key tiles of the forward kernels (banded_attention_forward_mma.cu,
// global_attention_forward_mma.cu). 16-bit tiles: 64 keys keep S at 32 registers per thread; at
// DP = 256 the O accumulator alone is 128 registers, so S shrinks to 16 keys (with 32, ptxas
// spilled 8 bytes on sm_90). Q fragments live in registers up to DP = 128 (32 registers); at 256
// they are re-read from shared memory per key tile to leave room for the accumulator. Float tiles
// (head dims up to 128) take twice the bytes per row: 64, 32 and 16 keys at DP = 32, 64 and 128
// keep a block's shared memory at 46, 52 and 66 KiB (under the 99 KiB that every sm_80+ GPU
// allows a block, and 3-4 blocks per SM on an H100).
template <typename T, int DP>
struct ForwardShape {
  static_assert(!kFloatTiles<T> || DP <= 128, "float tiles take head dims up to 128");
  static constexpr int kBlockK = kFloatTiles<T> ? (DP == 32 ? 64 : (DP == 64 ? 32 : 16)) : (DP <= 128 ? 64 : 16);
  static constexpr bool kQInRegisters = DP <= 128;
};

// The general op's score modifiers (docs/design.md §2.2) in the tiled kernels' kGeneral
// instantiations (the plain ones never see them): a score s = q . k becomes, in log2 units,
// x = log2 e * (softcap(s * scale) - slope * |query - key position|), softcap(z) = c tanh(z / c)
// where c > 0. The backward's chain rule takes d softcap(z) / dz = 1 - tanh^2 from the tanh that
// log2_score hands back; ALiBi's term has no gradient.
struct TileModifiers {
  float scale_log2 = 0.0f;
  float cap_scale = 0.0f, cap_log2 = 0.0f;  // scale / c and c log2 e; capped: c > 0
  float slope_log2 = 0.0f;                  // slope log2 e; 0 without ALiBi
  bool capped = false;

  TileModifiers() = default;
  __device__ __forceinline__ TileModifiers(const AttentionParams& p, int64_t h) {
    scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
    capped = p.softcap > 0.0;
    if (capped) {
      cap_scale = static_cast<float>(p.scale / p.softcap);
      cap_log2 = static_cast<float>(p.softcap * 1.4426950408889634);
    }
    if (p.alibi_slopes != nullptr) slope_log2 = static_cast<const float*>(p.alibi_slopes)[h] * 1.4426950408889634f;
  }
  // x of score s between the query at `query` and the key at `key`; `tanh_out` receives the cap's
  // tanh (0 without a cap).
  __device__ __forceinline__ float log2_score(float s, int64_t query, int64_t key, float& tanh_out) const {
    float x;
    if (capped) {
      tanh_out = tanhf(s * cap_scale);
      x = cap_log2 * tanh_out;
    } else {
      tanh_out = 0.0f;
      x = s * scale_log2;
    }
    if (slope_log2 != 0.0f) x -= slope_log2 * static_cast<float>(query > key ? query - key : key - query);
    return x;
  }
};

// The positions of this thread's two rows (kGeneral tiles: the scores' ALiBi distances).
struct RowPositions {
  int64_t pos[2];
};

// The online softmax of a warp's 16 query rows over a sequence of key tiles, held as mma C
// fragments (this thread: rows g and g + 8, spread over a lane quad): the running max of the
// scores in log2 units (x = score * scale * log2 e), this lane's part of each row's sum of
// exp2(x - max), and the unnormalised output O = sum_j exp2(x_j - max) v_j, all in fp32.
// kGeneral: the scores go through TileModifiers (which need the rows' and keys' positions) and
// finish() adds a sink's logit; a compile-time choice, so the plain kernels' hot loop is unchanged.
template <typename T, int DP, int kBlockK, bool kGeneral = false>
struct OnlineSoftmaxRows {
  static constexpr int kNT = kBlockK / 8;  // n-tiles of S per key tile
  static constexpr int kON = DP / 8;       // n-tiles of O
  float o[kON][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};

  // One key tile in shared memory: S = Q K^T, masked by allowed(i, c) (-inf: exp2 gives exactly 0),
  // rescale by the new max, P = exp2(x - max) (16-bit tiles: rounded to 16 bits as the A
  // fragment), O += P V.
  // kGeneral: `mods`, this thread's rows' positions and the tile's key positions from this lane's
  // first column (lane_keys[c] for column 2t + c).
  template <typename QFragments, typename Allowed>
  __device__ __forceinline__ void absorb(const QFragments& q, const TileElem<T>* sK, const TileElem<T>* sV,
                                         float scale_log2, Allowed&& allowed, int lane, TileModifiers mods = {},
                                         RowPositions rows = {}, const int64_t* lane_keys = nullptr) {
    float s[kNT][4] = {};
    warp_times_rows_transposed<T, DP, kNT>(s, q, sK, lane);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, c = 8 * j + (e & 1);
        float x;
        if constexpr (kGeneral) {
          float unused_tanh;
          x = mods.log2_score(s[j][e], rows.pos[i], lane_keys[c], unused_tanh);
        } else {
          x = s[j][e] * scale_log2;
        }
        x = allowed(i, c) ? x : -INFINITY;
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
    warp_accumulate_rows<T, DP, kBlockK>(o, s, sV, lane);
  }

  // After the last tile: each row's full sum over its quad, then (kGeneral) the sink's logit
  // `sink_log2` (log2 units; -inf: none) as one more key with a zero value.
  __device__ __forceinline__ void finish(float sink_log2 = -INFINITY) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      row_sum[i] += __shfl_xor_sync(kFull, row_sum[i], 1);
      row_sum[i] += __shfl_xor_sync(kFull, row_sum[i], 2);
    }
    if constexpr (kGeneral) {
      if (sink_log2 == -INFINITY) return;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float new_max = fmaxf(row_max[i], sink_log2);
        const float alpha = exp2f(row_max[i] - new_max);  // 0 for a row that saw no key
        row_sum[i] = row_sum[i] * alpha + exp2f(sink_log2 - new_max);
        row_max[i] = new_max;
#pragma unroll
        for (int n = 0; n < kON; ++n) o[n][2 * i] *= alpha, o[n][2 * i + 1] *= alpha;
      }
    }
  }
  // Row i's log-sum-exp in natural units: max * ln 2 + log(sum_j exp2(x_j - max)).
  __device__ __forceinline__ float lse(int i) const {
    return row_max[i] * 0.693147180559945309f + logf(row_sum[i]);
  }
  // This thread's columns of row i, normalised, into a row of D elements (after finish()).
  __device__ __forceinline__ void store_row(int i, TileElem<T>* dst, int64_t D, int lane) const {
    const float inv = 1.0f / row_sum[i];
    const int t = lane & 3;
#pragma unroll
    for (int n = 0; n < kON; ++n) {
      const int col = 8 * n + 2 * t;
      if (col < D) dst[col] = float_to_elem<T>(o[n][2 * i] * inv);
      if (col + 1 < D) dst[col + 1] = float_to_elem<T>(o[n][2 * i + 1] * inv);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The key tiles of one block of query rows, through a two-stage cp.async pipeline: band tiles
// (subsequence indices [band_begin, band_end) of residue r, kBlockK at a time), then tiles of the
// batch row's gathered global keys. While the warps compute on one stage, the copies of the next
// tile are in flight into the other. Keys that are not real keys of the tile's kind (band tiles:
// local; global tiles: global) are zero rows with flag 0, so that a NaN in a padding row cannot
// reach a product through 0 * NaN. A tile's flags become one ballot bit mask per warp, and tiles
// wholly inside every row's band with only real keys (and full non-causal global tiles) skip
// per-element masking.
//
// The backward's dK/dV kernels walk query tiles with the same machinery (kQueryRows): their "keys"
// are the queries that see a block of keys (band tiles: local queries, window sides swapped;
// global tiles: global queries), staged from q and grad_out, each with its lse (in log2 units)
// and delta (values(stage, 0 / 1)), and a query whose lse is -inf (it saw no key) counts as
// excluded. The global rows' kernels use band tiles of the undilated sequence (residue 0,
// dilation 1) over a key or query range given to setup_band, with gathered rows (gathered_rows).
//
// kGeneral (the general op's instantiations): the query tiles take only the query rows
// [q_offset, q_offset + Nq), and with packed sequences (cu_seqlens) a row sees only the keys of its
// own sequence.
template <typename T, int DP, int kBlockK, bool kQueryRows = false, bool kGeneral = false>
struct KeyTilePipeline {
  using E = TileElem<T>;
  using R = Rows<T, DP>;
  static constexpr int kTileRows = kBlockK;
  static constexpr int kStages = 2;
  static constexpr int64_t kKVBytes = R::bytes(kBlockK);
  // Layout: K stages | V stages | key positions (int64) per stage | key flags per stage.
  static constexpr int64_t kKOffset = 0;
  static constexpr int64_t kVOffset = kKOffset + kStages * kKVBytes;
  static constexpr int64_t kKeyPosOffset = kVOffset + kStages * kKVBytes;
  static constexpr int64_t kValuesOffset = kKeyPosOffset + int64_t{kStages} * kBlockK * 8;
  static constexpr int64_t kKeyOkOffset = kValuesOffset + (kQueryRows ? int64_t{kStages} * 2 * kBlockK * 4 : 0);
  static constexpr int64_t kBytes = kKeyOkOffset + int64_t{kStages} * kBlockK;
  // All kBlockK keys of a tile real and of the tile's kind (the ballot mask of a full tile).
  static_assert(kBlockK == 16 || kBlockK == 32 || kBlockK == 64, "tile rows: whole k-steps, at most 64 (one ballot pair)");
  static constexpr uint64_t kAllKeys = kBlockK == 64 ? ~uint64_t{0} : (uint64_t{1} << kBlockK) - 1;

  // Set by setup(), before issue(0).
  const AttentionParams* p;
  const RowMajorHeads* first;     // staged operands: p->k and p->v (dK/dV kernel: p->q and p->grad_out)
  const RowMajorHeads* second;
  int64_t b, h, r, d, D;
  int64_t left, right;            // clamped to the subsequence length
  int64_t band_begin, band_end;   // subsequence indices of the block's band keys
  const int64_t* global_index;    // the batch row's global positions, ascending
  int64_t global_count;
  bool vec;
  unsigned char* smem;            // kBytes, 16-byte aligned
  // kQueryRows: the lse and delta of every row, [B, H, N] (lse is -inf where a row saw no key).
  const float* lse = nullptr;
  const float* delta = nullptr;

  int64_t band_tiles = 0, tiles = 0;

  // Sets the pipeline up for a block's rows s0 .. s0 + rows - 1 of residue r's subsequence (L rows),
  // row s seeing tile rows [s - window_left, s + window_right]. Windows wider than the subsequence
  // act like L; clamping keeps all index arithmetic small.
  __device__ __forceinline__ void setup(const AttentionParams& params, const RowMajorHeads& first_operand,
                                        const RowMajorHeads& second_operand, int64_t batch, int64_t head,
                                        int64_t residue, int64_t dilation, int64_t L, int64_t s0, int rows,
                                        int64_t window_left, int64_t window_right, const int64_t* globals,
                                        int64_t globals_count, bool vectorised, unsigned char* shared) {
    const int64_t l = window_left < L ? window_left : L, rt = window_right < L ? window_right : L;
    const int64_t end = s0 + rows + rt;  // exclusive
    setup_band(params, first_operand, second_operand, batch, head, residue, dilation, s0 - l > 0 ? s0 - l : 0,
               end < L ? end : L, l, rt, globals, globals_count, vectorised, shared);
  }
  // The same with the band tiles' range [begin, end) given: row s sees the band keys of that range
  // in [s - window_left, s + window_right].
  __device__ __forceinline__ void setup_band(const AttentionParams& params, const RowMajorHeads& first_operand,
                                             const RowMajorHeads& second_operand, int64_t batch, int64_t head,
                                             int64_t residue, int64_t dilation, int64_t begin, int64_t end,
                                             int64_t window_left, int64_t window_right, const int64_t* globals,
                                             int64_t globals_count, bool vectorised, unsigned char* shared) {
    p = &params;
    first = &first_operand;
    second = &second_operand;
    b = batch, h = head, r = residue, d = dilation, D = params.head_dim;
    left = window_left;
    right = window_right;
    band_begin = begin;
    band_end = end;
    global_index = globals;
    global_count = globals_count;
    vec = vectorised;
    smem = shared;
    band_tiles = band_end > band_begin ? (band_end - band_begin + kBlockK - 1) / kBlockK : 0;
    tiles = band_tiles + (global_count + kBlockK - 1) / kBlockK;
  }
  __device__ __forceinline__ E* k_stage(int s) const { return reinterpret_cast<E*>(smem + kKOffset + s * kKVBytes); }
  __device__ __forceinline__ E* v_stage(int s) const { return reinterpret_cast<E*>(smem + kVOffset + s * kKVBytes); }
  __device__ __forceinline__ int64_t* key_pos(int s) const {
    return reinterpret_cast<int64_t*>(smem + kKeyPosOffset) + s * kBlockK;
  }
  __device__ __forceinline__ unsigned char* key_ok(int s) const { return smem + kKeyOkOffset + s * kBlockK; }
  __device__ __forceinline__ float* values(int s, int which) const {
    return reinterpret_cast<float*>(smem + kValuesOffset) + (s * 2 + which) * kBlockK;
  }

  // Starts the copies of key tile `tile` into stage tile % 2 and commits them as one group (an
  // empty group past the last tile, so that every iteration waits for the same count).
  __device__ __forceinline__ void issue(int64_t tile) const {
    if (tile < tiles) {
      const int s = static_cast<int>(tile % kStages);
      E* sK = k_stage(s);
      E* sV = v_stage(s);
      const bool band = tile < band_tiles;
      const int64_t first_index = band ? band_begin + tile * kBlockK : (tile - band_tiles) * kBlockK;
      const uint8_t* roles = p->roles + b * p->seqlen;
      const E* k_base = static_cast<const E*>(first->data);
      const E* v_base = static_cast<const E*>(second->data);
      for (int c = static_cast<int>(threadIdx.x); c < kBlockK * R::kChunks; c += kThreads) {
        const int row = c / R::kChunks, chunk = c % R::kChunks;
        const int64_t index = first_index + row;
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
        if constexpr (kQueryRows) {
          constexpr float kLog2e = 1.4426950408889634f;
          if constexpr (kGeneral) ok = ok && p->is_query(pos);
          const int64_t at = p->lse_offset(b, h, pos);
          const float row_lse = ok ? lse[at] : -INFINITY;
          ok = ok && row_lse != -INFINITY;
          if (chunk == 0) {
            values(s, 0)[row] = ok ? row_lse * kLog2e : 0.0f;
            values(s, 1)[row] = ok ? delta[at] : 0.0f;
          }
        }
        if (chunk == 0) {
          key_ok(s)[row] = ok;
          key_pos(s)[row] = pos;
        }
        stage_row_chunk<T>(sK + row * R::kPitch, ok ? k_base + first->offset(b, h, pos) : nullptr, chunk,
                           D, vec, k_base);
        stage_row_chunk<T>(sV + row * R::kPitch, ok ? v_base + second->offset(b, h, pos) : nullptr,
                           chunk, D, vec, v_base);
      }
    }
    cp_async_commit();
  }

  // Walks every tile (issue(0) must have been called). For each tile a warp does not skip it calls
  // process(sK, sV, stage, allowed), where allowed(i, c) says whether this thread's row i (0: the warp's
  // row g, 1: g + 8) may see key column 2t + c of the tile (c a compile-time constant after
  // unrolling: the lambdas fold this lane's 2t into their bounds once per tile). `rows` are this
  // thread's rows (subsequence indices, positions, whether computed) and its warp's row range.
  // Every thread of the block calls it (it holds the barriers).
  template <typename Process>
  __device__ __forceinline__ void run(const ThreadRows& rows, Process&& process) const {
    const int lane = static_cast<int>(threadIdx.x) & 31, t = lane & 3;
    const int64_t(&row_s)[2] = rows.s;
    const int64_t(&row_pos)[2] = rows.pos;
    const bool(&row_ok)[2] = rows.ok;
    // kGeneral: each row's sequence as positions [seq_lo, seq_hi) (the whole [0, N) without
    // cu_seqlens), and its band [band_lo, band_hi] in subsequence indices, cut to that sequence.
    int64_t seq_lo[2] = {0, 0}, seq_hi[2] = {0, 0}, band_lo[2] = {0, 0}, band_hi[2] = {0, 0};
    const bool packed = kGeneral && p->cu_seqlens != nullptr;
    if constexpr (kGeneral) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const AttentionParams::Span seq = p->sequence_of(row_pos[i] < p->seqlen ? row_pos[i] : p->seqlen - 1);
        seq_lo[i] = seq.start, seq_hi[i] = seq.end;
        const int64_t first = seq.start <= r ? 0 : (seq.start - r + d - 1) / d;  // of residue r in the sequence
        const int64_t last = seq.end - 1 < r ? -1 : (seq.end - 1 - r) / d;
        band_lo[i] = row_s[i] - left > first ? row_s[i] - left : first;
        band_hi[i] = row_s[i] + right < last ? row_s[i] + right : last;
      }
    }
    // A warp whose 16 rows are all padding/global/out of range does no math (it still joins barriers).
    const bool warp_active = __any_sync(kFull, row_ok[0] || row_ok[1]);
    // Subsequence indices this warp's rows can reach in the band (for skipping whole key tiles).
    const int64_t warp_key_lo = rows.warp_first - left, warp_key_hi = rows.warp_last + right;
    const bool causal = p->causal;
    const auto every_key = [](int, int) { return true; };
    for (int64_t tile = 0; tile < tiles; ++tile) {
      issue(tile + 1);
      cp_async_wait<1>();  // this thread's copies of `tile` landed (only tile + 1 may be in flight)
      __syncthreads();     // ... and every other thread's
      const int s = static_cast<int>(tile % kStages);
      const E* sK = k_stage(s);
      const E* sV = v_stage(s);
      const unsigned char* ok = key_ok(s);
      const bool band = tile < band_tiles;
      const int64_t kt0 = band_begin + tile * kBlockK;
      // Warp-uniform skip: no row is computed, or (band) no row of this warp reaches the tile.
      const bool skip = !warp_active || (band && (warp_key_hi < kt0 || warp_key_lo >= kt0 + kBlockK));
      if (!skip) {
        // The tile's key flags as one bit mask, shifted so that bit c is this lane's column 2t + c.
        uint64_t keys = __ballot_sync(kFull, lane < kBlockK && ok[lane] != 0);
        if constexpr (kBlockK == 64) keys |= uint64_t{__ballot_sync(kFull, ok[32 + lane] != 0)} << 32;
        const bool all_keys = keys == kAllKeys;
        const uint64_t lane_keys = keys >> (2 * t);
        if (band) {
          // Row i sees tile columns kt0 + col in [s_i - left, s_i + right]; as ints relative to
          // this lane's first column kt0 + 2t.
          int lo[2], hi[2];
          bool inside = true;  // every computed row of this thread sees the whole tile
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int64_t l64 = (kGeneral ? band_lo[i] : row_s[i] - left) - kt0;
            const int64_t h64 = (kGeneral ? band_hi[i] : row_s[i] + right) - kt0;
            inside &= !row_ok[i] || (l64 <= 0 && h64 >= kBlockK - 1);
            lo[i] = static_cast<int>(l64 < -1 ? -1 : (l64 > kBlockK ? kBlockK : l64)) - 2 * t;
            hi[i] = static_cast<int>(h64 < -1 ? -1 : (h64 > kBlockK ? kBlockK : h64)) - 2 * t;
          }
          if (__all_sync(kFull, all_keys && inside)) {
            process(sK, sV, s, every_key);
          } else {
            process(sK, sV, s, [&](int i, int c) { return ((lane_keys >> c) & 1) != 0 && c >= lo[i] && c <= hi[i]; });
          }
        } else if (!causal && all_keys && !packed) {
          process(sK, sV, s, every_key);
        } else {
          const int64_t* lane_pos = key_pos(s) + 2 * t;
          // Causal: a key is seen by the queries at or after it (tiles of queries: rows are keys).
          process(sK, sV, s, [&](int i, int c) {
            return ((lane_keys >> c) & 1) != 0 &&
                   (!causal || (kQueryRows ? row_pos[i] <= lane_pos[c] : lane_pos[c] <= row_pos[i])) &&
                   (!packed || (lane_pos[c] >= seq_lo[i] && lane_pos[c] < seq_hi[i]));
          });
        }
      }
      __syncthreads();  // every warp is done with this stage before issue(tile + 2) refills it
    }
  }
};

}  // namespace longformer::cuda::mma_tiles
