// llama.h: the native Llama engine: forward, backward and KV-cached decode of a Llama decoder built
// from the op entries of bts/ops.h (GEMMs, RMSNorm, RoPE, attention, SwiGLU, embedding, fused
// cross-entropy). No Node-API here: native/binding/engine.cc is the JS face, and the stitched model
// (METHOD.md) reuses the block functions directly, and the model-level steps at the end of this file
// (checks, RoPE table and positions, embedding, fp32 head and fused loss, prefill / decode slots).
//
// Shape legend (common.h): B batch, T tokens per sequence, N = B*T rows, D hidden, F ffn width,
// H query heads, Hkv key/value heads, Dh head dim, QD = H*Dh, KD = Hkv*Dh, V vocab, L layers,
// S cache slots, Tcap cache capacity, R decode rows. Row-major; Linear weights [out, in] (HF).
//
// Why it is shaped this way
// - Block-level free functions over explicit buffers (block_forward / block_backward / block_decode),
//   so the stitched model can run blocks of several models, insert its stitches between them and
//   choose per block whether to save activations (backward needed) or not (frozen prefix).
// - Weights are borrowed pointers (the caller, e.g. the binding, keeps them alive); each Linear
//   weight is fp32 or bf16 (`Weight`): forward (NT) and input gradient (NN) run gemm_bf16 on a bf16
//   weight, the weight gradient (TN) always gemm_f32 from fp32 activations into an fp32 gradient.
//   That is the bf16 mixed-precision mode: bf16 copies of the block matrices as weights, fp32 grads,
//   fp32 embeddings / norms / LM head. Norm weights are always fp32.
// - A bf16 embedding is gathered row by row (widened on the fly); a bf16 LM head is used directly by
//   the logits GEMMs (gemm_bf16) but the fused cross-entropy needs fp32, so loss / forwardBackward on
//   a bf16 head make ONE fp32 copy of it (V*D floats, kept until release()). The copy is not refreshed:
//   a bf16 head is treated as frozen (a gradient for it is refused at construction).
// - Gradients are ACCUMULATED (+=) into the caller's buffers, so the trainer runs several micro-
//   batches and then AdamW; the loss is returned as a sum and a count, grad_scale multiplies dLoss.
// - No allocation in the hot path: workspaces grow to the largest shape seen and are reused.
//
// Activation memory of a training step, per layer, in floats (saved by the forward for the backward):
//   N * (2*QD + 2*KD + D + 2*F + 2) + B*H*T
//   = q, k (after RoPE), v, attention output, h (residual after attention), gate, up, two rstd rows,
//   lse. The norm outputs and silu(gate)*up are recomputed in the backward (element-wise, cheap)
//   instead of being stored: that saves N*(2*D + F) per layer. Plus the residual stream, N*D per layer,
//   and one layer's worth of scratch (Workspace) shared by all layers. Layers below the lowest one
//   that needs a gradient run forward-only and save nothing.
//   Config (a) (D 256, F 688, H = Hkv = 8, Dh 32) at B 16, T 256: 43.7 MB per layer, 262 MB for the
//   6 layers; with the residual stream (29 MB), the scratch (63 MB) and the final-norm / loss buffers
//   the engine holds about 360 MB (LlamaModel::workspace_bytes()).
//
// Known limits: CPU only (native/cuda/engine/ is the CUDA engine; it reuses the config, tensor table,
// pointer structs, checks and KvSlots of this file); RoPE scaling "llama3" or none (the binding
// refuses others); attention scale 1/sqrt(Dh); no dropout; decode attention runs per slot (slots of
// different lengths). The borrowed arrays must keep their size and place (a JS ArrayBuffer must not be
// detached or shrunk while a model uses it). Batch-1 decode of a small model is bound by reading every
// fp32 weight once per token (config (a): 23 MB), so it runs at the speed the caches / DRAM deliver them.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bts/common.h"

