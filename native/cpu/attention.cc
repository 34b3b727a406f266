// cpu/attention.cc: causal grouped-query attention, forward (flash-attention style) and backward
// (FlashAttention-2 style), SIMD through simd.h, threads through the compute pool.
//
// Forward. A work item is (batch b, kv head hk, query block, key split). Its rows are the query
// positions of the block times the G = H / Hkv query heads that share hk, ordered position-major
// (row r = position r / G, head r % G), so one K/V tile serves every head of the group; blocks hold
// about kBq rows. Over key tiles of kBk keys it keeps the online-softmax state per row (running max
// m, sum l, unnormalised output O): S = (scale q) k^T for the tile, m' = max(m, max S),
// P = exp(S - m'), O = O exp(m - m') + P V, l = l exp(m - m') + sum P. Only the visible keys of a row
// enter its max and sum (masked scores are never exponentiated; every row sees key 0), so there is
// no -inf arithmetic. Nothing larger than a [rows, kBk] tile of scores exists.
// The two products are register-tiled micro-kernels (4 rows x 2 vectors): S = Q K^T is vectorised over
// keys against a transposed, zero-padded K tile (kT [Dh, kBk], 8x8 AVX transposes); O += P V is
// vectorised over Dh reading V in place (packed and padded only when Dh is not a multiple of W).
// Both are trimmed to the causal triangle per 4-row block, so diagonal tiles cost about half.
// Decode (all queries in one block of <= 16 rows, e.g. Tq = 1): an item walks every kv head of each
// key tile, so the cache [Tcap, Hkv, Dh] is streamed contiguously (one head's keys alone are Hkv * Dh
// floats apart, which reads ~3x slower from DRAM); with <= 4 rows the scores are plain dot products
// straight from the cache (no K^T packing), with software prefetch. When there are few items for the
// threads (< 2 per thread) the keys of an item are split into S ranges that run as separate items
// writing partial (m, l, O), merged by a combine pass.
// Scheduling: items are handed out by an atomic counter (largest first when there are few (b, hk)
// groups, group by group otherwise, for K/V cache reuse). Each item writes only its own outputs and
// S depends only on the shape and the thread count, so results are deterministic for a given thread
// count.
//
// Backward (Tq = Tk = T). Di = rowsum(dout * out) first. Then, per (query tile, key tile) pair:
// S = (scale q) k^T, P = exp(S - lse) on visible keys (0 elsewhere), dP = dout v^T,
// dS = P (dP - Di); dV += P^T dout, dK += dS^T (scale q), dQ += dS (scale k).
// Two deterministic schedules, no atomics on floats:
//  - one pass, item = (b, hk), when there are enough of them to feed the threads (they all cost the
//    same): key blocks in chunks (key-side buffers ~1 MiB); each chunk's K^T, V^T and scale*K are
//    packed once, then every query block of every head of the group at or after the chunk runs
//    against it, adding into the chunk's dK/dV and its own dQ (kept in dq between chunks).
//  - two passes otherwise: (b, hk, key block) items accumulate dK/dV, then (b, h, query block) items
//    recompute S and dP and accumulate dQ. 7 instead of 5 tile products, but full parallelism.
// The query heads of a group add into their kv head's dK/dV in a fixed order (head, then block).
//
// Legend (common.h): B batch, Tq queries, Tk keys used, Tcap key capacity, H query heads, Hkv
// key/value heads, G = H / Hkv, Dh head dim, Dhp = Dh rounded up to W. Known limits: fp32 only; tile
// sizes are fixed (kBq = kBk = 64); in the forward the K tile is repacked per query block (O(kBk Dh)
// against O(rows kBk Dh) arithmetic); the two-pass backward repacks the query side per key block.
#include <atomic>
#include <limits>

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "isa_begin.h"

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

