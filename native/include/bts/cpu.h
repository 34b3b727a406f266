// cpu.h: run-time CPU feature detection and the SIMD level in use.
//
// Shipped binaries are built for baseline x86-64; each kernel file in native/cpu/ is compiled once per
// ISA level (see native/cpu/isa.h) and the level is chosen here at run time from CPUID, unless the
// environment variable BTS_SIMD (reference | scalar | avx2 | avx512) or set_simd_level() forces one.
// Forcing a level the CPU lacks is an error, never a SIGILL.
#pragma once
#include <string>

namespace bts {

enum class SimdLevel : int {
  Reference = 0,  // plain loops of native/reference/: the oracle, single-threaded where it is simplest
  Scalar = 1,     // the fast kernels compiled for baseline x86-64 (SSE2), threaded
  Avx2 = 2,       // AVX2 + FMA + F16C
  Avx512 = 3,     // AVX-512 F/BW/DQ/VL (+ BF16 dot products where the CPU has AVX512_BF16)
};

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512dq = false, avx512vl = false, avx512bf16 = false;
  std::string brand;
};

const CpuFeatures& cpu_features();
SimdLevel best_simd_level();                   // highest level this CPU supports
bool simd_level_supported(SimdLevel level);
SimdLevel simd_level();                        // level in use
void set_simd_level(SimdLevel level);          // throws bts::Error("E_UNSUPPORTED_SIMD") if unsupported
const char* simd_level_name(SimdLevel level);  // "reference" | "scalar" | "avx2" | "avx512"
bool parse_simd_level(const std::string& name, SimdLevel* out);

}  // namespace bts
