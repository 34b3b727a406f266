// stitched.h: the native stitched model of ../shared/METHOD.md (Branch-Train-Stitch): a frozen hub and
// n frozen experts (Llama decoders of one architecture) joined by K trainable stitch layers; training
// step (stitch gradients only), loss, logits, KV-cached prefill / decode and gate recording. Built on
// the Llama engine's block functions (llama.h) and the fused stitch ops (bts/ops.h). No Node-API here:
// native/binding/stitched.cc is the JS face.
//
// Legend (llama.h): B batch, T tokens per sequence, N = B*T rows, D hidden, V vocab, L blocks,
// n experts, M = n + 1 models (model 0 the hub, model e+1 expert e), K stitches, R decode rows.
//
// Format (docs/FORMAT.md, fixed by the lead): stitch k (0-based, placement order) sits after block j_k
// (1-based) of every model and holds n projections `stitch.{k}.proj.{e}.weight` [D, D] and a gate
// `stitch.{k}.gate.weight` [D*M, D] (row d*M + m = model m's logit at dim d). Per token:
//   G = h0 Wg^T  [D*M] read as [D, M]      (+ hubBias on slot m = 0 of E->H gates,
//                                             - hubBias on slots m >= 1 of H->E gates)
//   E->H: g = softmax_m(G[d, :]); p_e = h_e Wp_e^T; h0' = g_0 h0 + sum_e g_{e+1} p_e;
//         h_e' = p_e ("projected", default) or h_e ("unchanged")
//   H->E: g_e = sigmoid(G[d, e+1]); q_e = h0 Wp_e^T; h_e' = (1 - g_e) h_e + g_e q_e; h0' = h0
// The hub's state after block L (and after a stitch placed there) goes to the hub's final norm and LM
// head; the experts' final norms and heads are never used.
//
// Gate dropout (training only, forward_backward): each entry of the LEARNED logits h0 Wg^T is zeroed
// with probability p before the hub bias is added and before the softmax / sigmoid; the kept entries
// are NOT rescaled (inverted-dropout scaling makes no sense for logits). So G_train = mask * (h0 Wg^T)
// + bias, and dG flows back through the mask. The mask is a pure function of (seed, stitch k, row,
// column): entry i = row*D*M + col is dropped when splitmix64(seed, k, i) / 2^64 < p. It is the same
// for any thread count, and forward_backward with the same seed and inputs is bit-reproducible.
//
// Cost rules of METHOD.md ("What training needs") and how they are met:
// - Blocks of all M models up to the first TRAINED stitch (the lowest one with a gradient buffer) run
//   forward-only, in place, saving nothing; blocks after it save activations and run block_backward
//   with g = null (input gradient only, never a dW GEMM). The hub's final norm and LM head are frozen:
//   the fused cross-entropy computes dx only.
// - An expert's stream reaches the hub's loss only through an E->H stitch, so expert blocks after the
//   last E->H stitch are never run (training, loss, logits, decode: they cannot change the hub's
//   output), H->E stitches after it are skipped (their gradients stay zero), and expert blocks run a
//   backward only below an E->H stitch.
// - The first trained stitch computes weight gradients but no input gradients.
// - Stitch weight gradients are ACCUMULATED (+=), grad_scale multiplies dLoss (as the engine).
//
// Memory of a training step (floats): the engine's saved block activations (BlockActs::floats per
// block) for the hub blocks after the first trained stitch and the expert blocks between it and the
// last E->H stitch; the residual states, M*N*D per position from the first trained stitch to L (the
// experts' only up to the last E->H stitch); per stitch from the first trained one on, its gate
// logits N*D*M, its projections n*N*D and its output (N*D for E->H, n*N*D for H->E); the backward's
// gradients of the streams and of one stitch's logits (about (2n+1)*N*D + N*D*M); one layer's engine
// Workspace. Config (a) (D 256, L 6, F 688, H 8), hub + 3 experts, K = 2 (after blocks 3 and 6),
// B 16, T 256: 772 MiB in all (workspace_bytes()).
//
// Grouping of the n+1 models (METHOD.md "What inference needs"): decode and prefill run block j of
// the M models as ONE parallel region, one model per task (its ops then run serially inside the
// task, each model with its own Workspace), and a stitch's gate and projection GEMMs likewise, when a
// cost model says the per-op hand-offs cost more than the lost parallelism inside a model
// (group_models: small models, few rows; e.g. always for config (a) on 2 threads). Otherwise, and
// always in training, loss, logits and gates, models run one after the other with parallel ops.
// The two paths give the same values (the ops split rows and columns across threads, not sums; bit-
// identical on the test machine). BTS_STITCH_GROUP=0 / 1 forces either (read at every call: a test
// and benchmark hook).
//
// Known limits: CPU only (the CUDA engine's stitched model, native/cuda/engine/stitched_cuda.h, shares
// the backend-neutral pieces below); the models must share one LlamaConfig (the binding checks every weight's
// length against it); frozen models only (no gradient for hub or expert weights); gate dropout only in
// forward_backward (loss / logits / decode / gates are inference: no dropout); a StitchedCache holds
// all L layers for every expert, also those after the last E->H stitch that never run.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"

