// ops/rope.cc: the RoPE op entries (checks, dispatch), their argument parsers (bts/op_args.h) and
// registry specs.
//
// rope_forward checks every position against [0, P) before any kernel runs (an out-of-range position
// would read past the table): E_ARGUMENT naming 'pos', the index and the value. x/out are row-strided
// views (ld_x, ld_out: 0 means packed nh*Dh), so the engine can rotate q and k in place inside a fused
// qkv buffer; their buffers need at least (N-1)*ld + nh*Dh elements. out may be x itself (same
// stride); other overlaps are not supported.
#include <cmath>
#include <string>

#include "bts/dispatch.h"
#include "bts/op_args.h"
#include "bts/ops.h"
#include "bts/registry.h"

BTS_DECLARE_KERNEL(rope_table, RopeTableParams)
BTS_DECLARE_KERNEL(rope_forward, RopeParams)

namespace bts {

void rope_table(const RopeTableParams& p) {
  const char* op = "rope_table";
  if (p.P < 0) throw Error("E_ARGUMENT", std::string(op) + ": 'P' must be >= 0, got " + std::to_string(p.P));
  if (p.Dh <= 0 || p.Dh % 2 != 0)
    throw Error("E_ARGUMENT", std::string(op) + ": 'headDim' must be a positive even number, got " + std::to_string(p.Dh));
  if (!(p.theta > 0) || !std::isfinite(p.theta))
    throw Error("E_ARGUMENT", std::string(op) + ": 'theta' must be a positive finite number, got " + std::to_string(p.theta));
  if (p.factor > 0) {
    if (!std::isfinite(p.factor)) throw Error("E_ARGUMENT", std::string(op) + ": scaling 'factor' must be finite");
    if (!(p.low_freq_factor > 0) || !std::isfinite(p.low_freq_factor))
      throw Error("E_ARGUMENT", std::string(op) + ": scaling 'lowFreqFactor' must be > 0, got " + std::to_string(p.low_freq_factor));
    if (!(p.high_freq_factor > p.low_freq_factor) || !std::isfinite(p.high_freq_factor))
      throw Error("E_ARGUMENT", std::string(op) + ": scaling 'highFreqFactor' must be > lowFreqFactor (" +
                                    std::to_string(p.low_freq_factor) + "), got " + std::to_string(p.high_freq_factor));
    if (!(p.original_max_position_embeddings > 0) || !std::isfinite(p.original_max_position_embeddings))
      throw Error("E_ARGUMENT", std::string(op) + ": scaling 'originalMaxPositionEmbeddings' must be > 0, got " +
                                    std::to_string(p.original_max_position_embeddings));
  }
  if (!p.table && p.P > 0) throw Error("E_ARGUMENT", std::string(op) + ": 'table' is required");
  if (p.P == 0 && !p.inv_freq) return;
  BTS_DISPATCH(rope_table, p);
}

namespace {
// Everything about rope_forward that the scalars alone tell (shared by the entry and the registry run).
void check_forward_shape(const RopeParams& p) {
  const char* op = "rope_forward";
  if (p.N < 0 || p.nh <= 0 || p.P <= 0)
    throw Error("E_ARGUMENT", std::string(op) + ": N >= 0, heads > 0 and P > 0 required");
  if (p.Dh <= 0 || p.Dh % 2 != 0)
    throw Error("E_ARGUMENT", std::string(op) + ": 'headDim' must be a positive even number, got " + std::to_string(p.Dh));
  if (p.nh > (int64_t(1) << 40) / p.Dh) throw Error("E_ARGUMENT", std::string(op) + ": heads*headDim overflows");
  const int64_t row = p.nh * p.Dh;
  if (p.ld_x != 0 && p.ld_x < row)
    throw Error("E_ARGUMENT", std::string(op) + ": 'ldX' must be 0 or >= heads*headDim = " + std::to_string(row) +
                                  ", got " + std::to_string(p.ld_x));
  if (p.ld_out != 0 && p.ld_out < row)
    throw Error("E_ARGUMENT", std::string(op) + ": 'ldOut' must be 0 or >= heads*headDim = " + std::to_string(row) +
                                  ", got " + std::to_string(p.ld_out));
  if (p.out && p.out == p.x && (p.ld_x ? p.ld_x : row) != (p.ld_out ? p.ld_out : row))
    throw Error("E_ARGUMENT", std::string(op) + ": in-place 'out' (== 'x') needs ldOut == ldX");
}
}  // namespace

void check_rope_positions(const RopeParams& p) {
  for (int64_t n = 0; n < p.N; n++)
    if (p.pos[n] < 0 || p.pos[n] >= p.P)
      throw Error("E_ARGUMENT", std::string("rope_forward: 'pos'[") + std::to_string(n) + "] = " +
                                    std::to_string(p.pos[n]) + " is outside the table's positions [0, " +
                                    std::to_string(p.P) + ")");
}

void rope_forward(const RopeParams& p) {
  const char* op = "rope_forward";
  check_forward_shape(p);
  if (!p.x || !p.out || !p.table || (!p.pos && p.N > 0)) throw Error("E_ARGUMENT", std::string(op) + ": x, pos, table and out are required");
  check_rope_positions(p);
  if (p.N == 0) return;
  BTS_DISPATCH(rope_forward, p);
}

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;
}  // namespace

