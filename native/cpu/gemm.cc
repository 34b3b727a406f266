// cpu/gemm.cc: fp32 GEMM (all four transpose combinations) and GEMM with bf16 B, BLIS-style.
//
// C = alpha * op(A) op(B) + beta * C, row-major, leading dimensions honoured; beta == 0 never reads C.
//
// Blocking (the BLIS loop nest; see "Anatomy of high-performance matrix multiplication"):
//   for jc in N step NC                      B panel  [KC x NC]  packed once, shared by all threads (L3)
//     for pc in K step KC
//       pack B panel into NR-wide slivers   (threads split the slivers, then meet at one barrier)
//       for ic in M step MC   (work units, taken dynamically by the threads)
//         pack A block into MR-tall slivers  A block [MC x KC] per thread (L2)
//         for jr in NC step NR                  B sliver [KC x NR] stays in L1 across ...
//           for ir in MC step MR                ... the A slivers streamed from L2
//             microkernel: C[MR x NR] += A sliver^T B sliver, MR*NR/W vector accumulators
// Packing absorbs the transposes (and, for bf16 B, the widening to fp32), so one microkernel serves
// every layout. Edge tiles: packing pads with zeros to whole MR / NR, the microkernel writes the full
// tile into a small buffer and only the valid part is merged into C. The first KC step applies beta,
// later ones accumulate (beta = 1). Two B panel buffers alternate between (jc, pc) steps, so one
// barrier per step is enough: a thread may start packing the next panel while the other still
// computes on the current one. Each C element is computed by exactly one thread with the same k
// order whatever the thread count, so results are deterministic (and equal at 1 and 2 threads).
// When the M blocks are too few to keep every thread busy, each A block is split into several
// work units along N (both threads then pack that small A block, which is cheap).
//
// Parameters (per ISA level; measured on AMD Zen 3, 32 KiB L1d, 512 KiB L2 per core, 32 MiB L3):
//   avx2:   MR x NR = 6 x 16: 12 ymm accumulators, 2 B loads + 6 broadcasts per k, the inner loop
//           compiles to exactly that (12 vfmadd231ps, 2 vmovups, 6 vbroadcastss). KC = 256 (B sliver
//           16 KiB in L1), MC = 144 (A block 144 KiB in L2), NC = 4096 (B panel up to 4 MiB in L3).
//           MC in {72, 96, 144, 288}, KC in {256, 384, 512}, NC in {512, 1024, 4096} all measured
//           within the noise of this shared 2-core machine (+-5%), so the BLIS-like defaults stay.
//           Packing A is vectorised (in-register 8x8 transposes without transA, row-wise masked copies
//           with transA): scalar packing cost up to 25% at N = 256, and packing a transposed A down
//           its columns thrashed L1 sets (lda = 4096).
//   avx512: 14 x 32 (28 zmm accumulators), the same code with W = 16; KC = 128 keeps the 32-wide B
//           sliver at 16 KiB, MC = 224. Cannot run on the development machine: untuned.
//   scalar: 4 x 4 plain blocked kernel (W = 1): correct, not fast.
// Result on Zen 3 (AVX2), training shapes M = 4096, N, K in 256..2048, NT / NN / TN, against OpenBLAS
// 0.3.21 sgemm in the same process: median ratio 0.99 at 1 thread (range 0.84-1.18), about 1.0 at
// 2 threads (too noisy on the shared machine to say more). Weakest: N = 2048 with K >= 512 (0.84-0.90
// at 1 thread), where each 16 KiB B sliver comes from L3; prefetching the next sliver or an
// L2-sized NC are the untried leads.
//
// Small M (M <= 16, decode and GEMV-like shapes) skips packing A: with transB each C element is a
// dot product of two contiguous rows (A row, B row), computed 2 x 4 at a time with vectors along K;
// without transB, a few rows of A are broadcast against contiguous row segments of B (B up to 1 MiB;
// larger: M <= 4 streams B rows into L1-resident accumulators, M > 4 takes the packed path). All are
// threaded over N. The bf16 variant on CPUs with AVX512_BF16 uses _mm512_dpbf16_ps with A rounded to
// bf16 (k pairs interleaved in the packed panels; untested on hardware here, its logic is tested
// through an exact fp32 emulation forced by BTS_GEMM_BF16DOT=1); elsewhere, and for small M, B is
// widened to fp32 (while packing, or on load) and A stays fp32.
#include <atomic>
#include <cstdlib>
#include <memory>
#include <thread>
#include <type_traits>

#include "bts/cpu.h"
#include "bts/ops.h"
#include "bts/threadpool.h"
#include "isa_begin.h"

#if BTS_ISA_LEVEL == 3 && defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the _mm512_undefined_* inside its own _mm512_cvtepu16_epi32 (used by load_bf16) as
// "maybe uninitialized": a false positive in the intrinsic header, silenced for this file only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

