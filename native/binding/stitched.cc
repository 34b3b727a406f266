// stitched.cc: the Node-API face of the native stitched model (native/engine/stitched.h). Thin like
// engine.cc: it turns JS values into pointers (checking every typed array's type and length against
// the config, since the model only sees raw pointers), keeps the arrays alive, queues the long calls
// on libuv workers (AsyncWorker -> Promise) and maps bts::Error codes to JS errors carrying `code`.
// The model validates everything else (spec, token ids, slots, capacity) before computing.
//
// Exports (registered by register_stitched, called from addon.cc's Init):
//   stitchedCreate(config, hub, experts, spec, weights, grads) -> NativeStitched (see
//   lib/engine/stitched-native.ts)
// Lifetimes (as engine.cc): a NativeStitched holds references to every typed array it was given; each
// async call pins the model object, the cache object and its own arrays until it settles. dispose()
// frees the workspaces and drops the references; with calls in flight the release happens when the
// last one settles (later calls throw E_DISPOSED at once). A cache accepts one prefill/decode at a
// time; reset/truncate are refused while one is pending.
//
// Known limits: model weights are Float32Array or Uint16Array (bf16 bits). Mapped weights ({file,
// offset, dtype, length} from mapFile) are refused with E_UNSUPPORTED: the mapping and the config
// parser of engine.cc live in that file's anonymous namespace, so this file cannot resolve a
// NativeMappedFile; the lead is asked to move them into a shared header (see the report of issue 4).
// The config parser below mirrors engine.cc's for the same reason.
//
// Built also with -DBTS_ONLY_OPS (which drops native/engine/): the body is then empty.
#ifndef BTS_ONLY_OPS_BUILD

#include <napi.h>

#include <cmath>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "../engine/stitched.h"
#include "bts/common.h"

namespace {

using bts::engine::LlamaConfig;
using bts::engine::StitchedCache;
using bts::engine::StitchedModel;
using bts::engine::TensorSpec;

Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

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

std::string num_str(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15) return std::to_string(int64_t(v));
  return std::to_string(v);
}

std::string describe(const Napi::Value& v) {
  if (v.IsUndefined()) return "undefined";
  if (v.IsNull()) return "null";
  if (v.IsNumber()) return num_str(v.As<Napi::Number>().DoubleValue());
  if (v.IsString()) return "'" + v.As<Napi::String>().Utf8Value() + "'";
  if (v.IsBoolean()) return v.As<Napi::Boolean>().Value() ? "true" : "false";
  if (v.IsTypedArray()) return "a typed array";
  if (v.IsArray()) return "an array";
  return "an object";
}

