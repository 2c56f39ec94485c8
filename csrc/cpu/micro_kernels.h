// Register-blocked micro-kernels for the forward's two products, q.k^T (scores) and p.v.
//
// Why not BLAS here: a forward tile multiplies a 64-row query tile by ~600 keys, too small for
// MKL to amortise packing its operands on every call (a quarter of the forward's time went to
// that), and BLAS computes the whole rectangle although a band tile needs only its diagonal
// strip. These kernels work on MR query rows at a time, pack the keys once per block in the
// layout the score kernel streams, and visit only the key panels a group of rows can see.
//
// Written on the vector type of vector_math.h (SimdOf), whose width follows the instruction set
// this copy is compiled for. `c += a * b` becomes one FMA because the kernels are compiled with
// -ffp-contract=fast. MR rows x 2 vectors of accumulators,
// two operand vectors and a broadcast fit the 16 vector registers of SSE2 and AVX2.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "vector_math.h"

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)

constexpr int kMicroRows = 6;  // MR: query rows per micro-kernel call

// Keys per packed panel: two vectors' worth.
template <typename acc>
constexpr int64_t key_panel_width() {
  return 2 * SimdOf<acc>::size;
}

// Calls f(std::integral_constant<int, rows>) for rows in [1, kMicroRows], so the kernels below
// can be unrolled for a fixed row count.
template <typename F>
void with_micro_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, kMicroRows>{});
  }
}

// s[r][0, W) = q[r] . panel keys, for MR rows of q (row stride ldq) and one packed key panel.
template <int MR, typename acc>
inline void score_panel(const acc* q, int64_t ldq, const acc* panel, int64_t dim, acc* s, int64_t lds) {
  using S = SimdOf<acc>;
  constexpr int64_t V = S::size;
  typename S::vec c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = typename S::vec{};
  for (int64_t d = 0; d < dim; ++d) {
    const auto b0 = S::load(panel + d * 2 * V), b1 = S::load(panel + d * 2 * V + V);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const acc a = q[r * ldq + d];
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    S::store(s + r * lds, c0[r]);
    S::store(s + r * lds + V, c1[r]);
  }
}

// o[r][0, NV * V) += sum over k in [k0, k1) of p[r][k] * v[k][0, NV * V), for MR rows.
template <int MR, int NV, typename acc>
inline void pv_panel(const acc* p, int64_t ldp, int64_t k0, int64_t k1, const acc* v, int64_t ldv, acc* o,
                     int64_t ldo) {
  using S = SimdOf<acc>;
  constexpr int64_t V = S::size;
  typename S::vec c[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[r][j] = S::load(o + r * ldo + j * V);
  }
  for (int64_t k = k0; k < k1; ++k) {
    typename S::vec b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = S::load(v + k * ldv + j * V);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const acc a = p[r * ldp + k];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[r][j] += a * b[j];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) S::store(o + r * ldo + j * V, c[r][j]);
  }
}

// o[MR][dim] += p[MR][k0, k1) . v[k0, k1)[dim]: two-vector column panels, then one-vector ones,
// then the last dim % V columns one by one.
template <int MR, typename acc>
void pv_rows(const acc* p, int64_t ldp, int64_t k0, int64_t k1, const acc* v, int64_t ldv, acc* o, int64_t ldo,
             int64_t dim) {
  constexpr int64_t V = SimdOf<acc>::size;
  int64_t c = 0;
  for (; c + 2 * V <= dim; c += 2 * V) pv_panel<MR, 2>(p, ldp, k0, k1, v + c, ldv, o + c, ldo);
  for (; c + V <= dim; c += V) pv_panel<MR, 1>(p, ldp, k0, k1, v + c, ldv, o + c, ldo);
  for (; c < dim; ++c) {
    for (int r = 0; r < MR; ++r) {
      acc sum = 0;
      for (int64_t k = k0; k < k1; ++k) sum += p[r * ldp + k] * v[k * ldv + c];
      o[r * ldo + c] += sum;
    }
  }
}

// Largest of row[0, n); -inf for n = 0. A plain compare-and-select (one instruction per vector,
// two chains): a NaN score may be skipped here, but it still reaches the output through exp.
template <typename acc>
acc row_max(const acc* row, int64_t n) {
  using S = SimdOf<acc>;
  constexpr int64_t V = S::size;
  const acc lowest = -std::numeric_limits<acc>::infinity();
  typename S::vec m0 = typename S::vec{} + lowest, m1 = m0;
  int64_t c = 0;
  for (; c + 2 * V <= n; c += 2 * V) {
    const auto x0 = S::load(row + c), x1 = S::load(row + c + V);
    m0 = x0 > m0 ? x0 : m0;
    m1 = x1 > m1 ? x1 : m1;
  }
  m0 = m1 > m0 ? m1 : m0;
  acc m = lowest;
  for (int64_t l = 0; l < V; ++l) m = m0[l] > m ? m0[l] : m;
  for (; c < n; ++c) m = row[c] > m ? row[c] : m;
  return m;
}

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
