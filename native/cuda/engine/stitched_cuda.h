// stitched_cuda.h: the stitched model of ../shared/METHOD.md on CUDA, device-resident: a frozen hub and
// n frozen experts (Llamas of one architecture) joined by K trainable stitch layers, with the same
// calls and semantics as the CPU engine's StitchedModel (native/engine/stitched.h) for fp32 weights:
// training step (stitch gradients only), loss, logits, the gate record and KV-cached prefill / decode.
// Every model's weights and the stitch tensors are copied to the device once at creation;
// activations, workspaces, the stitch gradients and the KV caches live in device memory; all work of
// a call is queued on the model's one stream and the call synchronises once at its end, when its
// results are on the host.
//
// Shape legend (native/engine/stitched.h): B batch, T tokens per sequence, N = B*T rows, D hidden,
// V vocab, L blocks, n experts, M = n + 1 models (model 0 the hub, model e+1 expert e), K stitches.
// Stitch tensors (docs/FORMAT.md): `stitch.{k}.proj.{e}.weight` [D, D], `stitch.{k}.gate.weight`
// [D*M, D] (row d*M + m = model m's logit at dim d).
//
// Why it is shaped this way
// - Mirror of the CPU engine: the same data flow (stitched.cc's header), the same buffers in device
//   memory, built from the CUDA Llama engine's block functions (block.cu: block_forward /
//   block_backward with g = null, i.e. input gradients only) and the fused stitch ops of bts_cuda.h
//   (stitch_eh_* / stitch_he_*). The cost rules are the CPU engine's: blocks up to the first trained
//   stitch forward-only, frozen blocks input gradients only, expert blocks after the last E->H stitch
//   never run, H->E stitches after it skipped, the first trained stitch computes no input gradients.
// - Backend-neutral pieces are REUSED from native/engine/stitched.h: plan_stitches (spec validation
//   and placement), StitchPlan::active / first_trained, the stitch tensor table (stitch_tensors), the
//   gate-dropout hash (stitch_mix64 / stitch_dropout_key, constexpr so the kernel below calls the
//   same definition: the masks are the CPU engine's bit for bit) and gate_means (the gate record is
//   computed on the host from the device logits). Config and argument checks are llama.h's.
// - Stitch gradients are chosen by name (`trained`) and ACCUMULATED (+=) on the device;
//   download_grads copies them to host arrays, zero_grads clears them and upload_weights replaces
//   stitch tensors, so a host-side optimizer can drive training. adamw_step is the device optimizer,
//   as CudaLlamaModel's: the weight arena holds the trained tensors first and the gradient and moment
//   arenas cover that prefix with the same offsets, so one cuda::adamw_step (global norm, clip,
//   update) updates every trained stitch tensor in place; upload_moments / download_moments move the
//   moments by name (checkpoints).
// - Plain C++ header (no CUDA headers), as llama_cuda.h: the Node binding includes it.
//
// - KV-cached prefill / decode mirror stitched.cc's decode_rows: the caches are the CPU engine's
//   StitchedCache bookkeeping (ModelCaches) over one DeviceKvCache per model; block j of every model
//   through block_decode (block.cu), then the stitch at j on the rows, then the hub's head.
//
// Known limits: fp32 weights only (E_UNSUPPORTED for bf16); the device optimizer's global norm is
// summed in another order than the CPU's flat buffer (equal to rounding, not bit for bit); the
// models run one after the other (no grouped launch of the M models' blocks, in decode one attention
// launch per slot and model); verified under the SIMT emulator only (docs/CUDA.md).
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "../../engine/stitched.h"
#include "llama_cuda.h"

namespace bts {
namespace cuda {

// Glue of the stitched engine (stitched.cu): the gate-dropout mask and the hub bias on gate logits,
// in place. For i < n (x viewed flat as [rows, D*M], so i = row*D*M + col and the model slot is
// m = i % M): x[i] = 0 when threshold != 0 and stitch_mix64(key + i) < threshold; then, when bias
// != 0, x[i] += bias on slot m = 0 (eh) or x[i] -= bias on slots m >= 1 (!eh). With bias 0 it masks a
// gradient dG the same way.
struct StitchGateParams {
  int64_t n = 0;                    // rows * D * M entries
  int64_t M = 0;                    // models
  uint64_t key = 0;                 // stitch_dropout_key(seed, k)
  uint64_t threshold = 0;           // stitch_dropout_threshold(p); 0: no mask
  float bias = 0.f;                 // hub bias (0: none)
  bool eh = true;                   // E->H (bias on the hub slot) or H->E (minus bias on the expert slots)
  float* x = nullptr;               // [rows, D*M]
};
void stitch_gate_mask(const StitchGateParams& p, cudaStream_t stream);

namespace engine {

using bts::engine::StitchPlan;
using bts::engine::StitchSpec;
using bts::engine::StitchTensor;
using bts::engine::StitchType;

// The KV caches of a stitched model on the device: one DeviceKvCache per model (hub first), the same
// slots and capacity, advanced together; the bookkeeping is the CPU StitchedCache's (stitched.h).
using DeviceStitchedCache = bts::engine::ModelCaches<DeviceKvCache>;

class CudaStitchedModel {
 public:
  using Loss = bts::engine::LlamaModel::Loss;
  using HostTensor = CudaLlamaModel::HostTensor;  // {name, host float* of the tensor's numel}

