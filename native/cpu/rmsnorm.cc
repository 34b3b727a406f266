// cpu/rmsnorm.cc: RMSNorm forward and backward, SIMD over D, threads over rows.
//
// Forward: one pass for sum(x^2), one for y. Backward: dx per row in two passes; dw needs a sum over
// rows, so each thread accumulates into its own [D] partial and the partials are added in thread
// order at the end (deterministic for a given thread count). Legend: N rows, D width.

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "isa_begin.h"

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

namespace {
inline float dot_tail(const float* a, const float* b, int64_t D) {  // sum_d a[d] b[d]
  vf acc0 = zero(), acc1 = zero();
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    acc0 = fmadd(load(a + d), load(b + d), acc0);
    acc1 = fmadd(load(a + d + W), load(b + d + W), acc1);
  }
  for (; d + W <= D; d += W) acc0 = fmadd(load(a + d), load(b + d), acc0);
  if (d < D) acc1 = fmadd(load_partial(a + d, int(D - d)), load_partial(b + d, int(D - d)), acc1);
  return reduce_add(acc0 + acc1);
}
}  // namespace

void rmsnorm_forward(const RmsNormParams& p) {
  const int64_t D = p.D;
  parallel_for(p.N, std::max<int64_t>(1, 4096 / D), [&](int64_t n0, int64_t n1, int) {
    for (int64_t n = n0; n < n1; n++) {
      const float* x = p.x + n * D;  // [D]
      float* y = p.y + n * D;        // [D]
      const float r = 1.f / std::sqrt(dot_tail(x, x, D) / float(D) + p.eps);
      const vf vr = set1(r);
      int64_t d = 0;
      for (; d + W <= D; d += W) store(y + d, load(x + d) * vr * load(p.w + d));
      if (d < D) store_partial(y + d, load_partial(x + d, int(D - d)) * vr * load_partial(p.w + d, int(D - d)), int(D - d));
      if (p.rstd) p.rstd[n] = r;
    }
  });
}

void rmsnorm_backward(const RmsNormBackwardParams& p) {
  const int64_t D = p.D;
  const int T = num_threads();
  Buffer<float> dw_part(p.dw ? size_t(T) * D : 0, 0.f);  // [T, D]
  parallel_for(p.N, std::max<int64_t>(1, 2048 / D), [&](int64_t n0, int64_t n1, int t) {
    float* dwp = p.dw ? dw_part.data() + size_t(t) * D : nullptr;
    for (int64_t n = n0; n < n1; n++) {
      const float* x = p.x + n * D;
      const float* dy = p.dy + n * D;
      float* dx = p.dx + n * D;
      const float r = p.rstd[n];
      // dot = sum dy*w*x
      vf acc = zero();
      int64_t d = 0;
      for (; d + W <= D; d += W) acc = fmadd(load(dy + d) * load(p.w + d), load(x + d), acc);
      if (d < D) {
        int k = int(D - d);
        acc = fmadd(load_partial(dy + d, k) * load_partial(p.w + d, k), load_partial(x + d, k), acc);
      }
      const float c = reduce_add(acc) * r * r * r / float(D);
      const vf vr = set1(r), vc = set1(c);
      d = 0;
      for (; d + W <= D; d += W) {
        vf xv = load(x + d), dyv = load(dy + d);
        if (dwp) store(dwp + d, fmadd(dyv * xv, vr, load(dwp + d)));
        store(dx + d, fnmadd(vc, xv, vr * dyv * load(p.w + d)));
      }
      if (d < D) {
        int k = int(D - d);
        vf xv = load_partial(x + d, k), dyv = load_partial(dy + d, k);
        if (dwp) store_partial(dwp + d, fmadd(dyv * xv, vr, load_partial(dwp + d, k)), k);
        store_partial(dx + d, fnmadd(vc, xv, vr * dyv * load_partial(p.w + d, k)), k);
      }
    }
  });
  if (p.dw)
    for (int t = 0; t < T; t++)
      for (int64_t d = 0; d < D; d++) p.dw[d] += dw_part[size_t(t) * D + d];
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
