// cpu/stitch.cc: the fused stitch mixes (METHOD.md, "The stitch layer"), forward and backward.
//
// "Fused": the gate g (softmax over the M = n+1 models for E->H, sigmoid for H->E) is never written
// to memory; the forward computes it in registers and the backward recomputes it from the logits G.
// The kernels vectorise over the width D, W dims at a time. The logits of one token are laid out
// [D, M] (model fastest), so the W logits of model m for dims d..d+W-1 sit at stride M: they are
// gathered (AVX2 / AVX-512 gather instructions; the scalar level reads one float) and dG is written
// back the same way (AVX-512 scatter, otherwise one scalar store per lane; those W*M stores land in
// one contiguous, cache-resident W*M block). Per W-chunk the M gathered logit vectors (then their
// exponentials) go to a small per-thread buffer [M, W], so any n works without re-gathering.
// Threads split the tokens. Everything is memory-bound; bytes moved per (token, dim): E->H forward
// 4(2n+3), backward 4(4n+5); H->E forward 4(4n+1), backward 4(7n+2).
// Outputs may alias the input they replace (out with h0 / h, dh0 with dout, dh with dout): every
// chunk reads all its inputs before it writes.
// Legend: N tokens, D width, n experts, M = n + 1 models.
#include <vector>

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "isa_begin.h"

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

namespace {

// W floats base[j * stride], j < W (k < W: only the first k lanes are read, the others are 0).
struct Strided {
  int64_t stride;
#if BTS_ISA_LEVEL == 3
  __m512i idx;
  explicit Strided(int64_t s) : stride(s) {
    idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(int(s)));
  }
#elif BTS_ISA_LEVEL == 2
  __m256i idx;
  explicit Strided(int64_t s) : stride(s) {
    idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int(s)));
  }
#else
  explicit Strided(int64_t s) : stride(s) {}
#endif

  vf gather(const float* base, int k) const {
#if BTS_ISA_LEVEL == 3
    if (k == W) return {_mm512_i32gather_ps(idx, base, 4)};
#elif BTS_ISA_LEVEL == 2
    if (k == W) return {_mm256_i32gather_ps(base, idx, 4)};
#endif
    float tmp[W];
    for (int j = 0; j < W; j++) tmp[j] = j < k ? base[j * stride] : 0.f;
    return load(tmp);
  }

  void scatter(float* base, vf v, int k) const {
#if BTS_ISA_LEVEL == 3
    if (k == W) {
      _mm512_i32scatter_ps(base, idx, v.v, 4);
      return;
    }
#endif
    float tmp[W];
    store(tmp, v);
    for (int j = 0; j < k; j++) base[j * stride] = tmp[j];
  }
};

inline vf ld(const float* p, int k) { return k == W ? load(p) : load_partial(p, k); }
inline void st(float* p, vf v, int k) {
  if (k == W)
    store(p, v);
  else
    store_partial(p, v, k);
}

// Softmax weights of the M models for dims d..d+k-1 of one token: e[m*W ..] = exp(G_m - max), returns
// 1 / sum_m e_m. G points at the token's logits at dim d ([k, M]).
inline vf softmax_chunk(const float* G, const Strided& S, int64_t M, int k, float* e /* [M, W] */) {
  vf mx = S.gather(G, k);
  store(e, mx);
  for (int64_t m = 1; m < M; m++) {
    const vf x = S.gather(G + m, k);
    store(e + m * W, x);
    mx = max(mx, x);
  }
  vf sum = zero();
  for (int64_t m = 0; m < M; m++) {
    const vf x = exp(load(e + m * W) - mx);
    store(e + m * W, x);
    sum += x;
  }
  return set1(1.f) / sum;
}

int64_t grain_for(int64_t D, int64_t M) { return std::max<int64_t>(1, 16384 / (D * (M + 1))); }

}  // namespace

void stitch_eh_forward(const StitchEHParams& p) {
  const int64_t N = p.N, D = p.D, n = p.n, M = n + 1, ND = N * D;
  const Strided S(M);
  parallel_for(N, grain_for(D, M), [&](int64_t t0, int64_t t1, int) {
    std::vector<float> ebuf(size_t(M * W));  // [M, W]
    float* e = ebuf.data();
    for (int64_t t = t0; t < t1; t++) {
      const float* Gt = p.G + t * D * M;  // [D, M]
      for (int64_t d = 0; d < D; d += W) {
        const int k = int(std::min<int64_t>(W, D - d));
        const vf inv = softmax_chunk(Gt + d * M, S, M, k, e);
        const int64_t o = t * D + d;
        vf acc = load(e) * ld(p.h0 + o, k);
        for (int64_t i = 1; i <= n; i++) acc = fmadd(load(e + i * W), ld(p.p + (i - 1) * ND + o, k), acc);
        st(p.out + o, acc * inv, k);
      }
    }
  });
}

