// cuda/rmsnorm.cu: RMSNorm forward and backward on the GPU (semantics: RmsNormParams in bts/ops.h).
//
// Forward / dx: one block per row; the block strides over D with coalesced loads, sums x^2 (or
// dy*w*x) per thread, reduces with warp shuffles then across warps through shared memory (fixed
// order: deterministic), then writes the row. y may alias x and dx may alias dy: every element is read
// before the block barrier of the reduction and written after it by the same thread.
// dw: a separate kernel, a [32 columns x 8 row-lanes] block per 32 columns; each row-lane walks its
// rows in order and the 8 partials are added in order (no atomics, deterministic). Known limit: the
// dw kernel's parallelism is D/32 blocks; for very tall N a split-N two-pass reduction would be faster.
// Legend: N rows, D width.
#include "common.cuh"

namespace bts {
namespace cuda {
namespace {

int row_threads(int64_t D) {  // a multiple of 32, at most 256, no more than the row needs
  int64_t t = (D + 31) / 32 * 32;
  return int(t < 256 ? t : 256);
}

__global__ void rmsnorm_forward_kernel(int64_t D, float eps, const float* x /* [N, D] */, const float* w /* [D] */,
                                       float* y /* [N, D] */, float* rstd /* [N] or null */) {
  BTS_SHARED(float, red, 33);
  const int64_t n = blockIdx.x;
  const float* xr = x + n * D;
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ss += xr[d] * xr[d];
  ss = bts_block_sum(ss, red);
  const float r = rsqrtf(ss / float(D) + eps);
  float* yr = y + n * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) yr[d] = xr[d] * r * w[d];
  if (rstd && threadIdx.x == 0) rstd[n] = r;
}

__global__ void rmsnorm_backward_dx_kernel(int64_t D, const float* x /* [N, D] */, const float* w /* [D] */,
                                           const float* rstd /* [N] */, const float* dy /* [N, D] */,
                                           float* dx /* [N, D] */) {
  BTS_SHARED(float, red, 33);
  const int64_t n = blockIdx.x;
  const float* xr = x + n * D;
  const float* dyr = dy + n * D;
  float dot = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dot += dyr[d] * w[d] * xr[d];
  dot = bts_block_sum(dot, red);
  const float r = rstd[n];
  const float c = dot * r * r * r / float(D);
  float* dxr = dx + n * D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dxr[d] = r * dyr[d] * w[d] - c * xr[d];
}

// blockDim (32, 8); grid ceil(D / 32).
__global__ void rmsnorm_backward_dw_kernel(int64_t N, int64_t D, const float* x /* [N, D] */,
                                           const float* rstd /* [N] */, const float* dy /* [N, D] */,
                                           float* dw /* [D] accumulated */) {
  BTS_SHARED(float, part, 8 * 33);
  const int64_t d = int64_t(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (d < D)
    for (int64_t n = threadIdx.y; n < N; n += 8) acc += dy[n * D + d] * x[n * D + d] * rstd[n];
  part[threadIdx.y * 33 + threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float s = 0.f;
    for (int k = 0; k < 8; k++) s += part[k * 33 + threadIdx.x];
    dw[d] += s;
  }
}

}  // namespace

void launch_rmsnorm_forward(const RmsNormParams& p, cudaStream_t s) {
  BTS_LAUNCH(rmsnorm_forward_kernel, dim3(unsigned(p.N)), dim3(row_threads(p.D)), 0, s, p.D, p.eps, p.x, p.w, p.y,
             p.rstd);
}

void launch_rmsnorm_backward(const RmsNormBackwardParams& p, cudaStream_t s) {
  // dw first: dx may alias dy.
  if (p.dw)
    BTS_LAUNCH(rmsnorm_backward_dw_kernel, dim3(unsigned(detail::ceil_div(p.D, 32))), dim3(32, 8), 0, s, p.N, p.D,
               p.x, p.rstd, p.dy, p.dw);
  BTS_LAUNCH(rmsnorm_backward_dx_kernel, dim3(unsigned(p.N)), dim3(row_threads(p.D)), 0, s, p.D, p.x, p.w, p.rstd,
             p.dy, p.dx);
}

void rmsnorm_forward(const RmsNormParams& p, cudaStream_t stream) {
  const char* op = "rmsnorm_forward";
  detail::need(p.N >= 0 && p.D > 0, op, "N >= 0 and D > 0 required");
  detail::need(p.N <= 0x7fffffff, op, "N must be < 2^31 (one block per row)");
  detail::need(p.eps >= 0, op, "eps must be >= 0");
  if (p.N == 0) return;
  detail::need_ptr(p.x, op, "x");
  detail::need_ptr(p.w, op, "w");
  detail::need_ptr(p.y, op, "y");
  launch_rmsnorm_forward(p, stream);
}

void rmsnorm_backward(const RmsNormBackwardParams& p, cudaStream_t stream) {
  const char* op = "rmsnorm_backward";
  detail::need(p.N >= 0 && p.D > 0, op, "N >= 0 and D > 0 required");
  detail::need(p.N <= 0x7fffffff, op, "N must be < 2^31 (one block per row)");
  if (p.N == 0) return;
  detail::need_ptr(p.x, op, "x");
  detail::need_ptr(p.w, op, "w");
  detail::need_ptr(p.rstd, op, "rstd");
  detail::need_ptr(p.dy, op, "dy");
  detail::need_ptr(p.dx, op, "dx");
  launch_rmsnorm_backward(p, stream);
}

}  // namespace cuda
}  // namespace bts
