// reference/gemm.cc: plain-loop GEMM (fp32 and bf16-B), the oracle for native/cpu/gemm.cc.
//
// C = alpha * op(A) op(B) + beta * C with every element summed in double over k, in order. beta == 0
// never reads C (NaNs in C are not propagated), exactly as the fast kernels. The bf16 variant widens
// B to fp32 (exact) and keeps A in fp32: on AVX512_BF16 hardware the fast kernel also rounds A to
// bf16, which the tests allow for with a looser tolerance. Legend: M, N, K as in BLAS.
#include <cstdint>

#include "bts/ops.h"

namespace bts {
namespace reference {

namespace {
inline float widen(float x) { return x; }
inline float widen(bf16 x) { return bf16_to_f32(x); }

template <class TB>
void gemm_plain(int64_t M, int64_t N, int64_t K, bool transA, bool transB,
                const float* A,  // [M, K] (lda) or [K, M] if transA
                int64_t lda,
                const TB* B,  // [K, N] (ldb) or [N, K] if transB
                int64_t ldb,
                float* C,  // [M, N] (ldc)
                int64_t ldc, float alpha, float beta) {
  for (int64_t m = 0; m < M; m++)
    for (int64_t n = 0; n < N; n++) {
      double s = 0;
      for (int64_t k = 0; k < K; k++) {
        const double a = transA ? A[k * lda + m] : A[m * lda + k];
        const double b = widen(transB ? B[n * ldb + k] : B[k * ldb + n]);
        s += a * b;
      }
      float& c = C[m * ldc + n];
      c = beta == 0.f ? float(double(alpha) * s) : float(double(alpha) * s + double(beta) * c);
    }
}
}  // namespace

void gemm_f32(const GemmParams& p) {
  gemm_plain(p.M, p.N, p.K, p.transA, p.transB, p.A, p.lda, p.B, p.ldb, p.C, p.ldc, p.alpha, p.beta);
}

void gemm_bf16(const GemmBf16Params& p) {
  gemm_plain(p.M, p.N, p.K, p.transA, p.transB, p.A, p.lda, p.B, p.ldb, p.C, p.ldc, p.alpha, p.beta);
}

}  // namespace reference
}  // namespace bts
