// bench_cuda.cu: the CUDA kernel benchmark (`npm run bench:kernels -- --device cuda`). Times every op
// entry of native/cuda (bts::cuda::<name>, the launchers behind them) on DEVICE-RESIDENT buffers and
// reports, per case, the time, the achieved TFLOP/s or GB/s and the fraction of the device's peak.
//
// Why it is shaped this way:
//   - Buffers are allocated and filled once per case group, before any timing; nothing is copied
//     between host and device inside a timed region (unlike the op-level path of bts_cuda.node, which
//     copies every argument on every call and is not for speed).
//   - Each case: warm-up launches, then `reps` launches each between two cudaEvents on the one stream,
//     with the L2 cache flushed before each (a cudaMemsetAsync over 2 x L2 bytes, outside the events),
//     reported as the median ("cold L2": the training shapes' tensors are a few MiB and would otherwise
//     sit in L2 and read faster than DRAM); plus `reps` launches back to back between one pair of
//     events ("warmUs", L2 warm), for comparison.
//   - Peaks come from the device at run time (kPeaks below): SM count and peak SM clock
//     (cudaDevAttrClockRate) times a per-SM per-clock throughput from NVIDIA's architecture documents
//     for the compute capability, and DRAM bandwidth = memory clock x 2 (double data rate) x bus width.
//     Compute capabilities outside the table report the peak as unknown (no fraction).
//   - Every CUDA runtime call goes through BTS_CUDA_CHECK (file and line); a failing op is an error
//     (exit 1), never a missing row. After each case a slice of its output is read back and must be
//     finite, so a case that computes nothing useful (a bad shape, an unwritten output) fails loudly.
//
// The same source compiles two ways, like the kernels (docs/CUDA.md): nvcc -> `bts_bench_cuda`, the real
// benchmark; g++ against the SIMT emulator (native/emu) -> `bts_bench_cuda_emu`, which runs every case
// at tiny shapes on the CPU to check this program's logic (test/cuda/bench-emu.test.ts). Under the
// emulator there are no cudaEvents and no device properties: time is host wall-clock time around the
// (synchronous) calls, the device is named "emulator", peaks and fractions are null, and every row says
// "emulated": true. Those timings measure the emulator, not a GPU, and mean nothing.
//
// Output (stdout), one JSON object per line:
//   {"name":"_device", ...}                            the device and its peaks (first line)
//   {"name","op","ours","unit","bound","anchor","anchorName","ratio","device","emulated","us","warmUs",
//    "work","reps"}                                     one per case; ratio = ours / anchor (the peak)
//   {"name":"_no_device","reason":...}                 only when there is no usable device; exit code 3
// A header line and the case count go to stderr. Exit codes: 0 done, 1 an op or CUDA call failed (the
// message names the case), 2 usage, 3 no usable device.
//
// Usage: bts_bench_cuda [--quick] [--only <substring of a case name>]. The device is $BTS_CUDA_DEVICE
// (default 0), as for bts_cuda.node. --quick: tiny shapes and few repetitions (always on under the
// emulator).
//
// Known limits: the peak clock is the maximum boost clock; a GPU under load often runs lower (power or
// thermal limits), so fractions are relative to a peak that may not be reachable. The bf16 tensor peak
// is the dense rate of the documented instructions for the architecture; on sm_90 that rate needs
// wgmma, which the WMMA kernels do not use (mma.sync reaches a fraction of it). Ops that synchronise the
// stream themselves (embedding_*, cross_entropy, rope_table; see docs/CUDA.md) include that host
// round trip in their time. Legend as in bts/common.h.
#include <algorithm>
#include <cstdarg>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common.cuh"

#if defined(__CUDACC__) && defined(__linux__)
#include <dlfcn.h>
#endif

