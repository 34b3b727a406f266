// ops/cross_entropy.cc: the fused LM-head cross-entropy entry (checks incl. every target, dispatch),
// its argument parser (bts/op_args.h) and its registry spec "cross_entropy". The target scan is O(N) and runs before any kernel, so a bad
// target can never index outside W.
#include <cmath>
#include <limits>
#include <string>

#include "bts/dispatch.h"
#include "bts/op_args.h"
#include "bts/ops.h"
#include "bts/registry.h"

BTS_DECLARE_KERNEL(cross_entropy_forward_backward, CrossEntropyParams)

namespace bts {

void cross_entropy_forward_backward(const CrossEntropyParams& p) {
  const std::string op = "cross_entropy";
  if (p.N < 0 || p.D <= 0 || p.V <= 0)
    throw Error("E_ARGUMENT", op + ": N >= 0, D > 0 and V > 0 required, got N = " + std::to_string(p.N) +
                                  ", D = " + std::to_string(p.D) + ", V = " + std::to_string(p.V));
  if (p.V > int64_t(std::numeric_limits<int32_t>::max()))
    throw Error("E_ARGUMENT", op + ": V must be < 2^31 (targets are int32), got " + std::to_string(p.V));
  if (!std::isfinite(p.grad_scale)) throw Error("E_ARGUMENT", op + ": 'gradScale' must be finite");
  if (p.vocab_chunk < 0 || p.row_block < 0)
    throw Error("E_ARGUMENT", op + ": 'vocabChunk' and 'rowBlock' must be >= 0 (0 = automatic)");
  if (p.dw && !p.dx) throw Error("E_ARGUMENT", op + ": 'dweight' needs 'dx' (the backward runs only when dx is given)");
  if (p.N > 0 && (!p.x || !p.w || !p.targets)) throw Error("E_ARGUMENT", op + ": x, weight and targets must be non-null");
  for (int64_t n = 0; n < p.N; n++) {
    const int32_t t = p.targets[n];
    if (t != p.ignore_index && (t < 0 || int64_t(t) >= p.V))
      throw Error("E_TOKEN_RANGE", op + ": argument 'targets' at position " + std::to_string(n) + " is " +
                                       std::to_string(t) + ", outside [0, V) with V = " + std::to_string(p.V) +
                                       " and not ignoreIndex = " + std::to_string(p.ignore_index));
  }
  if (p.N == 0) {
    if (p.loss_sum) *p.loss_sum = 0;
    if (p.count) *p.count = 0;
    return;
  }
  BTS_DISPATCH(cross_entropy_forward_backward, p);
}

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;
}  // namespace

CrossEntropyParams parse_cross_entropy(const OpDef& def, OpCall& c) {
  CrossEntropyParams p;
  p.N = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.D = reg::int_arg(def, c, 1, 1, kMaxDim);
  p.V = reg::int_arg(def, c, 2, 1, std::numeric_limits<int32_t>::max());
  p.ignore_index = int32_t(reg::int_arg(def, c, 3, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()));
  p.grad_scale = float(reg::num_arg(def, c, 4));
  p.vocab_chunk = reg::int_arg(def, c, 5, 0, kMaxDim);
  p.row_block = reg::int_arg(def, c, 6, 0, kMaxDim);
  const int64_t ND = reg::mul(def, {p.N, p.D});
  const int64_t VD = reg::mul(def, {p.V, p.D});
  p.x = static_cast<const float*>(reg::tensor(def, c, 0, ND, "N*D"));
  p.w = static_cast<const float*>(reg::tensor(def, c, 1, VD, "V*D"));
  p.targets = static_cast<const int32_t*>(reg::tensor(def, c, 2, p.N, "N"));
  p.losses = static_cast<float*>(reg::tensor(def, c, 3, p.N, "N"));
  p.loss_sum = static_cast<double*>(reg::tensor(def, c, 4, 1, "1"));
  p.count = static_cast<int64_t*>(reg::tensor(def, c, 5, 1, "1"));
  p.dx = static_cast<float*>(reg::tensor(def, c, 6, ND, "N*D"));
  p.dw = static_cast<float*>(reg::tensor(def, c, 7, VD, "V*D"));
  return p;
}

namespace {
void run(const OpDef& def, OpCall& c) { cross_entropy_forward_backward(parse_cross_entropy(def, c)); }
}  // namespace

void register_cross_entropy(std::vector<OpDef>& out) {
  out.push_back({"cross_entropy",
                 {{"x", DType::F32, false, false},
                  {"weight", DType::F32, false, false},
                  {"targets", DType::I32, false, false},
                  {"losses", DType::F32, true, true},
                  {"lossSum", DType::F64, true, true},
                  {"count", DType::I64, true, true},
                  {"dx", DType::F32, true, true},
                  {"dweight", DType::F32, true, true}},
                 {"N", "D", "V", "ignoreIndex", "gradScale", "vocabChunk", "rowBlock"},
                 run});
}

}  // namespace bts
