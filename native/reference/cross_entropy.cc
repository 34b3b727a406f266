// reference/cross_entropy.cc: plain-loop softmax cross-entropy through the LM head, the oracle for
// native/cpu/cross_entropy.cc. One row at a time: its V logits in double (a [V] buffer, never [N, V]),
// the log-sum-exp, the loss, and with dx given the gradient. dW is summed in a [V, D] double buffer and
// added to p.dw once at the end. Targets were validated by the entry. Legend: N rows, D width, V vocab.
#include <algorithm>
#include <cmath>
#include <vector>

#include "bts/ops.h"

namespace bts {
namespace reference {

void cross_entropy_forward_backward(const CrossEntropyParams& p) {
  const int64_t N = p.N, D = p.D, V = p.V;
  std::vector<double> z(size_t(V), 0.0);                                // [V] logits of one row
  std::vector<double> dw(p.dx && p.dw ? size_t(V) * size_t(D) : 0, 0.0);  // [V, D]
  std::vector<double> dx(size_t(D), 0.0);                               // [D]
  double loss_sum = 0;
  int64_t count = 0;
  for (int64_t n = 0; n < N; n++) {
    const float* x = p.x + n * D;  // [D]
    const int32_t t = p.targets[n];
    if (t == p.ignore_index) {
      if (p.losses) p.losses[n] = 0.f;
      if (p.dx)
        for (int64_t d = 0; d < D; d++) p.dx[n * D + d] = 0.f;
      continue;
    }
    double mx = -INFINITY;
    for (int64_t v = 0; v < V; v++) {
      double s = 0;
      for (int64_t d = 0; d < D; d++) s += double(x[d]) * double(p.w[v * D + d]);
      z[size_t(v)] = s;
      mx = std::max(mx, s);
    }
    double se = 0;
    for (int64_t v = 0; v < V; v++) se += std::exp(z[size_t(v)] - mx);
    const double lse = mx + std::log(se);
    const double loss = lse - z[size_t(t)];
    if (p.losses) p.losses[n] = float(loss);
    loss_sum += loss;
    count++;
    if (!p.dx) continue;
    std::fill(dx.begin(), dx.end(), 0.0);
    for (int64_t v = 0; v < V; v++) {
      const double g = double(p.grad_scale) * (std::exp(z[size_t(v)] - lse) - (v == t ? 1.0 : 0.0));  // dL/dz_v
      for (int64_t d = 0; d < D; d++) dx[size_t(d)] += g * double(p.w[v * D + d]);
      if (p.dw)
        for (int64_t d = 0; d < D; d++) dw[size_t(v * D + d)] += g * double(x[d]);
    }
    for (int64_t d = 0; d < D; d++) p.dx[n * D + d] = float(dx[size_t(d)]);
  }
  if (p.dx && p.dw)
    for (int64_t i = 0; i < V * D; i++) p.dw[i] = float(double(p.dw[i]) + dw[size_t(i)]);
  if (p.loss_sum) *p.loss_sum = loss_sum;
  if (p.count) *p.count = count;
}

}  // namespace reference
}  // namespace bts
