// cpu/stitch.cc: the fused stitch mixes (METHOD.md, "The stitch layer"), forward and backward.
//
// "Fused": the gate g (softmax over the M = n+1 models for E->H, sigmoid for H->E) is never written
// to memory; the forward computes it in registers and the backward recomputes it from the logits G.
// The logits of one token are laid out [D, M] (model fastest), so the logits of one model sit at
// stride M. The kernels work on blocks of kB (token, dim) elements: the block's logits are first
// copied to a per-thread [M, kB] buffer (scalar deinterleave, unrolled for M <= 6), then every
// vector step reads them contiguously; the backward writes dG to a second [M, kB] buffer and
// interleaves it back. Gathers were tried first and were ~4x slower than this on Zen 3 (AVX2).
// The mix is element-wise in (token, dim), so the kernels run over the flat N*D range in blocks,
// split over the threads (deterministic: no reductions across elements). Memory-bound; bytes moved
// per (token, dim): E->H forward 4(2n+3), backward 4(4n+5); H->E forward 4(4n+1), backward 4(7n+2).
// Outputs may alias the input they replace (out with h0 / h, dh0 with dout, dh with dout): every
// vector step reads all its inputs before it writes.
// Legend: N tokens, D width, n experts, M = n + 1 models.
#include <algorithm>

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "isa_begin.h"

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

namespace {

// Blocks of kB (token, dim) elements; a multiple of every W. The logits of a block are moved between
// their [kB, M] layout in G and a [M, kB] per-thread buffer by plain scalar copies (no gathers: an
// AVX2 vgatherdps of 8 floats costs ~50 cycles on Zen 3 here, several times the whole mix), with M
// a compile-time constant for M <= 6 so the copy loops unroll (and GCC vectorises them with shuffles).
constexpr int64_t kB = 128;

template <int MM>
void deinterleave_t(const float* src /* [cnt, M] */, int64_t cnt, int64_t M_, float* dst /* [M, kB] */) {
  const int64_t M = MM > 0 ? MM : M_;
  for (int64_t e = 0; e < cnt; e++)
    for (int64_t m = 0; m < M; m++) dst[m * kB + e] = src[e * M + m];
}
template <int MM>
void interleave_t(const float* src /* [M, kB] */, int64_t cnt, int64_t M_, float* dst /* [cnt, M] */) {
  const int64_t M = MM > 0 ? MM : M_;
  for (int64_t e = 0; e < cnt; e++)
    for (int64_t m = 0; m < M; m++) dst[e * M + m] = src[m * kB + e];
}
void deinterleave(const float* src, int64_t cnt, int64_t M, float* dst) {
  switch (M) {
    case 2: return deinterleave_t<2>(src, cnt, M, dst);
    case 3: return deinterleave_t<3>(src, cnt, M, dst);
    case 4: return deinterleave_t<4>(src, cnt, M, dst);
    case 5: return deinterleave_t<5>(src, cnt, M, dst);
    case 6: return deinterleave_t<6>(src, cnt, M, dst);
    default: return deinterleave_t<0>(src, cnt, M, dst);
  }
}
void interleave(const float* src, int64_t cnt, int64_t M, float* dst) {
  switch (M) {
    case 2: return interleave_t<2>(src, cnt, M, dst);
    case 3: return interleave_t<3>(src, cnt, M, dst);
    case 4: return interleave_t<4>(src, cnt, M, dst);
    case 5: return interleave_t<5>(src, cnt, M, dst);
    case 6: return interleave_t<6>(src, cnt, M, dst);
    default: return interleave_t<0>(src, cnt, M, dst);
  }
}

inline vf ld(const float* p, int k) { return k == W ? load(p) : load_partial(p, k); }
inline void st(float* p, vf v, int k) {
  if (k == W)
    store(p, v);
  else
    store_partial(p, v, k);
}

// g = sigmoid(z) and 1 - g, both accurate in their tails: with e = exp(-z), g = 1/(1+e), 1-g = e g
// (1 - g by subtraction would lose all digits when g is near 1, and dG needs g (1-g)).
inline void sigmoid_pair(vf z, vf& g, vf& omg) {
  const vf e = exp(zero() - z);
  g = set1(1.f) / (set1(1.f) + e);
  omg = e * g;
}

// Runs body(e0, cnt, zt, dzt) for the blocks [e0, e0 + cnt) of [0, ND), split over the threads; zt and
// dzt are the thread's [M, kB] buffers (zero-filled once, so lanes past cnt hold finite values).
// The mix is element-wise over the (token, dim) pairs: element e = t*D + d has its logits at
// G[e*M .. e*M + M) and its expert rows at e + i*N*D, so the flat range is all that matters.
template <typename F>
void for_blocks(int64_t ND, int64_t M, bool need_dz, F&& body) {
  const int64_t blocks = (ND + kB - 1) / kB;
  // ~32K floats of traffic per thread at least, so tiny calls stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / (kB * (2 * M + 2)));
  parallel_for(blocks, grain, [&](int64_t b0, int64_t b1, int) {
    Buffer<float> buf(static_cast<size_t>((need_dz ? 2 : 1) * M * kB), 0.f);
    float* zt = buf.data();
    float* dzt = need_dz ? buf.data() + M * kB : nullptr;
    for (int64_t b = b0; b < b1; b++) {
      const int64_t e0 = b * kB;
      body(e0, std::min(kB, ND - e0), zt, dzt);
    }
  });
}

}  // namespace

