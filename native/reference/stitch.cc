// reference/stitch.cc: plain-loop stitch mixes (METHOD.md, "The stitch layer"), the oracle for
// native/cpu/stitch.cc. Everything in double; the softmax subtracts the max over the models.
// Legend: N tokens, D width, n experts, M = n + 1 models; G[t, d*M + m] is the logit of model m at d.
#include <cmath>
#include <vector>

#include "bts/ops.h"

namespace bts {
namespace reference {

namespace {
// g[m] = softmax_m(G[t, d*M + m]) for m < M.
void softmax_models(const float* logits /* [M] */, int64_t M, double* g /* [M] */) {
  double mx = logits[0];
  for (int64_t m = 1; m < M; m++) mx = std::max(mx, double(logits[m]));
  double sum = 0;
  for (int64_t m = 0; m < M; m++) sum += (g[m] = std::exp(double(logits[m]) - mx));
  for (int64_t m = 0; m < M; m++) g[m] /= sum;
}
inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
}  // namespace

void stitch_eh_forward(const StitchEHParams& p) {
  const int64_t N = p.N, D = p.D, n = p.n, M = n + 1, ND = N * D;
  std::vector<double> g(static_cast<size_t>(M));
  for (int64_t t = 0; t < N; t++)
    for (int64_t d = 0; d < D; d++) {
      softmax_models(p.G + t * D * M + d * M, M, g.data());
      const int64_t e = t * D + d;
      double acc = g[0] * p.h0[e];
      for (int64_t i = 1; i <= n; i++) acc += g[size_t(i)] * p.p[(i - 1) * ND + e];
      p.out[e] = float(acc);
    }
}

// out = sum_m g_m x_m (x_0 = h0, x_i = p_i):  dx_m = g_m dout;
// dG_m = g_m (x_m dout - sum_k g_k x_k dout)  (softmax Jacobian).
void stitch_eh_backward(const StitchEHBackwardParams& p) {
  const int64_t N = p.N, D = p.D, n = p.n, M = n + 1, ND = N * D;
  std::vector<double> g(static_cast<size_t>(M)), x(static_cast<size_t>(M));
  for (int64_t t = 0; t < N; t++)
    for (int64_t d = 0; d < D; d++) {
      const int64_t e = t * D + d;
      softmax_models(p.G + t * D * M + d * M, M, g.data());
      x[0] = p.h0[e];
      for (int64_t i = 1; i <= n; i++) x[size_t(i)] = p.p[(i - 1) * ND + e];
      const double dout = p.dout[e];
      double mix = 0;
      for (int64_t m = 0; m < M; m++) mix += g[size_t(m)] * x[size_t(m)];
      p.dh0[e] = float(g[0] * dout);
      for (int64_t i = 1; i <= n; i++) p.dp[(i - 1) * ND + e] = float(g[size_t(i)] * dout);
      for (int64_t m = 0; m < M; m++) p.dG[t * D * M + d * M + m] = float(g[size_t(m)] * (x[size_t(m)] * dout - mix * dout));
    }
}

void stitch_he_forward(const StitchHEParams& p) {
  const int64_t N = p.N, D = p.D, n = p.n, M = n + 1, ND = N * D;
  for (int64_t i = 1; i <= n; i++)
    for (int64_t t = 0; t < N; t++)
      for (int64_t d = 0; d < D; d++) {
        const int64_t e = (i - 1) * ND + t * D + d;
        const double z = p.G[t * D * M + d * M + i];
        const double g = sigmoid(z), omg = sigmoid(-z);  // 1 - g without cancellation
        p.out[e] = float(omg * p.h[e] + g * p.q[e]);
      }
}

void stitch_he_backward(const StitchHEBackwardParams& p) {
  const int64_t N = p.N, D = p.D, n = p.n, M = n + 1, ND = N * D;
  for (int64_t t = 0; t < N; t++)
    for (int64_t d = 0; d < D; d++) p.dG[t * D * M + d * M] = 0.f;
  for (int64_t i = 1; i <= n; i++)
    for (int64_t t = 0; t < N; t++)
      for (int64_t d = 0; d < D; d++) {
        const int64_t e = (i - 1) * ND + t * D + d;
        const double z = p.G[t * D * M + d * M + i];
        const double g = sigmoid(z), omg = sigmoid(-z);
        const double dout = p.dout[e], h = p.h[e], q = p.q[e];
        p.dh[e] = float(omg * dout);
        p.dq[e] = float(g * dout);
        p.dG[t * D * M + d * M + i] = float(dout * (q - h) * g * omg);
      }
}

}  // namespace reference
}  // namespace bts
