// llama.cc: the model level of the engine (llama.h): config and argument validation, the HF tensor
// table, the KV cache, and the whole-model calls (training step, loss, logits, prefill, decode) that
// chain embedding -> L blocks (block.cc) -> final RMSNorm -> fused LM-head cross-entropy or logits.
//
// Training step (forward_backward), N = B*T rows:
//   x_0 = embed(inputs)                          stream [(L+1), N, D]
//   x_{i+1} = block_i(x_i)                       saving activations for layers >= lowest_
//   xf = norm(x_L)                               [N, D], rstd [N]
//   loss, dxf = cross_entropy(xf, head, targets) fused over the vocabulary (no [N, V] matrix)
//   dx = norm_backward(dxf); blocks backward from L-1 down to lowest_ (in place on dx [N, D])
//   dembed += scatter(dx)                        when the embedding trains
// lowest_ is the lowest layer with a gradient (0 when the embedding trains): blocks below it run
// forward-only and the backward stops there (METHOD.md: frozen prefix, no saved activations).
// Decode / prefill: rows against the KV cache through block_decode; only the rows whose logits are
// wanted go through the final norm and the LM head (prefill: the last token).
#include <cmath>
#include <cstring>
#include <new>
#include <string>

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "linear.h"
#include "llama.h"

