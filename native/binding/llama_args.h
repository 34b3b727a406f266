// llama_args.h: the Node-API pieces shared by the two engine bindings, engine.cc (NativeLlama) and
// stitched.cc (NativeStitched): argument checks (integers, numbers, typed arrays), the NativeLlamaConfig
// parser, the binder of one model's weights (Float32Array, Uint16Array of bf16 bits, or a tensor in a
// mapped file {file, offset, dtype, length}), the holder that keeps those weights alive, the
// AsyncWorker that runs an engine call on a libuv thread, and the JS face of a KV cache.
//
// Why it is shaped this way
// - One place for the checks both bindings apply to the same JS values, so that llamaCreate and
//   stitchedCreate accept the same weights and word their errors the same way (`who` names the
//   function, e.g. "stitchedCreate", and `arg` the argument, e.g. "experts[1]").
// - Mapped files: the NativeMappedFile class lives in engine.cc (it registers mapFile). Its objects
//   carry the type tag kMappedFileTag (napi_type_tag_object), so either binding recognises one safely
//   (a JS look-alike, or an object of another class, never passes), and mapping_of() (engine.cc) hands
//   out the mapping, shared: a model holds a std::shared_ptr, so a mapping outlives its file object.
// - Header-only templates and inline functions in bts::napi (external linkage, one definition for
//   both translation units), as op_call.h: it is not a .cc because every native/binding/*.cc becomes
//   part of the CPU addon.
//
// Known limits: only included inside the BTS_ONLY_OPS_BUILD guard of the two bindings (it needs the
// engine's headers).
#pragma once
#include <napi.h>

#include <cmath>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../engine/llama.h"
#include "bts/common.h"
#include "op_call.h"

namespace bts {
namespace napi {

// ---------------------------------------------------------------------------------------------------
// Errors and plain arguments.

// Runs fn, turning C++ exceptions into JS errors with a code.
template <class Fn>
auto guarded(Napi::Env env, const std::string& what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const bts::Error& e) {
    throw make_error(env, e.code, e.what());
  } catch (const std::bad_alloc&) {
    throw make_error(env, "E_OUT_OF_MEMORY", what + ": out of memory");
  } catch (const std::exception& e) {
    throw make_error(env, "E_INTERNAL", what + ": " + e.what());
  }
}

inline std::string num_str(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15) return std::to_string(int64_t(v));
  return std::to_string(v);
}

// A short description of a JS value for error messages.
inline std::string describe(const Napi::Value& v) {
  if (v.IsUndefined()) return "undefined";
  if (v.IsNull()) return "null";
  if (v.IsNumber()) return num_str(v.As<Napi::Number>().DoubleValue());
  if (v.IsString()) return "'" + v.As<Napi::String>().Utf8Value() + "'";
  if (v.IsBoolean()) return v.As<Napi::Boolean>().Value() ? "true" : "false";
  if (v.IsTypedArray()) return "a typed array";
  if (v.IsArray()) return "an array";
  return "an object";
}

// An integer in [lo, hi] or E_ARGUMENT naming it.
inline int64_t int_arg(Napi::Env env, const Napi::Value& v, const std::string& what, int64_t lo, int64_t hi) {
  if (!v.IsNumber()) throw make_error(env, "E_ARGUMENT", what + " must be an integer, got " + describe(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!(d == std::floor(d)) || d < double(lo) || d > double(hi))
    throw make_error(env, "E_ARGUMENT", what + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + num_str(d));
  return int64_t(d);
}

// A finite number or E_ARGUMENT naming it.
inline double num_arg(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (!v.IsNumber()) throw make_error(env, "E_ARGUMENT", what + " must be a number, got " + describe(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d)) throw make_error(env, "E_ARGUMENT", what + " must be finite, got " + num_str(d));
  return d;
}

// A typed array of `type` with exactly `len` elements (at_least: >= len; len < 0: any length >= 1).
inline Napi::TypedArray typed(Napi::Env env, const Napi::Value& v, napi_typedarray_type type, const char* type_name, int64_t len,
                              const std::string& what, const std::string& shape, bool at_least = false) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
    throw make_error(env, "E_DTYPE", what + " must be a " + type_name + ", got " + describe(v));
  Napi::TypedArray a = v.As<Napi::TypedArray>();
  const int64_t n = int64_t(a.ElementLength());
  if (len >= 0 && (at_least ? n < len : n != len))
    throw make_error(env, "E_SHAPE", what + " has " + std::to_string(n) + " elements, expected " + (at_least ? "at least " : "") + shape +
                                         " = " + std::to_string(len));
  if (len < 0 && n < 1) throw make_error(env, "E_SHAPE", what + " must not be empty");
  return a;
}