int64_t int_arg(Napi::Env env, const Napi::Value& v, const std::string& what, int64_t lo, int64_t hi) {
  if (!v.IsNumber()) throw make_error(env, "E_ARGUMENT", what + " must be an integer, got " + describe(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!(d == std::floor(d)) || d < double(lo) || d > double(hi))
    throw make_error(env, "E_ARGUMENT", what + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + num_str(d));
  return int64_t(d);
}

double num_arg(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (!v.IsNumber()) throw make_error(env, "E_ARGUMENT", what + " must be a number, got " + describe(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d)) throw make_error(env, "E_ARGUMENT", what + " must be finite, got " + num_str(d));
  return d;
}

// A typed array of `type` with exactly `len` elements (at_least: >= len; len < 0: any length >= 1).
Napi::TypedArray typed(Napi::Env env, const Napi::Value& v, napi_typedarray_type type, const char* type_name, int64_t len,
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

Napi::ObjectReference pin(const Napi::Value& v) { return Napi::Persistent(v.As<Napi::Object>()); }

// ---- config (the fields of NativeLlamaConfig; mirrors engine.cc's parse_config)

double cfg_pos(Napi::Env env, const Napi::Object& o, const std::string& key, const Napi::Value& v) {
  if (!v.IsNumber()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: config." + key + " must be a number, got " + describe(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || !(d > 0))
    throw make_error(env, "E_ARGUMENT", "stitchedCreate: config." + key + " must be a positive finite number, got " + num_str(d));
  return d;
}

LlamaConfig parse_config(Napi::Env env, const Napi::Value& v) {
  if (!v.IsObject() || v.IsArray()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: config must be an object (NativeLlamaConfig), got " + describe(v));
  Napi::Object o = v.As<Napi::Object>();
  auto I = [&](const char* key) { return int_arg(env, o.Get(key), std::string("stitchedCreate: config.") + key, 1, int64_t(1) << 31); };
  LlamaConfig c;
  c.V = I("vocabSize"), c.D = I("hiddenSize"), c.F = I("intermediateSize"), c.L = I("numHiddenLayers");
  c.H = I("numAttentionHeads"), c.Hkv = I("numKeyValueHeads"), c.Dh = I("headDim"), c.max_pos = I("maxPositionEmbeddings");
  c.eps = float(cfg_pos(env, o, "rmsNormEps", o.Get("rmsNormEps")));
  c.rope.theta = cfg_pos(env, o, "ropeTheta", o.Get("ropeTheta"));
  Napi::Value tie = o.Get("tieWordEmbeddings");
  if (!tie.IsBoolean()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: config.tieWordEmbeddings must be a boolean, got " + describe(tie));
  c.tie = tie.As<Napi::Boolean>().Value();
  Napi::Value rs = o.Get("ropeScaling");
  if (!rs.IsNull() && !rs.IsUndefined()) {
    if (!rs.IsObject()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: config.ropeScaling must be null or an object, got " + describe(rs));
    Napi::Object r = rs.As<Napi::Object>();
    Napi::Value type = r.Get("type");
    if (!type.IsString() || type.As<Napi::String>().Utf8Value() != "llama3")
      throw make_error(env, "E_UNSUPPORTED", "stitchedCreate: config.ropeScaling.type " + describe(type) +
                                                 " is not supported by the native engine (supported: 'llama3', or null for plain RoPE)");
    c.rope.factor = cfg_pos(env, r, "ropeScaling.factor", r.Get("factor"));
    c.rope.low_freq_factor = cfg_pos(env, r, "ropeScaling.lowFreqFactor", r.Get("lowFreqFactor"));
    c.rope.high_freq_factor = cfg_pos(env, r, "ropeScaling.highFreqFactor", r.Get("highFreqFactor"));
    c.rope.original_max_position_embeddings = cfg_pos(env, r, "ropeScaling.originalMaxPositionEmbeddings", r.Get("originalMaxPositionEmbeddings"));
  }
  guarded(env, "stitchedCreate", [&] { bts::engine::validate_config(c); });
  return c;
}

// ---------------------------------------------------------------------------------------------------

class StitchedWrap;

class CacheWrap : public Napi::ObjectWrap<CacheWrap> {
 public:
  static Napi::Function Define(Napi::Env env, void* data) {
    return DefineClass(env, "NativeStitchedCache",
                       {InstanceMethod<&CacheWrap::Length>("length"), InstanceMethod<&CacheWrap::Reset>("reset"),
                        InstanceMethod<&CacheWrap::Truncate>("truncate"), InstanceAccessor<&CacheWrap::Slots>("slots"),
                        InstanceAccessor<&CacheWrap::Capacity>("capacity"), InstanceAccessor<&CacheWrap::Bytes>("byteLength"),
                        InstanceMethod<&CacheWrap::Dispose>("dispose")},
                       data);
  }
  explicit CacheWrap(const Napi::CallbackInfo& info);

  const std::shared_ptr<StitchedCache>& use(Napi::Env env, const char* method, uint64_t owner) const {
    if (!cache_ || dispose_pending_) throw make_error(env, "E_DISPOSED", std::string("NativeStitched.") + method + ": the KV cache");
    if (owner != owner_) throw make_error(env, "E_ARGUMENT", std::string("NativeStitched.") + method + ": the cache was created by another model");
    if (busy_) throw make_error(env, "E_ARGUMENT", std::string("NativeStitched.") + method + ": a prefill/decode on this cache is still pending (await it first)");
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
  StitchedCache& live(Napi::Env env, const char* method, bool mutating) {
    if (!cache_ || dispose_pending_) throw make_error(env, "E_DISPOSED", std::string("NativeStitchedCache.") + method + ": the KV cache");
    if (mutating && busy_)
      throw make_error(env, "E_ARGUMENT", std::string("NativeStitchedCache.") + method + ": a prefill/decode on this cache is still pending (await it first)");
    return *cache_;
  }
  Napi::Value Length(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    StitchedCache& c = live(env, "length", false);
    return Napi::Number::New(env, double(c.length(int_arg(env, info[0], "NativeStitchedCache.length: slot", 0, c.slots() - 1))));
  }
  Napi::Value Reset(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    StitchedCache& c = live(env, "reset", true);
    c.reset(int_arg(env, info[0], "NativeStitchedCache.reset: slot", 0, c.slots() - 1));
    return env.Undefined();
  }
  Napi::Value Truncate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    StitchedCache& c = live(env, "truncate", true);
    const int64_t slot = int_arg(env, info[0], "NativeStitchedCache.truncate: slot", 0, c.slots() - 1);
    c.truncate(slot, int_arg(env, info[1], "NativeStitchedCache.truncate: length", 0, c.length(slot)));
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

  std::shared_ptr<StitchedCache> cache_;
  uint64_t owner_ = 0;
  int64_t slots_ = 0, capacity_ = 0;
  bool busy_ = false, dispose_pending_ = false;
};

struct Ctors {
  Napi::FunctionReference model, cache;
};

class StitchedWrap : public Napi::ObjectWrap<StitchedWrap> {
 public:
  static Napi::Function Define(Napi::Env env, Ctors* ctors) {
    return DefineClass(env, "NativeStitched",
                       {InstanceMethod<&StitchedWrap::ForwardBackward>("forwardBackward"),
                        InstanceMethod<&StitchedWrap::Loss>("loss"), InstanceMethod<&StitchedWrap::Logits>("logits"),
                        InstanceMethod<&StitchedWrap::CreateCache>("createCache"),
                        InstanceMethod<&StitchedWrap::Prefill>("prefill"), InstanceMethod<&StitchedWrap::Decode>("decode"),
                        InstanceMethod<&StitchedWrap::Gates>("gates"),
                        InstanceMethod<&StitchedWrap::WorkspaceBytes>("workspaceBytes"),
                        InstanceMethod<&StitchedWrap::Dispose>("dispose")},
                       ctors);
  }
  explicit StitchedWrap(const Napi::CallbackInfo& info);

  const std::shared_ptr<StitchedModel>& core(Napi::Env env, const char* method) const {
    if (disposed_ || !core_) throw make_error(env, "E_DISPOSED", std::string("NativeStitched.") + method + ": the stitched model");
    return core_;
  }
  uint64_t id() const { return id_; }
  int64_t models() const { return models_; }
  void begin_call() { inflight_++; }
  void end_call() {
    if (--inflight_ == 0 && disposed_) release();
  }

 private:
  Napi::Value ForwardBackward(const Napi::CallbackInfo& info);
  Napi::Value Loss(const Napi::CallbackInfo& info);
  Napi::Value Logits(const Napi::CallbackInfo& info);
  Napi::Value CreateCache(const Napi::CallbackInfo& info);
  Napi::Value Prefill(const Napi::CallbackInfo& info);
  Napi::Value Decode(const Napi::CallbackInfo& info);
  Napi::Value Gates(const Napi::CallbackInfo& info);
  Napi::Value WorkspaceBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(core(info.Env(), "workspaceBytes")->workspace_bytes()));
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    if (disposed_) return info.Env().Undefined();
    disposed_ = true;
    if (inflight_ == 0) release();
    return info.Env().Undefined();
  }
  void release() {
    core_.reset();
    refs_.clear();
    owned_.clear();
  }
  bts::engine::ModelWeights bind_model(Napi::Env env, const Napi::Value& v, const LlamaConfig& c, const std::vector<TensorSpec>& specs,
                                       const std::string& who);
  CacheWrap* cache_arg(Napi::Env env, const Napi::Value& v, const char* method);

  Ctors* ctors_;
  uint64_t id_ = 0;
  int64_t models_ = 0, K_ = 0;
  std::shared_ptr<StitchedModel> core_;
  std::vector<Napi::ObjectReference> refs_;      // typed arrays of weights and grads
  std::vector<std::unique_ptr<float[]>> owned_;  // fp32 copies of bf16 norm weights
  int inflight_ = 0;
  bool disposed_ = false;
};

CacheWrap::CacheWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CacheWrap>(info) {
  Napi::Env env = info.Env();
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  if (info.Length() < 3 || !info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(ctors->model.Value()))
    throw make_error(env, "E_ARGUMENT", "NativeStitchedCache: made by NativeStitched.createCache(slots, capacity)");
  StitchedWrap* model = StitchedWrap::Unwrap(info[0].As<Napi::Object>());
  const std::shared_ptr<StitchedModel>& core = model->core(env, "createCache");
  const int64_t slots = int_arg(env, info[1], "NativeStitched.createCache: slots", 1, int64_t(1) << 20);
  const int64_t cap = int_arg(env, info[2], "NativeStitched.createCache: capacity", 1, int64_t(1) << 31);
  cache_ = guarded(env, "createCache", [&] { return std::make_shared<StitchedCache>(core->config(), model->models(), slots, cap); });
  owner_ = model->id();
  slots_ = slots;
  capacity_ = cap;
}

// One call on a libuv worker: `work` runs there (the model takes the compute lock), `ok` builds the
// resolved value on the JS thread. Pins the JS objects until the Promise settles.
class Worker : public Napi::AsyncWorker {
 public:
  Worker(Napi::Env env, std::string what, std::function<void()> work, std::function<Napi::Value(Napi::Env)> ok,
         std::vector<Napi::ObjectReference> pins, StitchedWrap* model, CacheWrap* cache)
      : Napi::AsyncWorker(env, "bts-stitched"), deferred_(Napi::Promise::Deferred::New(env)), what_(std::move(what)),
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
  StitchedWrap* model_;
  CacheWrap* cache_;
  std::string code_ = "E_INTERNAL";
};

Napi::Value queue(Napi::Env env, const std::string& what, std::function<void()> work, std::function<Napi::Value(Napi::Env)> ok,
                  std::vector<Napi::ObjectReference> pins, StitchedWrap* model, CacheWrap* cache) {
  auto* w = new Worker(env, what, std::move(work), std::move(ok), std::move(pins), model, cache);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value loss_value(Napi::Env e, const StitchedModel::Loss& r) {
  Napi::Object o = Napi::Object::New(e);
  o.Set("lossSum", r.sum);
  o.Set("count", double(r.count));
  return o;
}

// ---- NativeStitched

// One frozen model's weights: every tensor of the config by HF name, Float32Array or Uint16Array (bf16).
bts::engine::ModelWeights StitchedWrap::bind_model(Napi::Env env, const Napi::Value& v, const LlamaConfig& c,
                                                   const std::vector<TensorSpec>& specs, const std::string& who) {
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray())
    throw make_error(env, "E_ARGUMENT", "stitchedCreate: " + who + " must be an object of tensors by HF name, got " + describe(v));
  Napi::Object wo = v.As<Napi::Object>();
  Napi::Array keys = wo.GetPropertyNames();
  for (uint32_t i = 0; i < keys.Length(); i++) {
    const std::string name = keys.Get(i).ToString().Utf8Value();
    bool known = false;
    for (const TensorSpec& s : specs) known = known || s.name == name;
    if (!known) {
      const std::string hint = (c.tie && name == "lm_head.weight") ? " (tieWordEmbeddings: the LM head is model.embed_tokens.weight)" : "";
      throw make_error(env, "E_ARGUMENT", "stitchedCreate: " + who + " has '" + name + "', not a tensor of this config" + hint);
    }
  }
  bts::engine::ModelWeights mw;
  mw.layers.resize(size_t(c.L));
  for (const TensorSpec& s : specs) {
    const std::string what = "stitchedCreate: " + who + "['" + s.name + "']";
    Napi::Value t = wo.Get(s.name);
    if (t.IsUndefined() || t.IsNull()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: " + who + ": weight '" + s.name + "' is missing");
    bts::engine::Weight w;
    if (t.IsTypedArray() && t.As<Napi::TypedArray>().TypedArrayType() == napi_float32_array) {
      w.f32 = data_of<float>(typed(env, t, napi_float32_array, "Float32Array", s.numel, what, "numel"));
    } else if (t.IsTypedArray() && t.As<Napi::TypedArray>().TypedArrayType() == napi_uint16_array) {
      w.b16 = data_of<bts::bf16>(typed(env, t, napi_uint16_array, "Uint16Array", s.numel, what, "numel"));
    } else if (t.IsObject() && !t.IsTypedArray() && t.As<Napi::Object>().Has("file")) {
      throw make_error(env, "E_UNSUPPORTED", what + ": mapped weights ({file, offset, dtype, length}) are not supported by the stitched model yet; pass a Float32Array or a Uint16Array (bf16)");
    } else {
      throw make_error(env, "E_DTYPE", what + " must be a Float32Array or a Uint16Array (bf16), got " + describe(t));
    }
    refs_.push_back(pin(t));
    if (s.is_norm() && w.b16) {  // norm weights are fp32 in the engine: a frozen bf16 norm is widened once
      std::unique_ptr<float[]> f(new float[size_t(s.numel)]);
      for (int64_t i = 0; i < s.numel; i++) f[size_t(i)] = bts::bf16_to_f32(w.b16[i]);
      w.f32 = f.get();
      w.b16 = nullptr;
      owned_.push_back(std::move(f));
    }
    bts::engine::bind_weight(mw, s, w);
  }
  return mw;
}

// new NativeStitched(config, hub, experts, spec, weights, grads)
StitchedWrap::StitchedWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<StitchedWrap>(info) {
  static uint64_t next_id = 1;  // JS thread only
  Napi::Env env = info.Env();
  ctors_ = static_cast<Ctors*>(info.Data());
  id_ = next_id++;
  const LlamaConfig c = parse_config(env, info[0]);
  const std::vector<TensorSpec> specs = bts::engine::tensor_specs(c);

  // spec
  if (!info[3].IsObject() || info[3].IsArray())
    throw make_error(env, "E_ARGUMENT", "stitchedCreate: spec must be an object {stitches, expertStream, hubBias, gateDropout}, got " + describe(info[3]));
  Napi::Object so = info[3].As<Napi::Object>();
  bts::engine::StitchSpec spec;
  Napi::Value sv = so.Get("stitches");
  if (!sv.IsArray()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: spec.stitches must be an array, got " + describe(sv));
  Napi::Array sa = sv.As<Napi::Array>();
  for (uint32_t k = 0; k < sa.Length(); k++) {
    const std::string where = "stitchedCreate: spec.stitches[" + std::to_string(k) + "]";
    Napi::Value e = sa.Get(k);
    if (!e.IsObject()) throw make_error(env, "E_ARGUMENT", where + " must be an object {afterBlock, type}, got " + describe(e));
    Napi::Object eo = e.As<Napi::Object>();
    bts::engine::StitchPoint p;
    p.after_block = int_arg(env, eo.Get("afterBlock"), where + ".afterBlock", 1, c.L);
    Napi::Value ty = eo.Get("type");
    const std::string ts = ty.IsString() ? ty.As<Napi::String>().Utf8Value() : "";
    if (ts == "eh") p.type = bts::engine::StitchType::EH;
    else if (ts == "he") p.type = bts::engine::StitchType::HE;
    else throw make_error(env, "E_ARGUMENT", where + ".type must be 'eh' or 'he', got " + describe(ty));
    spec.stitches.push_back(p);
  }
  Napi::Value es = so.Get("expertStream");
  const std::string ess = es.IsString() ? es.As<Napi::String>().Utf8Value() : "";
  if (ess != "projected" && ess != "unchanged")
    throw make_error(env, "E_ARGUMENT", "stitchedCreate: spec.expertStream must be 'projected' or 'unchanged', got " + describe(es));
  spec.projected = ess == "projected";
  spec.hub_bias = float(num_arg(env, so.Get("hubBias"), "stitchedCreate: spec.hubBias"));
  spec.gate_dropout = float(num_arg(env, so.Get("gateDropout"), "stitchedCreate: spec.gateDropout"));
  const int64_t K = int64_t(spec.stitches.size());
  if (K < 1) throw make_error(env, "E_ARGUMENT", "stitchedCreate: spec.stitches must hold at least one stitch");

  // experts
  if (!info[2].IsArray()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: experts must be an array of weight objects, got " + describe(info[2]));
  Napi::Array ea = info[2].As<Napi::Array>();
  const int64_t n = int64_t(ea.Length());
  if (n < 1) throw make_error(env, "E_ARGUMENT", "stitchedCreate: experts must hold at least one expert");
  if (n > 4096) throw make_error(env, "E_ARGUMENT", "stitchedCreate: at most 4096 experts, got " + std::to_string(n));
  const int64_t D = c.D, M = n + 1;
  models_ = M;
  K_ = K;

  // stitch weights and grads: name -> Float32Array
  struct Slot {
    std::string name;
    int64_t k, e;  // e = -1: gate
    int64_t numel;
  };
  std::vector<Slot> slots;
  for (int64_t k = 0; k < K; k++) {
    for (int64_t e = 0; e < n; e++) slots.push_back({"stitch." + std::to_string(k) + ".proj." + std::to_string(e) + ".weight", k, e, D * D});
    slots.push_back({"stitch." + std::to_string(k) + ".gate.weight", k, -1, D * M * D});
  }
  auto find_slot = [&](const std::string& name) -> const Slot* {
    for (const Slot& s : slots)
      if (s.name == name) return &s;
    return nullptr;
  };
  auto check_names = [&](const Napi::Object& o, const char* what) {
    Napi::Array keys = o.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); i++) {
      const std::string name = keys.Get(i).ToString().Utf8Value();
      if (!find_slot(name))
        throw make_error(env, "E_ARGUMENT", std::string("stitchedCreate: ") + what + " has '" + name + "', not a stitch tensor of " + std::to_string(K) +
                                                " stitches and " + std::to_string(n) + " experts (stitch.{k}.proj.{e}.weight, stitch.{k}.gate.weight)");
    }
  };
  bts::engine::StitchWeights sw;
  sw.proj.assign(size_t(K), std::vector<const float*>(size_t(n), nullptr));
  sw.gate.assign(size_t(K), nullptr);
  if (!info[4].IsObject() || info[4].IsArray() || info[4].IsTypedArray())
    throw make_error(env, "E_ARGUMENT", "stitchedCreate: weights must be an object of Float32Arrays by stitch tensor name, got " + describe(info[4]));
  Napi::Object wo = info[4].As<Napi::Object>();
  check_names(wo, "weights");
  for (const Slot& s : slots) {
    Napi::Value t = wo.Get(s.name);
    if (t.IsUndefined() || t.IsNull()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: stitch tensor '" + s.name + "' is missing");
    Napi::TypedArray a = typed(env, t, napi_float32_array, "Float32Array", s.numel, "stitchedCreate: weights['" + s.name + "']",
                               s.e < 0 ? "D*(n+1)*D" : "D*D");
    refs_.push_back(pin(a));
    if (s.e < 0) sw.gate[size_t(s.k)] = data_of<float>(a);
    else sw.proj[size_t(s.k)][size_t(s.e)] = data_of<float>(a);
  }
  bts::engine::StitchGrads sg;
  bool have_grads = false;
  Napi::Value gv = info.Length() > 5 ? info[5] : env.Null();
  if (!gv.IsNull() && !gv.IsUndefined()) {
    if (!gv.IsObject() || gv.IsArray() || gv.IsTypedArray())
      throw make_error(env, "E_ARGUMENT", "stitchedCreate: grads must be null or an object of Float32Arrays by stitch tensor name, got " + describe(gv));
    Napi::Object go = gv.As<Napi::Object>();
    check_names(go, "grads");
    sg.proj.assign(size_t(K), std::vector<float*>(size_t(n), nullptr));
    sg.gate.assign(size_t(K), nullptr);
    for (const Slot& s : slots) {
      Napi::Value t = go.Get(s.name);
      if (t.IsUndefined() || t.IsNull()) continue;  // a frozen tensor
      Napi::TypedArray a = typed(env, t, napi_float32_array, "Float32Array", s.numel, "stitchedCreate: grads['" + s.name + "']",
                                 s.e < 0 ? "D*(n+1)*D" : "D*D");
      refs_.push_back(pin(a));
      if (s.e < 0) sg.gate[size_t(s.k)] = data_of<float>(a);
      else sg.proj[size_t(s.k)][size_t(s.e)] = data_of<float>(a);
      have_grads = true;
    }
  }

  // models
  const bts::engine::ModelWeights hub = bind_model(env, info[1], c, specs, "hub");
  std::vector<bts::engine::ModelWeights> experts;
  for (int64_t e = 0; e < n; e++) experts.push_back(bind_model(env, ea.Get(uint32_t(e)), c, specs, "experts[" + std::to_string(e) + "]"));

  core_ = guarded(env, "stitchedCreate", [&] {
    return std::make_shared<StitchedModel>(c, hub, experts, spec, sw, have_grads ? &sg : nullptr);
  });
}

CacheWrap* StitchedWrap::cache_arg(Napi::Env env, const Napi::Value& v, const char* method) {
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(ctors_->cache.Value()))
    throw make_error(env, "E_ARGUMENT", std::string("NativeStitched.") + method + ": cache must be a NativeStitchedCache (from createCache), got " + describe(v));
  return CacheWrap::Unwrap(v.As<Napi::Object>());
}

void shape_args(Napi::Env env, const Napi::CallbackInfo& info, size_t iB, const char* method, int64_t* B, int64_t* T) {
  *B = int_arg(env, info[iB], std::string("NativeStitched.") + method + ": B", 1, int64_t(1) << 31);
  *T = int_arg(env, info[iB + 1], std::string("NativeStitched.") + method + ": T", 1, int64_t(1) << 31);
  if (double(*B) * double(*T) > double(int64_t(1) << 40))
    throw make_error(env, "E_ARGUMENT", std::string("NativeStitched.") + method + ": B*T is too large");
}

Napi::Value StitchedWrap::ForwardBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<StitchedModel> core = this->core(env, "forwardBackward");
  int64_t B, T;
  shape_args(env, info, 2, "forwardBackward", &B, &T);
  const int64_t N = B * T;
  Napi::TypedArray in = typed(env, info[0], napi_int32_array, "Int32Array", N, "NativeStitched.forwardBackward: inputs", "B*T");
  Napi::TypedArray tg = typed(env, info[1], napi_int32_array, "Int32Array", N, "NativeStitched.forwardBackward: targets", "B*T");
  const float scale = float(num_arg(env, info[4], "NativeStitched.forwardBackward: gradScale"));
  const double seedd = info.Length() > 5 && !info[5].IsUndefined() ? num_arg(env, info[5], "NativeStitched.forwardBackward: seed") : 0.0;
  if (seedd < 0 || seedd != std::floor(seedd) || seedd > 9007199254740991.0)
    throw make_error(env, "E_ARGUMENT", "NativeStitched.forwardBackward: seed must be an integer in [0, 2^53), got " + num_str(seedd));
  const uint64_t seed = uint64_t(seedd);
  if (!core->trainable())
    throw make_error(env, "E_ARGUMENT", "NativeStitched.forwardBackward: the stitched model was created without gradient buffers (frozen stitches); pass grads to stitchedCreate to train");
  const int32_t* p_in = data_of<int32_t>(in);
  const int32_t* p_tg = data_of<int32_t>(tg);
  auto result = std::make_shared<StitchedModel::Loss>();
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(in));
  pins.push_back(pin(tg));
  return queue(env, "forwardBackward", [=] { *result = core->forward_backward(p_in, p_tg, B, T, scale, seed); },
               [result](Napi::Env e) { return loss_value(e, *result); }, std::move(pins), this, nullptr);
}

Napi::Value StitchedWrap::Loss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<StitchedModel> core = this->core(env, "loss");
  int64_t B, T;
  shape_args(env, info, 2, "loss", &B, &T);
  const int64_t N = B * T;
  Napi::TypedArray in = typed(env, info[0], napi_int32_array, "Int32Array", N, "NativeStitched.loss: inputs", "B*T");
  Napi::TypedArray tg = typed(env, info[1], napi_int32_array, "Int32Array", N, "NativeStitched.loss: targets", "B*T");
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(in));
  pins.push_back(pin(tg));
  float* losses = nullptr;
  if (info.Length() > 4 && !info[4].IsNull() && !info[4].IsUndefined()) {
    Napi::TypedArray l = typed(env, info[4], napi_float32_array, "Float32Array", N, "NativeStitched.loss: losses", "B*T");
    losses = data_of<float>(l);
    pins.push_back(pin(l));
  }
  const int32_t* p_in = data_of<int32_t>(in);
  const int32_t* p_tg = data_of<int32_t>(tg);
  auto result = std::make_shared<StitchedModel::Loss>();
  return queue(env, "loss", [=] { *result = core->loss(p_in, p_tg, B, T, losses); },
               [result](Napi::Env e) { return loss_value(e, *result); }, std::move(pins), this, nullptr);
}

Napi::Value StitchedWrap::Logits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<StitchedModel> core = this->core(env, "logits");
  int64_t B, T;
  shape_args(env, info, 1, "logits", &B, &T);
  const int64_t N = B * T, V = core->config().V;
  Napi::TypedArray tk = typed(env, info[0], napi_int32_array, "Int32Array", N, "NativeStitched.logits: tokens", "B*T");
  if (double(N) * double(V) > double(int64_t(1) << 50)) throw make_error(env, "E_ARGUMENT", "NativeStitched.logits: B*T*V is too large");
  Napi::TypedArray out = typed(env, info[3], napi_float32_array, "Float32Array", N * V, "NativeStitched.logits: out", "B*T*V");
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "logits", [=] { core->logits(p_tk, B, T, p_out); }, nullptr, std::move(pins), this, nullptr);
}

