// cuda/engine/llama.cu: the model level of the CUDA engine (llama_cuda.h): weights and gradients in
// device arenas, the device KV cache, RoPE table and row positions, and the whole-model calls
// (training step, loss, logits, prefill, decode) chaining embedding -> L blocks (block.cu) -> final
// RMSNorm -> fused LM-head cross-entropy or logits, exactly as native/engine/llama.cc does on the CPU.
//
// Training step (forward_backward), N = B*T rows, everything on the device:
//   x_0 = embed(inputs)                          stream [(L+1), N, D]
//   x_{i+1} = block_i(x_i)                       saving activations for layers >= lowest_
//   xf = norm(x_L)                               [N, D], rstd [N]
//   loss, dxf = cross_entropy(xf, head, targets) fused over the vocabulary (no [N, V] matrix)
//   dx = norm_backward(dxf); blocks backward from L-1 down to lowest_ (in place on dx [N, D])
//   dembed += scatter(dx)                        when the embedding trains
// then the loss sum and count are copied to the host and the stream is synchronised.
//
// Synchronisation: each call ends with one cudaStreamSynchronize (results on the host); besides,
// cuda::embedding_* and cuda::cross_entropy_forward_backward synchronise once each to check ids on the
// device (docs/CUDA.md), and cuda::rope_table when the RoPE table grows. Host token arrays are copied
// with cudaMemcpyAsync from pageable memory (staged by the driver, so the host arrays may change once
// the call returned). On any exit, also by an exception, the stream is drained first (Drain), so no
// queued work outlives the buffers or the arrays of a failed call.
//
// Known limits: see llama_cuda.h (fp32 only; one device; per-slot decode attention).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "../common.cuh"
#include "llama_cuda.h"

