// cuda/stitch.cu: the fused stitch mixes E->H and H->E, forward and backward (semantics:
// StitchEHParams / StitchHEParams in bts/ops.h, METHOD.md).
//
// Elementwise over (t, d) with a short loop over the M = n + 1 models: one thread per (t, d),
// grid-stride. The gate logits of one (t, d) are M consecutive floats, so a warp reads 32*M
// consecutive floats (coalesced through L1). The softmax over models is recomputed in the backward
// (cheap: M is small) instead of being stored. No reductions across threads: deterministic.
// Legend: N rows, D width, n experts, M = n + 1 models.
#include "common.cuh"

namespace bts {
namespace cuda {
namespace {

// Softmax over the M logits g[0..M) at stride 1: returns the max and the sum of exp(g - max).
__device__ __forceinline__ void softmax_stats(const float* g, int64_t M, float& mx, float& sum) {
  mx = g[0];
  for (int64_t m = 1; m < M; m++) mx = fmaxf(mx, g[m]);
  sum = 0.f;
  for (int64_t m = 0; m < M; m++) sum += expf(g[m] - mx);
}

__global__ void stitch_eh_forward_kernel(int64_t ND, int64_t n, const float* h0 /* [N, D] */,
                                         const float* p /* [n, N, D] */, const float* G /* [N, D*(n+1)] */,
                                         float* out /* [N, D] */) {
  const int64_t M = n + 1;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < ND; e += int64_t(gridDim.x) * blockDim.x) {
    const float* g = G + e * M;  // G[t, d*M + m] == G[(t*D + d)*M + m]
    float mx, sum;
    softmax_stats(g, M, mx, sum);
    const float inv = 1.f / sum;
    float acc = expf(g[0] - mx) * inv * h0[e];
    for (int64_t i = 1; i <= n; i++) acc += expf(g[i] - mx) * inv * p[(i - 1) * ND + e];
    out[e] = acc;
  }
}

// out = sum_m g_m x_m  =>  dx_m = g_m dout, dG_m = g_m (x_m - out) dout. x_m - out is formed as
// sum_k g_k (x_m - x_k) (the g_k sum to 1), which avoids the cancellation of x_m - out in fp32; O(M^2)
// with M small.
__global__ void stitch_eh_backward_kernel(int64_t ND, int64_t n, const float* h0 /* [N, D] */,
                                          const float* p /* [n, N, D] */, const float* G /* [N, D*(n+1)] */,
                                          const float* dout /* [N, D] */, float* dh0 /* [N, D] */,
                                          float* dp /* [n, N, D] */, float* dG /* [N, D*(n+1)] */) {
  const int64_t M = n + 1;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < ND; e += int64_t(gridDim.x) * blockDim.x) {
    const float* g = G + e * M;
    float mx, sum;
    softmax_stats(g, M, mx, sum);
    const float inv = 1.f / sum, go = dout[e];
    for (int64_t m = 0; m < M; m++) {
      const float gm = expf(g[m] - mx) * inv;
      const float xm = m == 0 ? h0[e] : p[(m - 1) * ND + e];
      float diff = 0.f;  // x_m - out
      for (int64_t k = 0; k < M; k++) {
        if (k == m) continue;
        const float xk = k == 0 ? h0[e] : p[(k - 1) * ND + e];
        diff += expf(g[k] - mx) * inv * (xm - xk);
      }
      if (m == 0) dh0[e] = gm * go;
      else dp[(m - 1) * ND + e] = gm * go;
      dG[e * M + m] = gm * diff * go;
    }
  }
}

// Over (i, t, d) = n*N*D elements; out may alias h (each element read, then written, by one thread).
__global__ void stitch_he_forward_kernel(int64_t ND, int64_t n, const float* h /* [n, N, D] */,
                                         const float* q /* [n, N, D] */, const float* G /* [N, D*(n+1)] */,
                                         float* out /* [n, N, D] */) {
  const int64_t M = n + 1, total = n * ND;
  for (int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; x < total; x += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = x / ND + 1, e = x % ND;
    const float g = sigmoidf_(G[e * M + i]);
    const float hv = h[x];
    out[x] = (1.f - g) * hv + g * q[x];
  }
}

// One thread per (t, d) so that dG[t, d*M + 0..M) is written by one thread (slot 0 = 0).
__global__ void stitch_he_backward_kernel(int64_t ND, int64_t n, const float* h /* [n, N, D] */,
                                          const float* q /* [n, N, D] */, const float* G /* [N, D*(n+1)] */,
                                          const float* dout /* [n, N, D] */, float* dh /* [n, N, D] */,
                                          float* dq /* [n, N, D] */, float* dG /* [N, D*(n+1)] */) {
  const int64_t M = n + 1;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < ND; e += int64_t(gridDim.x) * blockDim.x) {
    dG[e * M] = 0.f;
    for (int64_t i = 1; i <= n; i++) {
      const int64_t x = (i - 1) * ND + e;
      const float g = sigmoidf_(G[e * M + i]);
      const float go = dout[x], hv = h[x], qv = q[x];
      dh[x] = (1.f - g) * go;
      dq[x] = g * go;
      dG[e * M + i] = go * (qv - hv) * g * (1.f - g);
    }
  }
}

