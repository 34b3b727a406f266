// bench_kernels.cc: every CPU kernel timed through its public entry (bts::<op>), with its anchor
// measured in the same process: OpenBLAS sgemm for the GEMMs (when built with BTS_HAVE_OPENBLAS),
// and for the other kernels the machine's own limit, also measured here: the FMA peak (a register-only
// FMA loop) for compute-bound kernels, the copy bandwidth at the kernel's footprint for memory-bound
// ones. One JSON object per line on stdout:
//   {"name", "threads", "ours", "anchor", "ratio", "unit", "bound", ...}
// ratio = ours / anchor. For roofline anchors, ratio is the fraction of the limit reached ("within 2x"
// means ratio >= 0.5). Timing: best of several repetitions, each at least ~0.15 s; the machine is
// shared, so ratios of figures taken side by side are what to compare.
//
// Usage: bts_bench_kernels [--threads 1,2] [--quick] [--only gemm|other]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bts/cpu.h"
#include "bts/ops.h"
#include "bts/threadpool.h"

#ifdef BTS_HAVE_OPENBLAS
extern "C" {
enum CBLAS_ORDER { CblasRowMajor = 101 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112 };
void cblas_sgemm(CBLAS_ORDER, CBLAS_TRANSPOSE, CBLAS_TRANSPOSE, int, int, int, float, const float*, int, const float*,
                 int, float, float*, int);
void openblas_set_num_threads(int);
}
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using clk = std::chrono::steady_clock;
bool g_quick = false;

// Best seconds per call of fn.
double time_best(const std::function<void()>& fn) {
  fn();  // warm-up (page faults, packing buffers, thread start)
  const int reps = g_quick ? 2 : 3;
  const double min_rep_s = g_quick ? 0.05 : 0.15;
  double best = 1e30;
  for (int r = 0; r < reps; r++) {
    int iters = 0;
    auto t0 = clk::now();
    double el = 0;
    do {
      fn();
      iters++;
      el = std::chrono::duration<double>(clk::now() - t0).count();
    } while (el < min_rep_s);
    best = std::min(best, el / iters);
  }
  return best;
}

std::vector<float> randv(size_t n, unsigned seed, float scale = 1.f) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = scale * (float(s >> 8) / float(1 << 24) * 2.f - 1.f);
  }
  return v;
}

void emit(const std::string& name, int threads, double ours, double anchor, const char* unit, const char* anchor_name,
          const char* bound, const std::string& extra = "") {
  std::printf("{\"name\":\"%s\",\"threads\":%d,\"ours\":%.3f,\"anchor\":%s,\"anchorName\":\"%s\",\"ratio\":%s,\"unit\":\"%s\",\"bound\":\"%s\"%s}\n",
              name.c_str(), threads, ours, anchor > 0 ? std::to_string(anchor).c_str() : "null", anchor_name,
              anchor > 0 ? std::to_string(ours / anchor).c_str() : "null", unit, bound, extra.c_str());
  std::fflush(stdout);
}

// ---- machine limits, measured here --------------------------------------------------------------
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float fma_loop(int64_t iters) {
  __m256 a0 = _mm256_set1_ps(1.f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;
  const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; i++) {
    a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c); a2 = _mm256_fmadd_ps(a2, m, c);
    a3 = _mm256_fmadd_ps(a3, m, c); a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
    a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c); a8 = _mm256_fmadd_ps(a8, m, c);
    a9 = _mm256_fmadd_ps(a9, m, c);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                           _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)), _mm256_add_ps(a8, a9)));
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0];
}
__attribute__((target("avx512f"))) float fma_loop512(int64_t iters) {
  __m512 a0 = _mm512_set1_ps(1.f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;
  const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; i++) {
    a0 = _mm512_fmadd_ps(a0, m, c); a1 = _mm512_fmadd_ps(a1, m, c); a2 = _mm512_fmadd_ps(a2, m, c);
    a3 = _mm512_fmadd_ps(a3, m, c); a4 = _mm512_fmadd_ps(a4, m, c); a5 = _mm512_fmadd_ps(a5, m, c);
    a6 = _mm512_fmadd_ps(a6, m, c); a7 = _mm512_fmadd_ps(a7, m, c); a8 = _mm512_fmadd_ps(a8, m, c);
    a9 = _mm512_fmadd_ps(a9, m, c);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a8, a9))) +
         _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a2, a3), _mm512_add_ps(a4, a5))) +
         _mm512_reduce_add_ps(_mm512_add_ps(a6, a7));
}
#endif

