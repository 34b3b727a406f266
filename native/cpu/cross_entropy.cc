// cpu/cross_entropy.cc: softmax cross-entropy fused with the LM head, blocked so that no [N, V] matrix
// ever exists, with the three matrix products per block done by the library GEMM (bts::gemm_f32).
//
// Layout: rows are taken in blocks of Nb, the vocabulary in chunks of Vc; one buffer L [Nb, Vc] holds
// the logits of the current (block, chunk), later turned into dL/dlogits in place. For each block:
//   pass 1, per chunk: L = x_b W_c^T (GEMM, NT); per row (threads): running max m and sum s of
//           exp(l - m) across chunks (online log-sum-exp; chunk sums in float vectors of <= 1024
//           elements, carried in double), and the target's logit when it falls in the chunk.
//           loss_n = m + log(s) - logit_target.
//   pass 2, only with dx: per chunk: recompute L (GEMM), dL = grad_scale (exp(L - lse) - onehot), then
//           dx_b  = sum_c dL W_c   (GEMM, NN; beta 0 at the first chunk: overwrite),
//           dW_c += dL^T x_b       (GEMM, TN; skipped for a frozen head).
// When the whole vocabulary fits in one chunk (V * 64 floats <= the 16 MB buffer budget, i.e. V up to
// 65536) pass 2 needs no recompute: the gradient is formed in place during pass 1 (exp stored, then
// scaled by grad_scale / s), so a forward+backward costs the minimal 6 N D V flops; the row block is
// then made as large as the budget allows (up to 2048 rows) so the GEMMs stay large. Larger vocabularies
// use chunks of 2048 and pay one extra N D V product (8 N D V in all) for the recompute.
// Threads: the GEMMs thread themselves (called outside any parallel_for); the per-row softmax work is
// split over rows with parallel_for. Everything is deterministic for a given thread count. Rows whose
// target is ignore_index get loss 0 and an all-zero dL row (so dx row 0, no dW contribution); a block
// with no counted row skips its GEMMs. Legend: N rows, D width, V vocab.

#include "bts/ops.h"
#include "bts/threadpool.h"
#include "isa_begin.h"

