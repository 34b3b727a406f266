// cpu/embedding.cc: embedding lookup (threads over rows) and its scatter-add backward.
//
// Forward is a row gather: each thread copies a contiguous range of output rows.
// Backward: dtable[ids[n]] += dout[n]. Several rows may share a token, so threads cannot split the
// rows without either atomics (non-deterministic float sums) or per-thread copies of dtable ([V, D],
// far too large). Instead each thread owns a contiguous range of the D columns and walks ALL rows in
// order n = 0..N-1, adding its slice: every element of dtable receives its contributions in the same
// order as the reference, so the result is bit-identical to it for any thread count, and no two
// threads ever write the same float. Each thread reads only its column slice of dout, so the total
// memory traffic is the same as a serial pass. Limit: with D smaller than about 2 vector widths there
// is nothing to split and the backward runs on one thread (it is tiny then anyway).
// Legend: N rows (tokens), V vocab, D width.

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "isa_begin.h"

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

void embedding_forward(const EmbeddingParams& p) {
  const int64_t D = p.D;
  parallel_for(p.N, std::max<int64_t>(1, 8192 / D), [&](int64_t n0, int64_t n1, int) {
    for (int64_t n = n0; n < n1; n++)
      std::memcpy(p.out + n * D, p.table + int64_t(p.ids[n]) * D, size_t(D) * sizeof(float));
  });
}

void embedding_backward(const EmbeddingBackwardParams& p) {
  const int64_t D = p.D;
  // Column ranges are whole vectors (except the last), so threads never share a cache line's worth
  // of vector stores more than at one boundary; 16 floats = one 64-byte line at least per thread.
  const int64_t unit = std::max<int64_t>(16, W);
  const int64_t units = (D + unit - 1) / unit;
  parallel_for(units, 1, [&](int64_t u0, int64_t u1, int) {
    const int64_t d0 = u0 * unit, d1 = std::min(D, u1 * unit);
    const int64_t len = d1 - d0;
    for (int64_t n = 0; n < p.N; n++) {
      float* dst = p.dtable + int64_t(p.ids[n]) * D + d0;  // [len] slice of row ids[n]
      const float* g = p.dout + n * D + d0;                 // [len] slice of row n
      int64_t d = 0;
      for (; d + 2 * W <= len; d += 2 * W) {
        store(dst + d, load(dst + d) + load(g + d));
        store(dst + d + W, load(dst + d + W) + load(g + d + W));
      }
      for (; d + W <= len; d += W) store(dst + d, load(dst + d) + load(g + d));
      if (d < len) {
        const int k = int(len - d);
        store_partial(dst + d, load_partial(dst + d, k) + load_partial(g + d, k), k);
      }
    }
  });
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