namespace bts {
namespace engine {

// RoPE parameters (as RopeTableParams): factor <= 0 disables the Llama 3 scaling.
struct RopeConfig {
  double theta = 10000.0;
  double factor = 0.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
  double original_max_position_embeddings = 8192.0;
};

struct LlamaConfig {
  int64_t V = 0, D = 0, F = 0, L = 0, H = 0, Hkv = 0, Dh = 0;
  float eps = 1e-5f;     // RMSNorm epsilon
  RopeConfig rope;
  int64_t max_pos = 0;   // longest sequence (training T, cache capacity)
  bool tie = false;      // LM head = embedding
};

// Throws E_ARGUMENT naming the first bad field (sizes > 0, H % Hkv == 0, Dh even, eps > 0, ...).
void validate_config(const LlamaConfig& c);

// One weight matrix in HF layout [out, in]: exactly one of f32 / b16 is set.
struct Weight {
  const float* f32 = nullptr;
  const bf16* b16 = nullptr;
  bool present() const { return (f32 != nullptr) != (b16 != nullptr); }
};

struct LayerWeights {
  const float* in_norm = nullptr;    // [D] input_layernorm
  Weight wq;                         // [QD, D]
  Weight wk;                         // [KD, D]
  Weight wv;                         // [KD, D]
  Weight wo;                         // [D, QD]
  const float* post_norm = nullptr;  // [D] post_attention_layernorm
  Weight w_gate;                     // [F, D]
  Weight w_up;                       // [F, D]
  Weight w_down;                     // [D, F]
};

// Gradients of one layer, same shapes as LayerWeights, fp32, ACCUMULATED. A null pointer is a frozen
// tensor (its dW GEMM is skipped); all null = frozen layer.
struct LayerGrads {
  float* in_norm = nullptr;
  float* wq = nullptr;
  float* wk = nullptr;
  float* wv = nullptr;
  float* wo = nullptr;
  float* post_norm = nullptr;
  float* w_gate = nullptr;
  float* w_up = nullptr;
  float* w_down = nullptr;
  bool any() const { return in_norm || wq || wk || wv || wo || post_norm || w_gate || w_up || w_down; }
};

struct ModelWeights {
  Weight embed;                     // [V, D]
  std::vector<LayerWeights> layers; // [L]
  const float* norm = nullptr;      // [D] final norm
  Weight lm_head;                   // [V, D]; tied: the embed weight
};

struct ModelGrads {
  float* embed = nullptr;           // [V, D]
  std::vector<LayerGrads> layers;   // [L] (may be empty: all frozen)
  float* norm = nullptr;            // [D]
  float* lm_head = nullptr;         // [V, D]; tied: the embed gradient (the same buffer)
  bool any() const;
};

// ---------------------------------------------------------------------------------------------------
// Block level.

// Rows of a block call: B sequences of T tokens, row b*T + t at position pos[row].
struct BlockCtx {
  int64_t B = 0, T = 0;
  const float* rope = nullptr;   // [P, Dh/2, 2] (cos, sin) table
  int64_t P = 0;                 // positions in the table (every pos < P)
  const int32_t* pos = nullptr;  // [N] position of each row (t for training)
};

// What block_forward keeps for block_backward: pointers into a caller buffer of floats(c, B, T)
// floats laid out by bind(). `x` is the caller's block input, which must stay unchanged until the
// backward (block_forward with save never writes it).
struct BlockActs {
  BlockCtx ctx;
  const float* x = nullptr;  // [N, D] block input (not owned)
  float* rstd1 = nullptr;    // [N]
  float* q = nullptr;        // [N, QD] = [B, T, H, Dh] after RoPE
  float* k = nullptr;        // [N, KD] after RoPE
  float* v = nullptr;        // [N, KD]
  float* att = nullptr;      // [N, QD] attention output (o_proj input)
  float* lse = nullptr;      // [B, H, T]
  float* h = nullptr;        // [N, D] x + o_proj(att)
  float* rstd2 = nullptr;    // [N]
  float* gate = nullptr;     // [N, F]
  float* up = nullptr;       // [N, F]

