// reference/rmsnorm.cc: plain-loop RMSNorm forward and backward, the oracle for native/cpu/rmsnorm.cc.
// Sums in double. Legend: N rows, D width.
#include <cmath>

#include "bts/ops.h"

namespace bts {
namespace reference {

void rmsnorm_forward(const RmsNormParams& p) {
  for (int64_t n = 0; n < p.N; n++) {
    const float* x = p.x + n * p.D;  // [D]
    double ss = 0;
    for (int64_t d = 0; d < p.D; d++) ss += double(x[d]) * x[d];
    const float r = float(1.0 / std::sqrt(ss / double(p.D) + double(p.eps)));
    float* y = p.y + n * p.D;
    for (int64_t d = 0; d < p.D; d++) y[d] = x[d] * r * p.w[d];
    if (p.rstd) p.rstd[n] = r;
  }
}

// y_d = x_d r w_d, r = (mean(x^2)+eps)^-1/2  =>  dx_d = r (dy_d w_d) - x_d r^3 / D * sum_k dy_k w_k x_k
void rmsnorm_backward(const RmsNormBackwardParams& p) {
  for (int64_t n = 0; n < p.N; n++) {
    const float* x = p.x + n * p.D;
    const float* dy = p.dy + n * p.D;
    const double r = p.rstd[n];
    double dot = 0;
    for (int64_t d = 0; d < p.D; d++) dot += double(dy[d]) * p.w[d] * x[d];
    const double c = dot * r * r * r / double(p.D);
    if (p.dw)
      for (int64_t d = 0; d < p.D; d++) p.dw[d] += float(double(dy[d]) * x[d] * r);
    float* dx = p.dx + n * p.D;
    for (int64_t d = 0; d < p.D; d++) dx[d] = float(r * dy[d] * p.w[d] - c * x[d]);
  }
}

}  // namespace reference
}  // namespace bts