namespace bts {
namespace engine {

using namespace detail;

namespace {

constexpr int64_t kMaxDim = int64_t(1) << 31;    // any single dimension

std::string S(int64_t x) { return std::to_string(x); }

[[noreturn]] void fail(const char* code, const std::string& msg) { throw Error(code, msg); }

void check_dim(const char* name, int64_t v) {
  if (v <= 0 || v > kMaxDim) fail("E_ARGUMENT", std::string("llama config: ") + name + " must be in 1.." + S(kMaxDim) + ", got " + S(v));
}

}  // namespace

void validate_config(const LlamaConfig& c) {
  check_dim("vocabSize (V)", c.V);
  check_dim("hiddenSize (D)", c.D);
  check_dim("intermediateSize (F)", c.F);
  check_dim("numHiddenLayers (L)", c.L);
  check_dim("numAttentionHeads (H)", c.H);
  check_dim("numKeyValueHeads (Hkv)", c.Hkv);
  check_dim("headDim (Dh)", c.Dh);
  check_dim("maxPositionEmbeddings", c.max_pos);
  if (c.L > 100000) fail("E_ARGUMENT", "llama config: numHiddenLayers must be <= 100000, got " + S(c.L));
  if (c.H % c.Hkv != 0)
    fail("E_ARGUMENT", "llama config: numAttentionHeads (" + S(c.H) + ") must be a multiple of numKeyValueHeads (" + S(c.Hkv) + ")");
  if (c.Dh % 2 != 0) fail("E_ARGUMENT", "llama config: headDim must be even (RoPE pairs), got " + S(c.Dh));
  if (c.H * c.Dh > kMaxDim) fail("E_ARGUMENT", "llama config: numAttentionHeads * headDim is too large");
  if (c.V > int64_t(INT32_MAX)) fail("E_ARGUMENT", "llama config: vocabSize must be < 2^31 (token ids are int32)");
  if (!(c.eps > 0) || !std::isfinite(c.eps)) fail("E_ARGUMENT", "llama config: rmsNormEps must be a positive finite number, got " + std::to_string(c.eps));
  const RopeConfig& r = c.rope;
  if (!(r.theta > 0) || !std::isfinite(r.theta)) fail("E_ARGUMENT", "llama config: ropeTheta must be a positive finite number, got " + std::to_string(r.theta));
  if (r.factor > 0) {
    if (!std::isfinite(r.factor)) fail("E_ARGUMENT", "llama config: ropeScaling.factor must be finite");
    if (!(r.low_freq_factor > 0) || !std::isfinite(r.low_freq_factor))
      fail("E_ARGUMENT", "llama config: ropeScaling.lowFreqFactor must be > 0, got " + std::to_string(r.low_freq_factor));
    if (!(r.high_freq_factor > r.low_freq_factor) || !std::isfinite(r.high_freq_factor))
      fail("E_ARGUMENT", "llama config: ropeScaling.highFreqFactor must exceed lowFreqFactor, got " + std::to_string(r.high_freq_factor));
    if (!(r.original_max_position_embeddings > 0) || !std::isfinite(r.original_max_position_embeddings))
      fail("E_ARGUMENT", "llama config: ropeScaling.originalMaxPositionEmbeddings must be > 0");
  }
}

bool ModelGrads::any() const {
  if (embed || norm || lm_head) return true;
  for (const LayerGrads& l : layers)
    if (l.any()) return true;
  return false;
}

// ---------------------------------------------------------------------------------------------------
// HF tensor table.

std::vector<TensorSpec> tensor_specs(const LlamaConfig& c) {
  const int64_t V = c.V, D = c.D, F = c.F, QD = c.H * c.Dh, KD = c.Hkv * c.Dh;
  std::vector<TensorSpec> out;
  out.push_back({"model.embed_tokens.weight", V * D, TensorSpec::kEmbed, -1});
  for (int64_t i = 0; i < c.L; i++) {
    const std::string p = "model.layers." + S(i) + ".";
    out.push_back({p + "input_layernorm.weight", D, TensorSpec::kInNorm, i});
    out.push_back({p + "self_attn.q_proj.weight", QD * D, TensorSpec::kWq, i});
    out.push_back({p + "self_attn.k_proj.weight", KD * D, TensorSpec::kWk, i});
    out.push_back({p + "self_attn.v_proj.weight", KD * D, TensorSpec::kWv, i});
    out.push_back({p + "self_attn.o_proj.weight", D * QD, TensorSpec::kWo, i});
    out.push_back({p + "post_attention_layernorm.weight", D, TensorSpec::kPostNorm, i});
    out.push_back({p + "mlp.gate_proj.weight", F * D, TensorSpec::kGate, i});
    out.push_back({p + "mlp.up_proj.weight", F * D, TensorSpec::kUp, i});
    out.push_back({p + "mlp.down_proj.weight", D * F, TensorSpec::kDown, i});
  }
  out.push_back({"model.norm.weight", D, TensorSpec::kNorm, -1});
  if (!c.tie) out.push_back({"lm_head.weight", V * D, TensorSpec::kLmHead, -1});
  return out;
}

void bind_weight(ModelWeights& m, const TensorSpec& s, Weight w) {
  LayerWeights* l = s.layer >= 0 ? &m.layers.at(size_t(s.layer)) : nullptr;
  switch (s.kind) {
    case TensorSpec::kEmbed: m.embed = w; break;
    case TensorSpec::kInNorm: l->in_norm = w.f32; break;
    case TensorSpec::kWq: l->wq = w; break;
    case TensorSpec::kWk: l->wk = w; break;
    case TensorSpec::kWv: l->wv = w; break;
    case TensorSpec::kWo: l->wo = w; break;
    case TensorSpec::kPostNorm: l->post_norm = w.f32; break;
    case TensorSpec::kGate: l->w_gate = w; break;
    case TensorSpec::kUp: l->w_up = w; break;
    case TensorSpec::kDown: l->w_down = w; break;
    case TensorSpec::kNorm: m.norm = w.f32; break;
    case TensorSpec::kLmHead: m.lm_head = w; break;
  }
}

Weight weight_of(const ModelWeights& m, const TensorSpec& s) {
  const LayerWeights* l = s.layer >= 0 ? &m.layers.at(size_t(s.layer)) : nullptr;
  Weight w;
  switch (s.kind) {
    case TensorSpec::kEmbed: w = m.embed; break;
    case TensorSpec::kInNorm: w.f32 = l->in_norm; break;
    case TensorSpec::kWq: w = l->wq; break;
    case TensorSpec::kWk: w = l->wk; break;
    case TensorSpec::kWv: w = l->wv; break;
    case TensorSpec::kWo: w = l->wo; break;
    case TensorSpec::kPostNorm: w.f32 = l->post_norm; break;
    case TensorSpec::kGate: w = l->w_gate; break;
    case TensorSpec::kUp: w = l->w_up; break;
    case TensorSpec::kDown: w = l->w_down; break;
    case TensorSpec::kNorm: w.f32 = m.norm; break;
    case TensorSpec::kLmHead: w = m.lm_head; break;
  }
  return w;
}

void bind_grad(ModelGrads& g, const TensorSpec& s, float* p) {
  LayerGrads* l = s.layer >= 0 ? &g.layers.at(size_t(s.layer)) : nullptr;
  switch (s.kind) {
    case TensorSpec::kEmbed: g.embed = p; break;
    case TensorSpec::kInNorm: l->in_norm = p; break;
    case TensorSpec::kWq: l->wq = p; break;
    case TensorSpec::kWk: l->wk = p; break;
    case TensorSpec::kWv: l->wv = p; break;
    case TensorSpec::kWo: l->wo = p; break;
    case TensorSpec::kPostNorm: l->post_norm = p; break;
    case TensorSpec::kGate: l->w_gate = p; break;
    case TensorSpec::kUp: l->w_up = p; break;
    case TensorSpec::kDown: l->w_down = p; break;
    case TensorSpec::kNorm: g.norm = p; break;
    case TensorSpec::kLmHead: g.lm_head = p; break;
  }
}

// ---------------------------------------------------------------------------------------------------
// KV cache.

KvSlots::KvSlots(const LlamaConfig& c, int64_t slots, int64_t capacity)
    : L_(c.L), Hkv_(c.Hkv), Dh_(c.Dh), S_(slots), Tcap_(capacity) {
  if (slots < 1 || slots > (int64_t(1) << 20)) fail("E_ARGUMENT", "createCache: slots must be in 1..2^20, got " + S(slots));
  if (capacity < 1 || capacity > c.max_pos)
    fail("E_ARGUMENT", "createCache: capacity must be in 1..maxPositionEmbeddings (" + S(c.max_pos) + "), got " + S(capacity));
  const int64_t KD = c.Hkv * c.Dh;
  const double total = double(slots) * double(capacity) * double(KD);
  if (total > double(int64_t(1) << 40)) fail("E_ARGUMENT", "createCache: slots * capacity * kvHeads * headDim is too large");
  len_.reset(new std::atomic<int64_t>[size_t(slots)]);
  for (int64_t s = 0; s < slots; s++) len_[size_t(s)].store(0);
}

KvCache::KvCache(const LlamaConfig& c, int64_t slots, int64_t capacity) : KvSlots(c, slots, capacity) {
  const int64_t per = slots * capacity * c.Hkv * c.Dh;
  try {
    for (int64_t i = 0; i < c.L; i++) {
      k_.emplace_back(new float[size_t(per)]);
      v_.emplace_back(new float[size_t(per)]);
    }
  } catch (const std::bad_alloc&) {
    fail("E_OUT_OF_MEMORY", "createCache: cannot allocate " + S(2 * c.L * per * int64_t(sizeof(float)) >> 20) + " MiB for " +
                                S(slots) + " slots of capacity " + S(capacity));
  }
}

void KvSlots::check_slot(int64_t slot, const char* what) const {
  if (slot < 0 || slot >= S_) fail("E_ARGUMENT", std::string(what) + ": slot " + S(slot) + " is out of range [0, " + S(S_) + ")");
}

int64_t KvSlots::length(int64_t slot) const {
  check_slot(slot, "cache.length");
  return len_[size_t(slot)].load(std::memory_order_relaxed);
}

void KvSlots::truncate(int64_t slot, int64_t length) {
  check_slot(slot, "cache.truncate");
  const int64_t cur = len_[size_t(slot)].load(std::memory_order_relaxed);
  if (length < 0 || length > cur)
    fail("E_ARGUMENT", "cache.truncate: length must be in [0, " + S(cur) + "] (slot " + S(slot) + " holds " + S(cur) + " tokens), got " + S(length));
  len_[size_t(slot)].store(length, std::memory_order_relaxed);
}

void KvSlots::set_length(int64_t slot, int64_t length) { len_[size_t(slot)].store(length, std::memory_order_relaxed); }

size_t KvCache::bytes() const { return size_t(2 * L_) * size_t(S_ * Tcap_ * Hkv_ * Dh_) * sizeof(float); }

// ---------------------------------------------------------------------------------------------------
// Model.

LlamaModel::LlamaModel(const LlamaConfig& c, const ModelWeights& w, const ModelGrads* grads) : c_(c), w_(w) {
  validate_config(c);
  if (int64_t(w_.layers.size()) != c.L)
    fail("E_ARGUMENT", "llama: weights for " + S(int64_t(w_.layers.size())) + " layers, config has " + S(c.L));
  if (c.tie) w_.lm_head = w_.embed;
  auto need = [](const Weight& x, const std::string& name) {
    if (!x.present()) fail("E_ARGUMENT", "llama: weight " + name + " is missing (or given in both fp32 and bf16)");
  };
  auto need_norm = [](const float* x, const std::string& name) {
    if (!x) fail("E_ARGUMENT", "llama: weight " + name + " is missing (norm weights are fp32)");
  };
  need(w_.embed, "model.embed_tokens.weight");
  need_norm(w_.norm, "model.norm.weight");
  need(w_.lm_head, "lm_head.weight");
  for (int64_t i = 0; i < c.L; i++) {
    const LayerWeights& l = w_.layers[size_t(i)];
    const std::string p = "model.layers." + S(i) + ".";
    need_norm(l.in_norm, p + "input_layernorm.weight");
    need(l.wq, p + "self_attn.q_proj.weight");
    need(l.wk, p + "self_attn.k_proj.weight");
    need(l.wv, p + "self_attn.v_proj.weight");
    need(l.wo, p + "self_attn.o_proj.weight");
    need_norm(l.post_norm, p + "post_attention_layernorm.weight");
    need(l.w_gate, p + "mlp.gate_proj.weight");
    need(l.w_up, p + "mlp.up_proj.weight");
    need(l.w_down, p + "mlp.down_proj.weight");
  }
  if (grads) g_ = *grads;
  if (g_.layers.empty()) g_.layers.resize(size_t(c.L));
  if (int64_t(g_.layers.size()) != c.L)
    fail("E_ARGUMENT", "llama: gradients for " + S(int64_t(g_.layers.size())) + " layers, config has " + S(c.L));
  if (c.tie) {
    if (g_.lm_head && g_.lm_head != g_.embed)
      fail("E_ARGUMENT", "llama: tied embeddings take one gradient (model.embed_tokens.weight), not a separate lm_head gradient");
    g_.lm_head = g_.embed;
  }
  // The fused cross-entropy needs an fp32 head; a bf16 head is only ever copied once, so it cannot train.
  if (g_.lm_head && !w_.lm_head.f32)
    fail("E_DTYPE", std::string("llama: ") + (c.tie ? "model.embed_tokens.weight (tied LM head)" : "lm_head.weight") +
                        " has a gradient but bf16 weights; a trained LM head must be fp32");
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

// ---------------------------------------------------------------------------------------------------
// Model-level steps shared with the stitched model (llama.h).

void check_rows(const LlamaConfig& c, const char* op, int64_t B, int64_t T) {
  if (B < 1 || T < 1) fail("E_ARGUMENT", std::string(op) + ": B and T must be >= 1, got B = " + S(B) + ", T = " + S(T));
  if (T > c.max_pos)
    fail("E_ARGUMENT", std::string(op) + ": T = " + S(T) + " exceeds maxPositionEmbeddings = " + S(c.max_pos));
  if (B > kMaxRows || B * T > kMaxRows)
    fail("E_ARGUMENT", std::string(op) + ": B*T = " + S(B * T) + " exceeds the limit of " + S(kMaxRows) + " rows per call");
}

void check_token_ids(const LlamaConfig& c, const char* op, const char* arg, const int32_t* ids, int64_t n, bool allow_ignore) {
  for (int64_t i = 0; i < n; i++) {
    const int32_t t = ids[i];
    if ((t < 0 || int64_t(t) >= c.V) && !(allow_ignore && t == -100))
      fail("E_TOKEN_RANGE", std::string(op) + ": '" + arg + "' at position " + S(i) + " is " + S(t) + ", outside [0, V) with V = " +
                                S(c.V) + (allow_ignore ? " (and not the ignore index -100)" : ""));
  }
}

void check_batch(const LlamaConfig& c, const char* op, const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T) {
  check_rows(c, op, B, T);
  check_token_ids(c, op, "inputs", inputs, B * T, false);
  check_token_ids(c, op, "targets", targets, B * T, true);
}

float* grow_floats(std::vector<float>& v, int64_t n) {
  if (int64_t(v.size()) < n) {
    v.clear();
    v.shrink_to_fit();
    v.resize(size_t(n));
  }
  return v.data();
}

void RowPositions::ensure_rope(const LlamaConfig& c, int64_t P) {
  if (P <= rope_P_) return;
  rope_.assign(size_t(P * c.Dh), 0.f);
  RopeTableParams p;
  p.P = P, p.Dh = c.Dh, p.theta = c.rope.theta;
  p.factor = c.rope.factor, p.low_freq_factor = c.rope.low_freq_factor, p.high_freq_factor = c.rope.high_freq_factor;
  p.original_max_position_embeddings = c.rope.original_max_position_embeddings;
  p.table = rope_.data();
  rope_table(p);
  rope_P_ = P;
}

BlockCtx RowPositions::sequences(const LlamaConfig& c, int64_t B, int64_t T) {
  ensure_rope(c, T);
  pos_.resize(std::max(pos_.size(), size_t(B * T)));
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < T; t++) pos_[size_t(b * T + t)] = int32_t(t);
  BlockCtx ctx;
  ctx.B = B, ctx.T = T, ctx.rope = rope_.data(), ctx.P = rope_P_, ctx.pos = pos_.data();
  return ctx;
}

DecodeCtx RowPositions::decode(const LlamaConfig& c, const DecodeSegment* segs, int64_t nsegs, int64_t R, int64_t Tcap) {
  ensure_rope(c, Tcap);
  pos_.resize(std::max(pos_.size(), size_t(R)));
  for (int64_t i = 0; i < nsegs; i++)
    for (int64_t r = 0; r < segs[i].count; r++) pos_[size_t(segs[i].row0 + r)] = int32_t(segs[i].start + r);
  DecodeCtx ctx;
  ctx.R = R, ctx.pos = pos_.data(), ctx.rope = rope_.data(), ctx.P = rope_P_;
  ctx.segs = segs, ctx.nsegs = nsegs, ctx.Tcap = Tcap;
  return ctx;
}

void RowPositions::release() {
  rope_.clear();
  rope_.shrink_to_fit();
  rope_P_ = 0;
  pos_.clear();
  pos_.shrink_to_fit();
}

size_t RowPositions::bytes() const { return rope_.size() * sizeof(float) + pos_.size() * sizeof(int32_t); }

void embed_tokens(const LlamaConfig& c, const Weight& table, const int32_t* ids, int64_t n, float* out) {
  const int64_t D = c.D;
  if (table.f32) {
    EmbeddingParams p;
    p.N = n, p.V = c.V, p.D = D, p.ids = ids, p.table = table.f32, p.out = out;
    embedding_forward(p);
    return;
  }
  const bf16* t = table.b16;  // bf16 table: gather and widen (ids already checked)
  parallel_for(n, std::max<int64_t>(1, 8192 / D), [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; r++) {
      const bf16* src = t + int64_t(ids[r]) * D;
      float* dst = out + r * D;
      for (int64_t d = 0; d < D; d++) dst[d] = bf16_to_f32(src[d]);
    }
  });
}

const float* head_fp32(const LlamaConfig& c, const Weight& head, std::vector<float>& copy) {
  if (head.f32) return head.f32;
  const int64_t n = c.V * c.D;
  if (int64_t(copy.size()) != n) {
    copy.resize(size_t(n));
    const bf16* src = head.b16;
    float* dst = copy.data();
    parallel_for(n, 1 << 16, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; i++) dst[i] = bf16_to_f32(src[i]);
    });
  }
  return copy.data();
}