namespace {
constexpr int64_t kBq = 64;  // query positions per block (forward: rows = positions * G, capped)
constexpr int64_t kBk = 64;  // keys per tile; a multiple of 2W at every level (ld of kT and S)
constexpr int kMR = 6;         // rows per micro-kernel block (6 x 2 accumulator vectors)
constexpr int64_t kAhead = 16;  // decode: keys prefetched ahead
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t cdiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// C[r][n] = sum_d A[r][d] BT[d][n] for r < MR, n < ncols (ncols a multiple of 2W).
// A [MR, K] (row stride lda), BT [K, ncols] (row stride ldb), C [MR, ncols] (row stride ldc).
template <int MR>
inline void abt_rows(const float* A, int64_t lda, const float* BT, int64_t ldb, int64_t K, float* C, int64_t ldc,
                     int64_t ncols) {
  for (int64_t n = 0; n < ncols; n += 2 * W) {
    vf acc[MR][2];
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = zero();
    const float* bp = BT + n;
    for (int64_t d = 0; d < K; d++, bp += ldb) {
      const vf b0 = load(bp), b1 = load(bp + W);
      for (int r = 0; r < MR; r++) {
        const vf a = set1(A[r * lda + d]);
        acc[r][0] = fmadd(a, b0, acc[r][0]);
        acc[r][1] = fmadd(a, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < MR; r++) {
      store(C + r * ldc + n, acc[r][0]);
      store(C + r * ldc + n + W, acc[r][1]);
    }
  }
}

// C [M, ncols] = A [M, K] BT [K, ncols], where the row block ending at row m needs only the first
// cols(m) columns (causal trimming; cols is non-decreasing, cols(M-1) <= the padded width of BT).
template <class Cols>
void gemm_abt(const float* A, int64_t lda, const float* BT, int64_t ldb, int64_t K, float* C, int64_t ldc, int64_t M,
              Cols cols) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR)
    abt_rows<kMR>(A + m * lda, lda, BT, ldb, K, C + m * ldc, ldc, round_up(cols(m + kMR - 1), 2 * W));
  if (m == M) return;
  const int64_t nc = round_up(cols(M - 1), 2 * W);
  const float* Am = A + m * lda;
  float* Cm = C + m * ldc;
  switch (M - m) {
    case 5: abt_rows<5>(Am, lda, BT, ldb, K, Cm, ldc, nc); break;
    case 4: abt_rows<4>(Am, lda, BT, ldb, K, Cm, ldc, nc); break;
    case 3: abt_rows<3>(Am, lda, BT, ldb, K, Cm, ldc, nc); break;
    case 2: abt_rows<2>(Am, lda, BT, ldb, K, Cm, ldc, nc); break;
    default: abt_rows<1>(Am, lda, BT, ldb, K, Cm, ldc, nc); break;
  }
}

// C[r][e] += sum_k P(r, k) X[k][e] for r < MR, e < Dhp (a multiple of W); P(r, k) = P[r*psm + k*psk]
// (psk = 1: P row-major; psm = 1: P transposed). X [nk, Dhp] (row stride ldx), C [MR, Dhp] (ldc).
template <int MR>
inline void px_rows(const float* P, int64_t psm, int64_t psk, int64_t nk, const float* X, int64_t ldx, float* C,
                    int64_t ldc, int64_t Dhp) {
  int64_t e = 0;
  for (; e + 2 * W <= Dhp; e += 2 * W) {
    vf acc[MR][2];
    for (int r = 0; r < MR; r++) {
      acc[r][0] = load(C + r * ldc + e);
      acc[r][1] = load(C + r * ldc + e + W);
    }
    const float* xp = X + e;
    const float* pp = P;
    for (int64_t k = 0; k < nk; k++, xp += ldx, pp += psk) {
      const vf x0 = load(xp), x1 = load(xp + W);
      for (int r = 0; r < MR; r++) {
        const vf a = set1(pp[r * psm]);
        acc[r][0] = fmadd(a, x0, acc[r][0]);
        acc[r][1] = fmadd(a, x1, acc[r][1]);
      }
    }
    for (int r = 0; r < MR; r++) {
      store(C + r * ldc + e, acc[r][0]);
      store(C + r * ldc + e + W, acc[r][1]);
    }
  }
  if (e < Dhp) {  // one vector left
    vf acc[MR];
    for (int r = 0; r < MR; r++) acc[r] = load(C + r * ldc + e);
    const float* xp = X + e;
    const float* pp = P;
    for (int64_t k = 0; k < nk; k++, xp += ldx, pp += psk) {
      const vf x0 = load(xp);
      for (int r = 0; r < MR; r++) acc[r] = fmadd(set1(pp[r * psm]), x0, acc[r]);
    }
    for (int r = 0; r < MR; r++) store(C + r * ldc + e, acc[r]);
  }
}

// C [M, Dhp] += P(M x k) X [k, Dhp], where rows [m, m_last] need only k in range(m, m_last) = [k0, k1)
// (the other P entries of those rows are zero: causal trimming).
template <class Range>
void gemm_px(const float* P, int64_t psm, int64_t psk, const float* X, int64_t ldx, float* C, int64_t ldc, int64_t M,
             int64_t Dhp, Range range) {
  int64_t m = 0, k0 = 0, k1 = 0;
  for (; m + kMR <= M; m += kMR) {
    range(m, m + kMR - 1, k0, k1);
    if (k1 > k0) px_rows<kMR>(P + m * psm + k0 * psk, psm, psk, k1 - k0, X + k0 * ldx, ldx, C + m * ldc, ldc, Dhp);
  }
  if (m == M) return;
  range(m, M - 1, k0, k1);
  if (k1 <= k0) return;
  const float* Pm = P + m * psm + k0 * psk;
  const float* Xk = X + k0 * ldx;
  float* Cm = C + m * ldc;
  const int64_t n = k1 - k0;
  switch (M - m) {
    case 5: px_rows<5>(Pm, psm, psk, n, Xk, ldx, Cm, ldc, Dhp); break;
    case 4: px_rows<4>(Pm, psm, psk, n, Xk, ldx, Cm, ldc, Dhp); break;
    case 3: px_rows<3>(Pm, psm, psk, n, Xk, ldx, Cm, ldc, Dhp); break;
    case 2: px_rows<2>(Pm, psm, psk, n, Xk, ldx, Cm, ldc, Dhp); break;
    default: px_rows<1>(Pm, psm, psk, n, Xk, ldx, Cm, ldc, Dhp); break;
  }
}

// dst[e] = a * src[e] for e < Dh, 0 for Dh <= e < Dhp.
inline void copy_scaled_pad(float* dst, const float* src, float a, int64_t Dh, int64_t Dhp) {
  const vf va = set1(a);
  int64_t e = 0;
  for (; e + W <= Dh; e += W) store(dst + e, load(src + e) * va);
  if (e < Dh) store_partial(dst + e, load_partial(src + e, int(Dh - e)) * va, int(Dh - e));
  for (int64_t x = Dh; x < Dhp; x++) dst[x] = 0.f;
}

inline float dot(const float* a, const float* b, int64_t n) {
  vf acc0 = zero(), acc1 = zero();
  int64_t e = 0;
  for (; e + 2 * W <= n; e += 2 * W) {
    acc0 = fmadd(load(a + e), load(b + e), acc0);
    acc1 = fmadd(load(a + e + W), load(b + e + W), acc1);
  }
  for (; e + W <= n; e += W) acc0 = fmadd(load(a + e), load(b + e), acc0);
  if (e < n) acc1 = fmadd(load_partial(a + e, int(n - e)), load_partial(b + e, int(n - e)), acc1);
  return reduce_add(acc0 + acc1);
}

#if BTS_ISA_LEVEL >= 2
// dst[c][r] = src[r][c] for an 8 x 8 block (rows of src lds apart, of dst ldd apart).
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; i++) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// Packs keys [j0, j0+nk) of kv head hk, batch b, into kT [Dh, kBk] (transposed, columns >= nk zeroed
// up to nkp). src: [B, Tcap, Hkv, Dh].
void pack_kt(float* kT, const float* src, int64_t b, int64_t hk, int64_t j0, int64_t nk, int64_t nkp, int64_t Tcap,
             int64_t Hkv, int64_t Dh) {
  const float* s0 = src + ((b * Tcap + j0) * Hkv + hk) * Dh;  // row j at s0 + j * lds
  const int64_t lds = Hkv * Dh;
  int64_t j = 0;
#if BTS_ISA_LEVEL >= 2
  for (; j + 8 <= nk; j += 8) {
    int64_t d = 0;
    for (; d + 8 <= Dh; d += 8) transpose8x8(s0 + j * lds + d, lds, kT + d * kBk + j, kBk);
    for (; d < Dh; d++)
      for (int64_t x = j; x < j + 8; x++) kT[d * kBk + x] = s0[x * lds + d];
  }
#endif
  for (; j < nk; j++)
    for (int64_t d = 0; d < Dh; d++) kT[d * kBk + j] = s0[j * lds + d];
  if (nkp > nk)
    for (int64_t d = 0; d < Dh; d++)
      for (int64_t x = nk; x < nkp; x++) kT[d * kBk + x] = 0.f;
}