Napi::Value StitchedWrap::Gates(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<StitchedModel> core = this->core(env, "gates");
  Napi::TypedArray tk = typed(env, info[0], napi_int32_array, "Int32Array", -1, "NativeStitched.gates: tokens", "");
  const int64_t T = int64_t(tk.ElementLength());
  Napi::TypedArray out = typed(env, info[1], napi_float32_array, "Float32Array", K_ * T * models_, "NativeStitched.gates: out", "K*T*(n+1)");
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "gates", [=] { core->gates(p_tk, T, p_out); }, nullptr, std::move(pins), this, nullptr);
}

Napi::Value StitchedWrap::CreateCache(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  core(env, "createCache");
  return ctors_->cache.New({info.This(), info.Length() > 0 ? info[0] : env.Undefined(), info.Length() > 1 ? info[1] : env.Undefined()});
}

Napi::Value StitchedWrap::Prefill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<StitchedModel> core = this->core(env, "prefill");
  CacheWrap* cw = cache_arg(env, info[0], "prefill");
  std::shared_ptr<StitchedCache> cache = cw->use(env, "prefill", id_);
  const int64_t slot = int_arg(env, info[1], "NativeStitched.prefill: slot", 0, cache->slots() - 1);
  Napi::TypedArray tk = typed(env, info[2], napi_int32_array, "Int32Array", -1, "NativeStitched.prefill: tokens", "");
  const int64_t T = int64_t(tk.ElementLength()), V = core->config().V;
  Napi::TypedArray out = typed(env, info[3], napi_float32_array, "Float32Array", V, "NativeStitched.prefill: out", "V", true);
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(info[0]));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "prefill", [=] { core->prefill(*cache, slot, p_tk, T, p_out); }, nullptr, std::move(pins), this, cw);
}

