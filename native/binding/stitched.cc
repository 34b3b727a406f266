// stitched.cc: the Node-API face of the native stitched model (native/engine/stitched.h). Thin like
// engine.cc: it turns JS values into pointers (checking every typed array's type and length against
// the config, since the model only sees raw pointers), keeps the arrays alive, queues the long calls
// on libuv workers (AsyncWorker -> Promise) and maps bts::Error codes to JS errors carrying `code`.
// The model validates everything else (spec, token ids, slots, capacity) before computing.
//
// Exports (registered by register_stitched, called from addon.cc's Init):
//   stitchedCreate(config, hub, experts, spec, weights, grads) -> NativeStitched (see
//   lib/engine/stitched-native.ts)
// Lifetimes (as engine.cc): a NativeStitched holds references to every typed array (and mapping) it
// was given; each
// async call pins the model object, the cache object and its own arrays until it settles. dispose()
// frees the workspaces and drops the references; with calls in flight the release happens when the
// last one settles (later calls throw E_DISPOSED at once). A cache accepts one prefill/decode at a
// time; reset/truncate are refused while one is pending.
//
// Hub and expert weights are taken as engine.cc takes a model's: Float32Array, Uint16Array (bf16
// bits) or mapped tensors ({file, offset, dtype, length} from mapFile; the model shares the mappings).
// The config parser, the weight binder, the argument checks, the worker and the cache face are those
// of llama_args.h, shared with engine.cc; the spec parser is stitched_args.h's, shared with the CUDA
// engine's binding. Stitch tensors and their gradients are Float32Arrays.
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
#include "llama_args.h"
#include "stitched_args.h"

namespace {

using bts::engine::LlamaConfig;
using bts::engine::StitchedCache;
using bts::engine::StitchedModel;
using bts::engine::TensorSpec;

using namespace bts::napi;

// ---------------------------------------------------------------------------------------------------

class StitchedWrap;

// new NativeStitchedCache(model, slots, capacity): made by NativeStitched.createCache.
struct StitchedCacheTraits {
  static constexpr const char* kClass = "NativeStitchedCache";
  static constexpr const char* kModel = "NativeStitched";
  static std::shared_ptr<StitchedCache> make(const Napi::CallbackInfo& info, uint64_t* owner);
};
using StitchedCacheWrap = CacheWrap<StitchedCache, StitchedCacheTraits>;

struct Ctors {
  Napi::FunctionReference model, cache;
};

class StitchedWrap : public Napi::ObjectWrap<StitchedWrap> {
 public:
  static constexpr const char* kClass = "NativeStitched";
  using CacheWrapT = StitchedCacheWrap;
  // Every method through guarded(): a C++ exception never escapes into Node-API.
  template <Napi::Value (StitchedWrap::*M)(const Napi::CallbackInfo&)>
  Napi::Value Safe(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), kClass, [&] { return (this->*M)(info); });
  }

  static Napi::Function Define(Napi::Env env, Ctors* ctors) {
    return DefineClass(env, kClass,
                       model_methods<StitchedWrap>({InstanceMethod<&StitchedWrap::Safe<&StitchedWrap::ForwardBackward>>("forwardBackward"),
                                                    InstanceMethod<&StitchedWrap::Safe<&StitchedWrap::Gates>>("gates")}),
                       ctors);
  }
  explicit StitchedWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<StitchedWrap>(info) {
    guarded(info.Env(), "stitchedCreate", [&] { Init(info); });
  }
  void Init(const Napi::CallbackInfo& info);  // the constructor's body

  const std::shared_ptr<StitchedModel>& core(Napi::Env env, const char* method) const {
    return life_.core(env, kClass, method, "the stitched model");
  }
  uint64_t id() const { return id_; }
  StitchedCacheWrap* cache_arg(Napi::Env env, const Napi::Value& v, const char* method);
  int64_t models() const { return models_; }
  void begin_call() { life_.begin_call(); }
  void end_call() { life_.end_call(); }

  // The JS methods (public: llama_args.h model_methods() lists them).
  Napi::Value ForwardBackward(const Napi::CallbackInfo& info);
  Napi::Value Loss(const Napi::CallbackInfo& info) { return call_loss(this, info); }
  Napi::Value Logits(const Napi::CallbackInfo& info) { return call_logits(this, info); }
  Napi::Value CreateCache(const Napi::CallbackInfo& info);
  Napi::Value Prefill(const Napi::CallbackInfo& info) { return call_prefill(this, info); }
  Napi::Value Decode(const Napi::CallbackInfo& info) { return call_decode(this, info); }
  Napi::Value Gates(const Napi::CallbackInfo& info);
  Napi::Value WorkspaceBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(core(info.Env(), "workspaceBytes")->workspace_bytes()));
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    life_.dispose();  // later calls throw E_DISPOSED; freed when no call is in flight
    return info.Env().Undefined();
  }

 private:
  Ctors* ctors_;
  uint64_t id_ = 0;
  int64_t models_ = 0, K_ = 0;
  ModelLife<StitchedModel> life_;  // the model; typed arrays of weights and grads, mappings, bf16 norm copies
};

