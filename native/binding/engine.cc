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

namespace {

using bts::engine::KvCache;
using bts::engine::LlamaConfig;
using bts::engine::LlamaModel;
using bts::engine::TensorSpec;

Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

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

// An integer in [lo, hi] or E_ARGUMENT naming it.
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

// A typed array of the given type with exactly `len` elements (at_least: >= len; len < 0: any
// length >= 1).
Napi::TypedArray typed(Napi::Env env, const Napi::Value& v, napi_typedarray_type type, const char* type_name,
                       int64_t len, const std::string& what, const std::string& shape, bool at_least = false) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
    throw make_error(env, "E_DTYPE", what + " must be a " + type_name + ", got " + describe(v));
  Napi::TypedArray a = v.As<Napi::TypedArray>();
  const int64_t n = int64_t(a.ElementLength());
  if (len >= 0 && (at_least ? n < len : n != len))
    throw make_error(env, "E_SHAPE", what + " has " + std::to_string(n) + " elements, expected " + (at_least ? "at least " : "") +
                                         shape + " = " + std::to_string(len));
  if (len < 0 && n < 1) throw make_error(env, "E_SHAPE", what + " must not be empty");
  return a;
}

template <class T>
T* data_of(const Napi::TypedArray& a) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset());
}

// ---------------------------------------------------------------------------------------------------
// Read-only file mappings.

struct Mapping {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::string path;
#ifdef _WIN32
  HANDLE file = INVALID_HANDLE_VALUE, map = nullptr;
#endif
  ~Mapping() {
#ifdef _WIN32
    if (data) UnmapViewOfFile(data);
    if (map) CloseHandle(map);
    if (file != INVALID_HANDLE_VALUE) CloseHandle(file);
#else
    if (data && size) munmap(const_cast<uint8_t*>(data), size);
#endif
  }
};