namespace {

#if BTS_ISA_LEVEL == 3
constexpr int MR = 14, NV = 2;
constexpr int64_t MC = 224, KC = 128, NC = 4096;
#elif BTS_ISA_LEVEL == 2
constexpr int MR = 6, NV = 2;
constexpr int64_t MC = 144, KC = 256, NC = 4096;
#else
constexpr int MR = 4, NV = 4;
constexpr int64_t MC = 64, KC = 256, NC = 1024;
#endif
constexpr int NR = NV * W;
constexpr int64_t kSmallM = 16;  // M up to this uses the unpacked paths

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- element access: fp32 and bf16 B share every loop through these.
inline float widen(float x) { return x; }
inline float widen(bf16 x) { return bf16_to_f32(x); }
inline vf loadw(const float* p) { return load(p); }
inline vf loadw(const bf16* p) { return load_bf16(p); }
inline vf loadw_partial(const float* p, int n) { return load_partial(p, n); }
inline vf loadw_partial(const bf16* p, int n) { return load_bf16_partial(p, n); }

// ---- workspace: grown on demand, kept per calling thread (ops may nest, so no global buffer).
struct Workspace {
  float* p = nullptr;
  size_t n = 0;
  ~Workspace() { std::free(p); }
  float* get(size_t need) {  // need floats, 64-byte aligned
    if (need > n) {
      std::free(p);
      n = 0;
      p = static_cast<float*>(std::aligned_alloc(64, ((need * sizeof(float) + 63) / 64) * 64));
      if (!p) throw_error("E_OUT_OF_MEMORY", "gemm: out of memory for packing buffers");
      n = need;
    }
    return p;
  }
};
thread_local Workspace tl_workspace;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Sense-free spin barrier for the threads of one parallel_run (all pass the same n).
struct SpinBarrier {
  std::atomic<int> count{0};
  std::atomic<int> gen{0};
  void wait(int n) {
    if (n <= 1) return;
    const int g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count.store(0, std::memory_order_relaxed);
      gen.fetch_add(1, std::memory_order_release);
      return;
    }
    int spins = 0;
    while (gen.load(std::memory_order_acquire) == g) {
      cpu_relax();
      if (++spins > 2000) std::this_thread::yield();
    }
  }
};

// ---- bf16 pair dot products (the AVX512_BF16 path): acc[j] += a.lo * b[j].lo + a.hi * b[j].hi, where
// a is one (k, k+1) pair of bf16 in a uint32 (lo = k) and b holds W such pairs. Emulated exactly in
// fp32 below level 3 (used there only when forced by BTS_GEMM_BF16DOT=1, so tests can run the logic).
inline uint32_t bf16_pair(bf16 lo, bf16 hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }
#if BTS_ISA_LEVEL == 3
inline vf dot2(vf acc, uint32_t a, const uint32_t* b) {
  return {_mm512_dpbf16_ps(acc.v, (__m512bh)_mm512_set1_epi32(int(a)), (__m512bh)_mm512_loadu_si512(b))};
}
inline bool bf16_dot_native() { return cpu_features().avx512bf16; }
#elif BTS_ISA_LEVEL == 2
inline vf dot2(vf acc, uint32_t a, const uint32_t* b) {
  const __m256i bv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  const vf blo = {_mm256_castsi256_ps(_mm256_slli_epi32(bv, 16))};
  const vf bhi = {_mm256_castsi256_ps(_mm256_and_si256(bv, _mm256_set1_epi32(int(0xffff0000u))))};
  return fmadd(set1(bf16_to_f32(bf16(a >> 16))), bhi, fmadd(set1(bf16_to_f32(bf16(a & 0xffff))), blo, acc));
}
inline bool bf16_dot_native() { return false; }
#else
inline vf dot2(vf acc, uint32_t a, const uint32_t* b) {
  return fmadd(set1(bf16_to_f32(bf16(a >> 16))), set1(bf16_to_f32(bf16(*b >> 16))),
               fmadd(set1(bf16_to_f32(bf16(a & 0xffff))), set1(bf16_to_f32(bf16(*b & 0xffff))), acc));
}
inline bool bf16_dot_native() { return false; }
#endif

// Whether gemm_bf16 takes the bf16-pair path: on AVX512_BF16 CPUs at level avx512, unless
// BTS_GEMM_BF16DOT=0; at any level when BTS_GEMM_BF16DOT=1 (a test hook; emulated, slow).
bool use_bf16_dot() {
  const char* e = std::getenv("BTS_GEMM_BF16DOT");
  if (e && e[0] == '1') return true;
  if (e && e[0] == '0') return false;
  return bf16_dot_native();
}

