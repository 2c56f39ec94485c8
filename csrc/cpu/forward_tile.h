// The query tile of both fused forwards (band rows and global rows) and the keys and values it
// reads.
//
// ForwardTile holds a tile's queries, pre-scaled, and its running online softmax (unnormalised
// output o, row maxima m, row sums l). `attend` takes one block of keys; row r sees only the keys
// in [lo[r], hi[r]) of the block and, of those, the ones whose bias is not -inf. The block is
// walked kMicroRows query rows at a time: scores for the key panels those rows can see, softmax
// update, then p.v over the same key range while the group's scores are still in L1. Keys
// outside a row's interval never enter max, exp or the p.v sum, so band edges cost no masking
// pass and skipped panels no arithmetic.
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "micro_kernels.h"
#include "tile_math.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)

// The keys of one key sequence (rows seq[0, length) of a head) in the score kernel's layout:
// panel p holds keys [p W, p W + W), element d of key p W + j at [d][j], zeros past `length` and
// for padding keys (tile_math.h: a masked key must still hold finite values).
// Panels are packed on first use and kept in a ring: neighbouring band tiles share all but a
// few panels, so each key is packed about once rather than once per tile.
template <typename scalar_t>
class KeyPanels {
 public:
  using acc = acc_type<scalar_t>;
  static constexpr int64_t W = key_panel_width<acc>();

  explicit KeyPanels(int64_t dim)
      : dim_(dim), capacity_((kBlockLimit + W - 1) / W + 1), data_(capacity_ * W * dim), tags_(capacity_) {
    std::fill(tags_.get(), tags_.get() + capacity_, int64_t(-1));
  }

  // Switches to another key sequence (a no-op when it is the current one); `roles` are its batch
  // row's.
  void select(const scalar_t* head, int64_t stride_n, Positions seq, int64_t length, const uint8_t* roles) {
    if (head == head_ && stride_n == stride_n_ && seq == seq_ && length == length_ && roles == roles_) return;
    head_ = head;
    stride_n_ = stride_n;
    seq_ = seq;
    length_ = length;
    roles_ = roles;
    std::fill(tags_.get(), tags_.get() + capacity_, int64_t(-1));
  }

  // Panel p, valid until the next call. Every slot is checked by its tag, so any ring size is
  // correct; capacity_ exceeds the panels one block spans, so no panel is packed twice per block.
  const acc* panel(int64_t p) {
    const int64_t slot = p % capacity_;
    acc* dst = data_.get() + slot * W * dim_;
    if (tags_.get()[slot] != p) {
      for (int64_t j = 0; j < W; ++j) {
        const int64_t key = p * W + j;
        if (key < length_ && !is_padding(roles_, seq_[key])) {
          const scalar_t* src = head_ + seq_[key] * stride_n_;
          if constexpr (is_half_precision<scalar_t>) {  // widened a vector at a time, then transposed
            acc chunk[64];
            for (int64_t d0 = 0; d0 < dim_; d0 += 64) {
              const int64_t n = std::min<int64_t>(64, dim_ - d0);
              widen(chunk, src + d0, n);
              for (int64_t d = 0; d < n; ++d) dst[(d0 + d) * W + j] = chunk[d];
            }
          } else {
            for (int64_t d = 0; d < dim_; ++d) dst[d * W + j] = static_cast<acc>(src[d]);
          }
        } else {
          for (int64_t d = 0; d < dim_; ++d) dst[d * W + j] = acc(0);
        }
      }
      tags_.get()[slot] = p;
    }
    return dst;
  }

 private:
  int64_t dim_, capacity_;
  Scratch<acc> data_;
  Scratch<int64_t> tags_;
  const scalar_t* head_ = nullptr;
  int64_t stride_n_ = 0, length_ = 0;
  Positions seq_;
  const uint8_t* roles_ = nullptr;
};

// The values of one key sequence as back-to-back rows in the accumulation dtype, which p.v steps
// through row by row: the input itself where its rows already lie so, else a sliding window of
// converted copies, each row copied once per band rather than once per tile. Rows a whole token
// apart (heads split from one [N, H * D] projection) or strided by dilation would otherwise cost
// p.v a TLB miss per row. Padding rows are zeros (tile_math.h), so a block holding one is copied.
template <typename scalar_t>
class ValueRows {
 public:
  using acc = acc_type<scalar_t>;

  explicit ValueRows(int64_t dim) : dim_(dim), capacity_(2 * kBlockLimit), data_(capacity_ * dim) {}

  void select(const scalar_t* head, int64_t stride_n, Positions seq, const uint8_t* roles) {
    if (head == head_ && stride_n == stride_n_ && seq == seq_ && roles == roles_) return;
    head_ = head;
    stride_n_ = stride_n;
    seq_ = seq;
    roles_ = roles;
    first_ = count_ = 0;
  }

