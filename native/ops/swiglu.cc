// ops/swiglu.cc: the SwiGLU op entries (checks, dispatch), their argument parsers (bts/op_args.h) and
// registry specs.
#include <string>

#include "bts/dispatch.h"
#include "bts/op_args.h"
#include "bts/ops.h"
#include "bts/registry.h"

BTS_DECLARE_KERNEL(swiglu_forward, SwigluParams)
BTS_DECLARE_KERNEL(swiglu_backward, SwigluBackwardParams)

namespace bts {

void swiglu_forward(const SwigluParams& p) {
  if (p.N < 0 || p.F <= 0) throw Error("E_ARGUMENT", "swiglu_forward: N >= 0 and F > 0 required");
  if (p.N == 0) return;
  if (!p.gate || !p.up || !p.h) throw Error("E_ARGUMENT", "swiglu_forward: gate, up and h are required");
  BTS_DISPATCH(swiglu_forward, p);
}

void swiglu_backward(const SwigluBackwardParams& p) {
  if (p.N < 0 || p.F <= 0) throw Error("E_ARGUMENT", "swiglu_backward: N >= 0 and F > 0 required");
  if (p.N == 0) return;
  if (!p.gate || !p.up || !p.dh || !p.dgate || !p.dup)
    throw Error("E_ARGUMENT", "swiglu_backward: gate, up, dh, dgate and dup are required");
  BTS_DISPATCH(swiglu_backward, p);
}

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;
}  // namespace

SwigluParams parse_swiglu_forward(const OpDef& def, OpCall& c) {
  SwigluParams p;
  p.N = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.F = reg::int_arg(def, c, 1, 1, kMaxDim);
  const int64_t NF = reg::mul(def, {p.N, p.F});
  p.gate = static_cast<const float*>(reg::tensor(def, c, 0, NF, "N*F"));
  p.up = static_cast<const float*>(reg::tensor(def, c, 1, NF, "N*F"));
  p.h = static_cast<float*>(reg::tensor(def, c, 2, NF, "N*F"));
  return p;
}

SwigluBackwardParams parse_swiglu_backward(const OpDef& def, OpCall& c) {
  SwigluBackwardParams p;
  p.N = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.F = reg::int_arg(def, c, 1, 1, kMaxDim);
  const int64_t NF = reg::mul(def, {p.N, p.F});
  p.gate = static_cast<const float*>(reg::tensor(def, c, 0, NF, "N*F"));
  p.up = static_cast<const float*>(reg::tensor(def, c, 1, NF, "N*F"));
  p.dh = static_cast<const float*>(reg::tensor(def, c, 2, NF, "N*F"));
  p.dgate = static_cast<float*>(reg::tensor(def, c, 3, NF, "N*F"));
  p.dup = static_cast<float*>(reg::tensor(def, c, 4, NF, "N*F"));
  return p;
}

namespace {
void run_forward(const OpDef& def, OpCall& c) { swiglu_forward(parse_swiglu_forward(def, c)); }
void run_backward(const OpDef& def, OpCall& c) { swiglu_backward(parse_swiglu_backward(def, c)); }
}  // namespace

void register_swiglu(std::vector<OpDef>& out) {
  out.push_back({"swiglu_forward",
                 {{"gate", DType::F32, false, false}, {"up", DType::F32, false, false}, {"h", DType::F32, false, true}},
                 {"N", "F"},
                 run_forward});
  out.push_back({"swiglu_backward",
                 {{"gate", DType::F32, false, false},
                  {"up", DType::F32, false, false},
                  {"dh", DType::F32, false, false},
                  {"dgate", DType::F32, false, true},
                  {"dup", DType::F32, false, true}},
                 {"N", "F"},
                 run_backward});
}

}  // namespace bts
