// cpu_features.cc: CPUID/XGETBV detection and the process-wide SIMD level (see bts/cpu.h).
//
// A level counts as supported only if the CPU reports the instructions AND the OS saves the
// registers (XCR0), so a VM without AVX-512 state support falls back to AVX2 cleanly.
#include "bts/common.h"
#include "bts/cpu.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define BTS_X86 1
#endif

namespace bts {
namespace {

#ifdef BTS_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef BTS_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  const bool avx = (c >> 28) & 1;
  f.fma = (c >> 12) & 1;
  f.f16c = (c >> 29) & 1;
  uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = avx && os_avx && ((b >> 5) & 1);
    f.avx512f = os_avx512 && ((b >> 16) & 1);
    f.avx512dq = os_avx512 && ((b >> 17) & 1);
    f.avx512bw = os_avx512 && ((b >> 30) & 1);
    f.avx512vl = os_avx512 && ((b >> 31) & 1);
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512bf16 = f.avx512f && ((a >> 5) & 1);
  }
  if (!os_avx) f.fma = f.f16c = false;
  char brand[49] = {0};
  if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000004) {
    for (unsigned i = 0; i < 3; i++) {
      __cpuid(0x80000002 + i, a, b, c, d);
      std::memcpy(brand + 16 * i, &a, 4);
      std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4);
      std::memcpy(brand + 16 * i + 12, &d, 4);
    }
  }
  f.brand = brand;
  while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
#endif
  return f;
}

std::atomic<int> g_level{-1};
std::once_flag g_level_once;

void init_level() {
  std::call_once(g_level_once, [] {
    SimdLevel lvl = best_simd_level();
    if (const char* env = std::getenv("BTS_SIMD")) {
      SimdLevel forced;
      // An unknown or unsupported name keeps the best level; bts info reports what is in use.
      if (parse_simd_level(env, &forced) && simd_level_supported(forced)) lvl = forced;
    }
    int expected = -1;
    g_level.compare_exchange_strong(expected, int(lvl));
  });
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

bool simd_level_supported(SimdLevel level) {
  const CpuFeatures& f = cpu_features();
  switch (level) {
    case SimdLevel::Reference:
    case SimdLevel::Scalar: return true;
    case SimdLevel::Avx2: return f.avx2 && f.fma && f.f16c;
    case SimdLevel::Avx512: return f.avx2 && f.fma && f.avx512f && f.avx512bw && f.avx512dq && f.avx512vl;
  }
  return false;
}

SimdLevel best_simd_level() {
  if (simd_level_supported(SimdLevel::Avx512)) return SimdLevel::Avx512;
  if (simd_level_supported(SimdLevel::Avx2)) return SimdLevel::Avx2;
  return SimdLevel::Scalar;
}

SimdLevel simd_level() {
  int v = g_level.load(std::memory_order_relaxed);
  if (v < 0) {
    init_level();
    v = g_level.load(std::memory_order_relaxed);
  }
  return SimdLevel(v);
}

void set_simd_level(SimdLevel level) {
  if (!simd_level_supported(level))
    throw Error("E_UNSUPPORTED_SIMD", std::string("SIMD level '") + simd_level_name(level) +
                                          "' is not supported by this CPU (best: " +
                                          simd_level_name(best_simd_level()) + ")");
  init_level();
  g_level.store(int(level), std::memory_order_relaxed);
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Reference: return "reference";
    case SimdLevel::Scalar: return "scalar";
    case SimdLevel::Avx2: return "avx2";
    case SimdLevel::Avx512: return "avx512";
  }
  return "unknown";
}

bool parse_simd_level(const std::string& name, SimdLevel* out) {
  static const SimdLevel all[] = {SimdLevel::Reference, SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512};
  for (SimdLevel l : all)
    if (name == simd_level_name(l)) {
      *out = l;
      return true;
    }
  return false;
}

}  // namespace bts
