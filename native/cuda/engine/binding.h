// cuda/engine/binding.h: what the CUDA addon's translation units share: native/cuda/binding.cc (probe,
// ops, device selection) calls register_llama() and register_stitched() from its Init, and the engine
// bindings (native/cuda/engine/binding.cc, stitched_binding.cc) ask addon_device() for the device the
// addon uses.
#pragma once
#include <napi.h>

namespace bts {
namespace cuda {

// The device index of the addon ($BTS_CUDA_DEVICE, default 0), selected on the calling thread
// (native/cuda/binding.cc; E_ARGUMENT for a bad BTS_CUDA_DEVICE, E_CUDA when no device can be set).
int addon_device();

// Adds llamaCreate to the addon's exports (the classes CudaLlama and CudaKvCache).
void register_llama(Napi::Env env, Napi::Object exports);

// Adds stitchedCreate to the addon's exports (the class CudaStitched; stitched_binding.cc).
void register_stitched(Napi::Env env, Napi::Object exports);

}  // namespace cuda
}  // namespace bts
