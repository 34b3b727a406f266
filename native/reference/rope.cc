// reference/rope.cc: plain-loop RoPE table builder and rotation, the oracle for native/cpu/rope.cc.
//
// rope_table follows transformers (`_compute_default_rope_parameters`, `_compute_llama3_parameters`,
// `LlamaRotaryEmbedding.forward`) operation by operation in fp32: exponent 2i/Dh in fp32, theta^e
// rounded to fp32, its fp32 reciprocal, the llama3 band scaling in fp32, then the fp32 product
// angle = float(pos) * inv_freq. Only cos/sin are taken in double from that fp32 angle and rounded
// (what torch's fp32 cos/sin approximate to about 1 ulp). The same helper (rope_inv_freq_f32, below)
// is what every level uses, so the table is bit-identical at every SIMD level.
// Rotation: Hugging Face rotate-half pairing, element i with i + Dh/2, in double.
// Legend: N rows, nh heads per row, Dh head dim, P table positions.
#include <cmath>
#include <vector>

#include "bts/ops.h"

namespace bts {
namespace reference {

// inv_freq[i] for i < Dh/2, in fp32 exactly as transformers computes it. Kept free of any a*b+c
// expression the compiler could contract into an FMA (this file is built with baseline flags anyway).
void rope_inv_freq_f32(const RopeTableParams& p, float* inv_freq /* [Dh/2] */) {
  const int64_t half = p.Dh / 2;
  const float dim = float(p.Dh);
  const float base = float(p.theta);
  for (int64_t i = 0; i < half; i++) {
    const float e = float(2 * i) / dim;                              // arange(0, dim, 2).float() / dim
    const float pw = float(std::pow(double(base), double(e)));     // base ** e (fp32 result)
    inv_freq[i] = 1.0f / pw;
  }
  if (!(p.factor > 0)) return;
  const float factor = float(p.factor), low = float(p.low_freq_factor);
  const float band = float(p.high_freq_factor - p.low_freq_factor);  // python float, then fp32
  const float old_ctx = float(p.original_max_position_embeddings);
  const double low_wavelen = p.original_max_position_embeddings / p.low_freq_factor;   // python floats
  const double high_wavelen = p.original_max_position_embeddings / p.high_freq_factor;
  const float two_pi = float(2.0 * M_PI);
  for (int64_t i = 0; i < half; i++) {
    const float f = inv_freq[i];
    const float wavelen = (1.0f / f) * two_pi;  // 2*pi / inv_freq (torch: reciprocal() * 2pi)
    if (wavelen > float(low_wavelen)) {
      inv_freq[i] = f / factor;
    } else if (wavelen < float(high_wavelen)) {
      inv_freq[i] = f;
    } else {
      const float ratio = (1.0f / wavelen) * old_ctx;  // old_context_len / wavelen
      const float smooth = (ratio - low) / band;
      volatile float a = (1.0f - smooth) * f / factor;  // volatile: no FMA contraction into the sum
      volatile float b = smooth * f;
      inv_freq[i] = a + b;
    }
  }
}

void rope_table(const RopeTableParams& p) {
  const int64_t half = p.Dh / 2;
  std::vector<float> inv_buf(static_cast<size_t>(half));  // [Dh/2]
  float* inv = inv_buf.data();
  rope_inv_freq_f32(p, inv);
  for (int64_t pos = 0; pos < p.P; pos++)
    for (int64_t i = 0; i < half; i++) {
      const float a = float(pos) * inv[i];  // fp32 angle, as transformers' fp32 matmul of [Dh/2,1]x[1,T]
      p.table[(pos * half + i) * 2] = float(std::cos(double(a)));
      p.table[(pos * half + i) * 2 + 1] = float(std::sin(double(a)));
    }
  if (p.inv_freq)
    for (int64_t i = 0; i < half; i++) p.inv_freq[i] = inv[i];
}

void rope_forward(const RopeParams& p) {
  const int64_t half = p.Dh / 2;
  const int64_t ldx = p.ld_x ? p.ld_x : p.nh * p.Dh;
  const int64_t ldo = p.ld_out ? p.ld_out : p.nh * p.Dh;
  const double sign = p.inverse ? -1.0 : 1.0;
  for (int64_t n = 0; n < p.N; n++) {
    const float* tab = p.table + int64_t(p.pos[n]) * p.Dh;  // [Dh/2, 2]
    for (int64_t h = 0; h < p.nh; h++) {
      const float* x = p.x + n * ldx + h * p.Dh;  // [Dh]
      float* o = p.out + n * ldo + h * p.Dh;      // [Dh]
      for (int64_t i = 0; i < half; i++) {
        const double c = tab[2 * i], s = sign * tab[2 * i + 1];
        const double x1 = x[i], x2 = x[i + half];
        o[i] = float(x1 * c - x2 * s);
        o[i + half] = float(x2 * c + x1 * s);
      }
    }
  }
}

}  // namespace reference
}  // namespace bts
