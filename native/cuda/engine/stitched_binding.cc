// cuda/engine/stitched_binding.cc: the Node-API face of the CUDA stitched model (stitched_cuda.h) in the
// CUDA addons (bts_cuda.node, bts_cuda_emu.node). Thin, and built from the CPU bindings' own pieces:
// the config parser, weight binder, argument checks, AsyncWorker and lifetimes of llama_args.h and
// the spec parser of stitched_args.h, so stitchedCreate here accepts what the CPU addon's does and
// errors read the same (class name CudaStitched). Everything is checked on the JS thread before a
// worker is queued; every call that runs kernels or copies is an AsyncWorker -> Promise.
//
// Exports (registered by register_stitched, called from native/cuda/binding.cc's Init):
//   stitchedCreate(config, hub, experts, spec, weights, options?) -> CudaStitched
//     hub, experts[e]: Float32Array by HF name (every tensor of the config), COPIED to the device;
//     spec: {stitches, expertStream, hubBias, gateDropout} (as the CPU addon);
//     weights: every stitch tensor (stitch.{k}.proj.{e}.weight, stitch.{k}.gate.weight) as a
//              Float32Array, COPIED to the device;
//     options: { grads?: boolean | string[] }  true: a gradient for every stitch tensor; a list: for
//              those names; false / absent: frozen.
//   CudaStitched: forwardBackward(inputs, targets, B, T, gradScale, seed), loss, logits, gates(tokens,
//              out), createCache(slots, capacity), prefill(cache, slot, tokens, out), decode(cache,
//              slots, tokens, out) (as NativeStitched, through llama_args.h's call_prefill /
//              call_decode), uploadWeights(obj), downloadWeights(obj), downloadGrads(obj),
//              uploadGrads(obj) (obj: Float32Arrays by stitch tensor name, a subset), zeroGrads(),
//              adamwStep({lr, beta1, beta2, eps, weightDecay, maxGradNorm, step}) -> gradNorm (the
//              device optimizer over every stitch tensor with a gradient), uploadMoments(m, v),
//              downloadMoments(m, v) (all Promises), gradNames(), workspaceBytes(), deviceBytes(),
//              device, dispose().
//   CudaStitchedCache: length, reset, truncate, slots, capacity, byteLength, dispose (as
//              NativeStitchedCache: one device KV cache per model, advanced together).
// Not here: bf16 weights (E_UNSUPPORTED from the engine); mapped weights (E_UNSUPPORTED, as llamaCreate).
#include <napi.h>

#if defined(BTS_CUDA_EMULATOR)
#include "../../emu/emu.h"
#endif

#include <atomic>
#include <cmath>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "../../binding/llama_args.h"
#include "../../binding/stitched_args.h"
#include "binding.h"
#include "device_calls.h"
#include "stitched_cuda.h"

