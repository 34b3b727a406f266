// addon.cc: the Node-API binding. Thin by design: it turns JS values into bts::OpCall (typed arrays
// become {pointer, length, dtype}), runs the op synchronously or on a libuv worker (AsyncWorker ->
// Promise), and turns bts::Error into a JS Error carrying `code` (that glue is op_call.h, shared with
// the CUDA addon native/cuda/binding.cc). All validation of shapes happens in the op's registry entry
// (native/ops/), all scheduling in the compute pool (native/core/threadpool.cc).
//
// Exports:
//   callOp(name, tensors, scalars)        -> undefined      (sync; tensors: (TypedArray|null)[])
//   callOpAsync(name, tensors, scalars)   -> Promise<void>  (the typed arrays are pinned until done)
//   listOps()   -> [{name, tensors: [{name, dtype, optional, output}], scalars: [name]}]
//   info()      -> {simd, bestSimd, simdLevels, cpu: {...}, threads, build: {...}}
//   setSimd(name), setThreads(n)
#include <napi.h>

#include <memory>
#include <string>
#include <vector>

#include "bts/common.h"
#include "bts/cpu.h"
#include "bts/registry.h"
#include "bts/threadpool.h"
#include "op_call.h"

#ifndef BTS_ONLY_OPS_BUILD
namespace bts { void register_engine(Napi::Env env, Napi::Object exports); }  // native/binding/engine.cc
namespace bts { void register_stitched(Napi::Env env, Napi::Object exports); }  // native/binding/stitched.cc
#endif

namespace {

using bts::napi::make_error;

void run_cpu(const std::string& name, bts::OpCall& call) { bts::call_op(name, call); }

Napi::Value CallOp(const Napi::CallbackInfo& info) { return bts::napi::call_sync(info, run_cpu); }

Napi::Value CallOpAsync(const Napi::CallbackInfo& info) { return bts::napi::call_async(info, run_cpu); }

Napi::Value ListOps(const Napi::CallbackInfo& info) {
  return bts::napi::list_ops(info.Env(), [](const char*) { return true; });
}

Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const bts::CpuFeatures& f = bts::cpu_features();
  Napi::Object o = Napi::Object::New(env);
  o.Set("simd", bts::simd_level_name(bts::simd_level()));
  o.Set("bestSimd", bts::simd_level_name(bts::best_simd_level()));
  Napi::Array levels = Napi::Array::New(env);
  uint32_t k = 0;
  for (auto l : {bts::SimdLevel::Reference, bts::SimdLevel::Scalar, bts::SimdLevel::Avx2, bts::SimdLevel::Avx512})
    if (bts::simd_level_supported(l)) levels.Set(k++, bts::simd_level_name(l));
  o.Set("simdLevels", levels);
  Napi::Object cpu = Napi::Object::New(env);
  cpu.Set("brand", f.brand);
  cpu.Set("avx2", f.avx2);
  cpu.Set("fma", f.fma);
  cpu.Set("f16c", f.f16c);
  cpu.Set("avx512f", f.avx512f);
  cpu.Set("avx512bw", f.avx512bw);
  cpu.Set("avx512dq", f.avx512dq);
  cpu.Set("avx512vl", f.avx512vl);
  cpu.Set("avx512bf16", f.avx512bf16);
  o.Set("cpu", cpu);
  o.Set("threads", bts::num_threads());
  Napi::Object build = Napi::Object::New(env);
#if defined(__clang__)
  build.Set("compiler", std::string("clang ") + __clang_version__);
#elif defined(__GNUC__)
  build.Set("compiler", std::string("gcc ") + __VERSION__);
#else
  build.Set("compiler", "unknown");
#endif
  build.Set("napiVersion", NAPI_VERSION);
  build.Set("compiledLevels", "scalar,avx2,avx512");
  build.Set("cuda", false);
  build.Set("date", __DATE__);
  o.Set("build", build);
  return o;
}

Napi::Value SetSimd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw make_error(env, "E_ARGUMENT", "setSimd(name: string)");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  bts::SimdLevel l;
  if (!bts::parse_simd_level(name, &l))
    throw make_error(env, "E_ARGUMENT", "unknown SIMD level '" + name + "' (reference | scalar | avx2 | avx512)");
  try {
    bts::ComputeLock lock;
    bts::set_simd_level(l);
  } catch (const bts::Error& e) {
    throw make_error(env, e.code, e.what());
  }
  return env.Undefined();
}

Napi::Value SetThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw make_error(env, "E_ARGUMENT", "setThreads(n: number)");
  double n = info[0].As<Napi::Number>().DoubleValue();
  if (!(n >= 1 && n <= 256) || n != double(int(n)))
    throw make_error(env, "E_ARGUMENT", "threads must be an integer in 1..256, got " + std::to_string(n));
  bts::set_num_threads(int(n));
  return env.Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("callOp", Napi::Function::New(env, CallOp));
  exports.Set("callOpAsync", Napi::Function::New(env, CallOpAsync));
  exports.Set("listOps", Napi::Function::New(env, ListOps));
  exports.Set("info", Napi::Function::New(env, Info));
  exports.Set("setSimd", Napi::Function::New(env, SetSimd));
  exports.Set("setThreads", Napi::Function::New(env, SetThreads));
#ifndef BTS_ONLY_OPS_BUILD
  bts::register_engine(env, exports);  // llamaCreate, mapFile
  bts::register_stitched(env, exports);  // stitchedCreate
#endif
  return exports;
}

}  // namespace

NODE_API_MODULE(bts, Init)