void stitch_eh_forward(const StitchEHParams& p) {
  const int64_t n = p.n, M = n + 1, ND = p.N * p.D;
  for_blocks(ND, M, false, [&](int64_t e0, int64_t cnt, float* zt, float*) {
    deinterleave(p.G + e0 * M, cnt, M, zt);
    for (int64_t j = 0; j < cnt; j += W) {
      const int k = int(std::min<int64_t>(W, cnt - j));
      const int64_t o = e0 + j;
      vf mx = load(zt + j);
      for (int64_t m = 1; m < M; m++) mx = max(mx, load(zt + m * kB + j));
      vf e = exp(load(zt + j) - mx);
      vf sum = e;
      vf acc = e * ld(p.h0 + o, k);
      for (int64_t i = 1; i <= n; i++) {
        e = exp(load(zt + i * kB + j) - mx);
        sum += e;
        acc = fmadd(e, ld(p.p + (i - 1) * ND + o, k), acc);
      }
      st(p.out + o, acc / sum, k);
    }
  });
}

void stitch_eh_backward(const StitchEHBackwardParams& p) {
  const int64_t n = p.n, M = n + 1, ND = p.N * p.D;
  for_blocks(ND, M, true, [&](int64_t e0, int64_t cnt, float* zt, float* dzt) {
    deinterleave(p.G + e0 * M, cnt, M, zt);
    for (int64_t j = 0; j < cnt; j += W) {
      const int k = int(std::min<int64_t>(W, cnt - j));
      const int64_t o = e0 + j;
      // softmax weights g_m (kept in zt) and the mix sum_m g_m x_m
      vf mx = load(zt + j);
      for (int64_t m = 1; m < M; m++) mx = max(mx, load(zt + m * kB + j));
      vf sum = zero();
      for (int64_t m = 0; m < M; m++) {
        const vf e = exp(load(zt + m * kB + j) - mx);
        store(zt + m * kB + j, e);
        sum += e;
      }
      const vf inv = set1(1.f) / sum;
      const vf dout = ld(p.dout + o, k);
      const vf h0 = ld(p.h0 + o, k);
      const vf g0 = load(zt + j) * inv;
      vf mix = g0 * h0;
      for (int64_t i = 1; i <= n; i++) mix = fmadd(load(zt + i * kB + j) * inv, ld(p.p + (i - 1) * ND + o, k), mix);
      // dx_m = g_m dout; dG_m = g_m dout (x_m - mix)
      vf gd = g0 * dout;
      st(p.dh0 + o, gd, k);
      store(dzt + j, gd * (h0 - mix));
      for (int64_t i = 1; i <= n; i++) {
        gd = load(zt + i * kB + j) * inv * dout;
        const vf x = ld(p.p + (i - 1) * ND + o, k);
        st(p.dp + (i - 1) * ND + o, gd, k);
        store(dzt + i * kB + j, gd * (x - mix));
      }
    }
    interleave(dzt, cnt, M, p.dG + e0 * M);
  });
}

void stitch_he_forward(const StitchHEParams& p) {
  const int64_t n = p.n, M = n + 1, ND = p.N * p.D;
  for_blocks(ND, M, false, [&](int64_t e0, int64_t cnt, float* zt, float*) {
    deinterleave(p.G + e0 * M, cnt, M, zt);
    for (int64_t i = 1; i <= n; i++) {
      const float* h = p.h + (i - 1) * ND + e0;
      const float* q = p.q + (i - 1) * ND + e0;
      float* out = p.out + (i - 1) * ND + e0;
      const float* z = zt + i * kB;
      for (int64_t j = 0; j < cnt; j += W) {
        const int k = int(std::min<int64_t>(W, cnt - j));
        vf g, omg;
        sigmoid_pair(load(z + j), g, omg);
        st(out + j, fmadd(omg, ld(h + j, k), g * ld(q + j, k)), k);  // (1-g) h + g q
      }
    }
  });
}

void stitch_he_backward(const StitchHEBackwardParams& p) {
  const int64_t n = p.n, M = n + 1, ND = p.N * p.D;
  for_blocks(ND, M, true, [&](int64_t e0, int64_t cnt, float* zt, float* dzt) {
    deinterleave(p.G + e0 * M, cnt, M, zt);
    for (int64_t j = 0; j < cnt; j += W) store(dzt + j, zero());  // slot 0: the hub has no H->E gate
    for (int64_t i = 1; i <= n; i++) {
      const int64_t o = (i - 1) * ND + e0;
      const float* z = zt + i * kB;
      float* dz = dzt + i * kB;
      for (int64_t j = 0; j < cnt; j += W) {
        const int k = int(std::min<int64_t>(W, cnt - j));
        vf g, omg;
        sigmoid_pair(load(z + j), g, omg);
        const vf dout = ld(p.dout + o + j, k), h = ld(p.h + o + j, k), q = ld(p.q + o + j, k);
        const vf gd = g * dout;
        st(p.dh + o + j, omg * dout, k);
        st(p.dq + o + j, gd, k);
        store(dz + j, gd * (q - h) * omg);
      }
    }
    interleave(dzt, cnt, M, p.dG + e0 * M);
  });
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