// ---- the microkernel: c[MR x NR] (row stride ldc) = alpha * sum_k a[k, :]^T b[k, :] + beta * c.
// a: packed A sliver [kd, MR]; b: packed B sliver [kd, NR]; beta == 0: c is not read. DP: the
// slivers hold bf16 (k, k+1) pairs as uint32 and kd = ceil(kc / 2) (pack_a_dp / pack_b_dp).
template <bool DP>
inline void micro_kernel(int64_t kd, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc,
                         float alpha, float beta) {
#pragma GCC unroll 16
  for (int i = 0; i < MR; i++) {  // the C tile is needed at the end: start fetching it now
    __builtin_prefetch(c + i * ldc, 1);
    __builtin_prefetch(c + i * ldc + NR - 1, 1);
  }
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) acc[i][v] = zero();
  for (int64_t k = 0; k < kd; k++) {
    if constexpr (DP) {
      const uint32_t* a32 = reinterpret_cast<const uint32_t*>(a);
      const uint32_t* b32 = reinterpret_cast<const uint32_t*>(b);
#pragma GCC unroll 16
      for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) acc[i][v] = dot2(acc[i][v], a32[i], b32 + v * W);
    } else {
      vf bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; v++) bv[v] = load(b + v * W);
#pragma GCC unroll 16
      for (int i = 0; i < MR; i++) {
        const vf ai = set1(a[i]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) acc[i][v] = fmadd(ai, bv[v], acc[i][v]);
      }
    }
    a += MR;
    b += NR;
  }
  const vf va = set1(alpha);
  if (beta == 0.f) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
      for (int v = 0; v < NV; v++) store(c + i * ldc + v * W, acc[i][v] * va);
  } else if (beta == 1.f) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
      for (int v = 0; v < NV; v++) store(c + i * ldc + v * W, fmadd(acc[i][v], va, load(c + i * ldc + v * W)));
  } else {
    const vf vb = set1(beta);
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
      for (int v = 0; v < NV; v++)
        store(c + i * ldc + v * W, fmadd(acc[i][v], va, load(c + i * ldc + v * W) * vb));
  }
}

// C tile of mr x nr (< MR x NR somewhere): full tile computed into a buffer, valid part merged.
template <bool DP>
inline void micro_kernel_edge(int64_t kd, const float* a, const float* b, float* c, int64_t ldc, int mr, int nr,
                              float alpha, float beta) {
  alignas(64) float tmp[MR * NR];
  micro_kernel<DP>(kd, a, b, tmp, NR, 1.f, 0.f);
  for (int i = 0; i < mr; i++)
    for (int j = 0; j < nr; j++) {
      float& y = c[i * ldc + j];
      y = beta == 0.f ? alpha * tmp[i * NR + j] : alpha * tmp[i * NR + j] + beta * y;
    }
}

// ---- packing.
#if BTS_ISA_LEVEL == 2
// In-register transpose of 8 rows of 8 floats: r[j] receives column j.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif
constexpr int64_t kPackSlack = 16;  // floats past a packed A block that the avx2 packers may scribble on

// A block: rows [i0, i0+mc) x k [k0, k0+kc) of op(A) into slivers [kc, MR], zero-padded rows.
// The avx2 fast paths move 8 floats per k step of MR = 6; see each for where the 2 extra go.
void pack_a(const float* A, int64_t lda, bool transA, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* dst) {
  int64_t ir0 = 0;  // slivers before ir0 are done by a fast path
#if BTS_ISA_LEVEL == 2
  static_assert(MR == 6, "the avx2 packers assume MR = 6");
  const int64_t full = mc / MR * MR;
  if (transA && full > 0) {
    // op(A)[i, k] = A[k, i]: row k of A holds MR contiguous floats of every sliver. k outer, so A is
    // read row by row (a k-inner walk down a column of a large-lda A thrashes the L1 sets). The
    // 8-float loads read at most 2 floats past column i0 + full <= M, still inside the next row of A:
    // only the last k (possibly the last row of A) uses masked loads. The 2 extra floats stored land
    // in the slot of k + 1, written next.
    const __m256i m6 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    for (int64_t k = 0; k < kc; k++) {
      const float* s = A + (k0 + k) * lda + i0;
      if (k + 1 < kc) {
        for (int64_t ir = 0; ir < full; ir += MR) _mm256_storeu_ps(dst + ir * kc + k * MR, _mm256_loadu_ps(s + ir));
      } else {  // last k of each sliver: do not spill into the next sliver (already written)
        for (int64_t ir = 0; ir < full; ir += MR)
          _mm256_maskstore_ps(dst + ir * kc + k * MR, m6, _mm256_maskload_ps(s + ir, m6));
      }
    }
    ir0 = full;
  } else if (!transA && full > 0) {
    // op(A)[i, k] = A[i, k]: 8 k at a time, 6 rows (+2 zero rows) transposed in registers; each of the
    // 8 stores writes 2 extra floats that the next store (or the tail below, or the next sliver, or
    // the kPackSlack floats after the block) overwrites.
    for (int64_t ir = 0; ir < full; ir += MR) {
      const float* s = A + (i0 + ir) * lda + k0;
      float* d = dst + ir * kc;
      int64_t k = 0;
      for (; k + 8 <= kc; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 6; i++) r[i] = _mm256_loadu_ps(s + i * lda + k);
        r[6] = r[7] = _mm256_setzero_ps();
        transpose8(r);
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(d + (k + j) * MR, r[j]);
      }
      for (; k < kc; k++)
        for (int i = 0; i < MR; i++) d[k * MR + i] = s[i * lda + k];
    }
    ir0 = full;
  }
