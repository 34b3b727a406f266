// engine.cc: the Node-API face of the native Llama engine (native/engine/llama.h) and of read-only
// file mappings. Thin like addon.cc: it turns JS values into pointers (checking every typed array's
// type and length against the config, since the engine only sees raw pointers), keeps the arrays
// alive, queues the long calls on libuv workers (AsyncWorker -> Promise) and maps bts::Error codes to
// JS errors carrying `code`. The engine itself validates everything else (config, token ids, slots,
// capacity) before computing.
//
// Exports (registered by register_engine, called from addon.cc's Init):
//   llamaCreate(config, weights, grads) -> NativeLlama   (class instance; see lib/engine/native.ts)
//   mapFile(path)                       -> NativeMappedFile { byteLength, dispose() }
// Lifetimes: a NativeLlama holds references to every typed array it was given and shares ownership
// of the mappings its weights live in, so they live as long as the model. Each async call pins the
// model object, the cache object and its own arrays until it settles. dispose() frees the engine's
// workspaces and drops those references; when calls are still in flight, the release happens when the
// last one settles (later calls throw E_DISPOSED at once). A mapping is unmapped when its file object
// is disposed or collected AND no model uses it any more.
// A cache accepts one prefill/decode at a time (E_ARGUMENT while one is pending), so its lengths
// change in a defined order; reset/truncate/dispose are refused while a call on it is pending.
//
// The argument checks, the config parser, the weight binder, the worker and the cache face are shared
// with stitched.cc (llama_args.h); this file owns the file mappings (mapFile, NativeMappedFile, whose
// objects carry the type tag that llama_args.h's mapping_of() checks).
//
// Built also with -DBTS_ONLY_OPS (which drops native/engine/): the body is then empty and nothing is
// registered.
#ifndef BTS_ONLY_OPS_BUILD

#include <napi.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "../engine/llama.h"
#include "bts/common.h"
#include "llama_args.h"

#ifdef _WIN32
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <windows.h>
#else
#include <cerrno>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace bts {
namespace napi {
// The OS side of Mapping (llama_args.h): unmapped when the last model or file object lets go.
Mapping::~Mapping() {
#ifdef _WIN32
  if (data) UnmapViewOfFile(data);
  if (map) CloseHandle(static_cast<HANDLE>(map));
  if (file) CloseHandle(static_cast<HANDLE>(file));
#else
  if (data && size) munmap(const_cast<uint8_t*>(data), size);
#endif
}
}  // namespace napi
}  // namespace bts