template <class T>
T* data_of(const Napi::TypedArray& a) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset());
}

inline Napi::ObjectReference pin(const Napi::Value& v) { return Napi::Persistent(v.As<Napi::Object>()); }

// B and T of a call as positive integers (B*T bounded); `cls` names the class, e.g. "NativeLlama".
inline void shape_args(Napi::Env env, const Napi::CallbackInfo& info, size_t iB, const std::string& cls, const char* method, int64_t* B,
                       int64_t* T) {
  const std::string m = cls + "." + method;
  *B = int_arg(env, info[iB], m + ": B", 1, int64_t(1) << 31);
  *T = int_arg(env, info[iB + 1], m + ": T", 1, int64_t(1) << 31);
  if (double(*B) * double(*T) > double(int64_t(1) << 40)) throw make_error(env, "E_ARGUMENT", m + ": B*T is too large");
}

// { lossSum, count } of an engine loss.
inline Napi::Value loss_value(Napi::Env e, const bts::engine::LlamaModel::Loss& r) {
  Napi::Object o = Napi::Object::New(e);
  o.Set("lossSum", r.sum);
  o.Set("count", double(r.count));
  return o;
}

// ---------------------------------------------------------------------------------------------------
// Config.

// The fields of NativeLlamaConfig (lib/engine/native.ts) as an engine config, validated; errors name
// `who`.config.<field>.
inline bts::engine::LlamaConfig parse_llama_config(Napi::Env env, const Napi::Value& v, const std::string& who) {
  if (!v.IsObject() || v.IsArray()) throw make_error(env, "E_ARGUMENT", who + ": config must be an object (NativeLlamaConfig), got " + describe(v));
  Napi::Object o = v.As<Napi::Object>();
  auto I = [&](const char* key) { return int_arg(env, o.Get(key), who + ": config." + key, 1, int64_t(1) << 31); };
  auto P = [&](const std::string& key, const Napi::Value& x) {
    if (!x.IsNumber()) throw make_error(env, "E_ARGUMENT", who + ": config." + key + " must be a number, got " + describe(x));
    const double d = x.As<Napi::Number>().DoubleValue();
    if (!std::isfinite(d) || !(d > 0))
      throw make_error(env, "E_ARGUMENT", who + ": config." + key + " must be a positive finite number, got " + num_str(d));
    return d;
  };
  bts::engine::LlamaConfig c;
  c.V = I("vocabSize"), c.D = I("hiddenSize"), c.F = I("intermediateSize"), c.L = I("numHiddenLayers");
  c.H = I("numAttentionHeads"), c.Hkv = I("numKeyValueHeads"), c.Dh = I("headDim"), c.max_pos = I("maxPositionEmbeddings");
  c.eps = float(P("rmsNormEps", o.Get("rmsNormEps")));
  c.rope.theta = P("ropeTheta", o.Get("ropeTheta"));
  Napi::Value tie = o.Get("tieWordEmbeddings");
  if (!tie.IsBoolean()) throw make_error(env, "E_ARGUMENT", who + ": config.tieWordEmbeddings must be a boolean, got " + describe(tie));
  c.tie = tie.As<Napi::Boolean>().Value();
  Napi::Value rs = o.Get("ropeScaling");
  if (!rs.IsNull() && !rs.IsUndefined()) {
    if (!rs.IsObject()) throw make_error(env, "E_ARGUMENT", who + ": config.ropeScaling must be null or an object, got " + describe(rs));
    Napi::Object r = rs.As<Napi::Object>();
    Napi::Value type = r.Get("type");
    if (!type.IsString() || type.As<Napi::String>().Utf8Value() != "llama3")
      throw make_error(env, "E_UNSUPPORTED", who + ": config.ropeScaling.type " + describe(type) +
                                                 " is not supported by the native engine (supported: 'llama3', or null for plain RoPE)");
    c.rope.factor = P("ropeScaling.factor", r.Get("factor"));
    c.rope.low_freq_factor = P("ropeScaling.lowFreqFactor", r.Get("lowFreqFactor"));
    c.rope.high_freq_factor = P("ropeScaling.highFreqFactor", r.Get("highFreqFactor"));
    c.rope.original_max_position_embeddings = P("ropeScaling.originalMaxPositionEmbeddings", r.Get("originalMaxPositionEmbeddings"));
  }
  guarded(env, who, [&] { bts::engine::validate_config(c); });
  return c;
}