  // Rows [c0, c0 + n) of the sequence (n <= kBlockLimit), back to back; valid until the next call.
  const acc* rows(int64_t c0, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc>) {
      if (!seq_.list && seq_.step * stride_n_ == dim_ && !any_padding(roles_, seq_.from(c0), n)) {
        return head_ + seq_[c0] * stride_n_;
      }
    }
    if (c0 < first_ || c0 > first_ + count_) {  // not adjacent to the rows held: start afresh
      first_ = c0;
      count_ = 0;
    } else if (c0 + n > first_ + capacity_) {  // slide the window forward to start at c0
      count_ = first_ + count_ - c0;
      std::memmove(data_.get(), data_.get() + (c0 - first_) * dim_, count_ * dim_ * sizeof(acc));
      first_ = c0;
    }
    const int64_t held_end = first_ + count_;
    if (c0 + n > held_end) {
      load_rows(data_.get() + count_ * dim_, head_, stride_n_, seq_.from(held_end), c0 + n - held_end, dim_, roles_);
      count_ = c0 + n - first_;
    }
    return data_.get() + (c0 - first_) * dim_;
  }

 private:
  int64_t dim_, capacity_;
  Scratch<acc> data_;
  const scalar_t* head_ = nullptr;
  int64_t stride_n_ = 0, first_ = 0, count_ = 0;  // rows [first_, first_ + count_) are held
  Positions seq_;
  const uint8_t* roles_ = nullptr;
};

// One key sequence's keys (packed) and values (back to back), switched together.
template <typename scalar_t>
struct KeysAndValues {
  KeyPanels<scalar_t> keys;
  ValueRows<scalar_t> values;

  explicit KeysAndValues(int64_t dim) : keys(dim), values(dim) {}

  void select(const scalar_t* k_head, int64_t k_stride, const scalar_t* v_head, int64_t v_stride, Positions seq,
              int64_t length, const uint8_t* roles) {
    keys.select(k_head, k_stride, seq, length, roles);
    values.select(v_head, v_stride, seq, roles);
    positions = seq;
  }

  Positions positions;  // key c of the sequence is at position positions[c]
};

template <typename acc>
class ForwardTile {
 public:
  explicit ForwardTile(int64_t dim)
      : dim_(dim), q_(kRowTile * dim), o_(kRowTile * dim), m_(kRowTile), l_(kRowTile), lo_(kRowTile),
        hi_(kRowTile), positions_(kRowTile), mods_(kRowTile),
        s_(kMicroRows * (kBlockLimit + 2 * key_panel_width<acc>())) {}

  // Begins a tile of `rows` <= kRowTile query rows with an empty softmax state; `load` fills them.
  void start(int64_t rows) {
    rows_ = rows;
    modified_ = false;
    std::fill(o_.get(), o_.get() + rows * dim_, acc(0));
    std::fill(m_.get(), m_.get() + rows, neg_inf<acc>());
    std::fill(l_.get(), l_.get() + rows, acc(0));
  }

  // Rows [row0, row0 + count) of the tile: queries pos[0, count) of `head`, times `scale`, their
  // scores modified by `mods` (rows of several heads can share a tile when they read the same keys:
  // grouped KV heads).
  template <typename scalar_t>
  void load(int64_t row0, const scalar_t* head, int64_t stride_n, Positions pos, int64_t count, acc scale,
            const ScoreModifiers<acc>& mods = {}) {
    acc* q = q_.get() + row0 * dim_;
    load_rows(q, head, stride_n, pos, count, dim_);
    for (int64_t i = 0; i < count * dim_; ++i) q[i] *= scale;
    for (int64_t r = 0; r < count; ++r) {
      positions_.get()[row0 + r] = pos[r];
      mods_.get()[row0 + r] = mods;
    }
    modified_ = modified_ || mods.any();
  }

  // A tile of one head's queries pos[0, rows): start and load.
  template <typename scalar_t>
  void start(const scalar_t* head, int64_t stride_n, Positions pos, int64_t rows, acc scale,
             const ScoreModifiers<acc>& mods = {}) {
    start(rows);
    load(0, head, stride_n, pos, rows, scale, mods);
  }

  // Per-row key intervals of the next `attend`, block-relative; clamped there.
  int64_t* lo() { return lo_.get(); }
  int64_t* hi() { return hi_.get(); }

