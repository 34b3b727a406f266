// ops/gemm.cc: the GEMM op entries (checks, dispatch), their argument parsers (bts/op_args.h) and
// registry specs "gemm_f32", "gemm_bf16".
//
// Strided operands: a buffer holding `rows` rows of `cols` used elements at a stride `ld` must have
// at least (rows - 1) * ld + cols elements (the last row need not be padded), checked here before
// anything reaches a kernel. K == 0 is allowed and gives C = beta * C (C = 0 when beta == 0).
#include <algorithm>
#include <string>

#include "bts/dispatch.h"
#include "bts/op_args.h"
#include "bts/ops.h"
#include "bts/registry.h"

BTS_DECLARE_KERNEL(gemm_f32, GemmParams)
BTS_DECLARE_KERNEL(gemm_bf16, GemmBf16Params)

namespace bts {

namespace {
template <class P>
void check_params(const char* name, const P& p) {
  const std::string op(name);
  if (p.M < 0 || p.N < 0 || p.K < 0) throw Error("E_ARGUMENT", op + ": M, N, K must be >= 0");
  const int64_t a_cols = p.transA ? p.M : p.K, b_cols = p.transB ? p.K : p.N;
  if (p.lda < std::max<int64_t>(1, a_cols))
    throw Error("E_ARGUMENT", op + ": lda must be >= " + std::to_string(std::max<int64_t>(1, a_cols)) + ", got " +
                                  std::to_string(p.lda));
  if (p.ldb < std::max<int64_t>(1, b_cols))
    throw Error("E_ARGUMENT", op + ": ldb must be >= " + std::to_string(std::max<int64_t>(1, b_cols)) + ", got " +
                                  std::to_string(p.ldb));
  if (p.ldc < std::max<int64_t>(1, p.N))
    throw Error("E_ARGUMENT", op + ": ldc must be >= " + std::to_string(std::max<int64_t>(1, p.N)) + ", got " +
                                  std::to_string(p.ldc));
  if (!(p.alpha == p.alpha) || !(p.beta == p.beta)) throw Error("E_ARGUMENT", op + ": alpha and beta must be numbers");
  if (p.M > 0 && p.N > 0 && (!p.C || (p.K > 0 && (!p.A || !p.B))))
    throw Error("E_ARGUMENT", op + ": A, B and C must be non-null");
}

// C = beta * C for the degenerate K == 0 product (beta == 0 writes zeros without reading C).
void scale_c(int64_t M, int64_t N, float* C, int64_t ldc, float beta) {
  for (int64_t m = 0; m < M; m++)
    for (int64_t n = 0; n < N; n++) C[m * ldc + n] = beta == 0.f ? 0.f : beta * C[m * ldc + n];
}
}  // namespace

void gemm_f32(const GemmParams& p) {
  check_params("gemm_f32", p);
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) return scale_c(p.M, p.N, p.C, p.ldc, p.beta);
  BTS_DISPATCH(gemm_f32, p);
}

void gemm_bf16(const GemmBf16Params& p) {
  check_params("gemm_bf16", p);
  if (p.transA) throw Error("E_ARGUMENT", "gemm_bf16: transA is not supported (A must be [M, K])");
  if (p.M == 0 || p.N == 0) return;
  if (p.K == 0) return scale_c(p.M, p.N, p.C, p.ldc, p.beta);
  BTS_DISPATCH(gemm_bf16, p);
}

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;

// Scalars (both ops): M, N, K, transA, transB, lda, ldb, ldc, alpha, beta. ld* = 0 means "tight".
// Tensors: a, b, c (c is read when beta != 0 and written).
template <class P, class TB>
void fill(const OpDef& def, OpCall& c, P& p) {
  p.M = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.N = reg::int_arg(def, c, 1, 0, kMaxDim);
  p.K = reg::int_arg(def, c, 2, 0, kMaxDim);
  p.transA = reg::bool_arg(def, c, 3);
  p.transB = reg::bool_arg(def, c, 4);
  const int64_t a_rows = p.transA ? p.K : p.M, a_cols = p.transA ? p.M : p.K;
  const int64_t b_rows = p.transB ? p.N : p.K, b_cols = p.transB ? p.K : p.N;
  p.lda = reg::int_arg(def, c, 5, 0, kMaxDim);
  p.ldb = reg::int_arg(def, c, 6, 0, kMaxDim);
  p.ldc = reg::int_arg(def, c, 7, 0, kMaxDim);
  if (p.lda == 0) p.lda = std::max<int64_t>(1, a_cols);
  if (p.ldb == 0) p.ldb = std::max<int64_t>(1, b_cols);
  if (p.ldc == 0) p.ldc = std::max<int64_t>(1, p.N);
  p.alpha = float(reg::num_arg(def, c, 8));
  p.beta = float(reg::num_arg(def, c, 9));
  // Validate the leading dimensions before they size anything (the entry repeats these checks).
  if (p.lda < a_cols || p.ldb < b_cols || p.ldc < p.N) check_params(def.name, p);
  // (rows - 1) * ld + cols elements, or 0 for an empty operand.
  auto need = [&](int64_t rows, int64_t cols, int64_t ld) {
    return rows == 0 || cols == 0 ? int64_t(0) : reg::mul(def, {rows - 1, ld}) + cols;
  };
  const std::string sa = p.transA ? "(K-1)*lda+M" : "(M-1)*lda+K";
  const std::string sb = p.transB ? "(N-1)*ldb+K" : "(K-1)*ldb+N";
  p.A = static_cast<const float*>(reg::tensor_min(def, c, 0, need(a_rows, a_cols, p.lda), sa));
  p.B = static_cast<const TB*>(reg::tensor_min(def, c, 1, need(b_rows, b_cols, p.ldb), sb));
  p.C = static_cast<float*>(reg::tensor_min(def, c, 2, need(p.M, p.N, p.ldc), "(M-1)*ldc+N"));
}

}  // namespace

GemmParams parse_gemm_f32(const OpDef& def, OpCall& c) {
  GemmParams p;
  fill<GemmParams, float>(def, c, p);
  return p;
}

GemmBf16Params parse_gemm_bf16(const OpDef& def, OpCall& c) {
  GemmBf16Params p;
  fill<GemmBf16Params, bf16>(def, c, p);
  return p;
}

namespace {
void run_f32(const OpDef& def, OpCall& c) { gemm_f32(parse_gemm_f32(def, c)); }
void run_bf16(const OpDef& def, OpCall& c) { gemm_bf16(parse_gemm_bf16(def, c)); }
}  // namespace

void register_gemm(std::vector<OpDef>& out) {
  const std::vector<const char*> scalars = {"M", "N", "K", "transA", "transB", "lda", "ldb", "ldc", "alpha", "beta"};
  out.push_back({"gemm_f32",
                 {{"a", DType::F32, false, false}, {"b", DType::F32, false, false}, {"c", DType::F32, false, true}},
                 scalars,
                 run_f32});
  out.push_back({"gemm_bf16",
                 {{"a", DType::F32, false, false}, {"b", DType::BF16, false, false}, {"c", DType::F32, false, true}},
                 scalars,
                 run_bf16});
}

}  // namespace bts
