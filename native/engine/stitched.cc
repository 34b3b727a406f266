// stitched.cc: the stitched model of stitched.h: validation, the training step (forward saving what
// the backward needs from the first trained stitch on, hub loss, backward to the stitch tensors only),
// forward-only loss / logits / gate record, and KV-cached prefill / decode. Data flow as
// test/golden/stitch-ops.ts (the TS oracle checked against PyTorch); this file chooses the buffers.
//
// Training step, N = B*T rows, M = n + 1 models, j0 = block of the first trained stitch k0:
//   blocks 1..j0 of every model, and the stitches before k0: forward-only, in place, nothing kept
//   H[p] [N, D], E[p] [n, N, D] for p = j0..L: the models' states after block p (before a stitch
//     there); expert states only up to the last E->H stitch (later expert blocks never run)
//   stitch k at block j (k >= k0): G_k [N, D*M] (effective logits: dropout mask, hub bias), mixed_k
//     [n, N, D] (p_e or q_e), and its output: E->H O0_k [N, D] (h0'), experts -> mixed_k (projected)
//     or E[j] (unchanged); H->E Os_k [n, N, D] (h_e'), hub -> H[j]
//   block j+1 reads the output of the stitch at j or, without one, H[j] / E[j]; its BlockActs point
//   at that input, which stays untouched until the backward
//   loss: xf = norm(hub final state); fused cross-entropy, dx only (frozen head); norm backward
//   backward, j = L down to j0: stitch backward at j (dW of its tensors; dh0 / dhs of its inputs
//     unless k == k0), then, if j > j0, hub block j input gradient in place on dh0 and, while an
//     E->H stitch above has mixed the experts in (dhs live), expert block j likewise on dhs.
// Decode / prefill: every model's block j through block_decode against its own cache, then the stitch
// at j in place on the rows (the E->H "projected" expert output just swaps two buffers).
#include "stitched.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <utility>

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "linear.h"