// Maps `path` read-only; throws bts::Error E_ARGUMENT naming the path and the system's reason.
std::shared_ptr<Mapping> map_file(const std::string& path) {
  auto m = std::make_shared<Mapping>();
  m->path = path;
#ifdef _WIN32
  int wlen = MultiByteToWideChar(CP_UTF8, 0, path.c_str(), -1, nullptr, 0);
  std::wstring wpath(size_t(wlen > 0 ? wlen : 1), L'\0');
  if (wlen > 0) MultiByteToWideChar(CP_UTF8, 0, path.c_str(), -1, &wpath[0], wlen);
  m->file = CreateFileW(wpath.c_str(), GENERIC_READ, FILE_SHARE_READ, nullptr, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, nullptr);
  if (m->file == INVALID_HANDLE_VALUE)
    throw bts::Error("E_ARGUMENT", "mapFile: cannot open '" + path + "' (Windows error " + std::to_string(GetLastError()) + ")");
  LARGE_INTEGER sz;
  if (!GetFileSizeEx(m->file, &sz)) throw bts::Error("E_ARGUMENT", "mapFile: cannot read the size of '" + path + "'");
  m->size = size_t(sz.QuadPart);
  if (m->size > 0) {
    m->map = CreateFileMappingW(m->file, nullptr, PAGE_READONLY, 0, 0, nullptr);
    if (!m->map) throw bts::Error("E_ARGUMENT", "mapFile: cannot map '" + path + "' (Windows error " + std::to_string(GetLastError()) + ")");
    m->data = static_cast<const uint8_t*>(MapViewOfFile(m->map, FILE_MAP_READ, 0, 0, 0));
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

// ---------------------------------------------------------------------------------------------------
// Model and cache.

class KvCacheWrap;

class LlamaWrap : public Napi::ObjectWrap<LlamaWrap> {
 public:
  // Every method through guarded(): a C++ exception never escapes into Node-API.
  template <Napi::Value (LlamaWrap::*M)(const Napi::CallbackInfo&)>
  Napi::Value Safe(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), "NativeLlama", [&] { return (this->*M)(info); });
  }

  static Napi::Function Define(Napi::Env env, Ctors* ctors) {
    return DefineClass(env, "NativeLlama",
                       {InstanceMethod<&LlamaWrap::Safe<&LlamaWrap::ForwardBackward>>("forwardBackward"),
                        InstanceMethod<&LlamaWrap::Safe<&LlamaWrap::Loss>>("loss"),
                        InstanceMethod<&LlamaWrap::Safe<&LlamaWrap::Logits>>("logits"),
                        InstanceMethod<&LlamaWrap::Safe<&LlamaWrap::CreateCache>>("createCache"),
                        InstanceMethod<&LlamaWrap::Safe<&LlamaWrap::Prefill>>("prefill"),
                        InstanceMethod<&LlamaWrap::Safe<&LlamaWrap::Decode>>("decode"),
                        InstanceMethod<&LlamaWrap::Safe<&LlamaWrap::WorkspaceBytes>>("workspaceBytes"),
                        InstanceMethod<&LlamaWrap::Safe<&LlamaWrap::Dispose>>("dispose")},
                       ctors);
  }

  explicit LlamaWrap(const Napi::CallbackInfo& info);
  void Init(const Napi::CallbackInfo& info);  // the constructor's body (parses config, weights, grads)

  // Throws E_DISPOSED after dispose().
  const std::shared_ptr<LlamaModel>& core(Napi::Env env, const char* method) const {
    if (disposed_ || !core_) throw make_error(env, "E_DISPOSED", std::string("NativeLlama.") + method + ": the model");
    return core_;
  }
  uint64_t id() const { return id_; }
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
  Napi::Value WorkspaceBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), double(core(info.Env(), "workspaceBytes")->workspace_bytes()));
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    if (disposed_) return info.Env().Undefined();
    disposed_ = true;  // later calls throw E_DISPOSED
    if (inflight_ == 0) release();
    return info.Env().Undefined();
  }
  // Frees the engine (workspaces) and drops the references to weights, grads and mappings. Only when
  // no call is in flight (each worker's closure holds its own reference to the engine, unused after).
  void release() {
    core_.reset();
    refs_.clear();
    maps_.clear();
    owned_.clear();
  }
  KvCacheWrap* cache_arg(Napi::Env env, const Napi::Value& v, const char* method);

  Ctors* ctors_;
  uint64_t id_;
  std::shared_ptr<LlamaModel> core_;
  std::vector<Napi::ObjectReference> refs_;       // typed arrays of weights and grads
  std::vector<std::shared_ptr<Mapping>> maps_;    // mappings the weights live in
  std::vector<std::unique_ptr<float[]>> owned_;   // fp32 copies of bf16 norm weights
  int inflight_ = 0;
  bool disposed_ = false;
};

class KvCacheWrap : public Napi::ObjectWrap<KvCacheWrap> {
 public:
  // Every method through guarded(): a C++ exception never escapes into Node-API.
  template <Napi::Value (KvCacheWrap::*M)(const Napi::CallbackInfo&)>
  Napi::Value Safe(const Napi::CallbackInfo& info) {
    return guarded(info.Env(), "NativeKvCache", [&] { return (this->*M)(info); });
  }

  static Napi::Function Define(Napi::Env env, Ctors* ctors) {
    return DefineClass(env, "NativeKvCache",
                       {InstanceMethod<&KvCacheWrap::Safe<&KvCacheWrap::Length>>("length"), InstanceMethod<&KvCacheWrap::Safe<&KvCacheWrap::Reset>>("reset"),
                        InstanceMethod<&KvCacheWrap::Safe<&KvCacheWrap::Truncate>>("truncate"),
                        InstanceAccessor<&KvCacheWrap::Safe<&KvCacheWrap::Slots>>("slots"),
                        InstanceAccessor<&KvCacheWrap::Safe<&KvCacheWrap::Capacity>>("capacity"),
                        InstanceAccessor<&KvCacheWrap::Safe<&KvCacheWrap::Bytes>>("byteLength"),
                        InstanceMethod<&KvCacheWrap::Safe<&KvCacheWrap::Dispose>>("dispose")},
                       ctors);
  }

