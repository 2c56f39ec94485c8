// How the fused kernels cut the work into independent tasks.
//
// With dilation d, query i only meets band keys j = i (mod d): the band of head h is d undilated
// bands over the strided subsequences r, r+d, r+2d, ... (r = residue). A tile is a run of
// consecutive subsequence indices [begin, end) of one (batch, head, residue); its positions are
// residue + a*d. Inside a subsequence the band is plain: key index c is in the band of query index
// a iff -left <= c - a <= right.
#pragma once

#include <algorithm>
#include <vector>

#include "longformer/params.h"
#include "tile_math.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)

struct BandTile {
  int64_t b, h, residue, dilation, begin, end, length;  // length: size of the residue's subsequence

  Positions rows(int64_t from) const { return Positions{residue + from * dilation, dilation}; }
};

inline std::vector<BandTile> band_tiles(const AttentionParams& p, int64_t tile) {
  std::vector<BandTile> tiles;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t d = p.dilation[h];
      for (int64_t r = 0; r < std::min(d, p.seqlen); ++r) {
        const int64_t length = (p.seqlen - r + d - 1) / d;
        for (int64_t a = 0; a < length; a += tile) tiles.push_back({b, h, r, d, a, std::min(a + tile, length), length});
      }
    }
  }
  return tiles;
}

// Positions holding `role` in each batch row, in increasing order.
inline std::vector<std::vector<int64_t>> positions_with_role(const AttentionParams& p, Role role) {
  std::vector<std::vector<int64_t>> out(p.batch);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t n = 0; n < p.seqlen; ++n) {
      if (p.roles[b * p.seqlen + n] == role) out[b].push_back(n);
    }
  }
  return out;
}

// Splits [begin, end) into `ceil(len / limit)` nearly equal blocks; calls f(block_begin, block_end).
template <typename F>
void for_each_block(int64_t begin, int64_t end, int64_t limit, F&& f) {
  const int64_t len = end - begin;
  if (len <= 0) return;
  const int64_t blocks = (len + limit - 1) / limit;
  const int64_t size = (len + blocks - 1) / blocks;
  for (int64_t s = begin; s < end; s += size) f(s, std::min(s + size, end));
}

// Number of entries of the sorted `pos[0, n)` that are <= limit.
inline int64_t count_at_most(const int64_t* pos, int64_t n, int64_t limit) {
  return std::upper_bound(pos, pos + n, limit) - pos;
}

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
