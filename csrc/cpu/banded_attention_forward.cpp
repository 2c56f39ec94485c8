// Fused forward of the local rows: every local query attends to its (dilated) band keys that are
// local, plus every real global key, with one online softmax and no [N, window] buffer.
// Global and padding rows come out as 0 with lse = -inf (the op then fills global rows
// with global_attention_forward).
//
// Task = one BandTile of queries (a ForwardTile; with grouped KV heads, the same queries of the
// group's heads, which read the same keys). Its band keys are walked in blocks of at most
// kBlockLimit, then the segment's global keys (gathered) in blocks of the same size.
#include "band_tiles.h"
#include "forward_tile.h"
#include "kernels.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)

// Asks for rows a tile ahead: heads split from one [N, H * D] projection put a head's rows a whole
// token apart, a stride the hardware prefetchers do not follow across pages.
template <typename T>
void prefetch_rows(const T* head, int64_t stride_n, Positions pos, int64_t count, int64_t dim) {
  for (int64_t r = 0; r < count; ++r) {
    const T* row = head + pos[r] * stride_n;
    for (int64_t d = 0; d < dim; d += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(row + d);
  }
}

template <typename scalar_t>
void banded_attention_forward(const AttentionParams& p) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim;
  const int64_t left = p.window_left, right = p.effective_right();
  const std::vector<Segment> segs = segments(p);
  const std::vector<BandTile> tiles = band_tiles(p, segs, kRowTile);
  const auto globals = positions_with_role(p, segs, kGlobal);

  parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t first, int64_t last) {
    ForwardTile<acc> query(D);
    KeysAndValues<scalar_t> band(D), global(D);
    Scratch<acc> bias(kBlockLimit), row_out(D);

    for (int64_t t = first; t < last; ++t) {
      const BandTile& tile = tiles[t];
      const int64_t per_head = tile.end - tile.begin, rows = per_head * tile.heads;  // row r: head r / per_head
      const uint8_t* roles = p.roles + tile.b * p.seqlen;
      // Query-side pointers are indexed by position (params.h: query_offset), key-side ones by
      // position in the query heads' KV head.
      auto query_head = [&](const RowMajorHeads& t, int64_t r) {
        return static_cast<scalar_t*>(t.data) + p.query_offset(t, tile.b, tile.h + r / per_head, 0);
      };
      const auto* kh = static_cast<const scalar_t*>(p.k.data) + p.k.offset(tile.b, p.kv_head(tile.h), 0);
      const auto* vh = static_cast<const scalar_t*>(p.v.data) + p.v.offset(tile.b, p.kv_head(tile.h), 0);
      const Positions qpos = tile.rows(tile.begin);
      query.start(rows);
      for (int64_t r0 = 0; r0 < rows; r0 += per_head) {
        query.load(r0, query_head(p.q, r0), p.q.stride_n, qpos, per_head, static_cast<acc>(p.scale),
                   ScoreModifiers<acc>(p, tile.h + r0 / per_head));
      }
      // What the next tile of this band reads first: its queries and the keys it adds to the band.
      const int64_t next_rows = std::min(per_head, tile.query_end - tile.end);
      const int64_t next_key = std::min(tile.length, tile.end + right);
      const int64_t next_keys = std::min(kRowTile, tile.length - next_key);
      for (int64_t r0 = 0; r0 < rows; r0 += per_head) {
        prefetch_rows(query_head(p.q, r0), p.q.stride_n, tile.rows(tile.end), next_rows, D);
      }
      prefetch_rows(kh, p.k.stride_n, tile.rows(next_key), next_keys, D);
      prefetch_rows(vh, p.v.stride_n, tile.rows(next_key), next_keys, D);

      // Band keys: subsequence indices [begin - left, end - 1 + right], clipped to the sequence.
      const int64_t key_begin = std::max<int64_t>(0, tile.begin - left);
      const int64_t key_end = std::min(tile.length, tile.end + right);
      band.select(kh, p.k.stride_n, vh, p.v.stride_n, tile.rows(0), tile.length, roles);
      for_each_block(key_begin, key_end, kBlockLimit, [&](int64_t c0, int64_t c1) {
        const int64_t keys = c1 - c0;
        const Positions kpos = tile.rows(c0);
        bool all_local = true;
        for (int64_t c = 0; c < keys; ++c) {
          const bool local = roles[kpos[c]] == kLocal;
          bias.get()[c] = local ? acc(0) : neg_inf<acc>();
          all_local = all_local && local;
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t a = tile.begin + r % per_head;
          query.lo()[r] = a - left - c0;
          query.hi()[r] = a + right + 1 - c0;
        }
        query.attend(band, c0, keys, all_local ? nullptr : bias.get());
      });

      // Global keys of the segment, seen by every local query (only those at or before it when causal).
      const std::vector<int64_t>& g = globals[tile.segment];
      global.select(kh, p.k.stride_n, vh, p.v.stride_n, Positions{0, 1, g.data()}, static_cast<int64_t>(g.size()),
                    roles);
      for_each_block(0, static_cast<int64_t>(g.size()), kBlockLimit, [&](int64_t g0, int64_t g1) {
        const int64_t keys = g1 - g0;
        for (int64_t r = 0; r < rows; ++r) {
          query.lo()[r] = 0;
          query.hi()[r] = p.causal ? count_at_most(g.data() + g0, keys, qpos[r % per_head]) : keys;
        }
        query.attend(global, g0, keys, nullptr);
      });

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = tile.h + r / per_head, i = qpos[r % per_head];
        acc row_lse = query.finish_row(r, row_out.get(), sink_logit<acc>(p, h));
        if (roles[i] != kLocal) {
          std::fill(row_out.get(), row_out.get() + D, acc(0));
          row_lse = neg_inf<acc>();
        }
        static_cast<acc*>(p.lse)[p.lse_position_offset(tile.b, h, i)] = row_lse;
        store_rows(query_head(p.out, r), p.out.stride_n, Positions{i, 1}, row_out.get(), 1, D);
      }
    }
  });
}

#define LONGFORMER_INSTANTIATE(T, name) template void banded_attention_forward<T>(const AttentionParams&);
LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_INSTANTIATE)
#undef LONGFORMER_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
