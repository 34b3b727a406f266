// ops/embedding.cc: the embedding op entries (checks incl. every token id, dispatch), their argument
// parsers (bts/op_args.h) and registry specs. The id scan is O(N) and runs before any kernel touches memory, so a bad id can never
// read or write outside the table.
#include <string>

#include "bts/dispatch.h"
#include "bts/op_args.h"
#include "bts/ops.h"
#include "bts/registry.h"

BTS_DECLARE_KERNEL(embedding_forward, EmbeddingParams)
BTS_DECLARE_KERNEL(embedding_backward, EmbeddingBackwardParams)

namespace bts {

namespace {
// Throws E_TOKEN_RANGE naming the first id outside [0, V).
void check_ids(const char* op, const int32_t* ids, int64_t N, int64_t V) {
  for (int64_t n = 0; n < N; n++) {
    if (ids[n] < 0 || int64_t(ids[n]) >= V)
      throw Error("E_TOKEN_RANGE", std::string(op) + ": argument 'ids' at position " + std::to_string(n) + " is " +
                                       std::to_string(ids[n]) + ", outside [0, V) with V = " + std::to_string(V));
  }
}

void check_dims(const char* op, int64_t N, int64_t V, int64_t D, const void* a, const void* b, const void* c) {
  if (N < 0 || V <= 0 || D <= 0)
    throw Error("E_ARGUMENT", std::string(op) + ": N >= 0, V > 0 and D > 0 required, got N = " + std::to_string(N) +
                                  ", V = " + std::to_string(V) + ", D = " + std::to_string(D));
  if (N > 0 && (!a || !b || !c)) throw Error("E_ARGUMENT", std::string(op) + ": null buffer");
}
}  // namespace

void embedding_forward(const EmbeddingParams& p) {
  check_dims("embedding_forward", p.N, p.V, p.D, p.ids, p.table, p.out);
  if (p.N == 0) return;
  check_ids("embedding_forward", p.ids, p.N, p.V);
  BTS_DISPATCH(embedding_forward, p);
}

void embedding_backward(const EmbeddingBackwardParams& p) {
  check_dims("embedding_backward", p.N, p.V, p.D, p.ids, p.dout, p.dtable);
  if (p.N == 0) return;
  check_ids("embedding_backward", p.ids, p.N, p.V);
  BTS_DISPATCH(embedding_backward, p);
}

namespace {
constexpr int64_t kMaxDim = int64_t(1) << 40;
}  // namespace

EmbeddingParams parse_embedding_forward(const OpDef& def, OpCall& c) {
  EmbeddingParams p;
  p.N = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.V = reg::int_arg(def, c, 1, 1, kMaxDim);
  p.D = reg::int_arg(def, c, 2, 1, kMaxDim);
  p.ids = static_cast<const int32_t*>(reg::tensor(def, c, 0, p.N, "N"));
  p.table = static_cast<const float*>(reg::tensor(def, c, 1, reg::mul(def, {p.V, p.D}), "V*D"));
  p.out = static_cast<float*>(reg::tensor(def, c, 2, reg::mul(def, {p.N, p.D}), "N*D"));
  return p;
}

EmbeddingBackwardParams parse_embedding_backward(const OpDef& def, OpCall& c) {
  EmbeddingBackwardParams p;
  p.N = reg::int_arg(def, c, 0, 0, kMaxDim);
  p.V = reg::int_arg(def, c, 1, 1, kMaxDim);
  p.D = reg::int_arg(def, c, 2, 1, kMaxDim);
  p.ids = static_cast<const int32_t*>(reg::tensor(def, c, 0, p.N, "N"));
  p.dout = static_cast<const float*>(reg::tensor(def, c, 1, reg::mul(def, {p.N, p.D}), "N*D"));
  p.dtable = static_cast<float*>(reg::tensor(def, c, 2, reg::mul(def, {p.V, p.D}), "V*D"));
  return p;
}

namespace {
void run_forward(const OpDef& def, OpCall& c) { embedding_forward(parse_embedding_forward(def, c)); }
void run_backward(const OpDef& def, OpCall& c) { embedding_backward(parse_embedding_backward(def, c)); }
}  // namespace

void register_embedding(std::vector<OpDef>& out) {
  out.push_back({"embedding_forward",
                 {{"ids", DType::I32, false, false}, {"table", DType::F32, false, false}, {"out", DType::F32, false, true}},
                 {"N", "V", "D"},
                 run_forward});
  out.push_back({"embedding_backward",
                 {{"ids", DType::I32, false, false}, {"dout", DType::F32, false, false}, {"dtable", DType::F32, false, true}},
                 {"N", "V", "D"},
                 run_backward});
}

}  // namespace bts
