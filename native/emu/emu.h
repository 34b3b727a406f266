// emu.h: a small SIMT emulator so that the CUDA kernels of native/cuda/*.cu compile as plain C++ (g++)
// and run on the CPU, with the SAME source text. See docs/CUDA.md ("The SIMT emulator").
//
// Why: this machine (and CI) has nvcc but no GPU. Running the real kernel sources on the CPU checks
// their indexing, bounds, tiling, barriers and reductions against the CPU references, and catches a
// missing __syncthreads with a shared-memory race detector, before a GPU is ever available.
//
// How: every block of a launch runs on the calling OS thread; the threads of a block are cooperative
// user-level fibers (a hand-written x86-64 context switch, ucontext elsewhere). A fiber runs until it
// reaches a block barrier (__syncthreads) or a warp collective (__shfl*_sync, __syncwarp, WMMA), then
// control goes to the next runnable fiber. Blocks run one after another, in blockIdx order.
//
// What kernel sources must do (native/cuda/common.cuh hides the difference under nvcc):
//   - launch through BTS_LAUNCH(kernel, grid, block, shmem, stream, args...)  (not <<<>>>);
//   - declare shared arrays with BTS_SHARED(T, name, count) and dynamic shared memory with
//     BTS_DYNAMIC_SHARED(T, name): under the emulator `name` is an SPtr<T>, a checked pointer whose
//     element accesses feed the race detector; pointers into shared memory are `auto` or BTS_SPTR(T);
//   - read shared elements into explicitly typed variables (`float v = tile[i];`, not `auto v = ...`).
// Limits: one emulated launch at a time per process (a mutex serialises them); no streams concurrency
// (every call is synchronous); warp collectives require every existing lane of the warp (full mask);
// global memory is not race-checked; timing, memory ordering and bank conflicts are not modelled.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

// ---------------------------------------------------------------------------------------------------
// Qualifiers.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// A plain `__shared__` scalar becomes a function-level static: shared by every fiber (blocks run one
// at a time), NOT race-checked. Arrays must use BTS_SHARED.
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables: set by the scheduler before it resumes a fiber.
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------------
// Runtime API stand-ins (host memory is device memory; every call is synchronous). Allocations are
// registered: a host pointer where device memory is expected is an error (see emu.cc), and fresh
// allocations hold 0xff bytes (NaN) like uninitialised GPU memory.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaMalloc(void** p, size_t bytes);
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t);
template <class T>
inline cudaError_t cudaMallocAsync(T** p, size_t bytes, cudaStream_t s) {
  return cudaMallocAsync(reinterpret_cast<void**>(p), bytes, s);
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t);
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaDeviceSynchronize();

