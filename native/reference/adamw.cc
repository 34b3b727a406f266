// reference/adamw.cc: plain-loop AdamW with global-norm clipping, the oracle for native/cpu/adamw.cc.
// Everything per element in double (rounded to float when stored). Arguments were validated by the
// entry (native/ops/adamw.cc). Legend: n elements, [0, n_decay) decayed.
#include <cmath>

#include "bts/ops.h"

namespace bts {
namespace reference {

void adamw_step(const AdamWParams& p) {
  const double gs = p.grad_scale;
  double ss = 0;
  for (int64_t i = 0; i < p.n; i++) {
    const double g = gs * double(p.g[i]);
    ss += g * g;
  }
  const double norm = std::sqrt(ss);
  if (p.grad_norm) *p.grad_norm = float(norm);
  double clip = 1.0;
  if (p.max_grad_norm > 0 && norm > double(p.max_grad_norm)) clip = double(p.max_grad_norm) / norm;
  const double b1 = p.beta1, b2 = p.beta2;
  const double bc1 = 1.0 - std::pow(b1, double(p.step));
  const double bc2 = 1.0 - std::pow(b2, double(p.step));
  for (int64_t i = 0; i < p.n; i++) {
    const double g = gs * clip * double(p.g[i]);
    const double m = b1 * p.m[i] + (1.0 - b1) * g;
    const double v = b2 * p.v[i] + (1.0 - b2) * g * g;
    p.m[i] = float(m);
    p.v[i] = float(v);
    const double wd = i < p.n_decay ? double(p.weight_decay) : 0.0;
    const double w = p.p[i];
    const double upd = (m / bc1) / (std::sqrt(v / bc2) + double(p.eps)) + wd * w;
    p.p[i] = float(w - double(p.lr) * upd);
  }
}

}  // namespace reference
}  // namespace bts