namespace {

using bts::engine::KvCache;
using bts::engine::LlamaConfig;
using bts::engine::LlamaModel;
using bts::engine::TensorSpec;
using namespace bts::napi;

// ---------------------------------------------------------------------------------------------------
// Read-only file mappings.

// Maps `path` read-only; throws bts::Error E_ARGUMENT naming the path and the system's reason.
std::shared_ptr<Mapping> map_file(const std::string& path) {
  auto m = std::make_shared<Mapping>();
  m->path = path;
#ifdef _WIN32
  int wlen = MultiByteToWideChar(CP_UTF8, 0, path.c_str(), -1, nullptr, 0);
  std::wstring wpath(size_t(wlen > 0 ? wlen : 1), L'\0');
  if (wlen > 0) MultiByteToWideChar(CP_UTF8, 0, path.c_str(), -1, &wpath[0], wlen);
  HANDLE file = CreateFileW(wpath.c_str(), GENERIC_READ, FILE_SHARE_READ, nullptr, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, nullptr);
  if (file == INVALID_HANDLE_VALUE)
    throw bts::Error("E_ARGUMENT", "mapFile: cannot open '" + path + "' (Windows error " + std::to_string(GetLastError()) + ")");
  m->file = file;
  LARGE_INTEGER sz;
  if (!GetFileSizeEx(file, &sz)) throw bts::Error("E_ARGUMENT", "mapFile: cannot read the size of '" + path + "'");
  m->size = size_t(sz.QuadPart);
  if (m->size > 0) {
    m->map = CreateFileMappingW(file, nullptr, PAGE_READONLY, 0, 0, nullptr);
    if (!m->map) throw bts::Error("E_ARGUMENT", "mapFile: cannot map '" + path + "' (Windows error " + std::to_string(GetLastError()) + ")");
    m->data = static_cast<const uint8_t*>(MapViewOfFile(static_cast<HANDLE>(m->map), FILE_MAP_READ, 0, 0, 0));
    if (!m->data) throw bts::Error("E_ARGUMENT", "mapFile: cannot map '" + path + "' (Windows error " + std::to_string(GetLastError()) + ")");
  }
#else
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw bts::Error("E_ARGUMENT", "mapFile: cannot open '" + path + "': " + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw bts::Error("E_ARGUMENT", "mapFile: '" + path + "' is not a regular file");
  }
  m->size = size_t(st.st_size);
  if (m->size > 0) {
    void* p = mmap(nullptr, m->size, PROT_READ, MAP_SHARED, fd, 0);
    const int err = errno;
    ::close(fd);
    if (p == MAP_FAILED) throw bts::Error("E_ARGUMENT", "mapFile: cannot map '" + path + "': " + std::strerror(err));
    m->data = static_cast<const uint8_t*>(p);
  } else {
    ::close(fd);
  }
#endif
  return m;
}

struct Ctors {
  Napi::FunctionReference llama, cache, file;
};

class MappedFileWrap : public Napi::ObjectWrap<MappedFileWrap> {
 public:
  // Every method through guarded(): a C++ exception never escapes into Node-API.
  template <Napi::Value (MappedFileWrap::*M)(const Napi::CallbackInfo&)>
  Napi::Value Safe(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), "NativeMappedFile", [&] { return (this->*M)(info); });
  }

  static Napi::Function Define(Napi::Env env, Ctors* ctors) {
    return DefineClass(env, "NativeMappedFile",
                       {InstanceAccessor<&MappedFileWrap::Safe<&MappedFileWrap::ByteLength>>("byteLength"),
                        InstanceAccessor<&MappedFileWrap::Safe<&MappedFileWrap::Path>>("path"),
                        InstanceMethod<&MappedFileWrap::Safe<&MappedFileWrap::Dispose>>("dispose")},
                       ctors);
  }

  explicit MappedFileWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<MappedFileWrap>(info) {
    guarded(info.Env(), "mapFile", [&] { Init(info); });
  }
  void Init(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsString()) throw make_error(env, "E_ARGUMENT", "mapFile(path: string)");
    const std::string path = info[0].As<Napi::String>().Utf8Value();
    map_ = guarded(env, "mapFile", [&] { return map_file(path); });
    size_ = map_->size;
    path_ = path;
    info.This().As<Napi::Object>().TypeTag(&kMappedFileTag);  // what mapping_of() recognises
  }

  // The mapping, or E_DISPOSED.
  std::shared_ptr<Mapping> mapping(Napi::Env env, const std::string& what) const {
    if (!map_) throw make_error(env, "E_DISPOSED", what + ": the mapped file '" + path_ + "'");
    return map_;
  }

 private:
  Napi::Value ByteLength(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(size_)); }
  Napi::Value Path(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), path_); }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    map_.reset();  // unmapped now unless a model still uses it
    return info.Env().Undefined();
  }

  std::shared_ptr<Mapping> map_;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace

// Declared in llama_args.h: the mapping of a NativeMappedFile, recognised by its type tag.
std::shared_ptr<bts::napi::Mapping> bts::napi::mapping_of(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kMappedFileTag))
    throw make_error(env, "E_ARGUMENT", what + " must be a NativeMappedFile (from mapFile), got " + describe(v));
  return MappedFileWrap::Unwrap(v.As<Napi::Object>())->mapping(env, what);
}