namespace bts_emu {
void set_func_attribute(const void* fn, int attr, int value);
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  bts_emu::set_func_attribute(reinterpret_cast<const void*>(fn), int(attr), value);
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------
// Math intrinsics: the fast variants map to the accurate libm functions (see docs/CUDA.md).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// bf16 as in cuda_bf16.h (storage only; arithmetic through float).
struct __nv_bfloat16 {
  unsigned short __x;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = uint32_t(h.__x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(unsigned short)(u >> 16)};
}

// ---------------------------------------------------------------------------------------------------
// Scheduler hooks and warp collectives.
namespace bts_emu {

// Block barrier. Every thread of the block must arrive (an exited thread makes the others deadlock,
// which is reported as barrier divergence).
void syncthreads();
// Warp collective: publishes `value` from this lane, waits for every existing lane of the warp and
// returns the 32 published values (index = lane). `what` names the collective for error messages.
const uint64_t* warp_exchange(uint64_t value, const char* what);
int lane_id();
int linear_tid();
int warp_lanes();  // number of existing lanes in this thread's warp
[[noreturn]] void fail(const std::string& msg);  // aborts the launch with an error from inside a kernel
uint64_t block_serial();  // changes for every block executed
uint64_t epoch();         // barrier interval number, unique per process
void note_shared_bytes(size_t bytes);  // static shared usage (per-block limit check)
const char* kernel_name();
void check_full_mask(unsigned mask, const char* what);

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace bts_emu

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  bts_emu::check_full_mask(mask, "__shfl_sync");
  const uint64_t* all = bts_emu::warp_exchange(bts_emu::to_bits(v), "__shfl_sync");
  const int lane = bts_emu::lane_id();
  const int s = (lane / width) * width + (src % width);
  if (s >= bts_emu::warp_lanes()) return v;  // undefined on a GPU; keep own value
  return bts_emu::from_bits<T>(all[s]);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  bts_emu::check_full_mask(mask, "__shfl_xor_sync");
  const uint64_t* all = bts_emu::warp_exchange(bts_emu::to_bits(v), "__shfl_xor_sync");
  const int lane = bts_emu::lane_id();
  const int s = lane ^ lane_mask;
  if (s >= bts_emu::warp_lanes() || (s / width) != (lane / width)) return v;
  return bts_emu::from_bits<T>(all[s]);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  bts_emu::check_full_mask(mask, "__shfl_down_sync");
  const uint64_t* all = bts_emu::warp_exchange(bts_emu::to_bits(v), "__shfl_down_sync");
  const int lane = bts_emu::lane_id();
  const int s = lane + int(delta);
  if (s >= bts_emu::warp_lanes() || (s / width) != (lane / width)) return v;
  return bts_emu::from_bits<T>(all[s]);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  bts_emu::check_full_mask(mask, "__shfl_up_sync");
  const uint64_t* all = bts_emu::warp_exchange(bts_emu::to_bits(v), "__shfl_up_sync");
  const int lane = bts_emu::lane_id();
  const int s = lane - int(delta);
  if (s < 0 || (s / width) != (lane / width)) return v;
  return bts_emu::from_bits<T>(all[s]);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  bts_emu::check_full_mask(mask, "__ballot_sync");
  const uint64_t* all = bts_emu::warp_exchange(pred ? 1 : 0, "__ballot_sync");
  unsigned r = 0;
  for (int l = 0; l < bts_emu::warp_lanes(); l++) r |= unsigned(all[l] & 1) << l;
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  const int n = bts_emu::warp_lanes();
  return __ballot_sync(mask, pred) == (n == 32 ? 0xffffffffu : ((1u << n) - 1));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  bts_emu::check_full_mask(mask, "__syncwarp");
  bts_emu::warp_exchange(0, "__syncwarp");
}
inline void __syncthreads() { bts_emu::syncthreads(); }

// Atomics: fibers switch only at barriers, so a plain read-modify-write is atomic here.
template <class T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
inline int atomicMin(int* p, int v) {
  int old = *p;
  if (v < old) *p = v;
  return old;
}
inline int atomicMax(int* p, int v) {
  int old = *p;
  if (v > old) *p = v;
  return old;
}
inline int atomicCAS(int* p, int cmp, int v) {
  int old = *p;
  if (old == cmp) *p = v;
  return old;
}
inline int atomicExch(int* p, int v) {
  int old = *p;
  *p = v;
  return old;
}

// ---------------------------------------------------------------------------------------------------
// Checked shared memory. A region is one __shared__ array (static storage: blocks run one at a time);
// its contents are reset to a NaN/0xff pattern at the start of every block, like uninitialised GPU
// shared memory. Each element carries a shadow: the last writer thread and its barrier interval, and
// the reader(s) of the current interval. A read of an element written by another thread in the same
// interval (RAW), a write of one written (WAW) or read (WAR) by another thread in the same interval is
// a race: the launch fails with the kernel, block, array, index and both threads.
namespace bts_emu {

struct Shadow {
  int32_t writer = -1;
  int32_t reader = -1;  // -2: several readers
  uint64_t wepoch = 0, repoch = 0;
};

struct Region {
  const char* name = "";
  char* data = nullptr;
  Shadow* shadow = nullptr;
  size_t elem = 1, count = 0;
  uint64_t serial = 0;
  void touch() {
    if (serial != block_serial()) reset();
  }
  void reset();
  [[noreturn]] void race(size_t i, const char* kind, int other) const;
  void on_read(size_t i) {
    touch();
    if (i >= count) oob(i);
    Shadow& s = shadow[i];
    const int t = linear_tid();
    const uint64_t e = epoch();
    if (s.writer >= 0 && s.writer != t && s.wepoch == e) race(i, "read-after-write", s.writer);
    if (s.repoch != e) {
      s.repoch = e;
      s.reader = t;
    } else if (s.reader != t) {
      s.reader = -2;
    }
  }
  void on_write(size_t i) {
    touch();
    if (i >= count) oob(i);
    Shadow& s = shadow[i];
    const int t = linear_tid();
    const uint64_t e = epoch();
    if (s.writer >= 0 && s.writer != t && s.wepoch == e) race(i, "write-after-write", s.writer);
    if (s.repoch == e && s.reader != t) race(i, "write-after-read", s.reader);
    s.writer = t;
    s.wepoch = e;
  }
  [[noreturn]] void oob(size_t i) const;
};

template <class T>
struct SRef {
  Region* r;
  size_t i;
  T* p() const { return reinterpret_cast<T*>(r->data) + i; }
  operator T() const {
    r->on_read(i);
    return *p();
  }
  T get() const { return T(*this); }
  const SRef& operator=(const T& v) const {
    r->on_write(i);
    *p() = v;
    return *this;
  }
  const SRef& operator=(const SRef& o) const { return *this = T(o); }
  const SRef& operator+=(const T& v) const { return *this = T(*this) + v; }
  const SRef& operator-=(const T& v) const { return *this = T(*this) - v; }
  const SRef& operator*=(const T& v) const { return *this = T(*this) * v; }
  const SRef& operator/=(const T& v) const { return *this = T(*this) / v; }
};

template <class T>
struct SPtr {
  Region* r = nullptr;
  ptrdiff_t i = 0;  // element offset into the region (may be transiently outside)
  SRef<T> operator[](ptrdiff_t k) const { return SRef<T>{r, size_t(i + k)}; }
  SRef<T> operator*() const { return SRef<T>{r, size_t(i)}; }
  SPtr operator+(ptrdiff_t k) const { return SPtr{r, i + k}; }
  SPtr operator-(ptrdiff_t k) const { return SPtr{r, i - k}; }
  SPtr& operator+=(ptrdiff_t k) {
    i += k;
    return *this;
  }
  ptrdiff_t operator-(const SPtr& o) const { return i - o.i; }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(r->data) + uintptr_t(i) * sizeof(T); }
};

// One static __shared__ array. Storage is 128-byte aligned (the GPU guarantees at least 16; our
// sources ask for 32 where WMMA needs it).
template <class T, size_t N>
struct SharedArray {
  alignas(128) T data[N];
  Shadow shadow[N];
  Region region;
  SharedArray(const char* name) {
    region.name = name;
    region.data = reinterpret_cast<char*>(data);
    region.shadow = shadow;
    region.elem = sizeof(T);
    region.count = N;
  }
  SPtr<T> ptr() {
    note_once();
    return SPtr<T>{&region, 0};
  }
  uint64_t noted_block = 0;
  void note_once() {
    if (noted_block != block_serial()) {
      noted_block = block_serial();
      note_shared_bytes(sizeof(T) * N);
    }
  }
};

// Dynamic shared memory of the current block, viewed as T (one type per kernel).
Region* dynamic_region(size_t elem_size, const char* name);
template <class T>
inline SPtr<T> dynamic_shared(const char* name) {
  return SPtr<T>{dynamic_region(sizeof(T), name), 0};
}

// Launch: runs body() once per thread of every block. Throws bts_emu::LaunchError (a
// std::runtime_error whose message names the kernel) on a race, divergence, deadlock or bad config.
void launch(const char* name, const void* fn, dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
            const std::function<void()>& body);

// Device memory provenance (emu.cc): true when [p, p + bytes) lies inside one cudaMalloc allocation.
bool is_device_pointer(const void* p, size_t bytes = 0);
[[noreturn]] void host_pointer_argument(const char* kernel, int index);

// Every pointer argument of a launch must be null or point into device memory (as on a GPU, where a
// host pointer faults). Non-pointer arguments are not checked.
template <class T>
inline void check_kernel_arg(const char*, int, const T&) {}
template <class T>
inline void check_kernel_arg(const char* kernel, int index, T* p) {
  if (p && !is_device_pointer(p)) host_pointer_argument(kernel, index);
}

// BTS_LAUNCH's emulator form: the arguments are evaluated once, like a real launch's.
template <class... P, class... A>
inline void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t shmem,
                          cudaStream_t stream, A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  int index = 0;
  (check_kernel_arg(name, index++, P(args)), ...);
  launch(name, reinterpret_cast<const void*>(kernel), grid, block, shmem, stream, [&]() { kernel(P(args)...); });
}

}  // namespace bts_emu

