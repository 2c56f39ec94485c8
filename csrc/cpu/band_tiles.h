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

// One key sequence: positions [start, end) of batch row b. Each batch row is one, or with packed
// sequences (cu_seqlens, B == 1) each sequence is one; no query sees a key of another segment.
struct Segment {
  int64_t b, start, end;
};

inline std::vector<Segment> segments(const AttentionParams& p) {
  std::vector<Segment> out;
  if (p.cu_seqlens != nullptr) {
    for (int64_t s = 0; s < p.segments; ++s) out.push_back({0, p.cu_seqlens[s], p.cu_seqlens[s + 1]});
  } else {
    for (int64_t b = 0; b < p.batch; ++b) out.push_back({b, 0, p.seqlen});
  }
  return out;
}

// First index a >= 0 of the subsequence start + a * step that is at or after `position`.
inline int64_t first_index_at(int64_t start, int64_t step, int64_t position) {
  return position <= start ? 0 : (position - start + step - 1) / step;
}

// One (segment, head, residue) subsequence: positions start + residue + a * dilation for a in
// [0, length); its queries (positions q_offset to q_offset + queries) are a in [first_query, query_end).
struct Residue {
  int64_t segment, b, h, start, residue, dilation, length, first_query, query_end;

  Positions at(int64_t index) const { return Positions{start + residue + index * dilation, dilation}; }
};

inline std::vector<Residue> residues(const AttentionParams& p, const std::vector<Segment>& segs) {
  std::vector<Residue> out;
  for (int64_t s = 0; s < static_cast<int64_t>(segs.size()); ++s) {
    const Segment& seg = segs[s];
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t d = p.dilation[h];
      for (int64_t r = 0; r < std::min(d, seg.end - seg.start); ++r) {
        const int64_t length = (seg.end - seg.start - r + d - 1) / d;
        const int64_t first = std::min(length, first_index_at(seg.start + r, d, p.q_offset));
        const int64_t end = std::min(length, first_index_at(seg.start + r, d, p.q_offset + p.queries));
        out.push_back({s, seg.b, h, seg.start, r, d, length, first, end});
      }
    }
  }
  return out;
}

// A run of consecutive query indices [begin, end) of one residue, in `heads` consecutive query heads
// from h that read the same keys (one head, or a group of grouped KV heads with one dilation).
struct BandTile : Residue {
  int64_t begin, end, heads;

  Positions rows(int64_t from) const { return at(from); }
};

// How many consecutive query heads from h share its keys: the rest of its KV head's group when
// they all have h's dilation (grouped KV heads), else 1.
inline int64_t heads_sharing_keys(const AttentionParams& p, int64_t h) {
  const int64_t group = p.heads / p.heads_kv;
  if (group == 1 || h % group != 0) return 1;
  for (int64_t g = h + 1; g < h + group; ++g) {
    if (p.dilation[g] != p.dilation[h]) return 1;
  }
  return group;
}

// The tiles of query rows: each residue's queries in runs of `tile` rows. Heads that read the same
// keys share their tiles (tile / heads queries of each), so that a decoding step's few queries of a
// KV group pack and read its keys once rather than once per query head.
inline std::vector<BandTile> band_tiles(const AttentionParams& p, const std::vector<Segment>& segs, int64_t tile) {
  std::vector<BandTile> tiles;
  const int64_t group = p.heads / p.heads_kv;
  for (const Residue& res : residues(p, segs)) {
    const int64_t leader = res.h - res.h % group;
    if (res.h != leader && heads_sharing_keys(p, leader) > 1) continue;  // in its group leader's tiles
    const int64_t heads = heads_sharing_keys(p, res.h);
    const int64_t per_head = std::max<int64_t>(1, tile / heads);
    for (int64_t a = res.first_query; a < res.query_end; a += per_head) {
      tiles.push_back({res, a, std::min(a + per_head, res.query_end), heads});
    }
  }
  return tiles;
}

// The query positions of a segment: [max(start, q_offset), min(end, q_offset + queries)).
inline int64_t first_query(const AttentionParams& p, const Segment& seg) { return std::max(seg.start, p.q_offset); }
inline int64_t query_end(const AttentionParams& p, const Segment& seg) {
  return std::min(seg.end, p.q_offset + p.queries);
}

// Positions holding `role` in each segment, in increasing order.
inline std::vector<std::vector<int64_t>> positions_with_role(const AttentionParams& p, const std::vector<Segment>& segs,
                                                             Role role) {
  std::vector<std::vector<int64_t>> out(segs.size());
  for (size_t s = 0; s < segs.size(); ++s) {
    const uint8_t* roles = p.roles + segs[s].b * p.seqlen;
    for (int64_t n = segs[s].start; n < segs[s].end; ++n) {
      if (roles[n] == role) out[s].push_back(n);
    }
  }
  return out;
}

// The index of the first entry of sorted `pos` at or after `position`.
inline int64_t index_at(const std::vector<int64_t>& pos, int64_t position) {
  return std::lower_bound(pos.begin(), pos.end(), position) - pos.begin();
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
