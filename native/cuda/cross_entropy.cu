// cuda/cross_entropy.cu: softmax cross-entropy fused with the LM head, chunked over the vocabulary
// (semantics: CrossEntropyParams in bts/ops.h; never an [N, V] matrix).
//
// Per vocabulary chunk of Vc rows of W: logits [N, Vc] = x W_c^T with the tiled fp32 GEMM of gemm.cu
// into a scratch buffer, then one block per row folds the chunk into running (max, sum-exp) statistics
// (block max / block sum: warp shuffles, warps in order) and picks up the target logit. After the last
// chunk: lse = m + log s, loss = lse - z_target (0 for ignored rows), and one block sums the losses in
// double in a fixed order (deterministic loss_sum and count). Backward (dx given): per chunk the logits
// are recomputed (unless there was a single chunk, whose logits are still in scratch), turned in place
// into dlogits = grad_scale (softmax - onehot) (0 on ignored rows), and two more GEMMs give
// dx (+)= dlogits W_c (overwritten on the first chunk) and dW_c += dlogits^T x.
// The chunk size keeps the scratch near 64 MiB. Targets are checked on the device first (one stream
// synchronisation) and a bad one throws E_TOKEN_RANGE like the CPU op. Legend: N rows, D width, V vocab.
#include <cmath>

#include "common.cuh"

namespace bts {
namespace cuda {

int64_t cross_entropy_vocab_chunk_for_tests = 0;

namespace {

int row_threads(int64_t n) {
  int64_t t = (n + 31) / 32 * 32;
  return int(t < 256 ? t : 256);
}

__global__ void ce_check_targets_kernel(int64_t N, int64_t V, int32_t ignore, const int32_t* targets /* [N] */,
                                        int* first_bad /* [1] */) {
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    const int32_t t = targets[n];
    if (t != ignore && (t < 0 || int64_t(t) >= V)) atomicMin(first_bad, int(n));
  }
}

// Folds logits[n, 0..vc) of the chunk starting at vocab row c0 into (m[n], s[n]); zt[n] gets the
// target's logit when it falls in the chunk. One block per row.
__global__ void ce_stats_kernel(int64_t vc, int64_t c0, bool first, const float* logits /* [N, vc] */,
                                const int32_t* targets /* [N] */, float* m /* [N] */, float* s /* [N] */,
                                float* zt /* [N] */) {
  BTS_SHARED(float, red, 33);
  const int64_t n = blockIdx.x;
  const float* z = logits + n * vc;
  float mx = -INFINITY;
  for (int64_t v = threadIdx.x; v < vc; v += blockDim.x) mx = fmaxf(mx, z[v]);
  mx = bts_block_max(mx, red);
  const float m_old = first ? -INFINITY : m[n];
  const float m_new = fmaxf(m_old, mx);
  float se = 0.f;
  for (int64_t v = threadIdx.x; v < vc; v += blockDim.x) se += expf(z[v] - m_new);
  se = bts_block_sum(se, red);
  if (threadIdx.x == 0) {
    s[n] = (first ? 0.f : s[n] * expf(m_old - m_new)) + se;
    m[n] = m_new;
    const int64_t t = targets[n];
    if (t >= c0 && t < c0 + vc) zt[n] = z[t - c0];
  }
}

__global__ void ce_finalize_kernel(int64_t N, int32_t ignore, const int32_t* targets /* [N] */,
                                   const float* m /* [N] */, const float* s /* [N] */, const float* zt /* [N] */,
                                   float* lse /* [N] */, float* losses /* [N] */) {
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    const float l = m[n] + logf(s[n]);
    lse[n] = l;
    losses[n] = targets[n] == ignore ? 0.f : l - zt[n];
  }
}

// One block: loss_sum = sum of losses (double, fixed order), count = non-ignored rows.
__global__ void ce_sum_kernel(int64_t N, int32_t ignore, const int32_t* targets /* [N] */,
                              const float* losses /* [N] */, double* loss_sum /* [1] or null */,
                              int64_t* count /* [1] or null */) {
  BTS_SHARED(double, red, 64);
  double acc = 0.0, cnt = 0.0;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x)
    if (targets[n] != ignore) {
      acc += double(losses[n]);
      cnt += 1.0;
    }
  acc = warp_sum_d(acc);
  cnt = warp_sum_d(cnt);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  if (lane == 0) {
    red[warp] = acc;
    red[32 + warp] = cnt;
  }
  __syncthreads();
  if (warp == 0) {
    double a = lane < nw ? double(red[lane]) : 0.0, c = lane < nw ? double(red[32 + lane]) : 0.0;
    a = warp_sum_d(a);
    c = warp_sum_d(c);
    if (lane == 0) {
      if (loss_sum) *loss_sum = a;
      if (count) *count = int64_t(c);
    }
  }
}

// logits -> grad_scale * (softmax - onehot) in place; zero rows for ignored targets. One block per row.
__global__ void ce_grad_kernel(int64_t vc, int64_t c0, int32_t ignore, float grad_scale,
                               const int32_t* targets /* [N] */, const float* lse /* [N] */,
                               float* logits /* [N, vc] */) {
  const int64_t n = blockIdx.x;
  const int32_t t = targets[n];
  const float l = lse[n];
  float* z = logits + n * vc;
  for (int64_t v = threadIdx.x; v < vc; v += blockDim.x) {
    if (t == ignore) {
      z[v] = 0.f;
      continue;
    }
    const float p = expf(z[v] - l);
    z[v] = grad_scale * (p - (c0 + v == int64_t(t) ? 1.f : 0.f));
  }
}