  static int64_t floats(const LlamaConfig& c, int64_t B, int64_t T);
  static BlockActs bind(const LlamaConfig& c, int64_t B, int64_t T, float* base);
};

// Scratch buffers shared by the block functions (one layer's worth), grown on demand and reused.
// Not thread-safe: one workspace per concurrent caller (the engine serialises calls).
class Workspace {
 public:
  enum Slot { kA, kH, kD3, kQ, kK, kV, kAtt, kLse, kG, kU, kAct, kPos, kX, kX2, kCount };
  float* get(Slot s, int64_t n);  // at least n floats (contents unspecified)
  size_t bytes() const;
  void release();

 private:
  struct Buf {
    std::unique_ptr<float[]> p;
    int64_t n = 0;
  };
  Buf bufs_[kCount];
};

// One block: x_out = x_in + attn(norm1(x_in)); x_out += mlp(norm2(x_out)). With `save`, fills it for
// block_backward (x_out must then differ from x_in); without, x_out may equal x_in (in place).
void block_forward(const LlamaConfig& c, const LayerWeights& w, const BlockCtx& ctx, const float* x_in /*[N,D]*/,
                   float* x_out /*[N,D]*/, BlockActs* save, Workspace& ws);

// Backward of block_forward. g null: input gradient only (no dW GEMMs, no recomputation); otherwise
// its non-null members are ACCUMULATED. dx_in (overwritten) may equal dx_out; dx_in null: the input
// gradient is not needed (the lowest trained block), only g is updated.
void block_backward(const LlamaConfig& c, const LayerWeights& w, const LayerGrads* g, const BlockActs& acts,
                    const float* dx_out /*[N,D]*/, float* dx_in /*[N,D] or null*/, Workspace& ws);

// A run of `count` consecutive rows of a decode call that belong to one cache slot, at positions
// start .. start+count-1 (start = the slot's length before the call).
struct DecodeSegment {
  int64_t row0 = 0, count = 0;
  int64_t slot = 0, start = 0;
};

struct DecodeCtx {
  int64_t R = 0;                        // rows (tokens) in the call
  const int32_t* pos = nullptr;         // [R] position of each row
  const float* rope = nullptr;          // [P, Dh/2, 2]
  int64_t P = 0;
  const DecodeSegment* segs = nullptr;  // segments covering rows 0..R-1 in order, distinct slots
  int64_t nsegs = 0;
  int64_t Tcap = 0;                     // cache capacity
};

// One block over R rows against a KV cache layer, in place on x [R, D]: appends each row's RoPE'd key
// and value at its (slot, position), then attends over the slot's keys 0 ..= position.
// k_cache, v_cache: [S, Tcap, Hkv, Dh] of this layer. Positions/capacity are the caller's to check.
void block_decode(const LlamaConfig& c, const LayerWeights& w, const DecodeCtx& ctx, float* k_cache, float* v_cache,
                  float* x /*[R,D]*/, Workspace& ws);

// ---------------------------------------------------------------------------------------------------
// HF tensor names (as llamaTensorNames in lib/formats/hf-config.ts): the binding binds typed arrays
// by these and checks their lengths.
struct TensorSpec {
  std::string name;
  int64_t numel = 0;
  enum Kind { kEmbed, kInNorm, kWq, kWk, kWv, kWo, kPostNorm, kGate, kUp, kDown, kNorm, kLmHead } kind = kEmbed;
  int64_t layer = -1;
  bool is_norm() const { return kind == kInNorm || kind == kPostNorm || kind == kNorm; }
};
std::vector<TensorSpec> tensor_specs(const LlamaConfig& c);
// Sets the weight / gradient a spec names (norm specs take w.f32). `m` / `g` must have c.L layers.
void bind_weight(ModelWeights& m, const TensorSpec& s, Weight w);
void bind_grad(ModelGrads& g, const TensorSpec& s, float* p);
// The weight a spec names (the inverse of bind_weight; norm specs come back in .f32). `m` must have
// c.L layers.
Weight weight_of(const ModelWeights& m, const TensorSpec& s);

// ---------------------------------------------------------------------------------------------------
// KV cache bookkeeping, backend-neutral: the slots, the capacity and a length per slot (what the
// prefill / decode checks read), with the argument checks of createCache. The CPU cache below and the
// CUDA engine's device cache (native/cuda/engine) derive from it. Lengths are atomics so that length()
// may be read while a call runs (it then sees the value before or after the call).
class KvSlots {
 public:
  KvSlots(const LlamaConfig& c, int64_t slots, int64_t capacity);  // E_ARGUMENT
  int64_t slots() const { return S_; }
  int64_t capacity() const { return Tcap_; }
  int64_t length(int64_t slot) const;             // E_ARGUMENT for a bad slot
  void reset(int64_t slot) { truncate(slot, 0); }
  void truncate(int64_t slot, int64_t length);    // 0 <= length <= length(slot)
  void set_length(int64_t slot, int64_t length);  // engine use
  bool compatible(const LlamaConfig& c) const { return c.L == L_ && c.Hkv == Hkv_ && c.Dh == Dh_; }