namespace {

using std::string;
using std::vector;

bool g_quick = false;
cudaStream_t g_stream = nullptr;

// ---------------------------------------------------------------------------------------------------
// The device and its peaks.

// Per-SM, per-clock throughput (FLOP, an FMA counted as 2) by compute capability.
//   fp32: FP32 lanes per SM x 2. bf16: dense BF16 tensor-core FLOP with FP32 accumulation.
// Sources (NVIDIA architecture whitepapers and datasheets; checked against their quoted totals):
//   8.0  NVIDIA A100 Tensor Core GPU Architecture (2020): 64 FP32 lanes per SM; 1024 dense FP16/BF16
//        FMA per clock per SM -> 108 SMs x 1410 MHz x 2048 = 312 TFLOPS BF16, x 128 = 19.5 TFLOPS FP32.
//   8.6  NVIDIA Ampere GA102 GPU Architecture (2020): 128 FP32 lanes per SM (RTX 3090: 82 x 1695 MHz x
//        256 = 35.6 TFLOPS); FP16/BF16 tensor with FP32 accumulate 1024 FLOP/clk/SM on RTX A-series
//        (A6000: 84 x 1800 MHz x 1024 = 154.8 TFLOPS), HALF that on GeForce cards (3090: 71 TFLOPS).
//   8.9  NVIDIA Ada GPU Architecture (2022): 128 FP32 lanes per SM; FP16/BF16 tensor with FP32
//        accumulate 1024 FLOP/clk/SM on the full-rate parts (RTX 6000 Ada, L40S), half on GeForce
//        (RTX 4090: 165 TFLOPS at 128 SMs x 2520 MHz) and the L40.
//   9.0  NVIDIA H100 Tensor Core GPU Architecture (2022): 128 FP32 lanes per SM; 2048 dense FP16/BF16
//        FMA per clock per SM (4096 FLOP) -> SXM5 132 SMs x 1830 MHz x 4096 = 989 TFLOPS BF16.
// For 8.6 / 8.9 the table holds the full rate: on cards with half-rate FP32 accumulation the bf16
// fraction reads low by 2x (the row says which peak it used).
struct ArchPeak {
  int major, minor;
  double fp32_flop_per_clk_sm, bf16_flop_per_clk_sm;
  const char* source;
};
const ArchPeak kPeaks[] = {
    {8, 0, 128, 2048, "A100 architecture whitepaper"},
    {8, 6, 256, 1024, "GA102 architecture whitepaper (full-rate FP32 accumulate; GeForce: half)"},
    {8, 9, 256, 1024, "Ada architecture whitepaper (full-rate FP32 accumulate; GeForce, L40: half)"},
    {9, 0, 256, 4096, "H100 architecture whitepaper (dense wgmma rate)"},
};

struct Device {
  string name;
  int major = 0, minor = 0, sms = 0;
  double clock_mhz = 0;       // peak SM clock
  double mem_clock_mhz = 0;   // peak memory clock
  int bus_bits = 0;
  int64_t l2_bytes = 0;
  double dram_gbs = 0;        // 0: unknown
  double fp32_tflops = 0;     // 0: unknown
  double bf16_tflops = 0;     // 0: unknown
  string peak_source = "unknown";
  bool emulated = false;
};

string json_str(const string& s) {
  string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\', o += c;
    else if (static_cast<unsigned char>(c) < 0x20) o += ' ';
    else o += c;
  }
  return o + "\"";
}

string num(double x) {
  if (!(x == x) || std::isinf(x)) return "null";
  char b[40];
  std::snprintf(b, sizeof b, "%.6g", x);
  return b;
}
string num_or_null(double x) { return x > 0 ? num(x) : "null"; }
string work_str(double x) {  // FLOP or bytes: whole numbers, all digits
  char b[40];
  std::snprintf(b, sizeof b, "%.0f", x);
  return b;
}

// Returns false (with `why`) when there is no usable device.
bool open_device(Device& d, string& why) {
#if defined(__CUDACC__)
#if defined(__linux__)
  // The static CUDA runtime reports a missing driver as "driver version is insufficient"; name it.
  if (void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL)) {
    dlclose(h);
  } else {
    const char* err = dlerror();
    why = string("the NVIDIA driver library libcuda.so.1 cannot be loaded (") + (err ? err : "unknown error") + ")";
    return false;
  }
#endif
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    why = string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
    return false;
  }
  if (count == 0) {
    why = "the CUDA runtime reports no device";
    return false;
  }
  int index = 0;
  if (const char* s = std::getenv("BTS_CUDA_DEVICE")) index = std::atoi(s);
  if (index < 0 || index >= count) {
    why = "BTS_CUDA_DEVICE=" + std::to_string(index) + " but there are " + std::to_string(count) + " device(s)";
    return false;
  }
  BTS_CUDA_CHECK(cudaSetDevice(index));
  cudaDeviceProp prop;
  BTS_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  d.name = prop.name;
  auto attr = [&](cudaDeviceAttr a) {
    int v = 0;
    BTS_CUDA_CHECK(cudaDeviceGetAttribute(&v, a, index));
    return v;
  };
  d.major = attr(cudaDevAttrComputeCapabilityMajor);
  d.minor = attr(cudaDevAttrComputeCapabilityMinor);
  d.sms = attr(cudaDevAttrMultiProcessorCount);
  d.clock_mhz = attr(cudaDevAttrClockRate) / 1e3;         // kHz
  d.mem_clock_mhz = attr(cudaDevAttrMemoryClockRate) / 1e3;  // kHz
  d.bus_bits = attr(cudaDevAttrGlobalMemoryBusWidth);
  d.l2_bytes = attr(cudaDevAttrL2CacheSize);
  if (d.major < 8) {
    why = d.name + " has compute capability " + std::to_string(d.major) + "." + std::to_string(d.minor) +
          "; the CUDA kernels need 8.0 or later (bf16 WMMA)";
    return false;
  }
  // DDR: two transfers per memory clock (HBM2e A100: 1215 MHz x 2 x 5120 bit = 1555 GB/s).
  if (d.mem_clock_mhz > 0 && d.bus_bits > 0) d.dram_gbs = d.mem_clock_mhz * 1e6 * 2.0 * (d.bus_bits / 8.0) / 1e9;
  for (const ArchPeak& p : kPeaks)
    if (p.major == d.major && p.minor == d.minor) {
      d.fp32_tflops = d.sms * d.clock_mhz * 1e6 * p.fp32_flop_per_clk_sm / 1e12;
      d.bf16_tflops = d.sms * d.clock_mhz * 1e6 * p.bf16_flop_per_clk_sm / 1e12;
      d.peak_source = p.source;
    }
  return true;
