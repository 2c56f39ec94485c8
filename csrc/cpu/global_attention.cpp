// Rows of global queries: each attends to every real key of its segment (keys at or before it
// when causal) with the global projections. There are few such rows, each over all of the
// segment's keys.
//
// Forward task = (segment, head, tile of global queries); keys are walked in blocks over the
// segment. Backward, deterministic: dQ per tile of global queries; dK, dV per block of keys over
// all global queries of the segment. Queries are indexed by position (params.h: query_offset);
// only global tokens at or after q_offset are query rows.
#include "band_tiles.h"
#include "forward_tile.h"
#include "kernels.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)
namespace {

struct GlobalTile { int64_t segment, h, g0, g1; };

// The global query rows of each segment: the entries [first, end) of its global positions that
// are queries (positions q_offset to q_offset + queries).
struct QueryRange { int64_t first, end; };

std::vector<QueryRange> global_query_ranges(const AttentionParams& p, const std::vector<std::vector<int64_t>>& g) {
  std::vector<QueryRange> out;
  for (const auto& positions : g) out.push_back({index_at(positions, p.q_offset), index_at(positions, p.q_offset + p.queries)});
  return out;
}

std::vector<GlobalTile> global_query_tiles(const AttentionParams& p, const std::vector<QueryRange>& ranges) {
  std::vector<GlobalTile> tiles;
  for (int64_t s = 0; s < static_cast<int64_t>(ranges.size()); ++s) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for_each_block(ranges[s].first, ranges[s].end, kRowTile, [&](int64_t g0, int64_t g1) {
        tiles.push_back({s, h, g0, g1});
      });
    }
  }
  return tiles;
}

// Keys that are padding are dropped; with causal attention row r keeps keys j <= its position.
template <typename acc>
void mask_global_rows(const AttentionParams& p, const uint8_t* roles, Positions qpos, int64_t rows, int64_t key0,
                      int64_t keys, acc* bias, int64_t* lo, int64_t* hi) {
  for (int64_t c = 0; c < keys; ++c) bias[c] = roles[key0 + c] == kPadding ? neg_inf<acc>() : acc(0);
  for (int64_t r = 0; r < rows; ++r) {
    lo[r] = 0;
    hi[r] = p.causal ? qpos[r] + 1 - key0 : keys;
  }
}

}  // namespace

template <typename scalar_t>
void global_attention_forward(const AttentionParams& p) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim;
  const std::vector<Segment> segs = segments(p);
  const auto globals = positions_with_role(p, segs, kGlobal);
  const std::vector<GlobalTile> tiles = global_query_tiles(p, global_query_ranges(p, globals));

  parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t first, int64_t last) {
    ForwardTile<acc> query(D);
    KeysAndValues<scalar_t> head_keys(D);
    Scratch<acc> bias(kBlockLimit), row_out(D);

    for (int64_t t = first; t < last; ++t) {
      const GlobalTile& tile = tiles[t];
      const Segment& seg = segs[tile.segment];
      const int64_t rows = tile.g1 - tile.g0;
      const uint8_t* roles = p.roles + seg.b * p.seqlen;
      const Positions qpos{0, 1, globals[tile.segment].data() + tile.g0};
      const auto* qh = static_cast<const scalar_t*>(p.q.data) + p.query_offset(p.q, seg.b, tile.h, 0);
      const auto* kh = static_cast<const scalar_t*>(p.k.data) + p.k.offset(seg.b, p.kv_head(tile.h), 0);
      const auto* vh = static_cast<const scalar_t*>(p.v.data) + p.v.offset(seg.b, p.kv_head(tile.h), 0);
      query.start(qh, p.q.stride_n, qpos, rows, static_cast<acc>(p.scale), ScoreModifiers<acc>(p, tile.h));

      const int64_t key_end = p.causal ? qpos[rows - 1] + 1 : seg.end;
      head_keys.select(kh, p.k.stride_n, vh, p.v.stride_n, Positions{0, 1}, p.seqlen, roles);
      for_each_block(seg.start, key_end, kBlockLimit, [&](int64_t c0, int64_t c1) {
        const int64_t keys = c1 - c0;
        mask_global_rows(p, roles, qpos, rows, c0, keys, bias.get(), query.lo(), query.hi());
        query.attend(head_keys, c0, keys, bias.get());
      });

      auto* out_h = static_cast<scalar_t*>(p.out.data) + p.query_offset(p.out, seg.b, tile.h, 0);
      auto* lse = static_cast<acc*>(p.lse) + p.lse_position_offset(seg.b, tile.h, 0);
      const acc sink = sink_logit<acc>(p, tile.h);
      for (int64_t r = 0; r < rows; ++r) {
        lse[qpos[r]] = query.finish_row(r, row_out.get(), sink);
        store_rows(out_h, p.out.stride_n, Positions{qpos[r], 1}, row_out.get(), 1, D);
      }
    }
  });
}

