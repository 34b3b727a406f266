// ops/stitch.cc: the fused stitch-mix op entries (checks, dispatch), their argument parsers
// (bts/op_args.h) and registry specs.
//
// n (experts) is limited to [1, 4096] so the gathers' int32 lane offsets (up to (W-1)*(n+1)) cannot
// overflow and so a bad n is an error rather than a huge allocation.
#include <string>

#include "bts/dispatch.h"
#include "bts/op_args.h"
#include "bts/ops.h"
#include "bts/registry.h"

BTS_DECLARE_KERNEL(stitch_eh_forward, StitchEHParams)
BTS_DECLARE_KERNEL(stitch_eh_backward, StitchEHBackwardParams)
BTS_DECLARE_KERNEL(stitch_he_forward, StitchHEParams)
BTS_DECLARE_KERNEL(stitch_he_backward, StitchHEBackwardParams)

namespace bts {

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;
constexpr int64_t kMaxExperts = 4096;

// Returns true when there is nothing to do (N == 0).
bool check_dims(const char* op, int64_t N, int64_t D, int64_t n) {
  if (N < 0 || D <= 0) throw Error("E_ARGUMENT", std::string(op) + ": N >= 0 and D > 0 required");
  if (n < 1 || n > kMaxExperts)
    throw Error("E_ARGUMENT", std::string(op) + ": 'experts' must be in [1, " + std::to_string(kMaxExperts) + "], got " +
                                  std::to_string(n));
  if (D > kMaxDim || N > kMaxDim || (N > 0 && D * (n + 1) > (int64_t(1) << 62) / N))
    throw Error("E_ARGUMENT", std::string(op) + ": tensor size overflows");
  return N == 0;
}
void need(const char* op, bool ok, const char* what) {
  if (!ok) throw Error("E_ARGUMENT", std::string(op) + ": " + what + " required");
}
}  // namespace

void stitch_eh_forward(const StitchEHParams& p) {
  const char* op = "stitch_eh_forward";
  if (check_dims(op, p.N, p.D, p.n)) return;
  need(op, p.h0 && p.p && p.G && p.out, "h0, p, gate and out");
  BTS_DISPATCH(stitch_eh_forward, p);
}

void stitch_eh_backward(const StitchEHBackwardParams& p) {
  const char* op = "stitch_eh_backward";
  if (check_dims(op, p.N, p.D, p.n)) return;
  need(op, p.h0 && p.p && p.G && p.dout && p.dh0 && p.dp && p.dG, "h0, p, gate, dout, dh0, dp and dgate");
  BTS_DISPATCH(stitch_eh_backward, p);
}

void stitch_he_forward(const StitchHEParams& p) {
  const char* op = "stitch_he_forward";
  if (check_dims(op, p.N, p.D, p.n)) return;
  need(op, p.h && p.q && p.G && p.out, "h, q, gate and out");
  BTS_DISPATCH(stitch_he_forward, p);
}

void stitch_he_backward(const StitchHEBackwardParams& p) {
  const char* op = "stitch_he_backward";
  if (check_dims(op, p.N, p.D, p.n)) return;
  need(op, p.h && p.q && p.G && p.dout && p.dh && p.dq && p.dG, "h, q, gate, dout, dh, dq and dgate");
  BTS_DISPATCH(stitch_he_backward, p);
}

namespace {
struct Dims {
  int64_t N, D, n, ND, nND, G;
};
Dims dims(const OpDef& def, const OpCall& c) {
  Dims s;
  s.N = reg::int_arg(def, c, 0, 0, kMaxDim);
  s.D = reg::int_arg(def, c, 1, 1, kMaxDim);
  s.n = reg::int_arg(def, c, 2, 1, kMaxExperts);
  s.ND = reg::mul(def, {s.N, s.D});
  s.nND = reg::mul(def, {s.n, s.N, s.D});
  s.G = reg::mul(def, {s.N, s.D, s.n + 1});
  return s;
}
const char* kND = "N*D";
const char* knND = "experts*N*D";
const char* kG = "N*D*(experts+1)";

template <typename T>
T* f32(const OpDef& def, OpCall& c, size_t i, int64_t len, const char* shape) {
  return static_cast<T*>(reg::tensor(def, c, i, len, shape));
}
}  // namespace

