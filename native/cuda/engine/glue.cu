// cuda/engine/glue.cu: the element-wise glue of the CUDA Llama engine that is not an op of bts/ops.h:
// the residual add of the block backward (dh = dx_out + dm, dx_in = dh + da), and the engines'
// device optimizer state (DeviceAdamW: moments and one cuda::adamw_step). Copies are
// cudaMemcpyAsync and zeroing cudaMemsetAsync in the engine itself; everything else goes through the
// op entries of bts_cuda.h.
//
// Three layers as the op files (STYLE.md): kernel, launcher with a stream, entry that checks the
// params. Grid-stride loop, 256 threads, memory bound. Legend: n elements.
#include "../common.cuh"
#include "llama_cuda.h"

namespace bts {
namespace cuda {
namespace {

__global__ void add_f32_kernel(int64_t n, const float* a /* [n] */, const float* b /* [n] */, float* out /* [n] */) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = a[i], y = b[i];
    out[i] = x + y;
  }
}

}  // namespace

void launch_add_f32(const AddParams& p, cudaStream_t s) {
  BTS_LAUNCH(add_f32_kernel, detail::grid_for(p.n, 256, 8192), 256, 0, s, p.n, p.a, p.b, p.out);
}

void add_f32(const AddParams& p, cudaStream_t stream) {
  const char* op = "add_f32";
  detail::need(p.n >= 0, op, "n must be >= 0");
  if (p.n == 0) return;
  detail::need_ptr(p.a, op, "a");
  detail::need_ptr(p.b, op, "b");
  detail::need_ptr(p.out, op, "out");
  launch_add_f32(p, stream);
}

namespace engine {

void DeviceAdamW::ensure(int64_t n, cudaStream_t s) {
  if (n_ > 0 || n == 0) return;
  float* m = m_.floats(n, "adamwStep (first moments)");
  float* v = v_.floats(n, "adamwStep (second moments)");
  BTS_CUDA_CHECK(cudaMemsetAsync(m, 0, size_t(n) * sizeof(float), s));
  BTS_CUDA_CHECK(cudaMemsetAsync(v, 0, size_t(n) * sizeof(float), s));
  n_ = n;
}

float DeviceAdamW::step(float* p, const float* g, int64_t n_decay, const AdamWHyper& h, DeviceBuffer& scratch, cudaStream_t s) {
  float* norm = static_cast<float*>(scratch.grow(2 * sizeof(double), "adamwStep"));
  bts::AdamWParams a;
  a.n = n_;
  a.n_decay = n_decay;
  a.p = p;
  a.g = g;
  a.m = static_cast<float*>(m_.get());
  a.v = static_cast<float*>(v_.get());
  a.lr = h.lr, a.beta1 = h.beta1, a.beta2 = h.beta2, a.eps = h.eps, a.weight_decay = h.weight_decay;
  a.step = h.step;
  a.max_grad_norm = h.max_grad_norm;
  a.grad_norm = norm;
  adamw_step(a, s);  // checks the hyper-parameters (E_ARGUMENT) before launching
  float out = 0.f;
  BTS_CUDA_CHECK(cudaMemcpyAsync(&out, norm, sizeof(float), cudaMemcpyDeviceToHost, s));
  BTS_CUDA_CHECK(cudaStreamSynchronize(s));
  return out;
}

void DeviceAdamW::copy(int which, int64_t off, int64_t count, float* host, bool upload, cudaStream_t s) {
  float* d = static_cast<float*>((which == 0 ? m_ : v_).get()) + off;
  const size_t bytes = size_t(count) * sizeof(float);
  if (upload) BTS_CUDA_CHECK(cudaMemcpyAsync(d, host, bytes, cudaMemcpyHostToDevice, s));
  else BTS_CUDA_CHECK(cudaMemcpyAsync(host, d, bytes, cudaMemcpyDeviceToHost, s));
}

}  // namespace engine
}  // namespace cuda
}  // namespace bts