// Packs rows [j0, j0+nk) of kv head hk into dst [nk, Dhp], times a.
void pack_rows(float* dst, const float* src, float a, int64_t b, int64_t hk, int64_t j0, int64_t nk, int64_t Tcap,
               int64_t Hkv, int64_t Dh, int64_t Dhp) {
  for (int64_t j = 0; j < nk; j++) copy_scaled_pad(dst + j * Dhp, src + ((b * Tcap + j0 + j) * Hkv + hk) * Dh, a, Dh, Dhp);
}

// Runs fn(item, state) for item in [0, n), items handed out in index order by an atomic counter; each
// compute thread has its own default-constructed State (scratch buffers, allocated on first use).
template <class State, class F>
void run_dynamic(int64_t n, F&& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  parallel_run([&](int, int) {
    State st;
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      fn(i, st);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Forward

// Online-softmax state of one (b, hk, query block): qs = scale q [rows, Dhp], O [rows, Dhp], m, l [rows].
struct FwdState {
  Buffer<float> qs, o, m, l;
  void init(int64_t rows, int64_t Dhp) {
    if (!qs.empty()) return;
    qs.assign(size_t(rows * Dhp), 0.f);
    o.assign(size_t(rows * Dhp), 0.f);
    m.assign(size_t(rows), 0.f);
    l.assign(size_t(rows), 0.f);
  }
};

// Per-tile scratch: kT [Dh, kBk], packed V [kBk, Dhp], scores / P [rows, kBk].
struct FwdScratch {
  Buffer<float> kt, vp, s;
  void init(int64_t rows, int64_t Dh, int64_t Dhp) {
    if (!s.empty()) return;
    kt.assign(size_t(Dh * kBk), 0.f);
    vp.assign(size_t(kBk * Dhp), 0.f);
    s.assign(size_t(rows * kBk), 0.f);
  }
};

// Thread state of the forward: one FwdState per kv head handled at once (1, or Hkv when the heads of
// a position are walked together), and the shared tile scratch.
struct FwdBufs {
  Buffer<FwdState> st;
  FwdScratch sc;
};

struct FwdPlan {
  int64_t G, Dhp, Bq, nqb, rows_max, S, kt_max;
};

// Starts (b, hk, query block qb): packs scale * q, resets m, l, O. Returns the number of rows.
int64_t fwd_begin(const AttentionParams& p, const FwdPlan& pl, FwdState& w, int64_t b, int64_t hk, int64_t qb) {
  const int64_t G = pl.G, Dh = p.Dh, Dhp = pl.Dhp;
  const int64_t i0 = qb * pl.Bq, i1 = std::min(p.Tq, i0 + pl.Bq);
  const int64_t nrows = (i1 - i0) * G;
  for (int64_t r = 0; r < nrows; r++) {
    const float* src = p.q + ((b * p.Tq + i0 + r / G) * p.H + hk * G + r % G) * Dh;  // [Dh]
    copy_scaled_pad(w.qs.data() + r * Dhp, src, p.scale, Dh, Dhp);
    w.m[size_t(r)] = kNegInf;
    w.l[size_t(r)] = 0.f;
  }
  fill(w.o.begin(), w.o.begin() + nrows * Dhp, 0.f);
  return nrows;
}

// Adds key tile kt to the state of (b, hk, qb). Returns false when no row of the block sees the tile
// (nor any later one).
bool fwd_tile(const AttentionParams& p, const FwdPlan& pl, FwdState& w, FwdScratch& sc, int64_t b, int64_t hk,
              int64_t qb, int64_t kt) {
  const int64_t G = pl.G, Dh = p.Dh, Dhp = pl.Dhp;
  const int64_t i0 = qb * pl.Bq, i1 = std::min(p.Tq, i0 + pl.Bq);
  const int64_t nrows = (i1 - i0) * G;
  const int64_t pos0 = p.Tk - p.Tq + i0;  // position of the block's first query
  const int64_t kend = p.Tk - p.Tq + i1;  // keys [0, kend) are visible to some row
  const bool few = nrows <= 4;            // too few rows for the packed K^T tile to pay off
  {
    const int64_t j0 = kt * kBk;
    if (j0 >= kend) return false;
    const int64_t nk = std::min(kBk, kend - j0), nkp = round_up(nk, 2 * W);
    const int64_t r0 = std::max<int64_t>(0, (j0 - pos0) * G);  // first row that sees key j0
    if (r0 >= nrows) return false;
    const int64_t lds = p.Hkv * Dh;                           // floats between positions in k, v
    const float* kb = p.k + ((b * p.Tcap + j0) * p.Hkv + hk) * Dh;  // key j at kb + j * lds
    const float* vb = p.v + ((b * p.Tcap + j0) * p.Hkv + hk) * Dh;
    float* S = sc.s.data();  // [rows, kBk]
    // Visible keys of row r0 + x: nv(x) = min(nk, pos0 + (r0 + x) / G - j0 + 1) >= 1.
    auto nv_of = [&](int64_t x) { return std::min(nk, pos0 + (r0 + x) / G - j0 + 1); };
    if (few) {  // decode: dot products straight from the cache, no packing
      const int64_t nvmax = nv_of(nrows - 1 - r0);
      for (int64_t j = 0; j < nvmax; j++) {
        // The rows of one head are lds apart: too sparse for the hardware prefetcher to run ahead.
        if (j0 + j + kAhead < p.Tk)
          for (int64_t e = 0; e < Dh; e += 16) {
            __builtin_prefetch(kb + (j + kAhead) * lds + e);
            __builtin_prefetch(vb + (j + kAhead) * lds + e);
          }
        for (int64_t r = r0; r < nrows; r++) S[r * kBk + j] = dot(w.qs.data() + r * Dhp, kb + j * lds, Dh);
      }
    } else {
      pack_kt(sc.kt.data(), p.k, b, hk, j0, nk, nkp, p.Tcap, p.Hkv, Dh);
      gemm_abt(w.qs.data() + r0 * Dhp, Dhp, sc.kt.data(), kBk, Dh, S + r0 * kBk, kBk, nrows - r0, nv_of);
    }
    // V rows are read in place when whole vectors fit them (Dh % W == 0), else packed (padded).
    const float* X = vb;
    int64_t ldx = lds;
    if (Dh % W != 0) {
      pack_rows(sc.vp.data(), p.v, 1.f, b, hk, j0, nk, p.Tcap, p.Hkv, Dh, Dhp);
      X = sc.vp.data(), ldx = Dhp;
    }
    for (int64_t r = r0; r < nrows; r++) {
      float* s = S + r * kBk;  // [kBk]
      const int64_t nv = std::min(nk, pos0 + r / G - j0 + 1);  // visible keys of this row, >= 1
      vf vm = set1(kNegInf);
      int64_t j = 0;
      for (; j + W <= nv; j += W) vm = max(vm, load(s + j));
      float mx = reduce_max(vm);
      for (; j < nv; j++) mx = std::max(mx, s[j]);
      const float m_old = w.m[size_t(r)];
      const float m_new = std::max(m_old, mx);
      const float alpha = std::exp(m_old - m_new);  // 0 on the first tile (m_old = -inf, m_new finite)
      const vf vmn = set1(m_new);
      vf vsum = zero();
      j = 0;
      for (; j + W <= nv; j += W) {
        const vf e = exp(load(s + j) - vmn);
        store(s + j, e);
        vsum += e;
      }
      float sum = reduce_add(vsum);
      if (j < nv) {
        store_partial(s + j, exp(load_partial(s + j, int(nv - j)) - vmn), int(nv - j));
        for (; j < nv; j++) sum += s[j];
      }
      for (j = nv; j < nk; j++) s[j] = 0.f;
      w.l[size_t(r)] = w.l[size_t(r)] * alpha + sum;
      w.m[size_t(r)] = m_new;
      if (alpha != 1.f) {
        float* o = w.o.data() + r * Dhp;
        const vf va = set1(alpha);
        for (int64_t e = 0; e < Dhp; e += W) store(o + e, load(o + e) * va);
      }
    }
    gemm_px(S + r0 * kBk, kBk, 1, X, ldx, w.o.data() + r0 * Dhp, Dhp, nrows - r0, Dhp,
            [&](int64_t, int64_t last, int64_t& k0, int64_t& k1) { k0 = 0, k1 = nv_of(last); });
  }
  return true;
}

// Writes the normalised rows of block (b, hk, qb) from O [rows, Dhp], m, l.
void fwd_store(const AttentionParams& p, const FwdPlan& pl, const float* O, const float* m, const float* l, int64_t b,
               int64_t hk, int64_t qb, int64_t nrows) {
  const int64_t G = pl.G, Dh = p.Dh, i0 = qb * pl.Bq;
  for (int64_t r = 0; r < nrows; r++) {
    const int64_t i = i0 + r / G, h = hk * G + r % G;
    copy_scaled_pad(p.out + ((b * p.Tq + i) * p.H + h) * Dh, O + r * pl.Dhp, 1.f / l[r], Dh, Dh);
    if (p.lse) p.lse[(b * p.H + h) * p.Tq + i] = m[r] + std::log(l[r]);
  }
}
}  // namespace

void attention_forward(const AttentionParams& p) {
  FwdPlan pl;
  pl.G = p.H / p.Hkv;
  pl.Dhp = round_up(p.Dh, W);
  pl.Bq = std::max<int64_t>(1, std::min<int64_t>(kBq / pl.G, p.Tq));  // ~kBq rows per block
  pl.nqb = cdiv(p.Tq, pl.Bq);
  pl.rows_max = pl.Bq * pl.G;
  pl.kt_max = cdiv(p.Tk, kBk);
  const int nth = num_threads();
  // Decode (one query block of few rows): an item walks all kv heads of each key tile, so the cache
  // [Tcap, Hkv, Dh] is read contiguously instead of one Dh slice every Hkv * Dh floats.
  const int64_t NH = (pl.nqb == 1 && pl.rows_max <= 16) ? p.Hkv : 1;  // kv heads per item
  const int64_t ngroups = p.B * (p.Hkv / NH);                         // (b, head group) pairs
  const int64_t items0 = ngroups * pl.nqb;
  const int64_t nslots = p.B * p.Hkv * pl.nqb;  // (b, hk, qb) outputs
  pl.S = 1;
  if (items0 < 2 * int64_t(nth))  // too few items for the threads: split the keys (decode)
    pl.S = std::max<int64_t>(1, std::min<int64_t>(cdiv(4 * int64_t(nth), items0), pl.kt_max / 4));
  const int64_t Dhp = pl.Dhp, rows = pl.rows_max, S = pl.S;

  // Partial states of split items: [nslots, S, rows, Dhp], [nslots, S, rows] x 2.
  Buffer<float> part_o, part_m, part_l;
  if (S > 1) {
    part_o.assign(size_t(nslots * S * rows * Dhp), 0.f);
    part_m.assign(size_t(nslots * S * rows), kNegInf);
    part_l.assign(size_t(nslots * S * rows), 0.f);
  }
  // Item order. Many groups: group by group, so one thread's consecutive query blocks reuse the
  // group's K/V from its cache; the dynamic hand-out balances the groups. Few groups: largest items
  // (last query blocks, most keys) first, across groups, for balance. Splits innermost.
  const bool by_group = ngroups >= 4 * int64_t(nth);
  const int64_t nhg = p.Hkv / NH;  // head groups per sequence
  run_dynamic<FwdBufs>(items0 * S, [&](int64_t it, FwdBufs& w) {
    if (w.st.empty()) {
      w.st.resize(size_t(NH));
      for (auto& st : w.st) st.init(rows, Dhp);
      w.sc.init(rows, p.Dh, Dhp);
    }
    const int64_t s = it % S, bh = it / S;
    int64_t hg, b, qb;
    if (by_group) {
      qb = pl.nqb - 1 - bh % pl.nqb, hg = (bh / pl.nqb) % nhg, b = bh / (pl.nqb * nhg);
    } else {
      hg = bh % nhg, b = (bh / nhg) % p.B, qb = pl.nqb - 1 - bh / (nhg * p.B);
    }
    const int64_t i1 = std::min(p.Tq, (qb + 1) * pl.Bq);
    const int64_t ntiles = cdiv(p.Tk - p.Tq + i1, kBk);
    const int64_t t0 = ntiles * s / S, t1 = ntiles * (s + 1) / S;
    int64_t nrows = 0;
    for (int64_t x = 0; x < NH; x++) nrows = fwd_begin(p, pl, w.st[size_t(x)], b, hg * NH + x, qb);
    for (int64_t kt = t0; kt < t1; kt++) {
      bool more = false;  // the same for every head of the item (same rows and keys)
      for (int64_t x = 0; x < NH; x++) more = fwd_tile(p, pl, w.st[size_t(x)], w.sc, b, hg * NH + x, qb, kt);
      if (!more) break;
    }
    for (int64_t x = 0; x < NH; x++) {
      const FwdState& st = w.st[size_t(x)];
      const int64_t hk = hg * NH + x;
      if (S == 1) {
        fwd_store(p, pl, st.o.data(), st.m.data(), st.l.data(), b, hk, qb, nrows);
      } else {
        const int64_t slot = (b * p.Hkv + hk) * pl.nqb + qb;
        copy(st.o.begin(), st.o.begin() + nrows * Dhp, part_o.begin() + (slot * S + s) * rows * Dhp);
        copy(st.m.begin(), st.m.begin() + nrows, part_m.begin() + (slot * S + s) * rows);
        copy(st.l.begin(), st.l.begin() + nrows, part_l.begin() + (slot * S + s) * rows);
      }
    }
  });
  if (S == 1) return;
  // Combine the splits: M = max m_s, L = sum l_s e^(m_s - M), O = sum O_s e^(m_s - M). A split that saw
  // no key of a row has l = 0, m = -inf, O = 0 and weighs 0. Split 0 always holds key 0.
  parallel_for(nslots, 1, [&](int64_t i0, int64_t i1, int) {
    Buffer<float> o(static_cast<size_t>(rows * Dhp)), m(static_cast<size_t>(rows)), l(static_cast<size_t>(rows));
    for (int64_t slot = i0; slot < i1; slot++) {
      const int64_t qb = slot % pl.nqb, hk = (slot / pl.nqb) % p.Hkv, b = slot / (pl.nqb * p.Hkv);
      const int64_t nrows = (std::min(p.Tq, (qb + 1) * pl.Bq) - qb * pl.Bq) * pl.G;
      for (int64_t r = 0; r < nrows; r++) {
        float M = kNegInf;
        for (int64_t s = 0; s < S; s++) M = std::max(M, part_m[size_t((slot * S + s) * rows + r)]);
        float L = 0.f;
        float* orow = o.data() + r * Dhp;
        fill(orow, orow + Dhp, 0.f);
        for (int64_t s = 0; s < S; s++) {
          const size_t k = size_t((slot * S + s) * rows + r);
          if (part_l[k] == 0.f) continue;
          const float a = std::exp(part_m[k] - M);
          L += part_l[k] * a;
          const float* po = part_o.data() + k * Dhp;
          const vf va = set1(a);
          for (int64_t e = 0; e < Dhp; e += W) store(orow + e, fmadd(load(po + e), va, load(orow + e)));
        }
        m[size_t(r)] = M;
        l[size_t(r)] = L;
      }
      fwd_store(p, pl, o.data(), m.data(), l.data(), b, hk, qb, nrows);
    }
  });
}

// --------------------------------------------------------------------------------------------------
// Backward

namespace {
constexpr int64_t kKeyChunkFloats = int64_t(1) << 18;  // key-side buffers of one chunk: ~1 MiB

struct BwdBufs {
  // Query side (one query block of one head): qs = scale q, dO, lse, Di, dQ accumulator.
  Buffer<float> qs, dO, lse, di, dq;
  // Key side of a chunk of KC key blocks of one kv head (slot x = block kc0 + x): kT, vT transposed
  // [KC, Dh, kBk]; ks = scale k, and the dK/dV accumulators, [KC * kBk, Dhp].
  Buffer<float> kt, vt, ks, dk, dv;
  Buffer<float> s, dp;  // [kBq, kBk] P and dS tiles
  void init(int64_t Dh, int64_t Dhp, int64_t KC) {
    if (!qs.empty()) return;
    qs.assign(size_t(kBq * Dhp), 0.f);
    dO.assign(size_t(kBq * Dhp), 0.f);
    dq.assign(size_t(kBq * Dhp), 0.f);
    lse.assign(size_t(kBq), 0.f);
    di.assign(size_t(kBq), 0.f);
    kt.assign(size_t(KC * Dh * kBk), 0.f);
    vt.assign(size_t(KC * Dh * kBk), 0.f);
    ks.assign(size_t(KC * kBk * Dhp), 0.f);
    dk.assign(size_t(KC * kBk * Dhp), 0.f);
    dv.assign(size_t(KC * kBk * Dhp), 0.f);
    s.assign(size_t(kBq * kBk), 0.f);
    dp.assign(size_t(kBq * kBk), 0.f);
  }
};

struct BwdCtx {
  const AttentionBackwardParams& p;
  int64_t G, Dhp, nb;  // nb blocks of kBq (= kBk) positions
  const float* D;      // [B, H, T] rowsum(dout * out)
};

// Packs the query side of (b, h, query block qb); returns the number of rows.
int64_t pack_q(const BwdCtx& c, BwdBufs& w, int64_t b, int64_t h, int64_t qb) {
  const auto& p = c.p;
  const int64_t i0 = qb * kBq, nq = std::min(kBq, p.T - i0);
  for (int64_t r = 0; r < nq; r++) {
    const int64_t off = ((b * p.T + i0 + r) * p.H + h) * p.Dh;
    copy_scaled_pad(w.qs.data() + r * c.Dhp, p.q + off, p.scale, p.Dh, c.Dhp);
    copy_scaled_pad(w.dO.data() + r * c.Dhp, p.dout + off, 1.f, p.Dh, c.Dhp);
    w.lse[size_t(r)] = p.lse[(b * p.H + h) * p.T + i0 + r];
    w.di[size_t(r)] = c.D[(b * p.H + h) * p.T + i0 + r];
  }
  return nq;
}

// Packs the key side of (b, hk, key block kb) into slot x; ks only when the dQ product needs it.
int64_t pack_k(const BwdCtx& c, BwdBufs& w, int64_t b, int64_t hk, int64_t kb, int64_t x, bool need_ks) {
  const auto& p = c.p;
  const int64_t j0 = kb * kBk, nk = std::min(kBk, p.T - j0), nkp = round_up(nk, 2 * W);
  pack_kt(w.kt.data() + x * p.Dh * kBk, p.k, b, hk, j0, nk, nkp, p.T, p.Hkv, p.Dh);
  pack_kt(w.vt.data() + x * p.Dh * kBk, p.v, b, hk, j0, nk, nkp, p.T, p.Hkv, p.Dh);
  if (need_ks) pack_rows(w.ks.data() + x * kBk * c.Dhp, p.k, p.scale, b, hk, j0, nk, p.T, p.Hkv, p.Dh, c.Dhp);
  return nk;
}

// One (query block at i0, nq rows) x (key block at j0, nk keys, slot x) tile. Adds into the slot's
// dK/dV rows when dkdv, into w.dq (rows [0, nq)) when dq.
void bwd_tile(const BwdCtx& c, BwdBufs& w, int64_t i0, int64_t nq, int64_t j0, int64_t nk, int64_t x, bool dkdv,
              bool dq) {
  const int64_t Dh = c.p.Dh, Dhp = c.Dhp;
  const int64_t r0 = std::max<int64_t>(0, j0 - i0);  // rows before r0 see no key of the block
  if (r0 >= nq) return;
  const int64_t M = nq - r0;
  const float* kt = w.kt.data() + x * Dh * kBk;  // [Dh, kBk]
  const float* vt = w.vt.data() + x * Dh * kBk;  // [Dh, kBk]
  float* S = w.s.data() + r0 * kBk;    // [M, kBk] scores, then P
  float* dP = w.dp.data() + r0 * kBk;  // [M, kBk] dP, then dS
  // Visible keys of row r0 + y: nv(y) = min(nk, i0 + r0 + y - j0 + 1) >= 1; query row y sees key z
  // iff y >= z + j0 - i0 - r0.
  auto nv_of = [&](int64_t y) { return std::min(nk, i0 + r0 + y - j0 + 1); };
  gemm_abt(w.qs.data() + r0 * Dhp, Dhp, kt, kBk, Dh, S, kBk, M, nv_of);
  gemm_abt(w.dO.data() + r0 * Dhp, Dhp, vt, kBk, Dh, dP, kBk, M, nv_of);
  for (int64_t r = 0; r < M; r++) {
    float* s = S + r * kBk;
    float* g = dP + r * kBk;
    const int64_t nv = nv_of(r);
    const vf vl = set1(w.lse[size_t(r0 + r)]), vd = set1(w.di[size_t(r0 + r)]);
    int64_t j = 0;
    for (; j + W <= nv; j += W) {
      const vf P = exp(load(s + j) - vl);
      store(s + j, P);
      store(g + j, P * (load(g + j) - vd));
    }
    if (j < nv) {
      const int n = int(nv - j);
      const vf P = exp(load_partial(s + j, n) - vl);
      store_partial(s + j, P, n);
      store_partial(g + j, P * (load_partial(g + j, n) - vd), n);
    }
    for (j = nv; j < nk; j++) s[j] = g[j] = 0.f;
  }
  if (dkdv) {
    // dV [nk, Dhp] += P^T dO, dK [nk, Dhp] += dS^T (scale q): P read transposed (psm = 1, psk = kBk).
    auto queries = [&](int64_t first, int64_t, int64_t& k0, int64_t& k1) {
      k0 = std::max<int64_t>(0, first + j0 - i0 - r0), k1 = M;
    };
    gemm_px(S, 1, kBk, w.dO.data() + r0 * Dhp, Dhp, w.dv.data() + x * kBk * Dhp, Dhp, nk, Dhp, queries);
    gemm_px(dP, 1, kBk, w.qs.data() + r0 * Dhp, Dhp, w.dk.data() + x * kBk * Dhp, Dhp, nk, Dhp, queries);
  }
  if (dq)
    gemm_px(dP, kBk, 1, w.ks.data() + x * kBk * Dhp, Dhp, w.dq.data() + r0 * Dhp, Dhp, M, Dhp,
            [&](int64_t, int64_t last, int64_t& k0, int64_t& k1) { k0 = 0, k1 = nv_of(last); });
}

// Writes rows [0, n) of acc [n, Dhp] to dst rows (b, t0 + r, head) of a [B, T, nh, Dh] tensor.
void store_rows(float* dst, const float* acc, int64_t b, int64_t t0, int64_t n, int64_t head, int64_t T, int64_t nh,
                int64_t Dh, int64_t Dhp) {
  for (int64_t r = 0; r < n; r++) copy_scaled_pad(dst + ((b * T + t0 + r) * nh + head) * Dh, acc + r * Dhp, 1.f, Dh, Dh);
}

// One-pass item (b, hk): key blocks in chunks of KC; per chunk the key side is packed once, then every
// query block of every head of the group at or after the chunk runs against the chunk's blocks,
// adding into the chunk's dK/dV and into its own dQ tile (kept in p.dq between chunks).
void bwd_group(const BwdCtx& c, BwdBufs& w, int64_t b, int64_t hk, int64_t KC) {
  const auto& p = c.p;
  const int64_t Dhp = c.Dhp;
  for (int64_t kc0 = 0; kc0 < c.nb; kc0 += KC) {
    const int64_t kc1 = std::min(c.nb, kc0 + KC);
    int64_t nk[64];  // keys per block of the chunk (KC <= 64)
    for (int64_t kb = kc0; kb < kc1; kb++) nk[kb - kc0] = pack_k(c, w, b, hk, kb, kb - kc0, true);
    fill(w.dk.begin(), w.dk.begin() + (kc1 - kc0) * kBk * Dhp, 0.f);
    fill(w.dv.begin(), w.dv.begin() + (kc1 - kc0) * kBk * Dhp, 0.f);
    for (int64_t g = 0; g < c.G; g++) {
      const int64_t h = hk * c.G + g;
      for (int64_t qb = kc0; qb < c.nb; qb++) {  // kBq == kBk: earlier query blocks see none of the chunk
        const int64_t nq = pack_q(c, w, b, h, qb), i0 = qb * kBq;
        if (kc0 == 0)
          fill(w.dq.begin(), w.dq.end(), 0.f);
        else
          for (int64_t r = 0; r < nq; r++)
            copy_scaled_pad(w.dq.data() + r * Dhp, p.dq + ((b * p.T + i0 + r) * p.H + h) * p.Dh, 1.f, p.Dh, Dhp);
        for (int64_t kb = kc0; kb < std::min(kc1, qb + 1); kb++)
          bwd_tile(c, w, i0, nq, kb * kBk, nk[kb - kc0], kb - kc0, true, true);
        store_rows(p.dq, w.dq.data(), b, i0, nq, h, p.T, p.H, p.Dh, Dhp);
      }
    }
    for (int64_t kb = kc0; kb < kc1; kb++) {
      const float* dk = w.dk.data() + (kb - kc0) * kBk * Dhp;
      const float* dv = w.dv.data() + (kb - kc0) * kBk * Dhp;
      store_rows(p.dk, dk, b, kb * kBk, nk[kb - kc0], hk, p.T, p.Hkv, p.Dh, Dhp);
      store_rows(p.dv, dv, b, kb * kBk, nk[kb - kc0], hk, p.T, p.Hkv, p.Dh, Dhp);
    }
  }
}
}  // namespace

void attention_backward(const AttentionBackwardParams& p) {
  const int64_t B = p.B, T = p.T, H = p.H, Hkv = p.Hkv, Dh = p.Dh;
  const int nth = num_threads();
  Buffer<float> D(static_cast<size_t>(B * H * T));  // [B, H, T]
  parallel_for(B * T, std::max<int64_t>(1, 8192 / (H * Dh)), [&](int64_t n0, int64_t n1, int) {
    for (int64_t n = n0; n < n1; n++) {
      const int64_t b = n / T, t = n % T;
      for (int64_t h = 0; h < H; h++) {
        const int64_t off = (n * H + h) * Dh;
        D[size_t((b * H + h) * T + t)] = dot(p.dout + off, p.out + off, Dh);
      }
    }
  });
  BwdCtx c{p, H / Hkv, round_up(Dh, W), cdiv(T, kBq), D.data()};
  const int64_t items = B * Hkv;
  if (nth == 1 || items % nth == 0 || items >= 4 * int64_t(nth)) {
    // One pass per (b, hk): equal-cost items. Key chunks of KC blocks bound the per-thread buffers.
    const int64_t per_block = 2 * Dh * kBk + 3 * kBk * c.Dhp;
    const int64_t KC = std::max<int64_t>(1, std::min<int64_t>({c.nb, 64, kKeyChunkFloats / per_block}));
    run_dynamic<BwdBufs>(items, [&](int64_t it, BwdBufs& w) {
      w.init(Dh, c.Dhp, KC);
      bwd_group(c, w, it / Hkv, it % Hkv, KC);
    });
    return;
  }
  // Pass 1: dK, dV per (b, hk, key block); first key blocks (most query blocks) first.
  run_dynamic<BwdBufs>(B * Hkv * c.nb, [&](int64_t it, BwdBufs& w) {
    w.init(Dh, c.Dhp, 1);
    const int64_t kb = it / (B * Hkv), b = (it / Hkv) % B, hk = it % Hkv;
    const int64_t nk = pack_k(c, w, b, hk, kb, 0, false);
    fill(w.dk.begin(), w.dk.end(), 0.f);
    fill(w.dv.begin(), w.dv.end(), 0.f);
    for (int64_t g = 0; g < c.G; g++)
      for (int64_t qb = kb; qb < c.nb; qb++) {
        const int64_t nq = pack_q(c, w, b, hk * c.G + g, qb);
        bwd_tile(c, w, qb * kBq, nq, kb * kBk, nk, 0, true, false);
      }
    store_rows(p.dk, w.dk.data(), b, kb * kBk, nk, hk, T, Hkv, Dh, c.Dhp);
    store_rows(p.dv, w.dv.data(), b, kb * kBk, nk, hk, T, Hkv, Dh, c.Dhp);
  });
  // Pass 2: dQ per (b, h, query block); last query blocks (most key blocks) first.
  run_dynamic<BwdBufs>(B * H * c.nb, [&](int64_t it, BwdBufs& w) {
    w.init(Dh, c.Dhp, 1);
    const int64_t qb = c.nb - 1 - it / (B * H), b = (it / H) % B, h = it % H, hk = h / c.G;
    const int64_t nq = pack_q(c, w, b, h, qb), i0 = qb * kBq;
    fill(w.dq.begin(), w.dq.end(), 0.f);
    for (int64_t kb = 0; kb <= qb; kb++) {
      const int64_t nk = pack_k(c, w, b, hk, kb, 0, true);
      bwd_tile(c, w, i0, nq, kb * kBk, nk, 0, false, true);
    }
    store_rows(p.dq, w.dq.data(), b, i0, nq, h, T, H, Dh, c.Dhp);
  });
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