  // new NativeKvCache(model, slots, capacity): made by NativeLlama.createCache.
  explicit KvCacheWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<KvCacheWrap>(info) {
    guarded(info.Env(), "createCache", [&] { Init(info); });
  }
  void Init(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Ctors* ctors = static_cast<Ctors*>(info.Data());
    if (info.Length() < 3 || !info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(ctors->llama.Value()))
      throw make_error(env, "E_ARGUMENT", "NativeKvCache: made by NativeLlama.createCache(slots, capacity)");
    LlamaWrap* model = LlamaWrap::Unwrap(info[0].As<Napi::Object>());
    const std::shared_ptr<LlamaModel>& core = model->core(env, "createCache");
    const int64_t slots = int_arg(env, info[1], "createCache: slots", 1, int64_t(1) << 20);
    const int64_t cap = int_arg(env, info[2], "createCache: capacity", 1, int64_t(1) << 31);
    cache_ = guarded(env, "createCache", [&] { return std::make_shared<KvCache>(core->config(), slots, cap); });
    owner_ = model->id();
    slots_ = slots;
    capacity_ = cap;
  }

  // The cache for a call of model `owner`, or a typed error.
  const std::shared_ptr<KvCache>& use(Napi::Env env, const char* method, uint64_t owner) const {
    if (!cache_ || dispose_pending_) throw make_error(env, "E_DISPOSED", std::string("NativeLlama.") + method + ": the KV cache");
    if (owner != owner_) throw make_error(env, "E_ARGUMENT", std::string("NativeLlama.") + method + ": the cache was created by another model");
    if (busy_) throw make_error(env, "E_ARGUMENT", std::string("NativeLlama.") + method + ": a prefill/decode on this cache is still pending (await it first)");
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
  KvCache& live(Napi::Env env, const char* method, bool mutating) {
    if (!cache_ || dispose_pending_) throw make_error(env, "E_DISPOSED", std::string("NativeKvCache.") + method + ": the KV cache");
    if (mutating && busy_)
      throw make_error(env, "E_ARGUMENT", std::string("NativeKvCache.") + method + ": a prefill/decode on this cache is still pending (await it first)");
    return *cache_;
  }
  Napi::Value Length(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    KvCache& c = live(env, "length", false);
    const int64_t slot = int_arg(env, info[0], "NativeKvCache.length: slot", 0, int64_t(1) << 31);  // range: KvCache
    return Napi::Number::New(env, double(guarded(env, "NativeKvCache.length", [&] { return c.length(slot); })));
  }
  Napi::Value Reset(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    KvCache& c = live(env, "reset", true);
    const int64_t slot = int_arg(env, info[0], "NativeKvCache.reset: slot", 0, int64_t(1) << 31);  // range: KvCache
    guarded(env, "NativeKvCache.reset", [&] { c.reset(slot); });
    return env.Undefined();
  }
  Napi::Value Truncate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    KvCache& c = live(env, "truncate", true);
    const int64_t slot = int_arg(env, info[0], "NativeKvCache.truncate: slot", 0, int64_t(1) << 31);  // range: KvCache
    const int64_t len = int_arg(env, info[1], "NativeKvCache.truncate: length", 0, int64_t(1) << 31);  // range: KvCache
    guarded(env, "NativeKvCache.truncate", [&] { c.truncate(slot, len); });
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

  std::shared_ptr<KvCache> cache_;
  uint64_t owner_ = 0;
  int64_t slots_ = 0, capacity_ = 0;
  bool busy_ = false, dispose_pending_ = false;
};

// One engine call on a libuv worker: `work` runs there (it takes the compute lock itself), `ok` builds
// the resolved value on the JS thread. Pins the JS objects until the Promise settles.
class EngineWorker : public Napi::AsyncWorker {
 public:
  EngineWorker(Napi::Env env, std::string what, std::function<void()> work, std::function<Napi::Value(Napi::Env)> ok,
               std::vector<Napi::ObjectReference> pins, LlamaWrap* model, KvCacheWrap* cache)
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
  LlamaWrap* model_;
  KvCacheWrap* cache_;
  std::string code_ = "E_INTERNAL";
};

Napi::Value queue(Napi::Env env, const std::string& what, std::function<void()> work,
                  std::function<Napi::Value(Napi::Env)> ok, std::vector<Napi::ObjectReference> pins, LlamaWrap* model,
                  KvCacheWrap* cache) {
  auto* w = new EngineWorker(env, what, std::move(work), std::move(ok), std::move(pins), model, cache);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::ObjectReference pin(const Napi::Value& v) { return Napi::Persistent(v.As<Napi::Object>()); }

// ---- config

int64_t cfg_int(Napi::Env env, const Napi::Object& o, const char* key) {
  return int_arg(env, o.Get(key), std::string("llamaCreate: config.") + key, 1, int64_t(1) << 31);
}

double cfg_num(Napi::Env env, const Napi::Object& o, const std::string& key, const Napi::Value& v) {
  if (!v.IsNumber()) throw make_error(env, "E_ARGUMENT", "llamaCreate: config." + key + " must be a number, got " + describe(v));
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || !(d > 0)) throw make_error(env, "E_ARGUMENT", "llamaCreate: config." + key + " must be a positive finite number, got " + num_str(d));
  return d;
}

LlamaConfig parse_config(Napi::Env env, const Napi::Value& v) {
  if (!v.IsObject() || v.IsArray()) throw make_error(env, "E_ARGUMENT", "llamaCreate: config must be an object (NativeLlamaConfig), got " + describe(v));
  Napi::Object o = v.As<Napi::Object>();
  LlamaConfig c;
  c.V = cfg_int(env, o, "vocabSize");
  c.D = cfg_int(env, o, "hiddenSize");
  c.F = cfg_int(env, o, "intermediateSize");
  c.L = cfg_int(env, o, "numHiddenLayers");
  c.H = cfg_int(env, o, "numAttentionHeads");
  c.Hkv = cfg_int(env, o, "numKeyValueHeads");
  c.Dh = cfg_int(env, o, "headDim");
  c.max_pos = cfg_int(env, o, "maxPositionEmbeddings");
  c.eps = float(cfg_num(env, o, "rmsNormEps", o.Get("rmsNormEps")));
  c.rope.theta = cfg_num(env, o, "ropeTheta", o.Get("ropeTheta"));
  Napi::Value tie = o.Get("tieWordEmbeddings");
  if (!tie.IsBoolean()) throw make_error(env, "E_ARGUMENT", "llamaCreate: config.tieWordEmbeddings must be a boolean, got " + describe(tie));
  c.tie = tie.As<Napi::Boolean>().Value();
  Napi::Value rs = o.Get("ropeScaling");
  if (!rs.IsNull() && !rs.IsUndefined()) {
    if (!rs.IsObject()) throw make_error(env, "E_ARGUMENT", "llamaCreate: config.ropeScaling must be null or an object, got " + describe(rs));
    Napi::Object r = rs.As<Napi::Object>();
    Napi::Value type = r.Get("type");
    if (!type.IsString() || type.As<Napi::String>().Utf8Value() != "llama3")
      throw make_error(env, "E_UNSUPPORTED", "llamaCreate: config.ropeScaling.type " + describe(type) +
                                                 " is not supported by the native engine (supported: 'llama3', or null for plain RoPE)");
    c.rope.factor = cfg_num(env, r, "ropeScaling.factor", r.Get("factor"));
    c.rope.low_freq_factor = cfg_num(env, r, "ropeScaling.lowFreqFactor", r.Get("lowFreqFactor"));
    c.rope.high_freq_factor = cfg_num(env, r, "ropeScaling.highFreqFactor", r.Get("highFreqFactor"));
    c.rope.original_max_position_embeddings =
        cfg_num(env, r, "ropeScaling.originalMaxPositionEmbeddings", r.Get("originalMaxPositionEmbeddings"));
  }
  guarded(env, "llamaCreate", [&] { bts::engine::validate_config(c); });
  return c;
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
  const LlamaConfig c = parse_config(env, info[0]);
  const std::vector<TensorSpec> specs = bts::engine::tensor_specs(c);
  auto find_spec = [&](const std::string& name) -> const TensorSpec* {
    for (const TensorSpec& s : specs)
      if (s.name == name) return &s;
    return nullptr;
  };
  auto unknown = [&](const char* what, const std::string& name) {
    std::string hint = (c.tie && name == "lm_head.weight") ? " (tieWordEmbeddings: the LM head is model.embed_tokens.weight)" : "";
    return make_error(env, "E_ARGUMENT", std::string("llamaCreate: ") + what + " has '" + name + "', not a tensor of this config" + hint);
  };

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
      const TensorSpec* s = find_spec(name);
      if (!s) throw unknown("grads", name);
      Napi::TypedArray a = typed(env, go.Get(name), napi_float32_array, "Float32Array", s->numel, "llamaCreate: grads['" + name + "']", "numel");
      refs_.push_back(pin(a));
      bts::engine::bind_grad(mg, *s, data_of<float>(a));
      grad_names.insert(name);
      have_grads = true;
    }
  }

  // weights: name -> Float32Array | Uint16Array (bf16) | {file, offset, dtype, length}
  if (info.Length() < 2 || !info[1].IsObject() || info[1].IsArray())
    throw make_error(env, "E_ARGUMENT", "llamaCreate: weights must be an object of tensors by HF name, got " + describe(info.Length() > 1 ? info[1] : env.Undefined()));
  Napi::Object wo = info[1].As<Napi::Object>();
  {
    Napi::Array keys = wo.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); i++) {
      const std::string name = keys.Get(i).ToString().Utf8Value();
      if (!find_spec(name)) throw unknown("weights", name);
    }
  }
  bts::engine::ModelWeights mw;
  mw.layers.resize(size_t(c.L));
  for (const TensorSpec& s : specs) {
    const std::string what = "llamaCreate: weights['" + s.name + "']";
    Napi::Value v = wo.Get(s.name);
    if (v.IsUndefined() || v.IsNull()) throw make_error(env, "E_ARGUMENT", "llamaCreate: weight '" + s.name + "' is missing");
    bts::engine::Weight w;
    if (v.IsTypedArray()) {
      Napi::TypedArray a = v.As<Napi::TypedArray>();
      if (a.TypedArrayType() == napi_float32_array) {
        typed(env, v, napi_float32_array, "Float32Array", s.numel, what, "numel");
        w.f32 = data_of<float>(a);
      } else if (a.TypedArrayType() == napi_uint16_array) {
        typed(env, v, napi_uint16_array, "Uint16Array", s.numel, what, "numel");
        w.b16 = data_of<bts::bf16>(a);
      } else {
        throw make_error(env, "E_DTYPE", what + " must be a Float32Array, a Uint16Array (bf16) or {file, offset, dtype, length}");
      }
      refs_.push_back(pin(a));
    } else if (v.IsObject()) {
      Napi::Object o = v.As<Napi::Object>();
      Napi::Value fv = o.Get("file");
      if (!fv.IsObject() || !fv.As<Napi::Object>().InstanceOf(ctors_->file.Value()))
        throw make_error(env, "E_ARGUMENT", what + ".file must be a NativeMappedFile (from mapFile), got " + describe(fv));
      std::shared_ptr<Mapping> m = MappedFileWrap::Unwrap(fv.As<Napi::Object>())->mapping(env, "llamaCreate: " + s.name);
      Napi::Value dv = o.Get("dtype");
      const std::string dtype = dv.IsString() ? dv.As<Napi::String>().Utf8Value() : "";
      if (dtype != "f32" && dtype != "bf16") throw make_error(env, "E_DTYPE", what + ".dtype must be 'f32' or 'bf16', got " + describe(dv));
      const int64_t esize = dtype == "f32" ? 4 : 2;
      const int64_t offset = int_arg(env, o.Get("offset"), what + ".offset", 0, int64_t(1) << 52);
      const int64_t length = int_arg(env, o.Get("length"), what + ".length", 0, int64_t(1) << 50);
      if (length != s.numel)
        throw make_error(env, "E_SHAPE", what + ".length is " + std::to_string(length) + ", expected numel = " + std::to_string(s.numel));
      if (uint64_t(offset) + uint64_t(length) * uint64_t(esize) > uint64_t(m->size))
        throw make_error(env, "E_ARGUMENT", what + ": bytes [" + std::to_string(offset) + ", " + std::to_string(offset + length * esize) +
                                                ") lie outside the file '" + m->path + "' (" + std::to_string(m->size) + " bytes)");
      if (offset % esize != 0)
        throw make_error(env, "E_ARGUMENT", what + ".offset " + std::to_string(offset) + " is not a multiple of the " + dtype +
                                                " element size (" + std::to_string(esize) + "); copy the tensor instead");
      if (esize == 4) w.f32 = reinterpret_cast<const float*>(m->data + offset);
      else w.b16 = reinterpret_cast<const bts::bf16*>(m->data + offset);
      maps_.push_back(std::move(m));
    } else {
      throw make_error(env, "E_DTYPE", what + " must be a Float32Array, a Uint16Array (bf16) or {file, offset, dtype, length}, got " + describe(v));
    }
    if (s.is_norm() && w.b16) {
      // Norm weights are fp32 in the engine: a frozen bf16 norm is widened once here.
      if (grad_names.count(s.name))
        throw make_error(env, "E_DTYPE", what + " is bf16 but has a gradient; a trained norm weight must be a Float32Array");
      std::unique_ptr<float[]> f(new float[size_t(s.numel)]);
      for (int64_t i = 0; i < s.numel; i++) f[size_t(i)] = bts::bf16_to_f32(w.b16[i]);
      w.f32 = f.get();
      w.b16 = nullptr;
      owned_.push_back(std::move(f));
    }
    bts::engine::bind_weight(mw, s, w);
  }
  core_ = guarded(env, "llamaCreate", [&] { return std::make_shared<LlamaModel>(c, mw, have_grads ? &mg : nullptr); });
}

