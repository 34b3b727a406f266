// ops.h: every CPU op of the native core: a plain params struct per op (the contract between the
// binding, the engine and the kernels) and its entry function.
//
// Each entry function (defined in native/core/dispatch.cc) checks what the params struct can tell
// (sizes > 0, pointers present, token ids in range where cheap), takes the compute lock and calls the
// implementation for the SIMD level in use: native/reference/<op>.cc at level "reference",
// native/cpu/<op>.cc compiled for scalar / avx2 / avx512 otherwise. Buffer lengths are checked one
// level up, in native/core/registry.cc, where they are known.
//
// Shape legend: see common.h. Conventions: row-major; Linear weights [out, in]; dW accumulated (+=),
// dX overwritten, unless stated.
#pragma once
#include <cstdint>

#include "bts/common.h"

namespace bts {

// ---------------------------------------------------------------------------------------------------
// GEMM, fp32: C = alpha * op(A) op(B) + beta * C, op(A) [M, K], op(B) [K, N], C [M, N] (row-major).
// transA: A is stored [K, M] (lda >= M) instead of [M, K] (lda >= K).
// transB: B is stored [N, K] (ldb >= K) instead of [K, N] (ldb >= N).
// The three layouts of training: NT = forward y = x W^T; NN = dx = dy W; TN = dW += dy^T x.
// beta == 0 means C is write-only (NaNs in C are not propagated).
struct GemmParams {
  int64_t M = 0, N = 0, K = 0;
  bool transA = false, transB = false;
  const float* A = nullptr;  // [M, K] or [K, M]
  int64_t lda = 0;
  const float* B = nullptr;  // [K, N] or [N, K]
  int64_t ldb = 0;
  float* C = nullptr;  // [M, N]
  int64_t ldc = 0;
  float alpha = 1.f, beta = 0.f;
};
void gemm_f32(const GemmParams& p);

// GEMM with bf16 B (frozen weights), fp32 A, fp32 accumulation and output. Same semantics as
// gemm_f32 with B of type bf16. Supported: transA == false; transB true (NT, forward through a frozen
// Linear) or false (NN, input gradient through a frozen Linear). Uses AVX512_BF16 dot products where
// the CPU has them (A is then rounded to bf16: "bf16 operands, fp32 accumulation"); elsewhere B is
// widened to fp32 while packing and A stays fp32.
struct GemmBf16Params {
  int64_t M = 0, N = 0, K = 0;
  bool transA = false, transB = true;
  const float* A = nullptr;  // [M, K]
  int64_t lda = 0;
  const bf16* B = nullptr;  // [N, K] (transB) or [K, N]
  int64_t ldb = 0;
  float* C = nullptr;  // [M, N]
  int64_t ldc = 0;
  float alpha = 1.f, beta = 0.f;
};
void gemm_bf16(const GemmBf16Params& p);

// ---------------------------------------------------------------------------------------------------
// Causal self-attention with grouped-query heads (H query heads share Hkv = H / group key/value heads:
// query head h uses kv head h / (H / Hkv)). Softmax(scale * q k^T) v, causal.
// Queries are the last Tq positions of a sequence whose keys/values fill the first Tk positions of a
// cache (Tq <= Tk): query i (0-based among the Tq) sits at position Tk - Tq + i and sees keys
// 0 ..= Tk - Tq + i. Training uses Tq == Tk; KV-cached decode uses Tq = 1.
// k and v have a sequence capacity Tcap >= Tk (batch stride Tcap * Hkv * Dh).
// Forward never materialises a [Tq, Tk] matrix beyond one tile; `lse` (may be null) receives the
// log-sum-exp of each query row's scaled scores, which the backward needs.
struct AttentionParams {
  int64_t B = 0, Tq = 0, Tk = 0, Tcap = 0, H = 0, Hkv = 0, Dh = 0;
  float scale = 0.f;          // usually 1 / sqrt(Dh)
  const float* q = nullptr;   // [B, Tq, H, Dh]
  const float* k = nullptr;   // [B, Tcap, Hkv, Dh]
  const float* v = nullptr;   // [B, Tcap, Hkv, Dh]
  float* out = nullptr;       // [B, Tq, H, Dh]
  float* lse = nullptr;       // [B, H, Tq] or null
};
void attention_forward(const AttentionParams& p);

// Backward of attention_forward for Tq == Tk == Tcap = T (training). Recomputes the probabilities
// tile by tile from q, k, v and lse. dq, dk, dv are overwritten.
struct AttentionBackwardParams {
  int64_t B = 0, T = 0, H = 0, Hkv = 0, Dh = 0;
  float scale = 0.f;
  const float* q = nullptr;     // [B, T, H, Dh]
  const float* k = nullptr;     // [B, T, Hkv, Dh]
  const float* v = nullptr;     // [B, T, Hkv, Dh]
  const float* out = nullptr;   // [B, T, H, Dh] forward output
  const float* lse = nullptr;   // [B, H, T] from the forward
  const float* dout = nullptr;  // [B, T, H, Dh]
  float* dq = nullptr;          // [B, T, H, Dh]
  float* dk = nullptr;          // [B, T, Hkv, Dh]
  float* dv = nullptr;          // [B, T, Hkv, Dh]
};
void attention_backward(const AttentionBackwardParams& p);

// ---------------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w (Llama: the weight multiplies after normalising).
struct RmsNormParams {
  int64_t N = 0, D = 0;
  float eps = 1e-5f;
  const float* x = nullptr;  // [N, D]
  const float* w = nullptr;  // [D]
  float* y = nullptr;        // [N, D] (may alias x)
  float* rstd = nullptr;     // [N] 1/sqrt(mean(x^2)+eps), saved for backward; may be null
};
void rmsnorm_forward(const RmsNormParams& p);

struct RmsNormBackwardParams {
  int64_t N = 0, D = 0;
  const float* x = nullptr;     // [N, D] forward input
  const float* w = nullptr;     // [D]
  const float* rstd = nullptr;  // [N] from the forward
  const float* dy = nullptr;    // [N, D]
  float* dx = nullptr;          // [N, D] overwritten (may alias dy)
  float* dw = nullptr;          // [D] accumulated; may be null (frozen weight)
};
void rmsnorm_backward(const RmsNormBackwardParams& p);

// ---------------------------------------------------------------------------------------------------
// RoPE, Hugging Face rotate-half pairing: in each head, element i (< Dh/2) pairs with i + Dh/2:
//   out[i]        = x[i] cos(a) - x[i+Dh/2] sin(a)
//   out[i + Dh/2] = x[i+Dh/2] cos(a) + x[i] sin(a),     a = pos * inv_freq[i]
// The angles come from a table built once by rope_table (fp32 angle pos*inv_freq, as transformers).
struct RopeTableParams {
  int64_t P = 0, Dh = 0;         // positions 0..P-1, head dim (even)
  double theta = 10000.0;        // rope_theta
  // Llama 3 scaling (rope_type "llama3"); factor <= 0 disables it.
  double factor = 0.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
  double original_max_position_embeddings = 8192.0;
  float* table = nullptr;        // [P, Dh/2, 2] (cos, sin)
  float* inv_freq = nullptr;     // [Dh/2] may be null
};
void rope_table(const RopeTableParams& p);

struct RopeParams {
  int64_t N = 0, nh = 0, Dh = 0, P = 0;  // N rows (tokens), nh heads per row, table positions P
  bool inverse = false;                  // true: rotate by -a (the backward pass)
  const int32_t* pos = nullptr;          // [N] position of each row, 0 <= pos < P
  const float* table = nullptr;          // [P, Dh/2, 2]
  const float* x = nullptr;              // [N, nh, Dh] (row stride ld_x)
  int64_t ld_x = 0;                      // floats between rows, >= nh*Dh (0 = nh*Dh)
  float* out = nullptr;                  // [N, nh, Dh] (row stride ld_out; may be x itself when ld_out == ld_x)
  int64_t ld_out = 0;
};
void rope_forward(const RopeParams& p);  // inverse=true is the backward

// ---------------------------------------------------------------------------------------------------
// SwiGLU: h = silu(gate) * up, silu(z) = z * sigmoid(z).
struct SwigluParams {
  int64_t N = 0, F = 0;
  const float* gate = nullptr;  // [N, F]
  const float* up = nullptr;    // [N, F]
  float* h = nullptr;           // [N, F]
};
void swiglu_forward(const SwigluParams& p);

struct SwigluBackwardParams {
  int64_t N = 0, F = 0;
  const float* gate = nullptr;  // [N, F]
  const float* up = nullptr;    // [N, F]
  const float* dh = nullptr;    // [N, F]
  float* dgate = nullptr;       // [N, F] overwritten
  float* dup = nullptr;         // [N, F] overwritten
};
void swiglu_backward(const SwigluBackwardParams& p);

// ---------------------------------------------------------------------------------------------------
// Embedding lookup: out[n] = table[ids[n]]. Ids out of [0, V) throw E_TOKEN_RANGE (naming the first).
struct EmbeddingParams {
  int64_t N = 0, V = 0, D = 0;
  const int32_t* ids = nullptr;  // [N]
  const float* table = nullptr;  // [V, D]
  float* out = nullptr;          // [N, D]
};
void embedding_forward(const EmbeddingParams& p);

// dtable[ids[n]] += dout[n]; deterministic for a given thread count (rows of a token are summed in order).
struct EmbeddingBackwardParams {
  int64_t N = 0, V = 0, D = 0;
  const int32_t* ids = nullptr;   // [N]
  const float* dout = nullptr;    // [N, D]
  float* dtable = nullptr;        // [V, D] accumulated
};
void embedding_backward(const EmbeddingBackwardParams& p);

// ---------------------------------------------------------------------------------------------------
// Softmax cross-entropy fused with the LM head, chunked over the vocabulary (never an [N, V] matrix):
//   logits = x W^T (W [V, D]), loss_n = logsumexp(logits_n) - logits_n[target_n].
// Targets equal to ignore_index contribute nothing (loss 0, no gradient). `losses` receives the
// per-row losses, `loss_sum` their sum and `count` the number of rows counted. With dx given, the
// backward of
//   L = grad_scale * sum_n loss_n
// is computed in the same call: dx overwritten, dw accumulated.
struct CrossEntropyParams {
  int64_t N = 0, D = 0, V = 0;
  int32_t ignore_index = -100;
  const float* x = nullptr;          // [N, D] final hidden states (after the final norm)
  const float* w = nullptr;          // [V, D] LM head (or tied embedding)
  const int32_t* targets = nullptr;  // [N] in [0, V) or ignore_index
  float* losses = nullptr;           // [N] per-row loss (0 for ignored rows); may be null
  double* loss_sum = nullptr;        // [1] sum of per-row losses over non-ignored rows; may be null
  int64_t* count = nullptr;          // [1] number of non-ignored rows; may be null
  float grad_scale = 1.f;            // dL/dloss_n (e.g. 1 / count for a mean)
  float* dx = nullptr;               // [N, D] overwritten; null: no backward
  float* dw = nullptr;               // [V, D] accumulated; may be null when dx is set (frozen head)
  // Blocking of the fast kernels (0 = automatic; the reference ignores them). Results differ only by
  // rounding; exposed for tests of chunk boundaries and for tuning.
  int64_t vocab_chunk = 0;           // vocab rows (of W) per chunk
  int64_t row_block = 0;             // rows (of x) per block
};
void cross_entropy_forward_backward(const CrossEntropyParams& p);

// ---------------------------------------------------------------------------------------------------
// AdamW over one flat parameter buffer (decoupled weight decay, bias-corrected moments), fused with
// global gradient-norm clipping: the gradient is scaled by min(1, max_grad_norm / ||g||) (no clipping
// when max_grad_norm <= 0). Elements [0, n_decay) get weight decay, [n_decay, n) do not (the engine
// lays out matrices first, norms after). grad_scale multiplies g before everything (e.g. 1/accum).
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd p)
struct AdamWParams {
  int64_t n = 0, n_decay = 0;
  float* p = nullptr;        // [n] parameters, updated in place
  const float* g = nullptr;  // [n] gradients (not modified)
  float* m = nullptr;        // [n] first moment
  float* v = nullptr;        // [n] second moment
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.f;
  int64_t step = 1;          // 1-based step number t, for bias correction
  float max_grad_norm = 0.f;
  float grad_scale = 1.f;
  float* grad_norm = nullptr;  // [1] out: ||grad_scale * g|| before clipping; may be null
};
void adamw_step(const AdamWParams& p);