namespace bts {
namespace engine {

enum class StitchType { EH, HE };  // experts-into-hub (softmax gate) | hub-into-experts (sigmoid gate)

struct StitchPoint {
  int64_t after_block = 0;  // 1-based: the stitch reads the states after this block (1..L)
  StitchType type = StitchType::EH;
};

struct StitchSpec {
  std::vector<StitchPoint> stitches;  // K >= 1, after_block strictly increasing
  bool projected = true;              // expert stream after E->H: p_e (true, "projected") or h_e ("unchanged")
  float hub_bias = 0.f;               // fixed logit offset favouring the hub (see the header)
  float gate_dropout = 0.f;           // probability in [0, 1), training only
};

// Stitch parameters (fp32, borrowed): per stitch k, proj[k][e] [D, D] and gate[k] [D*M, D].
struct StitchWeights {
  std::vector<std::vector<const float*>> proj;  // [K][n]
  std::vector<const float*> gate;               // [K]
};

// Gradients of the same shapes, ACCUMULATED; a null pointer is a frozen tensor (no dW GEMM).
struct StitchGrads {
  std::vector<std::vector<float*>> proj;  // [K][n] (may be empty: all frozen)
  std::vector<float*> gate;               // [K] (may be empty)
};

// ---------------------------------------------------------------------------------------------------
// Backend-neutral pieces, shared with the CUDA stitched engine (native/cuda/engine/stitched_cuda.h):
// the spec's validation and placement facts, the stitch tensor table, the gate-dropout hash and the
// gate record. One definition, so both engines accept the same input, word errors the same way and
// drop the same gate logits.

// The placement of a validated spec over L blocks.
struct StitchPlan {
  int64_t n = 0, M = 0, K = 0, L = 0;  // experts, models (n + 1), stitches, blocks
  std::vector<int64_t> stitch_at;      // [L+1]: stitch index after block j, or -1
  int64_t last_eh = 0;                 // block of the last E->H stitch (0: none); expert blocks after it never run
  // Whether stitch k changes anything the hub's output depends on: every E->H stitch, and an H->E
  // stitch below the last E->H one.
  bool active(const StitchSpec& spec, int64_t k) const {
    const StitchPoint& s = spec.stitches[size_t(k)];
    return s.type == StitchType::EH || s.after_block < last_eh;
  }
  // The lowest ACTIVE stitch with some trained tensor (trained[k]); K when none.
  int64_t first_trained(const StitchSpec& spec, const std::vector<bool>& trained) const;
};
// Validates n (1..4096, D*(n+1) bounded) and the spec (K in 1..L, after_block in 1..L strictly
// increasing, type, hub_bias finite, gate_dropout in [0, 1)); E_ARGUMENT prefixed "stitched: ".
StitchPlan plan_stitches(const LlamaConfig& c, int64_t n, const StitchSpec& spec);

// One stitch tensor of the format (docs/FORMAT.md): `stitch.{k}.proj.{e}.weight` [D, D] (e >= 0) or
// `stitch.{k}.gate.weight` [D*M, D] (e = -1). stitch_tensors lists them stitch by stitch, the
// projections of a stitch before its gate.
struct StitchTensor {
  std::string name;
  int64_t k = 0, e = -1;
  int64_t numel = 0;
};
std::vector<StitchTensor> stitch_tensors(int64_t D, int64_t n, int64_t K);

// The gate-dropout hash (splitmix64 finaliser) and mask: entry i (= row * D*M + col) of stitch k's
// learned logits is dropped when stitch_mix64(stitch_dropout_key(seed, k) + i) < threshold. constexpr
// so that device code (nvcc --expt-relaxed-constexpr, and the emulator) calls the same definition.
constexpr uint64_t stitch_mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
constexpr uint64_t stitch_dropout_key(uint64_t seed, int64_t k) {
  return stitch_mix64(seed ^ stitch_mix64(0x632be59bd9b4e019ull * uint64_t(k + 1)));
}
// p * 2^64 (0 when p <= 0: no dropout); p < 1.
uint64_t stitch_dropout_threshold(float p);

// out [rows, M] (row stride ld): the mean over the D dims of stitch gates from logits G [rows, D*M]
// (E->H: softmax weights; H->E: sigmoids of slots m >= 1, 0 at m = 0). Host arrays, in double.
void gate_means(const float* G, int64_t rows, int64_t D, int64_t M, bool eh, float* out, int64_t ld);

// The KV caches of a stitched model, for either engine's per-model cache Kv (a KvSlots: the CPU
// engine's KvCache here, the CUDA engine's DeviceKvCache in native/cuda/engine/stitched_cuda.h): one
// per model (hub first), all of the same slots and capacity, advanced together (the hub's lengths are
// the truth: its checks validate slot and length, the experts' lengths follow).
void check_cache_models(int64_t models);  // E_ARGUMENT unless 2 <= models <= 4097 (the experts' bound + 1)
template <class Kv>
class ModelCaches {
 public:
  ModelCaches(const LlamaConfig& c, int64_t models, int64_t slots, int64_t capacity) {
    check_cache_models(models);
    for (int64_t m = 0; m < models; m++) caches_.emplace_back(new Kv(c, slots, capacity));
  }
  int64_t slots() const { return caches_[0]->slots(); }
  int64_t capacity() const { return caches_[0]->capacity(); }
  int64_t models() const { return int64_t(caches_.size()); }
  int64_t length(int64_t slot) const { return caches_[0]->length(slot); }
  void reset(int64_t slot) { truncate(slot, 0); }
  void truncate(int64_t slot, int64_t length) {
    caches_[0]->truncate(slot, length);  // validates slot and length
    for (size_t m = 1; m < caches_.size(); m++) caches_[m]->set_length(slot, length);
  }
  void set_length(int64_t slot, int64_t length) {  // engine use: after a call wrote every model's rows
    for (auto& c : caches_) c->set_length(slot, length);
  }
  Kv& model(int64_t m) { return *caches_[size_t(m)]; }
  size_t bytes() const {
    size_t s = 0;
    for (const auto& c : caches_) s += c->bytes();
    return s;
  }