LlamaModel::Loss head_loss(const LlamaConfig& c, const float* xf, int64_t N, const float* head32, const int32_t* targets, float* losses,
                           float grad_scale, float* dx, float* dw) {
  LlamaModel::Loss out;
  CrossEntropyParams ce;
  ce.N = N, ce.D = c.D, ce.V = c.V, ce.ignore_index = -100;
  ce.x = xf, ce.w = head32, ce.targets = targets, ce.losses = losses;
  ce.loss_sum = &out.sum, ce.count = &out.count, ce.grad_scale = grad_scale;
  ce.dx = dx, ce.dw = dw;
  cross_entropy_forward_backward(ce);
  return out;
}

void final_logits(const LlamaConfig& c, const float* norm, const Weight& head, const float* x, int64_t rows, float* xf, float* out) {
  rmsnorm(x, norm, rows, c.D, c.eps, xf, nullptr);
  linear_fwd(head, xf, rows, c.D, c.V, out, 0.f);
}

DecodeSegment prefill_segment(const char* op, const KvSlots& kv, int64_t slot, int64_t T) {
  if (slot < 0 || slot >= kv.slots())
    fail("E_ARGUMENT", std::string(op) + ": slot " + S(slot) + " is out of range [0, " + S(kv.slots()) + ")");
  if (T < 1 || T > kMaxRows) fail("E_ARGUMENT", std::string(op) + ": tokens must hold 1.." + S(kMaxRows) + " ids, got " + S(T));
  const int64_t len = kv.length(slot);
  if (len + T > kv.capacity())
    fail("E_ARGUMENT", std::string(op) + ": slot " + S(slot) + " holds " + S(len) + " tokens; " + S(T) +
                           " more would exceed the cache capacity of " + S(kv.capacity()));
  DecodeSegment sg;
  sg.row0 = 0, sg.count = T, sg.slot = slot, sg.start = len;
  return sg;
}