namespace {

// ---------------------------------------------------------------------------------------------------
// Model and cache.

// new NativeKvCache(model, slots, capacity): made by NativeLlama.createCache.
struct KvCacheTraits {
  static constexpr const char* kClass = "NativeKvCache";
  static constexpr const char* kModel = "NativeLlama";
  static std::shared_ptr<KvCache> make(const Napi::CallbackInfo& info, uint64_t* owner);
};
using KvCacheWrap = CacheWrap<KvCache, KvCacheTraits>;

class LlamaWrap : public Napi::ObjectWrap<LlamaWrap> {
 public:
  // Every method through guarded(): a C++ exception never escapes into Node-API.
  template <Napi::Value (LlamaWrap::*M)(const Napi::CallbackInfo&)>
  Napi::Value Safe(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), kClass, [&] { return (this->*M)(info); });
  }

  static Napi::Function Define(Napi::Env env, Ctors* ctors) {
    return DefineClass(env, kClass, model_methods<LlamaWrap>({InstanceMethod<&LlamaWrap::Safe<&LlamaWrap::ForwardBackward>>("forwardBackward")}), ctors);
  }

  explicit LlamaWrap(const Napi::CallbackInfo& info);
  void Init(const Napi::CallbackInfo& info);  // the constructor's body (parses config, weights, grads)

  static constexpr const char* kClass = "NativeLlama";
  using CacheWrapT = KvCacheWrap;
  // Throws E_DISPOSED after dispose().
  const std::shared_ptr<LlamaModel>& core(Napi::Env env, const char* method) const {
    return life_.core(env, kClass, method, "the model");
  }
  uint64_t id() const { return id_; }
  KvCacheWrap* cache_arg(Napi::Env env, const Napi::Value& v, const char* method);
  void begin_call() { life_.begin_call(); }
  void end_call() { life_.end_call(); }

  // The JS methods (public: llama_args.h model_methods() lists them).
  Napi::Value ForwardBackward(const Napi::CallbackInfo& info);
  Napi::Value Loss(const Napi::CallbackInfo& info) { return call_loss(this, info); }
  Napi::Value Logits(const Napi::CallbackInfo& info) { return call_logits(this, info); }
  Napi::Value CreateCache(const Napi::CallbackInfo& info);
  Napi::Value Prefill(const Napi::CallbackInfo& info) { return call_prefill(this, info); }
  Napi::Value Decode(const Napi::CallbackInfo& info) { return call_decode(this, info); }
  Napi::Value WorkspaceBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(core(info.Env(), "workspaceBytes")->workspace_bytes()));
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    life_.dispose();  // later calls throw E_DISPOSED; freed when no call is in flight
    return info.Env().Undefined();
  }

 private:
  Ctors* ctors_;
  uint64_t id_;
  ModelLife<LlamaModel> life_;  // the engine; the typed arrays of weights and grads, the mappings
};

std::shared_ptr<KvCache> KvCacheTraits::make(const Napi::CallbackInfo& info, uint64_t* owner) {
  Napi::Env env = info.Env();
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  if (info.Length() < 3 || !info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(ctors->llama.Value()))
    throw make_error(env, "E_ARGUMENT", "NativeKvCache: made by NativeLlama.createCache(slots, capacity)");
  LlamaWrap* model = LlamaWrap::Unwrap(info[0].As<Napi::Object>());
  const std::shared_ptr<LlamaModel>& core = model->core(env, "createCache");
  const int64_t slots = int_arg(env, info[1], "createCache: slots", 1, int64_t(1) << 20);
  const int64_t cap = int_arg(env, info[2], "createCache: capacity", 1, int64_t(1) << 31);
  *owner = model->id();
  return std::make_shared<KvCache>(core->config(), slots, cap);
}

// ---- NativeLlama

LlamaWrap::LlamaWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<LlamaWrap>(info) {
  guarded(info.Env(), "llamaCreate", [&] { Init(info); });
}