#endif
  for (int64_t ir = ir0; ir < mc; ir += MR) {
    const int mr = int(std::min<int64_t>(MR, mc - ir));
    float* d = dst + ir * kc;  // sliver ir / MR: [kc, MR]
    if (transA) {
      const float* s = A + k0 * lda + i0 + ir;
      for (int64_t k = 0; k < kc; k++)
        for (int i = 0; i < MR; i++) d[k * MR + i] = i < mr ? s[k * lda + i] : 0.f;
    } else {  // rows contiguous along k, written with stride MR
      for (int i = 0; i < MR; i++) {
        const float* s = A + (i0 + ir + i) * lda + k0;
        for (int64_t k = 0; k < kc; k++) d[k * MR + i] = i < mr ? s[k] : 0.f;
      }
    }
  }
}

// B slivers [s0, s1) of the panel k [k0, k0+kc) x n [j0, j0+nc): sliver s is [kc, NR] at dst + s*kc*NR,
// columns past nc zero. TB = float or bf16 (widened here).
template <class TB>
void pack_b(const TB* B, int64_t ldb, bool transB, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int64_t s0,
            int64_t s1, float* dst) {
  for (int64_t s = s0; s < s1; s++) {
    const int nr = int(std::min<int64_t>(NR, nc - s * NR));
    float* d = dst + s * kc * NR;
    const int64_t j = j0 + s * NR;
    if (!transB) {  // op(B)[k, j] = B[k, j]: NR contiguous per k
      const TB* src = B + k0 * ldb + j;
      if (nr == NR) {
        for (int64_t k = 0; k < kc; k++)
#pragma GCC unroll 4
          for (int v = 0; v < NV; v++) store(d + k * NR + v * W, loadw(src + k * ldb + v * W));
      } else {
        for (int64_t k = 0; k < kc; k++)
          for (int jj = 0; jj < NR; jj++) d[k * NR + jj] = jj < nr ? widen(src[k * ldb + jj]) : 0.f;
      }
    } else {  // op(B)[k, j] = B[j, k]: rows contiguous along k, written with stride NR
      for (int jj = 0; jj < NR; jj++) {
        if (jj < nr) {
          const TB* src = B + (j + jj) * ldb + k0;
          for (int64_t k = 0; k < kc; k++) d[k * NR + jj] = widen(src[k]);
        } else {
          for (int64_t k = 0; k < kc; k++) d[k * NR + jj] = 0.f;
        }
      }
    }
  }
}

// bf16-pair packing (DP path): the same sliver layout with kd = ceil(kc / 2) rows of uint32 pairs
// (lo = k even, hi = k + 1; zero past kc). A is rounded to bf16 here (round-to-nearest-even).
void pack_a_dp(const float* A, int64_t lda, int64_t i0, int64_t mc, int64_t k0, int64_t kc, float* dst) {
  const int64_t kd = ceil_div(kc, 2);
  for (int64_t ir = 0; ir < mc; ir += MR) {
    const int mr = int(std::min<int64_t>(MR, mc - ir));
    uint32_t* d = reinterpret_cast<uint32_t*>(dst + ir * kd);  // [kd, MR]
    for (int i = 0; i < MR; i++) {
      const float* s = A + (i0 + ir + i) * lda + k0;
      for (int64_t q = 0; q < kd; q++) {
        const int64_t k = 2 * q;
        d[q * MR + i] = i >= mr ? 0u : bf16_pair(f32_to_bf16(s[k]), k + 1 < kc ? f32_to_bf16(s[k + 1]) : bf16(0));
      }
    }
  }
}