std::shared_ptr<StitchedCache> StitchedCacheTraits::make(const Napi::CallbackInfo& info, uint64_t* owner) {
  Napi::Env env = info.Env();
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  if (info.Length() < 3 || !info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(ctors->model.Value()))
    throw make_error(env, "E_ARGUMENT", "NativeStitchedCache: made by NativeStitched.createCache(slots, capacity)");
  StitchedWrap* model = StitchedWrap::Unwrap(info[0].As<Napi::Object>());
  const std::shared_ptr<StitchedModel>& core = model->core(env, "createCache");
  const int64_t slots = int_arg(env, info[1], "NativeStitched.createCache: slots", 1, int64_t(1) << 20);
  const int64_t cap = int_arg(env, info[2], "NativeStitched.createCache: capacity", 1, int64_t(1) << 31);
  *owner = model->id();
  return std::make_shared<StitchedCache>(core->config(), model->models(), slots, cap);
}

// ---- NativeStitched

// new NativeStitched(config, hub, experts, spec, weights, grads)
void StitchedWrap::Init(const Napi::CallbackInfo& info) {
  static uint64_t next_id = 1;  // JS thread only
  Napi::Env env = info.Env();
  ctors_ = static_cast<Ctors*>(info.Data());
  id_ = next_id++;
  Keepalive& keep = life_.keep();
  const LlamaConfig c = parse_llama_config(env, info[0], "stitchedCreate");
  const std::vector<TensorSpec> specs = bts::engine::tensor_specs(c);

  // spec
  const bts::engine::StitchSpec spec = parse_stitch_spec(env, info[3], c.L, "stitchedCreate");
  const int64_t K = int64_t(spec.stitches.size());

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
  using Slot = bts::engine::StitchTensor;  // the format's table (stitched.h)
  const std::vector<Slot> slots = bts::engine::stitch_tensors(D, n, K);
  auto find_slot = [&](const std::string& name) -> const Slot* {
    for (const Slot& s : slots)
      if (s.name == name) return &s;
    return nullptr;
  };
  // An object of stitch tensors by name (`what`: "weights" or "grads"), names checked.
  auto stitch_object = [&](const Napi::Value& v, const char* what, const char* form) {
    if (!v.IsObject() || v.IsArray() || v.IsTypedArray())
      throw make_error(env, "E_ARGUMENT", std::string("stitchedCreate: ") + what + " must be " + form + " by stitch tensor name, got " + describe(v));
    Napi::Object o = v.As<Napi::Object>();
    Napi::Array keys = o.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); i++) {
      const std::string name = keys.Get(i).ToString().Utf8Value();
      if (!find_slot(name))
        throw make_error(env, "E_ARGUMENT", std::string("stitchedCreate: ") + what + " has '" + name + "', not a stitch tensor of " + std::to_string(K) +
                                                " stitches and " + std::to_string(n) + " experts (stitch.{k}.proj.{e}.weight, stitch.{k}.gate.weight)");
    }
    return o;
  };
  // The Float32Array of slot s in `o` (null when absent), kept alive.
  auto stitch_tensor = [&](const Napi::Object& o, const char* what, const Slot& s) -> float* {
    Napi::Value t = o.Get(s.name);
    if (t.IsUndefined() || t.IsNull()) return nullptr;
    Napi::TypedArray a = typed(env, t, napi_float32_array, "Float32Array", s.numel, std::string("stitchedCreate: ") + what + "['" + s.name + "']",
                               s.e < 0 ? "D*(n+1)*D" : "D*D");
    keep.refs.push_back(pin(a));
    return data_of<float>(a);
  };
  bts::engine::StitchWeights sw;
  sw.proj.assign(size_t(K), std::vector<const float*>(size_t(n), nullptr));
  sw.gate.assign(size_t(K), nullptr);
  const Napi::Object wo = stitch_object(info[4], "weights", "an object of Float32Arrays");
  for (const Slot& s : slots) {
    const float* p = stitch_tensor(wo, "weights", s);
    if (!p) throw make_error(env, "E_ARGUMENT", "stitchedCreate: stitch tensor '" + s.name + "' is missing");
    (s.e < 0 ? sw.gate[size_t(s.k)] : sw.proj[size_t(s.k)][size_t(s.e)]) = p;
  }
  bts::engine::StitchGrads sg;
  bool have_grads = false;
  Napi::Value gv = info.Length() > 5 ? info[5] : env.Null();
  if (!gv.IsNull() && !gv.IsUndefined()) {
    const Napi::Object go = stitch_object(gv, "grads", "null or an object of Float32Arrays");
    sg.proj.assign(size_t(K), std::vector<float*>(size_t(n), nullptr));
    sg.gate.assign(size_t(K), nullptr);
    for (const Slot& s : slots) {
      float* p = stitch_tensor(go, "grads", s);  // null: a frozen tensor
      (s.e < 0 ? sg.gate[size_t(s.k)] : sg.proj[size_t(s.k)][size_t(s.e)]) = p;
      have_grads = have_grads || p;
    }
  }

  // models
  const bts::engine::ModelWeights hub = bind_llama_weights(env, info[1], c, specs, "stitchedCreate", "hub", keep, nullptr);
  std::vector<bts::engine::ModelWeights> experts;
  for (int64_t e = 0; e < n; e++)
    experts.push_back(bind_llama_weights(env, ea.Get(uint32_t(e)), c, specs, "stitchedCreate", "experts[" + std::to_string(e) + "]", keep, nullptr));

  life_.set(guarded(env, "stitchedCreate", [&] {
    return std::make_shared<StitchedModel>(c, hub, experts, spec, sw, have_grads ? &sg : nullptr);
  }));
}

