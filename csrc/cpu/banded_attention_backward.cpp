// Fused backward of the local rows, recomputing probabilities from the saved log-sum-exp.
//
// Deterministic by construction: every output row is owned by exactly one task and accumulated
// in a fixed order, so the bits do not depend on the number of threads. First the row terms
// (backward_row_terms: delta of every row, the sinks' gradient), then two passes:
//   1. one task per (segment, head, dilation residue): its query tiles in order; each tile adds to
//      its own dQ and to the dK, dV of the band keys it touches, kept for the whole residue in
//      accumulation-dtype buffers (keys of one residue are only touched by queries of the same
//      residue). Global keys add to dQ here.
//   2. dK, dV of the global keys, one task per (segment, head, block of global keys), over every
//      local query of the segment. Pass 1 wrote zeros there (global keys are masked out of
//      every band); pass 2 overwrites them.
// With grouped KV heads dK, dV are written per query head (params.h: grad_kv_per_query_head).
#include "band_tiles.h"
#include "kernels.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)
namespace {

// A (batch, head)'s operands: query-side ones indexed by position (params.h: query_offset),
// key-side ones in the query head's KV head (its gradient slice for dk, dv).
template <typename scalar_t>
struct HeadPointers {
  using acc = acc_type<scalar_t>;
  const scalar_t *q, *k, *v, *dout;
  scalar_t *dq, *dk, *dv;
  const acc *lse, *delta;

  HeadPointers(const AttentionParams& p, const void* delta_base, int64_t b, int64_t h)
      : q(static_cast<const scalar_t*>(p.q.data) + p.query_offset(p.q, b, h, 0)),
        k(static_cast<const scalar_t*>(p.k.data) + p.k.offset(b, p.kv_head(h), 0)),
        v(static_cast<const scalar_t*>(p.v.data) + p.v.offset(b, p.kv_head(h), 0)),
        dout(static_cast<const scalar_t*>(p.grad_out.data) + p.query_offset(p.grad_out, b, h, 0)),
        dq(static_cast<scalar_t*>(p.grad_q.data) + p.query_offset(p.grad_q, b, h, 0)),
        dk(static_cast<scalar_t*>(p.grad_k.data) + p.grad_k.offset(b, p.grad_kv_head(h), 0)),
        dv(static_cast<scalar_t*>(p.grad_v.data) + p.grad_v.offset(b, p.grad_kv_head(h), 0)),
        lse(static_cast<const acc*>(p.lse) + p.lse_position_offset(b, h, 0)),
        delta(static_cast<const acc*>(delta_base) + p.lse_position_offset(b, h, 0)) {}
};

// Per-worker scratch for (query rows x key rows) backward tiles, plus the views of the current
// query rows (q, dO, lse, delta) and key rows (k, v). Rows of padding tokens are loaded as zeros
// (tile_math.h): the tile's products sum over query rows (dK, dV) and key rows (dQ, dP).
template <typename scalar_t>
struct TileBuffers {
  using acc = acc_type<scalar_t>;
  Scratch<acc> q_buf, dout_buf, k_buf, v_buf, s, ds, dcap, lse, delta, dq, bias;
  Scratch<int64_t> lo, hi;
  Rows<acc> q{nullptr, 0}, dout{nullptr, 0}, k{nullptr, 0}, v{nullptr, 0};

  TileBuffers(int64_t rows, int64_t keys, int64_t dim)
      : q_buf(rows * dim), dout_buf(rows * dim), k_buf(keys * dim), v_buf(keys * dim), s(rows * keys),
        ds(rows * keys), dcap(rows * keys), lse(rows), delta(rows), dq(rows * dim), bias(keys), lo(rows), hi(rows) {}