namespace {

using bts::cuda::engine::CudaStitchedModel;
using bts::cuda::engine::DeviceStitchedCache;
using bts::engine::LlamaConfig;
using bts::engine::StitchTensor;
using bts::engine::TensorSpec;
using namespace bts::napi;

struct Ctors {
  Napi::FunctionReference model, cache;
};

// new CudaStitchedCache(model, slots, capacity): made by CudaStitched.createCache.
struct CacheTraits {
  static constexpr const char* kClass = "CudaStitchedCache";
  static constexpr const char* kModel = "CudaStitched";
  static std::shared_ptr<DeviceStitchedCache> make(const Napi::CallbackInfo& info, uint64_t* owner);
};
using CudaStitchedCacheWrap = CacheWrap<DeviceStitchedCache, CacheTraits>;

class CudaStitchedWrap : public Napi::ObjectWrap<CudaStitchedWrap> {
 public:
  static constexpr const char* kClass = "CudaStitched";
  using CacheWrapT = CudaStitchedCacheWrap;
  template <Napi::Value (CudaStitchedWrap::*M)(const Napi::CallbackInfo&)>
  Napi::Value Safe(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), kClass, [&] { return (this->*M)(info); });
  }

  static Napi::Function Define(Napi::Env env, Ctors* ctors) {
    using W = CudaStitchedWrap;
    return DefineClass(env, kClass,
                       model_methods<W>({InstanceMethod<&W::Safe<&W::ForwardBackward>>("forwardBackward"),
                                         InstanceMethod<&W::Safe<&W::Gates>>("gates"),
                                         InstanceMethod<&W::Safe<&W::UploadWeights>>("uploadWeights"),
                                         InstanceMethod<&W::Safe<&W::DownloadWeights>>("downloadWeights"),
                                         InstanceMethod<&W::Safe<&W::DownloadGrads>>("downloadGrads"),
                                         InstanceMethod<&W::Safe<&W::UploadGrads>>("uploadGrads"),
                                         InstanceMethod<&W::Safe<&W::ZeroGrads>>("zeroGrads"),
                                         InstanceMethod<&W::Safe<&W::AdamwStep>>("adamwStep"),
                                         InstanceMethod<&W::Safe<&W::UploadMoments>>("uploadMoments"),
                                         InstanceMethod<&W::Safe<&W::DownloadMoments>>("downloadMoments"),
                                         InstanceMethod<&W::Safe<&W::GradNames>>("gradNames"),
                                         InstanceMethod<&W::Safe<&W::DeviceBytes>>("deviceBytes"),
                                         InstanceAccessor<&W::Safe<&W::Device>>("device")}),
                       ctors);
  }

  explicit CudaStitchedWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CudaStitchedWrap>(info) {
    guarded(info.Env(), "stitchedCreate", [&] { Init(info); });
  }
  uint64_t id() const { return id_; }
  CudaStitchedCacheWrap* cache_arg(Napi::Env env, const Napi::Value& v, const char* method) {
    return cache_of<CudaStitchedWrap>(env, ctors_->cache, v, method);
  }
  void Init(const Napi::CallbackInfo& info);

  const std::shared_ptr<CudaStitchedModel>& core(Napi::Env env, const char* method) const {
    return life_.core(env, kClass, method, "the stitched model");
  }
  void begin_call() { life_.begin_call(); }
  void end_call() { life_.end_call(); }

  Napi::Value ForwardBackward(const Napi::CallbackInfo& info);
  Napi::Value Loss(const Napi::CallbackInfo& info) { return call_loss(this, info); }
  Napi::Value Logits(const Napi::CallbackInfo& info) { return call_logits(this, info); }
  Napi::Value Gates(const Napi::CallbackInfo& info);
  Napi::Value CreateCache(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    core(env, "createCache");
    return ctors_->cache.New({info.This(), info.Length() > 0 ? info[0] : env.Undefined(), info.Length() > 1 ? info[1] : env.Undefined()});
  }
  Napi::Value Prefill(const Napi::CallbackInfo& info) { return call_prefill(this, info); }
  Napi::Value Decode(const Napi::CallbackInfo& info) { return call_decode(this, info); }
  Napi::Value UploadWeights(const Napi::CallbackInfo& info) { return tensors_call(info, "uploadWeights"); }
  Napi::Value DownloadWeights(const Napi::CallbackInfo& info) { return tensors_call(info, "downloadWeights"); }
  Napi::Value DownloadGrads(const Napi::CallbackInfo& info) { return tensors_call(info, "downloadGrads"); }
  Napi::Value UploadGrads(const Napi::CallbackInfo& info) { return tensors_call(info, "uploadGrads"); }
  Napi::Value AdamwStep(const Napi::CallbackInfo& info) {
    return bts::cuda::adamw_step_call(this, info, "the stitched model was created without gradient buffers (frozen stitches); pass { grads: true } to stitchedCreate to train");
  }
  Napi::Value UploadMoments(const Napi::CallbackInfo& info) { return bts::cuda::moments_call(this, info, true); }
  Napi::Value DownloadMoments(const Napi::CallbackInfo& info) { return bts::cuda::moments_call(this, info, false); }
  Napi::Value ZeroGrads(const Napi::CallbackInfo& info) { return bts::cuda::zero_grads_call(this, info); }
  Napi::Value GradNames(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::shared_ptr<CudaStitchedModel>& m = core(env, "gradNames");
    Napi::Array a = Napi::Array::New(env);
    uint32_t i = 0;
    for (const StitchTensor& t : m->tensors())
      if (m->has_grad(t.name)) a.Set(i++, t.name);
    return a;
  }
  Napi::Value WorkspaceBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(core(info.Env(), "workspaceBytes")->workspace_bytes()));
  }
  Napi::Value DeviceBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(core(info.Env(), "deviceBytes")->device_bytes()));
  }
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), device_); }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    life_.dispose();  // later calls throw E_DISPOSED; device memory freed when no call is in flight
    return info.Env().Undefined();
  }

  // The Float32Arrays of obj by stitch tensor name, each of its tensor's numel (and, with `trained`,
  // with a gradient), pinned into `pins`; E_ARGUMENT / E_SHAPE naming the method `m` (device_calls.h).
  std::vector<CudaStitchedModel::HostTensor> host_tensors(Napi::Env env, const Napi::Value& v, const std::string& m,
                                                          const CudaStitchedModel& model, bool trained,
                                                          std::vector<Napi::ObjectReference>& pins);

 private:
  Napi::Value tensors_call(const Napi::CallbackInfo& info, const char* method);

  Ctors* ctors_ = nullptr;
  uint64_t id_ = 0;
  int device_ = 0;
  int64_t K_ = 0, M_ = 0;
  ModelLife<CudaStitchedModel> life_;  // the engine (weights live on the device: nothing else to keep)
};