 private:
  std::vector<std::unique_ptr<Kv>> caches_;
};
using StitchedCache = ModelCaches<KvCache>;

class StitchedModel {
 public:
  using Loss = LlamaModel::Loss;

  // Validates the config, every model weight (as LlamaModel does), the spec (K >= 1, after_block in
  // 1..L strictly increasing, hub_bias finite, gate_dropout in [0, 1)) and every stitch pointer.
  // `grads` null (or all members null): frozen stitches (forward_backward refuses).
  StitchedModel(const LlamaConfig& c, const ModelWeights& hub, const std::vector<ModelWeights>& experts,
                const StitchSpec& spec, const StitchWeights& w, const StitchGrads* grads);

  const LlamaConfig& config() const { return c_; }
  int64_t experts() const { return n_; }
  int64_t stitches() const { return K_; }
  bool trainable() const { return trainable_any_; }

  // Training step on inputs [B, T], targets [B, T] (-100 ignored): next-token cross-entropy on the
  // hub's output; stitch gradients of grad_scale * sum of losses ACCUMULATED into the grads. Gate
  // dropout (if any) seeded by dropout_seed. E_ARGUMENT when frozen.
  Loss forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float grad_scale,
                        uint64_t dropout_seed);
  // Forward only; losses [N] (may be null) gets the per-row losses (0 for ignored rows).
  Loss loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float* losses);
  // out [B*T, V]: the hub's logits.
  void logits(const int32_t* tokens, int64_t B, int64_t T, float* out);
  // Appends tokens [T] to `slot` of every model's cache; out [V] = the hub's logits of the last token.
  void prefill(StitchedCache& cache, int64_t slot, const int32_t* tokens, int64_t T, float* out);
  // Appends one token to each of R distinct slots; out [R, V].
  void decode(StitchedCache& cache, const int32_t* slots, const int32_t* tokens, int64_t R, float* out);
  // Gate record of one sequence tokens [T] (positions 0..T-1, no cache): out [K, T, M], per stitch,
  // token and model the mean over the D dims of the gate: E->H the softmax weight g_m (sums to 1
  // over m); H->E the sigmoid g_m for experts m >= 1 and 0 for the hub slot m = 0 (the hub state
  // passes through an H->E stitch unchanged, it has no gate).
  void gates(const int32_t* tokens, int64_t T, float* out);

