// The loop GEMM used where torch exports no BLAS symbol. This file is linked without any BLAS,
// so gemm() must take the fallback; it is checked against a direct triple loop for every
// transpose combination, with leading dimensions larger than the matrices.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "gemm.h"

template <typename T>
static int check(bool ta, bool tb) {
  const int64_t m = 5, n = 7, k = 3, lda = 9, ldb = 11, ldc = 8;
  std::vector<T> a(16 * lda), b(16 * ldb), c(16 * ldc), want(16 * ldc);
  for (size_t i = 0; i < a.size(); ++i) a[i] = T((i * 7) % 13) - T(6);
  for (size_t i = 0; i < b.size(); ++i) b[i] = T((i * 5) % 11) - T(5);
  for (size_t i = 0; i < c.size(); ++i) c[i] = want[i] = T(i % 3);
  const T alpha = T(0.5), beta = T(2);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T sum = 0;
      for (int64_t l = 0; l < k; ++l) sum += (ta ? a[l * lda + i] : a[i * lda + l]) * (tb ? b[j * ldb + l] : b[l * ldb + j]);
      want[i * ldc + j] = alpha * sum + beta * want[i * ldc + j];
    }
  }
  if (sgemm_ || dgemm_) {
    std::printf("FAIL: a BLAS got linked, the fallback is not what runs\n");
    return 1;
  }
  longformer::cpu::gemm(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
  for (size_t i = 0; i < c.size(); ++i) {
    if (std::abs(c[i] - want[i]) > T(1e-5)) {
      std::printf("FAIL ta=%d tb=%d at %zu: %f vs %f\n", ta, tb, i, double(c[i]), double(want[i]));
      return 1;
    }
  }
  return 0;
}

int main() {
  int failures = 0;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) failures += check<float>(ta, tb) + check<double>(ta, tb);
  }
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