namespace bts {
namespace cpu {
namespace BTS_ISA {
using namespace simd;

namespace {

constexpr int64_t kBufFloats = int64_t(4) << 20;  // budget of the logits buffer L: 16 MB
constexpr int64_t kMinRows = 64;                   // fewest rows per block worth a GEMM call
constexpr int64_t kMaxRows = 2048;                 // most rows per block
constexpr int64_t kChunk = 2048;                   // vocab chunk when V does not fit in one
constexpr int64_t kSumBlock = 1024;                // float partial sums of exp over at most this many

float row_max(const float* l, int64_t n) {  // l [n]
  vf m0 = set1(-INFINITY), m1 = m0;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    m0 = max(m0, load(l + j));
    m1 = max(m1, load(l + j + W));
  }
  for (; j + W <= n; j += W) m0 = max(m0, load(l + j));
  float r = reduce_max(max(m0, m1));
  for (; j < n; j++) r = std::max(r, l[j]);
  return r;
}

// sum_j exp(l[j] - m); with keep, l[j] is replaced by exp(l[j] - m). l [n].
double sum_exp(float* l, int64_t n, float m, bool keep) {
  const vf vm = set1(m);
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t e = std::min(n, b + kSumBlock);
    vf a0 = zero(), a1 = zero();
    int64_t j = b;
    for (; j + 2 * W <= e; j += 2 * W) {
      const vf e0 = exp(load(l + j) - vm), e1 = exp(load(l + j + W) - vm);
      if (keep) {
        store(l + j, e0);
        store(l + j + W, e1);
      }
      a0 += e0;
      a1 += e1;
    }
    for (; j + W <= e; j += W) {
      const vf e0 = exp(load(l + j) - vm);
      if (keep) store(l + j, e0);
      a0 += e0;
    }
    float tail = 0.f;
    if (j < e) {
      const int k = int(e - j);
      alignas(64) float tmp[16];
      const vf e0 = exp(load_partial(l + j, k) - vm);
      store(tmp, e0);
      if (keep) store_partial(l + j, e0, k);
      for (int i = 0; i < k; i++) tail += tmp[i];
    }
    total += double(reduce_add(a0 + a1) + tail);
  }
  return total;
}

void scale_row(float* l, int64_t n, float a) {  // l [n] *= a
  const vf va = set1(a);
  int64_t j = 0;
  for (; j + W <= n; j += W) store(l + j, load(l + j) * va);
  if (j < n) store_partial(l + j, load_partial(l + j, int(n - j)) * va, int(n - j));
}

void exp_scale_row(float* l, int64_t n, float sub, float mul) {  // l [n] = mul * exp(l - sub)
  const vf vs = set1(sub), vmul = set1(mul);
  int64_t j = 0;
  for (; j + W <= n; j += W) store(l + j, vmul * exp(load(l + j) - vs));
  if (j < n) store_partial(l + j, vmul * exp(load_partial(l + j, int(n - j)) - vs), int(n - j));
}

void gemm(int64_t M, int64_t N, int64_t K, bool ta, bool tb, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, float beta) {
  GemmParams g;
  g.M = M;
  g.N = N;
  g.K = K;
  g.transA = ta;
  g.transB = tb;
  g.A = A;
  g.lda = lda;
  g.B = B;
  g.ldb = ldb;
  g.C = C;
  g.ldc = ldc;
  g.alpha = 1.f;
  g.beta = beta;
  ::bts::gemm_f32(g);
}

}  // namespace

void cross_entropy_forward_backward(const CrossEntropyParams& p) {
  const int64_t N = p.N, D = p.D, V = p.V;
  const bool bwd = p.dx != nullptr;
  const float gs = p.grad_scale;

  // Blocking (see the header comment).
  // Explicit blocking (tests, tuning) is honoured up to an L of kMaxBufFloats (256 MB).
  constexpr int64_t kMaxBufFloats = int64_t(64) << 20;
  const int64_t Vc = p.vocab_chunk > 0 ? std::min({p.vocab_chunk, V, kMaxBufFloats})
                                       : (V * std::min(N, kMinRows) <= kBufFloats ? V : kChunk);
  int64_t Nb = p.row_block > 0 ? p.row_block : std::min(kMaxRows, std::max(kMinRows, kBufFloats / Vc));
  Nb = std::max<int64_t>(1, std::min({Nb, N, kMaxBufFloats / Vc}));
  const int64_t nblocks = (N + Nb - 1) / Nb;
  Nb = (N + nblocks - 1) / nblocks;  // equal blocks
  const int64_t nchunks = (V + Vc - 1) / Vc;
  const bool fused = bwd && nchunks == 1;  // gradient formed in pass 1, no recompute

  Buffer<float> L(size_t(Nb) * size_t(Vc));  // [Nb, Vc] logits / dlogits of one (block, chunk)
  const size_t nbs = static_cast<size_t>(Nb);
  Buffer<float> rmax(nbs), tlogit(nbs), lse(nbs);  // [Nb] running max, target logit, log-sum-exp
  Buffer<double> rsum(nbs);                        // [Nb] running sum of exp(l - rmax)
  double loss_sum = 0;
  int64_t count = 0;

  for (int64_t r0 = 0; r0 < N; r0 += Nb) {
    const int64_t nb = std::min(Nb, N - r0);
    const float* xb = p.x + r0 * D;              // [nb, D]
    const int32_t* tb = p.targets + r0;          // [nb]
    float* dxb = bwd ? p.dx + r0 * D : nullptr;  // [nb, D]
    int64_t live = 0;
    for (int64_t i = 0; i < nb; i++) live += tb[i] != p.ignore_index;
    if (live == 0) {
      if (p.losses) fill(p.losses + r0, p.losses + r0 + nb, 0.f);
      if (bwd) fill(dxb, dxb + nb * D, 0.f);
      continue;
    }

    // Pass 1: online log-sum-exp over the chunks (and, when fused, the gradient in place).
    for (int64_t c = 0; c < nchunks; c++) {
      const int64_t c0 = c * Vc, vc = std::min(Vc, V - c0);
      gemm(nb, vc, D, false, true, xb, D, p.w + c0 * D, D, L.data(), vc, 0.f);
      parallel_for(nb, std::max<int64_t>(1, 8192 / vc), [&](int64_t i0, int64_t i1, int) {
        for (int64_t i = i0; i < i1; i++) {
          float* l = L.data() + i * vc;  // [vc]
          const int32_t t = tb[i];
          if (t == p.ignore_index) {
            if (fused) fill(l, l + vc, 0.f);
            continue;
          }
          if (t >= c0 && t < c0 + vc) tlogit[size_t(i)] = l[t - c0];
          const float cm = row_max(l, vc);
          if (c == 0) {
            rmax[size_t(i)] = cm;
            rsum[size_t(i)] = sum_exp(l, vc, cm, fused);
          } else {
            const float m = std::max(rmax[size_t(i)], cm);
            rsum[size_t(i)] = rsum[size_t(i)] * std::exp(double(rmax[size_t(i)]) - double(m)) + sum_exp(l, vc, m, false);
            rmax[size_t(i)] = m;
          }
          if (fused) {  // l holds exp(l - m): dL = gs (exp(l - m) / s - onehot)
            scale_row(l, vc, float(double(gs) / rsum[size_t(i)]));
            l[t] -= gs;
          }
        }
      });
    }
    for (int64_t i = 0; i < nb; i++) {
      if (tb[i] == p.ignore_index) {
        if (p.losses) p.losses[r0 + i] = 0.f;
        continue;
      }
      const double lse_i = double(rmax[size_t(i)]) + std::log(rsum[size_t(i)]);
      const double loss = lse_i - double(tlogit[size_t(i)]);
      lse[size_t(i)] = float(lse_i);
      if (p.losses) p.losses[r0 + i] = float(loss);
      loss_sum += loss;
      count++;
    }
    if (!bwd) continue;

    // Pass 2: dx_b = dL W, dW += dL^T x_b, chunk by chunk.
    for (int64_t c = 0; c < nchunks; c++) {
      const int64_t c0 = c * Vc, vc = std::min(Vc, V - c0);
      const float* wc = p.w + c0 * D;  // [vc, D]
      if (!fused) {
        gemm(nb, vc, D, false, true, xb, D, wc, D, L.data(), vc, 0.f);
        parallel_for(nb, std::max<int64_t>(1, 8192 / vc), [&](int64_t i0, int64_t i1, int) {
          for (int64_t i = i0; i < i1; i++) {
            float* l = L.data() + i * vc;
            const int32_t t = tb[i];
            if (t == p.ignore_index) {
              fill(l, l + vc, 0.f);
              continue;
            }
            exp_scale_row(l, vc, lse[size_t(i)], gs);
            if (t >= c0 && t < c0 + vc) l[t - c0] -= gs;
          }
        });
      }
      gemm(nb, D, vc, false, false, L.data(), vc, wc, D, dxb, D, c == 0 ? 0.f : 1.f);
      if (p.dw) gemm(vc, D, nb, true, false, L.data(), vc, xb, D, p.dw + c0 * D, D, 1.f);
    }
  }
  if (p.loss_sum) *p.loss_sum = loss_sum;
  if (p.count) *p.count = count;
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts

#include "isa_end.h"
