// ops/attention.cc: the causal grouped-query attention op entries (checks, dispatch), their argument
// parsers (bts/op_args.h) and registry specs ("attention_forward", "attention_backward").
//
// The entries check what the params can tell (sizes, H divisible by Hkv, Tq <= Tk <= Tcap, pointers,
// a finite scale); the registry runs check every buffer length against the shape the scalars imply.
// Legend (common.h): B batch, Tq queries, Tk keys used, Tcap key capacity, H query heads, Hkv
// key/value heads, Dh head dim.
#include <cmath>
#include <string>

#include "bts/dispatch.h"
#include "bts/op_args.h"
#include "bts/ops.h"
#include "bts/registry.h"

BTS_DECLARE_KERNEL(attention_forward, AttentionParams)
BTS_DECLARE_KERNEL(attention_backward, AttentionBackwardParams)

namespace bts {

namespace {
std::string S(int64_t x) { return std::to_string(x); }

void check_heads(const char* op, int64_t H, int64_t Hkv, int64_t Dh) {
  if (H <= 0) throw Error("E_ARGUMENT", std::string(op) + ": heads (H) must be > 0, got " + S(H));
  if (Hkv <= 0) throw Error("E_ARGUMENT", std::string(op) + ": kvHeads (Hkv) must be > 0, got " + S(Hkv));
  if (H % Hkv != 0)
    throw Error("E_ARGUMENT", std::string(op) + ": heads (H = " + S(H) + ") must be a multiple of kvHeads (Hkv = " +
                                  S(Hkv) + ")");
  if (Dh <= 0) throw Error("E_ARGUMENT", std::string(op) + ": headDim (Dh) must be > 0, got " + S(Dh));
}
}  // namespace

void attention_forward(const AttentionParams& p) {
  const char* op = "attention_forward";
  if (p.B < 0) throw Error("E_ARGUMENT", std::string(op) + ": batch (B) must be >= 0, got " + S(p.B));
  check_heads(op, p.H, p.Hkv, p.Dh);
  if (p.Tq < 0 || p.Tq > p.Tk || p.Tk > p.Tcap)
    throw Error("E_ARGUMENT", std::string(op) + ": need 0 <= tq <= tk <= tcap, got tq = " + S(p.Tq) + ", tk = " +
                                  S(p.Tk) + ", tcap = " + S(p.Tcap));
  if (!std::isfinite(p.scale)) throw Error("E_ARGUMENT", std::string(op) + ": scale must be finite");
  if (p.B == 0 || p.Tq == 0) return;
  if (!p.q || !p.k || !p.v || !p.out) throw Error("E_ARGUMENT", std::string(op) + ": q, k, v and out are required");
  BTS_DISPATCH(attention_forward, p);
}

void attention_backward(const AttentionBackwardParams& p) {
  const char* op = "attention_backward";
  if (p.B < 0) throw Error("E_ARGUMENT", std::string(op) + ": batch (B) must be >= 0, got " + S(p.B));
  if (p.T < 0) throw Error("E_ARGUMENT", std::string(op) + ": sequence length (T) must be >= 0, got " + S(p.T));
  check_heads(op, p.H, p.Hkv, p.Dh);
  if (!std::isfinite(p.scale)) throw Error("E_ARGUMENT", std::string(op) + ": scale must be finite");
  if (p.B == 0 || p.T == 0) return;
  if (!p.q || !p.k || !p.v || !p.out || !p.lse || !p.dout || !p.dq || !p.dk || !p.dv)
    throw Error("E_ARGUMENT", std::string(op) + ": every tensor is required");
  BTS_DISPATCH(attention_backward, p);
}

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;
}  // namespace

