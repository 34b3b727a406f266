// addon.cc: the Node-API binding. Thin by design: it turns JS values into bts::OpCall (typed arrays
// become {pointer, length, dtype}), runs the op synchronously or on a libuv worker (AsyncWorker ->
// Promise), and turns bts::Error into a JS Error carrying `code`. All validation of shapes happens in
// the op's registry entry (native/ops/), all scheduling in the compute pool (native/core/threadpool.cc).
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

namespace {

Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

bool dtype_of(const Napi::TypedArray& a, bts::DType* out) {
  switch (a.TypedArrayType()) {
    case napi_float32_array: *out = bts::DType::F32; return true;
    case napi_uint16_array: *out = bts::DType::BF16; return true;
    case napi_int32_array: *out = bts::DType::I32; return true;
    case napi_float64_array: *out = bts::DType::F64; return true;
    case napi_bigint64_array: *out = bts::DType::I64; return true;
    default: return false;
  }
}

// Parses (name, tensors, scalars). Keeps references to the typed arrays in `pins` when given.
bts::OpCall parse_call(const Napi::CallbackInfo& info, std::string* name, std::vector<Napi::ObjectReference>* pins) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsArray() || !info[2].IsArray())
    throw make_error(env, "E_ARGUMENT", "callOp(name: string, tensors: TypedArray[], scalars: number[])");
  *name = info[0].As<Napi::String>().Utf8Value();
  const bts::OpDef* def = bts::find_op(*name);
  if (!def) throw make_error(env, "E_UNKNOWN_OP", "unknown op '" + *name + "'");
  bts::OpCall call;
  Napi::Array ts = info[1].As<Napi::Array>();
  for (uint32_t i = 0; i < ts.Length(); i++) {
    Napi::Value v = ts.Get(i);
    bts::TensorRef t;
    std::string argname = i < def->tensors.size() ? def->tensors[i].name : std::to_string(i);
    if (v.IsNull() || v.IsUndefined()) {
      call.tensors.push_back(t);
      continue;
    }
    if (!v.IsTypedArray())
      throw make_error(env, "E_DTYPE", *name + ": argument '" + argname + "' must be a typed array");
    Napi::TypedArray a = v.As<Napi::TypedArray>();
    if (!dtype_of(a, &t.dtype))
      throw make_error(env, "E_DTYPE", *name + ": argument '" + argname +
                                           "' must be a Float32Array, Uint16Array (bf16), Int32Array, Float64Array or BigInt64Array");
    t.length = int64_t(a.ElementLength());
    t.data = static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset();
    if (t.length == 0) {
      // An empty view may have a null data pointer; give it a valid non-null address (never read).
      static float dummy = 0;
      t.data = &dummy;
    }
    if (pins) pins->push_back(Napi::Persistent(a.As<Napi::Object>()));
    call.tensors.push_back(t);
  }
  Napi::Array ss = info[2].As<Napi::Array>();
  for (uint32_t i = 0; i < ss.Length(); i++) {
    Napi::Value v = ss.Get(i);
    if (v.IsBoolean()) call.scalars.push_back(v.As<Napi::Boolean>().Value() ? 1.0 : 0.0);
    else if (v.IsNumber()) call.scalars.push_back(v.As<Napi::Number>().DoubleValue());
    else {
      std::string sname = i < def->scalars.size() ? def->scalars[i] : std::to_string(i);
      throw make_error(env, "E_ARGUMENT", *name + ": scalar '" + sname + "' must be a number");
    }
  }
  return call;
}

Napi::Value CallOp(const Napi::CallbackInfo& info) {
  std::string name;
  bts::OpCall call = parse_call(info, &name, nullptr);
  try {
    bts::call_op(name, call);
  } catch (const bts::Error& e) {
    throw make_error(info.Env(), e.code, e.what());
  } catch (const std::bad_alloc&) {
    throw make_error(info.Env(), "E_OUT_OF_MEMORY", name + ": out of memory");
  } catch (const std::exception& e) {
    throw make_error(info.Env(), "E_INTERNAL", name + ": " + e.what());
  }
  return info.Env().Undefined();
}

class OpWorker : public Napi::AsyncWorker {
 public:
  OpWorker(Napi::Env env, std::string name, bts::OpCall call, std::vector<Napi::ObjectReference> pins)
      : Napi::AsyncWorker(env, "bts-op"), deferred_(Napi::Promise::Deferred::New(env)), name_(std::move(name)),
        call_(std::move(call)), pins_(std::move(pins)) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      bts::call_op(name_, call_);
    } catch (const bts::Error& e) {
      code_ = e.code;
      SetError(e.what());
    } catch (const std::bad_alloc&) {
      code_ = "E_OUT_OF_MEMORY";
      SetError(name_ + ": out of memory");
    } catch (const std::exception& e) {
      code_ = "E_INTERNAL";
      SetError(name_ + ": " + e.what());
    }
  }
  void OnOK() override {
    pins_.clear();
    deferred_.Resolve(Env().Undefined());
  }
  void OnError(const Napi::Error& e) override {
    pins_.clear();
    deferred_.Reject(make_error(Env(), code_, e.Message()).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string name_;
  bts::OpCall call_;
  std::vector<Napi::ObjectReference> pins_;
  std::string code_ = "E_INTERNAL";
};

Napi::Value CallOpAsync(const Napi::CallbackInfo& info) {
  std::string name;
  std::vector<Napi::ObjectReference> pins;
  bts::OpCall call = parse_call(info, &name, &pins);
  auto* w = new OpWorker(info.Env(), name, std::move(call), std::move(pins));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value ListOps(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto& ops = bts::op_registry();
  Napi::Array out = Napi::Array::New(env, ops.size());
  for (size_t i = 0; i < ops.size(); i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", ops[i].name);
    Napi::Array ts = Napi::Array::New(env, ops[i].tensors.size());
    for (size_t j = 0; j < ops[i].tensors.size(); j++) {
      Napi::Object t = Napi::Object::New(env);
      t.Set("name", ops[i].tensors[j].name);
      t.Set("dtype", bts::dtype_name(ops[i].tensors[j].dtype));
      t.Set("optional", ops[i].tensors[j].optional);
      t.Set("output", ops[i].tensors[j].output);
      ts.Set(uint32_t(j), t);
    }
    o.Set("tensors", ts);
    Napi::Array ss = Napi::Array::New(env, ops[i].scalars.size());
    for (size_t j = 0; j < ops[i].scalars.size(); j++) ss.Set(uint32_t(j), ops[i].scalars[j]);
    o.Set("scalars", ss);
    out.Set(uint32_t(i), o);
  }
  return out;
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
  return exports;
}

}  // namespace

NODE_API_MODULE(bts, Init)
