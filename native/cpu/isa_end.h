// isa_end.h: closes the region opened by isa_begin.h (see there).
#if BTS_ISA_LEVEL == 2 || BTS_ISA_LEVEL == 3
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
