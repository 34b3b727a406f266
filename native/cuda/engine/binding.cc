// cuda/engine/binding.cc: the Node-API face of the CUDA Llama engine (llama_cuda.h) in the CUDA addons
// (bts_cuda.node, bts_cuda_emu.node). Thin, and built from the CPU engine binding's own pieces
// (native/binding/llama_args.h): the same config parser, weight binder, argument checks, AsyncWorker,
// lifetimes and KV-cache face, so the JS object behaves like the CPU addon's NativeLlama and errors
// read the same (with the class names CudaLlama / CudaKvCache).
//
// Exports (registered by register_llama, called from native/cuda/binding.cc's Init):
//   llamaCreate(config, weights, options?) -> CudaLlama
//     weights: Float32Array by HF name (every tensor of the config), COPIED to the device here (the
//              arrays are not referenced afterwards; uploadWeights replaces them later);
//     options: { grads?: boolean | string[] }  true: a gradient for every tensor; a list: for those
//              names; false / absent: frozen.
//   CudaLlama: forwardBackward, loss, logits, createCache, prefill, decode (as NativeLlama; every call
//              that runs kernels is an AsyncWorker -> Promise), uploadWeights(obj), downloadWeights(obj),
//              downloadGrads(obj) (obj: Float32Arrays by HF name, a subset), zeroGrads() (Promises),
//              adamwStep({lr, beta1, beta2, eps, weightDecay, maxGradNorm, step}) -> Promise<gradNorm>
//              (the device optimizer over every trained tensor), uploadMoments(m, v) and
//              downloadMoments(m, v) (m, v: Float32Arrays by HF name of trained tensors; Promises),
//              gradNames(), workspaceBytes(), deviceBytes(), device, dispose().
//   CudaKvCache: length, reset, truncate, slots, capacity, byteLength, dispose (as NativeKvCache).
// Not supported here (typed errors): bf16 weights (E_UNSUPPORTED from the engine), mapped weights
// ({file, offset, ...}: E_UNSUPPORTED; mapped files belong to the CPU addon).
#include <napi.h>

#if defined(BTS_CUDA_EMULATOR)
#include "../../emu/emu.h"
#endif

#include <atomic>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "../../binding/llama_args.h"
#include "binding.h"
#include "device_calls.h"
#include "llama_cuda.h"

// llama_args.h declares these for the CPU addon's mapped files (native/binding/engine.cc). The CUDA
// addon has no mapFile, so no Mapping is ever made here and a mapped weight is refused.
bts::napi::Mapping::~Mapping() {}
std::shared_ptr<bts::napi::Mapping> bts::napi::mapping_of(Napi::Env env, const Napi::Value&, const std::string& what) {
  throw make_error(env, "E_UNSUPPORTED", what + ": mapped weights are not supported by the CUDA engine; pass Float32Arrays");
}