RopeTableParams parse_rope_table(const OpDef& def, OpCall& c) {
  RopeTableParams p;
  p.P = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.Dh = reg::int_arg(def, c, 1, 1, kMaxDim);
  p.theta = reg::num_arg(def, c, 2);
  p.factor = reg::num_arg(def, c, 3);
  p.low_freq_factor = reg::num_arg(def, c, 4);
  p.high_freq_factor = reg::num_arg(def, c, 5);
  p.original_max_position_embeddings = reg::num_arg(def, c, 6);
  p.table = static_cast<float*>(reg::tensor(def, c, 0, reg::mul(def, {p.P, p.Dh}), "P*headDim"));
  p.inv_freq = static_cast<float*>(reg::tensor(def, c, 1, p.Dh / 2, "headDim/2"));
  return p;
}

RopeParams parse_rope_forward(const OpDef& def, OpCall& c) {
  RopeParams p;
  p.N = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.nh = reg::int_arg(def, c, 1, 1, kMaxDim);
  p.Dh = reg::int_arg(def, c, 2, 1, kMaxDim);
  p.P = reg::int_arg(def, c, 3, 1, kMaxDim);
  p.inverse = reg::bool_arg(def, c, 4);
  p.ld_x = reg::int_arg(def, c, 5, 0, kMaxDim);
  p.ld_out = reg::int_arg(def, c, 6, 0, kMaxDim);
  const int64_t row = reg::mul(def, {p.nh, p.Dh});
  check_forward_shape(p);
  const int64_t ldx = p.ld_x ? p.ld_x : row, ldo = p.ld_out ? p.ld_out : row;
  const int64_t need_x = p.N == 0 ? 0 : reg::mul(def, {p.N - 1, ldx}) + row;
  const int64_t need_o = p.N == 0 ? 0 : reg::mul(def, {p.N - 1, ldo}) + row;
  p.x = static_cast<const float*>(reg::tensor_min(def, c, 0, need_x, "(N-1)*ldX + heads*headDim"));
  p.pos = static_cast<const int32_t*>(reg::tensor(def, c, 1, p.N, "N"));
  p.table = static_cast<const float*>(reg::tensor(def, c, 2, reg::mul(def, {p.P, p.Dh}), "P*headDim"));
  p.out = static_cast<float*>(reg::tensor_min(def, c, 3, need_o, "(N-1)*ldOut + heads*headDim"));
  return p;
}

namespace {
void run_table(const OpDef& def, OpCall& c) { rope_table(parse_rope_table(def, c)); }
void run_forward(const OpDef& def, OpCall& c) { rope_forward(parse_rope_forward(def, c)); }
}  // namespace

void register_rope(std::vector<OpDef>& out) {
  out.push_back({"rope_table",
                 {{"table", DType::F32, false, true}, {"invFreq", DType::F32, true, true}},
                 {"P", "headDim", "theta", "factor", "lowFreqFactor", "highFreqFactor", "originalMaxPositionEmbeddings"},
                 run_table});
  out.push_back({"rope_forward",
                 {{"x", DType::F32, false, false},
                  {"pos", DType::I32, false, false},
                  {"table", DType::F32, false, false},
                  {"out", DType::F32, false, true}},
                 {"N", "heads", "headDim", "P", "inverse", "ldX", "ldOut"},
                 run_forward});
}

}  // namespace bts