StitchedCacheWrap* StitchedWrap::cache_arg(Napi::Env env, const Napi::Value& v, const char* method) {
  return cache_of<StitchedWrap>(env, ctors_->cache, v, method);
}

Napi::Value StitchedWrap::ForwardBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<StitchedModel> core = this->core(env, "forwardBackward");
  TrainArgs a = train_args(info, kClass);
  const double seedd = info.Length() > 5 && !info[5].IsUndefined() ? num_arg(env, info[5], "NativeStitched.forwardBackward: seed") : 0.0;
  if (seedd < 0 || seedd != std::floor(seedd) || seedd > 9007199254740991.0)
    throw make_error(env, "E_ARGUMENT", "NativeStitched.forwardBackward: seed must be an integer in [0, 2^53), got " + num_str(seedd));
  const uint64_t seed = uint64_t(seedd);
  if (!core->trainable())
    throw make_error(env, "E_ARGUMENT", "NativeStitched.forwardBackward: the stitched model was created without gradient buffers (frozen stitches); pass grads to stitchedCreate to train");
  const int32_t* p_in = a.inputs;
  const int32_t* p_tg = a.targets;
  const int64_t B = a.B, T = a.T;
  const float scale = a.grad_scale;
  auto result = std::make_shared<StitchedModel::Loss>();
  return queue(env, "forwardBackward", [=] { *result = core->forward_backward(p_in, p_tg, B, T, scale, seed); },
               [result](Napi::Env e) { return loss_value(e, *result); }, std::move(a.pins), this, nullptr);
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
  ctors->cache = Napi::Persistent(StitchedCacheWrap::Define(env, ctors));
  env.AddCleanupHook([ctors] {
    ctors->model.SuppressDestruct();
    ctors->cache.SuppressDestruct();
    delete ctors;
  });
  exports.Set("stitchedCreate", Napi::Function::New(env, StitchedCreate, "stitchedCreate", ctors));
}
}  // namespace bts

#endif  // BTS_ONLY_OPS_BUILD
