// cuda_check.h: BTS_CUDA_CHECK, the check around every CUDA runtime call of the backend (kernels'
// launchers and entries through common.cuh, the Node binding native/cuda/binding.cc). A failed call
// throws bts::Error("E_CUDA", "file:line: call: message").
//
// The macro only names cudaError_t, cudaSuccess and cudaGetErrorString at its point of use, so this
// header needs neither the CUDA runtime nor the SIMT emulator (native/emu/emu.h): whichever the
// including file uses provides them.
#pragma once
#include <string>

#include "bts/common.h"

#define BTS_CUDA_CHECK(call)                                                                           \
  do {                                                                                                 \
    const cudaError_t bts_err_ = (call);                                                               \
    if (bts_err_ != cudaSuccess)                                                                       \
      throw ::bts::Error("E_CUDA", std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " #call ": " + \
                                       cudaGetErrorString(bts_err_));                                  \
  } while (0)
