// cuda/gemm.cu: GEMM, C = alpha op(A) op(B) + beta C (semantics: GemmParams / GemmBf16Params in
// bts/ops.h; row-major, transA / transB select the stored layout).
//
// Two kernels, each templated on the two transposes so that the global loads are coalesced in every
// layout (the fastest-moving thread index walks the contiguous dimension of A or B):
//  - gemm_f32_kernel: fp32 SIMT. A 64x64 block tile, K in steps of 16 staged in shared memory as
//    [BK][64 + 4] (k-major, padded), 256 threads each computing a 4x4 micro-tile with a stride of 16
//    rows / columns, so a warp's shared reads are broadcasts (A) or 16 consecutive words (B): no bank
//    conflicts in the inner loop. Each C element is one thread's sum in k order: deterministic.
//  - gemm_wmma_kernel: tensor cores through nvcuda::wmma (m16n16k16, bf16 operands, fp32 accumulate).
//    A (fp32) is rounded to bf16 while it is staged in shared memory; B is bf16 (frozen weights,
//    gemm_bf16) or fp32 rounded likewise (gemm_f32 with GemmMath::Bf16TensorCore). A 64x64 block tile,
//    4 warps in 2x2 each owning 32x32 (2x2 fragments), K in steps of 32. Accumulators go through shared
//    memory for a coalesced, bounds-checked alpha/beta epilogue, so any M, N, K work (no multiple-of-16
//    requirement). Shared rows are padded by 8 bf16 (16 B) against bank conflicts, keeping WMMA's
//    256-bit pointer alignment and ldm % 8 == 0.
// Known limits: no double buffering (cp.async) or split-K; a large-K, small-MN product uses few blocks.
// Legend: BLAS M, N, K.
#include "common.cuh"

namespace bts {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------------------
constexpr int kBM = 64, kBN = 64, kBK = 16, kPadA = kBM + 4, kPadB = kBN + 4;

template <bool TA, bool TB>
__global__ void __launch_bounds__(256)
    gemm_f32_kernel(int64_t M, int64_t N, int64_t K, const float* A /* [M, K] or [K, M] */, int64_t lda,
                    const float* B /* [K, N] or [N, K] */, int64_t ldb, float* C /* [M, N] */, int64_t ldc,
                    float alpha, float beta) {
  BTS_SHARED(float, As, kBK * kPadA);  // [BK][BM + 4]
  BTS_SHARED(float, Bs, kBK * kPadB);  // [BK][BN + 4]
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int r = 0; r < 4; r++) {  // 64 x 16 elements of A and of B, 4 per thread each
      const int idx = tid + r * 256;
      const int ka = TA ? idx / kBM : idx % kBK, ma = TA ? idx % kBM : idx / kBK;
      const int64_t gm = m0 + ma, gka = k0 + ka;
      As[ka * kPadA + ma] = (gm < M && gka < K) ? (TA ? A[gka * lda + gm] : A[gm * lda + gka]) : 0.f;
      const int kb = TB ? idx % kBK : idx / kBN, nb = TB ? idx / kBK : idx % kBN;
      const int64_t gn = n0 + nb, gkb = k0 + kb;
      Bs[kb * kPadB + nb] = (gn < N && gkb < K) ? (TB ? B[gn * ldb + gkb] : B[gkb * ldb + gn]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk++) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; i++) a[i] = As[kk * kPadA + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) b[j] = Bs[kk * kPadB + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int64_t gm = m0 + ty + 16 * i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gn >= N) continue;
      float* c = C + gm * ldc + gn;
      *c = beta == 0.f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *c;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
constexpr int kWM = 64, kWN = 64, kWK = 32;
constexpr int kLdA = kWK + 8, kLdB = kWN + 8, kLdC = kWN + 4;

__device__ __forceinline__ __nv_bfloat16 to_bf(float x) { return __float2bfloat16(x); }
__device__ __forceinline__ __nv_bfloat16 to_bf(__nv_bfloat16 x) { return x; }

template <class TBt, bool TA, bool TB>
__global__ void __launch_bounds__(128)
    gemm_wmma_kernel(int64_t M, int64_t N, int64_t K, const float* A /* [M, K] or [K, M] */, int64_t lda,
                     const TBt* B /* [K, N] or [N, K] */, int64_t ldb, float* C /* [M, N] */, int64_t ldc,
                     float alpha, float beta) {
  using namespace nvcuda;
  BTS_SHARED(__nv_bfloat16, As, kWM * kLdA);  // [BM][BK + 8]  (m, k)
  BTS_SHARED(__nv_bfloat16, Bs, kWK * kLdB);  // [BK][BN + 8]  (k, n)
  BTS_SHARED(float, Cs, kWM * kLdC);          // [BM][BN + 4]
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int64_t m0 = int64_t(blockIdx.y) * kWM, n0 = int64_t(blockIdx.x) * kWN;
  const __nv_bfloat16 zero = __float2bfloat16(0.f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < K; k0 += kWK) {
#pragma unroll 4
    for (int r = 0; r < (kWM * kWK) / 128; r++) {  // 2048 elements of A and of B, 16 per thread each
      const int idx = tid + r * 128;
      const int ka = TA ? idx / kWM : idx % kWK, ma = TA ? idx % kWM : idx / kWK;
      const int64_t gm = m0 + ma, gka = k0 + ka;
      As[ma * kLdA + ka] = (gm < M && gka < K) ? to_bf(TA ? A[gka * lda + gm] : A[gm * lda + gka]) : zero;
      const int kb = TB ? idx % kWK : idx / kWN, nb = TB ? idx / kWK : idx % kWN;
      const int64_t gn = n0 + nb, gkb = k0 + kb;
      Bs[kb * kLdB + nb] = (gn < N && gkb < K) ? to_bf(TB ? B[gn * ldb + gkb] : B[gkb * ldb + gn]) : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kWK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * kLdA + kk, kLdA);
#pragma unroll
      for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], Bs + kk * kLdB + wn * 32 + j * 16, kLdB);
#pragma unroll
      for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 2; j++)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC, wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < kWM * kWN; idx += 128) {
    const int r = idx / kWN, c = idx % kWN;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm >= M || gn >= N) continue;
    const float v = Cs[r * kLdC + c];
    float* out = C + gm * ldc + gn;
    *out = beta == 0.f ? alpha * v : alpha * v + beta * *out;
  }
}

