// binding.cc: the CUDA Node addon bts_cuda.node (docs/CUDA.md, "The Node addon"). A separate binary
// from the portable CPU addon bts.node: node-gyp-build cannot tell two builds of one name apart, and
// the CPU addon must load on machines without any CUDA library.
//
// Exports:
//   probe()  -> {runtimeVersion, driverVersion, emulated, devices: [{index, name, cc, memory, sms,
//                supported}], error?}  Never throws: every failure (no libcuda.so.1, a driver older
//                than the runtime, no device) is a value in `error`. Run it in a child process first
//                (lib/device.ts does): a broken driver can crash the process that asks.
//   listOps() -> the registry's op specs that have a CUDA entry (the same names, tensors and scalars
//                as the CPU addon's listOps(), which the tests check)
//   callOp(name, tensors, scalars) / callOpAsync(...)  as the CPU addon's
//   llamaCreate(config, weights, options)  the device-resident Llama engine (native/cuda/engine/,
//                binding in engine/binding.cc; lib/engine/cuda-native.ts is its typed face)
//   stitchedCreate(config, hub, experts, spec, weights, options)  the stitched model on the device
//                (engine/stitched.cu, binding engine/stitched_binding.cc; lib/engine/cuda-stitched.ts)
//
// The op-level path: a call checks its arguments with the SAME code as the CPU addon (bts::check_call
// and the parse_<op> functions of bts/op_args.h, run on the host call before anything is allocated),
// copies every given host typed array to device memory (identical host ranges share one device buffer,
// so in-place calls stay in place), parses the call again with the device pointers, runs the CUDA
// entry bts::cuda::<op> on the addon's stream, copies every output argument back into its typed array
// and synchronises. Inputs that are also read as outputs (accumulated gradients, GEMM's C with beta,
// AdamW's state) are therefore copied both ways; write-only outputs are copied in too (the op contract
// does not say which outputs are read). Nothing stays on the device between calls: this is for single
// ops and tests; the engine keeps its tensors resident instead.
//
// Runtime: linked statically (cudart_static), so loading the addon needs no CUDA library at all; the
// driver library libcuda.so.1 is opened by the runtime on the first CUDA call (probe() checks for it
// first, to say what is missing). One device (index $BTS_CUDA_DEVICE, default 0), one non-blocking
// stream, and one call at a time (a mutex: async calls queue behind each other on libuv's threads).
// Every CUDA runtime call goes through BTS_CUDA_CHECK (E_CUDA with file and line); an error raised by
// a kernel asynchronously is caught by the checked synchronisation at the end of the call.
//
// Built twice by CMake: with nvcc's runtime (bts_cuda.node, only where nvcc exists) and against the
// SIMT emulator (bts_cuda_emu.node, BTS_CUDA_EMULATOR: the same kernels run on the CPU; "device memory"
// is host memory), which lets the test suite run this binding and every CUDA kernel through the
// package's TypeScript API on a machine without a GPU. The emulated build reports one device named
// "bts SIMT emulator (CPU)" with `emulated: true` and is only ever loaded through BTS_CUDA_PATH.
// Legend: see bts/common.h.
#include <napi.h>

#if defined(BTS_CUDA_EMULATOR)
#include "../emu/emu.h"
#else
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#endif

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "../binding/op_call.h"
#include "bts/op_args.h"
#include "bts/registry.h"
#include "bts_cuda.h"
#include "cuda_check.h"
#include "engine/binding.h"