KvCacheWrap* LlamaWrap::cache_arg(Napi::Env env, const Napi::Value& v, const char* method) {
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(ctors_->cache.Value()))
    throw make_error(env, "E_ARGUMENT", std::string("NativeLlama.") + method + ": cache must be a NativeKvCache (from createCache), got " + describe(v));
  return KvCacheWrap::Unwrap(v.As<Napi::Object>());
}

// B and T as positive integers, N = B*T.
void shape_args(Napi::Env env, const Napi::CallbackInfo& info, size_t iB, const char* method, int64_t* B, int64_t* T) {
  *B = int_arg(env, info[iB], std::string("NativeLlama.") + method + ": B", 1, int64_t(1) << 31);
  *T = int_arg(env, info[iB + 1], std::string("NativeLlama.") + method + ": T", 1, int64_t(1) << 31);
  if (double(*B) * double(*T) > double(int64_t(1) << 40))
    throw make_error(env, "E_ARGUMENT", std::string("NativeLlama.") + method + ": B*T is too large");
}

Napi::Value LlamaWrap::ForwardBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<LlamaModel> core = this->core(env, "forwardBackward");
  int64_t B, T;
  shape_args(env, info, 2, "forwardBackward", &B, &T);
  const int64_t N = B * T;
  Napi::TypedArray in = typed(env, info[0], napi_int32_array, "Int32Array", N, "NativeLlama.forwardBackward: inputs", "B*T");
  Napi::TypedArray tg = typed(env, info[1], napi_int32_array, "Int32Array", N, "NativeLlama.forwardBackward: targets", "B*T");
  const float scale = float(num_arg(env, info[4], "NativeLlama.forwardBackward: gradScale"));
  if (!core->trainable())
    throw make_error(env, "E_ARGUMENT", "NativeLlama.forwardBackward: the model was created without gradient buffers (frozen); pass grads to llamaCreate to train");
  const int32_t* pin_in = data_of<int32_t>(in);
  const int32_t* pin_tg = data_of<int32_t>(tg);
  auto result = std::make_shared<LlamaModel::Loss>();
  return queue(
      env, "forwardBackward", [=] { *result = core->forward_backward(pin_in, pin_tg, B, T, scale); },
      [result](Napi::Env e) {
        Napi::Object o = Napi::Object::New(e);
        o.Set("lossSum", result->sum);
        o.Set("count", double(result->count));
        return Napi::Value(o);
      },
      [&] {
        std::vector<Napi::ObjectReference> p;
        p.push_back(pin(info.This()));
        p.push_back(pin(in));
        p.push_back(pin(tg));
        return p;
      }(),
      this, nullptr);
}