#else
  (void)why;
  d.name = "emulator";
  d.emulated = true;
  d.peak_source = "none (SIMT emulator on the CPU: timings are meaningless)";
  return true;
#endif
}

void emit_device(const Device& d) {
  std::printf(
      "{\"name\":\"_device\",\"device\":%s,\"emulated\":%s,\"cc\":%s,\"sms\":%d,\"clockMHz\":%s,\"memClockMHz\":%s,"
      "\"busBits\":%d,\"l2Bytes\":%lld,\"dramGBs\":%s,\"fp32TFLOPs\":%s,\"bf16TFLOPs\":%s,\"peakSource\":%s,"
      "\"quick\":%s}\n",
      json_str(d.name).c_str(), d.emulated ? "true" : "false",
      d.emulated ? "null" : json_str(std::to_string(d.major) + "." + std::to_string(d.minor)).c_str(), d.sms,
      num_or_null(d.clock_mhz).c_str(), num_or_null(d.mem_clock_mhz).c_str(), d.bus_bits, (long long)d.l2_bytes,
      num_or_null(d.dram_gbs).c_str(), num_or_null(d.fp32_tflops).c_str(), num_or_null(d.bf16_tflops).c_str(),
      json_str(d.peak_source).c_str(), g_quick ? "true" : "false");
  std::fflush(stdout);
}

// ---------------------------------------------------------------------------------------------------
// Timing. Marks are cudaEvents on the stream (GPU) or host clock readings after synchronous calls
// (emulator: every call has finished when it returns, so the host clock brackets the work exactly).
class Marks {
 public:
  explicit Marks(int n) {
#if defined(__CUDACC__)
    ev_.resize(size_t(n));
    for (auto& e : ev_) BTS_CUDA_CHECK(cudaEventCreate(&e));
#else
    t_.resize(size_t(n));
#endif
  }
  ~Marks() {
#if defined(__CUDACC__)
    for (auto& e : ev_) cudaEventDestroy(e);
#endif
  }
  Marks(const Marks&) = delete;
  Marks& operator=(const Marks&) = delete;
  void mark(int i) {
#if defined(__CUDACC__)
    BTS_CUDA_CHECK(cudaEventRecord(ev_[size_t(i)], g_stream));
#else
    t_[size_t(i)] = std::chrono::steady_clock::now();
#endif
  }
  // Milliseconds from mark i to mark j (after the stream was synchronised).
  double ms(int i, int j) const {
#if defined(__CUDACC__)
    float v = 0;
    BTS_CUDA_CHECK(cudaEventElapsedTime(&v, ev_[size_t(i)], ev_[size_t(j)]));
    return v;
#else
    return std::chrono::duration<double, std::milli>(t_[size_t(j)] - t_[size_t(i)]).count();
#endif
  }

 private:
#if defined(__CUDACC__)
  vector<cudaEvent_t> ev_;
#else
  vector<std::chrono::steady_clock::time_point> t_;
#endif
};