void stitch_eh_backward(const StitchEHBackwardParams& p) {
  const int64_t N = p.N, D = p.D, n = p.n, M = n + 1, ND = N * D;
  const Strided S(M);
  parallel_for(N, grain_for(D, M), [&](int64_t t0, int64_t t1, int) {
    std::vector<float> ebuf(size_t(M * W));  // [M, W]: exp, then g
    float* e = ebuf.data();
    for (int64_t t = t0; t < t1; t++) {
      const float* Gt = p.G + t * D * M;  // [D, M]
      float* dGt = p.dG + t * D * M;      // [D, M]
      for (int64_t d = 0; d < D; d += W) {
        const int k = int(std::min<int64_t>(W, D - d));
        const vf inv = softmax_chunk(Gt + d * M, S, M, k, e);
        const int64_t o = t * D + d;
        const vf dout = ld(p.dout + o, k);
        // g_m and the mix sum_m g_m x_m
        vf g0 = load(e) * inv;
        const vf h0 = ld(p.h0 + o, k);
        vf mix = g0 * h0;
        store(e, g0);
        for (int64_t i = 1; i <= n; i++) {
          const vf g = load(e + i * W) * inv;
          store(e + i * W, g);
          mix = fmadd(g, ld(p.p + (i - 1) * ND + o, k), mix);
        }
        // dG_m = g_m dout (x_m - mix); dx_m = g_m dout
        vf gd = g0 * dout;
        st(p.dh0 + o, gd, k);
        S.scatter(dGt + d * M, gd * (h0 - mix), k);
        for (int64_t i = 1; i <= n; i++) {
          const float* pi = p.p + (i - 1) * ND + o;
          gd = load(e + i * W) * dout;
          const vf x = ld(pi, k);
          st(p.dp + (i - 1) * ND + o, gd, k);
          S.scatter(dGt + d * M + i, gd * (x - mix), k);
        }
      }
    }
  });
}

void stitch_he_forward(const StitchHEParams& p) {
  const int64_t N = p.N, D = p.D, n = p.n, M = n + 1, ND = N * D;
  const Strided S(M);
  parallel_for(N, grain_for(D, M), [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; t++) {
      const float* Gt = p.G + t * D * M;  // [D, M]
      for (int64_t d = 0; d < D; d += W) {
        const int k = int(std::min<int64_t>(W, D - d));
        for (int64_t i = 1; i <= n; i++) {
          const int64_t o = (i - 1) * ND + t * D + d;
          const vf g = sigmoid(S.gather(Gt + d * M + i, k));
          const vf h = ld(p.h + o, k);
          st(p.out + o, fmadd(g, ld(p.q + o, k) - h, h), k);  // (1-g) h + g q
        }
      }
    }
  });
}

void stitch_he_backward(const StitchHEBackwardParams& p) {
  const int64_t N = p.N, D = p.D, n = p.n, M = n + 1, ND = N * D;
  const Strided S(M);
  const vf one = set1(1.f);
  parallel_for(N, grain_for(D, M), [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; t++) {
      const float* Gt = p.G + t * D * M;  // [D, M]
      float* dGt = p.dG + t * D * M;      // [D, M]
      for (int64_t d = 0; d < D; d += W) {
        const int k = int(std::min<int64_t>(W, D - d));
        for (int64_t i = 1; i <= n; i++) {
          const int64_t o = (i - 1) * ND + t * D + d;
          const vf g = sigmoid(S.gather(Gt + d * M + i, k));
          const vf dout = ld(p.dout + o, k), h = ld(p.h + o, k), q = ld(p.q + o, k);
          const vf gd = g * dout;
          st(p.dh + o, dout - gd, k);  // (1-g) dout
          st(p.dq + o, gd, k);
          S.scatter(dGt + d * M + i, gd * (q - h) * (one - g), k);
        }
        S.scatter(dGt + d * M, zero(), k);
      }
    }
  });
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
