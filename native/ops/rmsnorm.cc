// ops/rmsnorm.cc: the RMSNorm op entries (checks, dispatch) and their registry specs.
#include <string>

#include "bts/dispatch.h"
#include "bts/op_args.h"
#include "bts/ops.h"
#include "bts/registry.h"

BTS_DECLARE_KERNEL(rmsnorm_forward, RmsNormParams)
BTS_DECLARE_KERNEL(rmsnorm_backward, RmsNormBackwardParams)

namespace bts {

void rmsnorm_forward(const RmsNormParams& p) {
  if (p.N < 0 || p.D <= 0) throw Error("E_ARGUMENT", "rmsnorm_forward: N >= 0 and D > 0 required");
  if (!(p.eps >= 0)) throw Error("E_ARGUMENT", "rmsnorm_forward: eps must be >= 0");
  if (p.N == 0) return;
  BTS_DISPATCH(rmsnorm_forward, p);
}

void rmsnorm_backward(const RmsNormBackwardParams& p) {
  if (p.N < 0 || p.D <= 0) throw Error("E_ARGUMENT", "rmsnorm_backward: N >= 0 and D > 0 required");
  if (p.N == 0) return;
  BTS_DISPATCH(rmsnorm_backward, p);
}

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;
}  // namespace

RmsNormParams parse_rmsnorm_forward(const OpDef& def, OpCall& c) {
  RmsNormParams p;
  p.N = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.D = reg::int_arg(def, c, 1, 1, kMaxDim);
  p.eps = float(reg::num_arg(def, c, 2));
  const int64_t ND = reg::mul(def, {p.N, p.D});
  p.x = static_cast<const float*>(reg::tensor(def, c, 0, ND, "N*D"));
  p.w = static_cast<const float*>(reg::tensor(def, c, 1, p.D, "D"));
  p.y = static_cast<float*>(reg::tensor(def, c, 2, ND, "N*D"));
  p.rstd = static_cast<float*>(reg::tensor(def, c, 3, p.N, "N"));
  return p;
}

RmsNormBackwardParams parse_rmsnorm_backward(const OpDef& def, OpCall& c) {
  RmsNormBackwardParams p;
  p.N = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.D = reg::int_arg(def, c, 1, 1, kMaxDim);
  const int64_t ND = reg::mul(def, {p.N, p.D});
  p.x = static_cast<const float*>(reg::tensor(def, c, 0, ND, "N*D"));
  p.w = static_cast<const float*>(reg::tensor(def, c, 1, p.D, "D"));
  p.rstd = static_cast<const float*>(reg::tensor(def, c, 2, p.N, "N"));
  p.dy = static_cast<const float*>(reg::tensor(def, c, 3, ND, "N*D"));
  p.dx = static_cast<float*>(reg::tensor(def, c, 4, ND, "N*D"));
  p.dw = static_cast<float*>(reg::tensor(def, c, 5, p.D, "D"));
  return p;
}

namespace {
void run_forward(const OpDef& def, OpCall& c) { rmsnorm_forward(parse_rmsnorm_forward(def, c)); }
void run_backward(const OpDef& def, OpCall& c) { rmsnorm_backward(parse_rmsnorm_backward(def, c)); }
}  // namespace

void register_rmsnorm(std::vector<OpDef>& out) {
  out.push_back({"rmsnorm_forward",
                 {{"x", DType::F32, false, false},
                  {"weight", DType::F32, false, false},
                  {"out", DType::F32, false, true},
                  {"rstd", DType::F32, true, true}},
                 {"N", "D", "eps"},
                 run_forward});
  out.push_back({"rmsnorm_backward",
                 {{"x", DType::F32, false, false},
                  {"weight", DType::F32, false, false},
                  {"rstd", DType::F32, false, false},
                  {"dout", DType::F32, false, false},
                  {"dx", DType::F32, false, true},
                  {"dweight", DType::F32, true, true}},
                 {"N", "D"},
                 run_backward});
}

}  // namespace bts
