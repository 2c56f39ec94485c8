// Fused backward of the local rows, recomputing probabilities from the saved log-sum-exp.
//
// Deterministic by construction: every output row is owned by exactly one task and accumulated
// in a fixed order, so the bits do not depend on the number of threads. Two passes:
//   1. one task per (batch, head, dilation residue): its query tiles in order; each tile adds to
//      its own dQ and to the dK, dV of the band keys it touches, kept for the whole residue in
//      accumulation-dtype buffers (keys of one residue are only touched by queries of the same
//      residue). Global keys add to dQ here.
//   2. dK, dV of the global keys, one task per (batch, head, block of global keys), over every
//      local query of the batch row. Pass 1 wrote zeros there (global keys are masked out of
//      every band); pass 2 overwrites them.
#include "band_tiles.h"
#include "kernels.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)
namespace {

template <typename scalar_t>
struct HeadPointers {
  using acc = acc_type<scalar_t>;
  const scalar_t *q, *k, *v, *dout;
  scalar_t *dq, *dk, *dv;
  const acc *lse, *delta;

  HeadPointers(const AttentionParams& p, const void* delta_base, int64_t b, int64_t h)
      : q(static_cast<const scalar_t*>(p.q.data) + p.q.offset(b, h, 0)),
        k(static_cast<const scalar_t*>(p.k.data) + p.k.offset(b, h, 0)),
        v(static_cast<const scalar_t*>(p.v.data) + p.v.offset(b, h, 0)),
        dout(static_cast<const scalar_t*>(p.grad_out.data) + p.grad_out.offset(b, h, 0)),
        dq(static_cast<scalar_t*>(p.grad_q.data) + p.grad_q.offset(b, h, 0)),
        dk(static_cast<scalar_t*>(p.grad_k.data) + p.grad_k.offset(b, h, 0)),
        dv(static_cast<scalar_t*>(p.grad_v.data) + p.grad_v.offset(b, h, 0)),
        lse(static_cast<const acc*>(p.lse) + p.lse_offset(b, h, 0)),
        delta(static_cast<const acc*>(delta_base) + p.lse_offset(b, h, 0)) {}
};

// Per-worker scratch for (query rows x key rows) backward tiles, plus the views of the current
// query rows (q, dO, lse, delta) and key rows (k, v). Rows of padding tokens are loaded as zeros
// (tile_math.h): the tile's products sum over query rows (dK, dV) and key rows (dQ, dP).
template <typename scalar_t>
struct TileBuffers {
  using acc = acc_type<scalar_t>;
  Scratch<acc> q_buf, dout_buf, k_buf, v_buf, s, ds, lse, delta, dq, bias;
  Scratch<int64_t> lo, hi;
  Rows<acc> q{nullptr, 0}, dout{nullptr, 0}, k{nullptr, 0}, v{nullptr, 0};

  TileBuffers(int64_t rows, int64_t keys, int64_t dim)
      : q_buf(rows * dim), dout_buf(rows * dim), k_buf(keys * dim), v_buf(keys * dim), s(rows * keys),
        ds(rows * keys), lse(rows), delta(rows), dq(rows * dim), bias(keys), lo(rows), hi(rows) {}

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
  // Scores of the loaded rows and keys, masked by lo/hi (and bias if given), then the backward
  // tile into whichever of dq (this buffer's), dk, dv is non-null.
  void run(const AttentionParams& p, int64_t rows, int64_t keys, const acc* key_bias, acc* dq_out, acc* dk,
           acc* dv) {
    const acc scale = static_cast<acc>(p.scale);
    score_tile(s.get(), q, k, rows, keys, p.head_dim, scale);
    mask_tile(s.get(), rows, keys, lo.get(), hi.get(), key_bias);
    backward_tile(s.get(), ds.get(), q, dout, lse.get(), delta.get(), k, v, rows, keys, p.head_dim, scale, dq_out,
                  dk, dv);
  }
};

struct Residue {
  int64_t b, h, residue, dilation, length;
};

}  // namespace