// Device memory of one case group, freed together.
class Arena {
 public:
  ~Arena() {
    for (void* p : ptrs_) cudaFree(p);
  }
  template <class T>
  T* alloc(size_t n) {  // uninitialised (NaN bytes under the emulator)
    void* p = nullptr;
    BTS_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }
  template <class T>
  T* zeros(size_t n) {
    T* p = alloc<T>(n);
    BTS_CUDA_CHECK(cudaMemset(p, 0, std::max<size_t>(n, 1) * sizeof(T)));
    return p;
  }
  template <class T>
  T* copy(const vector<T>& h) {
    T* p = alloc<T>(h.size());
    BTS_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
  }
  // Uniform in [-scale, scale), deterministic.
  float* rand(size_t n, uint32_t seed, float scale = 1.f) {
    vector<float> h(n);
    uint32_t s = seed * 2654435761u + 1;
    for (auto& x : h) {
      s = s * 1664525u + 1013904223u;
      x = scale * (float(s >> 8) / float(1 << 24) * 2.f - 1.f);
    }
    return copy(h);
  }
  bts::bf16* rand_bf16(size_t n, uint32_t seed) {
    vector<bts::bf16> h(n);
    uint32_t s = seed * 2654435761u + 1;
    for (auto& x : h) {
      s = s * 1664525u + 1013904223u;
      x = bts::f32_to_bf16(float(s >> 8) / float(1 << 24) * 2.f - 1.f);
    }
    return copy(h);
  }
  int32_t* ids(size_t n, int32_t V) {  // in [0, V), scattered
    vector<int32_t> h(n);
    for (size_t i = 0; i < n; i++) h[i] = int32_t((uint32_t(i) * 2654435761u) % uint32_t(V));
    return copy(h);
  }

 private:
  vector<void*> ptrs_;
};

// The L2 flush buffer (GPU only): 2 x L2 bytes, rewritten before each cold launch.
void* g_flush = nullptr;
size_t g_flush_bytes = 0;

enum class Bound { Fp32, Bf16, Memory };

struct Case {
  string name;       // unique, includes the shape
  string op;         // the bts::cuda:: entry
  Bound bound;
  double work;       // useful FLOP (compute) or minimum bytes moved (memory)
  std::function<void()> run;
  const float* check = nullptr;  // output whose first elements must be finite afterwards
  size_t check_n = 0;
};

int g_cases = 0;
const char* g_only = nullptr;