 protected:
  void check_slot(int64_t slot, const char* what) const;
  int64_t L_, Hkv_, Dh_, S_, Tcap_;
  std::unique_ptr<std::atomic<int64_t>[]> len_;
};

// KV cache: per layer K and V [S, Tcap, Hkv, Dh] fp32 in host memory and a length per slot. Keys are
// stored after RoPE.
class KvCache : public KvSlots {
 public:
  KvCache(const LlamaConfig& c, int64_t slots, int64_t capacity);  // E_ARGUMENT / E_OUT_OF_MEMORY
  float* k(int64_t layer) { return k_[size_t(layer)].get(); }
  float* v(int64_t layer) { return v_[size_t(layer)].get(); }
  size_t bytes() const;

 private:
  std::vector<std::unique_ptr<float[]>> k_, v_;
};

// ---------------------------------------------------------------------------------------------------
// The RoPE table [P, Dh/2, 2] (grown to the longest P asked for) and the positions of a call's rows.
// Not thread-safe (the models use it under their compute lock).
class RowPositions {
 public:
  // B sequences of T tokens at positions 0..T-1 (training, loss, logits).
  BlockCtx sequences(const LlamaConfig& c, int64_t B, int64_t T);
  // R decode rows: segment i's rows at positions start.. (a table for positions < Tcap).
  DecodeCtx decode(const LlamaConfig& c, const DecodeSegment* segs, int64_t nsegs, int64_t R, int64_t Tcap);
  void release();
  size_t bytes() const;

 private:
  void ensure_rope(const LlamaConfig& c, int64_t P);
  std::vector<float> rope_;
  int64_t rope_P_ = 0;
  std::vector<int32_t> pos_;
};

// ---------------------------------------------------------------------------------------------------
// The whole model. Every public call takes the compute lock for its duration (calls on one model are
// serialised; its workspaces are shared) and validates its arguments before computing anything.
class LlamaModel {
 public:
  struct Loss {
    double sum = 0;     // sum of per-row losses over the counted rows (targets != -100)
    int64_t count = 0;  // rows counted
  };

  // Validates the config and every weight pointer; `grads` null (or with no member set) = frozen.
  LlamaModel(const LlamaConfig& c, const ModelWeights& w, const ModelGrads* grads);

  const LlamaConfig& config() const { return c_; }
  bool trainable() const { return trainable_; }

  // Forward and backward of the next-token loss on inputs [B, T] with targets [B, T] (-100 ignored);
  // gradients of grad_scale * sum of losses ACCUMULATED into the grads. E_ARGUMENT when frozen.
  Loss forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float grad_scale);
  // Forward only; losses [N] (may be null) receives per-row losses (0 for ignored rows).
  Loss loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float* losses);
  // Full forward without cache: out [B*T, V] logits.
  void logits(const int32_t* tokens, int64_t B, int64_t T, float* out);
  // Appends tokens [T] to `slot` (positions len .. len+T-1); out [V] = logits of the last token.
  void prefill(KvCache& cache, int64_t slot, const int32_t* tokens, int64_t T, float* out);
  // Appends one token to each of R distinct slots; out [R, V].
  void decode(KvCache& cache, const int32_t* slots, const int32_t* tokens, int64_t R, float* out);