Napi::Value StitchedWrap::Decode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<StitchedModel> core = this->core(env, "decode");
  CacheWrap* cw = cache_arg(env, info[0], "decode");
  std::shared_ptr<StitchedCache> cache = cw->use(env, "decode", id_);
  Napi::TypedArray sl = typed(env, info[1], napi_int32_array, "Int32Array", -1, "NativeStitched.decode: slots", "");
  const int64_t R = int64_t(sl.ElementLength()), V = core->config().V;
  Napi::TypedArray tk = typed(env, info[2], napi_int32_array, "Int32Array", R, "NativeStitched.decode: tokens", "slots.length");
  Napi::TypedArray out = typed(env, info[3], napi_float32_array, "Float32Array", R * V, "NativeStitched.decode: out", "slots.length*V", true);
  const int32_t* p_sl = data_of<int32_t>(sl);
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(info[0]));
  pins.push_back(pin(sl));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "decode", [=] { core->decode(*cache, p_sl, p_tk, R, p_out); }, nullptr, std::move(pins), this, cw);
}

Napi::Value StitchedCreate(const Napi::CallbackInfo& info) {
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  Napi::Env env = info.Env();
  std::vector<napi_value> args;
  for (size_t i = 0; i < 6; i++) args.push_back(i < info.Length() ? napi_value(info[i]) : napi_value(i == 5 ? env.Null() : env.Undefined()));
  return ctors->model.New(args);
}

}  // namespace

namespace bts {
// Adds stitchedCreate to the addon's exports (called once per environment from Init).
void register_stitched(Napi::Env env, Napi::Object exports) {
  Ctors* ctors = new Ctors();
  ctors->model = Napi::Persistent(StitchedWrap::Define(env, ctors));
  ctors->cache = Napi::Persistent(CacheWrap::Define(env, ctors));
  env.AddCleanupHook([ctors] {
    ctors->model.SuppressDestruct();
    ctors->cache.SuppressDestruct();
    delete ctors;
  });
  exports.Set("stitchedCreate", Napi::Function::New(env, StitchedCreate, "stitchedCreate", ctors));
}
}  // namespace bts

#endif  // BTS_ONLY_OPS_BUILD