  void load_queries(const HeadPointers<scalar_t>& hp, const AttentionParams& p, Positions pos, int64_t rows,
                    const uint8_t* roles) {
    q = rows_of(q_buf.get(), hp.q, p.q.stride_n, pos, rows, p.head_dim, roles);
    dout = rows_of(dout_buf.get(), hp.dout, p.grad_out.stride_n, pos, rows, p.head_dim, roles);
    // Only local rows are this kernel's: a global row's lse (from the global rows' kernel) is
    // finite, so it is read as -inf here, which excludes the row (backward_tile).
    for (int64_t r = 0; r < rows; ++r) {
      lse.get()[r] = roles[pos[r]] == kLocal ? hp.lse[pos[r]] : neg_inf<acc>();
      delta.get()[r] = hp.delta[pos[r]];
    }
  }
  void load_keys(const HeadPointers<scalar_t>& hp, const AttentionParams& p, Positions pos, int64_t keys,
                 const uint8_t* roles) {
    k = rows_of(k_buf.get(), hp.k, p.k.stride_n, pos, keys, p.head_dim, roles);
    v = rows_of(v_buf.get(), hp.v, p.v.stride_n, pos, keys, p.head_dim, roles);
  }
  // Scores of the loaded rows (at qpos) and keys (at kpos), modified and masked by lo/hi (and
  // bias if given), then the backward tile into whichever of dq (this buffer's), dk, dv is non-null.
  void run(const AttentionParams& p, const ScoreModifiers<acc>& mods, Positions qpos, Positions kpos, int64_t rows,
           int64_t keys, const acc* key_bias, acc* dq_out, acc* dk, acc* dv) {
    const acc scale = static_cast<acc>(p.scale);
    backward_scores(s.get(), dcap.get(), q, k, rows, keys, p.head_dim, scale, mods, qpos, kpos, lo.get(), hi.get(),
                    key_bias);
    backward_tile(s.get(), ds.get(), mods.softcap > acc(0) ? dcap.get() : nullptr, q, dout, lse.get(), delta.get(), k,
                  v, rows, keys, p.head_dim, scale, dq_out, dk, dv);
  }
};

}  // namespace

template <typename scalar_t>
void backward_row_terms(const AttentionParams& p, void* delta_base) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim;
  // delta_i = dO_i . O_i - dlse_i, the softmax-backward row term (lse's own gradient enters there:
  // d lse_i / d s_ij = P_ij); 0 for padding rows, whose dO is never read. A sink's logit gets
  // -sum_i P_sink_i * delta_i, P_sink_i = exp(sink - lse_i), summed per (batch, head) here and over
  // the batch below in a fixed order.
  Scratch<acc> sink_partials(p.batch * p.heads);
  parallel_tasks(p.batch * p.heads, [&](int64_t first, int64_t last) {
    Scratch<acc> a(D), o(D);
    for (int64_t bh = first; bh < last; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const uint8_t* roles = p.roles + b * p.seqlen;
      const auto* dout = static_cast<const scalar_t*>(p.grad_out.data) + p.query_offset(p.grad_out, b, h, 0);
      const auto* out = static_cast<const scalar_t*>(p.out.data) + p.query_offset(p.out, b, h, 0);
      const acc* lse = static_cast<const acc*>(p.lse) + p.lse_position_offset(b, h, 0);
      const acc* dlse = p.grad_lse ? static_cast<const acc*>(p.grad_lse) + p.lse_position_offset(b, h, 0) : nullptr;
      auto* delta = static_cast<acc*>(delta_base) + p.lse_position_offset(b, h, 0);
      const acc sink = sink_logit<acc>(p, h);
      acc sink_grad = 0;
      for (int64_t n = p.q_offset; n < p.q_offset + p.queries; ++n) {
        if (roles[n] == kPadding) {
          delta[n] = acc(0);
          continue;
        }
        load_rows(a.get(), dout, p.grad_out.stride_n, Positions{n, 1}, 1, D);
        load_rows(o.get(), out, p.out.stride_n, Positions{n, 1}, 1, D);
        delta[n] = dot(a.get(), o.get(), D) - (dlse ? dlse[n] : acc(0));
        if (p.sinks && lse[n] != neg_inf<acc>()) sink_grad -= std::exp(sink - lse[n]) * delta[n];
      }
      sink_partials.get()[bh] = sink_grad;
    }
  });
  if (p.grad_sinks) {
    auto* grad_sinks = static_cast<acc*>(p.grad_sinks);
    for (int64_t h = 0; h < p.heads; ++h) {
      acc total = 0;
      for (int64_t b = 0; b < p.batch; ++b) total += sink_partials.get()[b * p.heads + h];
      grad_sinks[h] = total;
    }
  }
}

