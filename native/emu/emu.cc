// emu.cc: the SIMT emulator's scheduler, fibers, runtime stand-ins and race reporting (see emu.h and
// docs/CUDA.md). Plain C++17; x86-64 uses a hand-written context switch (a few ns), other targets
// fall back to ucontext (a syscall per switch, slower but portable).
#include "emu.h"

#include <sys/mman.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace bts_emu {
namespace {

// ---------------------------------------------------------------------------------------------------
// Context switch.
#if defined(__x86_64__)
extern "C" void bts_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl bts_emu_switch
.type bts_emu_switch,@function
bts_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size bts_emu_switch,.-bts_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

constexpr size_t kStack = 256 * 1024;  // per fiber (kernels keep small register arrays)
constexpr size_t kGuard = 4096;

enum class Wait { None, Block, Warp };

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  int tid = 0;
  dim3 idx;
  bool done = false, blocked = false;
  Wait wait = Wait::None;
  const char* where = "";
};

struct WarpState {
  int arrived = 0, lanes = 0;
  uint64_t gen = 0;
  const char* what = nullptr;
  uint64_t slots[2][32] = {};
};

struct State {
  const char* kernel = "";
  const void* fn = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  Context main;
  int cur = -1, nthreads = 0, bar_arrived = 0;
  uint64_t serial = 0, epoch = 1;
  size_t static_shared = 0, dyn_bytes = 0;
  std::vector<char> dyn;  // dynamic shared memory of the current block
  std::vector<Shadow> dyn_shadow;
  Region dyn_region;
  std::string error;
  char* stacks = nullptr;
  size_t stacks_n = 0;
};

State g;  // one launch at a time (guarded by g_launch_mutex)
std::mutex g_launch_mutex;
std::unordered_map<const void*, int> g_max_dyn;  // cudaFuncAttributeMaxDynamicSharedMemorySize
thread_local cudaError_t g_last_error = cudaSuccess;
uint64_t g_serial = 0, g_epoch = 1;

Fiber& cur() { return g.fibers[size_t(g.cur)]; }

void switch_to_main() {
#if defined(__x86_64__)
  bts_emu_switch(&cur().ctx.sp, g.main.sp);
#else
  swapcontext(&cur().ctx.uc, &g.main.uc);
#endif
}

void fiber_entry() {
  try {
    (*g.body)();
  } catch (const std::exception& e) {
    if (g.error.empty()) g.error = std::string("exception in kernel: ") + e.what();
  } catch (...) {
    if (g.error.empty()) g.error = "unknown exception in kernel";
  }
  cur().done = true;
  switch_to_main();
  std::abort();  // never resumed
}

void fiber_init(Fiber& f) {
  char* top = f.stack + kStack;
#if defined(__x86_64__)
  uintptr_t sp = (reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15)) - 16;
  uint64_t* s = reinterpret_cast<uint64_t*>(sp);
  // ret lands in fiber_entry with rsp == sp + 8 (== 8 mod 16, as after a call).
  s[0] = reinterpret_cast<uint64_t>(&fiber_entry);
  s -= 6;
  for (int i = 0; i < 6; i++) s[i] = 0;  // r15 r14 r13 r12 rbx rbp
  s -= 1;
  uint32_t csr;
  uint16_t cw;
  asm volatile("stmxcsr %0" : "=m"(csr));
  asm volatile("fnstcw %0" : "=m"(cw));
  uint32_t* w = reinterpret_cast<uint32_t*>(s);
  w[0] = csr;
  w[1] = cw;
  f.ctx.sp = s;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack;
  f.ctx.uc.uc_stack.ss_size = kStack;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, fiber_entry, 0);
#endif
}

void resume(int i) {
  g.cur = i;
  Fiber& f = g.fibers[size_t(i)];
  threadIdx = f.idx;
#if defined(__x86_64__)
  bts_emu_switch(&g.main.sp, f.ctx.sp);
#else
  swapcontext(&g.main.uc, &f.ctx.uc);
#endif
  g.cur = -1;
}

std::string dim_str(dim3 d) {
  std::ostringstream o;
  o << "(" << d.x << "," << d.y << "," << d.z << ")";
  return o.str();
}

std::string where() {
  std::ostringstream o;
  o << "kernel " << g.kernel << ", block " << dim_str(blockIdx);
  return o.str();
}