  void release();  // frees the workspaces (they regrow on the next call)
  size_t workspace_bytes() const;

 private:
  // Whether stitch k changes anything the hub's output depends on: every E->H stitch, and an H->E
  // stitch below the last E->H one (an H->E stitch after it only feeds expert blocks that never run).
  bool active(int64_t k) const;
  void check_cache(const char* op, StitchedCache& cache) const;
  // The hub's LM head in fp32 (a bf16 head copied once) for the fused cross-entropy.
  const float* head_f32() { return head_fp32(c_, hub_.lm_head, head32_); }
  // The hub's final norm and loss of its final state h [N, D] (frozen head; no gradient).
  Loss hub_loss(const float* h, int64_t N, const int32_t* targets, float* losses);
  const ModelWeights& model(int64_t m) const { return m == 0 ? hub_ : experts_[size_t(m - 1)]; }
  // Stitch k's gate logits G [rows, D*M] from the hub state h0 [rows, D], hub bias added; with a
  // dropout seed (train) the learned part is masked first.
  void gate_logits(int64_t k, const float* h0, int64_t rows, float* G, bool dropout, uint64_t seed);
  // Forward of stitch k in place over `rows` rows: hub state x0 [rows, D], expert states xs [n, rows,
  // D]; `mixed` [n, rows, D] scratch (p or q), G [rows, D*M]. E->H "projected" swaps xs and mixed.
  // grouped: the gate and projection GEMMs run as one parallel region (one task per GEMM, each serial).
  void stitch_inplace(int64_t k, int64_t rows, float* x0, float*& xs, float*& mixed, float* G, bool grouped);
  // Whether a decode / prefill of `rows` rows runs each block of the M models as one parallel region
  // (one model per task, its ops serial) rather than model after model with parallel ops. A cost
  // model; BTS_STITCH_GROUP=0 / 1 forces it (benchmarks, tests).
  bool group_models(int64_t rows) const;
  // Inference forward of ids [B, T] (positions 0..T-1) through every block and stitch; returns the
  // hub's final state [N, D] (before the final norm). gates_out: see gates().
  float* forward_infer(const int32_t* ids, int64_t B, int64_t T, float* gates_out);
  void decode_rows(StitchedCache& cache, const DecodeSegment* segs, int64_t nsegs, const int32_t* tokens, int64_t R,
                   int64_t out_row0, float* out);

  LlamaConfig c_;
  ModelWeights hub_;
  std::vector<ModelWeights> experts_;
  StitchSpec spec_;
  StitchWeights w_;
  StitchGrads g_;
  int64_t n_ = 0, M_ = 0, K_ = 0, L_ = 0;
  std::vector<int64_t> stitch_at_;  // [L+1]: stitch index after block j, or -1
  int64_t last_eh_ = 0;             // block of the last E->H stitch (0: none); expert blocks after it never run
  int64_t first_trained_ = 0;       // lowest ACTIVE stitch index with a gradient (K: none)
  bool trainable_any_ = false;      // some stitch tensor has a gradient buffer

  Workspace ws_;
  std::vector<Workspace> mws_;  // [M] one per model, for grouped decode (blocks of several models at once)
  RowPositions rows_;  // RoPE table and row positions (llama.h)
  std::vector<float> head32_;
  // inference / decode scratch
  std::vector<float> x0_, xs_, mix_, G_, xf_;
  // training arena
  std::vector<float> states_, rstdf_, dh0_, dhs_, dtmp_, dG_;  // states_: the arena of forward_backward
  std::vector<BlockActs> act_views_;
  std::vector<DecodeSegment> segs_;
};

}  // namespace engine
}  // namespace bts
