// Small dense GEMMs for the attention tiles, row-major, accumulation dtype only (float, double).
//
// The tiles go to the BLAS that torch ships (MKL's sgemm_/dgemm_ on x86-64 wheels), found at load
// time through weak symbols; where a torch build exports no such symbol, a plain loop is used.
// BLAS is told to stay single-threaded: the kernels already run one tile per thread, and a fixed
// per-tile code path is what keeps backward bit-identical for any thread count.
// Torch-free, so tests/cpp can compile it on its own and check the fallback.
#pragma once

#include <cstdint>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)

// Keeps BLAS on the calling thread for the guard's lifetime, then restores the thread's setting.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// c = alpha * op(a) * op(b) + beta * c, all row-major. op(a) is [m, k], op(b) is [k, n];
// trans_a means `a` is stored as [k, m] (likewise b as [n, k]).
template <typename T>
void gemm_fallback(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* crow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) crow[j] = beta == T(0) ? T(0) : beta * crow[j];
    for (int64_t l = 0; l < k; ++l) {
      const T x = alpha * (trans_a ? a[l * lda + i] : a[i * lda + l]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) crow[j] += x * b[j * ldb + l];
      } else {
        const T* brow = b + l * ldb;
        for (int64_t j = 0; j < n; ++j) crow[j] += x * brow[j];
      }
    }
  }
}

// Row-major C = A.B is column-major C^T = B^T.A^T: swap the operands and keep the flags.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ila = static_cast<int>(ldb), ilb = static_cast<int>(lda), ilc = static_cast<int>(ldc);
  if constexpr (sizeof(T) == sizeof(float)) {
    if (sgemm_ && k > 0) return sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ila, a, &ilb, &beta, c, &ilc);
  } else {
    if (dgemm_ && k > 0) return dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ila, a, &ilb, &beta, c, &ilc);
  }
  gemm_fallback(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
