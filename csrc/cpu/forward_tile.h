// The query tile of both fused forwards (band rows and global rows): its queries, pre-scaled,
// and its running online softmax (unnormalised output o, row maxima m, row sums l).
//
// `attend` takes one block of keys. Row r sees only the keys in [lo[r], hi[r]) of the block and,
// of those, the ones whose bias is not -inf. The block is walked kMicroRows query rows at a time:
// scores for the key panels those rows can see, softmax update, then p.v over the same key
// range, while the group's scores are still in L1. Keys outside a row's interval never enter
// max, exp or the p.v sum, so band edges cost no masking pass and skipped panels no arithmetic.
#pragma once

#include <algorithm>

#include "micro_kernels.h"
#include "tile_math.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)

template <typename acc>
class ForwardTile {
 public:
  explicit ForwardTile(int64_t dim)
      : dim_(dim), q_(kRowTile * dim), o_(kRowTile * dim), m_(kRowTile), l_(kRowTile), lo_(kRowTile),
        hi_(kRowTile), keys_(padded(kBlockLimit) * dim), values_(kBlockLimit * dim),
        s_(kMicroRows * padded(kBlockLimit)) {}

  // Begins a tile: queries pos[0, rows) of `head`, times `scale`; empty softmax state.
  template <typename scalar_t>
  void start(const scalar_t* head, int64_t stride_n, Positions pos, int64_t rows, acc scale) {
    rows_ = rows;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* src = head + pos[r] * stride_n;
      for (int64_t c = 0; c < dim_; ++c) q_.get()[r * dim_ + c] = scale * static_cast<acc>(src[c]);
    }
    std::fill(o_.get(), o_.get() + rows * dim_, acc(0));
    std::fill(m_.get(), m_.get() + rows, neg_inf<acc>());
    std::fill(l_.get(), l_.get() + rows, acc(0));
  }

  // Per-row key intervals of the next `attend`, block-relative; clamped there.
  int64_t* lo() { return lo_.get(); }
  int64_t* hi() { return hi_.get(); }

  // Attends the tile to keys pos[0, count) of (k_head, v_head); bias[count] is 0 or -inf per key,
  // or null for all 0.
  template <typename scalar_t>
  void attend(const scalar_t* k_head, int64_t k_stride, const scalar_t* v_head, int64_t v_stride, Positions pos,
              int64_t count, const acc* bias) {
    constexpr int64_t W = key_panel_width<acc>();
    pack_key_panels(keys_.get(), [&](int64_t c) { return k_head + pos[c] * k_stride; }, count, dim_);
    const Rows<acc> v = rows_of(values_.get(), v_head, v_stride, pos, count, dim_);
    const int64_t lds = padded(count);
    for (int64_t r0 = 0; r0 < rows_; r0 += kMicroRows) {
      const int64_t group = std::min<int64_t>(kMicroRows, rows_ - r0);
      int64_t* lo = lo_.get() + r0;
      int64_t* hi = hi_.get() + r0;
      int64_t first = count, last = 0;  // union of the group's intervals
      for (int64_t r = 0; r < group; ++r) {
        lo[r] = std::clamp<int64_t>(lo[r], 0, count);
        hi[r] = std::clamp<int64_t>(hi[r], lo[r], count);
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
          score_panel<MR>(q_.get() + r0 * dim_, dim_, keys_.get() + p0 * dim_, dim_, s + p0, lds);
        }
        for (int64_t r = 0; r < MR; ++r) update_row(r0 + r, s + r * lds, lo[r], hi[r], first, last, bias);
        pv_rows<MR>(s, lds, first, last, v.data, v.ld, o, dim_, dim_);
      });
    }
  }

  // Normalised output row r into `dst` (as acc) and its log-sum-exp; rows with no key give 0 / -inf.
  acc finish_row(int64_t r, acc* dst) const {
    const acc* orow = o_.get() + r * dim_;
    const acc l = l_.get()[r];
    if (l == acc(0)) {
      std::fill(dst, dst + dim_, acc(0));
      return neg_inf<acc>();
    }
    const acc inv = acc(1) / l;
    for (int64_t c = 0; c < dim_; ++c) dst[c] = orow[c] * inv;
    return m_.get()[r] + std::log(l);
  }

 private:
  static int64_t padded(int64_t keys) {
    constexpr int64_t W = key_panel_width<acc>();
    return (keys + W - 1) / W * W;
  }

  // Online-softmax update of tile row r from its scores s[a, b); leaves probabilities in s[a, b)
  // and zeros in the rest of the group's range [first, last), which p.v then reads.
  void update_row(int64_t r, acc* s, int64_t a, int64_t b, int64_t first, int64_t last, const acc* bias) {
    if (a >= b) a = b = first;  // an empty interval: the whole range becomes 0 below
    if (bias) {
      for (int64_t c = a; c < b; ++c) s[c] += bias[c];
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
  Scratch<acc> q_, o_, m_, l_;
  Scratch<int64_t> lo_, hi_;
  Scratch<acc> keys_, values_, s_;
};

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
