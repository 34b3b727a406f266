// cuda/swiglu.cu: SwiGLU forward and backward (semantics: SwigluParams in bts/ops.h).
//
// Pure elementwise, memory bound: a grid-stride loop over N*F with coalesced loads, 256 threads per
// block. expf (not __expf) so results match the reference to ~1 ulp. Legend: N rows, F ffn width.
#include "common.cuh"

namespace bts {
namespace cuda {
namespace {

__global__ void swiglu_forward_kernel(int64_t n, const float* gate /* [N, F] */, const float* up /* [N, F] */,
                                      float* h /* [N, F] */) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    h[i] = g * sigmoidf_(g) * up[i];
  }
}

// d silu(g) / dg = s (1 + g (1 - s)), s = sigmoid(g).
__global__ void swiglu_backward_kernel(int64_t n, const float* gate /* [N, F] */, const float* up /* [N, F] */,
                                       const float* dh /* [N, F] */, float* dgate /* [N, F] */,
                                       float* dup /* [N, F] */) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = gate[i], u = up[i], d = dh[i];
    const float s = sigmoidf_(g);
    dgate[i] = d * u * s * (1.f + g * (1.f - s));
    dup[i] = d * g * s;
  }
}

}  // namespace

void launch_swiglu_forward(const SwigluParams& p, cudaStream_t s) {
  const int64_t n = p.N * p.F;
  BTS_LAUNCH(swiglu_forward_kernel, detail::grid_for(n, 256, 8192), 256, 0, s, n, p.gate, p.up, p.h);
}

void launch_swiglu_backward(const SwigluBackwardParams& p, cudaStream_t s) {
  const int64_t n = p.N * p.F;
  BTS_LAUNCH(swiglu_backward_kernel, detail::grid_for(n, 256, 8192), 256, 0, s, n, p.gate, p.up, p.dh, p.dgate, p.dup);
}

void swiglu_forward(const SwigluParams& p, cudaStream_t stream) {
  const char* op = "swiglu_forward";
  detail::need(p.N >= 0 && p.F > 0, op, "N >= 0 and F > 0 required");
  if (p.N == 0) return;
  detail::need_ptr(p.gate, op, "gate");
  detail::need_ptr(p.up, op, "up");
  detail::need_ptr(p.h, op, "h");
  launch_swiglu_forward(p, stream);
}

void swiglu_backward(const SwigluBackwardParams& p, cudaStream_t stream) {
  const char* op = "swiglu_backward";
  detail::need(p.N >= 0 && p.F > 0, op, "N >= 0 and F > 0 required");
  if (p.N == 0) return;
  detail::need_ptr(p.gate, op, "gate");
  detail::need_ptr(p.up, op, "up");
  detail::need_ptr(p.dh, op, "dh");
  detail::need_ptr(p.dgate, op, "dgate");
  detail::need_ptr(p.dup, op, "dup");
  launch_swiglu_backward(p, stream);
}

}  // namespace cuda
}  // namespace bts
