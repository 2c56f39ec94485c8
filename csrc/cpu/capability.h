// Which of the instruction-set builds of the CPU kernels (CMakeLists.txt) this CPU can run: the
// widest that cpuid reports (with the operating system's support for its registers), lowered by
// ATEN_CPU_CAPABILITY=default/avx2 as ATen's own kernels are, so one variable picks both.
#pragma once

#include <cstdlib>
#include <cstring>

namespace longformer::cpu {

enum class Capability { kDefault, kAVX2, kAVX512 };

inline Capability probe_capability() {
  Capability widest = Capability::kDefault;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  widest = avx512 ? Capability::kAVX512 : avx2 ? Capability::kAVX2 : Capability::kDefault;
#endif
  const char* requested = std::getenv("ATEN_CPU_CAPABILITY");
  if (requested == nullptr) return widest;
  Capability cap = widest;
  if (std::strcmp(requested, "default") == 0) cap = Capability::kDefault;
  if (std::strcmp(requested, "avx2") == 0) cap = Capability::kAVX2;
  return cap < widest ? cap : widest;
}

// Probed once per process, like ATen's.
inline Capability cpu_capability() {
  static const Capability cap = probe_capability();
  return cap;
}

}  // namespace longformer::cpu
