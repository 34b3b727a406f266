// block.cc: one Llama decoder block, forward (optionally saving what the backward needs), backward
// (input gradient, optionally weight gradients) and KV-cached decode, composed from the op entries of
// bts/ops.h. The data flow is exactly test/golden/llama-ops.ts (the TS oracle checked against
// PyTorch); this file only chooses buffers and fuses the residual adds into the GEMMs (beta = 1).
//
// Legend (llama.h): N rows, D hidden, F ffn, H / Hkv heads, Dh head dim, QD = H*Dh, KD = Hkv*Dh.
// Linear layouts: forward y = x W^T (GEMM NT), input gradient dx = dy W (NN), weight gradient
// dW += dy^T x (TN, beta 1). bf16 weights go through gemm_bf16 for NT and NN; dW is always fp32.
//
// Workspace use (one layer's worth, shared by all layers; Workspace::Slot):
//   forward  A: norm output (a, then m)   Q K V ATT LSE: attention (when not saving)
//            G U: gate / up (when not saving)   ACT: silu(gate) * up
//   backward ACT: act (recomputed), then dgate   G: d act   U: d up   A: m / a (recomputed)
//            H: dm, then da   D3: dh (gradient of the residual after attention)
//            Q: d att   ATT: dq   K: dk   V: dv
// Element-wise glue (copies, adds) is plain loops over contiguous floats split with parallel_for
// above a size where threads pay off.
// Few rows (decode, R <= 16): q/k/v run as ONE parallel region over the output columns of the three
// weights, and gate/up/SwiGLU as one region over column ranges of F (each task calls the GEMM entries,
// which then run serially on its thread): 5 thread synchronisations per layer instead of 9.
#include <cmath>
#include <algorithm>
#include <cstring>

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "linear.h"
#include "llama.h"