void decode_segments(const char* op, const KvSlots& kv, const int32_t* slots, int64_t R, std::vector<DecodeSegment>& segs) {
  if (R < 1 || R > kv.slots())
    fail("E_ARGUMENT", std::string(op) + ": rows (slots.length) must be in 1..cache slots (" + S(kv.slots()) + "), got " + S(R));
  segs.resize(size_t(R));
  for (int64_t r = 0; r < R; r++) {
    const int64_t s = slots[r];
    if (s < 0 || s >= kv.slots())
      fail("E_ARGUMENT", std::string(op) + ": 'slots' at position " + S(r) + " is " + S(s) + ", out of range [0, " + S(kv.slots()) + ")");
    for (int64_t j = 0; j < r; j++)
      if (slots[j] == s) fail("E_ARGUMENT", std::string(op) + ": slot " + S(s) + " appears twice in 'slots' (positions " + S(j) + " and " + S(r) + ")");
    const int64_t len = kv.length(s);
    if (len + 1 > kv.capacity())
      fail("E_ARGUMENT", std::string(op) + ": slot " + S(s) + " is full (" + S(len) + " tokens, capacity " + S(kv.capacity()) + ")");
    segs[size_t(r)].row0 = r, segs[size_t(r)].count = 1, segs[size_t(r)].slot = s, segs[size_t(r)].start = len;
  }
}

