// cpu/adamw.cc: AdamW with global gradient-norm clipping, two passes over the buffers.
//
// Pass 1 (only when the norm is wanted: clipping on, or grad_norm requested): sum of g^2 with the
// squares accumulated in double (4 double lanes x 2 accumulators; the pass is memory-bound,
// so the double arithmetic is free) into one partial per thread; the partials are added in thread order,
// so the norm is deterministic for a given thread count. grad_scale is applied once to the total.
// Pass 2: one fused vectorised pass reading g, m, v, p and writing m, v, p (28 bytes per element), with
// the clip factor and grad_scale folded into one multiplier and the bias corrections (1 - beta^t, in
// double) folded into two constants. The decayed range [0, n_decay) and the rest run the same loop with
// the decay coefficient set to 0 for the second, so there is no per-element branch.
// Legend: n elements.

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "isa_begin.h"

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

namespace {

inline vf vsqrt(vf a) {
#if BTS_ISA_LEVEL == 3
  return {_mm512_maskz_sqrt_ps(__mmask16(0xFFFF), a.v)};  // (maskz: GCC 12 false-warns on _mm512_sqrt_ps)
#elif BTS_ISA_LEVEL == 2
  return {_mm256_sqrt_ps(a.v)};
#else
  return {std::sqrt(a.v)};
#endif
}

// sum_i g[i]^2 over [0, n) in double.
double sum_squares(const float* g, int64_t n) {
  int64_t i = 0;
  double total = 0;
#if BTS_ISA_LEVEL >= 2
  // 256-bit double lanes at both vector levels: the pass is memory-bound (and GCC 12 warns on
  // _mm512_cvtps_pd with a false "uninitialized").
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  for (; i + 8 <= n; i += 8) {
    __m256d lo = _mm256_cvtps_pd(_mm_loadu_ps(g + i));
    __m256d hi = _mm256_cvtps_pd(_mm_loadu_ps(g + i + 4));
    a0 = _mm256_fmadd_pd(lo, lo, a0);
    a1 = _mm256_fmadd_pd(hi, hi, a1);
  }
  __m256d s = _mm256_add_pd(a0, a1);
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  total = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#endif
  for (; i < n; i++) total += double(g[i]) * double(g[i]);
  return total;
}

// The fused update of [i0, i1) with weight decay coefficient wd_lr = lr * weight_decay (0: none).
struct Consts {
  float gmul, b1, omb1, b2, omb2, inv_bc1, inv_bc2, eps, lr, wd_lr;
};

inline vf update(const Consts& c, vf g, vf& m, vf& v, vf p) {
  g = g * set1(c.gmul);
  m = fmadd(set1(c.b1), m, set1(c.omb1) * g);
  v = fmadd(set1(c.b2), v, set1(c.omb2) * g * g);
  const vf mhat = m * set1(c.inv_bc1);
  const vf denom = vsqrt(v * set1(c.inv_bc2)) + set1(c.eps);
  // p - lr * (mhat / denom + wd * p)
  return fnmadd(set1(c.lr), mhat / denom, fnmadd(set1(c.wd_lr), p, p));
}

void update_range(const AdamWParams& a, const Consts& c, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + W <= i1; i += W) {
    vf m = load(a.m + i), v = load(a.v + i);
    const vf p = update(c, load(a.g + i), m, v, load(a.p + i));
    store(a.m + i, m);
    store(a.v + i, v);
    store(a.p + i, p);
  }
  if (i < i1) {
    const int k = int(i1 - i);
    vf m = load_partial(a.m + i, k), v = load_partial(a.v + i, k);
    const vf p = update(c, load_partial(a.g + i, k), m, v, load_partial(a.p + i, k));
    store_partial(a.m + i, m, k);
    store_partial(a.v + i, v, k);
    store_partial(a.p + i, p, k);
  }
}

}  // namespace

void adamw_step(const AdamWParams& a) {
  const int64_t n = a.n;
  const int64_t grain = 1 << 15;
  double clip = 1.0;
  if (a.max_grad_norm > 0 || a.grad_norm) {
    const int T = num_threads();
    Buffer<double> part(size_t(T), 0.0);
    parallel_for(n, grain, [&](int64_t i0, int64_t i1, int t) { part[size_t(t)] += sum_squares(a.g + i0, i1 - i0); });
    double ss = 0;
    for (int t = 0; t < T; t++) ss += part[size_t(t)];
    const double norm = std::fabs(double(a.grad_scale)) * std::sqrt(ss);
    if (a.grad_norm) *a.grad_norm = float(norm);
    if (a.max_grad_norm > 0 && norm > double(a.max_grad_norm)) clip = double(a.max_grad_norm) / norm;
  }
  Consts c;
  c.gmul = float(double(a.grad_scale) * clip);
  c.b1 = a.beta1;
  c.omb1 = float(1.0 - double(a.beta1));
  c.b2 = a.beta2;
  c.omb2 = float(1.0 - double(a.beta2));
  c.inv_bc1 = float(1.0 / (1.0 - std::pow(double(a.beta1), double(a.step))));
  c.inv_bc2 = float(1.0 / (1.0 - std::pow(double(a.beta2), double(a.step))));
  c.eps = a.eps;
  c.lr = a.lr;
  c.wd_lr = float(double(a.lr) * double(a.weight_decay));
  Consts c0 = c;
  c0.wd_lr = 0.f;
  parallel_for(n, grain, [&](int64_t i0, int64_t i1, int) {
    const int64_t split = std::min(std::max(a.n_decay, i0), i1);  // [i0, split) decayed, [split, i1) not
    if (i0 < split) update_range(a, c, i0, split);
    if (split < i1) update_range(a, c0, split, i1);
  });
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