// ---------------------------------------------------------------------------------------------------
// Mapped files and model weights.

// A read-only mapping of a whole file (engine.cc maps and unmaps it).
struct Mapping {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::string path;
#ifdef _WIN32
  void* file = nullptr;  // HANDLE (INVALID_HANDLE_VALUE when unset; engine.cc sets it)
  void* map = nullptr;   // HANDLE
#endif
  ~Mapping();  // engine.cc
};

// The type tag of NativeMappedFile objects (engine.cc tags each one at construction).
constexpr napi_type_tag kMappedFileTag = {0x6274732d6d617070ull, 0x656466696c653031ull};

// The mapping behind `v` when it is a live NativeMappedFile (from mapFile): E_ARGUMENT naming `what`
// otherwise, E_DISPOSED after its dispose(). Defined in engine.cc.
std::shared_ptr<Mapping> mapping_of(Napi::Env env, const Napi::Value& v, const std::string& what);

// What a model keeps alive for the engine's borrowed pointers: the typed arrays it was given, the
// mappings its weights lie in, and the fp32 copies of bf16 norm weights.
struct Keepalive {
  std::vector<Napi::ObjectReference> refs;
  std::vector<std::shared_ptr<Mapping>> maps;
  std::vector<std::unique_ptr<float[]>> owned;
  void clear() {
    refs.clear();
    maps.clear();
    owned.clear();
  }
};

// The hint for a name that is not a tensor of the config (the tied LM head).
inline std::string tensor_name_hint(const bts::engine::LlamaConfig& c, const std::string& name) {
  return (c.tie && name == "lm_head.weight") ? " (tieWordEmbeddings: the LM head is model.embed_tokens.weight)" : "";
}

// One weight `where` of s.numel elements: a Float32Array, a Uint16Array (bf16 bits) or a mapped
// tensor {file, offset, dtype: 'f32' | 'bf16', length}; kept alive by `keep`.
inline bts::engine::Weight bind_weight_value(Napi::Env env, const Napi::Value& v, int64_t numel, const std::string& where, Keepalive& keep) {
  bts::engine::Weight w;
  if (v.IsTypedArray()) {
    Napi::TypedArray a = v.As<Napi::TypedArray>();
    if (a.TypedArrayType() == napi_float32_array) w.f32 = data_of<float>(typed(env, v, napi_float32_array, "Float32Array", numel, where, "numel"));
    else if (a.TypedArrayType() == napi_uint16_array)
      w.b16 = data_of<bts::bf16>(typed(env, v, napi_uint16_array, "Uint16Array", numel, where, "numel"));
    else throw make_error(env, "E_DTYPE", where + " must be a Float32Array, a Uint16Array (bf16) or {file, offset, dtype, length}");
    keep.refs.push_back(pin(a));
    return w;
  }
  if (!v.IsObject())
    throw make_error(env, "E_DTYPE", where + " must be a Float32Array, a Uint16Array (bf16) or {file, offset, dtype, length}, got " + describe(v));
  Napi::Object o = v.As<Napi::Object>();
  std::shared_ptr<Mapping> m = mapping_of(env, o.Get("file"), where + ".file");
  Napi::Value dv = o.Get("dtype");
  const std::string dtype = dv.IsString() ? dv.As<Napi::String>().Utf8Value() : "";
  if (dtype != "f32" && dtype != "bf16") throw make_error(env, "E_DTYPE", where + ".dtype must be 'f32' or 'bf16', got " + describe(dv));
  const int64_t esize = dtype == "f32" ? 4 : 2;
  const int64_t offset = int_arg(env, o.Get("offset"), where + ".offset", 0, int64_t(1) << 52);
  const int64_t length = int_arg(env, o.Get("length"), where + ".length", 0, int64_t(1) << 50);
  if (length != numel)
    throw make_error(env, "E_SHAPE", where + ".length is " + std::to_string(length) + ", expected numel = " + std::to_string(numel));
  if (uint64_t(offset) + uint64_t(length) * uint64_t(esize) > uint64_t(m->size))
    throw make_error(env, "E_ARGUMENT", where + ": bytes [" + std::to_string(offset) + ", " + std::to_string(offset + length * esize) +
                                            ") lie outside the file '" + m->path + "' (" + std::to_string(m->size) + " bytes)");
  if (offset % esize != 0)
    throw make_error(env, "E_ARGUMENT", where + ".offset " + std::to_string(offset) + " is not a multiple of the " + dtype + " element size (" +
                                            std::to_string(esize) + "); copy the tensor instead");
  if (esize == 4) w.f32 = reinterpret_cast<const float*>(m->data + offset);
  else w.b16 = reinterpret_cast<const bts::bf16*>(m->data + offset);
  keep.maps.push_back(std::move(m));
  return w;
}