template <typename scalar_t>
void banded_attention_backward(const AttentionParams& p, void* delta_base) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim;
  const int64_t left = p.window_left, right = p.effective_right();
  const auto globals = positions_with_role(p, kGlobal);

  // delta_i = dO_i . O_i, the softmax-backward row term; 0 for padding rows, whose dO is never read.
  parallel_tasks(p.batch * p.heads, [&](int64_t first, int64_t last) {
    Scratch<acc> a(D), o(D);
    for (int64_t bh = first; bh < last; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const uint8_t* roles = p.roles + b * p.seqlen;
      const auto* dout = static_cast<const scalar_t*>(p.grad_out.data) + p.grad_out.offset(b, h, 0);
      const auto* out = static_cast<const scalar_t*>(p.out.data) + p.out.offset(b, h, 0);
      auto* delta = static_cast<acc*>(delta_base) + p.lse_offset(b, h, 0);
      for (int64_t n = 0; n < p.seqlen; ++n) {
        if (roles[n] == kPadding) {
          delta[n] = acc(0);
          continue;
        }
        load_rows(a.get(), dout, p.grad_out.stride_n, Positions{n, 1}, 1, D);
        load_rows(o.get(), out, p.out.stride_n, Positions{n, 1}, 1, D);
        delta[n] = dot(a.get(), o.get(), D);
      }
    }
  });

  // Pass 1: dQ, and dK, dV of band keys.
  std::vector<Residue> residues;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t d = p.dilation[h];
      for (int64_t r = 0; r < std::min(d, p.seqlen); ++r) residues.push_back({b, h, r, d, (p.seqlen - r + d - 1) / d});
    }
  }
  parallel_tasks(static_cast<int64_t>(residues.size()), [&](int64_t first, int64_t last) {
    TileBuffers<scalar_t> buf(kRowTile, kBlockLimit, D);
    for (int64_t t = first; t < last; ++t) {
      const Residue& res = residues[t];
      const uint8_t* roles = p.roles + res.b * p.seqlen;
      HeadPointers<scalar_t> hp(p, delta_base, res.b, res.h);
      auto at = [&](int64_t index) { return Positions{res.residue + index * res.dilation, res.dilation}; };
      Scratch<acc> dk(res.length * D), dv(res.length * D);
      std::fill(dk.get(), dk.get() + res.length * D, acc(0));
      std::fill(dv.get(), dv.get() + res.length * D, acc(0));

      for (int64_t a0 = 0; a0 < res.length; a0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, res.length - a0);
        const Positions qpos = at(a0);
        buf.load_queries(hp, p, qpos, rows, roles);
        std::fill(buf.dq.get(), buf.dq.get() + rows * D, acc(0));

        const int64_t key_begin = std::max<int64_t>(0, a0 - left);
        const int64_t key_end = std::min(res.length, a0 + rows + right);
        for_each_block(key_begin, key_end, kBlockLimit, [&](int64_t c0, int64_t c1) {
          const int64_t keys = c1 - c0;
          const Positions kpos = at(c0);
          buf.load_keys(hp, p, kpos, keys, roles);
          for (int64_t c = 0; c < keys; ++c) buf.bias.get()[c] = roles[kpos[c]] == kLocal ? acc(0) : neg_inf<acc>();
          for (int64_t r = 0; r < rows; ++r) {
            buf.lo.get()[r] = a0 + r - left - c0;
            buf.hi.get()[r] = a0 + r + right + 1 - c0;
          }
          buf.run(p, rows, keys, buf.bias.get(), buf.dq.get(), dk.get() + c0 * D, dv.get() + c0 * D);
        });
        const std::vector<int64_t>& g = globals[res.b];
        for_each_block(0, static_cast<int64_t>(g.size()), kBlockLimit, [&](int64_t g0, int64_t g1) {
          const int64_t keys = g1 - g0;
          buf.load_keys(hp, p, Positions{0, 1, g.data() + g0}, keys, roles);
          for (int64_t r = 0; r < rows; ++r) {
            buf.lo.get()[r] = 0;
            buf.hi.get()[r] = p.causal ? count_at_most(g.data() + g0, keys, qpos[r]) : keys;
          }
          buf.run(p, rows, keys, nullptr, buf.dq.get(), nullptr, nullptr);
        });
        store_rows(hp.dq, p.grad_q.stride_n, qpos, buf.dq.get(), rows, D);
      }
      store_rows(hp.dk, p.grad_k.stride_n, at(0), dk.get(), res.length, D);
      store_rows(hp.dv, p.grad_v.stride_n, at(0), dv.get(), res.length, D);
    }
  });

  // Pass 2: dK, dV of global keys, one task per (batch, head, block of global keys).
  struct GlobalBlock { int64_t b, h, g0, g1; };
  std::vector<GlobalBlock> blocks;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for_each_block(0, static_cast<int64_t>(globals[b].size()), kRowTile,
                     [&](int64_t g0, int64_t g1) { blocks.push_back({b, h, g0, g1}); });
    }
  }
  parallel_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t first, int64_t last) {
    TileBuffers<scalar_t> buf(kBlockLimit, kRowTile, D);
    Scratch<acc> dk(kRowTile * D), dv(kRowTile * D);
    for (int64_t t = first; t < last; ++t) {
      const GlobalBlock& gb = blocks[t];
      const int64_t keys = gb.g1 - gb.g0;
      const int64_t* g = globals[gb.b].data() + gb.g0;
      const uint8_t* roles = p.roles + gb.b * p.seqlen;
      HeadPointers<scalar_t> hp(p, delta_base, gb.b, gb.h);
      const Positions kpos{0, 1, g};
      std::fill(dk.get(), dk.get() + keys * D, acc(0));
      std::fill(dv.get(), dv.get() + keys * D, acc(0));
      // Non-local rows are read with lse = -inf and so contribute nothing; with causal attention the
      // first query that can see any of these keys is the first of them.
      const int64_t query_begin = p.causal ? g[0] : 0;
      for_each_block(query_begin, p.seqlen, kBlockLimit, [&](int64_t i0, int64_t i1) {
        const int64_t rows = i1 - i0;
        buf.load_queries(hp, p, Positions{i0, 1}, rows, roles);
        buf.load_keys(hp, p, kpos, keys, roles);
        for (int64_t r = 0; r < rows; ++r) {
          buf.lo.get()[r] = 0;
          buf.hi.get()[r] = p.causal ? count_at_most(g, keys, i0 + r) : keys;
        }
        buf.run(p, rows, keys, nullptr, nullptr, dk.get(), dv.get());
      });
      store_rows(hp.dk, p.grad_k.stride_n, kpos, dk.get(), keys, D);
      store_rows(hp.dv, p.grad_v.stride_n, kpos, dv.get(), keys, D);
    }
  });
}

#define LONGFORMER_INSTANTIATE(T, name) template void banded_attention_backward<T>(const AttentionParams&, void*);
LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_INSTANTIATE)
#undef LONGFORMER_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