namespace bts {
namespace cuda {
namespace engine {

namespace {

std::string S(int64_t x) { return std::to_string(x); }
[[noreturn]] void fail(const char* code, const std::string& msg) { throw Error(code, msg); }

constexpr int64_t kAlign = 64;  // floats: every tensor of an arena starts on a 256-byte boundary
int64_t aligned(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Device KV cache and positions.

DeviceKvCache::DeviceKvCache(const LlamaConfig& c, int64_t slots, int64_t capacity) : KvSlots(c, slots, capacity) {
  per_ = slots * capacity * c.Hkv * c.Dh;
  buf_.grow(size_t(2 * c.L * per_) * sizeof(float), "createCache");
}

void DevicePositions::ensure_rope(const LlamaConfig& c, int64_t P, cudaStream_t s) {
  if (P <= rope_P_) return;
  rope_P_ = 0;
  RopeTableParams p;
  p.P = P, p.Dh = c.Dh, p.theta = c.rope.theta;
  p.factor = c.rope.factor, p.low_freq_factor = c.rope.low_freq_factor, p.high_freq_factor = c.rope.high_freq_factor;
  p.original_max_position_embeddings = c.rope.original_max_position_embeddings;
  p.table = rope_.floats(P * c.Dh, "RoPE table");
  rope_table(p, s);  // synchronises
  rope_P_ = P;
}

const int32_t* DevicePositions::upload(cudaStream_t s) {
  int32_t* d = static_cast<int32_t*>(pos_.grow(host_.size() * sizeof(int32_t), "row positions"));
  BTS_CUDA_CHECK(cudaMemcpyAsync(d, host_.data(), host_.size() * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  return d;
}

BlockCtx DevicePositions::sequences(const LlamaConfig& c, int64_t B, int64_t T, cudaStream_t s) {
  ensure_rope(c, T, s);
  host_.resize(size_t(B * T));
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < T; t++) host_[size_t(b * T + t)] = int32_t(t);
  BlockCtx ctx;
  ctx.B = B, ctx.T = T, ctx.rope = static_cast<const float*>(rope_.get()), ctx.P = rope_P_, ctx.pos = upload(s);
  return ctx;
}

DecodeCtx DevicePositions::decode(const LlamaConfig& c, const DecodeSegment* segs, int64_t nsegs, int64_t R, int64_t Tcap,
                                  cudaStream_t s) {
  ensure_rope(c, Tcap, s);
  host_.resize(size_t(R));
  for (int64_t i = 0; i < nsegs; i++)
    for (int64_t r = 0; r < segs[i].count; r++) host_[size_t(segs[i].row0 + r)] = int32_t(segs[i].start + r);
  DecodeCtx ctx;
  ctx.R = R, ctx.rope = static_cast<const float*>(rope_.get()), ctx.P = rope_P_, ctx.pos = upload(s);
  ctx.segs = segs, ctx.nsegs = nsegs, ctx.Tcap = Tcap;
  return ctx;
}

void DevicePositions::release() {
  rope_.release();
  pos_.release();
  rope_P_ = 0;
  host_.clear();
  host_.shrink_to_fit();
}

// ---------------------------------------------------------------------------------------------------
// Model.

struct CudaLlamaModel::Drain {
  cudaStream_t s;
  ~Drain() { cudaStreamSynchronize(s); }  // an error here would only hide the one being reported
};

void CudaLlamaModel::activate() const {
#if !defined(BTS_CUDA_EMULATOR)
  BTS_CUDA_CHECK(cudaSetDevice(device_));
#endif
}

CudaLlamaModel::CudaLlamaModel(const LlamaConfig& c, const ModelWeights& host, const std::set<std::string>* trained, int device)
    : c_(c), device_(device) {
  bts::engine::validate_config(c);
  specs_ = bts::engine::tensor_specs(c);
  if (int64_t(host.layers.size()) != c.L)
    fail("E_ARGUMENT", "cuda llama: weights for " + S(int64_t(host.layers.size())) + " layers, config has " + S(c.L));

  // Host pointers of every tensor by spec, checked (present, fp32) before any device memory is taken.
  std::vector<const float*> src(specs_.size(), nullptr);
  for (size_t i = 0; i < specs_.size(); i++) {
    const TensorSpec& sp = specs_[i];
    const bts::engine::Weight w = bts::engine::weight_of(host, sp);
    if (w.b16) fail("E_UNSUPPORTED", "cuda llama: weight " + sp.name + " is bf16; the CUDA engine takes fp32 weights only (Float32Array)");
    if (!w.f32) fail("E_ARGUMENT", "cuda llama: weight " + sp.name + " is missing");
    src[i] = w.f32;
  }
  if (trained)
    for (const std::string& name : *trained) {
      bool known = false;
      for (const TensorSpec& sp : specs_) known = known || sp.name == name;
      if (!known) fail("E_ARGUMENT", "cuda llama: gradient for '" + name + "', not a tensor of this config");
    }

  // Arenas, every tensor 256-byte aligned. The weights arena holds the trained matrices first, then
  // the trained norm gains, then the frozen tensors; the gradient arena covers the trained prefix with
  // the SAME offsets. So [0, gn) of weights, gradients and the AdamW moments line up element for
  // element and one device AdamW call updates every trained tensor, decaying exactly [0, decay_end_)
  // (the host layout's rule, lib/model/layout.ts: matrices decay, norm gains do not). Padding between
  // tensors is zero in all four arenas and stays zero under AdamW.
  int64_t wn = 0, gn = 0;
  w_off_.assign(specs_.size(), -1);
  g_off_.assign(specs_.size(), -1);
  auto is_trained = [&](size_t i) { return trained && trained->count(specs_[i].name) > 0; };
  for (int group = 0; group < 3; group++) {
    for (size_t i = 0; i < specs_.size(); i++) {
      const int g = is_trained(i) ? (specs_[i].is_norm() ? 1 : 0) : 2;
      if (g != group) continue;
      w_off_[i] = wn;
      if (g < 2) g_off_[i] = wn;
      wn += aligned(specs_[i].numel);
    }
    if (group == 0) decay_end_ = wn;
    if (group == 1) gn = wn;
  }
  train_end_ = gn;

  activate();
#if defined(BTS_CUDA_EMULATOR)
  BTS_CUDA_CHECK(cudaStreamCreate(&s_));
#else
  BTS_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking));
#endif
  try {
    Drain drain{s_};
    float* wdev = weights_.floats(wn, "llamaCreate (weights)");
    float* gdev = gn ? grads_.floats(gn, "llamaCreate (gradients)") : nullptr;
    BTS_CUDA_CHECK(cudaMemsetAsync(wdev, 0, size_t(wn) * sizeof(float), s_));  // the padding between tensors
    w_.layers.resize(size_t(c.L));
    g_.layers.resize(size_t(c.L));
    for (size_t i = 0; i < specs_.size(); i++) {
      const TensorSpec& sp = specs_[i];
      float* d = wdev + w_off_[i];
      BTS_CUDA_CHECK(cudaMemcpyAsync(d, src[i], size_t(sp.numel) * sizeof(float), cudaMemcpyHostToDevice, s_));
      bts::engine::Weight w;
      w.f32 = d;
      bts::engine::bind_weight(w_, sp, w);
      if (g_off_[i] >= 0) bts::engine::bind_grad(g_, sp, gdev + g_off_[i]);
    }
    if (gn) BTS_CUDA_CHECK(cudaMemsetAsync(gdev, 0, size_t(gn) * sizeof(float), s_));
    BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
  } catch (...) {
    weights_.release();
    grads_.release();
    cudaStreamDestroy(s_);
    throw;
  }
  if (c.tie) {
    w_.lm_head = w_.embed;
    g_.lm_head = g_.embed;
  }
  trainable_ = g_.any();
  lowest_ = c.L;
  if (g_.embed) lowest_ = 0;
  else
    for (int64_t i = 0; i < c.L; i++)
      if (g_.layers[size_t(i)].any()) {
        lowest_ = i;
        break;
      }
}

CudaLlamaModel::~CudaLlamaModel() {
  try {
    activate();
  } catch (...) {
  }
  cudaStreamSynchronize(s_);
  ws_.release();
  rows_.release();
  for (DeviceBuffer* b : {&weights_, &grads_, &stream_, &acts_, &xf_, &rstdf_, &dx_, &x_, &ids_, &tg_, &losses_, &logits_, &scalars_}) b->release();
  opt_.release();
  cudaStreamDestroy(s_);
}

bool CudaLlamaModel::has_grad(const std::string& name) const {
  for (size_t i = 0; i < specs_.size(); i++)
    if (specs_[i].name == name) return g_off_[i] >= 0;
  return false;
}

const TensorSpec& CudaLlamaModel::spec(const std::string& name, const char* op) const {
  for (const TensorSpec& sp : specs_)
    if (sp.name == name) return sp;
  fail("E_ARGUMENT", std::string(op) + ": '" + name + "' is not a tensor of this config" +
                         (c_.tie && name == "lm_head.weight" ? " (tieWordEmbeddings: the LM head is model.embed_tokens.weight)" : ""));
}

int32_t* CudaLlamaModel::upload_ids(DeviceBuffer& buf, const int32_t* host, int64_t n) {
  int32_t* d = static_cast<int32_t*>(buf.grow(size_t(n) * sizeof(int32_t), "token ids"));
  BTS_CUDA_CHECK(cudaMemcpyAsync(d, host, size_t(n) * sizeof(int32_t), cudaMemcpyHostToDevice, s_));
  return d;
}

void CudaLlamaModel::embed(const int32_t* ids, int64_t n, float* out) {
  EmbeddingParams p;
  p.N = n, p.V = c_.V, p.D = c_.D, p.ids = ids, p.table = w_.embed.f32, p.out = out;
  embedding_forward(p, s_);
}

// Forward of ids (device) through every block (in place, no saving) and the final norm: xf [N, D].
const float* CudaLlamaModel::forward_nosave(const int32_t* ids, int64_t B, int64_t T) {
  const int64_t N = B * T, D = c_.D;
  const BlockCtx ctx = rows_.sequences(c_, B, T, s_);
  float* x = x_.floats(N * D, "activations");
  embed(ids, N, x);
  for (int64_t i = 0; i < c_.L; i++) block_forward(c_, w_.layers[size_t(i)], ctx, x, x, nullptr, ws_, s_);
  float* xf = xf_.floats(N * D, "activations");
  RmsNormParams p;
  p.N = N, p.D = D, p.eps = c_.eps, p.x = x, p.w = w_.norm, p.y = xf, p.rstd = nullptr;
  rmsnorm_forward(p, s_);
  return xf;
}

// The fused LM-head loss of xf [N, D] (device) against targets [N] (device): the sum and count go to
// the device scalars (read_loss() copies them back); losses [N] (device, may be null); with dx the
// backward (dx overwritten, dw accumulated when not null).
void CudaLlamaModel::head_loss(const float* xf, int64_t N, const int32_t* targets, float* losses, float grad_scale, float* dx,
                               float* dw) {
  unsigned char* sc = static_cast<unsigned char*>(scalars_.grow(2 * sizeof(double), "loss"));
  CrossEntropyParams ce;
  ce.N = N, ce.D = c_.D, ce.V = c_.V, ce.ignore_index = -100;
  ce.x = xf, ce.w = w_.lm_head.f32, ce.targets = targets, ce.losses = losses;
  ce.loss_sum = reinterpret_cast<double*>(sc), ce.count = reinterpret_cast<int64_t*>(sc + sizeof(double));
  ce.grad_scale = grad_scale, ce.dx = dx, ce.dw = dw;
  cross_entropy_forward_backward(ce, s_);
}

CudaLlamaModel::Loss CudaLlamaModel::read_loss() {
  double sum = 0;
  int64_t count = 0;
  const unsigned char* sc = static_cast<const unsigned char*>(scalars_.get());
  BTS_CUDA_CHECK(cudaMemcpyAsync(&sum, sc, sizeof(double), cudaMemcpyDeviceToHost, s_));
  BTS_CUDA_CHECK(cudaMemcpyAsync(&count, sc + sizeof(double), sizeof(int64_t), cudaMemcpyDeviceToHost, s_));
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
  Loss out;
  out.sum = sum, out.count = count;
  return out;
}

CudaLlamaModel::Loss CudaLlamaModel::forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T,
                                                      float grad_scale) {
  const char* op = "forwardBackward";
  std::lock_guard<std::mutex> lock(mu_);
  if (!trainable_)
    fail("E_ARGUMENT", std::string(op) + ": the model was created without gradient buffers (frozen); pass grads to llamaCreate to train");
  if (!std::isfinite(grad_scale)) fail("E_ARGUMENT", std::string(op) + ": gradScale must be finite, got " + std::to_string(grad_scale));
  bts::engine::check_batch(c_, op, inputs, targets, B, T);
  activate();
  Drain drain{s_};
  const int64_t N = B * T, D = c_.D, L = c_.L;
  const int32_t* ids = upload_ids(ids_, inputs, N);
  const int32_t* tg = upload_ids(tg_, targets, N);
  const BlockCtx ctx = rows_.sequences(c_, B, T, s_);

  // ---- forward, saving activations of the layers the backward visits
  float* stream = stream_.floats((L + 1) * N * D, "activations");  // x_i = stream + i*N*D
  const int64_t per = BlockActs::floats(c_, B, T);
  float* arena = acts_.floats(std::max<int64_t>(1, (L - lowest_) * per), "saved activations");
  std::vector<BlockActs>& acts = act_views_;
  acts.resize(size_t(L));
  for (int64_t i = lowest_; i < L; i++) acts[size_t(i)] = BlockActs::bind(c_, B, T, arena + (i - lowest_) * per);
  embed(ids, N, stream);
  for (int64_t i = 0; i < L; i++)
    block_forward(c_, w_.layers[size_t(i)], ctx, stream + i * N * D, stream + (i + 1) * N * D, i >= lowest_ ? &acts[size_t(i)] : nullptr,
                  ws_, s_);
  const float* xL = stream + L * N * D;
  float* xf = xf_.floats(N * D, "activations");
  float* rstdf = rstdf_.floats(N, "activations");
  {
    RmsNormParams p;
    p.N = N, p.D = D, p.eps = c_.eps, p.x = xL, p.w = w_.norm, p.y = xf, p.rstd = rstdf;
    rmsnorm_forward(p, s_);
  }

  // ---- loss and its gradient through the LM head: dx = dL/dxf [N, D]
  float* dx = dx_.floats(N * D, "activation gradients");
  head_loss(xf, N, tg, nullptr, grad_scale, dx, g_.lm_head);

  // ---- backward
  if (lowest_ < L || g_.norm) {
    RmsNormBackwardParams p;
    p.N = N, p.D = D, p.x = xL, p.w = w_.norm, p.rstd = rstdf, p.dy = dx, p.dx = dx, p.dw = g_.norm;
    rmsnorm_backward(p, s_);
    for (int64_t i = L - 1; i >= lowest_; i--) {
      const LayerGrads& lg = g_.layers[size_t(i)];
      float* dx_in = (i > lowest_ || g_.embed) ? dx : nullptr;
      block_backward(c_, w_.layers[size_t(i)], lg.any() ? &lg : nullptr, acts[size_t(i)], dx, dx_in, ws_, s_);
    }
    if (g_.embed) {
      EmbeddingBackwardParams e;
      e.N = N, e.V = c_.V, e.D = D, e.ids = ids, e.dout = dx, e.dtable = g_.embed;
      embedding_backward(e, s_);
    }
  }
  return read_loss();
}

CudaLlamaModel::Loss CudaLlamaModel::loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float* losses) {
  const char* op = "loss";
  std::lock_guard<std::mutex> lock(mu_);
  bts::engine::check_batch(c_, op, inputs, targets, B, T);
  activate();
  Drain drain{s_};
  const int64_t N = B * T;
  const int32_t* ids = upload_ids(ids_, inputs, N);
  const int32_t* tg = upload_ids(tg_, targets, N);
  const float* xf = forward_nosave(ids, B, T);
  float* dl = losses ? losses_.floats(N, "losses") : nullptr;
  head_loss(xf, N, tg, dl, 1.f, nullptr, nullptr);
  if (losses) BTS_CUDA_CHECK(cudaMemcpyAsync(losses, dl, size_t(N) * sizeof(float), cudaMemcpyDeviceToHost, s_));
  return read_loss();
}

void CudaLlamaModel::logits(const int32_t* tokens, int64_t B, int64_t T, float* out) {
  const char* op = "logits";
  std::lock_guard<std::mutex> lock(mu_);
  bts::engine::check_rows(c_, op, B, T);
  bts::engine::check_token_ids(c_, op, "tokens", tokens, B * T, false);
  activate();
  Drain drain{s_};
  const int64_t N = B * T;
  const int32_t* ids = upload_ids(ids_, tokens, N);
  const float* xf = forward_nosave(ids, B, T);
  float* dout = logits_.floats(N * c_.V, "logits");
  GemmParams p;  // [N, V] = xf [N, D] head^T
  p.M = N, p.N = c_.V, p.K = c_.D, p.transB = true;
  p.A = xf, p.lda = c_.D, p.B = w_.lm_head.f32, p.ldb = c_.D, p.C = dout, p.ldc = c_.V, p.beta = 0.f;
  gemm_f32(p, s_);
  BTS_CUDA_CHECK(cudaMemcpyAsync(out, dout, size_t(N * c_.V) * sizeof(float), cudaMemcpyDeviceToHost, s_));
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

// Rows of tokens (host) against the cache; logits of rows out_row0..R-1 into out (host).
void CudaLlamaModel::decode_rows(DeviceKvCache& cache, const DecodeSegment* segs, int64_t nsegs, const int32_t* tokens, int64_t R,
                                 int64_t out_row0, float* out) {
  const int64_t D = c_.D, V = c_.V;
  const DecodeCtx ctx = rows_.decode(c_, segs, nsegs, R, cache.capacity(), s_);
  const int32_t* ids = upload_ids(ids_, tokens, R);
  float* x = x_.floats(R * D, "activations");
  embed(ids, R, x);
  for (int64_t i = 0; i < c_.L; i++) block_decode(c_, w_.layers[size_t(i)], ctx, cache.k(i), cache.v(i), x, ws_, s_);
  const int64_t n = R - out_row0;
  float* xf = xf_.floats(n * D, "activations");
  RmsNormParams p;
  p.N = n, p.D = D, p.eps = c_.eps, p.x = x + out_row0 * D, p.w = w_.norm, p.y = xf, p.rstd = nullptr;
  rmsnorm_forward(p, s_);
  float* dout = logits_.floats(n * V, "logits");
  GemmParams g;
  g.M = n, g.N = V, g.K = D, g.transB = true;
  g.A = xf, g.lda = D, g.B = w_.lm_head.f32, g.ldb = D, g.C = dout, g.ldc = V, g.beta = 0.f;
  gemm_f32(g, s_);
  BTS_CUDA_CHECK(cudaMemcpyAsync(out, dout, size_t(n * V) * sizeof(float), cudaMemcpyDeviceToHost, s_));
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

void CudaLlamaModel::prefill(DeviceKvCache& cache, int64_t slot, const int32_t* tokens, int64_t T, float* out) {
  const char* op = "prefill";
  std::lock_guard<std::mutex> lock(mu_);
  if (!cache.compatible(c_)) fail("E_ARGUMENT", std::string(op) + ": the cache was made for another model shape");
  segs_.assign(1, bts::engine::prefill_segment(op, cache, slot, T));
  bts::engine::check_token_ids(c_, op, "tokens", tokens, T, false);
  activate();
  Drain drain{s_};
  decode_rows(cache, segs_.data(), 1, tokens, T, T - 1, out);
  cache.set_length(slot, segs_[0].start + T);
}

void CudaLlamaModel::decode(DeviceKvCache& cache, const int32_t* slots, const int32_t* tokens, int64_t R, float* out) {
  const char* op = "decode";
  std::lock_guard<std::mutex> lock(mu_);
  if (!cache.compatible(c_)) fail("E_ARGUMENT", std::string(op) + ": the cache was made for another model shape");
  bts::engine::decode_segments(op, cache, slots, R, segs_);
  bts::engine::check_token_ids(c_, op, "tokens", tokens, R, false);
  activate();
  Drain drain{s_};
  decode_rows(cache, segs_.data(), R, tokens, R, 0, out);
  for (int64_t r = 0; r < R; r++) cache.set_length(segs_[size_t(r)].slot, segs_[size_t(r)].start + 1);
}

std::shared_ptr<DeviceKvCache> CudaLlamaModel::create_cache(int64_t slots, int64_t capacity) {
  std::lock_guard<std::mutex> lock(mu_);
  activate();
  auto cache = std::make_shared<DeviceKvCache>(c_, slots, capacity);
  return cache;
}

// ---------------------------------------------------------------------------------------------------
// Host <-> device tensors.

void CudaLlamaModel::upload_weights(const std::vector<HostTensor>& w) {
  const char* op = "uploadWeights";
  std::lock_guard<std::mutex> lock(mu_);
  for (const HostTensor& t : w) spec(t.name, op);  // every name checked before anything is copied
  activate();
  Drain drain{s_};
  float* base = static_cast<float*>(weights_.get());
  for (const HostTensor& t : w) {
    const TensorSpec& sp = spec(t.name, op);
    const size_t i = size_t(&sp - specs_.data());
    BTS_CUDA_CHECK(cudaMemcpyAsync(base + w_off_[i], t.data, size_t(sp.numel) * sizeof(float), cudaMemcpyHostToDevice, s_));
  }
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

void CudaLlamaModel::download_weights(const std::vector<HostTensor>& out) {
  const char* op = "downloadWeights";
  std::lock_guard<std::mutex> lock(mu_);
  for (const HostTensor& t : out) spec(t.name, op);
  activate();
  Drain drain{s_};
  const float* base = static_cast<const float*>(weights_.get());
  for (const HostTensor& t : out) {
    const TensorSpec& sp = spec(t.name, op);
    const size_t i = size_t(&sp - specs_.data());
    BTS_CUDA_CHECK(cudaMemcpyAsync(t.data, base + w_off_[i], size_t(sp.numel) * sizeof(float), cudaMemcpyDeviceToHost, s_));
  }
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

void CudaLlamaModel::download_grads(const std::vector<HostTensor>& out) {
  const char* op = "downloadGrads";
  std::lock_guard<std::mutex> lock(mu_);
  for (const HostTensor& t : out) {
    const TensorSpec& sp = spec(t.name, op);
    if (g_off_[size_t(&sp - specs_.data())] < 0)
      fail("E_ARGUMENT", std::string(op) + ": '" + t.name + "' has no gradient (the model was created " +
                             (trainable_ ? "with gradients for other tensors only)" : "without gradients: grads: false)"));
  }
  activate();
  Drain drain{s_};
  const float* base = static_cast<const float*>(grads_.get());
  for (const HostTensor& t : out) {
    const TensorSpec& sp = spec(t.name, op);
    const size_t i = size_t(&sp - specs_.data());
    BTS_CUDA_CHECK(cudaMemcpyAsync(t.data, base + g_off_[i], size_t(sp.numel) * sizeof(float), cudaMemcpyDeviceToHost, s_));
  }
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

void CudaLlamaModel::zero_grads() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!grads_.get()) return;
  activate();
  Drain drain{s_};
  BTS_CUDA_CHECK(cudaMemsetAsync(grads_.get(), 0, grads_.bytes(), s_));
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

// ---------------------------------------------------------------------------------------------------
// The optimizer on the device: AdamW moments in arenas shaped like the gradients (allocated zeroed on
// first use), one cuda::adamw_step over the trained prefix of the arenas.

float CudaLlamaModel::adamw_step(const OptimStep& o) {
  const char* op = "adamwStep";
  std::lock_guard<std::mutex> lock(mu_);
  if (!trainable_) fail("E_ARGUMENT", std::string(op) + ": the model was created without gradients (frozen)");
  activate();
  Drain drain{s_};
  opt_.ensure(train_end_, s_);
  return opt_.step(static_cast<float*>(weights_.get()), static_cast<const float*>(grads_.get()), decay_end_, o, scalars_, s_);
}

void CudaLlamaModel::moments_copy(const std::vector<HostTensor>& m, const std::vector<HostTensor>& v, bool upload) {
  const char* op = upload ? "uploadMoments" : "downloadMoments";
  std::lock_guard<std::mutex> lock(mu_);
  for (const std::vector<HostTensor>* ts : {&m, &v})
    for (const HostTensor& t : *ts) {
      const TensorSpec& sp = spec(t.name, op);
      if (g_off_[size_t(&sp - specs_.data())] < 0) fail("E_ARGUMENT", std::string(op) + ": '" + t.name + "' is not trained (no gradient, no moments)");
    }
  activate();
  Drain drain{s_};
  opt_.ensure(train_end_, s_);
  for (int which = 0; which < 2; which++) {
    for (const HostTensor& t : which == 0 ? m : v) {
      const TensorSpec& sp = spec(t.name, op);
      opt_.copy(which, g_off_[size_t(&sp - specs_.data())], sp.numel, t.data, upload, s_);
    }
  }
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

void CudaLlamaModel::release() {
  std::lock_guard<std::mutex> lock(mu_);
  activate();
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
  ws_.release();
  rows_.release();
  for (DeviceBuffer* b : {&stream_, &acts_, &xf_, &rstdf_, &dx_, &x_, &ids_, &tg_, &losses_, &logits_, &scalars_}) b->release();
}

size_t CudaLlamaModel::workspace_bytes() const {
  size_t s = ws_.bytes() + rows_.bytes();
  for (const DeviceBuffer* b : {&stream_, &acts_, &xf_, &rstdf_, &dx_, &x_, &ids_, &tg_, &losses_, &logits_, &scalars_}) s += b->bytes();
  return s;
}

size_t CudaLlamaModel::device_bytes() const { return workspace_bytes() + weights_.bytes() + grads_.bytes() + opt_.bytes(); }

}  // namespace engine
}  // namespace cuda
}  // namespace bts