// Every tensor of config `c` (specs = tensor_specs(c)) from the object `v` of weights by HF name,
// kept alive by `keep`. Errors name `who: arg` (e.g. "stitchedCreate: hub"). A bf16 norm weight is
// widened to fp32 once (norms are fp32 in the engine); `trained` (may be null) lists the names with a
// gradient, whose norm weights must be fp32 already.
inline bts::engine::ModelWeights bind_llama_weights(Napi::Env env, const Napi::Value& v, const bts::engine::LlamaConfig& c,
                                                    const std::vector<bts::engine::TensorSpec>& specs, const std::string& who,
                                                    const std::string& arg, Keepalive& keep, const std::set<std::string>* trained) {
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray())
    throw make_error(env, "E_ARGUMENT", who + ": " + arg + " must be an object of tensors by HF name, got " + describe(v));
  Napi::Object wo = v.As<Napi::Object>();
  Napi::Array keys = wo.GetPropertyNames();
  for (uint32_t i = 0; i < keys.Length(); i++) {
    const std::string name = keys.Get(i).ToString().Utf8Value();
    bool known = false;
    for (const bts::engine::TensorSpec& s : specs) known = known || s.name == name;
    if (!known) throw make_error(env, "E_ARGUMENT", who + ": " + arg + " has '" + name + "', not a tensor of this config" + tensor_name_hint(c, name));
  }
  bts::engine::ModelWeights mw;
  mw.layers.resize(size_t(c.L));
  for (const bts::engine::TensorSpec& s : specs) {
    const std::string where = who + ": " + arg + "['" + s.name + "']";
    Napi::Value t = wo.Get(s.name);
    if (t.IsUndefined() || t.IsNull()) throw make_error(env, "E_ARGUMENT", who + ": " + arg + ": weight '" + s.name + "' is missing");
    bts::engine::Weight w = bind_weight_value(env, t, s.numel, where, keep);
    if (s.is_norm() && w.b16) {
      if (trained && trained->count(s.name))
        throw make_error(env, "E_DTYPE", where + " is bf16 but has a gradient; a trained norm weight must be a Float32Array");
      std::unique_ptr<float[]> f(new float[size_t(s.numel)]);
      for (int64_t i = 0; i < s.numel; i++) f[size_t(i)] = bts::bf16_to_f32(w.b16[i]);
      w.f32 = f.get();
      w.b16 = nullptr;
      keep.owned.push_back(std::move(f));
    }
    bts::engine::bind_weight(mw, s, w);
  }
  return mw;
}

// ---------------------------------------------------------------------------------------------------
// Model lifetimes.