namespace bts {
namespace engine {

namespace {
using namespace detail;

float attn_scale(const LlamaConfig& c) { return float(1.0 / std::sqrt(double(c.Dh))); }

// Rows up to this count take the grouped small-R paths below (decode; = the GEMM's small-M limit).
constexpr int64_t kGroupRows = 16;
constexpr int64_t kColUnit = 16;  // output columns per work unit of a grouped GEMM

// Work units of `cols` output columns over `in` inputs: about 32K multiply-adds per thread chunk.
int64_t unit_grain(int64_t R, int64_t in) { return std::max<int64_t>(1, (int64_t(1) << 15) / (R * in * kColUnit)); }

// y_i [R, out_i] = x [R, in] W_i^T for several weights sharing x, as ONE parallel region over the
// output columns of all of them. With few rows every GEMM is a short GEMV; a region per GEMM would
// cost a thread synchronisation each (METHOD.md: per-op synchronisation sets the decode speed).
struct LinOut {
  const Weight* w;
  int64_t out;
  float* y;  // [R, out]
};
void linear_fwd_group(const LinOut* outs, int n, const float* x, int64_t R, int64_t in) {
  int64_t units = 0;
  int64_t base[4];
  for (int i = 0; i < n; i++) base[i] = units, units += (outs[i].out + kColUnit - 1) / kColUnit;
  parallel_for(units, unit_grain(R, in), [&](int64_t u0, int64_t u1, int) {
    for (int i = 0; i < n; i++) {
      const int64_t a = std::max(u0, base[i]) - base[i];
      const int64_t b = std::min(u1, base[i] + (outs[i].out + kColUnit - 1) / kColUnit) - base[i];
      if (a >= b) continue;
      const int64_t c0 = a * kColUnit, c1 = std::min(outs[i].out, b * kColUnit);
      const Weight& w = *outs[i].w;
      if (w.f32) {
        GemmParams p;
        p.M = R, p.N = c1 - c0, p.K = in, p.transB = true;
        p.A = x, p.lda = in, p.B = w.f32 + c0 * in, p.ldb = in, p.C = outs[i].y + c0, p.ldc = outs[i].out;
        gemm_f32(p);
      } else {
        GemmBf16Params p;
        p.M = R, p.N = c1 - c0, p.K = in, p.transB = true;
        p.A = x, p.lda = in, p.B = w.b16 + c0 * in, p.ldb = in, p.C = outs[i].y + c0, p.ldc = outs[i].out;
        gemm_bf16(p);
      }
    }
  });
}

// x [R, D] += down(silu(gate(m)) * up(m)), m = post_norm(x): the MLP half of a block without saving
// (decode, forward-only). gate/up/act in the workspace. Few rows: gate, up and SwiGLU in one region
// over column ranges of F.
void mlp_inplace(const LlamaConfig& c, const LayerWeights& w, float* x, int64_t R, Workspace& ws) {
  const int64_t D = c.D, F = c.F;
  float* m = ws.get(Workspace::kA, R * D);
  float* gate = ws.get(Workspace::kG, R * F);
  float* up = ws.get(Workspace::kU, R * F);
  float* act = ws.get(Workspace::kAct, R * F);
  rmsnorm(x, w.post_norm, R, D, c.eps, m, nullptr);
  if (R <= kGroupRows) {
    const int64_t units = (F + kColUnit - 1) / kColUnit;
    parallel_for(units, unit_grain(2 * R, D), [&](int64_t u0, int64_t u1, int) {
      const int64_t c0 = u0 * kColUnit, c1 = std::min(F, u1 * kColUnit);
      LinOut o[2] = {{&w.w_gate, F, gate}, {&w.w_up, F, up}};
      for (const LinOut& lo : o) {  // inside a task: the GEMMs run on this thread
        if (lo.w->f32) {
          GemmParams p;
          p.M = R, p.N = c1 - c0, p.K = D, p.transB = true;
          p.A = m, p.lda = D, p.B = lo.w->f32 + c0 * D, p.ldb = D, p.C = lo.y + c0, p.ldc = F;
          gemm_f32(p);
        } else {
          GemmBf16Params p;
          p.M = R, p.N = c1 - c0, p.K = D, p.transB = true;
          p.A = m, p.lda = D, p.B = lo.w->b16 + c0 * D, p.ldb = D, p.C = lo.y + c0, p.ldc = F;
          gemm_bf16(p);
        }
      }
      for (int64_t r = 0; r < R; r++) swiglu(gate + r * F + c0, up + r * F + c0, 1, c1 - c0, act + r * F + c0);
    });
  } else {
    linear_fwd(w.w_gate, m, R, D, F, gate, 0.f);
    linear_fwd(w.w_up, m, R, D, F, up, 0.f);
    swiglu(gate, up, R, F, act);
  }
  linear_fwd(w.w_down, act, R, F, D, x, 1.f);  // residual: x += act W_down^T
}

}  // namespace

// ---------------------------------------------------------------------------------------------------

namespace {
int64_t align16(int64_t n) { return (n + 15) & ~int64_t(15); }
}  // namespace

int64_t BlockActs::floats(const LlamaConfig& c, int64_t B, int64_t T) {
  const int64_t N = B * T, QD = c.H * c.Dh, KD = c.Hkv * c.Dh;
  return align16(N) * 2 + align16(N * QD) * 2 + align16(N * KD) * 2 + align16(B * c.H * T) + align16(N * c.D) +
         align16(N * c.F) * 2;
}

BlockActs BlockActs::bind(const LlamaConfig& c, int64_t B, int64_t T, float* base) {
  const int64_t N = B * T, QD = c.H * c.Dh, KD = c.Hkv * c.Dh;
  BlockActs a;
  float* p = base;
  auto take = [&](int64_t n) {
    float* r = p;
    p += align16(n);
    return r;
  };
  a.rstd1 = take(N);
  a.q = take(N * QD);
  a.k = take(N * KD);
  a.v = take(N * KD);
  a.att = take(N * QD);
  a.lse = take(B * c.H * T);
  a.h = take(N * c.D);
  a.rstd2 = take(N);
  a.gate = take(N * c.F);
  a.up = take(N * c.F);
  return a;
}

float* Workspace::get(Slot s, int64_t n) {
  Buf& b = bufs_[s];
  if (b.n < n) {
    b.p.reset();
    b.n = 0;
    b.p.reset(new float[size_t(n)]);
    b.n = n;
  }
  return b.p.get();
}

size_t Workspace::bytes() const {
  size_t s = 0;
  for (const Buf& b : bufs_) s += size_t(b.n) * sizeof(float);
  return s;
}

void Workspace::release() {
  for (Buf& b : bufs_) {
    b.p.reset();
    b.n = 0;
  }
}

// ---------------------------------------------------------------------------------------------------

void block_forward(const LlamaConfig& c, const LayerWeights& w, const BlockCtx& ctx, const float* x_in,
                   float* x_out, BlockActs* save, Workspace& ws) {
  const int64_t B = ctx.B, T = ctx.T, N = B * T, D = c.D, F = c.F, H = c.H, Hkv = c.Hkv, Dh = c.Dh;
  const int64_t QD = H * Dh, KD = Hkv * Dh;
  if (save && x_out == x_in) throw_error("E_ARGUMENT", "block_forward: x_out must differ from x_in when saving activations");

  float* a = ws.get(Workspace::kA, N * D);
  float* q = save ? save->q : ws.get(Workspace::kQ, N * QD);
  float* k = save ? save->k : ws.get(Workspace::kK, N * KD);
  float* v = save ? save->v : ws.get(Workspace::kV, N * KD);
  float* att = save ? save->att : ws.get(Workspace::kAtt, N * QD);
  // Without saving, the residual after attention (h) lives in x_out itself.
  float* h = save ? save->h : x_out;
  if (save) {
    save->ctx = ctx;
    save->x = x_in;
  }

  // attention half: h = x + o(attn(rope(q(a)), rope(k(a)), v(a))), a = norm1(x)
  rmsnorm(x_in, w.in_norm, N, D, c.eps, a, save ? save->rstd1 : nullptr);
  linear_fwd(w.wq, a, N, D, QD, q, 0.f);  // [B, T, H, Dh]
  linear_fwd(w.wk, a, N, D, KD, k, 0.f);  // [B, T, Hkv, Dh]
  linear_fwd(w.wv, a, N, D, KD, v, 0.f);
  rope(q, N, H, Dh, ctx.pos, ctx.rope, ctx.P, false);
  rope(k, N, Hkv, Dh, ctx.pos, ctx.rope, ctx.P, false);
  AttentionParams ap;
  ap.B = B, ap.Tq = T, ap.Tk = T, ap.Tcap = T, ap.H = H, ap.Hkv = Hkv, ap.Dh = Dh, ap.scale = attn_scale(c);
  ap.q = q, ap.k = k, ap.v = v, ap.out = att, ap.lse = save ? save->lse : nullptr;
  attention_forward(ap);
  copy(h, x_in, N * D);
  linear_fwd(w.wo, att, N, QD, D, h, 1.f);  // h += att W_o^T

  // MLP half: x_out = h + down(silu(gate(m)) * up(m)), m = norm2(h)
  if (!save) {
    mlp_inplace(c, w, x_out, N, ws);
    return;
  }
  float* m = a;
  rmsnorm(h, w.post_norm, N, D, c.eps, m, save->rstd2);
  linear_fwd(w.w_gate, m, N, D, F, save->gate, 0.f);
  linear_fwd(w.w_up, m, N, D, F, save->up, 0.f);
  float* act = ws.get(Workspace::kAct, N * F);
  swiglu(save->gate, save->up, N, F, act);
  copy(x_out, h, N * D);
  linear_fwd(w.w_down, act, N, F, D, x_out, 1.f);
}

void block_backward(const LlamaConfig& c, const LayerWeights& w, const LayerGrads* g, const BlockActs& s,
                    const float* dx_out, float* dx_in, Workspace& ws) {
  const int64_t B = s.ctx.B, T = s.ctx.T, N = B * T, D = c.D, F = c.F, H = c.H, Hkv = c.Hkv, Dh = c.Dh;
  const int64_t QD = H * Dh, KD = Hkv * Dh;
  LayerGrads none;
  const LayerGrads& gr = g ? *g : none;

  // ---- MLP: x_out = h + down(act), act = silu(gate(m)) * up(m), m = norm2(h)
  float* dact = ws.get(Workspace::kG, N * F);
  linear_dx(w.w_down, dx_out, N, F, D, dact, 0.f);  // [N, F]
  float* act = ws.get(Workspace::kAct, N * F);
  if (gr.w_down) {
    swiglu(s.gate, s.up, N, F, act);  // recomputed (not saved)
    linear_dw(gr.w_down, dx_out, act, N, F, D);
  }
  float* dgate = act;  // act is dead from here
  float* dup = ws.get(Workspace::kU, N * F);
  {
    SwigluBackwardParams p;
    p.N = N, p.F = F, p.gate = s.gate, p.up = s.up, p.dh = dact, p.dgate = dgate, p.dup = dup;
    swiglu_backward(p);
  }
  float* dm = ws.get(Workspace::kH, N * D);
  linear_dx(w.w_gate, dgate, N, D, F, dm, 0.f);
  linear_dx(w.w_up, dup, N, D, F, dm, 1.f);  // dm += dup W_up
  if (gr.w_gate || gr.w_up) {
    float* m = ws.get(Workspace::kA, N * D);
    rmsnorm(s.h, w.post_norm, N, D, c.eps, m, nullptr);  // recomputed
    linear_dw(gr.w_gate, dgate, m, N, D, F);
    linear_dw(gr.w_up, dup, m, N, D, F);
  }
  rmsnorm_bwd(s.h, w.post_norm, s.rstd2, N, D, dm, gr.post_norm);  // dm -> d h through the norm
  float* dh = ws.get(Workspace::kD3, N * D);
  add(dh, dx_out, dm, N * D);  // residual: both paths

  // ---- attention: h = x + o(attn(rope(q(a)), rope(k(a)), v(a))), a = norm1(x)
  float* datt = ws.get(Workspace::kQ, N * QD);
  linear_dx(w.wo, dh, N, QD, D, datt, 0.f);  // [B, T, H, Dh]
  linear_dw(gr.wo, dh, s.att, N, QD, D);
  float* dq = ws.get(Workspace::kAtt, N * QD);
  float* dk = ws.get(Workspace::kK, N * KD);
  float* dv = ws.get(Workspace::kV, N * KD);
  {
    AttentionBackwardParams p;
    p.B = B, p.T = T, p.H = H, p.Hkv = Hkv, p.Dh = Dh, p.scale = attn_scale(c);
    p.q = s.q, p.k = s.k, p.v = s.v, p.out = s.att, p.lse = s.lse, p.dout = datt;
    p.dq = dq, p.dk = dk, p.dv = dv;
    attention_backward(p);
  }
  rope(dq, N, H, Dh, s.ctx.pos, s.ctx.rope, s.ctx.P, true);  // un-rotate: R^T dq
  rope(dk, N, Hkv, Dh, s.ctx.pos, s.ctx.rope, s.ctx.P, true);
  if (gr.wq || gr.wk || gr.wv) {
    float* a = ws.get(Workspace::kA, N * D);
    rmsnorm(s.x, w.in_norm, N, D, c.eps, a, nullptr);  // recomputed
    linear_dw(gr.wq, dq, a, N, D, QD);
    linear_dw(gr.wk, dk, a, N, D, KD);
    linear_dw(gr.wv, dv, a, N, D, KD);
  }
  if (!dx_in && !gr.in_norm) return;
  float* da = dm;  // dm is dead (folded into dh)
  linear_dx(w.wq, dq, N, D, QD, da, 0.f);
  linear_dx(w.wk, dk, N, D, KD, da, 1.f);
  linear_dx(w.wv, dv, N, D, KD, da, 1.f);
  rmsnorm_bwd(s.x, w.in_norm, s.rstd1, N, D, da, gr.in_norm);
  if (dx_in) add(dx_in, dh, da, N * D);
}

void block_decode(const LlamaConfig& c, const LayerWeights& w, const DecodeCtx& ctx, float* k_cache, float* v_cache,
                  float* x, Workspace& ws) {
  const int64_t R = ctx.R, D = c.D, H = c.H, Hkv = c.Hkv, Dh = c.Dh, QD = H * Dh, KD = Hkv * Dh;
  const int64_t slot_stride = ctx.Tcap * KD;
  float* a = ws.get(Workspace::kA, R * D);
  float* q = ws.get(Workspace::kQ, R * QD);
  float* k = ws.get(Workspace::kK, R * KD);
  float* v = ws.get(Workspace::kV, R * KD);
  float* att = ws.get(Workspace::kAtt, R * QD);

  rmsnorm(x, w.in_norm, R, D, c.eps, a, nullptr);
  if (R <= kGroupRows) {
    const LinOut o[3] = {{&w.wq, QD, q}, {&w.wk, KD, k}, {&w.wv, KD, v}};
    linear_fwd_group(o, 3, a, R, D);
  } else {
    linear_fwd(w.wq, a, R, D, QD, q, 0.f);
    linear_fwd(w.wk, a, R, D, KD, k, 0.f);
    linear_fwd(w.wv, a, R, D, KD, v, 0.f);
  }
  rope(q, R, H, Dh, ctx.pos, ctx.rope, ctx.P, false);
  rope(k, R, Hkv, Dh, ctx.pos, ctx.rope, ctx.P, false);
  // Append keys / values: a segment's rows are consecutive positions of one slot, so one copy each.
  for (int64_t i = 0; i < ctx.nsegs; i++) {
    const DecodeSegment& sg = ctx.segs[i];
    const size_t bytes = size_t(sg.count * KD) * sizeof(float);
    std::memcpy(k_cache + sg.slot * slot_stride + sg.start * KD, k + sg.row0 * KD, bytes);
    std::memcpy(v_cache + sg.slot * slot_stride + sg.start * KD, v + sg.row0 * KD, bytes);
  }
  auto attend = [&](const DecodeSegment& sg) {
    AttentionParams ap;
    ap.B = 1, ap.Tq = sg.count, ap.Tk = sg.start + sg.count, ap.Tcap = ctx.Tcap;
    ap.H = H, ap.Hkv = Hkv, ap.Dh = Dh, ap.scale = attn_scale(c);
    ap.q = q + sg.row0 * QD, ap.k = k_cache + sg.slot * slot_stride, ap.v = v_cache + sg.slot * slot_stride;
    ap.out = att + sg.row0 * QD;
    attention_forward(ap);
  };
  // Many slots: one slot per task (each attention then runs serially inside its task); few: each
  // attention call is parallel itself (over heads and key splits).
  if (ctx.nsegs >= 2 * int64_t(num_threads())) {
    parallel_for(ctx.nsegs, 1, [&](int64_t i0, int64_t i1, int) {
      for (int64_t i = i0; i < i1; i++) attend(ctx.segs[i]);
    });
  } else {
    for (int64_t i = 0; i < ctx.nsegs; i++) attend(ctx.segs[i]);
  }
  linear_fwd(w.wo, att, R, QD, D, x, 1.f);  // residual: x += att W_o^T
  mlp_inplace(c, w, x, R, ws);
}

}  // namespace engine
}  // namespace bts
