// isa_begin.h / isa_end.h: bracket the ISA-specific part of a kernel file.
//
// Every file in native/cpu/ is compiled once per level with -DBTS_ISA_LEVEL=1|2|3 (scalar, avx2,
// avx512) and NO -m flags: the level's instructions are enabled between these two headers only, with
// `#pragma GCC target` (clang: `#pragma clang attribute`). Standard-library templates are instantiated
// from their headers, included before this one, with baseline flags, so the three copies of a file
// never hand the linker an AVX-512 version of a shared inline function (the classic ODR trap of
// per-file -m flags). Everything defined in between lives in namespace bts::cpu::BTS_ISA, which
// differs per level, so the three copies link side by side; native/core/dispatch.cc picks one at run
// time. Include the standard headers you need BEFORE this header.
//
// What the pragma does NOT cover: a template instantiated inside the region (std::vector<float>,
// std::fill, std::string for an exception message...) is compiled with the region's instructions
// under a symbol that every copy of the file shares, so the linker may keep the AVX-512 one. Kernel
// code therefore uses Buffer/fill/copy from simd.h (per-level symbols) and bts::throw_error;
// test/build.test.ts fails on any global symbol an ISA object defines outside its namespace.
#ifndef BTS_ISA_LEVEL
#error "compile native/cpu/*.cc with -DBTS_ISA_LEVEL=1 (scalar), 2 (avx2) or 3 (avx512)"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if BTS_ISA_LEVEL == 1
#define BTS_ISA scalar
#elif BTS_ISA_LEVEL == 2
#define BTS_ISA avx2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#endif
#elif BTS_ISA_LEVEL == 3
#define BTS_ISA avx512
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers build some intrinsics on _mm512_undefined_ps(), a false positive of
// -W(maybe-)uninitialized in every kernel using them.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2")
#endif
#else
#error "BTS_ISA_LEVEL must be 1, 2 or 3"
#endif

#include "simd.h"