void ensure_stacks(size_t n) {
  if (g.stacks_n >= n) return;
  if (g.stacks) munmap(g.stacks, g.stacks_n * (kStack + kGuard));
  const size_t bytes = n * (kStack + kGuard);
  void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("bts_emu: cannot map fiber stacks");
  g.stacks = static_cast<char*>(m);
  g.stacks_n = n;
  for (size_t i = 0; i < n; i++) mprotect(g.stacks + i * (kStack + kGuard), kGuard, PROT_NONE);
}

// Runs one block to completion; returns false with g.error set on failure.
bool run_block() {
  const int n = g.nthreads;
  g.bar_arrived = 0;
  g.serial = ++g_serial;
  g.epoch = ++g_epoch;
  g.static_shared = 0;
  for (auto& w : g.warps) {
    w.arrived = 0;
    w.what = nullptr;
  }
  // Fresh dynamic shared memory for the block.
  std::memset(g.dyn.data(), 0xff, g.dyn.size());
  for (auto& s : g.dyn_shadow) s = Shadow();
  for (int i = 0; i < n; i++) {
    Fiber& f = g.fibers[size_t(i)];
    f.tid = i;
    f.idx = dim3(unsigned(i) % blockDim.x, (unsigned(i) / blockDim.x) % blockDim.y, unsigned(i) / (blockDim.x * blockDim.y));
    f.done = f.blocked = false;
    f.wait = Wait::None;
    f.stack = g.stacks + size_t(i) * (kStack + kGuard) + kGuard;
    fiber_init(f);
  }
  int live = n, next = 0;
  while (live > 0) {
    int pick = -1;
    for (int k = 0; k < n; k++) {
      const int i = (next + k) % n;
      if (!g.fibers[size_t(i)].done && !g.fibers[size_t(i)].blocked) {
        pick = i;
        break;
      }
    }
    if (pick < 0) {  // everyone left is waiting: divergence or a collective a lane never reaches
      int at_bar = 0, at_warp = 0, exited = 0;
      const char* what = "";
      for (auto& f : g.fibers) {
        if (f.done) exited++;
        else if (f.wait == Wait::Block) at_bar++;
        else {
          at_warp++;
          what = f.where;
        }
      }
      std::ostringstream o;
      o << "deadlock (barrier divergence) in " << where() << ": " << at_bar << " thread(s) wait at __syncthreads, "
        << at_warp << " at a warp collective" << (at_warp ? std::string(" (") + what + ")" : std::string())
        << ", " << exited << " exited";
      g.error = o.str();
      return false;
    }
    resume(pick);
    if (!g.error.empty()) return false;
    if (g.fibers[size_t(pick)].done) live--;
    next = pick + 1;
  }
  if (g.static_shared + g.dyn_bytes > 227 * 1024) {
    g.error = "shared memory per block over 227 KiB in " + where();
    return false;
  }
  if (g.static_shared > 48 * 1024) {
    g.error = "static shared memory over 48 KiB in " + where();
    return false;
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
void fail(const std::string& msg) {
  if (g.error.empty()) g.error = msg + " (" + where() + ", thread " + dim_str(threadIdx) + ")";
  if (g.cur < 0) throw std::runtime_error(g.error);
  cur().done = true;  // abandoned: the launch reports the error
  switch_to_main();
  std::abort();
}

void syncthreads() {
  if (g.cur < 0) throw std::runtime_error("__syncthreads outside a kernel");
  Fiber& f = cur();
  if (++g.bar_arrived == g.nthreads) {
    g.bar_arrived = 0;
    g.epoch = ++g_epoch;
    for (auto& o : g.fibers)
      if (o.wait == Wait::Block) {
        o.blocked = false;
        o.wait = Wait::None;
      }
    return;
  }
  f.blocked = true;
  f.wait = Wait::Block;
  f.where = "__syncthreads";
  switch_to_main();
}

const uint64_t* warp_exchange(uint64_t value, const char* what) {
  if (g.cur < 0) throw std::runtime_error(std::string(what) + " outside a kernel");
  Fiber& f = cur();
  const int lane = f.tid % 32;
  WarpState& w = g.warps[size_t(f.tid / 32)];
  if (w.arrived == 0) w.what = what;
  else if (std::strcmp(w.what, what) != 0)
    fail(std::string("divergent warp collectives: ") + what + " while other lanes are in " + w.what);
  const uint64_t gen = w.gen;
  w.slots[gen & 1][lane] = value;
  if (++w.arrived == w.lanes) {
    w.arrived = 0;
    w.gen++;
    const int base = (f.tid / 32) * 32;
    for (int l = 0; l < w.lanes; l++) {
      Fiber& o = g.fibers[size_t(base + l)];
      if (o.wait == Wait::Warp) {
        o.blocked = false;
        o.wait = Wait::None;
      }
    }
  } else {
    f.blocked = true;
    f.wait = Wait::Warp;
    f.where = what;
    switch_to_main();
  }
  return w.slots[gen & 1];
}

int lane_id() { return cur().tid % 32; }
int linear_tid() { return g.cur < 0 ? -1 : cur().tid; }
int warp_lanes() { return g.warps[size_t(cur().tid / 32)].lanes; }
uint64_t block_serial() { return g.serial; }
uint64_t epoch() { return g.epoch; }
void note_shared_bytes(size_t bytes) { g.static_shared += bytes; }
const char* kernel_name() { return g.kernel; }

void check_full_mask(unsigned mask, const char* what) {
  const int n = warp_lanes();
  const unsigned need = n == 32 ? 0xffffffffu : ((1u << n) - 1);
  if ((mask & need) != need)
    fail(std::string(what) + ": partial masks are not supported by the emulator (mask must cover every lane)");
}

void set_func_attribute(const void* fn, int attr, int value) {
  if (attr == int(cudaFuncAttributeMaxDynamicSharedMemorySize)) g_max_dyn[fn] = value;
}

void Region::reset() {
  serial = block_serial();
  std::memset(data, 0xff, elem * count);  // NaN for floats, -1 for ints: uninitialised shared memory
  for (size_t i = 0; i < count; i++) shadow[i] = Shadow();
}

void Region::race(size_t i, const char* kind, int other) const {
  std::ostringstream o;
  o << "shared-memory race (" << kind << ", missing __syncthreads?) on " << name << "[" << i << "] at address 0x"
    << std::hex << reinterpret_cast<uintptr_t>(data + i * elem) << std::dec << ": thread " << linear_tid()
    << (other == -2 ? std::string(" and several other threads") : " and thread " + std::to_string(other))
    << " in the same barrier interval";
  fail(o.str());
}

void Region::oob(size_t i) const {
  std::ostringstream o;
  o << "shared-memory access out of bounds: " << name << "[" << ptrdiff_t(i) << "], size " << count;
  fail(o.str());
}

Region* dynamic_region(size_t elem_size, const char* name) {
  Region& r = g.dyn_region;
  if (r.serial != g.serial || r.elem != elem_size) {
    r.name = name;
    r.elem = elem_size;
    r.data = g.dyn.data();
    r.count = g.dyn.size() / elem_size;
    if (g.dyn_shadow.size() < r.count) g.dyn_shadow.resize(r.count);
    r.shadow = g.dyn_shadow.data();
    r.serial = g.serial;
    for (size_t i = 0; i < r.count; i++) r.shadow[i] = Shadow();
  }
  return &r;
}

namespace wmma_detail_impl {}
}  // namespace bts_emu

namespace nvcuda {
namespace wmma {
namespace detail {
void check_ptr(uintptr_t addr, unsigned ldm, size_t elem, const char* what) {
  if (addr % 32 != 0) bts_emu::fail(std::string("wmma::") + what + ": pointer not 256-bit aligned");
  if ((ldm * elem) % 16 != 0) bts_emu::fail(std::string("wmma::") + what + ": ldm is not a multiple of 16 bytes");
}
}  // namespace detail
}  // namespace wmma
}  // namespace nvcuda

namespace bts_emu {
void launch(const char* name, const void* fn, dim3 grid, dim3 block, size_t shmem, cudaStream_t,
            const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const size_t nthreads = size_t(block.x) * block.y * block.z;
  auto bad = [&](const std::string& m) {
    g_last_error = cudaErrorInvalidValue;
    throw std::runtime_error(std::string("bts_emu: launch of ") + name + ": " + m);
  };
  if (nthreads == 0 || nthreads > 1024) bad("block size " + std::to_string(nthreads) + " not in [1, 1024]");
  if (block.z > 64) bad("blockDim.z > 64");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) bad("bad grid " + dim_str(grid));
  auto it = g_max_dyn.find(fn);
  const size_t dyn_limit = it != g_max_dyn.end() ? size_t(it->second) : 48 * 1024;
  if (shmem > dyn_limit)
    bad("dynamic shared memory " + std::to_string(shmem) + " B over the limit " + std::to_string(dyn_limit) +
        " (cudaFuncSetAttribute(MaxDynamicSharedMemorySize) raises it)");
  g.kernel = name;
  g.fn = fn;
  g.body = &body;
  g.nthreads = int(nthreads);
  g.error.clear();
  g.fibers.assign(nthreads, Fiber());
  g.warps.assign((nthreads + 31) / 32, WarpState());
  for (size_t w = 0; w < g.warps.size(); w++) g.warps[w].lanes = int(std::min<size_t>(32, nthreads - w * 32));
  g.dyn.assign(shmem, 0);
  g.dyn_shadow.clear();
  g.dyn_bytes = shmem;
  ensure_stacks(nthreads);
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; z++)
    for (unsigned y = 0; y < grid.y; y++)
      for (unsigned x = 0; x < grid.x; x++) {
        blockIdx = dim3(x, y, z);
        if (!run_block()) {
          g_last_error = cudaErrorLaunchFailure;
          std::string e = g.error;
          g.error.clear();
          throw std::runtime_error("bts_emu: " + e);
        }
      }
}
}  // namespace bts_emu

