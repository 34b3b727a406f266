// op_call.h: the Node-API half of calling a registry op by name, shared by the two addons that do it:
// the portable CPU addon (native/binding/addon.cc, bts.node) and the CUDA addon (native/cuda/binding.cc,
// bts_cuda.node). It turns (name, tensors, scalars) into a bts::OpCall (typed arrays become {pointer,
// length, dtype}; nothing about shapes is checked here), runs a backend's call function synchronously
// or on a libuv worker (AsyncWorker -> Promise, the typed arrays pinned until it settles), maps
// bts::Error to a JS Error carrying `code`, and lists the registry's op specs.
//
// Header-only (inline) so that each addon compiles its own copy with its own Node-API settings; it is
// not a .cc because CMake and binding.gyp compile every native/binding/*.cc into the CPU addon.
#pragma once
#include <napi.h>

#include <new>
#include <string>
#include <utility>
#include <vector>

#include "bts/common.h"
#include "bts/registry.h"

namespace bts {
namespace napi {

inline Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

inline bool dtype_of(const Napi::TypedArray& a, DType* out) {
  switch (a.TypedArrayType()) {
    case napi_float32_array: *out = DType::F32; return true;
    case napi_uint16_array: *out = DType::BF16; return true;
    case napi_int32_array: *out = DType::I32; return true;
    case napi_float64_array: *out = DType::F64; return true;
    case napi_bigint64_array: *out = DType::I64; return true;
    default: return false;
  }
}

// Parses (name, tensors, scalars). Keeps references to the typed arrays in `pins` when given (async
// calls: the arrays must outlive the worker). An empty typed array gets a valid non-null address that
// is never read (an empty view may have a null data pointer, which would mean "omitted").
inline OpCall parse_call(const Napi::CallbackInfo& info, std::string* name, std::vector<Napi::ObjectReference>* pins) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsArray() || !info[2].IsArray())
    throw make_error(env, "E_ARGUMENT", "callOp(name: string, tensors: TypedArray[], scalars: number[])");
  *name = info[0].As<Napi::String>().Utf8Value();
  const OpDef* def = find_op(*name);
  if (!def) throw make_error(env, "E_UNKNOWN_OP", "unknown op '" + *name + "'");
  OpCall call;
  Napi::Array ts = info[1].As<Napi::Array>();
  for (uint32_t i = 0; i < ts.Length(); i++) {
    Napi::Value v = ts.Get(i);
    TensorRef t;
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
      static double dummy = 0;
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

// Runs fn(); on an exception fills code and message and returns false. Safe on any thread.
template <class F>
bool run_guarded(const std::string& name, F&& fn, std::string* code, std::string* message) {
  try {
    fn();
    return true;
  } catch (const Error& e) {
    *code = e.code;
    *message = e.what();
  } catch (const std::bad_alloc&) {
    *code = "E_OUT_OF_MEMORY";
    *message = name + ": out of memory";
  } catch (const std::exception& e) {
    *code = "E_INTERNAL";
    *message = name + ": " + e.what();
  }
  return false;
}

// callOp(name, tensors, scalars) -> undefined, through `run(name, call)` (the backend's checked call).
template <class Run>
Napi::Value call_sync(const Napi::CallbackInfo& info, Run run) {
  std::string name;
  OpCall call = parse_call(info, &name, nullptr);
  std::string code, message;
  if (!run_guarded(name, [&] { run(name, call); }, &code, &message)) throw make_error(info.Env(), code, message);
  return info.Env().Undefined();
}

template <class Run>
class OpWorker : public Napi::AsyncWorker {
 public:
  OpWorker(Napi::Env env, Run run, std::string name, OpCall call, std::vector<Napi::ObjectReference> pins)
      : Napi::AsyncWorker(env, "bts-op"), deferred_(Napi::Promise::Deferred::New(env)), run_(run),
        name_(std::move(name)), call_(std::move(call)), pins_(std::move(pins)) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    std::string message;
    if (!run_guarded(name_, [&] { run_(name_, call_); }, &code_, &message)) SetError(message);
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
  Run run_;
  std::string name_;
  OpCall call_;
  std::vector<Napi::ObjectReference> pins_;
  std::string code_ = "E_INTERNAL";
};

// callOpAsync(name, tensors, scalars) -> Promise<void>: `run` on a libuv worker thread.
template <class Run>
Napi::Value call_async(const Napi::CallbackInfo& info, Run run) {
  std::string name;
  std::vector<Napi::ObjectReference> pins;
  OpCall call = parse_call(info, &name, &pins);
  auto* w = new OpWorker<Run>(info.Env(), run, name, std::move(call), std::move(pins));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// listOps() -> [{name, tensors: [{name, dtype, optional, output}], scalars: [name]}] for the registry's
// ops for which has(name) is true, in registry order.
template <class Has>
Napi::Value list_ops(Napi::Env env, Has has) {
  const auto& ops = op_registry();
  Napi::Array out = Napi::Array::New(env);
  uint32_t k = 0;
  for (size_t i = 0; i < ops.size(); i++) {
    if (!has(ops[i].name)) continue;
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", ops[i].name);
    Napi::Array ts = Napi::Array::New(env, ops[i].tensors.size());
    for (size_t j = 0; j < ops[i].tensors.size(); j++) {
      Napi::Object t = Napi::Object::New(env);
      t.Set("name", ops[i].tensors[j].name);
      t.Set("dtype", dtype_name(ops[i].tensors[j].dtype));
      t.Set("optional", ops[i].tensors[j].optional);
      t.Set("output", ops[i].tensors[j].output);
      ts.Set(uint32_t(j), t);
    }
    o.Set("tensors", ts);
    Napi::Array ss = Napi::Array::New(env, ops[i].scalars.size());
    for (size_t j = 0; j < ops[i].scalars.size(); j++) ss.Set(uint32_t(j), ops[i].scalars[j]);
    o.Set("scalars", ss);
    out.Set(k++, o);
  }
  return out;
}

}  // namespace napi
}  // namespace bts
