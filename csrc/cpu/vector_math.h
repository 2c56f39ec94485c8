// The CPU kernels' vector type and the element-wise math on it: exp, and the conversions between
// the half-precision storage types and float. Written on GCC/Clang vector extensions, not at::vec:
// at::vec is neither header-only nor part of LibTorch's stable ABI (and GCC keeps arrays of
// at::vec objects in memory inside loops, where plain vector types stay in registers). The width
// follows the instruction set this copy is compiled for (see CMakeLists.txt): 16 bytes (SSE2), 32
// (AVX2) or 64 (AVX-512); the compiler picks the instructions (vcvtph2ps with F16C, FMA with
// -ffp-contract=fast).
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace longformer::cpu {
inline namespace CPU_CAPABILITY {  // compiled once per instruction set (see CMakeLists.txt)

#if defined(LONGFORMER_CPU_VECTOR_BYTES)  // a test build: e.g. AVX-512's layout on an AVX2 machine
constexpr int kVectorBytes = LONGFORMER_CPU_VECTOR_BYTES;
#elif defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorBytes = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif

// One vector of T, with unaligned loads and stores.
template <typename T>
struct SimdOf {
  typedef T vec __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t size = kVectorBytes / sizeof(T);
  static vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
};

// The unsigned integer vector with one lane per lane of a float (32 bits) or double (64 bits) vector.
template <typename acc> struct LanesOf;
template <> struct LanesOf<float> {
  using lane = uint32_t;
  typedef lane unsigned_vec __attribute__((vector_size(kVectorBytes)));
};
template <> struct LanesOf<double> {
  using lane = uint64_t;
  typedef lane unsigned_vec __attribute__((vector_size(kVectorBytes)));
};

// The constants of exp for one dtype: the range where 2^n is a normal number, 1.5 * 2^m
// (m = mantissa bits: adding and subtracting it rounds to the nearest integer), ln 2 split into a
// part with trailing zero bits (n * kLn2High is exact) and the rest, and the Taylor degree that
// makes the truncation error fall below half an ulp on |r| <= ln(2) / 2.
template <typename acc> struct ExpConstants;
template <> struct ExpConstants<float> {
  static constexpr float kLowest = -87.3f, kHighest = 88.3f, kRound = 12582912.0f;
  static constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
  static constexpr int kDegree = 7, kExponentBias = 127, kMantissaBits = 23;
};
template <> struct ExpConstants<double> {
  static constexpr double kLowest = -708.3, kHighest = 709.0, kRound = 6755399441055744.0;
  static constexpr double kLn2High = 0.693145751953125, kLn2Low = 1.42860682030941723212e-6;
  static constexpr int kDegree = 13, kExponentBias = 1023, kMantissaBits = 52;
};

// exp of every lane: x = n ln 2 + r with n an integer and |r| <= ln(2) / 2, exp(r) by its Taylor
// polynomial (Horner), times 2^n built in the exponent bits. Within 2 ulp of exp on [kLowest,
// kHighest]; 0 below it (-inf included), inf above it, NaN stays NaN. The softmax's arguments
// (scores minus their running maximum or lse) are <= 0.
template <typename acc>
constexpr acc inverse_factorial(int k) {
  acc f = 1;
  for (int i = 2; i <= k; ++i) f /= i;
  return f;
}

template <typename acc>
typename SimdOf<acc>::vec exp_lanes(typename SimdOf<acc>::vec x) {
  using V = typename SimdOf<acc>::vec;
  using U = typename LanesOf<acc>::unsigned_vec;
  using C = ExpConstants<acc>;
  const V round = V{} + C::kRound;
  // No clamping first: outside [kLowest, kHighest] (infinities included) the lanes below compute
  // garbage that the two selects at the end replace, and a NaN stays NaN through the arithmetic.
  const V shifted = x * acc(1.4426950408889634) + round;  // 1.5 * 2^m + n: n in the low mantissa bits
  const V n = shifted - round;
  const V r = (x - n * C::kLn2High) - n * C::kLn2Low;
  V poly = V{} + inverse_factorial<acc>(C::kDegree);
#pragma GCC unroll 16
  for (int k = C::kDegree - 1; k >= 0; --k) poly = poly * r + inverse_factorial<acc>(k);
  // 2^n from n's bits (unsigned lanes: out of range they wrap, and are replaced below).
  const U exponent = (std::bit_cast<U>(shifted) - std::bit_cast<U>(round) +
                      typename LanesOf<acc>::lane{C::kExponentBias}) << C::kMantissaBits;
  V result = poly * std::bit_cast<V>(exponent);
  result = x < C::kLowest ? V{} : result;
  return x > C::kHighest ? V{} + std::numeric_limits<acc>::infinity() : result;
}

// float16 / bfloat16 <-> float, one vector of float lanes at a time. float16 converts through
// _Float16 (exact widening; narrowing rounds to nearest even, as c10::Half does), only where the
// instruction set has the conversions (F16C, AVX-512): elsewhere GCC would call libgcc once per
// element, slower than c10::Half's own conversion and tied to a libgcc as new as the compiler.
// bfloat16 is the upper half of a float's bits (narrowing rounds to nearest even, NaN becomes the
// quiet NaN, as c10::BFloat16 does).
template <typename scalar_t>
constexpr bool kVectorConversion = std::is_same_v<scalar_t, c10::BFloat16>
#if defined(__F16C__)
                                   || std::is_same_v<scalar_t, c10::Half>
#endif
    ;

using FloatLanes = SimdOf<float>;
typedef _Float16 HalfLanes __attribute__((vector_size(kVectorBytes / 2)));
typedef uint16_t Bits16Lanes __attribute__((vector_size(kVectorBytes / 2)));
typedef uint32_t Bits32Lanes __attribute__((vector_size(kVectorBytes)));

#if defined(__F16C__)
inline FloatLanes::vec load_as_float(const c10::Half* src) {
  HalfLanes h;
  std::memcpy(&h, src, sizeof(h));
  return __builtin_convertvector(h, FloatLanes::vec);
}

inline void store_from_float(c10::Half* dst, FloatLanes::vec x) {
  const HalfLanes h = __builtin_convertvector(x, HalfLanes);
  std::memcpy(dst, &h, sizeof(h));
}
#endif

inline FloatLanes::vec load_as_float(const c10::BFloat16* src) {
  Bits16Lanes b;
  std::memcpy(&b, src, sizeof(b));
  const Bits32Lanes bits = __builtin_convertvector(b, Bits32Lanes) << 16;
  return std::bit_cast<FloatLanes::vec>(bits);
}

inline void store_from_float(c10::BFloat16* dst, FloatLanes::vec x) {
  const Bits32Lanes bits = std::bit_cast<Bits32Lanes>(x);
  const Bits32Lanes rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const Bits32Lanes quiet_nan = Bits32Lanes{} + 0x7fc0u;
  const Bits16Lanes b = __builtin_convertvector(x != x ? quiet_nan : rounded, Bits16Lanes);
  std::memcpy(dst, &b, sizeof(b));
}

}  // namespace CPU_CAPABILITY
}  // namespace longformer::cpu
