// llama_cuda.h: the Llama engine on CUDA, device-resident: the same model, calls and semantics as the
// CPU engine's LlamaModel (native/engine/llama.h) for fp32 weights, with the weights copied to the
// device once at creation and every activation, workspace, gradient and KV cache kept in device
// memory. All work of a call is queued on the model's one stream through the bts::cuda:: op entries
// (bts_cuda.h) plus the small glue entries below (glue.cu); a call synchronises once at its end, when
// its results (logits, loss) have been copied back to the host.
//
// Shape legend (native/engine/llama.h): B batch, T tokens per sequence, N = B*T rows, D hidden,
// F ffn width, H / Hkv heads, Dh head dim, QD = H*Dh, KD = Hkv*Dh, V vocab, L layers, S cache slots,
// Tcap cache capacity, R decode rows. Row-major; Linear weights [out, in] (HF).
//
// Why it is shaped this way
// - Mirror of the CPU engine: block_forward / block_backward / block_decode over explicit device
//   buffers (block.cu), the model level in llama.cu. Backend-neutral pieces are REUSED from
//   native/engine (linked into both CUDA addons): LlamaConfig and validate_config, the HF tensor table
//   (tensor_specs, bind_weight, bind_grad), the pointer structs ModelWeights / ModelGrads / BlockCtx /
//   DecodeCtx / BlockActs (here holding device pointers; BlockActs::bind lays out the saved
//   activations exactly as on the CPU), Workspace::Slot, the argument checks (check_batch,
//   check_token_ids, check_rows) and the KV slot bookkeeping (KvSlots, prefill_segment,
//   decode_segments). So errors read the same on both engines.
// - Token ids, targets and slots are checked on the HOST before anything is queued (as the CPU engine
//   does); the ids are then copied to the device with the call.
// - Gradients live on the device, ACCUMULATED (+=) by forward_backward; download_grads copies them
//   to host arrays, zero_grads clears them and upload_weights replaces weights, so a host-side
//   optimizer can drive training. adamw_step is the device-side optimizer: the AdamW moments live in
//   device arenas laid out like the gradients (upload_moments / download_moments move them by HF name
//   for checkpoints), and one fused launch pair (cuda::adamw_step: global norm, clip, update) updates
//   every trained weight in place, with nothing crossing the bus but the gradient norm.
// - Plain C++ header (no CUDA headers): the Node binding (g++) includes it; cudaStream_t comes from
//   bts_cuda.h (the emulator's emu.h must be included first in an emulated build, as bts_cuda.h says).
//
// Known limits: fp32 weights only (bf16 weights are refused with E_UNSUPPORTED; the CPU engine's bf16
// mixed precision is not mirrored yet); one device per model; decode attention runs one launch per
// slot (as the CPU engine's per-slot attention); embedding_* and cross-entropy synchronise the stream
// once per call to check ids on the device (redundant with the host check); nothing has run on a real
// GPU yet (docs/CUDA.md).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "../../engine/llama.h"
#include "../bts_cuda.h"

namespace bts {
namespace cuda {

// ---------------------------------------------------------------------------------------------------
// Glue entries of the engine (glue.cu): kernel, launcher, entry as the op files.

// out[i] = a[i] + b[i] for i < n (out may alias a or b).
struct AddParams {
  int64_t n = 0;
  const float* a = nullptr;  // [n]
  const float* b = nullptr;  // [n]
  float* out = nullptr;      // [n]
};
void add_f32(const AddParams& p, cudaStream_t stream);

namespace engine {

using bts::engine::BlockActs;
using bts::engine::BlockCtx;
using bts::engine::DecodeCtx;
using bts::engine::DecodeSegment;
using bts::engine::LayerGrads;
using bts::engine::LayerWeights;
using bts::engine::LlamaConfig;
using bts::engine::ModelGrads;
using bts::engine::ModelWeights;
using bts::engine::TensorSpec;

// One device allocation (cudaMalloc), grown on demand, freed at destruction. Growing frees the old
// allocation first (cudaFree waits for the device, so no queued work still uses it).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* grow(size_t bytes, const char* what);  // at least `bytes` (contents lost when it grows); E_OUT_OF_MEMORY
  float* floats(int64_t n, const char* what) { return static_cast<float*>(grow(size_t(n) * sizeof(float), what)); }
  void* get() const { return p_; }
  size_t bytes() const { return bytes_.load(std::memory_order_relaxed); }  // may be read while a call runs
  void release();

 private:
  void* p_ = nullptr;
  std::atomic<size_t> bytes_{0};
};

// Device scratch of the block functions (one layer's worth), by the CPU Workspace's slots.
class DeviceWorkspace {
 public:
  float* get(bts::engine::Workspace::Slot s, int64_t n);
  size_t bytes() const;
  void release();