namespace {

using bts::cuda::engine::CudaLlamaModel;
using bts::cuda::engine::DeviceKvCache;
using bts::engine::LlamaConfig;
using bts::engine::TensorSpec;
using namespace bts::napi;

struct Ctors {
  Napi::FunctionReference llama, cache;
};

struct CacheTraits {
  static constexpr const char* kClass = "CudaKvCache";
  static constexpr const char* kModel = "CudaLlama";
  static std::shared_ptr<DeviceKvCache> make(const Napi::CallbackInfo& info, uint64_t* owner);
};
using CudaCacheWrap = CacheWrap<DeviceKvCache, CacheTraits>;

class CudaLlamaWrap : public Napi::ObjectWrap<CudaLlamaWrap> {
 public:
  template <Napi::Value (CudaLlamaWrap::*M)(const Napi::CallbackInfo&)>
  Napi::Value Safe(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), kClass, [&] { return (this->*M)(info); });
  }

  static Napi::Function Define(Napi::Env env, Ctors* ctors) {
    using W = CudaLlamaWrap;
    return DefineClass(env, kClass,
                       model_methods<W>({InstanceMethod<&W::Safe<&W::ForwardBackward>>("forwardBackward"),
                                         InstanceMethod<&W::Safe<&W::UploadWeights>>("uploadWeights"),
                                         InstanceMethod<&W::Safe<&W::DownloadWeights>>("downloadWeights"),
                                         InstanceMethod<&W::Safe<&W::DownloadGrads>>("downloadGrads"),
                                         InstanceMethod<&W::Safe<&W::ZeroGrads>>("zeroGrads"),
                                         InstanceMethod<&W::Safe<&W::AdamwStep>>("adamwStep"),
                                         InstanceMethod<&W::Safe<&W::UploadMoments>>("uploadMoments"),
                                         InstanceMethod<&W::Safe<&W::DownloadMoments>>("downloadMoments"),
                                         InstanceMethod<&W::Safe<&W::GradNames>>("gradNames"),
                                         InstanceMethod<&W::Safe<&W::DeviceBytes>>("deviceBytes"),
                                         InstanceAccessor<&W::Safe<&W::Device>>("device")}),
                       ctors);
  }

  explicit CudaLlamaWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CudaLlamaWrap>(info) {
    guarded(info.Env(), "llamaCreate", [&] { Init(info); });
  }
  void Init(const Napi::CallbackInfo& info);

  static constexpr const char* kClass = "CudaLlama";
  using CacheWrapT = CudaCacheWrap;
  const std::shared_ptr<CudaLlamaModel>& core(Napi::Env env, const char* method) const {
    return life_.core(env, kClass, method, "the model");
  }
  uint64_t id() const { return id_; }
  CudaCacheWrap* cache_arg(Napi::Env env, const Napi::Value& v, const char* method) {
    return cache_of<CudaLlamaWrap>(env, ctors_->cache, v, method);
  }
  void begin_call() { life_.begin_call(); }
  void end_call() { life_.end_call(); }

  Napi::Value ForwardBackward(const Napi::CallbackInfo& info);
  Napi::Value Loss(const Napi::CallbackInfo& info) { return call_loss(this, info); }
  Napi::Value Logits(const Napi::CallbackInfo& info) { return call_logits(this, info); }
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
  Napi::Value ZeroGrads(const Napi::CallbackInfo& info) { return bts::cuda::zero_grads_call(this, info); }
  Napi::Value AdamwStep(const Napi::CallbackInfo& info) {
    return bts::cuda::adamw_step_call(this, info, "the model was created without gradient buffers (frozen); pass { grads: true } to llamaCreate to train");
  }
  Napi::Value UploadMoments(const Napi::CallbackInfo& info) { return bts::cuda::moments_call(this, info, true); }
  Napi::Value DownloadMoments(const Napi::CallbackInfo& info) { return bts::cuda::moments_call(this, info, false); }
  Napi::Value GradNames(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::shared_ptr<CudaLlamaModel>& m = core(env, "gradNames");
    Napi::Array a = Napi::Array::New(env);
    uint32_t k = 0;
    for (const TensorSpec& s : m->specs())
      if (m->has_grad(s.name)) a.Set(k++, s.name);
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

  // The Float32Arrays of obj by HF name, each checked against its tensor's numel (and, with
  // `trained`, against having a gradient), pinned into `pins` (device_calls.h).
  std::vector<CudaLlamaModel::HostTensor> host_tensors(Napi::Env env, const Napi::Value& v, const std::string& what,
                                                       const CudaLlamaModel& model, bool trained,
                                                       std::vector<Napi::ObjectReference>& pins);

 private:
  // uploadWeights / downloadWeights / downloadGrads(obj): Float32Arrays by HF name, each of its
  // tensor's numel, checked here; the copies run on a worker.
  Napi::Value tensors_call(const Napi::CallbackInfo& info, const char* method);

  Ctors* ctors_ = nullptr;
  uint64_t id_ = 0;
  int device_ = 0;
  ModelLife<CudaLlamaModel> life_;  // the engine (the weights live on the device: nothing else to keep)
};