#define BTS_EMU_CAT2(a, b) a##b
#define BTS_EMU_CAT(a, b) BTS_EMU_CAT2(a, b)

// ---------------------------------------------------------------------------------------------------
// WMMA (nvcuda::wmma) for bf16 x bf16 -> fp32 at m16n16k16, plus fp32 accumulator load/store.
// Element layout of a fragment (opaque on a GPU, defined here): lane l holds elements l*8 .. l*8+7 of
// the 16x16 tile in row-major order (row = idx / 16, col = idx % 16). Collectives synchronise the warp;
// mma_sync reads the other lanes' fragments through the warp exchange. Pointers must be 32-byte
// aligned and ldm a multiple of 8 (bf16) / 4 (float), as on the GPU.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulated WMMA supports m16n16k16 only");
  static constexpr int num_elements = 8;
  T x[8];
};

namespace detail {
void check_ptr(uintptr_t addr, unsigned ldm, size_t elem, const char* what);
inline uintptr_t addr_of(const void* p) { return reinterpret_cast<uintptr_t>(p); }
template <class T>
inline uintptr_t addr_of(const bts_emu::SPtr<T>& p) {
  return p.address();
}
template <class T>
inline T read_at(const T* p, size_t i) {
  return p[i];
}
template <class T>
inline T read_at(const bts_emu::SPtr<T>& p, size_t i) {
  return T(p[ptrdiff_t(i)]);
}
template <class T>
inline T read_at(const bts_emu::SPtr<const T>& p, size_t i) {
  return T(p[ptrdiff_t(i)]);
}
template <class T>
inline void write_at(T* p, size_t i, T v) {
  p[i] = v;
}
template <class T>
inline void write_at(const bts_emu::SPtr<T>& p, size_t i, T v) {
  p[ptrdiff_t(i)] = v;
}
inline float to_f(float v) { return v; }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
}  // namespace detail