StitchEHParams parse_stitch_eh_forward(const OpDef& def, OpCall& c) {
  const Dims s = dims(def, c);
  StitchEHParams p;
  p.N = s.N, p.D = s.D, p.n = s.n;
  p.h0 = f32<const float>(def, c, 0, s.ND, kND);
  p.p = f32<const float>(def, c, 1, s.nND, knND);
  p.G = f32<const float>(def, c, 2, s.G, kG);
  p.out = f32<float>(def, c, 3, s.ND, kND);
  return p;
}

StitchEHBackwardParams parse_stitch_eh_backward(const OpDef& def, OpCall& c) {
  const Dims s = dims(def, c);
  StitchEHBackwardParams p;
  p.N = s.N, p.D = s.D, p.n = s.n;
  p.h0 = f32<const float>(def, c, 0, s.ND, kND);
  p.p = f32<const float>(def, c, 1, s.nND, knND);
  p.G = f32<const float>(def, c, 2, s.G, kG);
  p.dout = f32<const float>(def, c, 3, s.ND, kND);
  p.dh0 = f32<float>(def, c, 4, s.ND, kND);
  p.dp = f32<float>(def, c, 5, s.nND, knND);
  p.dG = f32<float>(def, c, 6, s.G, kG);
  return p;
}

StitchHEParams parse_stitch_he_forward(const OpDef& def, OpCall& c) {
  const Dims s = dims(def, c);
  StitchHEParams p;
  p.N = s.N, p.D = s.D, p.n = s.n;
  p.h = f32<const float>(def, c, 0, s.nND, knND);
  p.q = f32<const float>(def, c, 1, s.nND, knND);
  p.G = f32<const float>(def, c, 2, s.G, kG);
  p.out = f32<float>(def, c, 3, s.nND, knND);
  return p;
}

StitchHEBackwardParams parse_stitch_he_backward(const OpDef& def, OpCall& c) {
  const Dims s = dims(def, c);
  StitchHEBackwardParams p;
  p.N = s.N, p.D = s.D, p.n = s.n;
  p.h = f32<const float>(def, c, 0, s.nND, knND);
  p.q = f32<const float>(def, c, 1, s.nND, knND);
  p.G = f32<const float>(def, c, 2, s.G, kG);
  p.dout = f32<const float>(def, c, 3, s.nND, knND);
  p.dh = f32<float>(def, c, 4, s.nND, knND);
  p.dq = f32<float>(def, c, 5, s.nND, knND);
  p.dG = f32<float>(def, c, 6, s.G, kG);
  return p;
}

namespace {
void run_eh_forward(const OpDef& def, OpCall& c) { stitch_eh_forward(parse_stitch_eh_forward(def, c)); }
void run_eh_backward(const OpDef& def, OpCall& c) { stitch_eh_backward(parse_stitch_eh_backward(def, c)); }
void run_he_forward(const OpDef& def, OpCall& c) { stitch_he_forward(parse_stitch_he_forward(def, c)); }
void run_he_backward(const OpDef& def, OpCall& c) { stitch_he_backward(parse_stitch_he_backward(def, c)); }

ArgSpec in(const char* name) { return {name, DType::F32, false, false}; }
ArgSpec out(const char* name) { return {name, DType::F32, false, true}; }
}  // namespace

void register_stitch(std::vector<OpDef>& ops) {
  ops.push_back({"stitch_eh_forward", {in("h0"), in("p"), in("gate"), out("out")}, {"N", "D", "experts"}, run_eh_forward});
  ops.push_back({"stitch_eh_backward",
                 {in("h0"), in("p"), in("gate"), in("dout"), out("dh0"), out("dp"), out("dgate")},
                 {"N", "D", "experts"},
                 run_eh_backward});
  ops.push_back({"stitch_he_forward", {in("h"), in("q"), in("gate"), out("out")}, {"N", "D", "experts"}, run_he_forward});
  ops.push_back({"stitch_he_backward",
                 {in("h"), in("q"), in("gate"), in("dout"), out("dh"), out("dq"), out("dgate")},
                 {"N", "D", "experts"},
                 run_he_backward});
}

}  // namespace bts
