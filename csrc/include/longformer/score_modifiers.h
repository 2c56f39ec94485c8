// The general op's score modifiers and sinks (docs/design.md §2.2), for the CPU kernels and (compiled
// by nvcc, or by g++ for the host emulation) the CUDA kernels alike: one definition of the math.
#pragma once

#include <math.h>

#include "longformer/params.h"

namespace longformer {

LONGFORMER_HOST_DEVICE float tanh_of(float x) { return tanhf(x); }
LONGFORMER_HOST_DEVICE double tanh_of(double x) { return tanh(x); }

// The modifiers of one head, applied to a scaled score in this order: softcap > 0 makes it
// softcap * tanh(s / softcap); ALiBi subtracts slope * |query - key position|.
template <typename A>
struct ScoreModifiers {
  A softcap = 0;
  A slope = 0;
  bool alibi = false;

  ScoreModifiers() = default;
  LONGFORMER_HOST_DEVICE ScoreModifiers(const AttentionParams& p, int64_t h)
      : softcap(static_cast<A>(p.softcap)),
        slope(p.alibi_slopes ? static_cast<const A*>(p.alibi_slopes)[h] : A(0)),
        alibi(p.alibi_slopes != nullptr) {}

  LONGFORMER_HOST_DEVICE bool any() const { return softcap > A(0) || alibi; }

  // The score s of the query at position `query` and the key at `key`; where `dcap` is given it
  // receives the softcap's derivative d(capped)/d(s) = 1 - tanh^2 (the backward's chain rule; 1
  // without a softcap).
  LONGFORMER_HOST_DEVICE A apply(A s, int64_t query, int64_t key, A* dcap = nullptr) const {
    A derivative = A(1);
    if (softcap > A(0)) {
      const A t = tanh_of(s / softcap);
      s = softcap * t;
      derivative = A(1) - t * t;
    }
    if (dcap) *dcap = derivative;
    if (alibi) s -= slope * static_cast<A>(query > key ? query - key : key - query);
    return s;
  }
};

// The sink logit of head h: one more logit with a zero value in each row's softmax; -inf without
// sinks.
template <typename A>
LONGFORMER_HOST_DEVICE A sink_logit(const AttentionParams& p, int64_t h) {
  return p.sinks ? static_cast<const A*>(p.sinks)[h] : -static_cast<A>(INFINITY);
}

}  // namespace longformer
