// cpu/swiglu.cc: SwiGLU forward and backward, element-wise over the flat [N*F] buffers.
//
// The rows are contiguous, so the kernels treat [N, F] as one flat array split over the threads in
// chunks that are multiples of 64 floats (no false sharing between threads; the tail is one partial
// vector). sigmoid is simd::sigmoid (polynomial exp, ~2e-7 relative error). Memory-bound: forward
// moves 12 bytes per element, backward 20. Outputs may alias inputs of the same index (each vector
// is read before it is written). Legend: N rows, F ffn width.
#include "bts/ops.h"
#include "bts/threadpool.h"
#include "isa_begin.h"

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

namespace {
constexpr int64_t kBlock = 64;  // floats per scheduling unit
// simd::exp clamps its argument at 88.7, so sigmoid(g) bottoms out at ~3e-39 for g < -88.7 instead
// of going to 0; z * sigmoid(z) would then be wrong for huge negative z (-3e38 * 3e-39 = -0.9). The
// gate is clamped at -88 where it multiplies (silu(-88) ~ -5e-37, true value for anything below: ~0).
inline vf clamp_gate(vf g) { return max(g, set1(-88.f)); }
}  // namespace

void swiglu_forward(const SwigluParams& p) {
  const int64_t n = p.N * p.F;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for(blocks, 256, [&](int64_t b0, int64_t b1, int) {
    const int64_t i0 = b0 * kBlock, i1 = std::min(n, b1 * kBlock);
    int64_t i = i0;
    for (; i + W <= i1; i += W) {
      const vf g = clamp_gate(load(p.gate + i));
      store(p.h + i, g * sigmoid(g) * load(p.up + i));
    }
    if (i < i1) {
      const int k = int(i1 - i);
      const vf g = clamp_gate(load_partial(p.gate + i, k));
      store_partial(p.h + i, g * sigmoid(g) * load_partial(p.up + i, k), k);
    }
  });
}

void swiglu_backward(const SwigluBackwardParams& p) {
  const int64_t n = p.N * p.F;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const vf one = set1(1.f);
  parallel_for(blocks, 256, [&](int64_t b0, int64_t b1, int) {
    const int64_t i0 = b0 * kBlock, i1 = std::min(n, b1 * kBlock);
    auto step = [&](vf g, vf u, vf dh, vf& dg, vf& du) {
      g = clamp_gate(g);
      const vf s = sigmoid(g);
      const vf gs = g * s;                          // silu(g)
      du = dh * gs;
      dg = dh * u * s * fmadd(g, one - s, one);     // s (1 + g (1 - s))
    };
    int64_t i = i0;
    for (; i + W <= i1; i += W) {
      vf dg, du;
      step(load(p.gate + i), load(p.up + i), load(p.dh + i), dg, du);
      store(p.dgate + i, dg);
      store(p.dup + i, du);
    }
    if (i < i1) {
      const int k = int(i1 - i);
      vf dg, du;
      step(load_partial(p.gate + i, k), load_partial(p.up + i, k), load_partial(p.dh + i, k), dg, du);
      store_partial(p.dgate + i, dg, k);
      store_partial(p.dup + i, du, k);
    }
  });
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
