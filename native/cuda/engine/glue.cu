// cuda/engine/glue.cu: the element-wise glue of the CUDA Llama engine that is not an op of bts/ops.h:
// the residual add of the block backward (dh = dx_out + dm, dx_in = dh + da). Copies are
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

}  // namespace cuda
}  // namespace bts