void pack_b_dp(const bf16* B, int64_t ldb, bool transB, int64_t k0, int64_t kc, int64_t j0, int64_t nc, int64_t s0,
               int64_t s1, float* dst) {
  const int64_t kd = ceil_div(kc, 2);
  for (int64_t s = s0; s < s1; s++) {
    const int nr = int(std::min<int64_t>(NR, nc - s * NR));
    uint32_t* d = reinterpret_cast<uint32_t*>(dst + s * kd * NR);  // [kd, NR]
    const int64_t j = j0 + s * NR;
    auto at = [&](int64_t k, int jj) -> bf16 {  // op(B)[k0 + k, j + jj], 0 outside
      if (k >= kc || jj >= nr) return 0;
      return transB ? B[(j + jj) * ldb + k0 + k] : B[(k0 + k) * ldb + j + jj];
    };
    for (int64_t q = 0; q < kd; q++)
      for (int jj = 0; jj < NR; jj++) d[q * NR + jj] = bf16_pair(at(2 * q, jj), at(2 * q + 1, jj));
  }
}

// The operands of one call, B of type TB.
template <class TB>
struct Problem {
  int64_t M, N, K;
  bool transA, transB;
  const float* A;  // [M, K] (lda) or [K, M]
  int64_t lda;
  const TB* B;  // [K, N] (ldb) or [N, K]
  int64_t ldb;
  float* C;  // [M, N] (ldc)
  int64_t ldc;
  float alpha, beta;
};

// Threads worth using for `flops` floating-point operations (the pool hand-off costs a few us).
int threads_for(double flops) {
  const int T = num_threads();
  if (T <= 1 || flops < 2e6) return 1;
  return std::min<int>(T, int(flops / 1e6));
}

// ---- the blocked path (any M, N, K).
template <class TB, bool DP>
void gemm_blocked(const Problem<TB>& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t nc_max = std::min(NC, ceil_div(N, NR) * NR);
  const int64_t kc_max = std::min(KC, K);
  const int64_t panel = kc_max * nc_max;  // floats per B panel
  const int64_t ablock = ceil_div(ceil_div(std::min(MC, M), MR) * MR * kc_max + kPackSlack, 16) * 16;
  const int want0 = threads_for(2.0 * double(M) * double(N) * double(K));
  // Everything is allocated here, by the calling thread, so no thread can fail (and leave the others
  // waiting at the barrier) inside the parallel region: two B panels, then one A block per thread.
  float* bbuf = tl_workspace.get(size_t(2 * panel + want0 * ablock));
  const int64_t n_jc = ceil_div(N, NC), n_pc = ceil_div(K, KC), n_ic = ceil_div(M, MC);
  const int want = want0;
  // Work units per (jc, pc) step: n_ic A blocks, each split into `parts` along N when blocks are few.
  const int64_t max_slivers = ceil_div(nc_max, NR);
  const int64_t parts = n_ic >= 4 * want ? 1 : std::min<int64_t>(max_slivers, ceil_div(4 * want, n_ic));
  const int64_t units = n_ic * parts;
  Buffer<std::atomic<int64_t>> next(size_t(n_jc * n_pc));
  for (int64_t i = 0; i < n_jc * n_pc; i++) next[i].store(0, std::memory_order_relaxed);
  SpinBarrier barrier;

  parallel_run([&](int t, int nthr) {
    const int nt = std::min(nthr, want);
    if (t >= nt) return;
    float* abuf = bbuf + 2 * panel + t * ablock;  // [MC, KC] as slivers [KC, MR]
    int64_t step = 0;
    for (int64_t jc = 0; jc < N; jc += NC) {
      const int64_t nc = std::min(NC, N - jc);
      const int64_t ns = ceil_div(nc, NR);
      for (int64_t pc = 0; pc < K; pc += KC, step++) {
        const int64_t kc = std::min(KC, K - pc);
        float* bp = bbuf + (step & 1) * panel;
        const int64_t kd = DP ? ceil_div(kc, 2) : kc;  // packed depth
        if constexpr (DP)
          pack_b_dp(p.B, p.ldb, p.transB, pc, kc, jc, nc, ns * t / nt, ns * (t + 1) / nt, bp);
        else
          pack_b(p.B, p.ldb, p.transB, pc, kc, jc, nc, ns * t / nt, ns * (t + 1) / nt, bp);
        barrier.wait(nt);
        const float beta = pc == 0 ? p.beta : 1.f;
        const int64_t per_part = ceil_div(ns, parts);
        int64_t packed_ic = -1;
        for (;;) {
          const int64_t u = next[step].fetch_add(1, std::memory_order_relaxed);
          if (u >= units) break;
          const int64_t ib = u / parts, part = u % parts;
          const int64_t ic = ib * MC, mc = std::min(MC, M - ic);
          if (ib != packed_ic) {
            if constexpr (DP)
              pack_a_dp(p.A, p.lda, ic, mc, pc, kc, abuf);
            else
              pack_a(p.A, p.lda, p.transA, ic, mc, pc, kc, abuf);
            packed_ic = ib;
          }
          const int64_t sa = part * per_part, sb = std::min(ns, sa + per_part);
          for (int64_t s = sa; s < sb; s++) {
            const int nr = int(std::min<int64_t>(NR, nc - s * NR));
            const float* bs = bp + s * kd * NR;
            for (int64_t ir = 0; ir < mc; ir += MR) {
              const int mr = int(std::min<int64_t>(MR, mc - ir));
              float* c = p.C + (ic + ir) * p.ldc + jc + s * NR;
              if (mr == MR && nr == NR)
                micro_kernel<DP>(kd, abuf + ir * kd, bs, c, p.ldc, p.alpha, beta);
              else
                micro_kernel_edge<DP>(kd, abuf + ir * kd, bs, c, p.ldc, mr, nr, p.alpha, beta);
            }
          }
        }
      }
    }
  });
}