void check(const char* op, int64_t N, int64_t D, int64_t n) {
  detail::need(N >= 0 && D > 0, op, "N >= 0 and D > 0 required");
  detail::need(n >= 1, op, "n (number of experts) must be >= 1");
}

}  // namespace

void launch_stitch_eh_forward(const StitchEHParams& p, cudaStream_t s) {
  const int64_t ND = p.N * p.D;
  BTS_LAUNCH(stitch_eh_forward_kernel, detail::grid_for(ND, 256, 8192), 256, 0, s, ND, p.n, p.h0, p.p, p.G, p.out);
}
void launch_stitch_eh_backward(const StitchEHBackwardParams& p, cudaStream_t s) {
  const int64_t ND = p.N * p.D;
  BTS_LAUNCH(stitch_eh_backward_kernel, detail::grid_for(ND, 256, 8192), 256, 0, s, ND, p.n, p.h0, p.p, p.G, p.dout,
             p.dh0, p.dp, p.dG);
}
void launch_stitch_he_forward(const StitchHEParams& p, cudaStream_t s) {
  const int64_t ND = p.N * p.D;
  BTS_LAUNCH(stitch_he_forward_kernel, detail::grid_for(ND * p.n, 256, 8192), 256, 0, s, ND, p.n, p.h, p.q, p.G,
             p.out);
}
void launch_stitch_he_backward(const StitchHEBackwardParams& p, cudaStream_t s) {
  const int64_t ND = p.N * p.D;
  BTS_LAUNCH(stitch_he_backward_kernel, detail::grid_for(ND, 256, 8192), 256, 0, s, ND, p.n, p.h, p.q, p.G, p.dout,
             p.dh, p.dq, p.dG);
}

void stitch_eh_forward(const StitchEHParams& p, cudaStream_t stream) {
  const char* op = "stitch_eh_forward";
  check(op, p.N, p.D, p.n);
  if (p.N == 0) return;
  detail::need_ptr(p.h0, op, "h0");
  detail::need_ptr(p.p, op, "p");
  detail::need_ptr(p.G, op, "G");
  detail::need_ptr(p.out, op, "out");
  launch_stitch_eh_forward(p, stream);
}
void stitch_eh_backward(const StitchEHBackwardParams& p, cudaStream_t stream) {
  const char* op = "stitch_eh_backward";
  check(op, p.N, p.D, p.n);
  if (p.N == 0) return;
  detail::need_ptr(p.h0, op, "h0");
  detail::need_ptr(p.p, op, "p");
  detail::need_ptr(p.G, op, "G");
  detail::need_ptr(p.dout, op, "dout");
  detail::need_ptr(p.dh0, op, "dh0");
  detail::need_ptr(p.dp, op, "dp");
  detail::need_ptr(p.dG, op, "dG");
  launch_stitch_eh_backward(p, stream);
}
void stitch_he_forward(const StitchHEParams& p, cudaStream_t stream) {
  const char* op = "stitch_he_forward";
  check(op, p.N, p.D, p.n);
  if (p.N == 0) return;
  detail::need_ptr(p.h, op, "h");
  detail::need_ptr(p.q, op, "q");
  detail::need_ptr(p.G, op, "G");
  detail::need_ptr(p.out, op, "out");
  launch_stitch_he_forward(p, stream);
}
void stitch_he_backward(const StitchHEBackwardParams& p, cudaStream_t stream) {
  const char* op = "stitch_he_backward";
  check(op, p.N, p.D, p.n);
  if (p.N == 0) return;
  detail::need_ptr(p.h, op, "h");
  detail::need_ptr(p.q, op, "q");
  detail::need_ptr(p.G, op, "G");
  detail::need_ptr(p.dout, op, "dout");
  detail::need_ptr(p.dh, op, "dh");
  detail::need_ptr(p.dq, op, "dq");
  detail::need_ptr(p.dG, op, "dG");
  launch_stitch_he_backward(p, stream);
}

}  // namespace cuda
}  // namespace bts
