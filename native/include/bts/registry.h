// registry.h: the table of ops reachable by name from the binding (and from any other host).
//
// An op call is a list of typed buffers and a list of numeric scalars, both in the order of the op's
// spec. The op's `run` (in native/ops/<op>.cc) reads the scalars, checks every buffer's dtype and
// length against the shape the scalars imply (throwing E_SHAPE / E_DTYPE / E_ARGUMENT with the
// argument's name, the expected and the actual value), fills the params struct and calls the entry.
// This is the only place lengths are known, so it is the last line of defence against a buffer
// overrun from a bad call: nothing reaches a kernel unchecked.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "bts/common.h"

namespace bts {

enum class DType : int { F32 = 0, BF16 = 1, I32 = 2, F64 = 3, I64 = 4 };
const char* dtype_name(DType t);  // "f32" | "bf16" | "i32" | "f64" | "i64"

struct TensorRef {
  void* data = nullptr;  // null = argument omitted (allowed only for optional ones)
  int64_t length = 0;    // elements
  DType dtype = DType::F32;
};

struct ArgSpec {
  const char* name;
  DType dtype;
  bool optional;
  bool output;
};

struct OpCall {
  std::vector<TensorRef> tensors;
  std::vector<double> scalars;
};

struct OpDef {
  const char* name;
  std::vector<ArgSpec> tensors;
  std::vector<const char*> scalars;
  void (*run)(const OpDef& def, OpCall& call);
};

const std::vector<OpDef>& op_registry();
const OpDef* find_op(const std::string& name);

// Checks counts of tensors/scalars, that required tensors are present and their dtypes (E_ARGUMENT /
// E_DTYPE naming the argument). Shared by every backend called by name (see bts/op_args.h).
void check_call(const OpDef& def, const OpCall& call);

// Finds the op (E_UNKNOWN_OP), check_call, then def.run. Throws bts::Error.
void call_op(const std::string& name, OpCall& call);

// Helpers for OpDef::run implementations.
namespace reg {
// Scalar `i` as an integer in [lo, hi]; throws E_ARGUMENT naming it.
int64_t int_arg(const OpDef& def, const OpCall& c, size_t i, int64_t lo, int64_t hi);
double num_arg(const OpDef& def, const OpCall& c, size_t i);
bool bool_arg(const OpDef& def, const OpCall& c, size_t i);
// Tensor `i` with exactly `expected` elements (`shape` is how the message writes it, e.g. "N*D").
// Returns its data, or null if it is optional and omitted.
void* tensor(const OpDef& def, OpCall& c, size_t i, int64_t expected, const std::string& shape);
// Like tensor(), but the length must be at least `expected` (strided views).
void* tensor_min(const OpDef& def, OpCall& c, size_t i, int64_t expected, const std::string& shape);
// Product with overflow check (E_ARGUMENT on overflow past 2^62).
int64_t mul(const OpDef& def, std::initializer_list<int64_t> xs);
}  // namespace reg

}  // namespace bts