// ---- small M, transB: C[m, n] = alpha * dot(A row m, B row n) + beta * C[m, n], vectors along K.
// a: RM rows at stride lda; b: RN rows at stride ldb; out[i][j] receives the dot products.
template <int RM, int RN, class TB>
inline void dot_block(int64_t K, const float* a, int64_t lda, const TB* b, int64_t ldb, float (*out)[4]) {
  vf acc[RM][RN];
  for (int i = 0; i < RM; i++)
    for (int j = 0; j < RN; j++) acc[i][j] = zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf av[RM];
    for (int i = 0; i < RM; i++) av[i] = load(a + i * lda + k);
    for (int j = 0; j < RN; j++) {
      const vf bv = loadw(b + j * ldb + k);
      for (int i = 0; i < RM; i++) acc[i][j] = fmadd(av[i], bv, acc[i][j]);
    }
  }
  if (k < K) {
    const int r = int(K - k);
    vf av[RM];
    for (int i = 0; i < RM; i++) av[i] = load_partial(a + i * lda + k, r);
    for (int j = 0; j < RN; j++) {
      const vf bv = loadw_partial(b + j * ldb + k, r);
      for (int i = 0; i < RM; i++) acc[i][j] = fmadd(av[i], bv, acc[i][j]);
    }
  }
  for (int i = 0; i < RM; i++)
    for (int j = 0; j < RN; j++) out[i][j] = reduce_add(acc[i][j]);
}

template <int RM, class TB>
inline void dot_rows(int64_t K, const float* a, int64_t lda, const TB* b, int64_t ldb, int rn, float (*out)[4]) {
  switch (rn) {
    case 4: dot_block<RM, 4>(K, a, lda, b, ldb, out); break;
    case 3: dot_block<RM, 3>(K, a, lda, b, ldb, out); break;
    case 2: dot_block<RM, 2>(K, a, lda, b, ldb, out); break;
    default: dot_block<RM, 1>(K, a, lda, b, ldb, out); break;
  }
}

// One row of A against one row of B with four accumulators along K: the M = 1 case (batch-1
// decode). One B stream at a time is what the hardware prefetchers follow best: measured here
// (single core, K = 256..512) it streams B from DRAM 15-20% faster than four interleaved rows
// (dot_block<1, 4>) and as fast from L3.
template <class TB>
inline float dot_row(int64_t K, const float* a, const TB* b) {
  vf c0 = zero(), c1 = zero(), c2 = zero(), c3 = zero();
  int64_t k = 0;
  for (; k + 4 * W <= K; k += 4 * W) {
    c0 = fmadd(load(a + k), loadw(b + k), c0);
    c1 = fmadd(load(a + k + W), loadw(b + k + W), c1);
    c2 = fmadd(load(a + k + 2 * W), loadw(b + k + 2 * W), c2);
    c3 = fmadd(load(a + k + 3 * W), loadw(b + k + 3 * W), c3);
  }
  for (; k + W <= K; k += W) c0 = fmadd(load(a + k), loadw(b + k), c0);
  if (k < K) c1 = fmadd(load_partial(a + k, int(K - k)), loadw_partial(b + k, int(K - k)), c1);
  return reduce_add(c0) + reduce_add(c1) + reduce_add(c2) + reduce_add(c3);
}

// Threads for a small-M GEMM: with M <= 16 the work is one pass over B (bandwidth-bound), so a
// second thread pays as soon as B is larger than a few times what one synchronisation costs in
// streaming time (~1-2 us of a spinning worker; 64 KiB take ~3 us at L3 speed on one core). The
// flop rule of the blocked path would keep every decode GEMV of a D <= 512 model on one thread.
int threads_small(int64_t M, int64_t N, int64_t K, size_t b_elem) {
  const int T = num_threads();
  const double bytes = double(N) * double(K) * double(b_elem);
  if (T <= 1 || bytes < 65536.0) return threads_for(2.0 * double(M) * double(N) * double(K));
  return std::min<int>(T, std::max<int>(2, int(bytes / 65536.0)));
}