// ---------------------------------------------------------------------------------------------------
// The fused stitch mix of METHOD.md. n experts + the hub make M = n + 1 models. The projections
// (p_i = W_proj_i h_i for E->H, q_i = W_proj_i h_0 for H->E) and the gate logits G = W_gate h_0 are
// GEMMs done outside; these kernels do the per-dim softmax/sigmoid over models and the mix.
// G[t] has D*M entries reshaped [D, M]: the logit of model m at dim d is G[t, d*M + m].
// The mixes are element-wise in (t, d): only the product N*D matters to the kernels.
//
// E->H: g = softmax_m(G[t, d, :]);  h0'[t,d] = g_0 h0[t,d] + sum_i g_i p_i[t,d]   (i = 1..n)
struct StitchEHParams {
  int64_t N = 0, D = 0, n = 0;
  const float* h0 = nullptr;  // [N, D] hub state
  const float* p = nullptr;   // [n, N, D] projected expert states
  const float* G = nullptr;   // [N, D*(n+1)] gate logits
  float* out = nullptr;       // [N, D] new hub state (may alias h0)
};
void stitch_eh_forward(const StitchEHParams& p);

struct StitchEHBackwardParams {
  int64_t N = 0, D = 0, n = 0;
  const float* h0 = nullptr;    // [N, D]
  const float* p = nullptr;     // [n, N, D]
  const float* G = nullptr;     // [N, D*(n+1)]
  const float* dout = nullptr;  // [N, D]
  float* dh0 = nullptr;         // [N, D] overwritten (g_0 * dout); may alias dout
  float* dp = nullptr;          // [n, N, D] overwritten (g_i * dout)
  float* dG = nullptr;          // [N, D*(n+1)] overwritten (softmax backward)
};
void stitch_eh_backward(const StitchEHBackwardParams& p);