std::shared_ptr<DeviceStitchedCache> CacheTraits::make(const Napi::CallbackInfo& info, uint64_t* owner) {
  Napi::Env env = info.Env();
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  if (info.Length() < 3 || !info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(ctors->model.Value()))
    throw make_error(env, "E_ARGUMENT", "CudaStitchedCache: made by CudaStitched.createCache(slots, capacity)");
  CudaStitchedWrap* model = CudaStitchedWrap::Unwrap(info[0].As<Napi::Object>());
  const std::shared_ptr<CudaStitchedModel>& core = model->core(env, "createCache");
  const int64_t slots = int_arg(env, info[1], "CudaStitched.createCache: slots", 1, int64_t(1) << 20);
  const int64_t cap = int_arg(env, info[2], "CudaStitched.createCache: capacity", 1, int64_t(1) << 31);
  *owner = model->id();
  return core->create_cache(slots, cap);
}

// new CudaStitched(config, hub, experts, spec, weights, options)
void CudaStitchedWrap::Init(const Napi::CallbackInfo& info) {
  static std::atomic<uint64_t> next_id{1};
  Napi::Env env = info.Env();
  ctors_ = static_cast<Ctors*>(info.Data());
  id_ = next_id++;
  const char* who = "stitchedCreate";
  const LlamaConfig c = parse_llama_config(env, info[0], who);
  const std::vector<TensorSpec> specs = bts::engine::tensor_specs(c);
  const bts::engine::StitchSpec spec = parse_stitch_spec(env, info[3], c.L, who);
  const int64_t K = int64_t(spec.stitches.size());

  if (!info[2].IsArray()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: experts must be an array of weight objects, got " + describe(info[2]));
  Napi::Array ea = info[2].As<Napi::Array>();
  const int64_t n = int64_t(ea.Length());
  if (n < 1) throw make_error(env, "E_ARGUMENT", "stitchedCreate: experts must hold at least one expert");
  if (n > 4096) throw make_error(env, "E_ARGUMENT", "stitchedCreate: at most 4096 experts, got " + std::to_string(n));
  K_ = K;
  M_ = n + 1;
  const std::vector<StitchTensor> tensors = bts::engine::stitch_tensors(c.D, n, K);
  auto known = [&](const std::string& name) {
    for (const StitchTensor& t : tensors)
      if (t.name == name) return true;
    return false;
  };
  const std::string table = std::to_string(K) + " stitches and " + std::to_string(n) + " experts (stitch.{k}.proj.{e}.weight, stitch.{k}.gate.weight)";

  // stitch weights: every tensor, a Float32Array of its numel
  Napi::Value wv = info[4];
  if (!wv.IsObject() || wv.IsArray() || wv.IsTypedArray())
    throw make_error(env, "E_ARGUMENT", "stitchedCreate: weights must be an object of Float32Arrays by stitch tensor name, got " + describe(wv));
  Napi::Object wo = wv.As<Napi::Object>();
  Napi::Array keys = wo.GetPropertyNames();
  for (uint32_t i = 0; i < keys.Length(); i++) {
    const std::string name = keys.Get(i).ToString().Utf8Value();
    if (!known(name)) throw make_error(env, "E_ARGUMENT", "stitchedCreate: weights has '" + name + "', not a stitch tensor of " + table);
  }
  Keepalive keep;  // until the engine has copied everything to the device
  bts::engine::StitchWeights sw;
  sw.proj.assign(size_t(K), std::vector<const float*>(size_t(n), nullptr));
  sw.gate.assign(size_t(K), nullptr);
  for (const StitchTensor& t : tensors) {
    Napi::Value x = wo.Get(t.name);
    if (x.IsUndefined() || x.IsNull()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: stitch tensor '" + t.name + "' is missing");
    Napi::TypedArray a = typed(env, x, napi_float32_array, "Float32Array", t.numel, "stitchedCreate: weights['" + t.name + "']",
                               t.e < 0 ? "D*(n+1)*D" : "D*D");
    keep.refs.push_back(pin(a));
    (t.e < 0 ? sw.gate[size_t(t.k)] : sw.proj[size_t(t.k)][size_t(t.e)]) = data_of<float>(a);
  }

  // options.grads: true (every stitch tensor), a list of names, or false / absent (frozen)
  std::set<std::string> trained;
  Napi::Value ov = info.Length() > 5 ? info[5] : env.Undefined();
  if (!ov.IsNull() && !ov.IsUndefined()) {
    if (!ov.IsObject() || ov.IsArray() || ov.IsTypedArray())
      throw make_error(env, "E_ARGUMENT", "stitchedCreate: options must be an object ({ grads?: boolean | string[] }), got " + describe(ov));
    Napi::Value g = ov.As<Napi::Object>().Get("grads");
    if (g.IsBoolean()) {
      if (g.As<Napi::Boolean>().Value())
        for (const StitchTensor& t : tensors) trained.insert(t.name);
    } else if (g.IsArray()) {
      Napi::Array a = g.As<Napi::Array>();
      for (uint32_t i = 0; i < a.Length(); i++) {
        Napi::Value x = a.Get(i);
        if (!x.IsString()) throw make_error(env, "E_ARGUMENT", "stitchedCreate: options.grads[" + std::to_string(i) + "] must be a stitch tensor name, got " + describe(x));
        const std::string name = x.As<Napi::String>().Utf8Value();
        if (!known(name)) throw make_error(env, "E_ARGUMENT", "stitchedCreate: options.grads has '" + name + "', not a stitch tensor of " + table);
        trained.insert(name);
      }
    } else if (!g.IsUndefined() && !g.IsNull()) {
      throw make_error(env, "E_ARGUMENT", "stitchedCreate: options.grads must be a boolean or an array of stitch tensor names, got " + describe(g));
    }
  }

  // models: checked and bound by the CPU binding's binder (lengths, names, dtypes)
  const bts::engine::ModelWeights hub = bind_llama_weights(env, info[1], c, specs, who, "hub", keep, nullptr);
  std::vector<bts::engine::ModelWeights> experts;
  for (int64_t e = 0; e < n; e++)
    experts.push_back(bind_llama_weights(env, ea.Get(uint32_t(e)), c, specs, who, "experts[" + std::to_string(e) + "]", keep, nullptr));

  device_ = guarded(env, who, [] { return bts::cuda::addon_device(); });
  life_.set(guarded(env, who, [&] { return std::make_shared<CudaStitchedModel>(c, hub, experts, spec, sw, &trained, device_); }));
}

Napi::Value CudaStitchedWrap::ForwardBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaStitchedModel> m = core(env, "forwardBackward");
  TrainArgs a = train_args(info, kClass);
  const double seedd = info.Length() > 5 && !info[5].IsUndefined() ? num_arg(env, info[5], "CudaStitched.forwardBackward: seed") : 0.0;
  if (seedd < 0 || seedd != std::floor(seedd) || seedd > 9007199254740991.0)
    throw make_error(env, "E_ARGUMENT", "CudaStitched.forwardBackward: seed must be an integer in [0, 2^53), got " + num_str(seedd));
  const uint64_t seed = uint64_t(seedd);
  if (!m->trainable())
    throw make_error(env, "E_ARGUMENT", "CudaStitched.forwardBackward: the stitched model was created without gradient buffers (frozen stitches); pass { grads: true } to stitchedCreate to train");
  const int32_t* p_in = a.inputs;
  const int32_t* p_tg = a.targets;
  const int64_t B = a.B, T = a.T;
  const float scale = a.grad_scale;
  auto result = std::make_shared<CudaStitchedModel::Loss>();
  return queue(env, "forwardBackward", [=] { *result = m->forward_backward(p_in, p_tg, B, T, scale, seed); },
               [result](Napi::Env e) { return loss_value(e, *result); }, std::move(a.pins), this, nullptr);
}

Napi::Value CudaStitchedWrap::Gates(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaStitchedModel> m = core(env, "gates");
  Napi::TypedArray tk = typed(env, info[0], napi_int32_array, "Int32Array", -1, "CudaStitched.gates: tokens", "");
  const int64_t T = int64_t(tk.ElementLength());
  Napi::TypedArray out = typed(env, info[1], napi_float32_array, "Float32Array", K_ * T * M_, "CudaStitched.gates: out", "K*T*(n+1)");
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "gates", [=] { m->gates(p_tk, T, p_out); }, nullptr, std::move(pins), this, nullptr);
}