// Scalars: B, Tq, Tk, Tcap, H, Hkv, Dh, scale.
AttentionParams parse_attention_forward(const OpDef& def, OpCall& c) {
  AttentionParams p;
  p.B = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.Tq = reg::int_arg(def, c, 1, 0, kMaxDim);
  p.Tk = reg::int_arg(def, c, 2, 0, kMaxDim);
  p.Tcap = reg::int_arg(def, c, 3, 0, kMaxDim);
  p.H = reg::int_arg(def, c, 4, 1, kMaxDim);
  p.Hkv = reg::int_arg(def, c, 5, 1, kMaxDim);
  p.Dh = reg::int_arg(def, c, 6, 1, kMaxDim);
  p.scale = float(reg::num_arg(def, c, 7));
  // Shape relations first, so a bad Tq/Tk/Tcap is reported as such and not as a length mismatch.
  check_heads(def.name, p.H, p.Hkv, p.Dh);
  if (p.Tq > p.Tk || p.Tk > p.Tcap)
    throw Error("E_ARGUMENT", std::string(def.name) + ": need tq <= tk <= tcap, got tq = " + S(p.Tq) + ", tk = " +
                                  S(p.Tk) + ", tcap = " + S(p.Tcap));
  const int64_t nq = reg::mul(def, {p.B, p.Tq, p.H, p.Dh});
  const int64_t nk = reg::mul(def, {p.B, p.Tcap, p.Hkv, p.Dh});
  const int64_t nl = reg::mul(def, {p.B, p.H, p.Tq});
  p.q = static_cast<const float*>(reg::tensor(def, c, 0, nq, "B*Tq*H*Dh"));
  p.k = static_cast<const float*>(reg::tensor(def, c, 1, nk, "B*Tcap*Hkv*Dh"));
  p.v = static_cast<const float*>(reg::tensor(def, c, 2, nk, "B*Tcap*Hkv*Dh"));
  p.out = static_cast<float*>(reg::tensor(def, c, 3, nq, "B*Tq*H*Dh"));
  p.lse = static_cast<float*>(reg::tensor(def, c, 4, nl, "B*H*Tq"));
  return p;
}

// Scalars: B, T, H, Hkv, Dh, scale.
AttentionBackwardParams parse_attention_backward(const OpDef& def, OpCall& c) {
  AttentionBackwardParams p;
  p.B = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.T = reg::int_arg(def, c, 1, 0, kMaxDim);
  p.H = reg::int_arg(def, c, 2, 1, kMaxDim);
  p.Hkv = reg::int_arg(def, c, 3, 1, kMaxDim);
  p.Dh = reg::int_arg(def, c, 4, 1, kMaxDim);
  p.scale = float(reg::num_arg(def, c, 5));
  check_heads(def.name, p.H, p.Hkv, p.Dh);
  const int64_t nq = reg::mul(def, {p.B, p.T, p.H, p.Dh});
  const int64_t nk = reg::mul(def, {p.B, p.T, p.Hkv, p.Dh});
  const int64_t nl = reg::mul(def, {p.B, p.H, p.T});
  p.q = static_cast<const float*>(reg::tensor(def, c, 0, nq, "B*T*H*Dh"));
  p.k = static_cast<const float*>(reg::tensor(def, c, 1, nk, "B*T*Hkv*Dh"));
  p.v = static_cast<const float*>(reg::tensor(def, c, 2, nk, "B*T*Hkv*Dh"));
  p.out = static_cast<const float*>(reg::tensor(def, c, 3, nq, "B*T*H*Dh"));
  p.lse = static_cast<const float*>(reg::tensor(def, c, 4, nl, "B*H*T"));
  p.dout = static_cast<const float*>(reg::tensor(def, c, 5, nq, "B*T*H*Dh"));
  p.dq = static_cast<float*>(reg::tensor(def, c, 6, nq, "B*T*H*Dh"));
  p.dk = static_cast<float*>(reg::tensor(def, c, 7, nk, "B*T*Hkv*Dh"));
  p.dv = static_cast<float*>(reg::tensor(def, c, 8, nk, "B*T*Hkv*Dh"));
  return p;
}

namespace {
void run_forward(const OpDef& def, OpCall& c) { attention_forward(parse_attention_forward(def, c)); }
void run_backward(const OpDef& def, OpCall& c) { attention_backward(parse_attention_backward(def, c)); }
}  // namespace

void register_attention(std::vector<OpDef>& out) {
  out.push_back({"attention_forward",
                 {{"q", DType::F32, false, false},
                  {"k", DType::F32, false, false},
                  {"v", DType::F32, false, false},
                  {"out", DType::F32, false, true},
                  {"lse", DType::F32, true, true}},
                 {"B", "Tq", "Tk", "Tcap", "H", "Hkv", "Dh", "scale"},
                 run_forward});
  out.push_back({"attention_backward",
                 {{"q", DType::F32, false, false},
                  {"k", DType::F32, false, false},
                  {"v", DType::F32, false, false},
                  {"out", DType::F32, false, false},
                  {"lse", DType::F32, false, false},
                  {"dout", DType::F32, false, false},
                  {"dq", DType::F32, false, true},
                  {"dk", DType::F32, false, true},
                  {"dv", DType::F32, false, true}},
                 {"B", "T", "H", "Hkv", "Dh", "scale"},
                 run_backward});
}

}  // namespace bts
