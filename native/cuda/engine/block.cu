// cuda/engine/block.cu: one Llama decoder block on the device, forward (optionally saving what the
// backward needs), backward (input gradient, optionally weight gradients) and KV-cached decode: the
// CPU engine's native/engine/block.cc step for step, with the bts::cuda:: op entries on one stream and
// device buffers. Same data flow, same buffer roles (Workspace slots), same fusions (residual adds as
// GEMM beta = 1), so the two files can be read side by side.
//
// Legend (llama_cuda.h): N rows, D hidden, F ffn, H / Hkv heads, Dh head dim, QD = H*Dh, KD = Hkv*Dh.
// Linear layouts: forward y = x W^T (GEMM NT), input gradient dx = dy W (NN), weight gradient
// dW += dy^T x (TN, beta 1); all fp32 (cuda::gemm_f32, GemmMath::Fp32: the CPU engine's arithmetic).
//
// Workspace use (as block.cc):
//   forward  A: norm output (a, then m)   Q K V ATT LSE: attention (when not saving)
//            G U: gate / up (when not saving)   ACT: silu(gate) * up
//   backward ACT: act (recomputed), then dgate   G: d act   U: d up   A: m / a (recomputed)
//            H: dm, then da   D3: dh   Q: d att   ATT: dq   K: dk   V: dv
//
// Host code only (no kernel here): it is compiled by nvcc with the kernels and, for the emulated
// addon, by the C++ compiler against the SIMT emulator. Known limits: fp32 weights only; decode runs
// one attention launch per slot segment (slots have different lengths); no grouped small-R GEMMs
// (the CPU's decode fusion: on a GPU each GEMM is one launch anyway).
#include <cmath>

#include "../common.cuh"
#include "llama_cuda.h"