  // Attends the tile to the block of keys [c0, c0 + count) of the selected sequence; bias[count] is
  // 0 or -inf per key, or null for all 0.
  template <typename scalar_t>
  void attend(KeysAndValues<scalar_t>& kv, int64_t c0, int64_t count, const acc* bias) {
    constexpr int64_t W = KeyPanels<scalar_t>::W;
    const acc* v = kv.values.rows(c0, count);
    // Scores are indexed from the block's first panel boundary, `shift` keys before c0.
    const int64_t panel0 = c0 / W, shift = c0 - panel0 * W;
    const int64_t lds = (shift + count + W - 1) / W * W;
    for (int64_t r0 = 0; r0 < rows_; r0 += kMicroRows) {
      const int64_t group = std::min<int64_t>(kMicroRows, rows_ - r0);
      int64_t* lo = lo_.get() + r0;
      int64_t* hi = hi_.get() + r0;
      int64_t first = lds, last = 0;  // union of the group's intervals, in score indices
      for (int64_t r = 0; r < group; ++r) {
        lo[r] = std::clamp<int64_t>(lo[r], 0, count) + shift;
        hi[r] = std::clamp<int64_t>(hi[r] + shift, lo[r], count + shift);
        if (lo[r] < hi[r]) {
          first = std::min(first, lo[r]);
          last = std::max(last, hi[r]);
        }
      }
      if (first >= last) continue;  // no row of the group sees a key of this block
      acc* s = s_.get();
      acc* o = o_.get() + r0 * dim_;
      with_micro_rows(group, [&](auto rows) {
        constexpr int MR = decltype(rows)::value;
        for (int64_t p0 = first / W * W; p0 < last; p0 += W) {
          score_panel<MR>(q_.get() + r0 * dim_, dim_, kv.keys.panel(panel0 + p0 / W), dim_, s + p0, lds);
        }
        if (modified_) {  // on the keys each row sees; score index c is key c0 + c - shift
          for (int64_t r = 0; r < MR; ++r) {
            modify_scores(mods_.get()[r0 + r], s + r * lds + lo[r], hi[r] - lo[r], positions_.get()[r0 + r],
                          kv.positions.from(c0 + lo[r] - shift), static_cast<acc*>(nullptr));
          }
        }
        for (int64_t r = 0; r < MR; ++r) {
          update_row(r0 + r, s + r * lds, lo[r], hi[r], first, last, bias, shift);
        }
        pv_rows<MR>(s + shift, lds, first - shift, last - shift, v, dim_, o, dim_, dim_);
      });
    }
  }

  // Normalised output row r into `dst` (as acc) and its log-sum-exp, with `sink` one more logit
  // of a zero value in the denominator (-inf: none); rows with no key give 0 and -inf (the sink
  // without keys).
  acc finish_row(int64_t r, acc* dst, acc sink = neg_inf<acc>()) const {
    const acc* orow = o_.get() + r * dim_;
    acc l = l_.get()[r], m = m_.get()[r];
    if (l == acc(0)) {
      std::fill(dst, dst + dim_, acc(0));
      return sink;
    }
    acc rescale = acc(1);  // the sink enters at the larger of the two maxima, so no exp overflows
    if (sink != neg_inf<acc>()) {
      const acc top = std::max(m, sink);
      rescale = std::exp(m - top);
      l = l * rescale + std::exp(sink - top);
      m = top;
    }
    const acc inv = rescale / l;
    for (int64_t c = 0; c < dim_; ++c) dst[c] = orow[c] * inv;
    return m + std::log(l);
  }

 private:
  // Online-softmax update of tile row r from its scores s[a, b); leaves probabilities in s[a, b)
  // and zeros in the rest of the group's range [first, last), which p.v then reads. Score index
  // c is key c - shift of the block (whose bias is bias[c - shift]). Inlined into every micro-row
  // variant of every storage type's attend (GCC stops inlining it into some of them once float,
  // float16 and bfloat16 all share ForwardTile<float>).
  [[gnu::always_inline]] void update_row(int64_t r, acc* s, int64_t a, int64_t b, int64_t first, int64_t last,
                                         const acc* bias, int64_t shift) {
    if (a >= b) a = b = first;  // an empty interval: the whole range becomes 0 below
    if (bias) {
      for (int64_t c = a; c < b; ++c) s[c] += bias[c - shift];
    }
    acc& m = m_.get()[r];
    const acc new_m = std::max(m, row_max(s + a, b - a));
    if (new_m == neg_inf<acc>()) {  // no valid key for this row yet: contributes nothing
      std::fill(s + first, s + last, acc(0));
      return;
    }
    const acc alpha = std::exp(m - new_m);  // 0 when m was -inf
    l_.get()[r] = l_.get()[r] * alpha + exp_shifted(s + a, b - a, new_m);
    m = new_m;
    if (alpha != acc(1)) {
      acc* orow = o_.get() + r * dim_;
      for (int64_t c = 0; c < dim_; ++c) orow[c] *= alpha;
    }
    std::fill(s + first, s + a, acc(0));
    std::fill(s + b, s + last, acc(0));
  }

  int64_t dim_, rows_ = 0;
  bool modified_ = false;  // some row has score modifiers
  Scratch<acc> q_, o_, m_, l_;
  Scratch<int64_t> lo_, hi_;
  Scratch<int64_t> positions_;           // of each row's query
  Scratch<ScoreModifiers<acc>> mods_;    // of each row's head
  Scratch<acc> s_;
};

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
