// reference/attention.cc: plain-loop causal grouped-query attention, forward and backward: the oracle
// for native/cpu/attention.cc.
//
// One query row at a time: all its scores, a max, a sum of exponentials, the weighted sum of values,
// every sum in double. No tiling, no online softmax: nothing here is clever, so it can be trusted.
// The backward follows the textbook softmax gradient with P recomputed from the saved lse (as the
// fast kernel does, so both read the same inputs):
//   P_ij = exp(s_ij - lse_i), D_i = sum_d dout_id out_id, dS_ij = P_ij (dout_i . v_j - D_i),
//   dv_j += P_ij dout_i, dq_i += scale dS_ij k_j, dk_j += scale dS_ij q_i.
// Legend (common.h): B batch, Tq queries, Tk keys used, Tcap key capacity, H query heads, Hkv
// key/value heads, Dh head dim. Query head h reads kv head h / (H / Hkv); query i sits at position
// Tk - Tq + i and sees keys 0 ..= Tk - Tq + i.
#include <algorithm>
#include <cmath>
#include <vector>

#include "bts/ops.h"

namespace bts {
namespace reference {

void attention_forward(const AttentionParams& p) {
  const int64_t G = p.H / p.Hkv, Dh = p.Dh;
  std::vector<double> s(static_cast<size_t>(p.Tk)), acc(static_cast<size_t>(Dh));
  for (int64_t b = 0; b < p.B; b++)
    for (int64_t h = 0; h < p.H; h++) {
      const int64_t hk = h / G;
      for (int64_t i = 0; i < p.Tq; i++) {
        const int64_t last = p.Tk - p.Tq + i;                          // last visible key
        const float* q = p.q + ((b * p.Tq + i) * p.H + h) * Dh;        // [Dh]
        double mx = -HUGE_VAL;
        for (int64_t j = 0; j <= last; j++) {
          const float* k = p.k + ((b * p.Tcap + j) * p.Hkv + hk) * Dh;  // [Dh]
          double d = 0;
          for (int64_t e = 0; e < Dh; e++) d += double(q[e]) * k[e];
          s[size_t(j)] = d * p.scale;
          mx = std::max(mx, s[size_t(j)]);
        }
        double sum = 0;
        for (int64_t e = 0; e < Dh; e++) acc[size_t(e)] = 0;
        for (int64_t j = 0; j <= last; j++) {
          const double w = std::exp(s[size_t(j)] - mx);
          sum += w;
          const float* v = p.v + ((b * p.Tcap + j) * p.Hkv + hk) * Dh;  // [Dh]
          for (int64_t e = 0; e < Dh; e++) acc[size_t(e)] += w * v[e];
        }
        float* o = p.out + ((b * p.Tq + i) * p.H + h) * Dh;  // [Dh]
        for (int64_t e = 0; e < Dh; e++) o[e] = float(acc[size_t(e)] / sum);
        if (p.lse) p.lse[(b * p.H + h) * p.Tq + i] = float(mx + std::log(sum));
      }
    }
}

void attention_backward(const AttentionBackwardParams& p) {
  const int64_t T = p.T, H = p.H, Hkv = p.Hkv, Dh = p.Dh, G = H / Hkv;
  std::vector<double> dq(static_cast<size_t>(T * H * Dh)), dk(static_cast<size_t>(T * Hkv * Dh)), dv(static_cast<size_t>(T * Hkv * Dh));
  for (int64_t b = 0; b < p.B; b++) {
    std::fill(dq.begin(), dq.end(), 0.0);
    std::fill(dk.begin(), dk.end(), 0.0);
    std::fill(dv.begin(), dv.end(), 0.0);
    for (int64_t h = 0; h < H; h++) {
      const int64_t hk = h / G;
      for (int64_t i = 0; i < T; i++) {
        const size_t qi = size_t(((b * T + i) * H + h) * Dh);
        const float* q = p.q + qi;     // [Dh]
        const float* o = p.out + qi;   // [Dh]
        const float* go = p.dout + qi;  // [Dh]
        const double lse = p.lse[(b * H + h) * T + i];
        double Di = 0;
        for (int64_t e = 0; e < Dh; e++) Di += double(go[e]) * o[e];
        for (int64_t j = 0; j <= i; j++) {
          const size_t kj = size_t(((b * T + j) * Hkv + hk) * Dh);
          const float* k = p.k + kj;  // [Dh]
          const float* v = p.v + kj;  // [Dh]
          double s = 0, dp = 0;
          for (int64_t e = 0; e < Dh; e++) {
            s += double(q[e]) * k[e];
            dp += double(go[e]) * v[e];
          }
          const double P = std::exp(s * p.scale - lse);
          const double dS = P * (dp - Di) * p.scale;
          double* dqi = dq.data() + size_t((i * H + h) * Dh);
          double* dkj = dk.data() + size_t((j * Hkv + hk) * Dh);
          double* dvj = dv.data() + size_t((j * Hkv + hk) * Dh);
          for (int64_t e = 0; e < Dh; e++) {
            dvj[e] += P * go[e];
            dqi[e] += dS * k[e];
            dkj[e] += dS * q[e];
          }
        }
      }
    }
    for (size_t x = 0; x < dq.size(); x++) p.dq[size_t(b * T * H * Dh) + x] = float(dq[x]);
    for (size_t x = 0; x < dk.size(); x++) {
      p.dk[size_t(b * T * Hkv * Dh) + x] = float(dk[x]);
      p.dv[size_t(b * T * Hkv * Dh) + x] = float(dv[x]);
    }
  }
}

}  // namespace reference
}  // namespace bts
