// common.cuh: what every native/cuda/<op>.cu shares: the nvcc / emulator switch, launch and shared-
// memory macros, the CUDA error check, argument checks and warp/block reductions.
//
// The same kernel text compiles two ways (docs/CUDA.md):
//   nvcc      -> real kernels; BTS_LAUNCH is `kernel<<<grid, block, shmem, stream>>>(args...)`.
//   g++       -> BTS_CUDA_EMULATOR is defined; native/emu/emu.h supplies the CUDA surface and
//                BTS_LAUNCH runs the kernel on the CPU with threads as fibers and checked shared memory.
// Three layers per op (STYLE.md): a static __global__ kernel, a launcher taking a cudaStream_t, and the
// op entry bts::cuda::<name>(const Params&, cudaStream_t) that checks shapes and calls the launcher.
// Legend as in bts/common.h.
#pragma once
#include <cstdint>
#include <string>

#include "bts/common.h"
#include "bts/ops.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#else
#ifndef BTS_CUDA_EMULATOR
#define BTS_CUDA_EMULATOR 1
#endif
#include "../emu/emu.h"
#endif

#include "bts_cuda.h"

// ---------------------------------------------------------------------------------------------------
// Launch and shared memory.
#if defined(__CUDACC__)
#define BTS_LAUNCH(kernel, grid, block, shmem, stream, ...)        \
  do {                                                             \
    kernel<<<(grid), (block), (shmem), (stream)>>>(__VA_ARGS__);   \
    BTS_CUDA_CHECK(cudaGetLastError());                            \
  } while (0)
#define BTS_SHARED(T, name, count) __shared__ __align__(32) T name[count]
#define BTS_DYNAMIC_SHARED(T, name)                   \
  extern __shared__ __align__(32) unsigned char bts_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(bts_dynamic_smem_)
#define BTS_SPTR(T) T*
#else
#define BTS_LAUNCH(kernel, grid, block, shmem, stream, ...)                                                \
  do {                                                                                                   \
    try {                                                                                                \
      ::bts_emu::launch_kernel(#kernel, kernel, dim3(grid), dim3(block), (shmem), (stream), __VA_ARGS__); \
    } catch (const std::exception& bts_e_) {                                                             \
      throw ::bts::Error("E_CUDA", std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " + bts_e_.what()); \
    }                                                                                                    \
  } while (0)
#define BTS_SHARED(T, name, count)                                                         \
  static ::bts_emu::SharedArray<T, size_t(count)> BTS_EMU_CAT(name, _storage_)(#name); \
  const ::bts_emu::SPtr<T> name = BTS_EMU_CAT(name, _storage_).ptr()
#define BTS_DYNAMIC_SHARED(T, name) const ::bts_emu::SPtr<T> name = ::bts_emu::dynamic_shared<T>(#name)
#define BTS_SPTR(T) ::bts_emu::SPtr<T>
#endif

// Every CUDA runtime call: BTS_CUDA_CHECK throws bts::Error("E_CUDA", "file:line: call: message").
#include "cuda_check.h"

namespace bts {
namespace cuda {
namespace detail {



inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for grid-stride elementwise kernels (enough blocks to fill a large GPU, capped).
inline unsigned grid_for(int64_t n, int threads, int64_t cap = 65535) {
  int64_t b = ceil_div(n, threads);
  if (b < 1) b = 1;
  return unsigned(b < cap ? b : cap);
}

[[noreturn]] inline void arg_error(const char* op, const std::string& msg) {
  throw Error("E_ARGUMENT", std::string("cuda::") + op + ": " + msg);
}
[[noreturn]] inline void shape_error(const char* op, const std::string& msg) {
  throw Error("E_SHAPE", std::string("cuda::") + op + ": " + msg);
}
inline void need(bool ok, const char* op, const char* what) {
  if (!ok) arg_error(op, what);
}
inline void need_ptr(const void* p, const char* op, const char* name) {
  if (!p) arg_error(op, std::string(name) + " must not be null");
}

// Device scratch memory, stream ordered (freed when the op's work on the stream completes).
struct Scratch {
  void* p = nullptr;
  cudaStream_t s;
  Scratch(size_t bytes, cudaStream_t stream) : s(stream) {
    if (bytes) BTS_CUDA_CHECK(cudaMallocAsync(&p, bytes, stream));
  }
  ~Scratch() {
    if (p) cudaFreeAsync(p, s);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// Reads a device int after the stream finished: used by the ops that must report bad token ids
// (E_TOKEN_RANGE) like their CPU versions. A synchronisation point; see docs/CUDA.md.
inline int read_device_int(const int* d, cudaStream_t s) {
  int h = 0;
  BTS_CUDA_CHECK(cudaMemcpyAsync(&h, d, sizeof(int), cudaMemcpyDeviceToHost, s));
  BTS_CUDA_CHECK(cudaStreamSynchronize(s));
  return h;
}

}  // namespace detail

constexpr unsigned kFullMask = 0xffffffffu;  // all 32 lanes

// ---------------------------------------------------------------------------------------------------
// Device helpers. Reductions are in a fixed order (butterfly within the warp, warps in index order),
// so results are deterministic run to run.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float sigmoidf_(float z) { return 1.f / (1.f + expf(-z)); }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace cuda
}  // namespace bts

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024): every thread gets the total. `red` is a
// BTS_SHARED float array of >= 33 elements owned by the caller (one slot per warp + the result).
// A macro-free template so it takes both raw and checked shared pointers.
template <class SP>
__device__ __forceinline__ float bts_block_sum(float v, SP red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = bts::cuda::warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nw ? float(red[lane]) : 0.f;
    t = bts::cuda::warp_sum(t);
    if (lane == 0) red[32] = t;
  }
  __syncthreads();
  const float total = red[32];
  __syncthreads();  // `red` may be reused right after
  return total;
}
template <class SP>
__device__ __forceinline__ float bts_block_max(float v, SP red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = bts::cuda::warp_max(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nw ? float(red[lane]) : -INFINITY;
    t = bts::cuda::warp_max(t);
    if (lane == 0) red[32] = t;
  }
  __syncthreads();
  const float total = red[32];
  __syncthreads();
  return total;
}