template <class TB>
void gemm_small_nt(const Problem<TB>& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const float* A = p.A;
  int64_t lda = p.lda;
  Buffer<float> at;
  if (p.transA) {  // A stored [K, M]: make the M rows contiguous first (M*K is small here)
    at.resize(size_t(M * K));
    for (int64_t k = 0; k < K; k++)
      for (int64_t m = 0; m < M; m++) at[size_t(m * K + k)] = A[k * p.lda + m];
    A = at.data();
    lda = K;
  }
  const int nt = threads_small(M, N, K, sizeof(TB));
  const int64_t grain = nt > 1 ? std::max<int64_t>(4, ceil_div(N, 8 * nt)) : N;
  parallel_for(ceil_div(N, 4), ceil_div(grain, 4), [&](int64_t g0, int64_t g1, int) {
    if (M == 1) {
      for (int64_t n = g0 * 4; n < std::min(N, g1 * 4); n++) {
        float& y = p.C[n];
        const float d = dot_row(K, A, p.B + n * p.ldb);
        y = p.beta == 0.f ? p.alpha * d : p.alpha * d + p.beta * y;
      }
      return;
    }
    for (int64_t n = g0 * 4; n < std::min(N, g1 * 4); n += 4) {
      const int rn = int(std::min<int64_t>(4, N - n));
      for (int64_t m = 0; m < M; m += 2) {
        float out[2][4];
        const int rm = int(std::min<int64_t>(2, M - m));
        if (rm == 2)
          dot_rows<2>(K, A + m * lda, lda, p.B + n * p.ldb, p.ldb, rn, out);
        else
          dot_rows<1>(K, A + m * lda, lda, p.B + n * p.ldb, p.ldb, rn, out);
        for (int i = 0; i < rm; i++)
          for (int j = 0; j < rn; j++) {
            float& y = p.C[(m + i) * p.ldc + n + j];
            y = p.beta == 0.f ? p.alpha * out[i][j] : p.alpha * out[i][j] + p.beta * y;
          }
      }
    }
  });
}

// ---- small M, no transB: C[m, n0:n0+RV*W] = alpha * sum_k opA[m, k] B[k, n0:...] + beta * C.
// The last vector holds `last` valid columns (W when full). sam / sak: strides of op(A) along m, k.
template <int RM, int RV, bool kPartial, class TB>
inline void axpy_block(int64_t K, const float* a, int64_t sam, int64_t sak, const TB* b, int64_t ldb, float* c,
                       int64_t ldc, int last, float alpha, float beta) {
  vf acc[RM][RV];
  for (int i = 0; i < RM; i++)
    for (int v = 0; v < RV; v++) acc[i][v] = zero();
  for (int64_t k = 0; k < K; k++) {
    vf bv[RV];
    for (int v = 0; v < RV; v++)
      bv[v] = kPartial && v == RV - 1 ? loadw_partial(b + k * ldb + v * W, last) : loadw(b + k * ldb + v * W);
    for (int i = 0; i < RM; i++) {
      const vf ai = set1(a[i * sam + k * sak]);
      for (int v = 0; v < RV; v++) acc[i][v] = fmadd(ai, bv[v], acc[i][v]);
    }
  }
  const vf va = set1(alpha), vb = set1(beta);
  for (int i = 0; i < RM; i++)
    for (int v = 0; v < RV; v++) {
      float* y = c + i * ldc + v * W;
      if (kPartial && v == RV - 1) {
        const vf r = beta == 0.f ? acc[i][v] * va : fmadd(acc[i][v], va, load_partial(y, last) * vb);
        store_partial(y, r, last);
      } else {
        store(y, beta == 0.f ? acc[i][v] * va : fmadd(acc[i][v], va, load(y) * vb));
      }
    }
}

template <int RM, class TB>
inline void axpy_rows(int64_t K, const float* a, int64_t sam, int64_t sak, const TB* b, int64_t ldb, float* c,
                      int64_t ldc, int64_t ncols, float alpha, float beta) {
  // ncols columns from b / c: groups of 3 vectors, then single (possibly partial) vectors.
  int64_t j = 0;
  for (; j + 3 * W <= ncols; j += 3 * W)
    axpy_block<RM, 3, false>(K, a, sam, sak, b + j, ldb, c + j, ldc, W, alpha, beta);
  for (; j + W <= ncols; j += W) axpy_block<RM, 1, false>(K, a, sam, sak, b + j, ldb, c + j, ldc, W, alpha, beta);
  if (j < ncols)
    axpy_block<RM, 1, true>(K, a, sam, sak, b + j, ldb, c + j, ldc, int(ncols - j), alpha, beta);
}