  // Validates the config, every model's host weights (present, fp32), the spec (plan_stitches) and
  // the stitch tensors (every one present), copies everything to device `device`, and allocates zeroed
  // gradient buffers for the stitch tensor names in `trained` (null or empty: frozen; an unknown
  // name: E_ARGUMENT). Host arrays are not referenced after the constructor.
  CudaStitchedModel(const LlamaConfig& c, const ModelWeights& hub, const std::vector<ModelWeights>& experts, const StitchSpec& spec,
                    const bts::engine::StitchWeights& w, const std::set<std::string>* trained, int device);
  ~CudaStitchedModel();
  CudaStitchedModel(const CudaStitchedModel&) = delete;
  CudaStitchedModel& operator=(const CudaStitchedModel&) = delete;

  const LlamaConfig& config() const { return c_; }
  int64_t experts() const { return plan_.n; }
  int64_t models() const { return plan_.M; }
  int64_t stitches() const { return plan_.K; }
  const std::vector<StitchTensor>& tensors() const { return tensors_; }
  bool trainable() const { return trainable_; }
  bool has_grad(const std::string& name) const;
  int device() const { return device_; }

  // As StitchedModel (stitched.h), host arrays in and out: training step on inputs [B, T], targets
  // [B, T] (-100 ignored), stitch gradients of grad_scale * lossSum ACCUMULATED on the device, gate
  // dropout seeded by dropout_seed (E_ARGUMENT when frozen); forward-only loss (losses [N] host or
  // null); the hub's logits out [B*T, V]; the gate record out [K, T, M] of one sequence tokens [T].
  Loss forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float grad_scale, uint64_t dropout_seed);
  Loss loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float* losses);
  void logits(const int32_t* tokens, int64_t B, int64_t T, float* out);
  void gates(const int32_t* tokens, int64_t T, float* out);
  // KV-cached generation, as StitchedModel::prefill / decode: every model runs on every token against
  // its own cache (expert blocks after the last E->H stitch never run), the stitches act on the rows,
  // out = the hub's logits: prefill appends tokens [T] to `slot` of every model's cache, out [V] (host)
  // of the last token; decode appends tokens [R] to R distinct slots, out [R, V] (host). Slots,
  // capacity, token ids and the cache's shape are checked on the host before anything is queued.
  void prefill(DeviceStitchedCache& cache, int64_t slot, const int32_t* tokens, int64_t T, float* out);
  void decode(DeviceStitchedCache& cache, const int32_t* slots, const int32_t* tokens, int64_t R, float* out);
  // Device KV caches for this model: `slots` sequences of up to `capacity` tokens per model
  // (E_ARGUMENT / E_OUT_OF_MEMORY; the CPU cache's checks).
  std::shared_ptr<DeviceStitchedCache> create_cache(int64_t slots, int64_t capacity);

  // Host <-> device copies of whole stitch tensors by name (each `data` holds the tensor's numel
  // floats). E_ARGUMENT for an unknown name or (grads) a tensor without a gradient, checked before
  // anything is copied.
  void upload_weights(const std::vector<HostTensor>& w);
  void download_weights(const std::vector<HostTensor>& out);
  void download_grads(const std::vector<HostTensor>& out) { grads_copy(out, false); }
  // Replaces gradients (e.g. by host copies masked to trainable slices, lib/stitch/model.ts).
  void upload_grads(const std::vector<HostTensor>& g) { grads_copy(g, true); }
  void zero_grads();  // every stitch gradient = 0

  // One AdamW step on the device over every stitch tensor with a gradient, the semantics of
  // AdamWParams in bts/ops.h (global gradient-norm clipping, bias correction by `step`, decoupled
  // weight decay on every element: each stitch tensor is a matrix, as the host layout's nDecay =
  // params.length says). Moments start at zero unless uploaded. Returns the global gradient norm
  // before clipping. E_ARGUMENT for frozen stitches or bad hyper-parameters (before anything runs).
  using OptimStep = AdamWHyper;
  float adamw_step(const OptimStep& o);
  // AdamW moments by stitch tensor name (tensors with a gradient; E_ARGUMENT otherwise), host <-> device.
  void upload_moments(const std::vector<HostTensor>& m, const std::vector<HostTensor>& v) { moments_copy(m, v, true); }
  void download_moments(const std::vector<HostTensor>& m, const std::vector<HostTensor>& v) { moments_copy(m, v, false); }

  void release();  // frees the workspaces (they regrow on the next call)
  // Device bytes of the workspaces, and of everything the model holds (plus weights and gradients).
  // Lock-free: may be read during a call.
  size_t workspace_bytes() const;
  size_t device_bytes() const;