volatile float g_sink;

// FMA peak in GFLOP/s on `threads` threads.
double fma_peak(int threads) {
  bts::set_num_threads(threads);
  const bool z = bts::simd_level() == bts::SimdLevel::Avx512;
  const int64_t iters = 2000000;
  double s = time_best([&] {
    bts::parallel_run([&](int, int) {
#if defined(__x86_64__)
      g_sink = z ? fma_loop512(iters) : fma_loop(iters);
#endif
    });
  });
  return double(threads) * iters * 10 * (z ? 32 : 16) / s / 1e9;
}

// Copy bandwidth (bytes read + written per second, GB/s) with a footprint of `bytes` in all.
double copy_bw(size_t bytes, int threads) {
  bts::set_num_threads(threads);
  size_t n = std::max<size_t>(bytes / 8, 1024);
  std::vector<float> a(n, 1.f), b(n, 2.f);
  double s = time_best([&] {
    bts::parallel_for(int64_t(n), 4096, [&](int64_t i0, int64_t i1, int) {
      std::memcpy(b.data() + i0, a.data() + i0, size_t(i1 - i0) * 4);
    });
  });
  return double(n) * 8 / s / 1e9;
}

// ---- GEMM -------------------------------------------------------------------------------------------
struct Layout {
  const char* name;
  bool ta, tb;
};

void bench_gemm(int threads, const std::vector<int>& sizes) {
  const Layout layouts[] = {{"NT", false, true}, {"NN", false, false}, {"TN", true, false}};
  const int M = 4096;
  const int maxs = *std::max_element(sizes.begin(), sizes.end());
  std::vector<float> A = randv(size_t(M) * maxs, 1), B = randv(size_t(maxs) * maxs, 2), C(size_t(M) * maxs);
  std::vector<bts::bf16> Bh(B.size());
  for (size_t i = 0; i < B.size(); i++) Bh[i] = bts::f32_to_bf16(B[i]);
  for (const Layout& L : layouts) {
    for (int N : sizes) {
      for (int K : sizes) {
        bts::GemmParams p;
        p.M = M, p.N = N, p.K = K, p.transA = L.ta, p.transB = L.tb;
        p.A = A.data(), p.lda = L.ta ? M : K;
        p.B = B.data(), p.ldb = L.tb ? K : N;
        p.C = C.data(), p.ldc = N;
        p.alpha = 1.f, p.beta = 0.f;
        const double flops = 2.0 * M * N * K;
        bts::set_num_threads(threads);
        double ours = flops / time_best([&] { bts::gemm_f32(p); }) / 1e9;
        double anchor = 0;
#ifdef BTS_HAVE_OPENBLAS
        openblas_set_num_threads(threads);
        anchor = flops / time_best([&] {
                   cblas_sgemm(CblasRowMajor, L.ta ? CblasTrans : CblasNoTrans, L.tb ? CblasTrans : CblasNoTrans, M, N, K,
                               1.f, A.data(), int(p.lda), B.data(), int(p.ldb), 0.f, C.data(), N);
                 }) / 1e9;
        // The other way round too, so that neither side always runs first.
        bts::set_num_threads(threads);
        ours = std::max(ours, flops / time_best([&] { bts::gemm_f32(p); }) / 1e9);
#endif
        char shape[96];
        std::snprintf(shape, sizeof shape, ",\"M\":%d,\"N\":%d,\"K\":%d,\"layout\":\"%s\"", M, N, K, L.name);
        emit(std::string("gemm_f32 ") + L.name + " " + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K),
             threads, ours, anchor, "GFLOP/s", "openblas_sgemm_f32", "compute", shape);
        if (L.tb && !L.ta) {  // bf16 weights, NT (forward through a frozen Linear)
          bts::GemmBf16Params q;
          q.M = M, q.N = N, q.K = K, q.transA = false, q.transB = true;
          q.A = A.data(), q.lda = K, q.B = Bh.data(), q.ldb = K, q.C = C.data(), q.ldc = N;
          bts::set_num_threads(threads);
          double ob = flops / time_best([&] { bts::gemm_bf16(q); }) / 1e9;
          emit(std::string("gemm_bf16 NT ") + std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K), threads,
               ob, anchor, "GFLOP/s", "openblas_sgemm_f32", "compute", shape);
        }
      }
    }
  }
}

