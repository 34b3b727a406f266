// cpu/rope.cc: RoPE table builder and rotation, SIMD over the head dim, threads over rows.
//
// rope_table: inv_freq comes from the one fp32 recipe in native/reference/rope.cc
// (bts::reference::rope_inv_freq_f32), so the table is bit-identical at every level; only the
// P x Dh/2 cos/sin evaluations (double, from the fp32 angle) are spread over the threads.
// rope_forward: per row, the table row [Dh/2, 2] (cos, sin interleaved) is split once into two
// contiguous [Dh/2] vectors (sin negated for the inverse), then every head of the row is rotated with
// full-width loads of x[i] and x[i + Dh/2]. Rows are independent, so out may alias x (same stride):
// each vector step reads both halves before writing them. Memory-bound: ~8 bytes per element moved.
// Legend: N rows, nh heads per row, Dh head dim, P table positions.

#include "bts/ops.h"
#include "bts/threadpool.h"

namespace bts {
namespace reference {
void rope_inv_freq_f32(const RopeTableParams& p, float* inv_freq /* [Dh/2] */);
}
}  // namespace bts

#include "isa_begin.h"

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

void rope_table(const RopeTableParams& p) {
  const int64_t half = p.Dh / 2;
  Buffer<float> inv(static_cast<size_t>(half));  // [Dh/2]
  reference::rope_inv_freq_f32(p, inv.data());
  parallel_for(p.P, std::max<int64_t>(1, 256 / half), [&](int64_t p0, int64_t p1, int) {
    for (int64_t pos = p0; pos < p1; pos++) {
      float* t = p.table + pos * half * 2;  // [Dh/2, 2]
      for (int64_t i = 0; i < half; i++) {
        const float a = float(pos) * inv[size_t(i)];  // fp32 angle, as transformers
        t[2 * i] = float(std::cos(double(a)));
        t[2 * i + 1] = float(std::sin(double(a)));
      }
    }
  });
  if (p.inv_freq) std::memcpy(p.inv_freq, inv.data(), sizeof(float) * size_t(half));
}

void rope_forward(const RopeParams& p) {
  const int64_t half = p.Dh / 2, Dh = p.Dh, nh = p.nh;
  const int64_t ldx = p.ld_x ? p.ld_x : nh * Dh;
  const int64_t ldo = p.ld_out ? p.ld_out : nh * Dh;
  const float sign = p.inverse ? -1.f : 1.f;
  parallel_for(p.N, std::max<int64_t>(1, 8192 / (nh * Dh)), [&](int64_t n0, int64_t n1, int) {
    Buffer<float> buf(static_cast<size_t>(2 * half));  // cos [Dh/2] then +-sin [Dh/2]
    float* cs = buf.data();
    float* sn = buf.data() + half;
    int32_t last = -1;
    for (int64_t n = n0; n < n1; n++) {
      const int32_t pos = p.pos[n];
      if (pos != last) {
        const float* tab = p.table + int64_t(pos) * Dh;  // [Dh/2, 2]
        for (int64_t i = 0; i < half; i++) {
          cs[i] = tab[2 * i];
          sn[i] = sign * tab[2 * i + 1];
        }
        last = pos;
      }
      const float* xr = p.x + n * ldx;  // [nh, Dh]
      float* orow = p.out + n * ldo;    // [nh, Dh]
      for (int64_t h = 0; h < nh; h++) {
        const float* x = xr + h * Dh;
        float* o = orow + h * Dh;
        int64_t i = 0;
        for (; i + W <= half; i += W) {
          const vf x1 = load(x + i), x2 = load(x + half + i), c = load(cs + i), s = load(sn + i);
          const vf o1 = fnmadd(x2, s, x1 * c), o2 = fmadd(x1, s, x2 * c);
          store(o + i, o1);
          store(o + half + i, o2);
        }
        if (i < half) {
          const int k = int(half - i);
          const vf x1 = load_partial(x + i, k), x2 = load_partial(x + half + i, k);
          const vf c = load_partial(cs + i, k), s = load_partial(sn + i, k);
          const vf o1 = fnmadd(x2, s, x1 * c), o2 = fmadd(x1, s, x2 * c);
          store_partial(o + i, o1, k);
          store_partial(o + half + i, o2, k);
        }
      }
    }
  });
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