// The lifetime of a model wrap around engine object Core: the engine, what it keeps alive, the calls
// in flight. dispose() refuses later calls at once (E_DISPOSED) but frees the engine and drops the
// references only when no call is in flight (each worker's closure holds its own reference to the
// engine, unused after).
template <class Core>
class ModelLife {
 public:
  // The engine for `cls.method`, or E_DISPOSED naming `what` after dispose().
  const std::shared_ptr<Core>& core(Napi::Env env, const char* cls, const char* method, const char* what) const {
    if (disposed_ || !core_) throw make_error(env, "E_DISPOSED", std::string(cls) + "." + method + ": " + what);
    return core_;
  }
  void set(std::shared_ptr<Core> core) { core_ = std::move(core); }
  Keepalive& keep() { return keep_; }
  void begin_call() { inflight_++; }
  void end_call() {
    if (--inflight_ == 0 && disposed_) release();
  }
  void dispose() {
    if (disposed_) return;
    disposed_ = true;
    if (inflight_ == 0) release();
  }

 private:
  void release() {
    core_.reset();
    keep_.clear();
  }
  std::shared_ptr<Core> core_;
  Keepalive keep_;
  int inflight_ = 0;
  bool disposed_ = false;
};

// ---------------------------------------------------------------------------------------------------
// Async calls.

// One engine call on a libuv worker: `work` runs there (the model takes the compute lock itself), `ok`
// builds the resolved value on the JS thread. Pins the JS objects until the Promise settles; tells the
// model (and the cache, if any) when the call begins and ends (Model, Cache: begin_call / end_call).
template <class Model, class Cache>
class CallWorker : public Napi::AsyncWorker {
 public:
  CallWorker(Napi::Env env, std::string what, std::function<void()> work, std::function<Napi::Value(Napi::Env)> ok,
             std::vector<Napi::ObjectReference> pins, Model* model, Cache* cache)
      : Napi::AsyncWorker(env, "bts-engine"), deferred_(Napi::Promise::Deferred::New(env)), what_(std::move(what)),
        work_(std::move(work)), ok_(std::move(ok)), pins_(std::move(pins)), model_(model), cache_(cache) {
    model_->begin_call();
    if (cache_) cache_->begin_call();
  }
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      work_();
    } catch (const bts::Error& e) {
      code_ = e.code;
      SetError(e.what());
    } catch (const std::bad_alloc&) {
      code_ = "E_OUT_OF_MEMORY";
      SetError(what_ + ": out of memory");
    } catch (const std::exception& e) {
      code_ = "E_INTERNAL";
      SetError(what_ + ": " + e.what());
    }
  }
  void OnOK() override {
    Napi::Value v = ok_ ? ok_(Env()) : Env().Undefined();
    finish();
    deferred_.Resolve(v);
  }
  void OnError(const Napi::Error& e) override {
    finish();
    deferred_.Reject(make_error(Env(), code_, e.Message()).Value());
  }

 private:
  void finish() {
    if (cache_) cache_->end_call();
    model_->end_call();
    pins_.clear();
  }
  Napi::Promise::Deferred deferred_;
  std::string what_;
  std::function<void()> work_;
  std::function<Napi::Value(Napi::Env)> ok_;
  std::vector<Napi::ObjectReference> pins_;
  Model* model_;
  Cache* cache_;
  std::string code_ = "E_INTERNAL";
};

