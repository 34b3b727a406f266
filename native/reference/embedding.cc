// reference/embedding.cc: plain-loop embedding lookup and its backward, the oracle for
// native/cpu/embedding.cc. Ids are validated by the entry (native/ops/embedding.cc) before this runs.
// Legend: N rows (tokens), V vocab, D width.
#include <cstring>

#include "bts/ops.h"

namespace bts {
namespace reference {

void embedding_forward(const EmbeddingParams& p) {
  for (int64_t n = 0; n < p.N; n++) {
    const float* row = p.table + int64_t(p.ids[n]) * p.D;  // [D]
    float* out = p.out + n * p.D;                            // [D]
    for (int64_t d = 0; d < p.D; d++) out[d] = row[d];
  }
}

// Rows of the same token are added in increasing n, so the result is fully determined by the inputs.
void embedding_backward(const EmbeddingBackwardParams& p) {
  for (int64_t n = 0; n < p.N; n++) {
    float* dst = p.dtable + int64_t(p.ids[n]) * p.D;  // [D]
    const float* g = p.dout + n * p.D;                // [D]
    for (int64_t d = 0; d < p.D; d++) dst[d] += g[d];
  }
}

}  // namespace reference
}  // namespace bts