// ---------------------------------------------------------------------------------------------------
// Model calls.

const float* LlamaModel::forward_nosave(const int32_t* ids, int64_t B, int64_t T, float* rstd_f) {
  const int64_t N = B * T, D = c_.D;
  const BlockCtx ctx = rows_.sequences(c_, B, T);
  float* x = grow_floats(x_, N * D);
  embed_tokens(c_, w_.embed, ids, N, x);
  for (int64_t i = 0; i < c_.L; i++) block_forward(c_, w_.layers[size_t(i)], ctx, x, x, nullptr, ws_);
  float* xf = grow_floats(xf_, N * D);
  rmsnorm(x, w_.norm, N, D, c_.eps, xf, rstd_f);
  return xf;
}

LlamaModel::Loss LlamaModel::forward_backward(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T,
                                              float grad_scale) {
  const char* op = "forwardBackward";
  ComputeLock lock;
  if (!trainable_)
    fail("E_ARGUMENT", std::string(op) + ": the model was created without gradient buffers (frozen); pass grads to llamaCreate to train");
  if (!std::isfinite(grad_scale)) fail("E_ARGUMENT", std::string(op) + ": gradScale must be finite, got " + std::to_string(grad_scale));
  check_batch(c_, op, inputs, targets, B, T);
  const int64_t N = B * T, D = c_.D, L = c_.L;
  const BlockCtx ctx = rows_.sequences(c_, B, T);

  // ---- forward, saving activations of the layers the backward visits
  float* stream = grow_floats(stream_, (L + 1) * N * D);  // x_i = stream + i*N*D
  const int64_t per = BlockActs::floats(c_, B, T);
  float* arena = grow_floats(acts_, (L - lowest_) * per);
  std::vector<BlockActs>& acts = act_views_;
  acts.resize(size_t(L));
  for (int64_t i = lowest_; i < L; i++) acts[size_t(i)] = BlockActs::bind(c_, B, T, arena + (i - lowest_) * per);
  embed_tokens(c_, w_.embed, inputs, N, stream);
  for (int64_t i = 0; i < L; i++)
    block_forward(c_, w_.layers[size_t(i)], ctx, stream + i * N * D, stream + (i + 1) * N * D,
                  i >= lowest_ ? &acts[size_t(i)] : nullptr, ws_);
  const float* xL = stream + L * N * D;
  float* xf = grow_floats(xf_, N * D);
  float* rstdf = grow_floats(rstdf_, N);
  rmsnorm(xL, w_.norm, N, D, c_.eps, xf, rstdf);

  // ---- loss and its gradient through the LM head: dx = dL/dxf [N, D]
  float* dx = grow_floats(dx_, N * D);
  const Loss out = head_loss(c_, xf, N, head_fp32(c_, w_.lm_head, head32_), targets, nullptr, grad_scale, dx, g_.lm_head);

  // ---- backward
  if (lowest_ == L && !g_.norm) return out;
  rmsnorm_bwd(xL, w_.norm, rstdf, N, D, dx, g_.norm);
  for (int64_t i = L - 1; i >= lowest_; i--) {
    const LayerGrads& lg = g_.layers[size_t(i)];
    float* dx_in = (i > lowest_ || g_.embed) ? dx : nullptr;
    block_backward(c_, w_.layers[size_t(i)], lg.any() ? &lg : nullptr, acts[size_t(i)], dx, dx_in, ws_);
  }
  if (g_.embed) {
    EmbeddingBackwardParams p;
    p.N = N, p.V = c_.V, p.D = D, p.ids = inputs, p.dout = dx, p.dtable = g_.embed;
    embedding_backward(p);
  }
  return out;
}

