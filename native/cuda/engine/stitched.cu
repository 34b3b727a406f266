// cuda/engine/stitched.cu: the stitched model on CUDA (stitched_cuda.h): device copies of the hub,
// the experts and the stitch tensors, the gate-mask glue kernel, and the calls (training step, loss,
// logits, gate record, prefill / decode, the AdamW step) written as native/engine/stitched.cc writes them on the CPU,
// buffer for buffer, so the two files read side by side. Everything runs on the model's one stream; host code apart from
// one element-wise kernel.
//
// Training step, N = B*T rows, M = n + 1 models, j0 = block of the first trained stitch k0 (as
// stitched.cc):
//   blocks 1..j0 of every model and the stitches before k0: forward-only, in place, nothing kept
//   H[p] [N, D], E[p] [n, N, D] for p = j0..L: states after block p (experts only up to the last E->H)
//   stitch k >= k0 at block j: G_k [N, D*M] (effective logits: mask, hub bias), mixed_k [n, N, D]
//     (p_e or q_e) and its output O_k ([N, D] E->H, [n, N, D] H->E)
//   loss: xf = norm(hub final); fused cross-entropy, dx only (frozen head); norm backward
//   backward, j = L down to j0: stitch backward at j (dW of its tensors; dh0 / dhs of its inputs
//     unless k == k0), then hub block j input gradient in place on dh0 and, while an E->H stitch above
//     has mixed the experts in, expert block j likewise on dhs.
// One arena (states_) holds every saved buffer; offsets planned first, as the CPU engine's Arena.
//
// Decode / prefill: every model's block j through block_decode against its own device cache (expert
// blocks only up to the last E->H stitch), then the stitch at j in place on the R rows; the hub's head
// on the rows whose logits are asked for.
//
// Legend (stitched_cuda.h): N rows, D hidden, V vocab, L blocks, n experts, M models, K stitches.
// Linear layouts: y = x W^T (GEMM NT), dx = dy W (NN), dW += dy^T x (TN, beta 1); fp32 GEMMs.
// Known limits: see stitched_cuda.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>

#include "../common.cuh"
#include "stitched_cuda.h"

namespace bts {
namespace cuda {
namespace {

// One thread per logit, grid-stride; memory bound.
__global__ void stitch_gate_mask_kernel(int64_t n, int64_t M, uint64_t key, uint64_t threshold, float bias, int eh,
                                        float* x /* [rows, D*M] flat, n entries */) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float v = x[i];
    if (threshold != 0 && bts::engine::stitch_mix64(key + uint64_t(i)) < threshold) v = 0.f;
    if (bias != 0.f) {
      const int64_t m = i % M;
      if (eh) {
        if (m == 0) v += bias;
      } else if (m != 0) {
        v -= bias;
      }
    }
    x[i] = v;
  }
}

}  // namespace

void launch_stitch_gate_mask(const StitchGateParams& p, cudaStream_t s) {
  BTS_LAUNCH(stitch_gate_mask_kernel, detail::grid_for(p.n, 256, 8192), 256, 0, s, p.n, p.M, p.key, p.threshold, p.bias,
             p.eh ? 1 : 0, p.x);
}

void stitch_gate_mask(const StitchGateParams& p, cudaStream_t stream) {
  const char* op = "stitch_gate_mask";
  detail::need(p.n >= 0, op, "n must be >= 0");
  detail::need(p.M >= 2, op, "M must be >= 2");
  detail::need(p.n % p.M == 0, op, "n must be a multiple of M");
  if (p.n == 0 || (p.threshold == 0 && p.bias == 0.f)) return;
  detail::need_ptr(p.x, op, "x");
  launch_stitch_gate_mask(p, stream);
}