template <class Use, class T, class Layout, class P>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const P& ptr, unsigned ldm) {
  detail::check_ptr(detail::addr_of(ptr), ldm, sizeof(T), "load_matrix_sync");
  bts_emu::warp_exchange(0, "wmma::load_matrix_sync");
  const int lane = bts_emu::lane_id();
  for (int e = 0; e < 8; e++) {
    const int idx = lane * 8 + e, r = idx / 16, c = idx % 16;
    const bool rowm = std::is_same<Layout, row_major>::value;
    f.x[e] = detail::read_at(ptr, rowm ? size_t(r) * ldm + c : size_t(c) * ldm + r);
  }
}
template <class P>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const P& ptr, unsigned ldm,
                             layout_t layout) {
  detail::check_ptr(detail::addr_of(ptr), ldm, 4, "load_matrix_sync");
  bts_emu::warp_exchange(0, "wmma::load_matrix_sync");
  const int lane = bts_emu::lane_id();
  for (int e = 0; e < 8; e++) {
    const int idx = lane * 8 + e, r = idx / 16, c = idx % 16;
    f.x[e] = detail::read_at(ptr, layout == mem_row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r);
  }
}
template <class P>
inline void store_matrix_sync(const P& ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_ptr(detail::addr_of(ptr), ldm, 4, "store_matrix_sync");
  bts_emu::warp_exchange(0, "wmma::store_matrix_sync");
  const int lane = bts_emu::lane_id();
  for (int e = 0; e < 8; e++) {
    const int idx = lane * 8 + e, r = idx / 16, c = idx % 16;
    detail::write_at(ptr, layout == mem_row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r, f.x[e]);
  }
}
template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
  for (int e = 0; e < 8; e++) f.x[e] = v;
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (int e = 0; e < 8; e++) f.x[e] = v;
}

// d = a b + c (fp32 accumulation in k order; a tensor core may sum in another order).
template <class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  if (bts_emu::warp_lanes() != 32) bts_emu::fail("wmma::mma_sync needs a full warp of 32 lanes");
  const uint64_t* pa = bts_emu::warp_exchange(bts_emu::to_bits(&a), "wmma::mma_sync");
  uintptr_t A[32];
  for (int l = 0; l < 32; l++) A[l] = uintptr_t(pa[l]);
  const uint64_t* pb = bts_emu::warp_exchange(bts_emu::to_bits(&b), "wmma::mma_sync");
  uintptr_t Bp[32];
  for (int l = 0; l < 32; l++) Bp[l] = uintptr_t(pb[l]);
  auto fa = [&](int r, int k) {  // element (r, k) of the warp's A tile
    const int idx = r * 16 + k;
    return detail::to_f(reinterpret_cast<const fragment<matrix_a, 16, 16, 16, TA, LA>*>(A[idx / 8])->x[idx % 8]);
  };
  auto fb = [&](int k, int n) {
    const int idx = k * 16 + n;
    return detail::to_f(reinterpret_cast<const fragment<matrix_b, 16, 16, 16, TB, LB>*>(Bp[idx / 8])->x[idx % 8]);
  };
  const int lane = bts_emu::lane_id();
  float out[8];
  for (int e = 0; e < 8; e++) {
    const int idx = lane * 8 + e, r = idx / 16, n = idx % 16;
    float acc = c.x[e];
    for (int k = 0; k < 16; k++) acc += fa(r, k) * fb(k, n);
    out[e] = acc;
  }
  bts_emu::warp_exchange(0, "wmma::mma_sync");  // nobody overwrites a fragment still being read
  for (int e = 0; e < 8; e++) d.x[e] = out[e];
}
}  // namespace wmma
}  // namespace nvcuda