LlamaModel::Loss LlamaModel::loss(const int32_t* inputs, const int32_t* targets, int64_t B, int64_t T, float* losses) {
  const char* op = "loss";
  ComputeLock lock;
  check_batch(c_, op, inputs, targets, B, T);
  const float* xf = forward_nosave(inputs, B, T, nullptr);
  return head_loss(c_, xf, B * T, head_fp32(c_, w_.lm_head, head32_), targets, losses);
}

void LlamaModel::logits(const int32_t* tokens, int64_t B, int64_t T, float* out) {
  const char* op = "logits";
  ComputeLock lock;
  check_rows(c_, op, B, T);
  check_token_ids(c_, op, "tokens", tokens, B * T, false);
  const float* xf = forward_nosave(tokens, B, T, nullptr);
  linear_fwd(w_.lm_head, xf, B * T, c_.D, c_.V, out, 0.f);
}

void LlamaModel::decode_rows(KvCache& cache, const DecodeSegment* segs, int64_t nsegs, const int32_t* tokens, int64_t R,
                             int64_t out_row0, float* out) {
  const int64_t D = c_.D;
  const DecodeCtx ctx = rows_.decode(c_, segs, nsegs, R, cache.capacity());
  float* x = grow_floats(x_, R * D);
  embed_tokens(c_, w_.embed, tokens, R, x);
  for (int64_t i = 0; i < c_.L; i++) block_decode(c_, w_.layers[size_t(i)], ctx, cache.k(i), cache.v(i), x, ws_);
  const int64_t n = R - out_row0;
  final_logits(c_, w_.norm, w_.lm_head, x + out_row0 * D, n, grow_floats(xf_, n * D), out);
}

