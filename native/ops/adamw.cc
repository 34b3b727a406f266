// ops/adamw.cc: the AdamW op entry (checks of every hyper-parameter, dispatch), its argument parser
// (bts/op_args.h) and its registry spec.
#include <cmath>
#include <string>

#include "bts/dispatch.h"
#include "bts/op_args.h"
#include "bts/ops.h"
#include "bts/registry.h"

BTS_DECLARE_KERNEL(adamw_step, AdamWParams)

namespace bts {

namespace {
[[noreturn]] void bad(const char* name, const char* rule, double got) {
  throw Error("E_ARGUMENT", std::string("adamw_step: '") + name + "' must be " + rule + ", got " + std::to_string(got));
}
}  // namespace

void adamw_step(const AdamWParams& p) {
  if (p.n < 0) bad("n", ">= 0", double(p.n));
  if (p.n_decay < 0 || p.n_decay > p.n)
    throw Error("E_ARGUMENT", "adamw_step: 'nDecay' must be in [0, n] with n = " + std::to_string(p.n) + ", got " +
                                  std::to_string(p.n_decay));
  if (p.step < 1) bad("step", "an integer >= 1", double(p.step));
  if (!(p.beta1 >= 0.f && p.beta1 < 1.f)) bad("beta1", "in [0, 1)", p.beta1);
  if (!(p.beta2 >= 0.f && p.beta2 < 1.f)) bad("beta2", "in [0, 1)", p.beta2);
  if (!(p.lr >= 0.f) || !std::isfinite(p.lr)) bad("lr", "finite and >= 0", p.lr);
  if (!(p.eps > 0.f) || !std::isfinite(p.eps)) bad("eps", "finite and > 0", p.eps);
  if (!(p.weight_decay >= 0.f) || !std::isfinite(p.weight_decay)) bad("weightDecay", "finite and >= 0", p.weight_decay);
  if (!std::isfinite(p.max_grad_norm)) bad("maxGradNorm", "finite (<= 0: no clipping)", p.max_grad_norm);
  if (!std::isfinite(p.grad_scale)) bad("gradScale", "finite", p.grad_scale);
  if (p.n > 0 && (!p.p || !p.g || !p.m || !p.v)) throw Error("E_ARGUMENT", "adamw_step: null buffer");
  if (p.n == 0) {
    if (p.grad_norm) *p.grad_norm = 0.f;
    return;
  }
  BTS_DISPATCH(adamw_step, p);
}

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;
}  // namespace

AdamWParams parse_adamw_step(const OpDef& def, OpCall& c) {
  AdamWParams p;
  p.n = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.n_decay = reg::int_arg(def, c, 1, 0, p.n);
  p.lr = float(reg::num_arg(def, c, 2));
  p.beta1 = float(reg::num_arg(def, c, 3));
  p.beta2 = float(reg::num_arg(def, c, 4));
  p.eps = float(reg::num_arg(def, c, 5));
  p.weight_decay = float(reg::num_arg(def, c, 6));
  p.step = reg::int_arg(def, c, 7, 1, int64_t(1) << 53);
  p.max_grad_norm = float(reg::num_arg(def, c, 8));
  p.grad_scale = float(reg::num_arg(def, c, 9));
  p.p = static_cast<float*>(reg::tensor(def, c, 0, p.n, "n"));
  p.g = static_cast<const float*>(reg::tensor(def, c, 1, p.n, "n"));
  p.m = static_cast<float*>(reg::tensor(def, c, 2, p.n, "n"));
  p.v = static_cast<float*>(reg::tensor(def, c, 3, p.n, "n"));
  p.grad_norm = static_cast<float*>(reg::tensor(def, c, 4, 1, "1"));
  return p;
}

namespace {
void run_step(const OpDef& def, OpCall& c) { adamw_step(parse_adamw_step(def, c)); }
}  // namespace

void register_adamw(std::vector<OpDef>& out) {
  out.push_back({"adamw_step",
                 {{"params", DType::F32, false, true},
                  {"grads", DType::F32, false, false},
                  {"m", DType::F32, false, true},
                  {"v", DType::F32, false, true},
                  {"gradNorm", DType::F32, true, true}},
                 {"n", "nDecay", "lr", "beta1", "beta2", "eps", "weightDecay", "step", "maxGradNorm", "gradScale"},
                 run_step});
}

}  // namespace bts
