// registry.cc: the op table and the checked call path used by the binding (see bts/registry.h).
// Each op contributes its OpDefs from native/ops/<op>.cc through a register_* function listed below.
#include "bts/registry.h"

#include <string>

namespace bts {

// One line per op file in native/ops/. Weak only in filtered builds (CMake -DBTS_ONLY_OPS=..., for
// working on one op); a normal build fails to link if an op file is missing.
#ifdef BTS_ONLY_OPS_BUILD
#define BTS_OPS_WEAK __attribute__((weak))
#define BTS_IF_PRESENT(f) if (f)
#else
#define BTS_OPS_WEAK
#define BTS_IF_PRESENT(f)
#endif
BTS_OPS_WEAK void register_gemm(std::vector<OpDef>& out);
BTS_OPS_WEAK void register_attention(std::vector<OpDef>& out);
BTS_OPS_WEAK void register_rmsnorm(std::vector<OpDef>& out);
BTS_OPS_WEAK void register_rope(std::vector<OpDef>& out);
BTS_OPS_WEAK void register_swiglu(std::vector<OpDef>& out);
BTS_OPS_WEAK void register_embedding(std::vector<OpDef>& out);
BTS_OPS_WEAK void register_cross_entropy(std::vector<OpDef>& out);
BTS_OPS_WEAK void register_adamw(std::vector<OpDef>& out);
BTS_OPS_WEAK void register_stitch(std::vector<OpDef>& out);

const std::vector<OpDef>& op_registry() {
  static const std::vector<OpDef> ops = [] {
    std::vector<OpDef> v;
    BTS_IF_PRESENT(register_gemm) register_gemm(v);
    BTS_IF_PRESENT(register_attention) register_attention(v);
    BTS_IF_PRESENT(register_rmsnorm) register_rmsnorm(v);
    BTS_IF_PRESENT(register_rope) register_rope(v);
    BTS_IF_PRESENT(register_swiglu) register_swiglu(v);
    BTS_IF_PRESENT(register_embedding) register_embedding(v);
    BTS_IF_PRESENT(register_cross_entropy) register_cross_entropy(v);
    BTS_IF_PRESENT(register_adamw) register_adamw(v);
    BTS_IF_PRESENT(register_stitch) register_stitch(v);
    return v;
  }();
  return ops;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
    case DType::F64: return "f64";
    case DType::I64: return "i64";
  }
  return "?";
}

const OpDef* find_op(const std::string& name) {
  for (const OpDef& d : op_registry())
    if (name == d.name) return &d;
  return nullptr;
}

void check_call(const OpDef& def, const OpCall& call) {
  if (call.tensors.size() != def.tensors.size())
    throw Error("E_ARGUMENT", std::string(def.name) + ": expected " + std::to_string(def.tensors.size()) +
                                  " tensor arguments, got " + std::to_string(call.tensors.size()));
  if (call.scalars.size() != def.scalars.size())
    throw Error("E_ARGUMENT", std::string(def.name) + ": expected " + std::to_string(def.scalars.size()) +
                                  " scalar arguments, got " + std::to_string(call.scalars.size()));
  for (size_t i = 0; i < call.tensors.size(); i++) {
    const TensorRef& t = call.tensors[i];
    const ArgSpec& a = def.tensors[i];
    if (!t.data) {
      if (!a.optional) throw Error("E_ARGUMENT", std::string(def.name) + ": argument '" + a.name + "' is required");
      continue;
    }
    if (t.dtype != a.dtype)
      throw Error("E_DTYPE", std::string(def.name) + ": argument '" + a.name + "' must be " + dtype_name(a.dtype) +
                                 ", got " + dtype_name(t.dtype));
  }
}

void call_op(const std::string& name, OpCall& call) {
  const OpDef* def = find_op(name);
  if (!def) throw Error("E_UNKNOWN_OP", "unknown op '" + name + "'");
  check_call(*def, call);
  def->run(*def, call);
}

namespace reg {

int64_t int_arg(const OpDef& def, const OpCall& c, size_t i, int64_t lo, int64_t hi) {
  double v = c.scalars[i];
  if (!(v == v) || v != double(int64_t(v)) || v < double(lo) || v > double(hi))
    throw Error("E_ARGUMENT", std::string(def.name) + ": '" + def.scalars[i] + "' must be an integer in [" +
                                  std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(v));
  return int64_t(v);
}

double num_arg(const OpDef& def, const OpCall& c, size_t i) {
  double v = c.scalars[i];
  if (!(v == v) || v == 1.0 / 0.0 || v == -1.0 / 0.0)
    throw Error("E_ARGUMENT", std::string(def.name) + ": '" + def.scalars[i] + "' must be a finite number");
  return v;
}

bool bool_arg(const OpDef& def, const OpCall& c, size_t i) {
  double v = c.scalars[i];
  if (v != 0.0 && v != 1.0)
    throw Error("E_ARGUMENT", std::string(def.name) + ": '" + def.scalars[i] + "' must be a boolean (0 or 1)");
  return v != 0.0;
}

static void* check_len(const OpDef& def, OpCall& c, size_t i, int64_t expected, const std::string& shape, bool at_least) {
  TensorRef& t = c.tensors[i];
  if (!t.data) return nullptr;
  bool ok = at_least ? t.length >= expected : t.length == expected;
  if (!ok)
    throw Error("E_SHAPE", std::string(def.name) + ": argument '" + def.tensors[i].name + "' has " +
                               std::to_string(t.length) + " elements, expected " + (at_least ? "at least " : "") +
                               shape + " = " + std::to_string(expected));
  return t.data;
}

void* tensor(const OpDef& def, OpCall& c, size_t i, int64_t expected, const std::string& shape) {
  return check_len(def, c, i, expected, shape, false);
}

void* tensor_min(const OpDef& def, OpCall& c, size_t i, int64_t expected, const std::string& shape) {
  return check_len(def, c, i, expected, shape, true);
}

int64_t mul(const OpDef& def, std::initializer_list<int64_t> xs) {
  __int128 r = 1;
  for (int64_t x : xs) {
    r *= x;
    if (r > (__int128(1) << 62) || r < 0) throw Error("E_ARGUMENT", std::string(def.name) + ": tensor size overflows");
  }
  return int64_t(r);
}

}  // namespace reg
}  // namespace bts