template <typename scalar_t>
void global_attention_backward(const AttentionParams& p, const void* delta_base, bool accumulate) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim;
  const std::vector<Segment> segs = segments(p);
  const auto globals = positions_with_role(p, segs, kGlobal);
  const std::vector<QueryRange> ranges = global_query_ranges(p, globals);
  const std::vector<GlobalTile> tiles = global_query_tiles(p, ranges);
  auto query_head = [&](const RowMajorHeads& t, int64_t b, int64_t h) {
    return static_cast<scalar_t*>(t.data) + p.query_offset(t, b, h, 0);
  };
  auto key_head = [&](const RowMajorHeads& t, int64_t b, int64_t kv_head) {
    return static_cast<scalar_t*>(t.data) + t.offset(b, kv_head, 0);
  };

  // Gathers q, dO, lse and delta of global rows qpos[0, rows) of (b, h).
  auto load_queries = [&](acc* q, acc* dout, acc* lse, acc* delta, int64_t b, int64_t h, Positions qpos,
                          int64_t rows) {
    load_rows(q, query_head(p.q, b, h), p.q.stride_n, qpos, rows, D);  // gathered: global rows are scattered
    load_rows(dout, query_head(p.grad_out, b, h), p.grad_out.stride_n, qpos, rows, D);
    const acc* lse_h = static_cast<const acc*>(p.lse) + p.lse_position_offset(b, h, 0);
    const acc* delta_h = static_cast<const acc*>(delta_base) + p.lse_position_offset(b, h, 0);
    for (int64_t r = 0; r < rows; ++r) {
      lse[r] = lse_h[qpos[r]];
      delta[r] = delta_h[qpos[r]];
    }
  };

  // dQ of global rows.
  parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t first, int64_t last) {
    Scratch<acc> q(kRowTile * D), dout(kRowTile * D), lse(kRowTile), delta(kRowTile), dq(kRowTile * D);
    Scratch<acc> k(kBlockLimit * D), v(kBlockLimit * D), s(kRowTile * kBlockLimit), ds(kRowTile * kBlockLimit);
    Scratch<acc> dcap(kRowTile * kBlockLimit), bias(kBlockLimit);
    Scratch<int64_t> lo(kRowTile), hi(kRowTile);
    for (int64_t t = first; t < last; ++t) {
      const GlobalTile& tile = tiles[t];
      const Segment& seg = segs[tile.segment];
      const int64_t rows = tile.g1 - tile.g0;
      const uint8_t* roles = p.roles + seg.b * p.seqlen;
      const Positions qpos{0, 1, globals[tile.segment].data() + tile.g0};
      const Rows<acc> qr{q.get(), D}, doutr{dout.get(), D};
      const ScoreModifiers<acc> mods(p, tile.h);
      const int64_t kv = p.kv_head(tile.h);
      load_queries(q.get(), dout.get(), lse.get(), delta.get(), seg.b, tile.h, qpos, rows);
      std::fill(dq.get(), dq.get() + rows * D, acc(0));
      const int64_t key_end = p.causal ? qpos[rows - 1] + 1 : seg.end;
      for_each_block(seg.start, key_end, kBlockLimit, [&](int64_t c0, int64_t c1) {
        const int64_t keys = c1 - c0;
        const Rows<acc> kr = rows_of(k.get(), key_head(p.k, seg.b, kv), p.k.stride_n, Positions{c0, 1}, keys, D, roles);
        const Rows<acc> vr = rows_of(v.get(), key_head(p.v, seg.b, kv), p.v.stride_n, Positions{c0, 1}, keys, D, roles);
        mask_global_rows(p, roles, qpos, rows, c0, keys, bias.get(), lo.get(), hi.get());
        backward_scores(s.get(), dcap.get(), qr, kr, rows, keys, D, static_cast<acc>(p.scale), mods, qpos,
                        Positions{c0, 1}, lo.get(), hi.get(), bias.get());
        backward_tile(s.get(), ds.get(), mods.softcap > acc(0) ? dcap.get() : nullptr, qr, doutr, lse.get(),
                      delta.get(), kr, vr, rows, keys, D, static_cast<acc>(p.scale), dq.get(),
                      static_cast<acc*>(nullptr), static_cast<acc*>(nullptr));
      });
      store_rows(query_head(p.grad_q, seg.b, tile.h), p.grad_q.stride_n, qpos, dq.get(), rows, D);
    }
  });

  // dK, dV per block of keys, over all global rows of the segment. Blocks are large because there
  // are usually few global rows: small blocks would make many tiny GEMMs.
  struct KeyBlock { int64_t segment, h, c0, c1; };
  std::vector<KeyBlock> blocks;
  for (int64_t s = 0; s < static_cast<int64_t>(segs.size()); ++s) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t c0 = segs[s].start; c0 < segs[s].end; c0 += kBlockLimit) {
        blocks.push_back({s, h, c0, std::min(c0 + kBlockLimit, segs[s].end)});
      }
    }
  }
  parallel_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t first, int64_t last) {
    Scratch<acc> q(kRowTile * D), dout(kRowTile * D), lse(kRowTile), delta(kRowTile);
    Scratch<acc> k(kBlockLimit * D), v(kBlockLimit * D), dk(kBlockLimit * D), dv(kBlockLimit * D);
    Scratch<acc> s(kRowTile * kBlockLimit), ds(kRowTile * kBlockLimit), dcap(kRowTile * kBlockLimit);
    Scratch<acc> bias(kBlockLimit);
    Scratch<int64_t> lo(kRowTile), hi(kRowTile);
    for (int64_t t = first; t < last; ++t) {
      const KeyBlock& kb = blocks[t];
      const Segment& seg = segs[kb.segment];
      const int64_t b = seg.b, h = kb.h, c0 = kb.c0, keys = kb.c1 - kb.c0;
      const int64_t kv = p.kv_head(h), grad_kv = p.grad_kv_head(h);
      const uint8_t* roles = p.roles + b * p.seqlen;
      const std::vector<int64_t>& g = globals[kb.segment];
      const ScoreModifiers<acc> mods(p, h);
      const Rows<acc> kr = rows_of(k.get(), key_head(p.k, b, kv), p.k.stride_n, Positions{c0, 1}, keys, D, roles);
      const Rows<acc> vr = rows_of(v.get(), key_head(p.v, b, kv), p.v.stride_n, Positions{c0, 1}, keys, D, roles);
      if (accumulate) {  // start from the local rows' gradients, rounded once at the end
        load_rows(dk.get(), key_head(p.grad_k, b, grad_kv), p.grad_k.stride_n, Positions{c0, 1}, keys, D);
        load_rows(dv.get(), key_head(p.grad_v, b, grad_kv), p.grad_v.stride_n, Positions{c0, 1}, keys, D);
      } else {
        std::fill(dk.get(), dk.get() + keys * D, acc(0));
        std::fill(dv.get(), dv.get() + keys * D, acc(0));
      }
      // Only the segment's global queries are rows; with causal attention only those at or after
      // c0 see this block.
      const int64_t g_begin = std::max<int64_t>(ranges[kb.segment].first, p.causal ? index_at(g, c0) : 0);
      for_each_block(g_begin, ranges[kb.segment].end, kRowTile, [&](int64_t g0, int64_t g1) {
        const int64_t rows = g1 - g0;
        const Positions qpos{0, 1, g.data() + g0};
        const Rows<acc> qr{q.get(), D}, doutr{dout.get(), D};
        load_queries(q.get(), dout.get(), lse.get(), delta.get(), b, h, qpos, rows);
        mask_global_rows(p, roles, qpos, rows, c0, keys, bias.get(), lo.get(), hi.get());
        backward_scores(s.get(), dcap.get(), qr, kr, rows, keys, D, static_cast<acc>(p.scale), mods, qpos,
                        Positions{c0, 1}, lo.get(), hi.get(), bias.get());
        backward_tile(s.get(), ds.get(), mods.softcap > acc(0) ? dcap.get() : nullptr, qr, doutr, lse.get(),
                      delta.get(), kr, vr, rows, keys, D, static_cast<acc>(p.scale), static_cast<acc*>(nullptr),
                      dk.get(), dv.get());
      });
      store_rows(key_head(p.grad_k, b, grad_kv), p.grad_k.stride_n, Positions{c0, 1}, dk.get(), keys, D);
      store_rows(key_head(p.grad_v, b, grad_kv), p.grad_v.stride_n, Positions{c0, 1}, dv.get(), keys, D);
    }
  });
}

#define LONGFORMER_INSTANTIATE(T, name)                              \
  template void global_attention_forward<T>(const AttentionParams&); \
  template void global_attention_backward<T>(const AttentionParams&, const void*, bool);
LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_INSTANTIATE)
#undef LONGFORMER_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