namespace bts {
namespace cuda {
namespace engine {

using bts::engine::Workspace;

namespace {

float attn_scale(const LlamaConfig& c) { return float(1.0 / std::sqrt(double(c.Dh))); }

const float* f32_of(const bts::engine::Weight& w) {
  if (!w.f32) throw Error("E_UNSUPPORTED", "cuda engine: bf16 weights are not supported (fp32 only)");
  return w.f32;
}

// y [M, out] (= or +=, by beta) x [M, in] W^T, W [out, in]   (GEMM NT)
void linear_fwd(const bts::engine::Weight& w, const float* x, int64_t M, int64_t in, int64_t out, float* y, float beta, cudaStream_t s) {
  GemmParams p;
  p.M = M, p.N = out, p.K = in, p.transB = true;
  p.A = x, p.lda = in, p.B = f32_of(w), p.ldb = in, p.C = y, p.ldc = out, p.beta = beta;
  gemm_f32(p, s);
}

// dx [M, in] (= or +=, by beta) dy [M, out] W [out, in]   (GEMM NN)
void linear_dx(const bts::engine::Weight& w, const float* dy, int64_t M, int64_t in, int64_t out, float* dx, float beta, cudaStream_t s) {
  GemmParams p;
  p.M = M, p.N = in, p.K = out;
  p.A = dy, p.lda = out, p.B = f32_of(w), p.ldb = in, p.C = dx, p.ldc = in, p.beta = beta;
  gemm_f32(p, s);
}

// dW [out, in] += dy^T [out, M] x [M, in]   (GEMM TN, accumulated). Skipped when dw is null.
void linear_dw(float* dw, const float* dy, const float* x, int64_t M, int64_t in, int64_t out, cudaStream_t s) {
  if (!dw) return;
  GemmParams p;
  p.M = out, p.N = in, p.K = M, p.transA = true;
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

void rmsnorm(const float* x, const float* w, int64_t N, int64_t D, float eps, float* y, float* rstd, cudaStream_t s) {
  RmsNormParams p;
  p.N = N, p.D = D, p.eps = eps, p.x = x, p.w = w, p.y = y, p.rstd = rstd;
  rmsnorm_forward(p, s);
}

void rmsnorm_bwd(const float* x, const float* w, const float* rstd, int64_t N, int64_t D, float* dy_dx, float* dw, cudaStream_t s) {
  RmsNormBackwardParams p;
  p.N = N, p.D = D, p.x = x, p.w = w, p.rstd = rstd, p.dy = dy_dx, p.dx = dy_dx, p.dw = dw;
  rmsnorm_backward(p, s);
}

// In-place RoPE of x [N, nh, Dh] at positions pos [N]; inverse rotates back (the backward).
void rope(float* x, int64_t N, int64_t nh, int64_t Dh, const int32_t* pos, const float* table, int64_t P, bool inverse, cudaStream_t s) {
  RopeParams p;
  p.N = N, p.nh = nh, p.Dh = Dh, p.P = P, p.inverse = inverse;
  p.pos = pos, p.table = table, p.x = x, p.out = x;
  rope_forward(p, s);
}

void swiglu(const float* gate, const float* up, int64_t N, int64_t F, float* h, cudaStream_t s) {
  SwigluParams p;
  p.N = N, p.F = F, p.gate = gate, p.up = up, p.h = h;
  swiglu_forward(p, s);
}

// x [R, D] += down(silu(gate(m)) * up(m)), m = post_norm(x): the MLP half without saving.
void mlp_inplace(const LlamaConfig& c, const LayerWeights& w, float* x, int64_t R, DeviceWorkspace& ws, cudaStream_t s) {
  const int64_t D = c.D, F = c.F;
  float* m = ws.get(Workspace::kA, R * D);
  float* gate = ws.get(Workspace::kG, R * F);
  float* up = ws.get(Workspace::kU, R * F);
  float* act = ws.get(Workspace::kAct, R * F);
  rmsnorm(x, w.post_norm, R, D, c.eps, m, nullptr, s);
  linear_fwd(w.w_gate, m, R, D, F, gate, 0.f, s);
  linear_fwd(w.w_up, m, R, D, F, up, 0.f, s);
  swiglu(gate, up, R, F, act, s);
  linear_fwd(w.w_down, act, R, F, D, x, 1.f, s);  // residual: x += act W_down^T
}

}  // namespace

// ---------------------------------------------------------------------------------------------------

void DeviceBuffer::release() {
  if (p_) cudaFree(p_);  // an error here would only hide the one being reported
  p_ = nullptr;
  bytes_.store(0, std::memory_order_relaxed);
}

void* DeviceBuffer::grow(size_t bytes, const char* what) {
  if (bytes <= bytes_ && p_) return p_;
  release();
  const size_t n = bytes < 256 ? 256 : bytes;
  const cudaError_t e = cudaMalloc(&p_, n);
  if (e != cudaSuccess) {
    p_ = nullptr;
    cudaGetLastError();  // an allocation failure is not sticky: clear it so later calls can go on
    throw Error("E_OUT_OF_MEMORY", std::string(what) + ": cannot allocate " + std::to_string(n >> 20) + " MiB of device memory (" +
                                       cudaGetErrorString(e) + ")");
  }
  bytes_.store(n, std::memory_order_relaxed);
  return p_;
}

float* DeviceWorkspace::get(Workspace::Slot s, int64_t n) { return bufs_[s].floats(n, "cuda engine workspace"); }

size_t DeviceWorkspace::bytes() const {
  size_t s = 0;
  for (const DeviceBuffer& b : bufs_) s += b.bytes();
  return s;
}

void DeviceWorkspace::release() {
  for (DeviceBuffer& b : bufs_) b.release();
}

// ---------------------------------------------------------------------------------------------------

void block_forward(const LlamaConfig& c, const LayerWeights& w, const BlockCtx& ctx, const float* x_in, float* x_out,
                   BlockActs* save, DeviceWorkspace& ws, cudaStream_t s) {
  const int64_t B = ctx.B, T = ctx.T, N = B * T, D = c.D, F = c.F, H = c.H, Hkv = c.Hkv, Dh = c.Dh;
  const int64_t QD = H * Dh, KD = Hkv * Dh;
  if (save && x_out == x_in) throw Error("E_ARGUMENT", "cuda block_forward: x_out must differ from x_in when saving activations");

  float* a = ws.get(Workspace::kA, N * D);
  float* q = save ? save->q : ws.get(Workspace::kQ, N * QD);
  float* k = save ? save->k : ws.get(Workspace::kK, N * KD);
  float* v = save ? save->v : ws.get(Workspace::kV, N * KD);
  float* att = save ? save->att : ws.get(Workspace::kAtt, N * QD);
  float* h = save ? save->h : x_out;  // without saving, the residual after attention lives in x_out
  if (save) {
    save->ctx = ctx;
    save->x = x_in;
  }

  // attention half: h = x + o(attn(rope(q(a)), rope(k(a)), v(a))), a = norm1(x)
  rmsnorm(x_in, w.in_norm, N, D, c.eps, a, save ? save->rstd1 : nullptr, s);
  linear_fwd(w.wq, a, N, D, QD, q, 0.f, s);  // [B, T, H, Dh]
  linear_fwd(w.wk, a, N, D, KD, k, 0.f, s);  // [B, T, Hkv, Dh]
  linear_fwd(w.wv, a, N, D, KD, v, 0.f, s);
  rope(q, N, H, Dh, ctx.pos, ctx.rope, ctx.P, false, s);
  rope(k, N, Hkv, Dh, ctx.pos, ctx.rope, ctx.P, false, s);
  AttentionParams ap;
  ap.B = B, ap.Tq = T, ap.Tk = T, ap.Tcap = T, ap.H = H, ap.Hkv = Hkv, ap.Dh = Dh, ap.scale = attn_scale(c);
  ap.q = q, ap.k = k, ap.v = v, ap.out = att, ap.lse = save ? save->lse : nullptr;
  attention_forward(ap, s);
  copy(h, x_in, N * D, s);
  linear_fwd(w.wo, att, N, QD, D, h, 1.f, s);  // h += att W_o^T

  // MLP half: x_out = h + down(silu(gate(m)) * up(m)), m = norm2(h)
  if (!save) {
    mlp_inplace(c, w, x_out, N, ws, s);
    return;
  }
  float* m = a;
  rmsnorm(h, w.post_norm, N, D, c.eps, m, save->rstd2, s);
  linear_fwd(w.w_gate, m, N, D, F, save->gate, 0.f, s);
  linear_fwd(w.w_up, m, N, D, F, save->up, 0.f, s);
  float* act = ws.get(Workspace::kAct, N * F);
  swiglu(save->gate, save->up, N, F, act, s);
  copy(x_out, h, N * D, s);
  linear_fwd(w.w_down, act, N, F, D, x_out, 1.f, s);
}

void block_backward(const LlamaConfig& c, const LayerWeights& w, const LayerGrads* g, const BlockActs& sv, const float* dx_out,
                    float* dx_in, DeviceWorkspace& ws, cudaStream_t s) {
  const int64_t B = sv.ctx.B, T = sv.ctx.T, N = B * T, D = c.D, F = c.F, H = c.H, Hkv = c.Hkv, Dh = c.Dh;
  const int64_t QD = H * Dh, KD = Hkv * Dh;
  LayerGrads none;
  const LayerGrads& gr = g ? *g : none;

  // ---- MLP: x_out = h + down(act), act = silu(gate(m)) * up(m), m = norm2(h)
  float* dact = ws.get(Workspace::kG, N * F);
  linear_dx(w.w_down, dx_out, N, F, D, dact, 0.f, s);  // [N, F]
  float* act = ws.get(Workspace::kAct, N * F);
  if (gr.w_down) {
    swiglu(sv.gate, sv.up, N, F, act, s);  // recomputed (not saved)
    linear_dw(gr.w_down, dx_out, act, N, F, D, s);
  }
  float* dgate = act;  // act is dead from here
  float* dup = ws.get(Workspace::kU, N * F);
  {
    SwigluBackwardParams p;
    p.N = N, p.F = F, p.gate = sv.gate, p.up = sv.up, p.dh = dact, p.dgate = dgate, p.dup = dup;
    swiglu_backward(p, s);
  }
  float* dm = ws.get(Workspace::kH, N * D);
  linear_dx(w.w_gate, dgate, N, D, F, dm, 0.f, s);
  linear_dx(w.w_up, dup, N, D, F, dm, 1.f, s);  // dm += dup W_up
  if (gr.w_gate || gr.w_up) {
    float* m = ws.get(Workspace::kA, N * D);
    rmsnorm(sv.h, w.post_norm, N, D, c.eps, m, nullptr, s);  // recomputed
    linear_dw(gr.w_gate, dgate, m, N, D, F, s);
    linear_dw(gr.w_up, dup, m, N, D, F, s);
  }
  rmsnorm_bwd(sv.h, w.post_norm, sv.rstd2, N, D, dm, gr.post_norm, s);  // dm -> d h through the norm
  float* dh = ws.get(Workspace::kD3, N * D);
  add(dh, dx_out, dm, N * D, s);  // residual: both paths

  // ---- attention: h = x + o(attn(rope(q(a)), rope(k(a)), v(a))), a = norm1(x)
  float* datt = ws.get(Workspace::kQ, N * QD);
  linear_dx(w.wo, dh, N, QD, D, datt, 0.f, s);  // [B, T, H, Dh]
  linear_dw(gr.wo, dh, sv.att, N, QD, D, s);
  float* dq = ws.get(Workspace::kAtt, N * QD);
  float* dk = ws.get(Workspace::kK, N * KD);
  float* dv = ws.get(Workspace::kV, N * KD);
  {
    AttentionBackwardParams p;
    p.B = B, p.T = T, p.H = H, p.Hkv = Hkv, p.Dh = Dh, p.scale = attn_scale(c);
    p.q = sv.q, p.k = sv.k, p.v = sv.v, p.out = sv.att, p.lse = sv.lse, p.dout = datt;
    p.dq = dq, p.dk = dk, p.dv = dv;
    attention_backward(p, s);
  }
  rope(dq, N, H, Dh, sv.ctx.pos, sv.ctx.rope, sv.ctx.P, true, s);  // un-rotate: R^T dq
  rope(dk, N, Hkv, Dh, sv.ctx.pos, sv.ctx.rope, sv.ctx.P, true, s);
  if (gr.wq || gr.wk || gr.wv) {
    float* a = ws.get(Workspace::kA, N * D);
    rmsnorm(sv.x, w.in_norm, N, D, c.eps, a, nullptr, s);  // recomputed
    linear_dw(gr.wq, dq, a, N, D, QD, s);
    linear_dw(gr.wk, dk, a, N, D, KD, s);
    linear_dw(gr.wv, dv, a, N, D, KD, s);
  }
  if (!dx_in && !gr.in_norm) return;
  float* da = dm;  // dm is dead (folded into dh)
  linear_dx(w.wq, dq, N, D, QD, da, 0.f, s);
  linear_dx(w.wk, dk, N, D, KD, da, 1.f, s);
  linear_dx(w.wv, dv, N, D, KD, da, 1.f, s);
  rmsnorm_bwd(sv.x, w.in_norm, sv.rstd1, N, D, da, gr.in_norm, s);
  if (dx_in) add(dx_in, dh, da, N * D, s);
}

void block_decode(const LlamaConfig& c, const LayerWeights& w, const DecodeCtx& ctx, float* k_cache, float* v_cache, float* x,
                  DeviceWorkspace& ws, cudaStream_t s) {
  const int64_t R = ctx.R, D = c.D, H = c.H, Hkv = c.Hkv, Dh = c.Dh, QD = H * Dh, KD = Hkv * Dh;
  const int64_t slot_stride = ctx.Tcap * KD;
  float* a = ws.get(Workspace::kA, R * D);
  float* q = ws.get(Workspace::kQ, R * QD);
  float* k = ws.get(Workspace::kK, R * KD);
  float* v = ws.get(Workspace::kV, R * KD);
  float* att = ws.get(Workspace::kAtt, R * QD);

  rmsnorm(x, w.in_norm, R, D, c.eps, a, nullptr, s);
  linear_fwd(w.wq, a, R, D, QD, q, 0.f, s);
  linear_fwd(w.wk, a, R, D, KD, k, 0.f, s);
  linear_fwd(w.wv, a, R, D, KD, v, 0.f, s);
  rope(q, R, H, Dh, ctx.pos, ctx.rope, ctx.P, false, s);
  rope(k, R, Hkv, Dh, ctx.pos, ctx.rope, ctx.P, false, s);
  // Append keys / values: a segment's rows are consecutive positions of one slot, so one copy each.
  for (int64_t i = 0; i < ctx.nsegs; i++) {
    const DecodeSegment& sg = ctx.segs[i];
    copy(k_cache + sg.slot * slot_stride + sg.start * KD, k + sg.row0 * KD, sg.count * KD, s);
    copy(v_cache + sg.slot * slot_stride + sg.start * KD, v + sg.row0 * KD, sg.count * KD, s);
  }
  for (int64_t i = 0; i < ctx.nsegs; i++) {
    const DecodeSegment& sg = ctx.segs[i];
    AttentionParams ap;
    ap.B = 1, ap.Tq = sg.count, ap.Tk = sg.start + sg.count, ap.Tcap = ctx.Tcap;
    ap.H = H, ap.Hkv = Hkv, ap.Dh = Dh, ap.scale = attn_scale(c);
    ap.q = q + sg.row0 * QD, ap.k = k_cache + sg.slot * slot_stride, ap.v = v_cache + sg.slot * slot_stride;
    ap.out = att + sg.row0 * QD;
    attention_forward(ap, s);
  }
  linear_fwd(w.wo, att, R, QD, D, x, 1.f, s);  // residual: x += att W_o^T
  mlp_inplace(c, w, x, R, ws, s);
}

}  // namespace engine
}  // namespace cuda
}  // namespace bts
