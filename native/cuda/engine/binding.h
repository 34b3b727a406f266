// cuda/engine/binding.h: what the CUDA addon's translation units share: native/cuda/binding.cc (probe,
// ops, device selection) calls register_llama() and register_stitched() from its Init, and the engine
// bindings (native/cuda/engine/binding.cc, stitched_binding.cc) ask addon_device() for the device the
// addon uses.
#pragma once
#include <napi.h>

#include <string>

namespace bts {
namespace cuda {
namespace engine {
struct AdamWHyper;  // llama_cuda.h
}

// The device index of the addon ($BTS_CUDA_DEVICE, default 0), selected on the calling thread
// (native/cuda/binding.cc; E_ARGUMENT for a bad BTS_CUDA_DEVICE, E_CUDA when no device can be set).
int addon_device();

// The argument { lr, beta1, beta2, eps, weightDecay, maxGradNorm, step } of an engine's adamwStep
// (`m`: the method's name for messages), read into *out; E_ARGUMENT naming the field (binding.cc).
// The ranges are the op's (cuda::adamw_step checks them again before launching).
void parse_adamw_hyper(Napi::Env env, const Napi::Value& v, const std::string& m, engine::AdamWHyper* out);

// Adds llamaCreate to the addon's exports (the classes CudaLlama and CudaKvCache).
void register_llama(Napi::Env env, Napi::Object exports);

// Adds stitchedCreate to the addon's exports (the class CudaStitched; stitched_binding.cc).
void register_stitched(Napi::Env env, Napi::Object exports);

}  // namespace cuda
}  // namespace bts