// ---- the other kernels ------------------------------------------------------------------------------
// Emits a memory-bound kernel: GB/s over `bytes` (minimum traffic), anchor = copy BW at that footprint.
void mem_kernel(const std::string& name, int threads, size_t bytes, const std::function<void()>& fn) {
  bts::set_num_threads(threads);
  double s = time_best(fn);
  double bw = copy_bw(bytes, threads);
  emit(name, threads, double(bytes) / s / 1e9, bw, "GB/s", "copy_bw_same_footprint", "memory",
       ",\"bytes\":" + std::to_string(bytes));
}

void flop_kernel(const std::string& name, int threads, double flops, double peak, const std::function<void()>& fn) {
  bts::set_num_threads(threads);
  double s = time_best(fn);
  emit(name, threads, flops / s / 1e9, peak, "GFLOP/s", "fma_peak", "compute");
}

void bench_other(int threads) {
  const double peak = fma_peak(threads);
  emit("fma_peak", threads, peak, 0, "GFLOP/s", "", "compute");
  emit("copy_bw_256MB", threads, copy_bw(size_t(256) << 20, threads), 0, "GB/s", "", "memory");
  emit("copy_bw_8MB", threads, copy_bw(size_t(8) << 20, threads), 0, "GB/s", "", "memory");

  for (int D : {256, 512}) {
    const int N = 4096, F = D == 256 ? 688 : 1376, H = 8, Dh = D / H, V = D == 256 ? 4096 : 8192;
    const std::string cfg = " N=" + std::to_string(N) + " D=" + std::to_string(D);
    auto x = randv(size_t(N) * D, 3), y = randv(size_t(N) * D, 4), dy = randv(size_t(N) * D, 5), w = randv(D, 6);
    std::vector<float> rstd(N), dx(size_t(N) * D), dw(D);
    {
      bts::RmsNormParams p{N, D, 1e-5f, x.data(), w.data(), y.data(), rstd.data()};
      mem_kernel("rmsnorm_forward" + cfg, threads, size_t(N) * D * 8, [&] { bts::rmsnorm_forward(p); });
      bts::RmsNormBackwardParams b{N, D, x.data(), w.data(), rstd.data(), dy.data(), dx.data(), dw.data()};
      mem_kernel("rmsnorm_backward" + cfg, threads, size_t(N) * D * 12, [&] { bts::rmsnorm_backward(b); });
    }
    {
      const int P = 4096;
      std::vector<float> table(size_t(P) * Dh);
      bts::RopeTableParams t;
      t.P = P, t.Dh = Dh, t.theta = 10000.0, t.table = table.data();
      bts::rope_table(t);
      std::vector<int32_t> pos(N);
      for (int i = 0; i < N; i++) pos[i] = i % 256;
      bts::RopeParams r;
      r.N = N, r.nh = H, r.Dh = Dh, r.P = P, r.pos = pos.data(), r.table = table.data(), r.x = x.data(), r.out = y.data();
      mem_kernel("rope_forward" + cfg, threads, size_t(N) * D * 8, [&] { bts::rope_forward(r); });
    }
    {
      auto g = randv(size_t(N) * F, 7), u = randv(size_t(N) * F, 8), dh = randv(size_t(N) * F, 9);
      std::vector<float> h(size_t(N) * F), dg(size_t(N) * F), du(size_t(N) * F);
      const std::string c = " N=" + std::to_string(N) + " F=" + std::to_string(F);
      bts::SwigluParams s{N, F, g.data(), u.data(), h.data()};
      mem_kernel("swiglu_forward" + c, threads, size_t(N) * F * 12, [&] { bts::swiglu_forward(s); });
      bts::SwigluBackwardParams sb{N, F, g.data(), u.data(), dh.data(), dg.data(), du.data()};
      mem_kernel("swiglu_backward" + c, threads, size_t(N) * F * 20, [&] { bts::swiglu_backward(sb); });
    }
    {
      auto table = randv(size_t(V) * D, 10);
      std::vector<float> dtable(size_t(V) * D);
      std::vector<int32_t> ids(N);
      for (int i = 0; i < N; i++) ids[i] = int32_t((i * 2654435761u) % uint32_t(V));
      const std::string c = cfg + " V=" + std::to_string(V);
      bts::EmbeddingParams e{N, V, D, ids.data(), table.data(), y.data()};
      mem_kernel("embedding_forward" + c, threads, size_t(N) * D * 8, [&] { bts::embedding_forward(e); });
      bts::EmbeddingBackwardParams eb{N, V, D, ids.data(), dy.data(), dtable.data()};
      mem_kernel("embedding_backward" + c, threads, size_t(N) * D * 12, [&] { bts::embedding_backward(eb); });
      // Cross-entropy fused with the LM head: 6*N*D*V useful flops (logits, dx, dW).
      std::vector<float> losses(N);
      double loss_sum = 0;
      int64_t count = 0;
      bts::CrossEntropyParams ce;
      ce.N = N, ce.D = D, ce.V = V, ce.x = x.data(), ce.w = table.data(), ce.targets = ids.data();
      ce.losses = losses.data(), ce.loss_sum = &loss_sum, ce.count = &count, ce.grad_scale = 1.f / N;
      ce.dx = dx.data(), ce.dw = dtable.data();
      flop_kernel("cross_entropy fwd+bwd" + c, threads, 6.0 * N * D * V, peak, [&] { bts::cross_entropy_forward_backward(ce); });
    }
    {
      const int B = D == 256 ? 16 : 8, T = D == 256 ? 256 : 512;
      const std::string c = " B=" + std::to_string(B) + " T=" + std::to_string(T) + " H=8 Dh=" + std::to_string(Dh);
      const size_t n = size_t(B) * T * D;
      auto q = randv(n, 11), k = randv(n, 12), v = randv(n, 13), dout = randv(n, 14);
      std::vector<float> out(n), lse(size_t(B) * H * T), dq(n), dk(n), dv(n);
      bts::AttentionParams a;
      a.B = B, a.Tq = T, a.Tk = T, a.Tcap = T, a.H = H, a.Hkv = H, a.Dh = Dh, a.scale = 1.f / std::sqrt(float(Dh));
      a.q = q.data(), a.k = k.data(), a.v = v.data(), a.out = out.data(), a.lse = lse.data();
      const double fwd_flops = 4.0 * B * H * double(T) * T * Dh / 2;  // causal: half of QK^T and PV
      flop_kernel("attention_forward" + c, threads, fwd_flops, peak, [&] { bts::attention_forward(a); });
      bts::AttentionBackwardParams ab;
      ab.B = B, ab.T = T, ab.H = H, ab.Hkv = H, ab.Dh = Dh, ab.scale = a.scale;
      ab.q = q.data(), ab.k = k.data(), ab.v = v.data(), ab.out = out.data(), ab.lse = lse.data(), ab.dout = dout.data();
      ab.dq = dq.data(), ab.dk = dk.data(), ab.dv = dv.data();
      flop_kernel("attention_backward" + c, threads, 2.5 * fwd_flops, peak, [&] { bts::attention_backward(ab); });
    }
    {
      const int n = 3;
      const std::string c = cfg + " n=3";
      auto h0 = randv(size_t(N) * D, 15), p = randv(size_t(n) * N * D, 16), G = randv(size_t(N) * D * (n + 1), 17);
      std::vector<float> out(size_t(N) * D), dh0(size_t(N) * D), dp(size_t(n) * N * D), dG(size_t(N) * D * (n + 1));
      std::vector<float> outn(size_t(n) * N * D), doutn = randv(size_t(n) * N * D, 18);
      const size_t ND4 = size_t(N) * D * 4;
      bts::StitchEHParams e{N, D, n, h0.data(), p.data(), G.data(), out.data()};
      mem_kernel("stitch_eh_forward" + c, threads, ND4 * (1 + n + (n + 1) + 1), [&] { bts::stitch_eh_forward(e); });
      bts::StitchEHBackwardParams eb{N, D, n, h0.data(), p.data(), G.data(), dy.data(), dh0.data(), dp.data(), dG.data()};
      mem_kernel("stitch_eh_backward" + c, threads, ND4 * (2 * (1 + n + (n + 1)) + 1), [&] { bts::stitch_eh_backward(eb); });
      bts::StitchHEParams hf{N, D, n, p.data(), p.data(), G.data(), outn.data()};
      mem_kernel("stitch_he_forward" + c, threads, ND4 * (3 * n + (n + 1)), [&] { bts::stitch_he_forward(hf); });
      bts::StitchHEBackwardParams hb{N, D, n, p.data(), p.data(), G.data(), doutn.data(), dp.data(), outn.data(), dG.data()};
      mem_kernel("stitch_he_backward" + c, threads, ND4 * (5 * n + 2 * (n + 1)), [&] { bts::stitch_he_backward(hb); });
    }
  }
  {
    const int64_t n = 10000000;
    auto p = randv(n, 19), g = randv(n, 20);
    std::vector<float> m(n), v(n);
    float gn = 0;
    bts::AdamWParams a;
    a.n = n, a.n_decay = n, a.p = p.data(), a.g = g.data(), a.m = m.data(), a.v = v.data();
    a.lr = 1e-4f, a.weight_decay = 0.1f, a.step = 1, a.max_grad_norm = 1.f, a.grad_norm = &gn;
    // norm pass reads g; update reads p, g, m, v and writes p, m, v.
    mem_kernel("adamw_step n=10M", threads, size_t(n) * 4 * 8, [&] { bts::adamw_step(a); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> threads = {1, 2};
  std::string only;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--quick") g_quick = true;
    else if (a == "--threads" && i + 1 < argc) {
      threads.clear();
      for (const char* s = argv[++i]; *s;) {
        threads.push_back(std::atoi(s));
        while (*s && *s != ',') s++;
        if (*s == ',') s++;
      }
    } else if (a == "--only" && i + 1 < argc) only = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--threads 1,2] [--quick] [--only gemm|other]\n", argv[0]);
      return 2;
    }
  }
  std::fprintf(stderr, "bts_bench_kernels: simd %s, cpu %s, openblas %s\n", bts::simd_level_name(bts::simd_level()),
               bts::cpu_features().brand.c_str(),
#ifdef BTS_HAVE_OPENBLAS
               "yes"
#else
               "no"
#endif
  );
  const std::vector<int> sizes = g_quick ? std::vector<int>{256, 688, 2048} : std::vector<int>{256, 512, 688, 1024, 1376, 2048};
  for (int t : threads) {
    if (only.empty() || only == "other") bench_other(t);
    if (only.empty() || only == "gemm") bench_gemm(t, sizes);
  }
  return 0;
}
