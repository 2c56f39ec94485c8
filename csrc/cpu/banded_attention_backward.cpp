// Fused backward of the local rows, recomputing probabilities from the saved log-sum-exp.
//
// Deterministic by construction: every output row is owned by exactly one task and accumulated
// in a fixed order, so the bits do not depend on the number of threads. That takes three passes
// instead of one with atomics:
//   1. dQ per query tile (band keys, then global keys);
//   2. dK, dV per key tile of band keys, over the queries whose band holds them;
//   3. dK, dV of the global keys, over every local query of the batch row.
// Pass 3 overwrites the global rows that pass 2 wrote as zeros (they are masked out of every band).
#include "band_tiles.h"
#include "kernels.h"

namespace longformer::cpu {
namespace {

template <typename scalar_t>
struct HeadPointers {
  const scalar_t *q, *k, *v, *dout;
  scalar_t *dq, *dk, *dv;
  const typename Accumulate<scalar_t>::type *lse, *delta;

  HeadPointers(const AttentionParams& p, const void* delta_base, int64_t b, int64_t h)
      : q(static_cast<const scalar_t*>(p.q.data) + p.q.offset(b, h, 0)),
        k(static_cast<const scalar_t*>(p.k.data) + p.k.offset(b, h, 0)),
        v(static_cast<const scalar_t*>(p.v.data) + p.v.offset(b, h, 0)),
        dout(static_cast<const scalar_t*>(p.grad_out.data) + p.grad_out.offset(b, h, 0)),
        dq(static_cast<scalar_t*>(p.grad_q.data) + p.grad_q.offset(b, h, 0)),
        dk(static_cast<scalar_t*>(p.grad_k.data) + p.grad_k.offset(b, h, 0)),
        dv(static_cast<scalar_t*>(p.grad_v.data) + p.grad_v.offset(b, h, 0)),
        lse(static_cast<const acc_type<scalar_t>*>(p.lse) + p.lse_offset(b, h, 0)),
        delta(static_cast<const acc_type<scalar_t>*>(delta_base) + p.lse_offset(b, h, 0)) {}
};

// Per-worker buffers for one (query rows x key rows) backward tile.
template <typename acc>
struct TileBuffers {
  Scratch<acc> q, dout, k, v, s, ds, lse, delta, dq, dk, dv, bias;
  Scratch<int64_t> lo, hi;
  TileBuffers(int64_t rows, int64_t keys, int64_t dim)
      : q(rows * dim), dout(rows * dim), k(keys * dim), v(keys * dim), s(rows * keys), ds(rows * keys),
        lse(rows), delta(rows), dq(rows * dim), dk(keys * dim), dv(keys * dim), bias(keys), lo(rows), hi(rows) {}

  template <typename scalar_t>
  void load_queries(const HeadPointers<scalar_t>& hp, const AttentionParams& p, Positions pos, int64_t rows) {
    load_rows(q.get(), hp.q, p.q.stride_n, pos, rows, p.head_dim);
    load_rows(dout.get(), hp.dout, p.grad_out.stride_n, pos, rows, p.head_dim);
    for (int64_t r = 0; r < rows; ++r) {
      lse.get()[r] = hp.lse[pos[r]];
      delta.get()[r] = hp.delta[pos[r]];
    }
  }
  template <typename scalar_t>
  void load_keys(const HeadPointers<scalar_t>& hp, const AttentionParams& p, Positions pos, int64_t keys) {
    load_rows(k.get(), hp.k, p.k.stride_n, pos, keys, p.head_dim);
    load_rows(v.get(), hp.v, p.v.stride_n, pos, keys, p.head_dim);
  }
  void run(const AttentionParams& p, int64_t rows, int64_t keys, bool want_dq, bool want_dkdv) {
    using A = acc;
    score_tile(s.get(), q.get(), k.get(), rows, keys, p.head_dim, static_cast<A>(p.scale));
    mask_tile(s.get(), rows, keys, lo.get(), hi.get(), bias_active ? bias.get() : nullptr);
    backward_tile(s.get(), ds.get(), q.get(), dout.get(), lse.get(), delta.get(), k.get(), v.get(), rows, keys,
                  p.head_dim, static_cast<A>(p.scale), want_dq ? dq.get() : nullptr, want_dkdv ? dk.get() : nullptr,
                  want_dkdv ? dv.get() : nullptr);
  }
  bool bias_active = false;
};

}  // namespace

template <typename scalar_t>
void banded_attention_backward(const AttentionParams& p, void* delta_base) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim;
  const int64_t left = p.window_left, right = p.effective_right();
  const std::vector<BandTile> tiles = band_tiles(p, kRowTile);
  const auto globals = positions_with_role(p, kGlobal);

