// Rows of global queries: each attends to every real key of its batch row (keys at or before it
// when causal) with the global projections. There are few such rows, each over all N keys.
//
// Forward task = (batch, head, tile of global queries); keys are walked in blocks over [0, N).
// Backward, deterministic: dQ per tile of global queries; dK, dV per block of keys over all
// global queries of the batch row.
#include "band_tiles.h"
#include "forward_tile.h"
#include "kernels.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)
namespace {

struct GlobalTile { int64_t b, h, g0, g1; };

std::vector<GlobalTile> global_query_tiles(const AttentionParams& p, const std::vector<std::vector<int64_t>>& g) {
  std::vector<GlobalTile> tiles;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for_each_block(0, static_cast<int64_t>(g[b].size()), kRowTile, [&](int64_t g0, int64_t g1) {
        tiles.push_back({b, h, g0, g1});
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
  const auto globals = positions_with_role(p, kGlobal);
  const std::vector<GlobalTile> tiles = global_query_tiles(p, globals);

  parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t first, int64_t last) {
    ForwardTile<acc> query(D);
    KeysAndValues<scalar_t> head_keys(D);
    Scratch<acc> bias(kBlockLimit), row_out(D);

    for (int64_t t = first; t < last; ++t) {
      const GlobalTile& tile = tiles[t];
      const int64_t rows = tile.g1 - tile.g0;
      const uint8_t* roles = p.roles + tile.b * p.seqlen;
      const Positions qpos{0, 1, globals[tile.b].data() + tile.g0};
      const auto* qh = static_cast<const scalar_t*>(p.q.data) + p.q.offset(tile.b, tile.h, 0);
      const auto* kh = static_cast<const scalar_t*>(p.k.data) + p.k.offset(tile.b, tile.h, 0);
      const auto* vh = static_cast<const scalar_t*>(p.v.data) + p.v.offset(tile.b, tile.h, 0);
      query.start(qh, p.q.stride_n, qpos, rows, static_cast<acc>(p.scale));

      const int64_t key_end = p.causal ? qpos[rows - 1] + 1 : p.seqlen;
      head_keys.select(kh, p.k.stride_n, vh, p.v.stride_n, Positions{0, 1}, p.seqlen, roles);
      for_each_block(0, key_end, kBlockLimit, [&](int64_t c0, int64_t c1) {
        const int64_t keys = c1 - c0;
        mask_global_rows(p, roles, qpos, rows, c0, keys, bias.get(), query.lo(), query.hi());
        query.attend(head_keys, c0, keys, bias.get());
      });

      auto* out_h = static_cast<scalar_t*>(p.out.data) + p.out.offset(tile.b, tile.h, 0);
      auto* lse = static_cast<acc*>(p.lse) + p.lse_offset(tile.b, tile.h, 0);
      for (int64_t r = 0; r < rows; ++r) {
        lse[qpos[r]] = query.finish_row(r, row_out.get());
        store_rows(out_h, p.out.stride_n, Positions{qpos[r], 1}, row_out.get(), 1, D);
      }
    }
  });
}

template <typename scalar_t>
void global_attention_backward(const AttentionParams& p, void* delta_base, bool accumulate) {
  using acc = acc_type<scalar_t>;
  const int64_t D = p.head_dim;
  const auto globals = positions_with_role(p, kGlobal);
  const std::vector<GlobalTile> tiles = global_query_tiles(p, globals);
  auto head = [&](const RowMajorHeads& t, int64_t b, int64_t h) {
    return static_cast<scalar_t*>(t.data) + t.offset(b, h, 0);
  };

  // Gathers q, dO, lse and delta of global rows qpos[0, rows) of (b, h).
  auto load_queries = [&](acc* q, acc* dout, acc* lse, acc* delta, int64_t b, int64_t h, Positions qpos,
                          int64_t rows) {
    load_rows(q, head(p.q, b, h), p.q.stride_n, qpos, rows, D);  // gathered: global rows are scattered
    load_rows(dout, head(p.grad_out, b, h), p.grad_out.stride_n, qpos, rows, D);
    const acc* lse_h = static_cast<const acc*>(p.lse) + p.lse_offset(b, h, 0);
    const acc* delta_h = static_cast<const acc*>(delta_base) + p.lse_offset(b, h, 0);
    for (int64_t r = 0; r < rows; ++r) {
      lse[r] = lse_h[qpos[r]];
      delta[r] = delta_h[qpos[r]];
    }
  };

  // delta of each global row.
  parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t first, int64_t last) {
    Scratch<acc> a(D), o(D);
    for (int64_t t = first; t < last; ++t) {
      const GlobalTile& tile = tiles[t];
      auto* delta = static_cast<acc*>(delta_base) + p.lse_offset(tile.b, tile.h, 0);
      for (int64_t gi = tile.g0; gi < tile.g1; ++gi) {
        const int64_t n = globals[tile.b][gi];
        load_rows(a.get(), head(p.grad_out, tile.b, tile.h), p.grad_out.stride_n, Positions{n, 1}, 1, D);
        load_rows(o.get(), head(p.out, tile.b, tile.h), p.out.stride_n, Positions{n, 1}, 1, D);
        delta[n] = dot(a.get(), o.get(), D);
      }
    }
  });

  // dQ of global rows.
  parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t first, int64_t last) {
    Scratch<acc> q(kRowTile * D), dout(kRowTile * D), lse(kRowTile), delta(kRowTile), dq(kRowTile * D);
    Scratch<acc> k(kBlockLimit * D), v(kBlockLimit * D), s(kRowTile * kBlockLimit), ds(kRowTile * kBlockLimit);
    Scratch<acc> bias(kBlockLimit);
    Scratch<int64_t> lo(kRowTile), hi(kRowTile);
    for (int64_t t = first; t < last; ++t) {
      const GlobalTile& tile = tiles[t];
      const int64_t rows = tile.g1 - tile.g0;
      const uint8_t* roles = p.roles + tile.b * p.seqlen;
      const Positions qpos{0, 1, globals[tile.b].data() + tile.g0};
      const Rows<acc> qr{q.get(), D}, doutr{dout.get(), D};
      load_queries(q.get(), dout.get(), lse.get(), delta.get(), tile.b, tile.h, qpos, rows);
      std::fill(dq.get(), dq.get() + rows * D, acc(0));
      const int64_t key_end = p.causal ? qpos[rows - 1] + 1 : p.seqlen;
      for_each_block(0, key_end, kBlockLimit, [&](int64_t c0, int64_t c1) {
        const int64_t keys = c1 - c0;
        const Rows<acc> kr =
            rows_of(k.get(), head(p.k, tile.b, tile.h), p.k.stride_n, Positions{c0, 1}, keys, D, roles);
        const Rows<acc> vr =
            rows_of(v.get(), head(p.v, tile.b, tile.h), p.v.stride_n, Positions{c0, 1}, keys, D, roles);
        mask_global_rows(p, roles, qpos, rows, c0, keys, bias.get(), lo.get(), hi.get());
        score_tile(s.get(), qr, kr, rows, keys, D, static_cast<acc>(p.scale));
        mask_tile(s.get(), rows, keys, lo.get(), hi.get(), bias.get());
        backward_tile(s.get(), ds.get(), qr, doutr, lse.get(), delta.get(), kr, vr, rows, keys, D,
                      static_cast<acc>(p.scale), dq.get(), static_cast<acc*>(nullptr), static_cast<acc*>(nullptr));
      });
      store_rows(head(p.grad_q, tile.b, tile.h), p.grad_q.stride_n, qpos, dq.get(), rows, D);
    }
  });

  // dK, dV per block of keys, over all global rows of the batch row. Blocks are large because
  // there are usually few global rows: small blocks would make many tiny GEMMs.
  const int64_t key_blocks = (p.seqlen + kBlockLimit - 1) / kBlockLimit;
  parallel_tasks(p.batch * p.heads * key_blocks, [&](int64_t first, int64_t last) {
    Scratch<acc> q(kRowTile * D), dout(kRowTile * D), lse(kRowTile), delta(kRowTile);
    Scratch<acc> k(kBlockLimit * D), v(kBlockLimit * D), dk(kBlockLimit * D), dv(kBlockLimit * D);
    Scratch<acc> s(kRowTile * kBlockLimit), ds(kRowTile * kBlockLimit), bias(kBlockLimit);
    Scratch<int64_t> lo(kRowTile), hi(kRowTile);
    for (int64_t t = first; t < last; ++t) {
      const int64_t b = t / (p.heads * key_blocks), h = (t / key_blocks) % p.heads;
      const int64_t c0 = (t % key_blocks) * kBlockLimit, keys = std::min(kBlockLimit, p.seqlen - c0);
      const uint8_t* roles = p.roles + b * p.seqlen;
      const std::vector<int64_t>& g = globals[b];
      const Rows<acc> kr = rows_of(k.get(), head(p.k, b, h), p.k.stride_n, Positions{c0, 1}, keys, D, roles);
      const Rows<acc> vr = rows_of(v.get(), head(p.v, b, h), p.v.stride_n, Positions{c0, 1}, keys, D, roles);
      if (accumulate) {  // start from the local rows' gradients, rounded once at the end
        load_rows(dk.get(), head(p.grad_k, b, h), p.grad_k.stride_n, Positions{c0, 1}, keys, D);
        load_rows(dv.get(), head(p.grad_v, b, h), p.grad_v.stride_n, Positions{c0, 1}, keys, D);
      } else {
        std::fill(dk.get(), dk.get() + keys * D, acc(0));
        std::fill(dv.get(), dv.get() + keys * D, acc(0));
      }
      // With causal attention only global queries at or after c0 see this block.
      const int64_t g_begin = p.causal ? count_at_most(g.data(), static_cast<int64_t>(g.size()), c0 - 1) : 0;
      for_each_block(g_begin, static_cast<int64_t>(g.size()), kRowTile, [&](int64_t g0, int64_t g1) {
        const int64_t rows = g1 - g0;
        const Positions qpos{0, 1, g.data() + g0};
        const Rows<acc> qr{q.get(), D}, doutr{dout.get(), D};
        load_queries(q.get(), dout.get(), lse.get(), delta.get(), b, h, qpos, rows);
        mask_global_rows(p, roles, qpos, rows, c0, keys, bias.get(), lo.get(), hi.get());
        score_tile(s.get(), qr, kr, rows, keys, D, static_cast<acc>(p.scale));
        mask_tile(s.get(), rows, keys, lo.get(), hi.get(), bias.get());
        backward_tile(s.get(), ds.get(), qr, doutr, lse.get(), delta.get(), kr, vr, rows, keys, D,
                      static_cast<acc>(p.scale), static_cast<acc*>(nullptr), dk.get(), dv.get());
      });
      store_rows(head(p.grad_k, b, h), p.grad_k.stride_n, Positions{c0, 1}, dk.get(), keys, D);
      store_rows(head(p.grad_v, b, h), p.grad_v.stride_n, Positions{c0, 1}, dv.get(), keys, D);
    }
  });
}

#define LONGFORMER_INSTANTIATE(T, name)                              \
  template void global_attention_forward<T>(const AttentionParams&); \
  template void global_attention_backward<T>(const AttentionParams&, void*, bool);
LONGFORMER_CPU_FOR_EACH_DTYPE(LONGFORMER_INSTANTIATE)
#undef LONGFORMER_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