namespace bts {
namespace engine {

using namespace detail;

namespace {

constexpr int64_t kMaxExperts = 4096;           // as the stitch ops

std::string S(int64_t x) { return std::to_string(x); }

[[noreturn]] void fail(const char* code, const std::string& msg) { throw Error(code, msg); }

int64_t align16(int64_t n) { return (n + 15) & ~int64_t(15); }

inline uint64_t mix64(uint64_t z) { return stitch_mix64(z); }
inline uint64_t dropout_key(uint64_t seed, int64_t k) { return stitch_dropout_key(seed, k); }
inline uint64_t dropout_threshold(float p) { return stitch_dropout_threshold(p); }

// Zeroes the entries of x [rows, cols] (rows starting at global row r0) that the mask drops.
void apply_mask(float* x, int64_t rows, int64_t cols, uint64_t key, uint64_t threshold) {
  parallel_for(rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; r++) {
      float* row = x + r * cols;
      const uint64_t base = key + uint64_t(r * cols);
      for (int64_t i = 0; i < cols; i++)
        if (mix64(base + uint64_t(i)) < threshold) row[i] = 0.f;
    }
  });
}

// y [rows, out] (= or +=) x [rows, in] W^T for an fp32 stitch weight W [out, in].
void lin(const float* W, const float* x, int64_t rows, int64_t in, int64_t out, float* y, float beta) {
  Weight w;
  w.f32 = W;
  linear_fwd(w, x, rows, in, out, y, beta);
}

// dx [rows, in] (= or +=) dy [rows, out] W.
void lin_dx(const float* W, const float* dy, int64_t rows, int64_t in, int64_t out, float* dx, float beta) {
  Weight w;
  w.f32 = W;
  linear_dx(w, dy, rows, in, out, dx, beta);
}

// Bump allocator over one float vector: offsets first (plan), pointers after the vector is sized.
struct Arena {
  int64_t size = 0;
  int64_t take(int64_t n) {
    const int64_t at = size;
    size += align16(n);
    return at;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Backend-neutral pieces (stitched.h).

StitchPlan plan_stitches(const LlamaConfig& c, int64_t n, const StitchSpec& spec) {
  if (n < 1 || n > kMaxExperts) fail("E_ARGUMENT", "stitched: the number of experts must be in 1.." + S(kMaxExperts) + ", got " + S(n));
  if (c.D * (n + 1) > (int64_t(1) << 31)) fail("E_ARGUMENT", "stitched: hiddenSize * (experts + 1) is too large");
  StitchPlan p;
  p.n = n, p.M = n + 1, p.L = c.L;
  p.K = int64_t(spec.stitches.size());
  if (p.K < 1 || p.K > p.L) fail("E_ARGUMENT", "stitched: the number of stitches must be in 1..numHiddenLayers (" + S(p.L) + "), got " + S(p.K));
  p.stitch_at.assign(size_t(p.L + 1), -1);
  int64_t prev = 0;
  for (int64_t k = 0; k < p.K; k++) {
    const StitchPoint& s = spec.stitches[size_t(k)];
    if (s.after_block < 1 || s.after_block > p.L)
      fail("E_ARGUMENT", "stitched: stitches[" + S(k) + "].afterBlock must be in 1.." + S(p.L) + ", got " + S(s.after_block));
    if (s.after_block <= prev)
      fail("E_ARGUMENT", "stitched: stitches[" + S(k) + "].afterBlock " + S(s.after_block) + " must be greater than the previous one (" + S(prev) + ")");
    if (s.type != StitchType::EH && s.type != StitchType::HE) fail("E_ARGUMENT", "stitched: stitches[" + S(k) + "].type is invalid");
    prev = s.after_block;
    p.stitch_at[size_t(s.after_block)] = k;
    if (s.type == StitchType::EH) p.last_eh = s.after_block;
  }
  if (!std::isfinite(spec.hub_bias)) fail("E_ARGUMENT", "stitched: hubBias must be finite, got " + std::to_string(spec.hub_bias));
  if (!(spec.gate_dropout >= 0.f && spec.gate_dropout < 1.f))
    fail("E_ARGUMENT", "stitched: gateDropout must be in [0, 1), got " + std::to_string(spec.gate_dropout));
  return p;
}

int64_t StitchPlan::first_trained(const StitchSpec& spec, const std::vector<bool>& trained) const {
  for (int64_t k = 0; k < K; k++)
    if (trained[size_t(k)] && active(spec, k)) return k;
  return K;
}

std::vector<StitchTensor> stitch_tensors(int64_t D, int64_t n, int64_t K) {
  std::vector<StitchTensor> out;
  for (int64_t k = 0; k < K; k++) {
    for (int64_t e = 0; e < n; e++) out.push_back({"stitch." + S(k) + ".proj." + S(e) + ".weight", k, e, D * D});
    out.push_back({"stitch." + S(k) + ".gate.weight", k, -1, D * (n + 1) * D});
  }
  return out;
}

uint64_t stitch_dropout_threshold(float p) {
  if (!(p > 0.f)) return 0;
  return uint64_t(std::ldexp(double(p), 64));  // p < 1 so this stays below 2^64
}

// ---------------------------------------------------------------------------------------------------
// Cache.

void check_cache_models(int64_t models) {
  if (models < 2 || models > kMaxExperts + 1) fail("E_ARGUMENT", "createCache: models must be in 2.." + S(kMaxExperts + 1) + ", got " + S(models));
}

// ---------------------------------------------------------------------------------------------------
// Construction.

StitchedModel::StitchedModel(const LlamaConfig& c, const ModelWeights& hub, const std::vector<ModelWeights>& experts,
                             const StitchSpec& spec, const StitchWeights& w, const StitchGrads* grads)
    : c_(c), hub_(hub), experts_(experts), spec_(spec), w_(w) {
  validate_config(c);
  n_ = int64_t(experts.size());
  const StitchPlan plan = plan_stitches(c, n_, spec);  // n, D*M and the spec (E_ARGUMENT)
  M_ = n_ + 1;
  L_ = c.L;
  // Every model's weights as the engine checks them (present, one dtype per matrix, fp32 norms).
  auto check_model = [&](ModelWeights& m, const std::string& who) {
    try {
      LlamaModel probe(c, m, nullptr);
    } catch (const Error& e) {
      fail(e.code.c_str(), "stitched: " + who + ": " + e.what());
    }
    if (c.tie) m.lm_head = m.embed;
  };
  check_model(hub_, "hub");
  for (int64_t e = 0; e < n_; e++) check_model(experts_[size_t(e)], "expert " + S(e));

  // Spec (validated by plan_stitches).
  K_ = plan.K;
  stitch_at_ = plan.stitch_at;
  last_eh_ = plan.last_eh;

  // Stitch weights.
  if (int64_t(w_.proj.size()) != K_ || int64_t(w_.gate.size()) != K_)
    fail("E_ARGUMENT", "stitched: stitch weights for " + S(int64_t(w_.gate.size())) + " stitches, the spec has " + S(K_));
  for (int64_t k = 0; k < K_; k++) {
    if (int64_t(w_.proj[size_t(k)].size()) != n_)
      fail("E_ARGUMENT", "stitched: stitch " + S(k) + " has " + S(int64_t(w_.proj[size_t(k)].size())) + " projections, expected " + S(n_));
    for (int64_t e = 0; e < n_; e++)
      if (!w_.proj[size_t(k)][size_t(e)]) fail("E_ARGUMENT", "stitched: stitch tensor stitch." + S(k) + ".proj." + S(e) + ".weight is missing");
    if (!w_.gate[size_t(k)]) fail("E_ARGUMENT", "stitched: stitch tensor stitch." + S(k) + ".gate.weight is missing");
  }
  if (grads) g_ = *grads;
  if (g_.proj.empty()) g_.proj.assign(size_t(K_), std::vector<float*>(size_t(n_), nullptr));
  if (g_.gate.empty()) g_.gate.assign(size_t(K_), nullptr);
  if (int64_t(g_.proj.size()) != K_ || int64_t(g_.gate.size()) != K_)
    fail("E_ARGUMENT", "stitched: stitch gradients for " + S(int64_t(g_.gate.size())) + " stitches, the spec has " + S(K_));
  for (int64_t k = 0; k < K_; k++)
    if (int64_t(g_.proj[size_t(k)].size()) != n_)
      fail("E_ARGUMENT", "stitched: stitch " + S(k) + " has " + S(int64_t(g_.proj[size_t(k)].size())) + " projection gradients, expected " + S(n_));
  std::vector<bool> trained(size_t(K_), false);
  for (int64_t k = 0; k < K_; k++) {
    bool any = g_.gate[size_t(k)] != nullptr;
    for (float* p : g_.proj[size_t(k)]) any = any || p != nullptr;
    trained[size_t(k)] = any;
    trainable_any_ = trainable_any_ || any;
  }
  first_trained_ = plan.first_trained(spec_, trained);
}

bool StitchedModel::active(int64_t k) const {
  const StitchSpec& sp = spec_;
  StitchPlan p;
  p.last_eh = last_eh_;
  return p.active(sp, k);
}

// ---------------------------------------------------------------------------------------------------
// Helpers.

void StitchedModel::check_cache(const char* op, StitchedCache& cache) const {
  if (cache.models() != M_ || !cache.model(0).compatible(c_))
    fail("E_ARGUMENT", std::string(op) + ": the cache was made for another model (" + S(cache.models()) + " models; this one has " + S(M_) + ")");
}

StitchedModel::Loss StitchedModel::hub_loss(const float* h, int64_t N, const int32_t* targets, float* losses) {
  float* xf = grow_floats(xf_, N * c_.D);
  rmsnorm(h, hub_.norm, N, c_.D, c_.eps, xf, nullptr);
  return head_loss(c_, xf, N, head_f32(), targets, losses);
}

void StitchedModel::gate_logits(int64_t k, const float* h0, int64_t rows, float* G, bool dropout, uint64_t seed) {
  const int64_t D = c_.D, DM = D * M_;
  lin(w_.gate[size_t(k)], h0, rows, D, DM, G, 0.f);  // [rows, D*M]
  if (dropout) {
    const uint64_t thr = dropout_threshold(spec_.gate_dropout);
    if (thr) apply_mask(G, rows, DM, dropout_key(seed, k), thr);
  }
  const float b = spec_.hub_bias;
  if (b == 0.f) return;
  const bool eh = spec_.stitches[size_t(k)].type == StitchType::EH;
  const int64_t M = M_;
  parallel_for(rows * D, 1 << 14, [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; i++) {
      float* g = G + i * M;  // the M logits of one (row, dim)
      if (eh) g[0] += b;
      else
        for (int64_t m = 1; m < M; m++) g[m] -= b;
    }
  });
}

void StitchedModel::stitch_inplace(int64_t k, int64_t rows, float* x0, float*& xs, float*& mixed, float* G, bool grouped) {
  const int64_t D = c_.D, RD = rows * D;
  const bool eh = spec_.stitches[size_t(k)].type == StitchType::EH;
  // task 0: the gate logits; task e+1: expert e's projection (p_e = h_e Wp_e^T, or q_e = h0 Wp_e^T)
  auto task = [&](int64_t i) {
    if (i == 0) gate_logits(k, x0, rows, G, false, 0);
    else lin(w_.proj[size_t(k)][size_t(i - 1)], eh ? xs + (i - 1) * RD : x0, rows, D, D, mixed + (i - 1) * RD, 0.f);
  };
  if (grouped)
    parallel_for(M_, 1, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; i++) task(i);
    });
  else
    for (int64_t i = 0; i < M_; i++) task(i);
  if (eh) {
    StitchEHParams p;
    p.N = rows, p.D = D, p.n = n_, p.h0 = x0, p.p = mixed, p.G = G, p.out = x0;
    stitch_eh_forward(p);
    if (spec_.projected) std::swap(xs, mixed);  // h_e' = p_e
  } else {
    StitchHEParams p;
    p.N = rows, p.D = D, p.n = n_, p.h = xs, p.q = mixed, p.G = G, p.out = xs;
    stitch_he_forward(p);
  }
}