std::shared_ptr<DeviceKvCache> CacheTraits::make(const Napi::CallbackInfo& info, uint64_t* owner) {
  Napi::Env env = info.Env();
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  if (info.Length() < 3 || !info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(ctors->llama.Value()))
    throw make_error(env, "E_ARGUMENT", "CudaKvCache: made by CudaLlama.createCache(slots, capacity)");
  CudaLlamaWrap* model = CudaLlamaWrap::Unwrap(info[0].As<Napi::Object>());
  const std::shared_ptr<CudaLlamaModel>& core = model->core(env, "createCache");
  const int64_t slots = int_arg(env, info[1], "createCache: slots", 1, int64_t(1) << 20);
  const int64_t cap = int_arg(env, info[2], "createCache: capacity", 1, int64_t(1) << 31);
  *owner = model->id();
  return core->create_cache(slots, cap);
}

void CudaLlamaWrap::Init(const Napi::CallbackInfo& info) {
  static std::atomic<uint64_t> next_id{1};
  Napi::Env env = info.Env();
  ctors_ = static_cast<Ctors*>(info.Data());
  id_ = next_id++;
  const LlamaConfig c = parse_llama_config(env, info[0], "llamaCreate");
  const std::vector<TensorSpec> specs = bts::engine::tensor_specs(c);

  // options.grads: true (every tensor), a list of names, or false / absent (frozen)
  std::set<std::string> trained;
  Napi::Value ov = info.Length() > 2 ? info[2] : env.Undefined();
  if (!ov.IsNull() && !ov.IsUndefined()) {
    if (!ov.IsObject() || ov.IsArray() || ov.IsTypedArray())
      throw make_error(env, "E_ARGUMENT", "llamaCreate: options must be an object ({ grads?: boolean | string[] }), got " + describe(ov));
    Napi::Value g = ov.As<Napi::Object>().Get("grads");
    if (g.IsBoolean()) {
      if (g.As<Napi::Boolean>().Value())
        for (const TensorSpec& s : specs) trained.insert(s.name);
    } else if (g.IsArray()) {
      Napi::Array a = g.As<Napi::Array>();
      for (uint32_t i = 0; i < a.Length(); i++) {
        Napi::Value n = a.Get(i);
        if (!n.IsString()) throw make_error(env, "E_ARGUMENT", "llamaCreate: options.grads[" + std::to_string(i) + "] must be a tensor name, got " + describe(n));
        const std::string name = n.As<Napi::String>().Utf8Value();
        bool known = false;
        for (const TensorSpec& s : specs) known = known || s.name == name;
        if (!known) throw make_error(env, "E_ARGUMENT", "llamaCreate: options.grads has '" + name + "', not a tensor of this config" + tensor_name_hint(c, name));
        trained.insert(name);
      }
    } else if (!g.IsUndefined() && !g.IsNull()) {
      throw make_error(env, "E_ARGUMENT", "llamaCreate: options.grads must be a boolean or an array of tensor names, got " + describe(g));
    }
  }

  // weights: checked and bound by the CPU binding's binder (lengths, names, dtypes); kept alive only
  // until the engine has copied them to the device.
  Keepalive keep;
  const bts::engine::ModelWeights mw =
      bind_llama_weights(env, info.Length() > 1 ? info[1] : env.Undefined(), c, specs, "llamaCreate", "weights", keep, &trained);
  device_ = guarded(env, "llamaCreate", [] { return bts::cuda::addon_device(); });
  life_.set(guarded(env, "llamaCreate", [&] { return std::make_shared<CudaLlamaModel>(c, mw, &trained, device_); }));
}

Napi::Value CudaLlamaWrap::ForwardBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CudaLlamaModel> m = core(env, "forwardBackward");
  TrainArgs a = train_args(info, kClass);
  if (!m->trainable())
    throw make_error(env, "E_ARGUMENT", "CudaLlama.forwardBackward: the model was created without gradient buffers (frozen); pass { grads: true } to llamaCreate to train");
  const int32_t* p_in = a.inputs;
  const int32_t* p_tg = a.targets;
  const int64_t B = a.B, T = a.T;
  const float scale = a.grad_scale;
  auto result = std::make_shared<CudaLlamaModel::Loss>();
  return queue(env, "forwardBackward", [=] { *result = m->forward_backward(p_in, p_tg, B, T, scale); },
               [result](Napi::Env e) { return loss_value(e, *result); }, std::move(a.pins), this, nullptr);
}