void logits_gemm(const CrossEntropyParams& p, int64_t c0, int64_t vc, float* logits, cudaStream_t s) {
  GemmParams g;  // logits [N, vc] = x [N, D] W_c^T, W_c = w[c0 .. c0+vc) [vc, D]
  g.M = p.N, g.N = vc, g.K = p.D, g.transA = false, g.transB = true;
  g.A = p.x, g.lda = p.D, g.B = p.w + c0 * p.D, g.ldb = p.D, g.C = logits, g.ldc = vc;
  gemm_f32(g, s);
}

}  // namespace

void launch_cross_entropy(const CrossEntropyParams& p, int64_t chunk, float* logits /* [N, chunk] */,
                          float* stats /* [5, N] */, cudaStream_t s) {
  const int64_t N = p.N, V = p.V;
  float *m = stats, *se = stats + N, *zt = stats + 2 * N, *lse = stats + 3 * N;
  float* losses = p.losses ? p.losses : stats + 4 * N;
  const int64_t nchunks = detail::ceil_div(V, chunk);
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t c0 = c * chunk, vc = c0 + chunk <= V ? chunk : V - c0;
    logits_gemm(p, c0, vc, logits, s);
    BTS_LAUNCH(ce_stats_kernel, dim3(unsigned(N)), row_threads(vc), 0, s, vc, c0, c == 0, static_cast<const float*>(logits),
               p.targets, m, se, zt);
  }
  BTS_LAUNCH(ce_finalize_kernel, detail::grid_for(N, 256, 4096), 256, 0, s, N, p.ignore_index, p.targets,
             static_cast<const float*>(m), static_cast<const float*>(se), static_cast<const float*>(zt), lse, losses);
  if (p.loss_sum || p.count)
    BTS_LAUNCH(ce_sum_kernel, 1, 256, 0, s, N, p.ignore_index, p.targets, static_cast<const float*>(losses), p.loss_sum,
               p.count);
  if (!p.dx) return;
  for (int64_t c = 0; c < nchunks; c++) {
    const int64_t c0 = c * chunk, vc = c0 + chunk <= V ? chunk : V - c0;
    if (nchunks > 1) logits_gemm(p, c0, vc, logits, s);
    BTS_LAUNCH(ce_grad_kernel, dim3(unsigned(N)), row_threads(vc), 0, s, vc, c0, p.ignore_index, p.grad_scale, p.targets,
               static_cast<const float*>(lse), logits);
    GemmParams g;  // dx [N, D] (+)= dlogits [N, vc] W_c [vc, D]
    g.M = N, g.N = p.D, g.K = vc, g.A = logits, g.lda = vc, g.B = p.w + c0 * p.D, g.ldb = p.D, g.C = p.dx,
    g.ldc = p.D, g.beta = c == 0 ? 0.f : 1.f;
    gemm_f32(g, s);
    if (p.dw) {
      GemmParams w;  // dW_c [vc, D] += dlogits^T [vc, N] x [N, D]
      w.M = vc, w.N = p.D, w.K = N, w.transA = true, w.A = logits, w.lda = vc, w.B = p.x, w.ldb = p.D,
      w.C = p.dw + c0 * p.D, w.ldc = p.D, w.beta = 1.f;
      gemm_f32(w, s);
    }
  }
}

void cross_entropy_forward_backward(const CrossEntropyParams& p, cudaStream_t stream) {
  const char* op = "cross_entropy_forward_backward";
  detail::need(p.N >= 0 && p.D > 0 && p.V > 0, op, "N >= 0, D > 0 and V > 0 required");
  detail::need(p.N <= 0x7fffffff && p.V <= 0x7fffffff, op, "N and V must be < 2^31");
  detail::need(p.grad_scale == p.grad_scale, op, "grad_scale must be a number");
  if (p.N == 0) {
    if (p.loss_sum) BTS_CUDA_CHECK(cudaMemsetAsync(p.loss_sum, 0, sizeof(double), stream));
    if (p.count) BTS_CUDA_CHECK(cudaMemsetAsync(p.count, 0, sizeof(int64_t), stream));
    return;
  }
  detail::need_ptr(p.x, op, "x");
  detail::need_ptr(p.w, op, "w");
  detail::need_ptr(p.targets, op, "targets");
  {
    detail::Scratch bad(sizeof(int), stream);
    BTS_CUDA_CHECK(cudaMemsetAsync(bad.p, 0x7f, sizeof(int), stream));
    BTS_LAUNCH(ce_check_targets_kernel, detail::grid_for(p.N, 256, 1024), 256, 0, stream, p.N, p.V, p.ignore_index,
               p.targets, bad.as<int>());
    const int first = detail::read_device_int(bad.as<int>(), stream);
    if (first != 0x7f7f7f7f) {
      int32_t t = 0;
      BTS_CUDA_CHECK(cudaMemcpyAsync(&t, p.targets + first, sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
      BTS_CUDA_CHECK(cudaStreamSynchronize(stream));
      throw Error("E_TOKEN_RANGE", std::string("cuda::") + op + ": argument 'targets' at position " +
                                       std::to_string(first) + " is " + std::to_string(t) + ", outside [0, V) with V = " +
                                       std::to_string(p.V) + " and not ignoreIndex = " + std::to_string(p.ignore_index));
    }
  }
  int64_t chunk = cross_entropy_vocab_chunk_for_tests;
  if (chunk <= 0) {
    chunk = (int64_t(16) << 20) / p.N;  // 16 Mi floats of logits
    chunk = chunk < 256 ? 256 : chunk / 256 * 256;
  }
  if (chunk > p.V) chunk = p.V;
  detail::Scratch logits(sizeof(float) * size_t(p.N) * size_t(chunk), stream);
  detail::Scratch stats(sizeof(float) * size_t(5 * p.N), stream);
  launch_cross_entropy(p, chunk, logits.as<float>(), stats.as<float>(), stream);
}

}  // namespace cuda
}  // namespace bts