  // Frees the workspaces (they regrow on the next call).
  void release();
  size_t workspace_bytes() const;

 private:
  // Forward of inputs through every block (in place, no saving) and the final norm: xf [N, D].
  const float* forward_nosave(const int32_t* ids, int64_t B, int64_t T, float* rstd_f);
  void decode_rows(KvCache& cache, const DecodeSegment* segs, int64_t nsegs, const int32_t* tokens, int64_t R,
                   int64_t out_row0, float* out);

  LlamaConfig c_;
  ModelWeights w_;
  ModelGrads g_;
  bool trainable_ = false;
  int64_t lowest_ = 0;  // lowest layer whose backward runs (L when none); 0 when the embedding trains

  Workspace ws_;
  RowPositions rows_;          // RoPE table and row positions
  std::vector<float> head32_;  // fp32 copy of a bf16 LM head (lazy)
  std::vector<float> stream_, acts_, xf_, rstdf_, dx_, x_;
  std::vector<BlockActs> act_views_;
  std::vector<DecodeSegment> segs_;
};

// ---------------------------------------------------------------------------------------------------
// Model-level steps shared by LlamaModel and StitchedModel (stitched.h), in llama.cc: argument checks,
// the RoPE table and row positions, the embedding gather, the fp32 LM head and its fused loss, and the
// slot checks of prefill / decode. Error messages start with `op` (the JS method name).

constexpr int64_t kMaxRows = int64_t(1) << 24;  // B*T (and decode rows) per call

// E_ARGUMENT unless B, T >= 1, T <= maxPositionEmbeddings and B*T <= kMaxRows.
void check_rows(const LlamaConfig& c, const char* op, int64_t B, int64_t T);
// E_TOKEN_RANGE naming the first of ids [n] outside [0, V) (allow_ignore: -100 passes).
void check_token_ids(const LlamaConfig& c, const char* op, const char* arg, const int32_t* ids, int64_t n, bool allow_ignore);
// check_rows, then inputs [B*T] as token ids and targets [B*T] as ids or -100.
void check_batch(const LlamaConfig& c, const char* op, const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T);
// At least n floats in v (reallocated when smaller: the contents are then lost).
float* grow_floats(std::vector<float>& v, int64_t n);

// out [n, D] = rows ids [n] of an fp32 or bf16 table [V, D] (a bf16 row widened; ids already checked).
void embed_tokens(const LlamaConfig& c, const Weight& table, const int32_t* ids, int64_t n, float* out);
// The LM head [V, D] in fp32 for the fused cross-entropy: an fp32 head itself, a bf16 one copied once
// into `copy` (kept; not refreshed).
const float* head_fp32(const LlamaConfig& c, const Weight& head, std::vector<float>& copy);
// The fused LM-head cross-entropy of xf [N, D] (after the final norm) against targets [N] (-100
// ignored): the loss sum and count; losses [N] (may be null) per row. With dx: dL/dxf (scaled by
// grad_scale) into dx [N, D], and the head gradient ACCUMULATED into dw when not null.
LlamaModel::Loss head_loss(const LlamaConfig& c, const float* xf, int64_t N, const float* head32, const int32_t* targets, float* losses,
                           float grad_scale = 1.f, float* dx = nullptr, float* dw = nullptr);
// out [rows, V] = logits of the states x [rows, D]: final norm (into scratch xf [rows, D]) and head.
void final_logits(const LlamaConfig& c, const float* norm, const Weight& head, const float* x, int64_t rows, float* xf, float* out);

// Checks a prefill of T tokens into `slot` of a cache with kv's slots, capacity and lengths; returns
// its segment (rows 0..T-1 at positions length..).
DecodeSegment prefill_segment(const char* op, const KvSlots& kv, int64_t slot, int64_t T);
// Checks a decode of R rows into slots [R] (distinct, in range, not full); segs = one row each.
void decode_segments(const char* op, const KvSlots& kv, const int32_t* slots, int64_t R, std::vector<DecodeSegment>& segs);

}  // namespace engine
}  // namespace bts
