// dispatch.h: how an op entry reaches the implementation for the SIMD level in use.
//
// An op `foo` with params `FooParams` has one implementation per level, all with the same signature:
//   bts::reference::foo   native/reference/foo.cc  (plain loops, the oracle)
//   bts::cpu::scalar::foo native/cpu/foo.cc compiled with BTS_ISA_LEVEL=1
//   bts::cpu::avx2::foo   native/cpu/foo.cc compiled with BTS_ISA_LEVEL=2
//   bts::cpu::avx512::foo native/cpu/foo.cc compiled with BTS_ISA_LEVEL=3
// BTS_DECLARE_KERNEL declares all four; BTS_DISPATCH takes the compute lock and calls the right one.
#pragma once
#include "bts/cpu.h"
#include "bts/threadpool.h"

#define BTS_DECLARE_KERNEL(name, Params)      \
  namespace bts {                             \
  namespace reference {                       \
  void name(const Params& p);                 \
  }                                           \
  namespace cpu {                             \
  namespace scalar {                          \
  void name(const Params& p);                 \
  }                                           \
  namespace avx2 {                            \
  void name(const Params& p);                 \
  }                                           \
  namespace avx512 {                          \
  void name(const Params& p);                 \
  }                                           \
  }                                           \
  }

#define BTS_DISPATCH(name, p)                                   \
  do {                                                          \
    ::bts::ComputeLock bts_lock_;                               \
    switch (::bts::simd_level()) {                              \
      case ::bts::SimdLevel::Reference: ::bts::reference::name(p); break; \
      case ::bts::SimdLevel::Scalar: ::bts::cpu::scalar::name(p); break;  \
      case ::bts::SimdLevel::Avx2: ::bts::cpu::avx2::name(p); break;      \
      case ::bts::SimdLevel::Avx512: ::bts::cpu::avx512::name(p); break;  \
    }                                                           \
  } while (0)