std::vector<CudaLlamaModel::HostTensor> CudaLlamaWrap::host_tensors(Napi::Env env, const Napi::Value& v, const std::string& m,
                                                                    const CudaLlamaModel& model, bool trained,
                                                                    std::vector<Napi::ObjectReference>& pins) {
  auto numel_of = [&](const std::string& name) -> int64_t {
    for (const TensorSpec& x : model.specs())
      if (x.name == name) return x.numel;
    return -1;
  };
  auto unknown = [&](const std::string& name) { return "is not a tensor of this config" + tensor_name_hint(model.config(), name); };
  return bts::cuda::host_tensors(env, v, m, model, trained, pins, "HF name", "llamaCreate", numel_of, unknown);
}

Napi::Value CudaLlamaWrap::tensors_call(const Napi::CallbackInfo& info, const char* method) {
  Napi::Env env = info.Env();
  const std::string m = std::string(kClass) + "." + method;
  std::shared_ptr<CudaLlamaModel> model = core(env, method);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  const bool grads = std::string(method) == "downloadGrads";
  std::vector<CudaLlamaModel::HostTensor> ts = host_tensors(env, info.Length() > 0 ? info[0] : env.Undefined(), m, *model, grads, pins);
  const std::string which = method;
  auto work = [model, ts, which] {
    if (which == "uploadWeights") model->upload_weights(ts);
    else if (which == "downloadWeights") model->download_weights(ts);
    else model->download_grads(ts);
  };
  return queue(env, method, work, nullptr, std::move(pins), this, nullptr);
}

}  // namespace

void bts::cuda::parse_adamw_hyper(Napi::Env env, const Napi::Value& v, const std::string& m, engine::AdamWHyper* out) {
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray())
    throw make_error(env, "E_ARGUMENT", m + ": expected { lr, beta1, beta2, eps, weightDecay, maxGradNorm, step }, got " + describe(v));
  Napi::Object o = v.As<Napi::Object>();
  engine::AdamWHyper& s = *out;
  s.lr = float(num_arg(env, o.Get("lr"), m + ": lr"));
  s.beta1 = float(num_arg(env, o.Get("beta1"), m + ": beta1"));
  s.beta2 = float(num_arg(env, o.Get("beta2"), m + ": beta2"));
  s.eps = float(num_arg(env, o.Get("eps"), m + ": eps"));
  s.weight_decay = float(num_arg(env, o.Get("weightDecay"), m + ": weightDecay"));
  s.max_grad_norm = float(num_arg(env, o.Get("maxGradNorm"), m + ": maxGradNorm"));
  s.step = int_arg(env, o.Get("step"), m + ": step", 1, int64_t(1) << 52);
}

namespace {

Napi::Value LlamaCreate(const Napi::CallbackInfo& info) {
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  Napi::Env env = info.Env();
  return ctors->llama.New({info.Length() > 0 ? info[0] : env.Undefined(), info.Length() > 1 ? info[1] : env.Undefined(),
                           info.Length() > 2 ? info[2] : env.Undefined()});
}

}  // namespace

namespace bts {
namespace cuda {
void register_llama(Napi::Env env, Napi::Object exports) {
  Ctors* ctors = new Ctors();
  ctors->llama = Napi::Persistent(CudaLlamaWrap::Define(env, ctors));
  ctors->cache = Napi::Persistent(CudaCacheWrap::Define(env, ctors));
  env.AddCleanupHook([ctors] {
    ctors->llama.SuppressDestruct();
    ctors->cache.SuppressDestruct();
    delete ctors;
  });
  exports.Set("llamaCreate", Napi::Function::New(env, LlamaCreate, "llamaCreate", ctors));
}
}  // namespace cuda
}  // namespace bts