template <typename scalar_t>
void banded_attention_backward(const AttentionParams& p, const void* delta_base) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim;
  const int64_t left = p.window_left, right = p.effective_right();
  const std::vector<Segment> segs = segments(p);
  const auto globals = positions_with_role(p, segs, kGlobal);

  // Pass 1: dQ, and dK, dV of band keys.
  const std::vector<Residue> tasks = residues(p, segs);
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t first, int64_t last) {
    TileBuffers<scalar_t> buf(kRowTile, kBlockLimit, D);
    for (int64_t t = first; t < last; ++t) {
      const Residue& res = tasks[t];
      const uint8_t* roles = p.roles + res.b * p.seqlen;
      HeadPointers<scalar_t> hp(p, delta_base, res.b, res.h);
      const ScoreModifiers<acc> mods(p, res.h);
      Scratch<acc> dk(res.length * D), dv(res.length * D);
      std::fill(dk.get(), dk.get() + res.length * D, acc(0));
      std::fill(dv.get(), dv.get() + res.length * D, acc(0));

      for (int64_t a0 = res.first_query; a0 < res.query_end; a0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, res.query_end - a0);
        const Positions qpos = res.at(a0);
        buf.load_queries(hp, p, qpos, rows, roles);
        std::fill(buf.dq.get(), buf.dq.get() + rows * D, acc(0));

        const int64_t key_begin = std::max<int64_t>(0, a0 - left);
        const int64_t key_end = std::min(res.length, a0 + rows + right);
        for_each_block(key_begin, key_end, kBlockLimit, [&](int64_t c0, int64_t c1) {
          const int64_t keys = c1 - c0;
          const Positions kpos = res.at(c0);
          buf.load_keys(hp, p, kpos, keys, roles);
          for (int64_t c = 0; c < keys; ++c) buf.bias.get()[c] = roles[kpos[c]] == kLocal ? acc(0) : neg_inf<acc>();
          for (int64_t r = 0; r < rows; ++r) {
            buf.lo.get()[r] = a0 + r - left - c0;
            buf.hi.get()[r] = a0 + r + right + 1 - c0;
          }
          buf.run(p, mods, qpos, kpos, rows, keys, buf.bias.get(), buf.dq.get(), dk.get() + c0 * D, dv.get() + c0 * D);
        });
        const std::vector<int64_t>& g = globals[res.segment];
        for_each_block(0, static_cast<int64_t>(g.size()), kBlockLimit, [&](int64_t g0, int64_t g1) {
          const int64_t keys = g1 - g0;
          const Positions kpos{0, 1, g.data() + g0};
          buf.load_keys(hp, p, kpos, keys, roles);
          for (int64_t r = 0; r < rows; ++r) {
            buf.lo.get()[r] = 0;
            buf.hi.get()[r] = p.causal ? count_at_most(g.data() + g0, keys, qpos[r]) : keys;
          }
          buf.run(p, mods, qpos, kpos, rows, keys, nullptr, buf.dq.get(), nullptr, nullptr);
        });
        store_rows(hp.dq, p.grad_q.stride_n, qpos, buf.dq.get(), rows, D);
      }
      store_rows(hp.dk, p.grad_k.stride_n, res.at(0), dk.get(), res.length, D);
      store_rows(hp.dv, p.grad_v.stride_n, res.at(0), dv.get(), res.length, D);
    }
  });

  // Pass 2: dK, dV of global keys, one task per (segment, head, block of global keys).
  struct GlobalBlock { int64_t segment, h, g0, g1; };
  std::vector<GlobalBlock> blocks;
  for (int64_t s = 0; s < static_cast<int64_t>(segs.size()); ++s) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for_each_block(0, static_cast<int64_t>(globals[s].size()), kRowTile,
                     [&](int64_t g0, int64_t g1) { blocks.push_back({s, h, g0, g1}); });
    }
  }
  parallel_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t first, int64_t last) {
    TileBuffers<scalar_t> buf(kBlockLimit, kRowTile, D);
    Scratch<acc> dk(kRowTile * D), dv(kRowTile * D);
    for (int64_t t = first; t < last; ++t) {
      const GlobalBlock& gb = blocks[t];
      const Segment& seg = segs[gb.segment];
      const int64_t keys = gb.g1 - gb.g0;
      const int64_t* g = globals[gb.segment].data() + gb.g0;
      const uint8_t* roles = p.roles + seg.b * p.seqlen;
      HeadPointers<scalar_t> hp(p, delta_base, seg.b, gb.h);
      const ScoreModifiers<acc> mods(p, gb.h);
      const Positions kpos{0, 1, g};
      std::fill(dk.get(), dk.get() + keys * D, acc(0));
      std::fill(dv.get(), dv.get() + keys * D, acc(0));
      // Non-local rows are read with lse = -inf and so contribute nothing; with causal attention the
      // first query that can see any of these keys is the first of them.
      const int64_t query_begin = std::max(first_query(p, seg), p.causal ? g[0] : int64_t(0));
      for_each_block(query_begin, query_end(p, seg), kBlockLimit, [&](int64_t i0, int64_t i1) {
        const int64_t rows = i1 - i0;
        buf.load_queries(hp, p, Positions{i0, 1}, rows, roles);
        buf.load_keys(hp, p, kpos, keys, roles);
        for (int64_t r = 0; r < rows; ++r) {
          buf.lo.get()[r] = 0;
          buf.hi.get()[r] = p.causal ? count_at_most(g, keys, i0 + r) : keys;
        }
        buf.run(p, mods, Positions{i0, 1}, kpos, rows, keys, nullptr, nullptr, dk.get(), dv.get());
      });
      store_rows(hp.dk, p.grad_k.stride_n, kpos, dk.get(), keys, D);
      store_rows(hp.dv, p.grad_v.stride_n, kpos, dv.get(), keys, D);
    }
  });
}