template <class TB>
void gemm_small_nn(const Problem<TB>& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t sam = p.transA ? 1 : p.lda, sak = p.transA ? p.lda : 1;
  const int nt = threads_small(M, N, K, sizeof(TB));
  constexpr int64_t CH = 3 * W;  // columns per chunk
  const int64_t chunks = ceil_div(N, CH);
  const int64_t grain = nt > 1 ? std::max<int64_t>(1, ceil_div(chunks, 4 * nt)) : chunks;
  parallel_for(chunks, grain, [&](int64_t c0, int64_t c1, int) {
    const int64_t n0 = c0 * CH, n1 = std::min(N, c1 * CH);
    for (int64_t m = 0; m < M; m += 4) {
      const float* a = p.A + m * sam;
      float* c = p.C + m * p.ldc + n0;
      const TB* b = p.B + n0;
      switch (std::min<int64_t>(4, M - m)) {
        case 4: axpy_rows<4>(K, a, sam, sak, b, p.ldb, c, p.ldc, n1 - n0, p.alpha, p.beta); break;
        case 3: axpy_rows<3>(K, a, sam, sak, b, p.ldb, c, p.ldc, n1 - n0, p.alpha, p.beta); break;
        case 2: axpy_rows<2>(K, a, sam, sak, b, p.ldb, c, p.ldc, n1 - n0, p.alpha, p.beta); break;
        default: axpy_rows<1>(K, a, sam, sak, b, p.ldb, c, p.ldc, n1 - n0, p.alpha, p.beta); break;
      }
    }
  });
}

// Small M (<= 4), no transB, large B: column chunks of 256 with the [M, 256] accumulators in L1, B rows streamed k by k (1 KiB contiguous per row, which the prefetchers follow).
template <class TB>
void gemm_small_nn_stream(const Problem<TB>& p) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int64_t sam = p.transA ? 1 : p.lda, sak = p.transA ? p.lda : 1;
  constexpr int64_t CH = 256;
  static_assert(CH % W == 0, "chunk of whole vectors");
  const int nt = threads_small(M, N, K, sizeof(TB));
  const int64_t chunks = ceil_div(N, CH);
  parallel_for(chunks, nt > 1 ? 1 : chunks, [&](int64_t c0, int64_t c1, int) {
    alignas(64) float acc[4 * CH];  // [M, CH]
    for (int64_t ch = c0; ch < c1; ch++) {
      const int64_t n0 = ch * CH, nn = std::min(CH, N - n0);
      const int64_t nv = nn / W * W;
      fill(acc, acc + M * CH, 0.f);
      for (int64_t k = 0; k < K; k++) {
        const TB* b = p.B + k * p.ldb + n0;
        for (int64_t m = 0; m < M; m++) {
          const float as = p.A[m * sam + k * sak];
          const vf am = set1(as);
          float* y = acc + m * CH;
          for (int64_t j = 0; j < nv; j += W) store(y + j, fmadd(am, loadw(b + j), load(y + j)));
          for (int64_t j = nv; j < nn; j++) y[j] += as * widen(b[j]);
        }
      }
      for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < nn; j++) {
          float& y = p.C[m * p.ldc + n0 + j];
          y = p.beta == 0.f ? p.alpha * acc[m * CH + j] : p.alpha * acc[m * CH + j] + p.beta * y;
        }
    }
  });
}

template <class TB>
void gemm_any(const Problem<TB>& p, bool dp) {
  if (p.M <= kSmallM) {
    // Without transB, each k step reads a short segment of every B row: with a large B (power-of-two
    // row strides alias in L1/L2 and every row is a new page) the unpacked walk collapses (measured
    // 2-10 GFLOP/s at K = N = 2048), so only a B of up to 1 MiB goes unpacked.
    if (p.transB) return gemm_small_nt(p);
    if (double(p.K) * double(p.ldb) * sizeof(TB) <= double(1 << 20)) return gemm_small_nn(p);
    // Large B: streaming rows of B pays for M <= 4 (M = 1, K = N = 2048: 4.3 vs 2.3 GFLOP/s blocked);
    // above, the packed path wins (M = 16: 28 vs 14 GFLOP/s).
    if (p.M <= 4) return gemm_small_nn_stream(p);
  }
  if constexpr (std::is_same_v<TB, bf16>) {
    if (dp) return gemm_blocked<TB, true>(p);  // (transA is rejected for bf16 by the entry)
  }
  gemm_blocked<TB, false>(p);
}

}  // namespace

void gemm_f32(const GemmParams& p) {
  gemm_any(Problem<float>{p.M, p.N, p.K, p.transA, p.transB, p.A, p.lda, p.B, p.ldb, p.C, p.ldc, p.alpha, p.beta}, false);
}

void gemm_bf16(const GemmBf16Params& p) {
  gemm_any(Problem<bf16>{p.M, p.N, p.K, p.transA, p.transB, p.A, p.lda, p.B, p.ldb, p.C, p.ldc, p.alpha, p.beta},
           use_bf16_dot());
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