// H->E: g_i = sigmoid(G[t, d*M + i]) for i = 1..n (slot 0 unused);
//       h_i'[t,d] = (1 - g_i) h_i[t,d] + g_i q_i[t,d]; the hub passes through unchanged.
struct StitchHEParams {
  int64_t N = 0, D = 0, n = 0;
  const float* h = nullptr;   // [n, N, D] expert states
  const float* q = nullptr;   // [n, N, D] projected hub state per expert
  const float* G = nullptr;   // [N, D*(n+1)]
  float* out = nullptr;       // [n, N, D] new expert states (may alias h)
};
void stitch_he_forward(const StitchHEParams& p);

struct StitchHEBackwardParams {
  int64_t N = 0, D = 0, n = 0;
  const float* h = nullptr;     // [n, N, D]
  const float* q = nullptr;     // [n, N, D]
  const float* G = nullptr;     // [N, D*(n+1)]
  const float* dout = nullptr;  // [n, N, D]
  float* dh = nullptr;          // [n, N, D] overwritten ((1-g_i) dout); may alias dout
  float* dq = nullptr;          // [n, N, D] overwritten (g_i dout)
  float* dG = nullptr;          // [N, D*(n+1)] overwritten (slot 0 set to 0)
};
void stitch_he_backward(const StitchHEBackwardParams& p);

}  // namespace bts