namespace {

using bts::DType;
using bts::OpCall;
using bts::OpDef;

// ---------------------------------------------------------------------------------------------------
// The CUDA entry of every registry op. `check` parses the HOST call (lengths against the scalars, plus
// what only the host arrays can tell cheaply); `run` parses the DEVICE call and queues the entry.
struct CudaOp {
  const char* name;
  void (*check)(const OpDef& def, OpCall& host);
  void (*run)(const OpDef& def, OpCall& dev, cudaStream_t stream);
};

#define BTS_CUDA_OP(op, entry)                                                                     \
  CudaOp {                                                                                         \
    #op, [](const OpDef& d, OpCall& c) { (void)bts::parse_##op(d, c); },                           \
        [](const OpDef& d, OpCall& c, cudaStream_t s) { bts::cuda::entry(bts::parse_##op(d, c), s); } \
  }

const std::vector<CudaOp>& cuda_ops() {
  static const std::vector<CudaOp> ops = {
      BTS_CUDA_OP(gemm_f32, gemm_f32),  // fp32 SIMT GEMM, the CPU op's semantics (no tensor-core rounding)
      BTS_CUDA_OP(gemm_bf16, gemm_bf16),
      BTS_CUDA_OP(attention_forward, attention_forward),
      BTS_CUDA_OP(attention_backward, attention_backward),
      BTS_CUDA_OP(rmsnorm_forward, rmsnorm_forward),
      BTS_CUDA_OP(rmsnorm_backward, rmsnorm_backward),
      BTS_CUDA_OP(rope_table, rope_table),
      // The CUDA kernel writes NaN for a position outside the table rather than synchronising to check;
      // here the positions are on the host anyway, so they are checked like the CPU op does.
      CudaOp{"rope_forward", [](const OpDef& d, OpCall& c) { bts::check_rope_positions(bts::parse_rope_forward(d, c)); },
             [](const OpDef& d, OpCall& c, cudaStream_t s) { bts::cuda::rope_forward(bts::parse_rope_forward(d, c), s); }},
      BTS_CUDA_OP(swiglu_forward, swiglu_forward),
      BTS_CUDA_OP(swiglu_backward, swiglu_backward),
      BTS_CUDA_OP(embedding_forward, embedding_forward),
      BTS_CUDA_OP(embedding_backward, embedding_backward),
      BTS_CUDA_OP(cross_entropy, cross_entropy_forward_backward),
      BTS_CUDA_OP(adamw_step, adamw_step),
      BTS_CUDA_OP(stitch_eh_forward, stitch_eh_forward),
      BTS_CUDA_OP(stitch_eh_backward, stitch_eh_backward),
      BTS_CUDA_OP(stitch_he_forward, stitch_he_forward),
      BTS_CUDA_OP(stitch_he_backward, stitch_he_backward),
  };
  return ops;
}
#undef BTS_CUDA_OP

const CudaOp* find_cuda_op(const std::string& name) {
  for (const CudaOp& o : cuda_ops())
    if (name == o.name) return &o;
  return nullptr;
}

size_t dtype_bytes(DType t) {
  switch (t) {
    case DType::BF16: return 2;
    case DType::F32:
    case DType::I32: return 4;
    case DType::F64:
    case DType::I64: return 8;
  }
  return 8;
}

// ---------------------------------------------------------------------------------------------------
// Process-wide device state: the device index, its stream, and the lock that makes calls one at a time.
struct Backend {
  std::mutex mu;
  bool ready = false;
  int device = 0;
  cudaStream_t stream = nullptr;
};
Backend& backend() {
  static Backend b;
  return b;
}

// With backend().mu held: selects the device on the calling thread (a libuv worker for async calls)
// and creates the stream on first use.
void select_device(Backend& b) {
  if (!b.ready) {
    const char* env = std::getenv("BTS_CUDA_DEVICE");
    if (env && *env) {
      char* end = nullptr;
      const long v = std::strtol(env, &end, 10);
      if (*end || v < 0 || v > 1023)
        throw bts::Error("E_ARGUMENT", std::string("BTS_CUDA_DEVICE must be a device index (0, 1, ...), got '") + env + "'");
      b.device = int(v);
    }
  }
#if !defined(BTS_CUDA_EMULATOR)
  BTS_CUDA_CHECK(cudaSetDevice(b.device));
  if (!b.ready) BTS_CUDA_CHECK(cudaStreamCreateWithFlags(&b.stream, cudaStreamNonBlocking));
#else
  if (b.device != 0)
    throw bts::Error("E_ARGUMENT", "BTS_CUDA_DEVICE = " + std::to_string(b.device) + ": the emulator has one device (0)");
  if (!b.ready) BTS_CUDA_CHECK(cudaStreamCreate(&b.stream));
#endif
  b.ready = true;
}

// One device allocation, stream-ordered, freed when the call ends (also on an error).
struct DeviceBuffer {
  void* host = nullptr;
  size_t bytes = 0;
  void* dev = nullptr;
  cudaStream_t stream = nullptr;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (dev) cudaFreeAsync(dev, stream);  // an error here would only hide the one being reported
  }
};

// On every exit from a call, the stream has finished: no work of a failed call runs into the next one.
struct StreamDrain {
  cudaStream_t s;
  ~StreamDrain() { cudaStreamSynchronize(s); }
};

// The whole op-level call (see the header comment). `host` holds host pointers from the typed arrays.
void run_cuda(const std::string& name, OpCall& host) {
  const OpDef* def = bts::find_op(name);
  if (!def) throw bts::Error("E_UNKNOWN_OP", "unknown op '" + name + "'");
  const CudaOp* op = find_cuda_op(name);
  if (!op) throw bts::Error("E_UNSUPPORTED", name + ": this op has no CUDA kernel");
  bts::check_call(*def, host);
  op->check(*def, host);  // every length (and host-side value) checked before anything is allocated

  Backend& b = backend();
  std::lock_guard<std::mutex> lock(b.mu);
  select_device(b);
  cudaStream_t s = b.stream;
  StreamDrain drain{s};

  const size_t n = host.tensors.size();
  std::vector<DeviceBuffer> bufs(n);  // bufs[i] owns the buffer of argument i unless it shares one
  std::vector<int> owner(n, -1);      // index of the argument whose buffer argument i uses
  OpCall dev;
  dev.scalars = host.scalars;
  dev.tensors = host.tensors;
  for (size_t i = 0; i < n; i++) {
    const bts::TensorRef& t = host.tensors[i];
    if (!t.data) continue;
    const size_t bytes = size_t(t.length) * dtype_bytes(t.dtype);
    for (size_t j = 0; j < i; j++)
      if (owner[j] == int(j) && bufs[j].host == t.data && bufs[j].bytes == bytes) owner[i] = int(j);
    if (owner[i] < 0) {
      owner[i] = int(i);
      DeviceBuffer& d = bufs[i];
      d.host = t.data;
      d.bytes = bytes;
      d.stream = s;
      // At least 16 bytes: an empty argument still gets a valid, non-null device address (never read).
      BTS_CUDA_CHECK(cudaMallocAsync(&d.dev, bytes < 16 ? 16 : bytes, s));
      if (bytes) BTS_CUDA_CHECK(cudaMemcpyAsync(d.dev, t.data, bytes, cudaMemcpyHostToDevice, s));
    }
    dev.tensors[i].data = bufs[owner[i]].dev;
  }

  op->run(*def, dev, s);

  for (size_t i = 0; i < n; i++) {
    if (!host.tensors[i].data || !def->tensors[i].output) continue;
    bool done = false;  // an output sharing its buffer with an earlier output is copied once
    for (size_t j = 0; j < i; j++)
      if (owner[j] == owner[i] && host.tensors[j].data && def->tensors[j].output) done = true;
    const DeviceBuffer& d = bufs[owner[i]];
    if (!done && d.bytes) BTS_CUDA_CHECK(cudaMemcpyAsync(d.host, d.dev, d.bytes, cudaMemcpyDeviceToHost, s));
  }
  BTS_CUDA_CHECK(cudaStreamSynchronize(s));  // also reports a kernel's asynchronous failure
}

// ---------------------------------------------------------------------------------------------------
Napi::Value Probe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  Napi::Array devices = Napi::Array::New(env);
  o.Set("devices", devices);
#if defined(BTS_CUDA_EMULATOR)
  o.Set("runtimeVersion", 0);
  o.Set("driverVersion", 0);
  o.Set("emulated", true);
  Napi::Object d = Napi::Object::New(env);
  d.Set("index", 0);
  d.Set("name", "bts SIMT emulator (CPU)");
  d.Set("cc", "emulated");
  d.Set("memory", 0);
  d.Set("sms", 1);
  d.Set("supported", true);
  devices.Set(uint32_t(0), d);
#else
  o.Set("emulated", false);
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);  // the statically linked runtime: needs no driver
  o.Set("runtimeVersion", runtime);
  auto ver = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
  // The runtime opens the driver library itself; opening it first lets the error name it.
  if (!dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL)) {
    const char* why = dlerror();
    o.Set("driverVersion", 0);
    o.Set("error", std::string("libcuda.so.1 (the NVIDIA driver library) could not be loaded") +
                       (why ? std::string(": ") + why : std::string()) + "; install the NVIDIA driver");
    return o;
  }
  cudaDriverGetVersion(&driver);
  o.Set("driverVersion", driver);
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    std::string msg = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
    if (driver > 0 && driver / 1000 < runtime / 1000)
      msg += "; the NVIDIA driver supports CUDA " + ver(driver) + " but this addon was built with CUDA " + ver(runtime) +
             ": update the driver";
    o.Set("error", msg);
    cudaGetLastError();
    return o;
  }
  uint32_t k = 0;
  for (int i = 0; i < count; i++) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    Napi::Object d = Napi::Object::New(env);
    d.Set("index", i);
    d.Set("name", std::string(p.name));
    d.Set("cc", std::to_string(p.major) + "." + std::to_string(p.minor));
    d.Set("memory", double(p.totalGlobalMem));
    d.Set("sms", p.multiProcessorCount);
    // The kernels need sm_80 (bf16 WMMA); the binary holds sm_80 and sm_90 code plus PTX for newer.
    d.Set("supported", p.major >= 8);
    devices.Set(k++, d);
  }
  if (count == 0) o.Set("error", "no CUDA device found");
