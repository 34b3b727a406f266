// reference/swiglu.cc: plain-loop SwiGLU forward and backward in double, the oracle for
// native/cpu/swiglu.cc. Legend: N rows, F ffn width.
//   h = silu(g) u,  silu(z) = z s(z),  s = sigmoid
//   dg = dh u s(g) (1 + g (1 - s(g))),  du = dh silu(g)
#include <cmath>

#include "bts/ops.h"

namespace bts {
namespace reference {

namespace {
inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
}  // namespace

void swiglu_forward(const SwigluParams& p) {
  const int64_t n = p.N * p.F;
  for (int64_t i = 0; i < n; i++) {
    const double g = p.gate[i];
    p.h[i] = float(g * sigmoid(g) * double(p.up[i]));
  }
}

void swiglu_backward(const SwigluBackwardParams& p) {
  const int64_t n = p.N * p.F;
  for (int64_t i = 0; i < n; i++) {
    const double g = p.gate[i], u = p.up[i], dh = p.dh[i];
    const double s = sigmoid(g);
    p.dgate[i] = float(dh * u * s * (1.0 + g * (1.0 - s)));
    p.dup[i] = float(dh * g * s);
  }
}

}  // namespace reference
}  // namespace bts