// Grouped KV heads: out[b, g] = sum over the query heads h of group g of per_query_head[b, h], in
// head order, accumulated in the accumulation dtype and rounded once.
template <typename scalar_t>
void sum_kv_groups(const AttentionParams& p, RowMajorHeads per_query_head, RowMajorHeads out) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim, group = p.heads / p.heads_kv;
  parallel_tasks(p.batch * p.heads_kv, [&](int64_t first, int64_t last) {
    Scratch<acc> sum(D), row(D);
    for (int64_t t = first; t < last; ++t) {
      const int64_t b = t / p.heads_kv, g = t % p.heads_kv;
      for (int64_t n = 0; n < p.seqlen; ++n) {
        std::fill(sum.get(), sum.get() + D, acc(0));
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          widen(row.get(), static_cast<const scalar_t*>(per_query_head.data) + per_query_head.offset(b, h, n), D);
          for (int64_t c = 0; c < D; ++c) sum.get()[c] += row.get()[c];
        }
        narrow(static_cast<scalar_t*>(out.data) + out.offset(b, g, n), sum.get(), D);
      }
    }
  });
}

#define LONGFORMER_INSTANTIATE(T, name)                                                     \
  template void backward_row_terms<T>(const AttentionParams&, void*);                       \
  template void banded_attention_backward<T>(const AttentionParams&, const void*);          \
  template void sum_kv_groups<T>(const AttentionParams&, RowMajorHeads, RowMajorHeads);
LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_INSTANTIATE)
#undef LONGFORMER_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
