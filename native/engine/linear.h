// linear.h: small internal helpers of the engine (not installed, not part of the op contract): the
// three Linear GEMM layouts with fp32 or bf16 weights, RMSNorm / RoPE / SwiGLU calls with the params
// filled, and element-wise glue (copy, add) split over the compute pool.
//
// Legend (llama.h). Linear weights W [out, in] (HF): forward y = x W^T (GEMM NT), input gradient
// dx = dy W (NN), weight gradient dW += dy^T x (TN, beta 1). A bf16 weight takes gemm_bf16 (NT and
// NN); the weight gradient is always fp32 (gemm_f32) from fp32 activations.
#pragma once
#include <cstdint>
#include <cstring>

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "llama.h"

namespace bts {
namespace engine {
namespace detail {

constexpr int64_t kEltGrain = 1 << 15;  // floats per thread chunk for element-wise loops

// y [M, out] (= or +=, by beta) x [M, in] W^T, W [out, in]   (GEMM NT)
inline void linear_fwd(const Weight& w, const float* x, int64_t M, int64_t in, int64_t out, float* y, float beta) {
  if (w.f32) {
    GemmParams p;
    p.M = M, p.N = out, p.K = in, p.transB = true;
    p.A = x, p.lda = in, p.B = w.f32, p.ldb = in, p.C = y, p.ldc = out, p.beta = beta;
    gemm_f32(p);
  } else {
    GemmBf16Params p;
    p.M = M, p.N = out, p.K = in, p.transB = true;
    p.A = x, p.lda = in, p.B = w.b16, p.ldb = in, p.C = y, p.ldc = out, p.beta = beta;
    gemm_bf16(p);
  }
}

// dx [M, in] (= or +=, by beta) dy [M, out] W [out, in]   (GEMM NN)
inline void linear_dx(const Weight& w, const float* dy, int64_t M, int64_t in, int64_t out, float* dx, float beta) {
  if (w.f32) {
    GemmParams p;
    p.M = M, p.N = in, p.K = out;
    p.A = dy, p.lda = out, p.B = w.f32, p.ldb = in, p.C = dx, p.ldc = in, p.beta = beta;
    gemm_f32(p);
  } else {
    GemmBf16Params p;
    p.M = M, p.N = in, p.K = out, p.transB = false;
    p.A = dy, p.lda = out, p.B = w.b16, p.ldb = in, p.C = dx, p.ldc = in, p.beta = beta;
    gemm_bf16(p);
  }
}

// dW [out, in] += dy^T [out, M] x [M, in]   (GEMM TN, accumulated). Skipped when dw is null.
inline void linear_dw(float* dw, const float* dy, const float* x, int64_t M, int64_t in, int64_t out) {
  if (!dw) return;
  GemmParams p;
  p.M = out, p.N = in, p.K = M, p.transA = true;
  p.A = dy, p.lda = out, p.B = x, p.ldb = in, p.C = dw, p.ldc = in, p.beta = 1.f;
  gemm_f32(p);
}

inline void copy(float* dst, const float* src, int64_t n) {
  if (dst == src) return;
  parallel_for(n, kEltGrain, [&](int64_t i0, int64_t i1, int) { std::memcpy(dst + i0, src + i0, size_t(i1 - i0) * sizeof(float)); });
}

// out = a + b (out may alias a or b)
inline void add(float* out, const float* a, const float* b, int64_t n) {
  parallel_for(n, kEltGrain, [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; i++) out[i] = a[i] + b[i];
  });
}

inline void rmsnorm(const float* x, const float* w, int64_t N, int64_t D, float eps, float* y, float* rstd) {
  RmsNormParams p;
  p.N = N, p.D = D, p.eps = eps, p.x = x, p.w = w, p.y = y, p.rstd = rstd;
  rmsnorm_forward(p);
}

inline void rmsnorm_bwd(const float* x, const float* w, const float* rstd, int64_t N, int64_t D, float* dy_dx, float* dw) {
  RmsNormBackwardParams p;
  p.N = N, p.D = D, p.x = x, p.w = w, p.rstd = rstd, p.dy = dy_dx, p.dx = dy_dx, p.dw = dw;
  rmsnorm_backward(p);
}

// In-place RoPE of x [N, nh, Dh] at positions pos [N]; inverse rotates back (the backward).
inline void rope(float* x, int64_t N, int64_t nh, int64_t Dh, const int32_t* pos, const float* table, int64_t P,
          bool inverse) {
  RopeParams p;
  p.N = N, p.nh = nh, p.Dh = Dh, p.P = P, p.inverse = inverse;
  p.pos = pos, p.table = table, p.x = x, p.out = x;
  rope_forward(p);
}

inline void swiglu(const float* gate, const float* up, int64_t N, int64_t F, float* h) {
  SwigluParams p;
  p.N = N, p.F = F, p.gate = gate, p.up = up, p.h = h;
  swiglu_forward(p);
}

}  // namespace detail
}  // namespace engine
}  // namespace bts