#endif
  return o;
}

Napi::Value CallOp(const Napi::CallbackInfo& info) { return bts::napi::call_sync(info, run_cuda); }

Napi::Value CallOpAsync(const Napi::CallbackInfo& info) { return bts::napi::call_async(info, run_cuda); }

Napi::Value ListOps(const Napi::CallbackInfo& info) {
  return bts::napi::list_ops(info.Env(), [](const char* name) { return find_cuda_op(name) != nullptr; });
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("probe", Napi::Function::New(env, Probe));
  exports.Set("listOps", Napi::Function::New(env, ListOps));
  exports.Set("callOp", Napi::Function::New(env, CallOp));
  exports.Set("callOpAsync", Napi::Function::New(env, CallOpAsync));
  bts::cuda::register_llama(env, exports);  // llamaCreate: the device-resident engine (engine/binding.cc)
  bts::cuda::register_stitched(env, exports);  // stitchedCreate: the stitched model (engine/stitched_binding.cc)
  return exports;
}

}  // namespace

// The engine's models use the addon's device (engine/binding.h): selected here, under the same lock
// and with the same BTS_CUDA_DEVICE parsing as the op path.
int bts::cuda::addon_device() {
  Backend& b = backend();
  std::lock_guard<std::mutex> lock(b.mu);
  select_device(b);
  return b.device;
}

NODE_API_MODULE(bts_cuda, Init)