// Queues a CallWorker and returns its Promise (Model::CacheWrapT: the class of its caches; cache may
// be null).
template <class Model>
Napi::Value queue(Napi::Env env, const std::string& what, std::function<void()> work, std::function<Napi::Value(Napi::Env)> ok,
                  std::vector<Napi::ObjectReference> pins, Model* model, typename Model::CacheWrapT* cache) {
  auto* w = new CallWorker<Model, typename Model::CacheWrapT>(env, what, std::move(work), std::move(ok), std::move(pins), model, cache);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// ---------------------------------------------------------------------------------------------------
// The calls both models share (loss, logits, prefill, decode), for a wrap W of an engine model with
// W::kClass (the JS class name), core(env, method), cache_arg(env, value, method) -> W::CacheWrapT*,
// id(), and the model's loss / logits / prefill / decode of llama.h's signatures.

// The JS methods both model classes have (loss, logits, createCache, prefill, decode, workspaceBytes,
// dispose), each through W::Safe (guarded), plus `extra`; for DefineClass.
template <class W>
std::vector<typename Napi::ObjectWrap<W>::PropertyDescriptor> model_methods(std::vector<typename Napi::ObjectWrap<W>::PropertyDescriptor> extra) {
  using OW = Napi::ObjectWrap<W>;
  std::vector<typename OW::PropertyDescriptor> p = {
      OW::template InstanceMethod<&W::template Safe<&W::Loss>>("loss"),
      OW::template InstanceMethod<&W::template Safe<&W::Logits>>("logits"),
      OW::template InstanceMethod<&W::template Safe<&W::CreateCache>>("createCache"),
      OW::template InstanceMethod<&W::template Safe<&W::Prefill>>("prefill"),
      OW::template InstanceMethod<&W::template Safe<&W::Decode>>("decode"),
      OW::template InstanceMethod<&W::template Safe<&W::WorkspaceBytes>>("workspaceBytes"),
      OW::template InstanceMethod<&W::template Safe<&W::Dispose>>("dispose")};
  p.insert(p.end(), extra.begin(), extra.end());
  return p;
}

// The cache argument of W.method: an instance of the class `ctor` (W::CacheWrapT), or E_ARGUMENT.
template <class W>
typename W::CacheWrapT* cache_of(Napi::Env env, const Napi::FunctionReference& ctor, const Napi::Value& v, const char* method) {
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(ctor.Value()))
    throw make_error(env, "E_ARGUMENT", std::string(W::kClass) + "." + method + ": cache must be a " + W::CacheWrapT::kClass +
                                            " (from createCache), got " + describe(v));
  return W::CacheWrapT::Unwrap(v.As<Napi::Object>());
}

// The arguments forwardBackward(inputs [B*T], targets [B*T], B, T, gradScale, ...) of both models
// share, checked, with the JS objects to pin (this, inputs, targets).
struct TrainArgs {
  const int32_t* inputs = nullptr;
  const int32_t* targets = nullptr;
  int64_t B = 0, T = 0;
  float grad_scale = 1.f;
  std::vector<Napi::ObjectReference> pins;
};
inline TrainArgs train_args(const Napi::CallbackInfo& info, const std::string& cls) {
  Napi::Env env = info.Env();
  const std::string m = cls + ".forwardBackward";
  TrainArgs a;
  shape_args(env, info, 2, cls, "forwardBackward", &a.B, &a.T);
  const int64_t N = a.B * a.T;
  Napi::TypedArray in = typed(env, info[0], napi_int32_array, "Int32Array", N, m + ": inputs", "B*T");
  Napi::TypedArray tg = typed(env, info[1], napi_int32_array, "Int32Array", N, m + ": targets", "B*T");
  a.grad_scale = float(num_arg(env, info[4], m + ": gradScale"));
  a.inputs = data_of<int32_t>(in);
  a.targets = data_of<int32_t>(tg);
  a.pins.push_back(pin(info.This()));
  a.pins.push_back(pin(in));
  a.pins.push_back(pin(tg));
  return a;
}

// loss(inputs [B*T], targets [B*T], B, T, losses [B*T] | null) -> Promise<{lossSum, count}>
template <class W>
Napi::Value call_loss(W* self, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string m = std::string(W::kClass) + ".loss";
  auto core = self->core(env, "loss");
  int64_t B, T;
  shape_args(env, info, 2, W::kClass, "loss", &B, &T);
  const int64_t N = B * T;
  Napi::TypedArray in = typed(env, info[0], napi_int32_array, "Int32Array", N, m + ": inputs", "B*T");
  Napi::TypedArray tg = typed(env, info[1], napi_int32_array, "Int32Array", N, m + ": targets", "B*T");
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(in));
  pins.push_back(pin(tg));
  float* losses = nullptr;
  if (info.Length() > 4 && !info[4].IsNull() && !info[4].IsUndefined()) {
    Napi::TypedArray l = typed(env, info[4], napi_float32_array, "Float32Array", N, m + ": losses", "B*T");
    losses = data_of<float>(l);
    pins.push_back(pin(l));
  }
  const int32_t* p_in = data_of<int32_t>(in);
  const int32_t* p_tg = data_of<int32_t>(tg);
  auto result = std::make_shared<bts::engine::LlamaModel::Loss>();
  return queue(env, "loss", [=] { *result = core->loss(p_in, p_tg, B, T, losses); },
               [result](Napi::Env e) { return loss_value(e, *result); }, std::move(pins), self, nullptr);
}