void LlamaWrap::Init(const Napi::CallbackInfo& info) {
  static std::atomic<uint64_t> next_id{1};  // ids tell caches of different models apart
  Napi::Env env = info.Env();
  ctors_ = static_cast<Ctors*>(info.Data());
  id_ = next_id++;
  const LlamaConfig c = parse_llama_config(env, info[0], "llamaCreate");
  const std::vector<TensorSpec> specs = bts::engine::tensor_specs(c);
  Keepalive& keep = life_.keep();

  // grads: name -> Float32Array of the weight's length (a subset; missing = frozen)
  bts::engine::ModelGrads mg;
  mg.layers.resize(size_t(c.L));
  bool have_grads = false;
  std::set<std::string> grad_names;
  Napi::Value gv = info.Length() > 2 ? info[2] : env.Null();
  if (!gv.IsNull() && !gv.IsUndefined()) {
    if (!gv.IsObject() || gv.IsArray() || gv.IsTypedArray())
      throw make_error(env, "E_ARGUMENT", "llamaCreate: grads must be null or an object of Float32Arrays by HF name, got " + describe(gv));
    Napi::Object go = gv.As<Napi::Object>();
    Napi::Array keys = go.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); i++) {
      const std::string name = keys.Get(i).ToString().Utf8Value();
      const TensorSpec* s = nullptr;
      for (const TensorSpec& x : specs)
        if (x.name == name) s = &x;
      if (!s) throw make_error(env, "E_ARGUMENT", "llamaCreate: grads has '" + name + "', not a tensor of this config" + tensor_name_hint(c, name));
      Napi::TypedArray a = typed(env, go.Get(name), napi_float32_array, "Float32Array", s->numel, "llamaCreate: grads['" + name + "']", "numel");
      keep.refs.push_back(pin(a));
      bts::engine::bind_grad(mg, *s, data_of<float>(a));
      grad_names.insert(name);
      have_grads = true;
    }
  }

  // weights: name -> Float32Array | Uint16Array (bf16) | {file, offset, dtype, length}
  const bts::engine::ModelWeights mw =
      bind_llama_weights(env, info.Length() > 1 ? info[1] : env.Undefined(), c, specs, "llamaCreate", "weights", keep, &grad_names);
  life_.set(guarded(env, "llamaCreate", [&] { return std::make_shared<LlamaModel>(c, mw, have_grads ? &mg : nullptr); }));
}

KvCacheWrap* LlamaWrap::cache_arg(Napi::Env env, const Napi::Value& v, const char* method) {
  return cache_of<LlamaWrap>(env, ctors_->cache, v, method);
}

Napi::Value LlamaWrap::ForwardBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<LlamaModel> core = this->core(env, "forwardBackward");
  TrainArgs a = train_args(info, kClass);
  if (!core->trainable())
    throw make_error(env, "E_ARGUMENT", "NativeLlama.forwardBackward: the model was created without gradient buffers (frozen); pass grads to llamaCreate to train");
  const int32_t* p_in = a.inputs;
  const int32_t* p_tg = a.targets;
  const int64_t B = a.B, T = a.T;
  const float scale = a.grad_scale;
  auto result = std::make_shared<LlamaModel::Loss>();
  return queue(env, "forwardBackward", [=] { *result = core->forward_backward(p_in, p_tg, B, T, scale); },
               [result](Napi::Env e) { return loss_value(e, *result); }, std::move(a.pins), this, nullptr);
}

Napi::Value LlamaWrap::CreateCache(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  core(env, "createCache");
  return ctors_->cache.New({info.This(), info.Length() > 0 ? info[0] : env.Undefined(), info.Length() > 1 ? info[1] : env.Undefined()});
}

// ---- exports

Napi::Value LlamaCreate(const Napi::CallbackInfo& info) {
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  Napi::Env env = info.Env();
  return ctors->llama.New({info.Length() > 0 ? info[0] : env.Undefined(), info.Length() > 1 ? info[1] : env.Undefined(),
                           info.Length() > 2 ? info[2] : env.Null()});
}

Napi::Value MapFile(const Napi::CallbackInfo& info) {
  Ctors* ctors = static_cast<Ctors*>(info.Data());
  Napi::Env env = info.Env();
  return ctors->file.New({info.Length() > 0 ? info[0] : env.Undefined()});
}

}  // namespace

namespace bts {
// Adds llamaCreate and mapFile to the addon's exports (called once per environment from Init).
void register_engine(Napi::Env env, Napi::Object exports) {
  Ctors* ctors = new Ctors();
  ctors->llama = Napi::Persistent(LlamaWrap::Define(env, ctors));
  ctors->cache = Napi::Persistent(KvCacheWrap::Define(env, ctors));
  ctors->file = Napi::Persistent(MappedFileWrap::Define(env, ctors));
  env.AddCleanupHook([ctors] {
    // The environment is going away with its references; only the holder is freed here.
    ctors->llama.SuppressDestruct();
    ctors->cache.SuppressDestruct();
    ctors->file.SuppressDestruct();
    delete ctors;
  });
  exports.Set("llamaCreate", Napi::Function::New(env, LlamaCreate, "llamaCreate", ctors));
  exports.Set("mapFile", Napi::Function::New(env, MapFile, "mapFile", ctors));
}
}  // namespace bts

#endif  // BTS_ONLY_OPS_BUILD