  // delta_i = dO_i . O_i, the softmax-backward row term.
  parallel_tasks(p.batch * p.heads, [&](int64_t first, int64_t last) {
    Scratch<acc> a(D), o(D);
    for (int64_t bh = first; bh < last; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const auto* dout = static_cast<const scalar_t*>(p.grad_out.data) + p.grad_out.offset(b, h, 0);
      const auto* out = static_cast<const scalar_t*>(p.out.data) + p.out.offset(b, h, 0);
      auto* delta = static_cast<acc*>(delta_base) + p.lse_offset(b, h, 0);
      for (int64_t n = 0; n < p.seqlen; ++n) {
        load_rows(a.get(), dout, p.grad_out.stride_n, Positions{n, 1}, 1, D);
        load_rows(o.get(), out, p.out.stride_n, Positions{n, 1}, 1, D);
        delta[n] = dot(a.get(), o.get(), D);
      }
    }
  });

  // Pass 1: dQ.
  parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t first, int64_t last) {
    TileBuffers<acc> buf(kRowTile, kBlockLimit, D);
    for (int64_t t = first; t < last; ++t) {
      const BandTile& tile = tiles[t];
      const int64_t rows = tile.end - tile.begin;
      const uint8_t* roles = p.roles + tile.b * p.seqlen;
      HeadPointers<scalar_t> hp(p, delta_base, tile.b, tile.h);
      const Positions qpos = tile.rows(tile.begin);
      buf.load_queries(hp, p, qpos, rows);
      std::fill(buf.dq.get(), buf.dq.get() + rows * D, acc(0));

      const int64_t key_begin = std::max<int64_t>(0, tile.begin - left);
      const int64_t key_end = std::min(tile.length, tile.end + right);
      for_each_block(key_begin, key_end, kBlockLimit, [&](int64_t c0, int64_t c1) {
        const int64_t keys = c1 - c0;
        const Positions kpos = tile.rows(c0);
        buf.load_keys(hp, p, kpos, keys);
        for (int64_t c = 0; c < keys; ++c) buf.bias.get()[c] = roles[kpos[c]] == kLocal ? acc(0) : neg_inf<acc>();
        for (int64_t r = 0; r < rows; ++r) {
          buf.lo.get()[r] = tile.begin + r - left - c0;
          buf.hi.get()[r] = tile.begin + r + right + 1 - c0;
        }
        buf.bias_active = true;
        buf.run(p, rows, keys, true, false);
      });
      const std::vector<int64_t>& g = globals[tile.b];
      for_each_block(0, static_cast<int64_t>(g.size()), kBlockLimit, [&](int64_t g0, int64_t g1) {
        const int64_t keys = g1 - g0;
        buf.load_keys(hp, p, Positions{0, 1, g.data() + g0}, keys);
        for (int64_t r = 0; r < rows; ++r) {
          buf.lo.get()[r] = 0;
          buf.hi.get()[r] = p.causal ? count_at_most(g.data() + g0, keys, qpos[r]) : keys;
        }
        buf.bias_active = false;
        buf.run(p, rows, keys, true, false);
      });
      store_rows(hp.dq, p.grad_q.stride_n, qpos, buf.dq.get(), rows, D);
    }
  });

  // Pass 2: dK, dV of band keys. Query index a holds key index c in its band iff
  // c - right <= a <= c + left.
  parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t first, int64_t last) {
    TileBuffers<acc> buf(kBlockLimit, kRowTile, D);
    for (int64_t t = first; t < last; ++t) {
      const BandTile& tile = tiles[t];
      const int64_t keys = tile.end - tile.begin;
      const uint8_t* roles = p.roles + tile.b * p.seqlen;
      HeadPointers<scalar_t> hp(p, delta_base, tile.b, tile.h);
      const Positions kpos = tile.rows(tile.begin);
      buf.load_keys(hp, p, kpos, keys);
      for (int64_t c = 0; c < keys; ++c) buf.bias.get()[c] = roles[kpos[c]] == kLocal ? acc(0) : neg_inf<acc>();
      buf.bias_active = true;
      std::fill(buf.dk.get(), buf.dk.get() + keys * D, acc(0));
      std::fill(buf.dv.get(), buf.dv.get() + keys * D, acc(0));

      const int64_t query_begin = std::max<int64_t>(0, tile.begin - right);
      const int64_t query_end = std::min(tile.length, tile.end + left);
      for_each_block(query_begin, query_end, kBlockLimit, [&](int64_t a0, int64_t a1) {
        const int64_t rows = a1 - a0;
        buf.load_queries(hp, p, tile.rows(a0), rows);
        for (int64_t r = 0; r < rows; ++r) {
          buf.lo.get()[r] = a0 + r - left - tile.begin;
          buf.hi.get()[r] = a0 + r + right + 1 - tile.begin;
        }
        buf.run(p, rows, keys, false, true);
      });
      store_rows(hp.dk, p.grad_k.stride_n, kpos, buf.dk.get(), keys, D);
      store_rows(hp.dv, p.grad_v.stride_n, kpos, buf.dv.get(), keys, D);
    }
  });

  // Pass 3: dK, dV of global keys, one task per (batch, head, block of global keys).
  struct GlobalBlock { int64_t b, h, g0, g1; };
  std::vector<GlobalBlock> blocks;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for_each_block(0, static_cast<int64_t>(globals[b].size()), kRowTile,
                     [&](int64_t g0, int64_t g1) { blocks.push_back({b, h, g0, g1}); });
    }
  }
  parallel_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t first, int64_t last) {
    TileBuffers<acc> buf(kBlockLimit, kRowTile, D);
    buf.bias_active = false;
    for (int64_t t = first; t < last; ++t) {
      const GlobalBlock& gb = blocks[t];
      const int64_t keys = gb.g1 - gb.g0;
      const int64_t* g = globals[gb.b].data() + gb.g0;
      HeadPointers<scalar_t> hp(p, delta_base, gb.b, gb.h);
      const Positions kpos{0, 1, g};
      buf.load_keys(hp, p, kpos, keys);
      std::fill(buf.dk.get(), buf.dk.get() + keys * D, acc(0));
      std::fill(buf.dv.get(), buf.dv.get() + keys * D, acc(0));
      // Non-local rows carry lse = -inf and so contribute nothing; with causal attention the
      // first query that can see any of these keys is the first of them.
      const int64_t query_begin = p.causal ? g[0] : 0;
      for_each_block(query_begin, p.seqlen, kBlockLimit, [&](int64_t i0, int64_t i1) {
        const int64_t rows = i1 - i0;
        buf.load_queries(hp, p, Positions{i0, 1}, rows);
        for (int64_t r = 0; r < rows; ++r) {
          buf.lo.get()[r] = 0;
          buf.hi.get()[r] = p.causal ? count_at_most(g, keys, i0 + r) : keys;
        }
        buf.run(p, rows, keys, false, true);
      });
      store_rows(hp.dk, p.grad_k.stride_n, kpos, buf.dk.get(), keys, D);
      store_rows(hp.dv, p.grad_v.stride_n, kpos, buf.dv.get(), keys, D);
    }
  });
}

template void banded_attention_backward<float>(const AttentionParams&, void*);
template void banded_attention_backward<double>(const AttentionParams&, void*);
template void banded_attention_backward<c10::BFloat16>(const AttentionParams&, void*);

}  // namespace longformer::cpu