std::vector<CudaStitchedModel::HostTensor> CudaStitchedWrap::host_tensors(Napi::Env env, const Napi::Value& v, const std::string& m,
                                                                          const CudaStitchedModel& model, bool trained,
                                                                          std::vector<Napi::ObjectReference>& pins) {
  auto numel_of = [&](const std::string& name) -> int64_t {
    for (const StitchTensor& x : model.tensors())
      if (x.name == name) return x.numel;
    return -1;
  };
  auto unknown = [&](const std::string&) {
    return "is not a stitch tensor of " + std::to_string(K_) + " stitches and " + std::to_string(M_ - 1) + " experts";
  };
  return bts::cuda::host_tensors(env, v, m, model, trained, pins, "stitch tensor name", "stitchedCreate", numel_of, unknown);
}

// uploadWeights / downloadWeights / downloadGrads / uploadGrads(obj): checked here; the copies run on
// a worker.
Napi::Value CudaStitchedWrap::tensors_call(const Napi::CallbackInfo& info, const char* method) {
  Napi::Env env = info.Env();
  const std::string m = std::string(kClass) + "." + method;
  std::shared_ptr<CudaStitchedModel> model = core(env, method);
  const std::string which = method;
  const bool grads = which == "downloadGrads" || which == "uploadGrads";
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  std::vector<CudaStitchedModel::HostTensor> ts = host_tensors(env, info.Length() > 0 ? info[0] : env.Undefined(), m, *model, grads, pins);
  auto work = [model, ts, which] {
    if (which == "uploadWeights") model->upload_weights(ts);
    else if (which == "downloadWeights") model->download_weights(ts);
    else if (which == "uploadGrads") model->upload_grads(ts);
    else model->download_grads(ts);
  };
  return queue(env, method, work, nullptr, std::move(pins), this, nullptr);
}

Napi::Value StitchedCreate(const Napi::CallbackInfo& info) {
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  Napi::Env env = info.Env();
  std::vector<napi_value> args;
  for (size_t i = 0; i < 6; i++) args.push_back(i < info.Length() ? napi_value(info[i]) : napi_value(env.Undefined()));
  return ctors->model.New(args);
}

}  // namespace

namespace bts {
namespace cuda {
void register_stitched(Napi::Env env, Napi::Object exports) {
  Ctors* ctors = new Ctors();
  ctors->model = Napi::Persistent(CudaStitchedWrap::Define(env, ctors));
  ctors->cache = Napi::Persistent(CudaStitchedCacheWrap::Define(env, ctors));
  env.AddCleanupHook([ctors] {
    ctors->model.SuppressDestruct();
    ctors->cache.SuppressDestruct();
    delete ctors;
  });
  exports.Set("stitchedCreate", Napi::Function::New(env, StitchedCreate, "stitchedCreate", ctors));
}
}  // namespace cuda
}  // namespace bts