Napi::Value LlamaWrap::Loss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<LlamaModel> core = this->core(env, "loss");
  int64_t B, T;
  shape_args(env, info, 2, "loss", &B, &T);
  const int64_t N = B * T;
  Napi::TypedArray in = typed(env, info[0], napi_int32_array, "Int32Array", N, "NativeLlama.loss: inputs", "B*T");
  Napi::TypedArray tg = typed(env, info[1], napi_int32_array, "Int32Array", N, "NativeLlama.loss: targets", "B*T");
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(in));
  pins.push_back(pin(tg));
  float* losses = nullptr;
  if (info.Length() > 4 && !info[4].IsNull() && !info[4].IsUndefined()) {
    Napi::TypedArray l = typed(env, info[4], napi_float32_array, "Float32Array", N, "NativeLlama.loss: losses", "B*T");
    losses = data_of<float>(l);
    pins.push_back(pin(l));
  }
  const int32_t* pin_in = data_of<int32_t>(in);
  const int32_t* pin_tg = data_of<int32_t>(tg);
  auto result = std::make_shared<LlamaModel::Loss>();
  return queue(
      env, "loss", [=] { *result = core->loss(pin_in, pin_tg, B, T, losses); },
      [result](Napi::Env e) {
        Napi::Object o = Napi::Object::New(e);
        o.Set("lossSum", result->sum);
        o.Set("count", double(result->count));
        return Napi::Value(o);
      },
      std::move(pins), this, nullptr);
}

