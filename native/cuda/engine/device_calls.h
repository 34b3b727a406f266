// cuda/engine/device_calls.h: the Node-API methods that both CUDA engine wraps (CudaLlama in binding.cc,
// CudaStitched in stitched_binding.cc) have in common, written once over the wrap type: the host
// tensors of an object of Float32Arrays by name, zeroGrads, the device optimizer (adamwStep) and the
// moment copies (uploadMoments / downloadMoments). Header-only, included by those two files only
// (after llama_args.h, whose pin / typed / queue / make_error they use).
//
// A wrap W provides: W::kClass; core(env, method) -> const std::shared_ptr<Model>&; host_tensors(env,
// value, what, model, trained, pins) (its tensors' names, through host_tensors below); and the engine
// Model provides: HostTensor, OptimStep, trainable(), has_grad(name), zero_grads(), adamw_step(step),
// upload_moments(m, v), download_moments(m, v).
#pragma once
#include <napi.h>

#include <memory>
#include <string>
#include <vector>

#include "../../binding/llama_args.h"
#include "binding.h"

namespace bts {
namespace cuda {

// The Float32Arrays of `v` (an object by tensor name), each checked against its tensor's numel (and,
// with `trained`, against having a gradient), pinned into `pins`; E_ARGUMENT / E_SHAPE naming the
// method `m`. `numel_of(name)` gives a tensor's numel or -1 when the model has no such tensor;
// `unknown(name)` says why a name was refused; `creator` (llamaCreate / stitchedCreate) and `names`
// ("HF name", "stitch tensor name") go into the messages.
template <class Model, class NumelOf, class Unknown>
std::vector<typename Model::HostTensor> host_tensors(Napi::Env env, const Napi::Value& v, const std::string& m, const Model& model,
                                                     bool trained, std::vector<Napi::ObjectReference>& pins, const char* names,
                                                     const char* creator, NumelOf numel_of, Unknown unknown) {
  using namespace bts::napi;
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray())
    throw make_error(env, "E_ARGUMENT", m + ": expected an object of Float32Arrays by " + names + ", got " + describe(v));
  Napi::Object o = v.As<Napi::Object>();
  Napi::Array keys = o.GetPropertyNames();
  std::vector<typename Model::HostTensor> ts;
  for (uint32_t i = 0; i < keys.Length(); i++) {
    const std::string name = keys.Get(i).ToString().Utf8Value();
    const int64_t numel = numel_of(name);
    if (numel < 0) throw make_error(env, "E_ARGUMENT", m + ": '" + name + "' " + unknown(name));
    if (trained && !model.has_grad(name))
      throw make_error(env, "E_ARGUMENT", m + ": '" + name + "' has no gradient (" + creator + " options.grads did not include it)");
    Napi::TypedArray a = typed(env, o.Get(name), napi_float32_array, "Float32Array", numel, m + ": ['" + name + "']", "numel");
    pins.push_back(pin(a));
    ts.push_back({name, data_of<float>(a)});
  }
  return ts;
}

// zeroGrads() -> Promise
template <class W>
Napi::Value zero_grads_call(W* w, const Napi::CallbackInfo& info) {
  using namespace bts::napi;
  Napi::Env env = info.Env();
  auto model = w->core(env, "zeroGrads");
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  return queue(env, "zeroGrads", [model] { model->zero_grads(); }, nullptr, std::move(pins), w, nullptr);
}

// adamwStep({lr, beta1, beta2, eps, weightDecay, maxGradNorm, step}) -> Promise<gradNorm>: the device
// optimizer over every tensor with a gradient. `frozen` is the message for a model without gradients.
template <class W>
Napi::Value adamw_step_call(W* w, const Napi::CallbackInfo& info, const std::string& frozen) {
  using namespace bts::napi;
  Napi::Env env = info.Env();
  const std::string m = std::string(W::kClass) + ".adamwStep";
  auto model = w->core(env, "adamwStep");
  if (!model->trainable()) throw make_error(env, "E_ARGUMENT", m + ": " + frozen);
  typename std::decay_t<decltype(*model)>::OptimStep s;
  parse_adamw_hyper(env, info.Length() > 0 ? info[0] : env.Undefined(), m, &s);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  auto norm = std::make_shared<float>(0.f);
  return queue(env, "adamwStep", [model, s, norm] { *norm = model->adamw_step(s); },
               [norm](Napi::Env e) -> Napi::Value { return Napi::Number::New(e, double(*norm)); }, std::move(pins), w, nullptr);
}

// uploadMoments / downloadMoments(m, v) -> Promise: Float32Arrays by name of tensors with a gradient,
// read by the wrap's host_tensors(env, value, what, model, trained = true, pins).
template <class W>
Napi::Value moments_call(W* w, const Napi::CallbackInfo& info, bool upload) {
  using namespace bts::napi;
  Napi::Env env = info.Env();
  const char* method = upload ? "uploadMoments" : "downloadMoments";
  const std::string m = std::string(W::kClass) + "." + method;
  auto model = w->core(env, method);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  auto mt = w->host_tensors(env, info.Length() > 0 ? info[0] : env.Undefined(), m + ": m", *model, true, pins);
  auto vt = w->host_tensors(env, info.Length() > 1 ? info[1] : env.Undefined(), m + ": v", *model, true, pins);
  auto work = [model, mt, vt, upload] {
    if (upload) model->upload_moments(mt, vt);
    else model->download_moments(mt, vt);
  };
  return queue(env, method, work, nullptr, std::move(pins), w, nullptr);
}

}  // namespace cuda
}  // namespace bts
