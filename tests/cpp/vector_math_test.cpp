// The CPU kernels' own vector math (csrc/cpu/vector_math.h) against the C library and c10's scalar
// conversions: exp_lanes within 2 ulp of exp over the whole range it computes (float and double),
// its special values, and the bfloat16 / float16 roundings bit for bit. Compiled for the host's
// baseline (16-byte vectors) and, where the compiler can, for AVX2 and AVX-512 (tests/test_cpp.py).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>

#include "vector_math.h"

using namespace longformer::cpu;

static int failures = 0;

template <typename acc>
static void check_exp(acc lo, acc hi, int count, double max_ulp) {
  using S = SimdOf<acc>;
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<acc> dist(lo, hi);
  double worst = 0;
  for (int i = 0; i < count; i += S::size) {
    acc in[S::size], out[S::size];
    for (int l = 0; l < S::size; ++l) in[l] = dist(rng);
    S::store(out, exp_lanes<acc>(S::load(in)));
    for (int l = 0; l < S::size; ++l) {
      const long double want = std::exp(static_cast<long double>(in[l]));
      const long double ulp = std::nextafter(static_cast<acc>(want), std::numeric_limits<acc>::infinity()) -
                              static_cast<acc>(want);
      const double err = static_cast<double>(std::fabs(out[l] - want) / ulp);
      worst = err > worst ? err : worst;
    }
  }
  if (worst > max_ulp) {
    std::printf("FAIL exp<%s> on [%g, %g]: %.2f ulp\n", sizeof(acc) == 4 ? "float" : "double", double(lo),
                double(hi), worst);
    ++failures;
  }
}

template <typename acc>
static void check_exp_special() {
  using S = SimdOf<acc>;
  const acc inf = std::numeric_limits<acc>::infinity();
  acc in[S::size], out[S::size];
  for (int l = 0; l < S::size; ++l) in[l] = 0;
  in[0] = -inf;
  in[1 % S::size] = std::numeric_limits<acc>::quiet_NaN();
  S::store(out, exp_lanes<acc>(S::load(in)));
  if (out[0] != 0) ++failures, std::printf("FAIL exp(-inf) = %g\n", double(out[0]));
  if (S::size > 1 && !std::isnan(out[1])) ++failures, std::printf("FAIL exp(NaN) = %g\n", double(out[1]));
  if (S::size > 2 && out[2] != 1) ++failures, std::printf("FAIL exp(0) = %g\n", double(out[2]));
  for (int l = 0; l < S::size; ++l) in[l] = sizeof(acc) == 4 ? acc(89) : acc(710);
  S::store(out, exp_lanes<acc>(S::load(in)));
  if (out[0] != inf) ++failures, std::printf("FAIL exp(overflow) = %g\n", double(out[0]));
}

// Every float whose upper 16 bits are `high`, with a few low halves (ties included), rounded to
// bfloat16 by the vector path and by c10::BFloat16.
static void check_bfloat16() {
  const uint32_t lows[] = {0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff};
  for (uint32_t high = 0; high < 0x10000; high += 1) {
    for (uint32_t low : lows) {
      float in[FloatLanes::size];
      const uint32_t bits = (high << 16) | low;
      for (int l = 0; l < FloatLanes::size; ++l) std::memcpy(&in[l], &bits, 4);
      c10::BFloat16 out[FloatLanes::size];
      store_from_float(out, FloatLanes::load(in));
      const c10::BFloat16 want(in[0]);
      if (std::isnan(in[0]) ? !std::isnan(float(out[0])) : out[0].x != want.x) {
        std::printf("FAIL bfloat16(%08x) = %04x, c10 %04x\n", bits, out[0].x, want.x);
        if (++failures > 10) return;
      }
      const float back = FloatLanes::load(in)[0] == in[0] ? float(load_as_float(out)[0]) : 0.0f;
      if (!std::isnan(in[0]) && back != float(want)) {
        std::printf("FAIL widen bfloat16 %04x = %g, c10 %g\n", out[0].x, back, float(want));
        if (++failures > 10) return;
      }
    }
  }
}

#if defined(__F16C__)
static void check_half() {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {  // every float16, widened and narrowed back
    c10::Half in[FloatLanes::size];
    for (int l = 0; l < FloatLanes::size; ++l) in[l].x = static_cast<uint16_t>(bits);
    const float wide = load_as_float(in)[0];
    if (!std::isnan(float(in[0])) && wide != float(in[0])) {
      std::printf("FAIL widen half %04x = %g, c10 %g\n", bits, wide, float(in[0]));
      if (++failures > 10) return;
    }
  }
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-70000.0f, 70000.0f);
  for (int i = 0; i < 200000; ++i) {
    float in[FloatLanes::size];
    for (int l = 0; l < FloatLanes::size; ++l) in[l] = dist(rng) * (i % 2 ? 1e-4f : 1.0f);
    c10::Half out[FloatLanes::size];
    store_from_float(out, FloatLanes::load(in));
    for (int l = 0; l < FloatLanes::size; ++l) {
      if (out[l].x != c10::Half(in[l]).x) {
        std::printf("FAIL half(%g) = %04x, c10 %04x\n", in[l], out[l].x, c10::Half(in[l]).x);
        if (++failures > 10) return;
      }
    }
  }
}
#endif

int main() {
  check_exp<float>(-87.0f, 88.0f, 1 << 20, 2.0);
  check_exp<float>(-1.0f, 0.0f, 1 << 18, 2.0);
  check_exp<double>(-708.0, 709.0, 1 << 20, 2.0);
  check_exp<double>(-1.0, 0.0, 1 << 18, 2.0);
  check_exp_special<float>();
  check_exp_special<double>();
  check_bfloat16();
#if defined(__F16C__)
  check_half();
#endif
  if (failures) return 1;
  std::printf("ok (%d-byte vectors)\n", kVectorBytes);
  return 0;
}