Napi::Value LlamaWrap::Logits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<LlamaModel> core = this->core(env, "logits");
  int64_t B, T;
  shape_args(env, info, 1, "logits", &B, &T);
  const int64_t N = B * T, V = core->config().V;
  Napi::TypedArray tk = typed(env, info[0], napi_int32_array, "Int32Array", N, "NativeLlama.logits: tokens", "B*T");
  if (double(N) * double(V) > double(int64_t(1) << 50)) throw make_error(env, "E_ARGUMENT", "NativeLlama.logits: B*T*V is too large");
  Napi::TypedArray out = typed(env, info[3], napi_float32_array, "Float32Array", N * V, "NativeLlama.logits: out", "B*T*V");
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "logits", [=] { core->logits(p_tk, B, T, p_out); }, nullptr, std::move(pins), this, nullptr);
}

Napi::Value LlamaWrap::CreateCache(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  core(env, "createCache");
  return ctors_->cache.New({info.This(), info.Length() > 0 ? info[0] : env.Undefined(), info.Length() > 1 ? info[1] : env.Undefined()});
}

Napi::Value LlamaWrap::Prefill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<LlamaModel> core = this->core(env, "prefill");
  KvCacheWrap* cw = cache_arg(env, info[0], "prefill");
  std::shared_ptr<KvCache> cache = cw->use(env, "prefill", id_);
  const int64_t slot = int_arg(env, info[1], "NativeLlama.prefill: slot", 0, int64_t(1) << 31);  // range: engine
  Napi::TypedArray tk = typed(env, info[2], napi_int32_array, "Int32Array", -1, "NativeLlama.prefill: tokens", "");
  const int64_t T = int64_t(tk.ElementLength()), V = core->config().V;
  Napi::TypedArray out = typed(env, info[3], napi_float32_array, "Float32Array", V, "NativeLlama.prefill: out", "V", true);
  const int32_t* p_tk = data_of<int32_t>(tk);
  float* p_out = data_of<float>(out);
  std::vector<Napi::ObjectReference> pins;
  pins.push_back(pin(info.This()));
  pins.push_back(pin(info[0]));
  pins.push_back(pin(tk));
  pins.push_back(pin(out));
  return queue(env, "prefill", [=] { core->prefill(*cache, slot, p_tk, T, p_out); }, nullptr, std::move(pins), this, cw);
}

Napi::Value LlamaWrap::Decode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<LlamaModel> core = this->core(env, "decode");
  KvCacheWrap* cw = cache_arg(env, info[0], "decode");
  std::shared_ptr<KvCache> cache = cw->use(env, "decode", id_);
  Napi::TypedArray sl = typed(env, info[1], napi_int32_array, "Int32Array", -1, "NativeLlama.decode: slots", "");
  const int64_t R = int64_t(sl.ElementLength()), V = core->config().V;
  Napi::TypedArray tk = typed(env, info[2], napi_int32_array, "Int32Array", R, "NativeLlama.decode: tokens", "slots.length");
  Napi::TypedArray out = typed(env, info[3], napi_float32_array, "Float32Array", R * V, "NativeLlama.decode: out", "slots.length*V", true);
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
