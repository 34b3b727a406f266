// cuda/adamw.cu: AdamW with global gradient-norm clipping (semantics: AdamWParams in bts/ops.h).
//
// Two kernels. (1) sum of squares of grad_scale * g: a fixed grid of at most 512 blocks, each a
// grid-stride loop then a block reduction (warp shuffles, warps in order) into partials[block]. (2) the
// update: every block first re-adds the <= 512 partials in the same fixed order, in double, so all
// blocks agree on the norm bit for bit (no float atomics, no third kernel, deterministic for a given n);
// block 0 writes grad_norm. The update itself is elementwise fp32 with the bias corrections computed
// on the host in double. Legend: n parameters.
#include <cmath>

#include "common.cuh"

namespace bts {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 512;

__global__ void adamw_sumsq_kernel(int64_t n, float grad_scale, const float* g /* [n] */,
                                   float* partials /* [gridDim.x] */) {
  BTS_SHARED(float, red, 33);
  float acc = 0.f;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = grad_scale * g[i];
    acc += x * x;
  }
  acc = bts_block_sum(acc, red);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void adamw_update_kernel(int64_t n, int64_t n_decay, float* p /* [n] */, const float* g /* [n] */,
                                    float* m /* [n] */, float* v /* [n] */, float lr, float beta1, float beta2,
                                    float eps, float weight_decay, float inv_bc1, float inv_sqrt_bc2,
                                    float max_grad_norm, float grad_scale, const float* partials /* [nparts] */,
                                    int nparts, float* grad_norm /* [1] or null */) {
  __shared__ float clip_s;
  if (threadIdx.x < 32) {
    double s = 0.0;
    if (partials)
      for (int k = int(threadIdx.x); k < nparts; k += 32) s += double(partials[k]);
    s = warp_sum_d(s);
    if (threadIdx.x == 0) {
      const double norm = std::sqrt(s);
      if (grad_norm && blockIdx.x == 0) *grad_norm = float(norm);
      clip_s = (max_grad_norm > 0.f && norm > double(max_grad_norm)) ? float(double(max_grad_norm) / norm) : 1.f;
    }
  }
  __syncthreads();
  const float gs = grad_scale * clip_s;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float gi = gs * g[i];
    const float mi = beta1 * m[i] + (1.f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float w = p[i];
    const float wd = i < n_decay ? weight_decay : 0.f;
    const float upd = (mi * inv_bc1) / (sqrtf(vi) * inv_sqrt_bc2 + eps) + wd * w;
    p[i] = w - lr * upd;
  }
}

}  // namespace

void launch_adamw_step(const AdamWParams& p, float* partials, int nparts, cudaStream_t s) {
  if (partials) BTS_LAUNCH(adamw_sumsq_kernel, nparts, kThreads, 0, s, p.n, p.grad_scale, p.g, partials);
  const double bc1 = 1.0 - std::pow(double(p.beta1), double(p.step));
  const double bc2 = 1.0 - std::pow(double(p.beta2), double(p.step));
  BTS_LAUNCH(adamw_update_kernel, detail::grid_for(p.n, kThreads, 8192), kThreads, 0, s, p.n, p.n_decay, p.p, p.g, p.m,
             p.v, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, float(1.0 / bc1), float(1.0 / std::sqrt(bc2)),
             p.max_grad_norm, p.grad_scale, static_cast<const float*>(partials), nparts, p.grad_norm);
}

void adamw_step(const AdamWParams& p, cudaStream_t stream) {
  const char* op = "adamw_step";
  detail::need(p.n >= 0, op, "n must be >= 0");
  detail::need(p.n_decay >= 0 && p.n_decay <= p.n, op, "n_decay must be in [0, n]");
  detail::need(p.step >= 1, op, "step must be >= 1");
  detail::need(p.beta1 >= 0 && p.beta1 < 1 && p.beta2 >= 0 && p.beta2 < 1, op, "beta1 and beta2 must be in [0, 1)");
  detail::need(p.eps > 0 && std::isfinite(p.lr) && std::isfinite(p.weight_decay), op,
               "eps must be > 0, lr and weight_decay finite");
  if (p.n == 0) {
    if (p.grad_norm) BTS_CUDA_CHECK(cudaMemsetAsync(p.grad_norm, 0, sizeof(float), stream));
    return;
  }
  detail::need_ptr(p.p, op, "p");
  detail::need_ptr(p.g, op, "g");
  detail::need_ptr(p.m, op, "m");
  detail::need_ptr(p.v, op, "v");
  const bool need_norm = p.max_grad_norm > 0 || p.grad_norm;
  const int nparts = need_norm ? int(detail::grid_for(p.n, kThreads * 4, kMaxBlocks)) : 0;
  detail::Scratch partials(size_t(nparts) * sizeof(float), stream);
  launch_adamw_step(p, partials.as<float>(), nparts, stream);
}

}  // namespace cuda
}  // namespace bts