// logits(tokens [B*T], B, T, out [B*T*V]) -> Promise<void>
template <class W>
Napi::Value call_logits(W* self, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string m = std::string(W::kClass) + ".logits";
  auto core = self->core(env, "logits");
  int64_t B, T;
  shape_args(env, info, 1, W::kClass, "logits", &B, &T);
  const int64_t N = B * T, V = core->config().V;
  Napi::TypedArray tk = typed(env, info[0], napi_int32_array, "Int32Array", N, m + ": tokens", "B*T");
  if (double(N) * double(V) > double(int64_t(1) << 50)) throw make_error(env, "E_ARGUMENT", m + ": B*T*V is too large");
  Napi::TypedArray out = typed(env, info[3], napi_float32_array, "Float32Array", N * V, m + ": out", "B*T*V");
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "logits", [=] { core->logits(p_tk, B, T, p_out); }, nullptr, std::move(pins), self, nullptr);
}

// prefill(cache, slot, tokens [T >= 1], out [>= V]) -> Promise<void>
template <class W>
Napi::Value call_prefill(W* self, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string m = std::string(W::kClass) + ".prefill";
  auto core = self->core(env, "prefill");
  typename W::CacheWrapT* cw = self->cache_arg(env, info[0], "prefill");
  auto cache = cw->use(env, "prefill", self->id());
  const int64_t slot = int_arg(env, info[1], m + ": slot", 0, int64_t(1) << 31);  // range: the model
  Napi::TypedArray tk = typed(env, info[2], napi_int32_array, "Int32Array", -1, m + ": tokens", "");
  const int64_t T = int64_t(tk.ElementLength()), V = core->config().V;
  Napi::TypedArray out = typed(env, info[3], napi_float32_array, "Float32Array", V, m + ": out", "V", true);
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(info[0]));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "prefill", [=] { core->prefill(*cache, slot, p_tk, T, p_out); }, nullptr, std::move(pins), self, cw);
}

// decode(cache, slots [R], tokens [R], out [>= R*V]) -> Promise<void>
template <class W>
Napi::Value call_decode(W* self, const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string m = std::string(W::kClass) + ".decode";
  auto core = self->core(env, "decode");
  typename W::CacheWrapT* cw = self->cache_arg(env, info[0], "decode");
  auto cache = cw->use(env, "decode", self->id());
  Napi::TypedArray sl = typed(env, info[1], napi_int32_array, "Int32Array", -1, m + ": slots", "");
  const int64_t R = int64_t(sl.ElementLength()), V = core->config().V;
  Napi::TypedArray tk = typed(env, info[2], napi_int32_array, "Int32Array", R, m + ": tokens", "slots.length");
  Napi::TypedArray out = typed(env, info[3], napi_float32_array, "Float32Array", R * V, m + ": out", "slots.length*V", true);
  const int32_t* p_sl = data_of<int32_t>(sl);
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(info[0]));
  pins.push_back(pin(sl));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "decode", [=] { core->decode(*cache, p_sl, p_tk, R, p_out); }, nullptr, std::move(pins), self, cw);
}

// ---------------------------------------------------------------------------------------------------
// KV caches.