void bench(const Device& dev, const Case& c) {
  if (g_only && c.name.find(g_only) == string::npos) return;
  try {
    const int warmup = g_quick ? 1 : 3;
    for (int i = 0; i < warmup; i++) c.run();
    BTS_CUDA_CHECK(cudaStreamSynchronize(g_stream));
    int reps = 2;
    if (!g_quick) {  // ~50 ms per phase, 10..200 launches
      Marks m(2);
      m.mark(0);
      c.run();
      m.mark(1);
      BTS_CUDA_CHECK(cudaStreamSynchronize(g_stream));
      const double one = std::max(m.ms(0, 1), 1e-3);
      reps = int(std::min(200.0, std::max(10.0, 50.0 / one)));
    }
    // Cold L2: one event pair per launch, the flush outside it; median.
    Marks cold(2 * reps);
    for (int r = 0; r < reps; r++) {
      if (g_flush) BTS_CUDA_CHECK(cudaMemsetAsync(g_flush, r & 0xff, g_flush_bytes, g_stream));
      cold.mark(2 * r);
      c.run();
      cold.mark(2 * r + 1);
    }
    // Warm: back to back.
    Marks warm(2);
    warm.mark(0);
    for (int r = 0; r < reps; r++) c.run();
    warm.mark(1);
    BTS_CUDA_CHECK(cudaStreamSynchronize(g_stream));
    vector<double> t(static_cast<size_t>(reps));
    for (int r = 0; r < reps; r++) t[size_t(r)] = cold.ms(2 * r, 2 * r + 1);
    std::sort(t.begin(), t.end());
    const double med_ms = reps % 2 ? t[size_t(reps / 2)] : 0.5 * (t[size_t(reps / 2 - 1)] + t[size_t(reps / 2)]);
    const double warm_ms = warm.ms(0, 1) / reps;

    if (c.check && c.check_n) {
      vector<float> h(c.check_n);
      BTS_CUDA_CHECK(cudaMemcpy(h.data(), c.check, c.check_n * sizeof(float), cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < h.size(); i++)
        if (!std::isfinite(h[i]))
          throw bts::Error("E_BENCH", "output element " + std::to_string(i) + " is not finite (" + std::to_string(h[i]) + ")");
    }

    const bool mem = c.bound == Bound::Memory;
    const double s = std::max(med_ms, 1e-9) / 1e3;
    const double ours = mem ? c.work / s / 1e9 : c.work / s / 1e12;
    double peak = 0;
    const char* peak_name = "";
    if (!dev.emulated) {
      if (c.bound == Bound::Fp32) peak = dev.fp32_tflops, peak_name = "fp32_fma_peak";
      else if (c.bound == Bound::Bf16) peak = dev.bf16_tflops, peak_name = "bf16_tensor_peak";
      else peak = dev.dram_gbs, peak_name = "dram_bw";
    }
    const char* bound = c.bound == Bound::Fp32 ? "compute-fp32" : c.bound == Bound::Bf16 ? "compute-bf16-tc" : "memory";
    std::printf(
        "{\"name\":%s,\"op\":%s,\"ours\":%s,\"unit\":\"%s\",\"bound\":\"%s\",\"anchor\":%s,\"anchorName\":\"%s\","
        "\"ratio\":%s,\"device\":%s,\"emulated\":%s,\"us\":%s,\"warmUs\":%s,\"work\":%s,\"reps\":%d}\n",
        json_str(c.name).c_str(), json_str(c.op).c_str(), num(ours).c_str(), mem ? "GB/s" : "TFLOP/s", bound,
        num_or_null(peak).c_str(), peak > 0 ? peak_name : "", peak > 0 ? num(ours / peak).c_str() : "null",
        json_str(dev.name).c_str(), dev.emulated ? "true" : "false", num(med_ms * 1e3).c_str(),
        num(warm_ms * 1e3).c_str(), work_str(c.work).c_str(), reps);
    std::fflush(stdout);
    g_cases++;
  } catch (const std::exception& e) {
    throw bts::Error("E_BENCH", c.name + ": " + e.what());
  }
}

// ---------------------------------------------------------------------------------------------------
// The cases.

struct Cfg {
  string tag;  // "a", "b", "quick"
  int64_t D, F, V, H, Hkv, B, T;
  int64_t N() const { return B * T; }
  int64_t Dh() const { return D / H; }
};

string shape(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
string shape(const char* fmt, ...) {
  char b[256];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(b, sizeof b, fmt, ap);
  va_end(ap);
  return b;
}

// One GEMM shape in the three maths: fp32, fp32 operands on tensor cores (bf16-rounded), bf16 weights.
void bench_gemm(const Device& dev, const string& label, int64_t M, int64_t N, int64_t K, bool ta, bool tb, float beta) {
  Arena a;
  const float* A = a.rand(size_t(M * K), 1);
  const float* B = a.rand(size_t(K * N), 2);
  bts::bf16* Bh = a.rand_bf16(size_t(K * N), 3);
  float* C = beta != 0.f ? a.zeros<float>(size_t(M * N)) : a.alloc<float>(size_t(M * N));
  bts::GemmParams p;
  p.M = M, p.N = N, p.K = K, p.transA = ta, p.transB = tb;
  p.A = A, p.lda = ta ? M : K, p.B = B, p.ldb = tb ? K : N, p.C = C, p.ldc = N, p.alpha = 1.f, p.beta = beta;
  const double flops = 2.0 * double(M) * double(N) * double(K);
  const string lay = string(ta ? "T" : "N") + (tb ? "T" : "N");
  const string sh = shape(" %s %lldx%lldx%lld", lay.c_str(), (long long)M, (long long)N, (long long)K) + label;
  const size_t chk = size_t(std::min<int64_t>(M * N, 4096));
  bench(dev, {"gemm_f32" + sh, "gemm_f32", Bound::Fp32, flops,
              [=] { bts::cuda::gemm_f32(p, g_stream, bts::cuda::GemmMath::Fp32); }, C, chk});
  bench(dev, {"gemm_f32_tc" + sh, "gemm_f32 (Bf16TensorCore)", Bound::Bf16, flops,
              [=] { bts::cuda::gemm_f32(p, g_stream, bts::cuda::GemmMath::Bf16TensorCore); }, C, chk});
  if (!ta) {
    bts::GemmBf16Params q;
    q.M = M, q.N = N, q.K = K, q.transA = false, q.transB = tb;
    q.A = A, q.lda = K, q.B = Bh, q.ldb = tb ? K : N, q.C = C, q.ldc = N, q.alpha = 1.f, q.beta = beta;
    bench(dev, {"gemm_bf16" + sh, "gemm_bf16", Bound::Bf16, flops, [=] { bts::cuda::gemm_bf16(q, g_stream); }, C, chk});
  }
}

void bench_gemms(const Device& dev, const Cfg& c) {
  const int64_t N = c.N();
  const string t = " (" + c.tag + ")";
  bench_gemm(dev, " x W_up^T" + t, N, c.F, c.D, false, true, 0.f);          // forward: gate / up projection
  bench_gemm(dev, " h W_down^T" + t, N, c.D, c.F, false, true, 0.f);        // forward: down projection
  bench_gemm(dev, " dy W_up" + t, N, c.D, c.F, false, false, 0.f);          // backward: input gradient
  bench_gemm(dev, " dW_up += dy^T x" + t, c.F, c.D, N, true, false, 1.f);   // backward: weight gradient
  bench_gemm(dev, " LM head x W^T" + t, N, c.V, c.D, false, true, 0.f);
}

void bench_attention(const Device& dev, const string& tag, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t Dh) {
  Arena a;
  const size_t nq = size_t(B * T * H * Dh), nkv = size_t(B * T * Hkv * Dh);
  bts::AttentionParams f;
  f.B = B, f.Tq = T, f.Tk = T, f.Tcap = T, f.H = H, f.Hkv = Hkv, f.Dh = Dh, f.scale = 1.f / std::sqrt(float(Dh));
  f.q = a.rand(nq, 11), f.k = a.rand(nkv, 12), f.v = a.rand(nkv, 13);
  f.out = a.alloc<float>(nq), f.lse = a.alloc<float>(size_t(B * H * T));
  const string sh = shape(" B=%lld T=%lld H=%lld Hkv=%lld Dh=%lld", (long long)B, (long long)T, (long long)H,
                          (long long)Hkv, (long long)Dh) + " (" + tag + ")";
  // Useful FLOP of the causal forward: QK^T and PV over the lower triangle, 2 x 2 x B H T^2 Dh / 2.
  const double fwd = 2.0 * double(B) * H * double(T) * double(T) * Dh;
  const size_t chk = std::min<size_t>(nq, 4096);
  bench(dev, {"attention_forward" + sh, "attention_forward", Bound::Fp32, fwd,
              [=] { bts::cuda::attention_forward(f, g_stream); }, f.out, chk});
  bts::AttentionBackwardParams b;
  b.B = B, b.T = T, b.H = H, b.Hkv = Hkv, b.Dh = Dh, b.scale = f.scale;
  b.q = f.q, b.k = f.k, b.v = f.v, b.out = f.out, b.lse = f.lse, b.dout = a.rand(nq, 14);
  b.dq = a.alloc<float>(nq), b.dk = a.alloc<float>(nkv), b.dv = a.alloc<float>(nkv);
  // Useful FLOP of the backward: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: 2.5 x the forward's
  // count with the recomputation of S counted as in FlashAttention-2's convention (the CPU bench's too).
  bench(dev, {"attention_backward" + sh, "attention_backward", Bound::Fp32, 2.5 * fwd,
              [=] { bts::cuda::attention_backward(b, g_stream); }, b.dq, chk});
}

void bench_rows(const Device& dev, const Cfg& c) {
  Arena a;
  const int64_t N = c.N(), D = c.D, F = c.F, V = c.V, H = c.H, Dh = c.Dh();
  const size_t ND = size_t(N * D), NF = size_t(N * F);
  const string cfg = shape(" N=%lld D=%lld", (long long)N, (long long)D), tg = " (" + c.tag + ")";
  const size_t chk = std::min<size_t>(ND, 4096);
  float* x = a.rand(ND, 3);
  float* dy = a.rand(ND, 5);
  {
    bts::RmsNormParams p{N, D, 1e-5f, x, a.rand(size_t(D), 6), a.alloc<float>(ND), a.alloc<float>(size_t(N))};
    bench(dev, {"rmsnorm_forward" + cfg + tg, "rmsnorm_forward", Bound::Memory, double(ND) * 8 + double(N) * 4,
                [=] { bts::cuda::rmsnorm_forward(p, g_stream); }, p.y, chk});
    bts::RmsNormBackwardParams q{N, D, x, p.w, p.rstd, dy, a.alloc<float>(ND), a.zeros<float>(size_t(D))};
    bench(dev, {"rmsnorm_backward" + cfg + tg, "rmsnorm_backward", Bound::Memory, double(ND) * 12 + double(N) * 4,
                [=] { bts::cuda::rmsnorm_backward(q, g_stream); }, q.dx, chk});
  }
  {
    const int64_t P = std::max<int64_t>(c.T, 64);
    bts::RopeTableParams t;
    t.P = P, t.Dh = Dh, t.theta = 10000.0, t.table = a.alloc<float>(size_t(P * Dh));
    bench(dev, {"rope_table" + shape(" P=%lld Dh=%lld", (long long)P, (long long)Dh) + tg, "rope_table",
                Bound::Memory, double(P * Dh) * 4, [=] { bts::cuda::rope_table(t, g_stream); }, t.table,
                std::min<size_t>(size_t(P * Dh), 4096)});
    vector<int32_t> pos(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; i++) pos[size_t(i)] = int32_t(i % c.T);
    bts::RopeParams r;
    r.N = N, r.nh = H, r.Dh = Dh, r.P = P, r.pos = a.copy(pos), r.table = t.table, r.x = x, r.out = a.alloc<float>(ND);
    bench(dev, {"rope_forward" + cfg + shape(" H=%lld", (long long)H) + tg, "rope_forward", Bound::Memory,
                double(ND) * 8 + double(N) * 4, [=] { bts::cuda::rope_forward(r, g_stream); }, r.out, chk});
  }
  {
    const string cf = shape(" N=%lld F=%lld", (long long)N, (long long)F) + tg;
    bts::SwigluParams s{N, F, a.rand(NF, 7), a.rand(NF, 8), a.alloc<float>(NF)};
    bench(dev, {"swiglu_forward" + cf, "swiglu_forward", Bound::Memory, double(NF) * 12,
                [=] { bts::cuda::swiglu_forward(s, g_stream); }, s.h, std::min<size_t>(NF, 4096)});
    bts::SwigluBackwardParams sb{N, F, s.gate, s.up, a.rand(NF, 9), a.alloc<float>(NF), a.alloc<float>(NF)};
    bench(dev, {"swiglu_backward" + cf, "swiglu_backward", Bound::Memory, double(NF) * 20,
                [=] { bts::cuda::swiglu_backward(sb, g_stream); }, sb.dgate, std::min<size_t>(NF, 4096)});
  }
  {
    const string cv = cfg + shape(" V=%lld", (long long)V) + tg;
    const int32_t* ids = a.ids(size_t(N), int32_t(V));
    float* table = a.rand(size_t(V * D), 10, 0.1f);
    bts::EmbeddingParams e{N, V, D, ids, table, a.alloc<float>(ND)};
    bench(dev, {"embedding_forward" + cv, "embedding_forward", Bound::Memory, double(ND) * 8 + double(N) * 4,
                [=] { bts::cuda::embedding_forward(e, g_stream); }, e.out, chk});
    float* dtable = a.zeros<float>(size_t(V * D));
    bts::EmbeddingBackwardParams eb{N, V, D, ids, dy, dtable};
    bench(dev, {"embedding_backward" + cv, "embedding_backward", Bound::Memory, double(ND) * 12 + double(N) * 4,
                [=] { bts::cuda::embedding_backward(eb, g_stream); }, dtable, std::min<size_t>(size_t(V * D), 4096)});
    // Fused LM head + cross-entropy, forward and backward: 6 N D V useful FLOP (logits, dx, dW) on the
    // fp32 GEMM (the op recomputes logits when the vocabulary takes more than one chunk; not counted).
    bts::CrossEntropyParams ce;
    ce.N = N, ce.D = D, ce.V = V, ce.x = x, ce.w = table, ce.targets = ids;
    ce.losses = a.alloc<float>(size_t(N)), ce.loss_sum = a.alloc<double>(1), ce.count = a.alloc<int64_t>(1);
    ce.grad_scale = 1.f / float(N), ce.dx = a.alloc<float>(ND), ce.dw = a.zeros<float>(size_t(V * D));
    bench(dev, {"cross_entropy fwd+bwd" + cv, "cross_entropy_forward_backward", Bound::Fp32,
                6.0 * double(N) * double(D) * double(V), [=] { bts::cuda::cross_entropy_forward_backward(ce, g_stream); },
                ce.dx, chk});
  }
  {
    const int64_t n = 3;  // experts; M = n + 1 models
    const size_t nND = size_t(n) * ND, GM = ND * size_t(n + 1);
    const string cs = cfg + " n=3" + tg;
    const float* h0 = a.rand(ND, 15);
    const float* p = a.rand(nND, 16);
    const float* G = a.rand(GM, 17);
    const double nd4 = double(ND) * 4;
    bts::StitchEHParams e{N, D, n, h0, p, G, a.alloc<float>(ND)};
    bench(dev, {"stitch_eh_forward" + cs, "stitch_eh_forward", Bound::Memory, nd4 * double(1 + n + (n + 1) + 1),
                [=] { bts::cuda::stitch_eh_forward(e, g_stream); }, e.out, chk});
    bts::StitchEHBackwardParams eb{N, D, n, h0, p, G, dy, a.alloc<float>(ND), a.alloc<float>(nND), a.alloc<float>(GM)};
    bench(dev, {"stitch_eh_backward" + cs, "stitch_eh_backward", Bound::Memory, nd4 * double(2 * (1 + n + (n + 1)) + 1),
                [=] { bts::cuda::stitch_eh_backward(eb, g_stream); }, eb.dG, std::min<size_t>(GM, 4096)});
    bts::StitchHEParams hf{N, D, n, p, a.rand(nND, 18), G, a.alloc<float>(nND)};
    bench(dev, {"stitch_he_forward" + cs, "stitch_he_forward", Bound::Memory, nd4 * double(3 * n + (n + 1)),
                [=] { bts::cuda::stitch_he_forward(hf, g_stream); }, hf.out, chk});
    bts::StitchHEBackwardParams hb{N, D, n, p, hf.q, G, a.rand(nND, 19), a.alloc<float>(nND), a.alloc<float>(nND),
                                   a.alloc<float>(GM)};
    bench(dev, {"stitch_he_backward" + cs, "stitch_he_backward", Bound::Memory, nd4 * double(5 * n + 2 * (n + 1)),
                [=] { bts::cuda::stitch_he_backward(hb, g_stream); }, hb.dG, std::min<size_t>(GM, 4096)});
  }
}

void bench_adamw(const Device& dev, int64_t n) {
  Arena a;
  bts::AdamWParams p;
  p.n = n, p.n_decay = n - n / 16;  // matrices decay, the norms' tail does not
  p.p = a.rand(size_t(n), 20), p.g = a.rand(size_t(n), 21), p.m = a.zeros<float>(size_t(n)), p.v = a.zeros<float>(size_t(n));
  p.lr = 1e-4f, p.weight_decay = 0.1f, p.step = 1, p.max_grad_norm = 1.f, p.grad_norm = a.alloc<float>(1);
  // The norm pass reads g; the update reads p, g, m, v and writes p, m, v: 8 n floats.
  bench(dev, {"adamw_step" + shape(" n=%lld", (long long)n), "adamw_step", Bound::Memory, double(n) * 4 * 8,
              [=] { bts::cuda::adamw_step(p, g_stream); }, p.p, std::min<size_t>(size_t(n), 4096)});
}

int run(int argc, char** argv) {
  for (int i = 1; i < argc; i++) {
    const string a = argv[i];
    if (a == "--quick") g_quick = true;
    else if (a == "--only" && i + 1 < argc) g_only = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--only <substring of a case name>]\n", argv[0]);
      return 2;
    }
  }
#if !defined(__CUDACC__)
  g_quick = true;  // the emulator runs tiny shapes only
#endif
  Device dev;
  string why;
  if (!open_device(dev, why)) {
    std::printf("{\"name\":\"_no_device\",\"reason\":%s}\n", json_str(why).c_str());
    std::fflush(stdout);
    return 3;
  }
  BTS_CUDA_CHECK(cudaStreamCreate(&g_stream));
  emit_device(dev);
  auto peak = [](double x) { return x > 0 ? num(x) : string("unknown"); };
  std::fprintf(stderr, "bts_bench_cuda: %s%s, fp32 peak %s TFLOP/s, bf16 tensor peak %s TFLOP/s, DRAM %s GB/s%s\n",
               dev.name.c_str(), dev.emulated ? " (timings meaningless)" : "", peak(dev.fp32_tflops).c_str(),
               peak(dev.bf16_tflops).c_str(), peak(dev.dram_gbs).c_str(), g_quick ? ", quick" : "");
  if (!dev.emulated && !g_quick) {
    g_flush_bytes = size_t(std::max<int64_t>(2 * dev.l2_bytes, int64_t(8) << 20));
    BTS_CUDA_CHECK(cudaMalloc(&g_flush, g_flush_bytes));
  }

  vector<Cfg> cfgs;
  if (g_quick) cfgs.push_back({"quick", 32, 48, 96, 2, 2, 2, 32});
  else {
    cfgs.push_back({"a", 256, 688, 4096, 8, 8, 16, 256});
    cfgs.push_back({"b", 512, 1376, 8192, 8, 8, 8, 512});
  }
  for (const Cfg& c : cfgs) {
    bench_gemms(dev, c);
    bench_attention(dev, c.tag, c.B, c.T, c.H, c.Hkv, c.Dh());
    bench_rows(dev, c);
  }
  if (g_quick) {
    bench_gemm(dev, " square", 128, 128, 128, false, true, 0.f);
    bench_attention(dev, "gqa", 1, 40, 4, 2, 16);  // odd T, grouped heads
    bench_adamw(dev, 10000);
  } else {
    bench_gemm(dev, " square", 4096, 4096, 4096, false, true, 0.f);
    bench_attention(dev, "gqa, long", 2, 2048, 8, 2, 64);
    bench_adamw(dev, 10000000);
  }
  if (g_flush) BTS_CUDA_CHECK(cudaFree(g_flush));
  BTS_CUDA_CHECK(cudaStreamDestroy(g_stream));
  std::fprintf(stderr, "bts_bench_cuda: %d case(s)\n", g_cases);
  if (g_only && g_cases == 0) {
    std::fprintf(stderr, "bts_bench_cuda: no case matches --only %s\n", g_only);
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bts_bench_cuda: %s\n", e.what());
    return 1;
  }
}