void LlamaModel::prefill(KvCache& cache, int64_t slot, const int32_t* tokens, int64_t T, float* out) {
  const char* op = "prefill";
  ComputeLock lock;
  if (!cache.compatible(c_)) fail("E_ARGUMENT", std::string(op) + ": the cache was made for another model shape");
  segs_.assign(1, prefill_segment(op, cache, slot, T));
  check_token_ids(c_, op, "tokens", tokens, T, false);
  decode_rows(cache, segs_.data(), 1, tokens, T, T - 1, out);
  cache.set_length(slot, segs_[0].start + T);
}

void LlamaModel::decode(KvCache& cache, const int32_t* slots, const int32_t* tokens, int64_t R, float* out) {
  const char* op = "decode";
  ComputeLock lock;
  if (!cache.compatible(c_)) fail("E_ARGUMENT", std::string(op) + ": the cache was made for another model shape");
  decode_segments(op, cache, slots, R, segs_);
  check_token_ids(c_, op, "tokens", tokens, R, false);
  decode_rows(cache, segs_.data(), R, tokens, R, 0, out);
  for (int64_t r = 0; r < R; r++) cache.set_length(segs_[size_t(r)].slot, segs_[size_t(r)].start + 1);
}

void LlamaModel::release() {
  ComputeLock lock;
  ws_.release();
  rows_.release();
  for (std::vector<float>* v : {&head32_, &stream_, &acts_, &xf_, &rstdf_, &dx_, &x_}) {
    v->clear();
    v->shrink_to_fit();
  }
}

size_t LlamaModel::workspace_bytes() const {
  size_t s = ws_.bytes() + rows_.bytes();
  for (const std::vector<float>* v : {&head32_, &stream_, &acts_, &xf_, &rstdf_, &dx_, &x_})
    s += v->size() * sizeof(float);
  return s;
}

}  // namespace engine
}  // namespace bts