// out [rows, M] (row stride ld): the mean over the D dims of stitch gates from logits G [rows, D*M].
void gate_means(const float* G, int64_t rows, int64_t D, int64_t M, bool eh, float* out, int64_t ld) {
  parallel_for(rows, 1, [&](int64_t r0, int64_t r1, int) {
    std::vector<double> acc(static_cast<size_t>(M));
    std::vector<double> e(static_cast<size_t>(M));
    for (int64_t r = r0; r < r1; r++) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t d = 0; d < D; d++) {
        const float* g = G + (r * D + d) * M;
        if (eh) {
          double mx = g[0];
          for (int64_t m = 1; m < M; m++) mx = std::max(mx, double(g[m]));
          double s = 0;
          for (int64_t m = 0; m < M; m++) s += (e[size_t(m)] = std::exp(double(g[m]) - mx));
          for (int64_t m = 0; m < M; m++) acc[size_t(m)] += e[size_t(m)] / s;
        } else {
          for (int64_t m = 1; m < M; m++) acc[size_t(m)] += 1.0 / (1.0 + std::exp(-double(g[m])));
        }
      }
      for (int64_t m = 0; m < M; m++) out[r * ld + m] = float(acc[size_t(m)] / double(D));
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Forward without saving (loss, logits, gates).

float* StitchedModel::forward_infer(const int32_t* ids, int64_t B, int64_t T, float* gates_out) {
  const int64_t N = B * T, D = c_.D, ND = N * D;
  const BlockCtx ctx = rows_.sequences(c_, B, T);
  float* x0 = grow_floats(x0_, ND);
  float* xs = grow_floats(xs_, n_ * ND);
  float* mixed = grow_floats(mix_, n_ * ND);
  float* G = grow_floats(G_, N * D * M_);
  embed_tokens(c_, hub_.embed, ids, N, x0);
  if (last_eh_ > 0)
    for (int64_t e = 0; e < n_; e++) embed_tokens(c_, experts_[size_t(e)].embed, ids, N, xs + e * ND);
  for (int64_t j = 1; j <= L_; j++) {
    block_forward(c_, hub_.layers[size_t(j - 1)], ctx, x0, x0, nullptr, ws_);
    if (j <= last_eh_)
      for (int64_t e = 0; e < n_; e++) block_forward(c_, experts_[size_t(e)].layers[size_t(j - 1)], ctx, xs + e * ND, xs + e * ND, nullptr, ws_);
    const int64_t k = stitch_at_[size_t(j)];
    if (k < 0) continue;
    if (active(k)) stitch_inplace(k, N, x0, xs, mixed, G, false);
    else if (gates_out) gate_logits(k, x0, N, G, false, 0);  // inactive H->E: only its gate is recorded
    // stitch_inplace leaves G = this stitch's logits (the mix never changes G)
    if (gates_out) gate_means(G, N, D, M_, spec_.stitches[size_t(k)].type == StitchType::EH, gates_out + k * N * M_, M_);
  }
  return x0;
}

StitchedModel::Loss StitchedModel::loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float* losses) {
  const char* op = "loss";
  ComputeLock lock;
  check_batch(c_, op, inputs, targets, B, T);
  return hub_loss(forward_infer(inputs, B, T, nullptr), B * T, targets, losses);
}

void StitchedModel::logits(const int32_t* tokens, int64_t B, int64_t T, float* out) {
  const char* op = "logits";
  ComputeLock lock;
  check_rows(c_, op, B, T);
  const int64_t N = B * T;
  check_token_ids(c_, op, "tokens", tokens, N, false);
  const float* h = forward_infer(tokens, B, T, nullptr);
  final_logits(c_, hub_.norm, hub_.lm_head, h, N, grow_floats(xf_, N * c_.D), out);
}

void StitchedModel::gates(const int32_t* tokens, int64_t T, float* out) {
  const char* op = "gates";
  ComputeLock lock;
  check_rows(c_, op, 1, T);
  check_token_ids(c_, op, "tokens", tokens, T, false);
  forward_infer(tokens, 1, T, out);
}

// ---------------------------------------------------------------------------------------------------
// Training step.

StitchedModel::Loss StitchedModel::forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T,
                                                    float grad_scale, uint64_t dropout_seed) {
  const char* op = "forwardBackward";
  ComputeLock lock;
  if (!trainable_any_)
    fail("E_ARGUMENT", std::string(op) + ": the stitched model was created without gradient buffers (frozen stitches); pass grads to train");
  if (!std::isfinite(grad_scale)) fail("E_ARGUMENT", std::string(op) + ": gradScale must be finite, got " + std::to_string(grad_scale));
  check_batch(c_, op, inputs, targets, B, T);
  const int64_t N = B * T, D = c_.D, ND = N * D, M = M_, n = n_, DM = D * M, L = L_;

  // Trained stitches that are all inactive (H->E after the last E->H): their gradients are zero.
  if (first_trained_ >= K_) return hub_loss(forward_infer(inputs, B, T, nullptr), N, targets, nullptr);

  const int64_t k0 = first_trained_;
  const int64_t j0 = spec_.stitches[size_t(k0)].after_block;
  const int64_t je = std::min(L, last_eh_);  // last block whose expert output matters (>= j0: k0 is active)
  const bool drop = dropout_threshold(spec_.gate_dropout) != 0;

  const BlockCtx ctx = rows_.sequences(c_, B, T);

  // ---- plan the arena: states, stitch buffers, saved activations
  const int64_t per = BlockActs::floats(c_, B, T);
  Arena a;
  std::vector<int64_t> oH(size_t(L + 1), -1), oE(size_t(L + 1), -1);
  for (int64_t p = j0; p <= L; p++) oH[size_t(p)] = a.take(ND);
  for (int64_t p = j0; p <= je; p++) oE[size_t(p)] = a.take(n * ND);
  std::vector<int64_t> oG(size_t(K_), -1), oMix(size_t(K_), -1), oOut(size_t(K_), -1);
  for (int64_t k = k0; k < K_; k++) {
    if (!active(k)) continue;
    oG[size_t(k)] = a.take(N * DM);
    oMix[size_t(k)] = a.take(n * ND);
    oOut[size_t(k)] = a.take(spec_.stitches[size_t(k)].type == StitchType::EH ? ND : n * ND);
  }
  std::vector<int64_t> oActH(size_t(L + 1), -1), oActE(size_t(L + 1), -1);
  for (int64_t j = j0 + 1; j <= L; j++) oActH[size_t(j)] = a.take(per);
  for (int64_t j = j0 + 1; j <= je; j++) oActE[size_t(j)] = a.take(n * per);
  float* base = grow_floats(states_, a.size);
  auto at = [&](int64_t off) { return base + off; };

  // ---- prefix: blocks 1..j0 and stitches before k0, forward-only, in place into H[j0] / E[j0]
  float* x0 = at(oH[size_t(j0)]);
  float* xs = at(oE[size_t(j0)]);
  {
    float* mixed = grow_floats(mix_, n * ND);
    float* G = grow_floats(G_, N * DM);
    float* xs_home = xs;
    embed_tokens(c_, hub_.embed, inputs, N, x0);
    for (int64_t e = 0; e < n; e++) embed_tokens(c_, experts_[size_t(e)].embed, inputs, N, xs + e * ND);
    for (int64_t j = 1; j <= j0; j++) {
      block_forward(c_, hub_.layers[size_t(j - 1)], ctx, x0, x0, nullptr, ws_);
      for (int64_t e = 0; e < n; e++) block_forward(c_, experts_[size_t(e)].layers[size_t(j - 1)], ctx, xs + e * ND, xs + e * ND, nullptr, ws_);
      const int64_t k = stitch_at_[size_t(j)];
      if (k >= 0 && k < k0 && active(k)) stitch_inplace(k, N, x0, xs, mixed, G, false);
    }
    if (xs != xs_home) copy(xs_home, xs, n * ND);  // a projected E->H swapped the buffers
  }

  // ---- forward from j0, saving
  float* cur0 = nullptr;  // the hub's state entering the next block (output of the stitch at j, or H[j])
  float* curs = nullptr;  // the experts' [n, N, D]
  std::vector<BlockActs>& acts = act_views_;
  acts.assign(size_t((L + 1) * M), BlockActs());
  auto act = [&](int64_t j, int64_t m) -> BlockActs& { return acts[size_t(j * M + m)]; };
  for (int64_t j = j0; j <= L; j++) {
    float* Hj = at(oH[size_t(j)]);
    float* Ej = j <= je ? at(oE[size_t(j)]) : nullptr;
    if (j > j0) {
      act(j, 0) = BlockActs::bind(c_, B, T, at(oActH[size_t(j)]));
      block_forward(c_, hub_.layers[size_t(j - 1)], ctx, cur0, Hj, &act(j, 0), ws_);
      if (j <= je)
        for (int64_t e = 0; e < n; e++) {
          act(j, e + 1) = BlockActs::bind(c_, B, T, at(oActE[size_t(j)]) + e * per);
          block_forward(c_, experts_[size_t(e)].layers[size_t(j - 1)], ctx, curs + e * ND, Ej + e * ND, &act(j, e + 1), ws_);
        }
    }
    cur0 = Hj;
    curs = Ej;
    const int64_t k = stitch_at_[size_t(j)];
    if (k < 0 || !active(k)) continue;
    float* G = at(oG[size_t(k)]);
    float* mixed = at(oMix[size_t(k)]);
    float* out = at(oOut[size_t(k)]);
    gate_logits(k, Hj, N, G, drop, dropout_seed);
    if (spec_.stitches[size_t(k)].type == StitchType::EH) {
      for (int64_t e = 0; e < n; e++) lin(w_.proj[size_t(k)][size_t(e)], Ej + e * ND, N, D, D, mixed + e * ND, 0.f);  // p_e
      StitchEHParams p;
      p.N = N, p.D = D, p.n = n, p.h0 = Hj, p.p = mixed, p.G = G, p.out = out;
      stitch_eh_forward(p);
      cur0 = out;
      curs = spec_.projected ? mixed : Ej;
    } else {
      for (int64_t e = 0; e < n; e++) lin(w_.proj[size_t(k)][size_t(e)], Hj, N, D, D, mixed + e * ND, 0.f);  // q_e
      StitchHEParams p;
      p.N = N, p.D = D, p.n = n, p.h = Ej, p.q = mixed, p.G = G, p.out = out;
      stitch_he_forward(p);
      curs = out;
    }
  }
  const float* hL = cur0;  // the hub's final state [N, D]

  // ---- loss: hub final norm + fused LM-head cross-entropy (frozen: dx only)
  float* xf = grow_floats(xf_, ND);
  float* rstdf = grow_floats(rstdf_, N);
  rmsnorm(hL, hub_.norm, N, D, c_.eps, xf, rstdf);
  float* dh0 = grow_floats(dh0_, ND);
  const Loss out = head_loss(c_, xf, N, head_f32(), targets, nullptr, grad_scale, dh0, nullptr);
  rmsnorm_bwd(hL, hub_.norm, rstdf, N, D, dh0, nullptr);

  // ---- backward
  float* dhs = grow_floats(dhs_, n * ND);   // the experts' stream gradients (live once an E->H mixed them in)
  float* dtmp = grow_floats(dtmp_, n * ND); // dp / dq
  float* dG = grow_floats(dG_, N * DM);
  bool have_dhs = false;
  const uint64_t thr = dropout_threshold(spec_.gate_dropout);
  for (int64_t j = L; j >= j0; j--) {
    const int64_t k = stitch_at_[size_t(j)];
    if (k >= 0 && active(k)) {
      const bool first = k == k0;
      const bool eh = spec_.stitches[size_t(k)].type == StitchType::EH;
      float* Hj = at(oH[size_t(j)]);
      float* Ej = at(oE[size_t(j)]);
      const float* G = at(oG[size_t(k)]);
      const float* mixed = at(oMix[size_t(k)]);
      const float* Wg = w_.gate[size_t(k)];
      float* gWg = g_.gate[size_t(k)];
      if (eh) {
        // h0' = g_0 h0 + sum_e g_e p_e; p_e = h_e Wp_e^T; h_e' = p_e (projected) or h_e
        StitchEHBackwardParams p;
        p.N = N, p.D = D, p.n = n, p.h0 = Hj, p.p = mixed, p.G = G, p.dout = dh0, p.dh0 = dh0, p.dp = dtmp, p.dG = dG;
        stitch_eh_backward(p);
        if (have_dhs && spec_.projected) add(dtmp, dtmp, dhs, n * ND);  // the expert stream was p_e too
        if (drop) apply_mask(dG, N, DM, dropout_key(dropout_seed, k), thr);
        linear_dw(gWg, dG, Hj, N, D, DM);  // dWg += dG^T h0
        for (int64_t e = 0; e < n; e++) linear_dw(g_.proj[size_t(k)][size_t(e)], dtmp + e * ND, Ej + e * ND, N, D, D);
        if (first) break;
        lin_dx(Wg, dG, N, D, DM, dh0, 1.f);  // dh0 += dG Wg
        const float beta = have_dhs && !spec_.projected ? 1.f : 0.f;  // unchanged: h_e' = h_e adds dhs
        for (int64_t e = 0; e < n; e++) lin_dx(w_.proj[size_t(k)][size_t(e)], dtmp + e * ND, N, D, D, dhs + e * ND, beta);
        have_dhs = true;
      } else if (have_dhs) {
        // h_e' = (1 - g_e) h_e + g_e q_e; q_e = h0 Wp_e^T; h0' = h0
        StitchHEBackwardParams p;
        p.N = N, p.D = D, p.n = n, p.h = Ej, p.q = mixed, p.G = G, p.dout = dhs, p.dh = dhs, p.dq = dtmp, p.dG = dG;
        stitch_he_backward(p);
        if (drop) apply_mask(dG, N, DM, dropout_key(dropout_seed, k), thr);
        linear_dw(gWg, dG, Hj, N, D, DM);
        for (int64_t e = 0; e < n; e++) linear_dw(g_.proj[size_t(k)][size_t(e)], dtmp + e * ND, Hj, N, D, D);
        if (first) break;
        lin_dx(Wg, dG, N, D, DM, dh0, 1.f);
        for (int64_t e = 0; e < n; e++) lin_dx(w_.proj[size_t(k)][size_t(e)], dtmp + e * ND, N, D, D, dh0, 1.f);
      } else if (first) {
        break;
      }
    }
    if (j == j0) break;
    block_backward(c_, hub_.layers[size_t(j - 1)], nullptr, act(j, 0), dh0, dh0, ws_);
    if (have_dhs)
      for (int64_t e = 0; e < n; e++)
        block_backward(c_, experts_[size_t(e)].layers[size_t(j - 1)], nullptr, act(j, e + 1), dhs + e * ND, dhs + e * ND, ws_);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// KV-cached inference.

// Grouping cost model. A block of one model over R rows costs W = R * (D*(QD + 2 KD) + QD*D + 3 D*F)
// multiply-adds (attention over the cache left out: it is the same either way). Model after model,
// each of its ~12 ops is parallel over P threads and pays a hand-off: M * (W / (r P) + 12 s). Grouped,
// each task runs a whole block serially and the M tasks share the P threads: ceil(M / P) * W / r.
// r ~ 8 GMAC/s per core (a GEMV streams its weight matrix), s ~ 3 us per op (spinning workers).
// Small models and decode: grouped (e.g. config (a): 2 threads, M = 4: about 200 us against 340 us
// per layer); a 3072-wide model on 16 threads: model after model.
bool StitchedModel::group_models(int64_t rows) const {
  // Read at every call (a test hook, as BTS_GEMM_BF16DOT): change it only while no call runs.
  const char* forced = std::getenv("BTS_STITCH_GROUP");
  if (forced && *forced) return forced[0] != '0';
  const int64_t P = num_threads();
  if (P <= 1 || last_eh_ == 0) return false;
  const double QD = double(c_.H * c_.Dh), KD = double(c_.Hkv * c_.Dh), D = double(c_.D), F = double(c_.F);
  const double W = double(rows) * (D * (QD + 2 * KD) + QD * D + 3 * D * F);
  const double r = 8e9, s = 3e-6;
  const double M = double(M_);
  const double grouped = std::ceil(M / double(P)) * W / r;
  const double serial = M * (W / (r * double(P)) + 12 * s);
  return grouped < serial;
}

void StitchedModel::decode_rows(StitchedCache& cache, const DecodeSegment* segs, int64_t nsegs, const int32_t* tokens,
                                int64_t R, int64_t out_row0, float* out) {
  const int64_t D = c_.D, RD = R * D;
  const DecodeCtx ctx = rows_.decode(c_, segs, nsegs, R, cache.capacity());
  float* x0 = grow_floats(x0_, RD);
  float* xs = grow_floats(xs_, n_ * RD);
  float* mixed = grow_floats(mix_, n_ * RD);
  float* G = grow_floats(G_, R * D * M_);
  const bool grouped = group_models(R);
  if (grouped && int64_t(mws_.size()) < M_) mws_.resize(size_t(M_));
  // Runs fn(m) for the models m < count: one parallel region with one model per task (grouped), or
  // model after model, each fn parallel inside.
  auto each_model = [&](int64_t count, const std::function<void(int64_t)>& fn) {
    if (grouped && count > 1)
      parallel_for(count, 1, [&](int64_t m0, int64_t m1, int) {
        for (int64_t m = m0; m < m1; m++) fn(m);
      });
    else
      for (int64_t m = 0; m < count; m++) fn(m);
  };
  auto state = [&](int64_t m) { return m == 0 ? x0 : xs + (m - 1) * RD; };
  each_model(last_eh_ > 0 ? M_ : 1, [&](int64_t m) { embed_tokens(c_, model(m).embed, tokens, R, state(m)); });
  for (int64_t j = 1; j <= L_; j++) {
    const int64_t i = j - 1;
    each_model(j <= last_eh_ ? M_ : 1, [&](int64_t m) {
      KvCache& kc = cache.model(m);
      block_decode(c_, model(m).layers[size_t(i)], ctx, kc.k(i), kc.v(i), state(m), grouped ? mws_[size_t(m)] : ws_);
    });
    const int64_t k = stitch_at_[size_t(j)];
    if (k >= 0 && active(k)) {
      stitch_inplace(k, R, x0, xs, mixed, G, grouped);
    }
  }
  const int64_t rows = R - out_row0;
  final_logits(c_, hub_.norm, hub_.lm_head, x0 + out_row0 * D, rows, grow_floats(xf_, rows * D), out);
}

void StitchedModel::prefill(StitchedCache& cache, int64_t slot, const int32_t* tokens, int64_t T, float* out) {
  const char* op = "prefill";
  ComputeLock lock;
  check_cache(op, cache);
  segs_.assign(1, prefill_segment(op, cache.model(0), slot, T));
  check_token_ids(c_, op, "tokens", tokens, T, false);
  decode_rows(cache, segs_.data(), 1, tokens, T, T - 1, out);
  cache.set_length(slot, segs_[0].start + T);
}

void StitchedModel::decode(StitchedCache& cache, const int32_t* slots, const int32_t* tokens, int64_t R, float* out) {
  const char* op = "decode";
  ComputeLock lock;
  check_cache(op, cache);
  decode_segments(op, cache.model(0), slots, R, segs_);
  check_token_ids(c_, op, "tokens", tokens, R, false);
  decode_rows(cache, segs_.data(), R, tokens, R, 0, out);
  for (int64_t r = 0; r < R; r++) cache.set_length(segs_[size_t(r)].slot, segs_[size_t(r)].start + 1);
}

// ---------------------------------------------------------------------------------------------------

void StitchedModel::release() {
  ComputeLock lock;
  ws_.release();
  for (Workspace& w : mws_) w.release();
  rows_.release();
  for (std::vector<float>* v : {&head32_, &x0_, &xs_, &mix_, &G_, &xf_, &states_, &rstdf_, &dh0_, &dhs_, &dtmp_, &dG_}) {
    v->clear();
    v->shrink_to_fit();
  }
  act_views_.clear();
  act_views_.shrink_to_fit();
}

size_t StitchedModel::workspace_bytes() const {
  size_t s = ws_.bytes() + rows_.bytes();
  for (const Workspace& w : mws_) s += w.bytes();
  for (const std::vector<float>* v : {&head32_, &x0_, &xs_, &mix_, &G_, &xf_, &states_, &rstdf_, &dh0_, &dhs_, &dtmp_, &dG_})
    s += v->size() * sizeof(float);
  return s;
}

}  // namespace engine
}  // namespace bts