namespace engine {

namespace {

std::string S(int64_t x) { return std::to_string(x); }
[[noreturn]] void fail(const char* code, const std::string& msg) { throw Error(code, msg); }

constexpr int64_t kAlign = 64;  // floats: every tensor / buffer of an arena starts on a 256-byte boundary
int64_t aligned(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// The stitch Linear layers (fp32 device pointers), as block.cu's linear_* for engine weights.
// y [rows, out] (= or +=, by beta) x [rows, in] W^T, W [out, in]   (GEMM NT)
void lin(const float* W, const float* x, int64_t rows, int64_t in, int64_t out, float* y, float beta, cudaStream_t s) {
  GemmParams p;
  p.M = rows, p.N = out, p.K = in, p.transB = true;
  p.A = x, p.lda = in, p.B = W, p.ldb = in, p.C = y, p.ldc = out, p.beta = beta;
  gemm_f32(p, s);
}

// dx [rows, in] (= or +=, by beta) dy [rows, out] W [out, in]   (GEMM NN)
void lin_dx(const float* W, const float* dy, int64_t rows, int64_t in, int64_t out, float* dx, float beta, cudaStream_t s) {
  GemmParams p;
  p.M = rows, p.N = in, p.K = out;
  p.A = dy, p.lda = out, p.B = W, p.ldb = in, p.C = dx, p.ldc = in, p.beta = beta;
  gemm_f32(p, s);
}

// dW [out, in] += dy^T [out, rows] x [rows, in]   (GEMM TN, accumulated). Skipped when dw is null (frozen).
void lin_dw(float* dw, const float* dy, const float* x, int64_t rows, int64_t in, int64_t out, cudaStream_t s) {
  if (!dw) return;
  GemmParams p;
  p.M = out, p.N = in, p.K = rows, p.transA = true;
  p.A = dy, p.lda = out, p.B = x, p.ldb = in, p.C = dw, p.ldc = in, p.beta = 1.f;
  gemm_f32(p, s);
}

void copy(float* dst, const float* src, int64_t n, cudaStream_t s) {
  if (dst == src || n == 0) return;
  BTS_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, s));
}

void add(float* out, const float* a, const float* b, int64_t n, cudaStream_t s) {
  AddParams p;
  p.n = n, p.a = a, p.b = b, p.out = out;
  add_f32(p, s);
}

// Zeroes the entries of dG [rows, D*M] that stitch k's dropout mask dropped in the forward.
void mask_grad(float* dG, int64_t n, int64_t M, uint64_t key, uint64_t thr, cudaStream_t s) {
  StitchGateParams p;
  p.n = n, p.M = M, p.key = key, p.threshold = thr, p.bias = 0.f, p.x = dG;
  stitch_gate_mask(p, s);
}

// Bump allocator over one device buffer: offsets first (plan), pointers after the buffer is sized.
struct Arena {
  int64_t size = 0;
  int64_t take(int64_t n) {
    const int64_t at = size;
    size += aligned(n);
    return at;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Construction.

struct CudaStitchedModel::Drain {
  cudaStream_t s;
  ~Drain() { cudaStreamSynchronize(s); }  // an error here would only hide the one being reported
};

void CudaStitchedModel::activate() const {
#if !defined(BTS_CUDA_EMULATOR)
  BTS_CUDA_CHECK(cudaSetDevice(device_));
#endif
}

CudaStitchedModel::CudaStitchedModel(const LlamaConfig& c, const ModelWeights& hub, const std::vector<ModelWeights>& experts,
                                     const StitchSpec& spec, const bts::engine::StitchWeights& w, const std::set<std::string>* trained,
                                     int device)
    : c_(c), spec_(spec), device_(device) {
  bts::engine::validate_config(c);
  const int64_t n = int64_t(experts.size());
  plan_ = bts::engine::plan_stitches(c, n, spec);  // n, D*M, the spec (E_ARGUMENT)
  const int64_t M = plan_.M, K = plan_.K, D = c.D;
  const std::vector<TensorSpec> specs = bts::engine::tensor_specs(c);

  // Every host pointer checked (present, fp32) before any device memory is taken.
  auto check_model = [&](const ModelWeights& m, const std::string& who) {
    if (int64_t(m.layers.size()) != c.L)
      fail("E_ARGUMENT", "stitched: " + who + ": weights for " + S(int64_t(m.layers.size())) + " layers, config has " + S(c.L));
    for (const TensorSpec& sp : specs) {
      const bts::engine::Weight x = bts::engine::weight_of(m, sp);
      if (x.b16) fail("E_UNSUPPORTED", "stitched: " + who + ": weight " + sp.name + " is bf16; the CUDA engine takes fp32 weights only (Float32Array)");
      if (!x.f32) fail("E_ARGUMENT", "stitched: " + who + ": weight " + sp.name + " is missing");
    }
  };
  check_model(hub, "hub");
  for (int64_t e = 0; e < n; e++) check_model(experts[size_t(e)], "expert " + S(e));

  tensors_ = bts::engine::stitch_tensors(D, n, K);
  if (int64_t(w.proj.size()) != K || int64_t(w.gate.size()) != K)
    fail("E_ARGUMENT", "stitched: stitch weights for " + S(int64_t(w.gate.size())) + " stitches, the spec has " + S(K));
  std::vector<const float*> src(tensors_.size(), nullptr);
  for (size_t i = 0; i < tensors_.size(); i++) {
    const StitchTensor& t = tensors_[i];
    if (t.e >= 0 && int64_t(w.proj[size_t(t.k)].size()) != n)
      fail("E_ARGUMENT", "stitched: stitch " + S(t.k) + " has " + S(int64_t(w.proj[size_t(t.k)].size())) + " projections, expected " + S(n));
    src[i] = t.e >= 0 ? w.proj[size_t(t.k)][size_t(t.e)] : w.gate[size_t(t.k)];
    if (!src[i]) fail("E_ARGUMENT", "stitched: stitch tensor " + t.name + " is missing");
  }
  if (trained)
    for (const std::string& name : *trained) {
      bool known = false;
      for (const StitchTensor& t : tensors_) known = known || t.name == name;
      if (!known) fail("E_ARGUMENT", "stitched: gradient for '" + name + "', not a stitch tensor of " + S(K) + " stitches and " + S(n) + " experts");
    }

  // Stitch arenas (every tensor 256-byte aligned): the weights arena holds the trained tensors first,
  // then the frozen ones; the gradient arena (and the AdamW moments') covers the trained prefix with
  // the SAME offsets, so [0, train_end_) of weights, gradients and moments line up element for element
  // and one device AdamW call updates every trained tensor. Padding is zero in every arena and stays
  // zero under AdamW.
  int64_t wn = 0, gn = 0;
  w_off_.assign(tensors_.size(), -1);
  g_off_.assign(tensors_.size(), -1);
  std::vector<bool> trained_k(size_t(K), false);
  for (int pass = 0; pass < 2; pass++) {
    for (size_t i = 0; i < tensors_.size(); i++) {
      const bool tr = trained && trained->count(tensors_[i].name) > 0;
      if (tr != (pass == 0)) continue;
      w_off_[i] = wn;
      if (tr) {
        g_off_[i] = wn;
        trained_k[size_t(tensors_[i].k)] = true;
      }
      wn += aligned(tensors_[i].numel);
    }
    if (pass == 0) gn = wn;
  }
  train_end_ = gn;
  trainable_ = gn > 0;
  first_trained_ = plan_.first_trained(spec_, trained_k);

  activate();
#if defined(BTS_CUDA_EMULATOR)
  BTS_CUDA_CHECK(cudaStreamCreate(&s_));
#else
  BTS_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking));
#endif
  try {
    Drain drain{s_};
    // Models: one arena each, tensors in the order of tensor_specs.
    int64_t mn = 0;
    for (const TensorSpec& sp : specs) mn += aligned(sp.numel);
    for (int64_t m = 0; m < M; m++) {
      const ModelWeights& host = m == 0 ? hub : experts[size_t(m - 1)];
      model_bufs_.emplace_back(new DeviceBuffer());
      float* base = model_bufs_.back()->floats(mn, "stitchedCreate (model weights)");
      ModelWeights dw;
      dw.layers.resize(size_t(c.L));
      int64_t off = 0;
      for (const TensorSpec& sp : specs) {
        BTS_CUDA_CHECK(cudaMemcpyAsync(base + off, bts::engine::weight_of(host, sp).f32, size_t(sp.numel) * sizeof(float),
                                       cudaMemcpyHostToDevice, s_));
        bts::engine::Weight x;
        x.f32 = base + off;
        bts::engine::bind_weight(dw, sp, x);
        off += aligned(sp.numel);
      }
      if (c.tie) dw.lm_head = dw.embed;
      mw_.push_back(std::move(dw));
    }
    float* wdev = sw_.floats(wn, "stitchedCreate (stitch weights)");
    float* gdev = gn ? sg_.floats(gn, "stitchedCreate (stitch gradients)") : nullptr;
    BTS_CUDA_CHECK(cudaMemsetAsync(wdev, 0, size_t(wn) * sizeof(float), s_));  // the padding between tensors
    wdev_.assign(tensors_.size(), nullptr);
    gdev_.assign(tensors_.size(), nullptr);
    for (size_t i = 0; i < tensors_.size(); i++) {
      BTS_CUDA_CHECK(cudaMemcpyAsync(wdev + w_off_[i], src[i], size_t(tensors_[i].numel) * sizeof(float), cudaMemcpyHostToDevice, s_));
      wdev_[i] = wdev + w_off_[i];
      if (g_off_[i] >= 0) gdev_[i] = gdev + g_off_[i];
    }
    if (gn) BTS_CUDA_CHECK(cudaMemsetAsync(gdev, 0, size_t(gn) * sizeof(float), s_));
    BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
  } catch (...) {
    model_bufs_.clear();
    sw_.release();
    sg_.release();
    cudaStreamDestroy(s_);
    throw;
  }
}

CudaStitchedModel::~CudaStitchedModel() {
  try {
    activate();
  } catch (...) {
  }
  cudaStreamSynchronize(s_);
  ws_.release();
  rows_.release();
  for (DeviceBuffer* b : {&x0_, &xs_, &mix_, &G_, &xf_, &rstdf_, &states_, &dh0_, &dhs_, &dtmp_, &dG_, &ids_, &tg_, &losses_, &logits_,
                          &scalars_, &sw_, &sg_})
    b->release();
  opt_.release();
  model_bufs_.clear();
  cudaStreamDestroy(s_);
}

bool CudaStitchedModel::has_grad(const std::string& name) const {
  for (size_t i = 0; i < tensors_.size(); i++)
    if (tensors_[i].name == name) return g_off_[i] >= 0;
  return false;
}

const StitchTensor& CudaStitchedModel::tensor(const std::string& name, const char* op) const {
  for (const StitchTensor& t : tensors_)
    if (t.name == name) return t;
  fail("E_ARGUMENT", std::string(op) + ": '" + name + "' is not a stitch tensor of " + S(plan_.K) + " stitches and " + S(plan_.n) +
                         " experts (stitch.{k}.proj.{e}.weight, stitch.{k}.gate.weight)");
}

int32_t* CudaStitchedModel::upload_ids(DeviceBuffer& buf, const int32_t* host, int64_t n) {
  int32_t* d = static_cast<int32_t*>(buf.grow(size_t(n) * sizeof(int32_t), "token ids"));
  BTS_CUDA_CHECK(cudaMemcpyAsync(d, host, size_t(n) * sizeof(int32_t), cudaMemcpyHostToDevice, s_));
  return d;
}

void CudaStitchedModel::embed(int64_t m, const int32_t* ids, int64_t n, float* out) {
  EmbeddingParams p;
  p.N = n, p.V = c_.V, p.D = c_.D, p.ids = ids, p.table = model(m).embed.f32, p.out = out;
  embedding_forward(p, s_);
}

// ---------------------------------------------------------------------------------------------------
// Stitches.

void CudaStitchedModel::gate_logits(int64_t k, const float* h0, int64_t rows, float* G, bool dropout, uint64_t seed) {
  const int64_t D = c_.D, DM = D * plan_.M;
  lin(gate(k), h0, rows, D, DM, G, 0.f, s_);  // [rows, D*M]
  StitchGateParams p;
  p.n = rows * DM, p.M = plan_.M, p.bias = spec_.hub_bias, p.eh = eh(k), p.x = G;
  if (dropout) {
    p.key = bts::engine::stitch_dropout_key(seed, k);
    p.threshold = bts::engine::stitch_dropout_threshold(spec_.gate_dropout);
  }
  stitch_gate_mask(p, s_);  // nothing to do (no launch) without mask and bias
}

void CudaStitchedModel::stitch_inplace(int64_t k, int64_t rows, float* x0, float*& xs, float*& mixed, float* G) {
  const int64_t D = c_.D, RD = rows * D, n = plan_.n;
  gate_logits(k, x0, rows, G, false, 0);
  for (int64_t e = 0; e < n; e++) lin(proj(k, e), eh(k) ? xs + e * RD : x0, rows, D, D, mixed + e * RD, 0.f, s_);  // p_e or q_e
  if (eh(k)) {
    StitchEHParams p;
    p.N = rows, p.D = D, p.n = n, p.h0 = x0, p.p = mixed, p.G = G, p.out = x0;
    stitch_eh_forward(p, s_);
    if (spec_.projected) std::swap(xs, mixed);  // h_e' = p_e
  } else {
    StitchHEParams p;
    p.N = rows, p.D = D, p.n = n, p.h = xs, p.q = mixed, p.G = G, p.out = xs;
    stitch_he_forward(p, s_);
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward without saving (loss, logits, gates).

float* CudaStitchedModel::forward_infer(const int32_t* ids, int64_t B, int64_t T, float* gates_out) {
  const int64_t N = B * T, D = c_.D, ND = N * D, n = plan_.n, M = plan_.M, L = plan_.L;
  const BlockCtx ctx = rows_.sequences(c_, B, T, s_);
  float* x0 = x0_.floats(ND, "activations");
  float* xs = xs_.floats(n * ND, "activations");
  float* mixed = mix_.floats(n * ND, "activations");
  float* G = G_.floats(N * D * M, "gate logits");
  embed(0, ids, N, x0);
  if (plan_.last_eh > 0)
    for (int64_t e = 0; e < n; e++) embed(e + 1, ids, N, xs + e * ND);
  for (int64_t j = 1; j <= L; j++) {
    block_forward(c_, model(0).layers[size_t(j - 1)], ctx, x0, x0, nullptr, ws_, s_);
    if (j <= plan_.last_eh)
      for (int64_t e = 0; e < n; e++) block_forward(c_, model(e + 1).layers[size_t(j - 1)], ctx, xs + e * ND, xs + e * ND, nullptr, ws_, s_);
    const int64_t k = plan_.stitch_at[size_t(j)];
    if (k < 0) continue;
    if (active(k)) stitch_inplace(k, N, x0, xs, mixed, G);
    else if (gates_out) gate_logits(k, x0, N, G, false, 0);  // inactive H->E: only its gate is recorded
    if (gates_out) {  // stitch_inplace leaves G = this stitch's logits
      gates_host_.resize(size_t(N * D * M));
      BTS_CUDA_CHECK(cudaMemcpyAsync(gates_host_.data(), G, size_t(N * D * M) * sizeof(float), cudaMemcpyDeviceToHost, s_));
      BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
      bts::engine::gate_means(gates_host_.data(), N, D, M, eh(k), gates_out + k * N * M, M);
    }
  }
  return x0;
}

void CudaStitchedModel::hub_loss(const float* h, int64_t N, const int32_t* targets, float* losses, float grad_scale, float* dh) {
  const int64_t D = c_.D;
  float* xf = xf_.floats(N * D, "activations");
  float* rstd = rstdf_.floats(N, "activations");
  {
    RmsNormParams p;
    p.N = N, p.D = D, p.eps = c_.eps, p.x = h, p.w = model(0).norm, p.y = xf, p.rstd = rstd;
    rmsnorm_forward(p, s_);
  }
  unsigned char* sc = static_cast<unsigned char*>(scalars_.grow(2 * sizeof(double), "loss"));
  CrossEntropyParams ce;
  ce.N = N, ce.D = D, ce.V = c_.V, ce.ignore_index = -100;
  ce.x = xf, ce.w = model(0).lm_head.f32, ce.targets = targets, ce.losses = losses;
  ce.loss_sum = reinterpret_cast<double*>(sc), ce.count = reinterpret_cast<int64_t*>(sc + sizeof(double));
  ce.grad_scale = grad_scale, ce.dx = dh, ce.dw = nullptr;  // frozen head: dx only
  cross_entropy_forward_backward(ce, s_);
  if (dh) {
    RmsNormBackwardParams p;
    p.N = N, p.D = D, p.x = h, p.w = model(0).norm, p.rstd = rstd, p.dy = dh, p.dx = dh, p.dw = nullptr;
    rmsnorm_backward(p, s_);
  }
}

CudaStitchedModel::Loss CudaStitchedModel::read_loss() {
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

CudaStitchedModel::Loss CudaStitchedModel::loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float* losses) {
  const char* op = "loss";
  std::lock_guard<std::mutex> lock(mu_);
  bts::engine::check_batch(c_, op, inputs, targets, B, T);
  activate();
  Drain drain{s_};
  const int64_t N = B * T;
  const int32_t* ids = upload_ids(ids_, inputs, N);
  const int32_t* tg = upload_ids(tg_, targets, N);
  const float* h = forward_infer(ids, B, T, nullptr);
  float* dl = losses ? losses_.floats(N, "losses") : nullptr;
  hub_loss(h, N, tg, dl, 1.f, nullptr);
  if (losses) BTS_CUDA_CHECK(cudaMemcpyAsync(losses, dl, size_t(N) * sizeof(float), cudaMemcpyDeviceToHost, s_));
  return read_loss();
}

void CudaStitchedModel::logits(const int32_t* tokens, int64_t B, int64_t T, float* out) {
  const char* op = "logits";
  std::lock_guard<std::mutex> lock(mu_);
  bts::engine::check_rows(c_, op, B, T);
  const int64_t N = B * T;
  bts::engine::check_token_ids(c_, op, "tokens", tokens, N, false);
  activate();
  Drain drain{s_};
  const int32_t* ids = upload_ids(ids_, tokens, N);
  hub_logits(forward_infer(ids, B, T, nullptr), N, out);
}

void CudaStitchedModel::hub_logits(const float* h, int64_t rows, float* out) {
  const int64_t D = c_.D, V = c_.V;
  float* xf = xf_.floats(rows * D, "activations");
  RmsNormParams r;
  r.N = rows, r.D = D, r.eps = c_.eps, r.x = h, r.w = model(0).norm, r.y = xf, r.rstd = nullptr;
  rmsnorm_forward(r, s_);
  float* dout = logits_.floats(rows * V, "logits");
  GemmParams p;  // [rows, V] = xf [rows, D] head^T
  p.M = rows, p.N = V, p.K = D, p.transB = true;
  p.A = xf, p.lda = D, p.B = model(0).lm_head.f32, p.ldb = D, p.C = dout, p.ldc = V, p.beta = 0.f;
  gemm_f32(p, s_);
  BTS_CUDA_CHECK(cudaMemcpyAsync(out, dout, size_t(rows * V) * sizeof(float), cudaMemcpyDeviceToHost, s_));
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

void CudaStitchedModel::gates(const int32_t* tokens, int64_t T, float* out) {
  const char* op = "gates";
  std::lock_guard<std::mutex> lock(mu_);
  bts::engine::check_rows(c_, op, 1, T);
  bts::engine::check_token_ids(c_, op, "tokens", tokens, T, false);
  activate();
  Drain drain{s_};
  const int32_t* ids = upload_ids(ids_, tokens, T);
  forward_infer(ids, 1, T, out);
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

// ---------------------------------------------------------------------------------------------------
// KV-cached generation (stitched.cc's decode_rows / prefill / decode on the device).

std::shared_ptr<DeviceStitchedCache> CudaStitchedModel::create_cache(int64_t slots, int64_t capacity) {
  std::lock_guard<std::mutex> lock(mu_);
  activate();
  return std::make_shared<DeviceStitchedCache>(c_, plan_.M, slots, capacity);
}

void CudaStitchedModel::check_cache(const char* op, DeviceStitchedCache& cache) const {
  if (cache.models() != plan_.M || !cache.model(0).compatible(c_))
    fail("E_ARGUMENT", std::string(op) + ": the cache was made for another model (" + S(cache.models()) + " models; this one has " + S(plan_.M) + ")");
}

void CudaStitchedModel::decode_rows(DeviceStitchedCache& cache, const DecodeSegment* segs, int64_t nsegs, const int32_t* tokens,
                                    int64_t R, int64_t out_row0, float* out) {
  const int64_t D = c_.D, RD = R * D, n = plan_.n, M = plan_.M, L = plan_.L;
  const DecodeCtx ctx = rows_.decode(c_, segs, nsegs, R, cache.capacity(), s_);
  const int32_t* ids = upload_ids(ids_, tokens, R);
  float* x0 = x0_.floats(RD, "activations");         // [R, D] the hub's rows
  float* xs = xs_.floats(n * RD, "activations");     // [n, R, D] the experts'
  float* mixed = mix_.floats(n * RD, "activations");  // [n, R, D] p_e / q_e
  float* G = G_.floats(R * D * M, "gate logits");     // [R, D*M]
  auto state = [&](int64_t m) { return m == 0 ? x0 : xs + (m - 1) * RD; };
  for (int64_t m = 0; m < (plan_.last_eh > 0 ? M : 1); m++) embed(m, ids, R, state(m));
  for (int64_t j = 1; j <= L; j++) {
    const int64_t i = j - 1;
    for (int64_t m = 0; m < (j <= plan_.last_eh ? M : 1); m++) {  // expert blocks after the last E->H never run
      DeviceKvCache& kc = cache.model(m);
      block_decode(c_, model(m).layers[size_t(i)], ctx, kc.k(i), kc.v(i), state(m), ws_, s_);
    }
    const int64_t k = plan_.stitch_at[size_t(j)];
    if (k >= 0 && active(k)) stitch_inplace(k, R, x0, xs, mixed, G);  // may swap xs / mixed (projected E->H)
  }
  hub_logits(x0 + out_row0 * D, R - out_row0, out);
}

void CudaStitchedModel::prefill(DeviceStitchedCache& cache, int64_t slot, const int32_t* tokens, int64_t T, float* out) {
  const char* op = "prefill";
  std::lock_guard<std::mutex> lock(mu_);
  check_cache(op, cache);
  segs_.assign(1, bts::engine::prefill_segment(op, cache.model(0), slot, T));
  bts::engine::check_token_ids(c_, op, "tokens", tokens, T, false);
  activate();
  Drain drain{s_};
  decode_rows(cache, segs_.data(), 1, tokens, T, T - 1, out);
  cache.set_length(slot, segs_[0].start + T);
}

void CudaStitchedModel::decode(DeviceStitchedCache& cache, const int32_t* slots, const int32_t* tokens, int64_t R, float* out) {
  const char* op = "decode";
  std::lock_guard<std::mutex> lock(mu_);
  check_cache(op, cache);
  bts::engine::decode_segments(op, cache.model(0), slots, R, segs_);
  bts::engine::check_token_ids(c_, op, "tokens", tokens, R, false);
  activate();
  Drain drain{s_};
  decode_rows(cache, segs_.data(), R, tokens, R, 0, out);
  for (int64_t r = 0; r < R; r++) cache.set_length(segs_[size_t(r)].slot, segs_[size_t(r)].start + 1);
}

// ---------------------------------------------------------------------------------------------------
// Training step (stitched.cc's forward_backward on the device).

CudaStitchedModel::Loss CudaStitchedModel::forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T,
                                                            float grad_scale, uint64_t dropout_seed) {
  const char* op = "forwardBackward";
  std::lock_guard<std::mutex> lock(mu_);
  if (!trainable_)
    fail("E_ARGUMENT", std::string(op) + ": the stitched model was created without gradient buffers (frozen stitches); pass grads to train");
  if (!std::isfinite(grad_scale)) fail("E_ARGUMENT", std::string(op) + ": gradScale must be finite, got " + std::to_string(grad_scale));
  bts::engine::check_batch(c_, op, inputs, targets, B, T);
  activate();
  Drain drain{s_};
  const int64_t N = B * T, D = c_.D, ND = N * D, M = plan_.M, n = plan_.n, DM = D * M, L = plan_.L, K = plan_.K;
  const int32_t* ids = upload_ids(ids_, inputs, N);
  const int32_t* tg = upload_ids(tg_, targets, N);

  // Trained stitches that are all inactive (H->E after the last E->H): their gradients are zero.
  if (first_trained_ >= K) {
    hub_loss(forward_infer(ids, B, T, nullptr), N, tg, nullptr, 1.f, nullptr);
    return read_loss();
  }

  const int64_t k0 = first_trained_;
  const int64_t j0 = spec_.stitches[size_t(k0)].after_block;
  const int64_t je = std::min(L, plan_.last_eh);  // last block whose expert output matters (>= j0: k0 is active)
  const uint64_t thr = bts::engine::stitch_dropout_threshold(spec_.gate_dropout);
  const bool drop = thr != 0;
  const BlockCtx ctx = rows_.sequences(c_, B, T, s_);

  // ---- plan the arena: states, stitch buffers, saved activations
  const int64_t per = BlockActs::floats(c_, B, T);
  Arena a;
  std::vector<int64_t> oH(size_t(L + 1), -1), oE(size_t(L + 1), -1);
  for (int64_t p = j0; p <= L; p++) oH[size_t(p)] = a.take(ND);
  for (int64_t p = j0; p <= je; p++) oE[size_t(p)] = a.take(n * ND);
  std::vector<int64_t> oG(size_t(K), -1), oMix(size_t(K), -1), oOut(size_t(K), -1);
  for (int64_t k = k0; k < K; k++) {
    if (!active(k)) continue;
    oG[size_t(k)] = a.take(N * DM);
    oMix[size_t(k)] = a.take(n * ND);
    oOut[size_t(k)] = a.take(eh(k) ? ND : n * ND);
  }
  std::vector<int64_t> oActH(size_t(L + 1), -1), oActE(size_t(L + 1), -1);
  for (int64_t j = j0 + 1; j <= L; j++) oActH[size_t(j)] = a.take(per);
  for (int64_t j = j0 + 1; j <= je; j++) oActE[size_t(j)] = a.take(n * per);
  float* base = states_.floats(a.size, "saved activations");
  auto at = [&](int64_t off) { return base + off; };

  // ---- prefix: blocks 1..j0 and stitches before k0, forward-only, in place into H[j0] / E[j0]
  float* x0 = at(oH[size_t(j0)]);
  float* xs = at(oE[size_t(j0)]);
  {
    float* mixed = mix_.floats(n * ND, "activations");
    float* G = G_.floats(N * DM, "gate logits");
    float* xs_home = xs;
    embed(0, ids, N, x0);
    for (int64_t e = 0; e < n; e++) embed(e + 1, ids, N, xs + e * ND);
    for (int64_t j = 1; j <= j0; j++) {
      block_forward(c_, model(0).layers[size_t(j - 1)], ctx, x0, x0, nullptr, ws_, s_);
      for (int64_t e = 0; e < n; e++) block_forward(c_, model(e + 1).layers[size_t(j - 1)], ctx, xs + e * ND, xs + e * ND, nullptr, ws_, s_);
      const int64_t k = plan_.stitch_at[size_t(j)];
      if (k >= 0 && k < k0 && active(k)) stitch_inplace(k, N, x0, xs, mixed, G);
    }
    if (xs != xs_home) copy(xs_home, xs, n * ND, s_);  // a projected E->H swapped the buffers
  }

  // ---- forward from j0, saving
  float* cur0 = nullptr;  // the hub's state entering the next block
  float* curs = nullptr;  // the experts' [n, N, D]
  std::vector<BlockActs>& acts = act_views_;
  acts.assign(size_t((L + 1) * M), BlockActs());
  auto act = [&](int64_t j, int64_t m) -> BlockActs& { return acts[size_t(j * M + m)]; };
  for (int64_t j = j0; j <= L; j++) {
    float* Hj = at(oH[size_t(j)]);
    float* Ej = j <= je ? at(oE[size_t(j)]) : nullptr;
    if (j > j0) {
      act(j, 0) = BlockActs::bind(c_, B, T, at(oActH[size_t(j)]));
      block_forward(c_, model(0).layers[size_t(j - 1)], ctx, cur0, Hj, &act(j, 0), ws_, s_);
      if (j <= je)
        for (int64_t e = 0; e < n; e++) {
          act(j, e + 1) = BlockActs::bind(c_, B, T, at(oActE[size_t(j)]) + e * per);
          block_forward(c_, model(e + 1).layers[size_t(j - 1)], ctx, curs + e * ND, Ej + e * ND, &act(j, e + 1), ws_, s_);
        }
    }
    cur0 = Hj;
    curs = Ej;
    const int64_t k = plan_.stitch_at[size_t(j)];
    if (k < 0 || !active(k)) continue;
    float* G = at(oG[size_t(k)]);
    float* mixed = at(oMix[size_t(k)]);
    float* out = at(oOut[size_t(k)]);
    gate_logits(k, Hj, N, G, drop, dropout_seed);
    if (eh(k)) {
      for (int64_t e = 0; e < n; e++) lin(proj(k, e), Ej + e * ND, N, D, D, mixed + e * ND, 0.f, s_);  // p_e
      StitchEHParams p;
      p.N = N, p.D = D, p.n = n, p.h0 = Hj, p.p = mixed, p.G = G, p.out = out;
      stitch_eh_forward(p, s_);
      cur0 = out;
      curs = spec_.projected ? mixed : Ej;
    } else {
      for (int64_t e = 0; e < n; e++) lin(proj(k, e), Hj, N, D, D, mixed + e * ND, 0.f, s_);  // q_e
      StitchHEParams p;
      p.N = N, p.D = D, p.n = n, p.h = Ej, p.q = mixed, p.G = G, p.out = out;
      stitch_he_forward(p, s_);
      curs = out;
    }
  }

  // ---- loss: hub final norm + fused LM-head cross-entropy (frozen: dx only), norm backward
  float* dh0 = dh0_.floats(ND, "activation gradients");
  hub_loss(cur0, N, tg, nullptr, grad_scale, dh0);

  // ---- backward
  float* dhs = dhs_.floats(n * ND, "activation gradients");    // the experts' stream gradients
  float* dtmp = dtmp_.floats(n * ND, "activation gradients");  // dp / dq
  float* dG = dG_.floats(N * DM, "gate logit gradients");
  bool have_dhs = false;
  for (int64_t j = L; j >= j0; j--) {
    const int64_t k = plan_.stitch_at[size_t(j)];
    if (k >= 0 && active(k)) {
      const bool first = k == k0;
      float* Hj = at(oH[size_t(j)]);
      float* Ej = at(oE[size_t(j)]);
      const float* G = at(oG[size_t(k)]);
      const float* mixed = at(oMix[size_t(k)]);
      const uint64_t key = bts::engine::stitch_dropout_key(dropout_seed, k);
      if (eh(k)) {
        // h0' = g_0 h0 + sum_e g_e p_e; p_e = h_e Wp_e^T; h_e' = p_e (projected) or h_e
        StitchEHBackwardParams p;
        p.N = N, p.D = D, p.n = n, p.h0 = Hj, p.p = mixed, p.G = G, p.dout = dh0, p.dh0 = dh0, p.dp = dtmp, p.dG = dG;
        stitch_eh_backward(p, s_);
        if (have_dhs && spec_.projected) add(dtmp, dtmp, dhs, n * ND, s_);  // the expert stream was p_e too
        if (drop) mask_grad(dG, N * DM, M, key, thr, s_);
        lin_dw(gate_grad(k), dG, Hj, N, D, DM, s_);  // dWg += dG^T h0
        for (int64_t e = 0; e < n; e++) lin_dw(proj_grad(k, e), dtmp + e * ND, Ej + e * ND, N, D, D, s_);
        if (first) break;
        lin_dx(gate(k), dG, N, D, DM, dh0, 1.f, s_);  // dh0 += dG Wg
        const float beta = have_dhs && !spec_.projected ? 1.f : 0.f;  // unchanged: h_e' = h_e adds dhs
        for (int64_t e = 0; e < n; e++) lin_dx(proj(k, e), dtmp + e * ND, N, D, D, dhs + e * ND, beta, s_);
        have_dhs = true;
      } else if (have_dhs) {
        // h_e' = (1 - g_e) h_e + g_e q_e; q_e = h0 Wp_e^T; h0' = h0
        StitchHEBackwardParams p;
        p.N = N, p.D = D, p.n = n, p.h = Ej, p.q = mixed, p.G = G, p.dout = dhs, p.dh = dhs, p.dq = dtmp, p.dG = dG;
        stitch_he_backward(p, s_);
        if (drop) mask_grad(dG, N * DM, M, key, thr, s_);
        lin_dw(gate_grad(k), dG, Hj, N, D, DM, s_);
        for (int64_t e = 0; e < n; e++) lin_dw(proj_grad(k, e), dtmp + e * ND, Hj, N, D, D, s_);
        if (first) break;
        lin_dx(gate(k), dG, N, D, DM, dh0, 1.f, s_);
        for (int64_t e = 0; e < n; e++) lin_dx(proj(k, e), dtmp + e * ND, N, D, D, dh0, 1.f, s_);
      } else if (first) {
        break;
      }
    }
    if (j == j0) break;
    block_backward(c_, model(0).layers[size_t(j - 1)], nullptr, act(j, 0), dh0, dh0, ws_, s_);
    if (have_dhs)
      for (int64_t e = 0; e < n; e++)
        block_backward(c_, model(e + 1).layers[size_t(j - 1)], nullptr, act(j, e + 1), dhs + e * ND, dhs + e * ND, ws_, s_);
  }
  return read_loss();
}

// ---------------------------------------------------------------------------------------------------
// Host <-> device stitch tensors.

void CudaStitchedModel::upload_weights(const std::vector<HostTensor>& w) {
  const char* op = "uploadWeights";
  std::lock_guard<std::mutex> lock(mu_);
  for (const HostTensor& t : w) tensor(t.name, op);  // every name checked before anything is copied
  activate();
  Drain drain{s_};
  for (const HostTensor& t : w) {
    const StitchTensor& st = tensor(t.name, op);
    const size_t i = size_t(&st - tensors_.data());
    BTS_CUDA_CHECK(cudaMemcpyAsync(wdev_[i], t.data, size_t(st.numel) * sizeof(float), cudaMemcpyHostToDevice, s_));
  }
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

void CudaStitchedModel::download_weights(const std::vector<HostTensor>& out) {
  const char* op = "downloadWeights";
  std::lock_guard<std::mutex> lock(mu_);
  for (const HostTensor& t : out) tensor(t.name, op);
  activate();
  Drain drain{s_};
  for (const HostTensor& t : out) {
    const StitchTensor& st = tensor(t.name, op);
    const size_t i = size_t(&st - tensors_.data());
    BTS_CUDA_CHECK(cudaMemcpyAsync(t.data, wdev_[i], size_t(st.numel) * sizeof(float), cudaMemcpyDeviceToHost, s_));
  }
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

size_t CudaStitchedModel::trained_index(const std::string& name, const char* op) const {
  const size_t i = size_t(&tensor(name, op) - tensors_.data());
  if (!gdev_[i])
    fail("E_ARGUMENT", std::string(op) + ": '" + name + "' has no gradient (the stitched model was created " +
                           (trainable_ ? "with gradients for other tensors only)" : "without gradients: frozen stitches)"));
  return i;
}

void CudaStitchedModel::grads_copy(const std::vector<HostTensor>& t, bool upload) {
  const char* op = upload ? "uploadGrads" : "downloadGrads";
  std::lock_guard<std::mutex> lock(mu_);
  for (const HostTensor& x : t) trained_index(x.name, op);  // every name checked before anything is copied
  activate();
  Drain drain{s_};
  for (const HostTensor& x : t) {
    const size_t i = trained_index(x.name, op);
    const size_t bytes = size_t(tensors_[i].numel) * sizeof(float);
    if (upload) BTS_CUDA_CHECK(cudaMemcpyAsync(gdev_[i], x.data, bytes, cudaMemcpyHostToDevice, s_));
    else BTS_CUDA_CHECK(cudaMemcpyAsync(x.data, gdev_[i], bytes, cudaMemcpyDeviceToHost, s_));
  }
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

void CudaStitchedModel::zero_grads() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!sg_.get()) return;
  activate();
  Drain drain{s_};
  BTS_CUDA_CHECK(cudaMemsetAsync(sg_.get(), 0, sg_.bytes(), s_));
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

// ---------------------------------------------------------------------------------------------------
// The optimizer on the device (as CudaLlamaModel's): AdamW moments in arenas shaped like the gradient
// arena (allocated zeroed on first use), one cuda::adamw_step over the trained prefix [0, train_end_)
// of the weight arena. Every element decays (n_decay = n): the host layout puts only matrices in a
// stitched model's flat buffer (StitchedModel.nDecay = params.length).

float CudaStitchedModel::adamw_step(const OptimStep& o) {
  const char* op = "adamwStep";
  std::lock_guard<std::mutex> lock(mu_);
  if (!trainable_) fail("E_ARGUMENT", std::string(op) + ": the stitched model was created without gradient buffers (frozen stitches)");
  activate();
  Drain drain{s_};
  opt_.ensure(train_end_, s_);
  return opt_.step(static_cast<float*>(sw_.get()), static_cast<const float*>(sg_.get()), train_end_, o, scalars_, s_);
}

void CudaStitchedModel::moments_copy(const std::vector<HostTensor>& m, const std::vector<HostTensor>& v, bool upload) {
  const char* op = upload ? "uploadMoments" : "downloadMoments";
  std::lock_guard<std::mutex> lock(mu_);
  for (const std::vector<HostTensor>* ts : {&m, &v})
    for (const HostTensor& t : *ts) trained_index(t.name, op);
  activate();
  Drain drain{s_};
  opt_.ensure(train_end_, s_);
  for (int which = 0; which < 2; which++) {
    for (const HostTensor& t : which == 0 ? m : v) {
      const size_t i = trained_index(t.name, op);
      opt_.copy(which, g_off_[i], tensors_[i].numel, t.data, upload, s_);
    }
  }
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
}

void CudaStitchedModel::release() {
  std::lock_guard<std::mutex> lock(mu_);
  activate();
  BTS_CUDA_CHECK(cudaStreamSynchronize(s_));
  ws_.release();
  rows_.release();
  for (DeviceBuffer* b : {&x0_, &xs_, &mix_, &G_, &xf_, &rstdf_, &states_, &dh0_, &dhs_, &dtmp_, &dG_, &ids_, &tg_, &losses_, &logits_, &scalars_})
    b->release();
  gates_host_.clear();
  gates_host_.shrink_to_fit();
}

size_t CudaStitchedModel::workspace_bytes() const {
  size_t s = ws_.bytes() + rows_.bytes();
  for (const DeviceBuffer* b : {&x0_, &xs_, &mix_, &G_, &xf_, &rstdf_, &states_, &dh0_, &dhs_, &dtmp_, &dG_, &ids_, &tg_, &losses_, &logits_, &scalars_})
    s += b->bytes();
  return s;
}

size_t CudaStitchedModel::device_bytes() const {
  size_t s = workspace_bytes() + sw_.bytes() + sg_.bytes() + opt_.bytes();
  for (const auto& b : model_bufs_) s += b->bytes();
  return s;
}

}  // namespace engine
}  // namespace cuda
}  // namespace bts