// ---------------------------------------------------------------------------------------------------
// Runtime API stand-ins.
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() {
  cudaError_t e = bts_emu::g_last_error;
  bts_emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return bts_emu::g_last_error; }
// "Device" memory is host memory, but every allocation is registered, so that a host pointer given
// where device memory is expected (a kernel argument, a copy's device side, a memset, a free) is an
// error here as it would be (or crash) on a GPU, and fresh allocations are filled with 0xff bytes (NaN)
// like uninitialised GPU memory, so that code relying on zeroed memory fails here too.
namespace bts_emu {
namespace {
std::mutex g_alloc_mutex;
std::map<uintptr_t, size_t> g_allocs;  // base -> bytes
}  // namespace

bool is_device_pointer(const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(g_alloc_mutex);
  auto it = g_allocs.upper_bound(a);
  if (it == g_allocs.begin()) return false;
  --it;
  return a >= it->first && a - it->first <= it->second && bytes <= it->second - (a - it->first);
}

void host_pointer_argument(const char* kernel, int index) {
  g_last_error = cudaErrorInvalidValue;
  throw std::runtime_error(std::string("bts_emu: launch of ") + kernel + ": argument " + std::to_string(index) +
                           " points outside every device allocation (a host pointer passed to a kernel?)");
}
}  // namespace bts_emu

cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (!bytes) {
    *p = nullptr;
    return cudaSuccess;
  }
  const size_t rounded = (bytes + 255) / 256 * 256;
  *p = std::aligned_alloc(256, rounded);
  if (!*p) return bts_emu::g_last_error = cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, rounded);
  std::lock_guard<std::mutex> lock(bts_emu::g_alloc_mutex);
  bts_emu::g_allocs[reinterpret_cast<uintptr_t>(*p)] = bytes;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(bts_emu::g_alloc_mutex);
    auto it = bts_emu::g_allocs.find(reinterpret_cast<uintptr_t>(p));
    if (it == bts_emu::g_allocs.end()) return bts_emu::g_last_error = cudaErrorInvalidValue;
    bts_emu::g_allocs.erase(it);
  }
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (!bytes) return cudaSuccess;
  const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if ((dst_dev && !bts_emu::is_device_pointer(dst, bytes)) || (src_dev && !bts_emu::is_device_pointer(src, bytes)))
    return bts_emu::g_last_error = cudaErrorInvalidValue;
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind k, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, k);
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (!bytes) return cudaSuccess;
  if (!bts_emu::is_device_pointer(p, bytes)) return bts_emu::g_last_error = cudaErrorInvalidValue;
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) { return cudaMemset(p, value, bytes); }
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = nullptr;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