 private:
  struct Drain;  // synchronises the stream on every exit from a call
  void activate() const;
  const StitchTensor& tensor(const std::string& name, const char* op) const;
  const ModelWeights& model(int64_t m) const { return mw_[size_t(m)]; }
  bool eh(int64_t k) const { return spec_.stitches[size_t(k)].type == StitchType::EH; }
  bool active(int64_t k) const { return plan_.active(spec_, k); }
  const float* proj(int64_t k, int64_t e) const { return wdev_[size_t(k * (plan_.n + 1) + e)]; }
  const float* gate(int64_t k) const { return wdev_[size_t(k * (plan_.n + 1) + plan_.n)]; }
  float* proj_grad(int64_t k, int64_t e) const { return gdev_[size_t(k * (plan_.n + 1) + e)]; }
  float* gate_grad(int64_t k) const { return gdev_[size_t(k * (plan_.n + 1) + plan_.n)]; }
  int32_t* upload_ids(DeviceBuffer& buf, const int32_t* host, int64_t n);
  void embed(int64_t m, const int32_t* ids, int64_t n, float* out);
  // Stitch k's gate logits G [rows, D*M] from the hub state h0 [rows, D], hub bias added; with
  // `dropout` the learned part is masked first (seed).
  void gate_logits(int64_t k, const float* h0, int64_t rows, float* G, bool dropout, uint64_t seed);
  // Forward of stitch k in place (as the CPU engine's stitch_inplace): hub x0 [rows, D], experts xs
  // [n, rows, D], scratch mixed [n, rows, D], G [rows, D*M]; E->H "projected" swaps xs and mixed.
  void stitch_inplace(int64_t k, int64_t rows, float* x0, float*& xs, float*& mixed, float* G);
  // Inference forward of ids (device) [B, T]; returns the hub's final state [N, D] (device).
  // gates_out (host, may be null): the gate record [K, N, M].
  float* forward_infer(const int32_t* ids, int64_t B, int64_t T, float* gates_out);
  // The hub's logits of h [rows, D] (device): final norm, head; copied to out [rows, V] (host).
  void hub_logits(const float* h, int64_t rows, float* out);
  void check_cache(const char* op, DeviceStitchedCache& cache) const;
  // Rows of tokens (host) against the caches; logits of rows out_row0..R-1 into out (host).
  void decode_rows(DeviceStitchedCache& cache, const DecodeSegment* segs, int64_t nsegs, const int32_t* tokens, int64_t R,
                   int64_t out_row0, float* out);
  // The hub's final norm and fused LM-head cross-entropy of h [N, D] against targets [N] (device):
  // losses [N] (device, may be null); with dh (device [N, D]) the gradient w.r.t. h (frozen head).
  void hub_loss(const float* h, int64_t N, const int32_t* targets, float* losses, float grad_scale, float* dh);
  Loss read_loss();
  size_t trained_index(const std::string& name, const char* op) const;  // tensor with a gradient, or E_ARGUMENT
  void grads_copy(const std::vector<HostTensor>& t, bool upload);
  void moments_copy(const std::vector<HostTensor>& m, const std::vector<HostTensor>& v, bool upload);

  LlamaConfig c_;
  StitchSpec spec_;
  StitchPlan plan_;
  std::vector<StitchTensor> tensors_;        // the format's table: per stitch n projections, then the gate
  std::vector<int64_t> w_off_, g_off_;       // per tensor: float offset in the arenas (g: -1 = frozen; else g = w)
  int64_t train_end_ = 0;                    // floats [0, train_end_) of the weight arena are the trained tensors
  std::vector<float*> wdev_;                 // per tensor: device pointer of the weight
  std::vector<float*> gdev_;                 // per tensor: device pointer of the gradient (null: frozen)
  int64_t first_trained_ = 0;                // lowest ACTIVE stitch with a gradient (K: none)
  bool trainable_ = false;
  int device_ = 0;
  cudaStream_t s_ = nullptr;
  mutable std::mutex mu_;

  std::vector<std::unique_ptr<DeviceBuffer>> model_bufs_;  // [M] each model's weights arena
  std::vector<ModelWeights> mw_;                           // [M] device pointers into them
  DeviceBuffer sw_, sg_;                                   // stitch weights and gradients arenas
  DeviceAdamW opt_;  // AdamW moments, layout of sg_ (made by the first optimizer call)

  DeviceWorkspace ws_;
  DevicePositions rows_;
  DeviceBuffer x0_, xs_, mix_, G_, xf_, rstdf_, states_, dh0_, dhs_, dtmp_, dG_, ids_, tg_, losses_, logits_, scalars_;
  std::vector<BlockActs> act_views_;
  std::vector<float> gates_host_;  // [N, D*M] one stitch's logits for gate_means
  std::vector<DecodeSegment> segs_;
};

}  // namespace engine
}  // namespace cuda
}  // namespace bts