 private:
  DeviceBuffer bufs_[bts::engine::Workspace::kCount];
};

// ---------------------------------------------------------------------------------------------------
// Block level (block.cu): the CPU engine's block functions with device buffers, on `stream`. Weights
// fp32 (w.*.f32 device pointers); ctx.rope and ctx.pos are device pointers, DecodeCtx.segs a host array.

void block_forward(const LlamaConfig& c, const LayerWeights& w, const BlockCtx& ctx, const float* x_in /*[N,D]*/,
                   float* x_out /*[N,D]*/, BlockActs* save, DeviceWorkspace& ws, cudaStream_t stream);
void block_backward(const LlamaConfig& c, const LayerWeights& w, const LayerGrads* g, const BlockActs& acts,
                    const float* dx_out /*[N,D]*/, float* dx_in /*[N,D] or null*/, DeviceWorkspace& ws, cudaStream_t stream);
// k_cache, v_cache: [S, Tcap, Hkv, Dh] of this layer (device).
void block_decode(const LlamaConfig& c, const LayerWeights& w, const DecodeCtx& ctx, float* k_cache, float* v_cache,
                  float* x /*[R,D]*/, DeviceWorkspace& ws, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// A KV cache in device memory: per layer K and V [S, Tcap, Hkv, Dh] fp32 (keys after RoPE), lengths
// and their checks as the CPU cache (KvSlots).
class DeviceKvCache : public bts::engine::KvSlots {
 public:
  DeviceKvCache(const LlamaConfig& c, int64_t slots, int64_t capacity);  // E_ARGUMENT / E_OUT_OF_MEMORY
  float* k(int64_t layer) { return base() + (2 * layer) * per_; }
  float* v(int64_t layer) { return base() + (2 * layer + 1) * per_; }
  size_t bytes() const { return buf_.bytes(); }

 private:
  float* base() { return static_cast<float*>(buf_.get()); }
  int64_t per_ = 0;  // floats per layer and tensor: S * Tcap * KD
  DeviceBuffer buf_;
};

// RoPE table [P, Dh/2, 2] on the device (grown to the longest P asked for, by cuda::rope_table) and
// the positions of a call's rows, computed on the host and copied to the device.
class DevicePositions {
 public:
  BlockCtx sequences(const LlamaConfig& c, int64_t B, int64_t T, cudaStream_t s);
  DecodeCtx decode(const LlamaConfig& c, const DecodeSegment* segs, int64_t nsegs, int64_t R, int64_t Tcap, cudaStream_t s);
  void release();
  size_t bytes() const { return rope_.bytes() + pos_.bytes(); }

 private:
  void ensure_rope(const LlamaConfig& c, int64_t P, cudaStream_t s);
  const int32_t* upload(cudaStream_t s);
  DeviceBuffer rope_, pos_;
  int64_t rope_P_ = 0;
  std::vector<int32_t> host_;
};

// The hyper-parameters of one device AdamW step (the engines' adamw_step; semantics of AdamWParams in
// bts/ops.h). Parsed from JS by parse_adamw_hyper (binding.h), shared by both CUDA engine bindings.
struct AdamWHyper {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.f, max_grad_norm = 0.f;
  int64_t step = 1;
};

// The device optimizer state of a device-resident model (CudaLlamaModel, CudaStitchedModel; glue.cu):
// AdamW moments m, v [n] laid out like the model's trained arena prefix (weights and gradients at the
// same offsets), allocated zeroed on first use, and one fused cuda::adamw_step over that prefix. The
// caller holds its model's lock and stream.
class DeviceAdamW {
 public:
  // Moments of n floats, zeroed, the first time (n == 0: nothing to allocate).
  void ensure(int64_t n, cudaStream_t s);
  // One step over p, g [n] (n of ensure; [0, n_decay) decays); `scratch` holds the norm on the device.
  // Synchronises `s`; returns the global gradient norm before clipping. E_ARGUMENT for bad h.
  float step(float* p, const float* g, int64_t n_decay, const AdamWHyper& h, DeviceBuffer& scratch, cudaStream_t s);
  // Queues a copy of moment `which` (0: m, 1: v) floats [off, off + count) to (upload) or from a host array.
  void copy(int which, int64_t off, int64_t count, float* host, bool upload, cudaStream_t s);
  size_t bytes() const { return m_.bytes() + v_.bytes(); }
  void release() {
    m_.release();
    v_.release();
    n_ = 0;
  }

 private:
  DeviceBuffer m_, v_;
  int64_t n_ = 0;
};

// ---------------------------------------------------------------------------------------------------
// The whole model on one device. Public calls are serialised by a mutex (one stream, shared
// workspaces), validate their arguments before queuing anything, and return when their results are
// on the host.
class CudaLlamaModel {
 public:
  using Loss = bts::engine::LlamaModel::Loss;

  // A host array of a tensor by HF name (numel floats of tensor_specs(c)).
  struct HostTensor {
    std::string name;
    float* data = nullptr;
  };

  // Validates the config and every host weight (fp32 only), copies them to device `device`, and
  // allocates zeroed gradient buffers for the names in `trained` (null or empty: frozen; tied: the LM
  // head's gradient is the embedding's). Host weights are not referenced after the constructor.
  CudaLlamaModel(const LlamaConfig& c, const ModelWeights& host, const std::set<std::string>* trained, int device);
  ~CudaLlamaModel();
  CudaLlamaModel(const CudaLlamaModel&) = delete;
  CudaLlamaModel& operator=(const CudaLlamaModel&) = delete;

  const LlamaConfig& config() const { return c_; }
  const std::vector<TensorSpec>& specs() const { return specs_; }
  bool trainable() const { return trainable_; }
  bool has_grad(const std::string& name) const;
  int device() const { return device_; }

  // As LlamaModel (llama.h): loss over targets (-100 ignored), gradients of grad_scale * lossSum
  // ACCUMULATED into the device gradients. Host arrays in, host results out.
  Loss forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float grad_scale);
  Loss loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float* losses /*[N] host or null*/);
  void logits(const int32_t* tokens, int64_t B, int64_t T, float* out /*[B*T, V] host*/);
  void prefill(DeviceKvCache& cache, int64_t slot, const int32_t* tokens, int64_t T, float* out /*[V] host*/);
  void decode(DeviceKvCache& cache, const int32_t* slots, const int32_t* tokens, int64_t R, float* out /*[R, V] host*/);