// The JS face of a cache C (bts::engine::KvCache, StitchedCache or the CUDA engine's DeviceKvCache:
// slots(), capacity(), length(slot), reset(slot), truncate(slot, length), bytes()), as class
// `Traits::kClass` made by `Traits::kModel`'s createCache. Traits::make(info, &owner) builds the cache
// from new Class(model, slots, capacity) and sets the owning model's id. One prefill/decode at a time
// (busy); reset/truncate are refused while one is pending; dispose() during a call frees the cache when
// it settles.
template <class C, class Traits>
class CacheWrap : public Napi::ObjectWrap<CacheWrap<C, Traits>> {
 public:
  static constexpr const char* kClass = Traits::kClass;
  // Every method through guarded(): a C++ exception never escapes into Node-API.
  template <Napi::Value (CacheWrap::*M)(const Napi::CallbackInfo&)>
  Napi::Value Safe(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), Traits::kClass, [&] { return (this->*M)(info); });
  }

  static Napi::Function Define(Napi::Env env, void* data) {
    return CacheWrap::DefineClass(env, Traits::kClass,
                                  {CacheWrap::template InstanceMethod<&CacheWrap::Safe<&CacheWrap::Length>>("length"),
                                   CacheWrap::template InstanceMethod<&CacheWrap::Safe<&CacheWrap::Reset>>("reset"),
                                   CacheWrap::template InstanceMethod<&CacheWrap::Safe<&CacheWrap::Truncate>>("truncate"),
                                   CacheWrap::template InstanceAccessor<&CacheWrap::Safe<&CacheWrap::Slots>>("slots"),
                                   CacheWrap::template InstanceAccessor<&CacheWrap::Safe<&CacheWrap::Capacity>>("capacity"),
                                   CacheWrap::template InstanceAccessor<&CacheWrap::Safe<&CacheWrap::Bytes>>("byteLength"),
                                   CacheWrap::template InstanceMethod<&CacheWrap::Safe<&CacheWrap::Dispose>>("dispose")},
                                  data);
  }

  explicit CacheWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CacheWrap>(info) {
    guarded(info.Env(), "createCache", [&] {
      cache_ = Traits::make(info, &owner_);
      slots_ = cache_->slots();
      capacity_ = cache_->capacity();
    });
  }

  // The cache for a call `method` of model `owner` (class Traits::kModel), or a typed error.
  const std::shared_ptr<C>& use(Napi::Env env, const char* method, uint64_t owner) const {
    const std::string m = std::string(Traits::kModel) + "." + method;
    if (!cache_ || dispose_pending_) throw make_error(env, "E_DISPOSED", m + ": the KV cache");
    if (owner != owner_) throw make_error(env, "E_ARGUMENT", m + ": the cache was created by another model");
    if (busy_) throw make_error(env, "E_ARGUMENT", m + ": a prefill/decode on this cache is still pending (await it first)");
    return cache_;
  }
  void begin_call() { busy_ = true; }
  void end_call() {
    busy_ = false;
    if (dispose_pending_) {
      cache_.reset();
      dispose_pending_ = false;
    }
  }

 private:
  C& live(Napi::Env env, const char* method, bool mutating) {
    const std::string m = std::string(Traits::kClass) + "." + method;
    if (!cache_ || dispose_pending_) throw make_error(env, "E_DISPOSED", m + ": the KV cache");
    if (mutating && busy_) throw make_error(env, "E_ARGUMENT", m + ": a prefill/decode on this cache is still pending (await it first)");
    return *cache_;
  }
  std::string name(const char* method) const { return std::string(Traits::kClass) + "." + method; }
  Napi::Value Length(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    C& c = live(env, "length", false);
    const int64_t slot = int_arg(env, info[0], name("length") + ": slot", 0, int64_t(1) << 31);  // range: the cache
    return Napi::Number::New(env, double(guarded(env, name("length"), [&] { return c.length(slot); })));
  }
  Napi::Value Reset(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    C& c = live(env, "reset", true);
    const int64_t slot = int_arg(env, info[0], name("reset") + ": slot", 0, int64_t(1) << 31);  // range: the cache
    guarded(env, name("reset"), [&] { c.reset(slot); });
    return env.Undefined();
  }
  Napi::Value Truncate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    C& c = live(env, "truncate", true);
    const int64_t slot = int_arg(env, info[0], name("truncate") + ": slot", 0, int64_t(1) << 31);     // range: the cache
    const int64_t len = int_arg(env, info[1], name("truncate") + ": length", 0, int64_t(1) << 31);    // range: the cache
    guarded(env, name("truncate"), [&] { c.truncate(slot, len); });
    return env.Undefined();
  }
  Napi::Value Slots(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(slots_)); }
  Napi::Value Capacity(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(capacity_)); }
  Napi::Value Bytes(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), cache_ ? double(cache_->bytes()) : 0.0); }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    if (busy_) dispose_pending_ = true;
    else cache_.reset();
    return info.Env().Undefined();
  }

  std::shared_ptr<C> cache_;
  uint64_t owner_ = 0;
  int64_t slots_ = 0, capacity_ = 0;
  bool busy_ = false, dispose_pending_ = false;
};

}  // namespace napi
}  // namespace bts