dim3 grid2(int64_t M, int64_t N, int bm, int bn) {
  return dim3(unsigned(detail::ceil_div(N, bn)), unsigned(detail::ceil_div(M, bm)));
}

template <class TBt, bool TA, bool TB>
void launch_wmma(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const TBt* B, int64_t ldb, float* C,
                 int64_t ldc, float alpha, float beta, cudaStream_t s) {
  auto gemm_wmma = gemm_wmma_kernel<TBt, TA, TB>;
  BTS_LAUNCH(gemm_wmma, grid2(M, N, kWM, kWN), 128, 0, s, M, N, K, A, lda, B, ldb, C, ldc, alpha, beta);
}

template <bool TA, bool TB>
void launch_f32(const GemmParams& p, cudaStream_t s) {
  auto gemm_f32_tiled = gemm_f32_kernel<TA, TB>;
  BTS_LAUNCH(gemm_f32_tiled, grid2(p.M, p.N, kBM, kBN), 256, 0, s, p.M, p.N, p.K, p.A, p.lda, p.B, p.ldb, p.C, p.ldc,
             p.alpha, p.beta);
}

template <class P>
void check_common(const char* op, const P& p) {
  detail::need(p.M >= 0 && p.N >= 0 && p.K >= 0, op, "M, N, K must be >= 0");
  detail::need(detail::ceil_div(p.M, 64) <= 65535, op, "M must be <= 65535 * 64");
  const int64_t a_cols = p.transA ? p.M : p.K, b_cols = p.transB ? p.K : p.N;
  if (p.lda < (a_cols > 1 ? a_cols : 1))
    detail::arg_error(op, "lda must be >= " + std::to_string(a_cols > 1 ? a_cols : 1) + ", got " + std::to_string(p.lda));
  if (p.ldb < (b_cols > 1 ? b_cols : 1))
    detail::arg_error(op, "ldb must be >= " + std::to_string(b_cols > 1 ? b_cols : 1) + ", got " + std::to_string(p.ldb));
  if (p.ldc < (p.N > 1 ? p.N : 1))
    detail::arg_error(op, "ldc must be >= " + std::to_string(p.N > 1 ? p.N : 1) + ", got " + std::to_string(p.ldc));
  detail::need(p.alpha == p.alpha && p.beta == p.beta, op, "alpha and beta must be numbers");
}

}  // namespace

void launch_gemm_f32(const GemmParams& p, GemmMath math, cudaStream_t s) {
  if (math == GemmMath::Bf16TensorCore) {
    if (p.transA)
      p.transB ? launch_wmma<float, true, true>(p.M, p.N, p.K, p.A, p.lda, p.B, p.ldb, p.C, p.ldc, p.alpha, p.beta, s)
               : launch_wmma<float, true, false>(p.M, p.N, p.K, p.A, p.lda, p.B, p.ldb, p.C, p.ldc, p.alpha, p.beta, s);
    else
      p.transB ? launch_wmma<float, false, true>(p.M, p.N, p.K, p.A, p.lda, p.B, p.ldb, p.C, p.ldc, p.alpha, p.beta, s)
               : launch_wmma<float, false, false>(p.M, p.N, p.K, p.A, p.lda, p.B, p.ldb, p.C, p.ldc, p.alpha, p.beta, s);
    return;
  }
  if (p.transA) p.transB ? launch_f32<true, true>(p, s) : launch_f32<true, false>(p, s);
  else p.transB ? launch_f32<false, true>(p, s) : launch_f32<false, false>(p, s);
}

void launch_gemm_bf16(const GemmBf16Params& p, cudaStream_t s) {
  const __nv_bfloat16* B = reinterpret_cast<const __nv_bfloat16*>(p.B);
  p.transB ? launch_wmma<__nv_bfloat16, false, true>(p.M, p.N, p.K, p.A, p.lda, B, p.ldb, p.C, p.ldc, p.alpha, p.beta, s)
           : launch_wmma<__nv_bfloat16, false, false>(p.M, p.N, p.K, p.A, p.lda, B, p.ldb, p.C, p.ldc, p.alpha, p.beta, s);
}

void gemm_f32(const GemmParams& p, cudaStream_t stream, GemmMath math) {
  const char* op = "gemm_f32";
  check_common(op, p);
  if (p.M == 0 || p.N == 0) return;
  detail::need_ptr(p.C, op, "C");
  if (p.K > 0) {
    detail::need_ptr(p.A, op, "A");
    detail::need_ptr(p.B, op, "B");
  }
  launch_gemm_f32(p, math, stream);
}

void gemm_bf16(const GemmBf16Params& p, cudaStream_t stream) {
  const char* op = "gemm_bf16";
  check_common(op, p);
  detail::need(!p.transA, op, "transA is not supported (A must be [M, K])");
  if (p.M == 0 || p.N == 0) return;
  detail::need_ptr(p.C, op, "C");
  if (p.K > 0) {
    detail::need_ptr(p.A, op, "A");
    detail::need_ptr(p.B, op, "B");
  }
  launch_gemm_bf16(p, stream);
}

}  // namespace cuda
}  // namespace bts