  // A device KV cache of `slots` sequences of up to `capacity` tokens for this model (E_ARGUMENT /
  // E_OUT_OF_MEMORY; the argument checks of the CPU cache).
  std::shared_ptr<DeviceKvCache> create_cache(int64_t slots, int64_t capacity);

  // Host <-> device copies of whole tensors by HF name (each `data` holds the tensor's numel floats).
  // E_ARGUMENT for an unknown name, or (grads) a tensor without a gradient; checked before copying.
  void upload_weights(const std::vector<HostTensor>& w);
  void download_weights(const std::vector<HostTensor>& out);
  void download_grads(const std::vector<HostTensor>& out);
  void zero_grads();  // every gradient buffer = 0

  // One AdamW step on the device over every trained tensor (semantics of AdamWParams in bts/ops.h:
  // global gradient-norm clipping, bias correction by `step`, decoupled weight decay on matrices and
  // embeddings only, never on norm gains). Moments start at zero unless uploaded. Returns the global
  // gradient norm before clipping. E_ARGUMENT for a frozen model or bad hyper-parameters.
  using OptimStep = AdamWHyper;
  float adamw_step(const OptimStep& o);
  // Moments by HF name (trained tensors only; E_ARGUMENT otherwise), host <-> device.
  void upload_moments(const std::vector<HostTensor>& m, const std::vector<HostTensor>& v) { moments_copy(m, v, true); }
  void download_moments(const std::vector<HostTensor>& m, const std::vector<HostTensor>& v) { moments_copy(m, v, false); }

  void release();                 // frees the workspaces (they regrow on the next call)
  // Device bytes of the workspaces (activations, scratch, RoPE table, positions, ids, logits), and of
  // everything the model holds (plus weights and gradients). Lock-free: may be read during a call.
  size_t workspace_bytes() const;
  size_t device_bytes() const;

 private:
  struct Drain;  // synchronises the stream on every exit from a call
  void activate() const;  // cudaSetDevice on the calling thread (libuv workers)
  const TensorSpec& spec(const std::string& name, const char* op) const;
  int32_t* upload_ids(DeviceBuffer& buf, const int32_t* host, int64_t n);
  void embed(const int32_t* ids, int64_t n, float* out);
  const float* forward_nosave(const int32_t* ids, int64_t B, int64_t T);
  void head_loss(const float* xf, int64_t N, const int32_t* targets, float* losses, float grad_scale, float* dx, float* dw);
  Loss read_loss();
  void moments_copy(const std::vector<HostTensor>& m, const std::vector<HostTensor>& v, bool upload);
  void decode_rows(DeviceKvCache& cache, const DecodeSegment* segs, int64_t nsegs, const int32_t* tokens, int64_t R,
                   int64_t out_row0, float* out);

  LlamaConfig c_;
  std::vector<TensorSpec> specs_;
  std::vector<int64_t> w_off_, g_off_;  // per spec: float offset in the arenas (g: -1 = no gradient)
  int device_ = 0;
  cudaStream_t s_ = nullptr;
  mutable std::mutex mu_;

  DeviceBuffer weights_, grads_;  // arenas (every tensor 256-byte aligned; trained prefix shared, see the constructor)
  DeviceAdamW opt_;               // AdamW moments, layout of grads_ (allocated by the first optimizer call)
  int64_t decay_end_ = 0;         // floats [0, decay_end_) of the arenas are trained matrices (decayed)
  int64_t train_end_ = 0;         // floats [0, train_end_) are trained tensors (the gradient arena's extent)
  ModelWeights w_;                // device pointers into weights_
  ModelGrads g_;                  // device pointers into grads_
  bool trainable_ = false;
  int64_t lowest_ = 0;            // lowest layer whose backward runs (L when none); 0 when the embedding trains

  DeviceWorkspace ws_;
  DevicePositions rows_;
  DeviceBuffer stream_, acts_, xf_, rstdf_, dx_, x_, ids_, tg_, losses_, logits_, scalars_;
  std::vector<BlockActs> act_views_;
  std::vector<DecodeSegment> segs_;
};

}  // namespace engine
}  // namespace cuda
}  // namespace bts
