// test/cuda/cuda_ops_test.cc: every CUDA op (native/cuda/*.cu) against the CPU reference
// (bts::reference::<name>) at several shapes, odd ones included, plus the emulator's own checks.
//
// Built by CMake as `bts_cuda_emu_test` with g++ against the SIMT emulator (native/emu), always, and
// (when nvcc exists) the same source can be built for a real GPU: it only uses the CUDA runtime subset
// the emulator provides (cudaMalloc / cudaMemcpy / cudaFree / streams).
// Output: one line per op and shape:
//   PASS <op> <shape> max_err=<e> tol=<t>      (error = max |cuda - reference| / max |reference|)
//   FAIL <op> <shape> ...                      SKIP <op> <reason>
// and a final `SUMMARY pass=<p> fail=<f> skip=<s>`; the exit status is 1 if anything failed.
// Args: an optional substring filter on the op name.
// The references are declared weak so that the test links while some ops are still being written
// (their lines say SKIP). Legend as in bts/common.h.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common.cuh"

#define BTS_WEAK_REF(name, Params)                      \
  namespace bts {                                       \
  namespace reference {                                 \
  __attribute__((weak)) void name(const Params& p);     \
  }                                                     \
  }
BTS_WEAK_REF(gemm_f32, GemmParams)
BTS_WEAK_REF(gemm_bf16, GemmBf16Params)
BTS_WEAK_REF(attention_forward, AttentionParams)
BTS_WEAK_REF(attention_backward, AttentionBackwardParams)
BTS_WEAK_REF(rmsnorm_forward, RmsNormParams)
BTS_WEAK_REF(rmsnorm_backward, RmsNormBackwardParams)
BTS_WEAK_REF(rope_table, RopeTableParams)
BTS_WEAK_REF(rope_forward, RopeParams)
BTS_WEAK_REF(swiglu_forward, SwigluParams)
BTS_WEAK_REF(swiglu_backward, SwigluBackwardParams)
BTS_WEAK_REF(embedding_forward, EmbeddingParams)
BTS_WEAK_REF(embedding_backward, EmbeddingBackwardParams)
BTS_WEAK_REF(cross_entropy_forward_backward, CrossEntropyParams)
BTS_WEAK_REF(adamw_step, AdamWParams)
BTS_WEAK_REF(stitch_eh_forward, StitchEHParams)
BTS_WEAK_REF(stitch_eh_backward, StitchEHBackwardParams)
BTS_WEAK_REF(stitch_he_forward, StitchHEParams)
BTS_WEAK_REF(stitch_he_backward, StitchHEBackwardParams)

namespace {
using bts::bf16;
using std::string;
using std::vector;

int g_pass = 0, g_fail = 0, g_skip = 0;
const char* g_filter = nullptr;
cudaStream_t g_stream = nullptr;

bool selected(const char* op) { return !g_filter || std::strstr(op, g_filter); }

// ---- data
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9e3779b97f4a7c15ull + 1) {}
  float uni(float lo = -1.f, float hi = 1.f) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return lo + (hi - lo) * float((s >> 11) * (1.0 / 9007199254740992.0));
  }
  vector<float> vec(size_t n, float lo = -1.f, float hi = 1.f) {
    vector<float> v(n);
    for (auto& x : v) x = uni(lo, hi);
    return v;
  }
  vector<int32_t> ids(size_t n, int32_t V) {
    vector<int32_t> v(n);
    for (auto& x : v) x = int32_t(uni(0.f, 1.f) * float(V)) % V;
    return v;
  }
};

// A device copy of a host vector; host() reads it back.
template <class T>
struct Dev {
  T* d = nullptr;
  size_t n = 0;
  explicit Dev(const vector<T>& h) : n(h.size()) {
    BTS_CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(1, n) * sizeof(T)));
    if (n) BTS_CUDA_CHECK(cudaMemcpy(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  explicit Dev(size_t count, T fill = T()) : Dev(vector<T>(count, fill)) {}
  ~Dev() { cudaFree(d); }
  Dev(const Dev&) = delete;
  vector<T> host() const {
    vector<T> h(n);
    BTS_CUDA_CHECK(cudaDeviceSynchronize());
    if (n) BTS_CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

// max |got - ref| / max |ref| (0 when both are exactly equal); NaN anywhere counts as infinite.
double rel_err(const vector<float>& got, const vector<float>& ref) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); i++) {
    if (std::isnan(got[i]) != std::isnan(ref[i])) return INFINITY;
    diff = std::max(diff, std::fabs(double(got[i]) - double(ref[i])));
    scale = std::max(scale, std::fabs(double(ref[i])));
  }
  if (diff == 0) return 0;
  return diff / std::max(scale, 1e-30);
}

struct Check {
  string op, shape;
  double err = 0, tol = 0;
  string note;
  void add(const char* what, const vector<float>& got, const vector<float>& ref) {
    const double e = rel_err(got, ref);
    if (e > err || std::isnan(e)) {
      err = e;
      note = what;
    }
  }
};

void report(const Check& c) {
  const bool ok = c.err <= c.tol;
  (ok ? g_pass : g_fail)++;
  std::printf("%s %s %s max_err=%.3g tol=%.3g%s%s\n", ok ? "PASS" : "FAIL", c.op.c_str(), c.shape.c_str(), c.err, c.tol,
              ok || c.note.empty() ? "" : " worst=", ok ? "" : c.note.c_str());
  std::fflush(stdout);
}

void skip(const char* op, const char* why) {
  g_skip++;
  std::printf("SKIP %s %s\n", op, why);
  std::fflush(stdout);
}

// Runs one case; an exception is a FAIL line naming it.
void run_case(const string& op, const string& shape, double tol, const std::function<void(Check&)>& fn) {
  Check c;
  c.op = op;
  c.shape = shape;
  c.tol = tol;
  try {
    fn(c);
  } catch (const std::exception& e) {
    g_fail++;
    std::printf("FAIL %s %s error: %s\n", op.c_str(), shape.c_str(), e.what());
    std::fflush(stdout);
    return;
  }
  report(c);
}

template <class... A>
string fmt(const char* f, A... a) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, a...);
  return buf;
}

vector<bf16> to_bf16(const vector<float>& v) {
  vector<bf16> r(v.size());
  for (size_t i = 0; i < v.size(); i++) r[i] = bts::f32_to_bf16(v[i]);
  return r;
}

// ---------------------------------------------------------------------------------------------------
void test_gemm() {
  struct S {
    int64_t M, N, K;
  };
  const S shapes[] = {{1, 1, 1}, {7, 33, 17}, {33, 7, 65}, {64, 64, 64}, {70, 129, 33}, {5, 3, 300}};
  if (selected("gemm_f32") || selected("gemm_f32_tc")) {
    if (!&bts::reference::gemm_f32) skip("gemm_f32", "reference not built");
    else
      for (int math = 0; math < 2; math++)
        for (const S& s : shapes)
          for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
              for (float beta : {0.f, 0.5f}) {
                if (math == 1 && beta != 0.f) continue;
                const char* op = math ? "gemm_f32_tc" : "gemm_f32";
                run_case(op, fmt("M=%ld N=%ld K=%ld %c%c beta=%g", s.M, s.N, s.K, ta ? 'T' : 'N', tb ? 'T' : 'N', beta),
                         math ? 1.5e-2 : 2e-5, [&](Check& c) {
                           Rng r(uint64_t(s.M * 131 + s.N * 7 + s.K + ta * 3 + tb));
                           bts::GemmParams p;
                           p.M = s.M, p.N = s.N, p.K = s.K, p.transA = ta, p.transB = tb;
                           p.lda = (ta ? s.M : s.K) + 3;
                           p.ldb = (tb ? s.K : s.N) + 1;
                           p.ldc = s.N + 2;
                           p.alpha = 1.25f, p.beta = beta;
                           auto A = r.vec(size_t((ta ? s.K : s.M) * p.lda));
                           auto B = r.vec(size_t((tb ? s.N : s.K) * p.ldb));
                           auto C = r.vec(size_t(s.M * p.ldc));
                           Dev<float> dA(A), dB(B), dC(C);
                           auto q = p;
                           q.A = dA.d, q.B = dB.d, q.C = dC.d;
                           bts::cuda::gemm_f32(q, g_stream, math ? bts::cuda::GemmMath::Bf16TensorCore : bts::cuda::GemmMath::Fp32);
                           auto ref = C;
                           p.A = A.data(), p.B = B.data(), p.C = ref.data();
                           bts::reference::gemm_f32(p);
                           c.add("C", dC.host(), ref);
                         });
              }
  }
  if (selected("gemm_bf16")) {
    if (!&bts::reference::gemm_bf16) skip("gemm_bf16", "reference not built");
    else
      for (const S& s : shapes)
        for (int tb = 0; tb < 2; tb++)
          for (float beta : {0.f, 1.f})
            run_case("gemm_bf16", fmt("M=%ld N=%ld K=%ld N%c beta=%g", s.M, s.N, s.K, tb ? 'T' : 'N', beta), 1.5e-2,
                     [&](Check& c) {
                       Rng r(uint64_t(s.M * 31 + s.N * 5 + s.K + tb));
                       bts::GemmBf16Params p;
                       p.M = s.M, p.N = s.N, p.K = s.K, p.transA = false, p.transB = tb;
                       p.lda = s.K + 1;
                       p.ldb = (tb ? s.K : s.N) + 3;
                       p.ldc = s.N;
                       p.alpha = 0.75f, p.beta = beta;
                       auto A = r.vec(size_t(s.M * p.lda));
                       auto B = to_bf16(r.vec(size_t((tb ? s.N : s.K) * p.ldb)));
                       auto C = r.vec(size_t(s.M * p.ldc));
                       Dev<float> dA(A), dC(C);
                       Dev<bf16> dB(B);
                       auto q = p;
                       q.A = dA.d, q.B = dB.d, q.C = dC.d;
                       bts::cuda::gemm_bf16(q, g_stream);
                       auto ref = C;
                       p.A = A.data(), p.B = B.data(), p.C = ref.data();
                       bts::reference::gemm_bf16(p);
                       c.add("C", dC.host(), ref);
                     });
  }
}

void test_attention() {
  struct S {
    int64_t B, Tq, Tk, Tcap, H, Hkv, Dh;
  };
  const S fw[] = {{1, 1, 1, 1, 1, 1, 8},    {2, 7, 7, 9, 4, 2, 16},   {1, 33, 33, 33, 2, 1, 64},
                  {2, 1, 20, 24, 4, 4, 32}, {1, 5, 40, 40, 2, 2, 33}, {1, 9, 9, 9, 1, 1, 128}, {1, 70, 70, 72, 4, 2, 48},
                  {1, 3, 35, 40, 2, 1, 256}};
  if (selected("attention_forward")) {
    if (!&bts::reference::attention_forward) skip("attention_forward", "reference not built");
    else
      for (const S& s : fw)
        run_case("attention_forward",
                 fmt("B=%ld Tq=%ld Tk=%ld Tcap=%ld H=%ld Hkv=%ld Dh=%ld", s.B, s.Tq, s.Tk, s.Tcap, s.H, s.Hkv, s.Dh), 2e-5,
                 [&](Check& c) {
                   Rng r(uint64_t(s.Tq * 17 + s.Dh));
                   bts::AttentionParams p;
                   p.B = s.B, p.Tq = s.Tq, p.Tk = s.Tk, p.Tcap = s.Tcap, p.H = s.H, p.Hkv = s.Hkv, p.Dh = s.Dh;
                   p.scale = 1.f / std::sqrt(float(s.Dh));
                   auto q = r.vec(size_t(s.B * s.Tq * s.H * s.Dh), -2, 2);
                   auto k = r.vec(size_t(s.B * s.Tcap * s.Hkv * s.Dh), -2, 2);
                   auto v = r.vec(size_t(s.B * s.Tcap * s.Hkv * s.Dh));
                   vector<float> out(q.size()), lse(size_t(s.B * s.H * s.Tq));
                   Dev<float> dq(q), dk(k), dv(v), dout(out.size()), dlse(lse.size());
                   auto g = p;
                   g.q = dq.d, g.k = dk.d, g.v = dv.d, g.out = dout.d, g.lse = dlse.d;
                   bts::cuda::attention_forward(g, g_stream);
                   p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data();
                   bts::reference::attention_forward(p);
                   c.add("out", dout.host(), out);
                   c.add("lse", dlse.host(), lse);
                 });
  }
  struct SB {
    int64_t B, T, H, Hkv, Dh;
  };
  const SB bw[] = {{1, 1, 1, 1, 8}, {2, 7, 4, 2, 16}, {1, 33, 2, 1, 64}, {1, 40, 2, 2, 33}, {1, 9, 1, 1, 128}, {1, 70, 4, 2, 48}, {1, 12, 1, 1, 256}};
  if (selected("attention_backward")) {
    if (!&bts::reference::attention_backward || !&bts::reference::attention_forward)
      skip("attention_backward", "reference not built");
    else
      for (const SB& s : bw)
        run_case("attention_backward", fmt("B=%ld T=%ld H=%ld Hkv=%ld Dh=%ld", s.B, s.T, s.H, s.Hkv, s.Dh), 1e-4,
                 [&](Check& c) {
                   Rng r(uint64_t(s.T * 19 + s.Dh));
                   bts::AttentionParams f;
                   f.B = s.B, f.Tq = f.Tk = f.Tcap = s.T, f.H = s.H, f.Hkv = s.Hkv, f.Dh = s.Dh;
                   f.scale = 1.f / std::sqrt(float(s.Dh));
                   auto q = r.vec(size_t(s.B * s.T * s.H * s.Dh), -2, 2);
                   auto k = r.vec(size_t(s.B * s.T * s.Hkv * s.Dh), -2, 2);
                   auto v = r.vec(k.size());
                   auto go = r.vec(q.size());
                   vector<float> out(q.size()), lse(size_t(s.B * s.H * s.T));
                   f.q = q.data(), f.k = k.data(), f.v = v.data(), f.out = out.data(), f.lse = lse.data();
                   bts::reference::attention_forward(f);
                   bts::AttentionBackwardParams p;
                   p.B = s.B, p.T = s.T, p.H = s.H, p.Hkv = s.Hkv, p.Dh = s.Dh, p.scale = f.scale;
                   vector<float> gq(q.size()), gk(k.size()), gv(v.size());
                   Dev<float> dq(q), dk(k), dv(v), dout(out), dlse(lse), dgo(go), ddq(q.size(), NAN), ddk(k.size(), NAN),
                       ddv(v.size(), NAN);
                   auto g = p;
                   g.q = dq.d, g.k = dk.d, g.v = dv.d, g.out = dout.d, g.lse = dlse.d, g.dout = dgo.d;
                   g.dq = ddq.d, g.dk = ddk.d, g.dv = ddv.d;
                   bts::cuda::attention_backward(g, g_stream);
                   p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data(), p.dout = go.data();
                   p.dq = gq.data(), p.dk = gk.data(), p.dv = gv.data();
                   bts::reference::attention_backward(p);
                   c.add("dq", ddq.host(), gq);
                   c.add("dk", ddk.host(), gk);
                   c.add("dv", ddv.host(), gv);
                 });
  }
}

void test_rmsnorm() {
  struct S {
    int64_t N, D;
  };
  const S shapes[] = {{1, 1}, {7, 33}, {3, 300}, {2, 1000}, {40, 7}};
  if (selected("rmsnorm_forward")) {
    if (!&bts::reference::rmsnorm_forward) skip("rmsnorm_forward", "reference not built");
    else
      for (const S& s : shapes)
        run_case("rmsnorm_forward", fmt("N=%ld D=%ld", s.N, s.D), 1e-5, [&](Check& c) {
          Rng r(uint64_t(s.N * 3 + s.D));
          auto x = r.vec(size_t(s.N * s.D), -3, 3), w = r.vec(size_t(s.D));
          vector<float> y(x.size()), rstd(size_t(s.N));
          Dev<float> dx(x), dw(w), dy(y.size()), dr(rstd.size());
          bts::RmsNormParams p;
          p.N = s.N, p.D = s.D, p.eps = 1e-5f;
          auto g = p;
          g.x = dx.d, g.w = dw.d, g.y = dy.d, g.rstd = dr.d;
          bts::cuda::rmsnorm_forward(g, g_stream);
          p.x = x.data(), p.w = w.data(), p.y = y.data(), p.rstd = rstd.data();
          bts::reference::rmsnorm_forward(p);
          c.add("y", dy.host(), y);
          c.add("rstd", dr.host(), rstd);
        });
  }
  if (selected("rmsnorm_backward")) {
    if (!&bts::reference::rmsnorm_backward) skip("rmsnorm_backward", "reference not built");
    else
      for (const S& s : shapes)
        run_case("rmsnorm_backward", fmt("N=%ld D=%ld", s.N, s.D), 2e-5, [&](Check& c) {
          Rng r(uint64_t(s.N * 5 + s.D));
          auto x = r.vec(size_t(s.N * s.D), -3, 3), w = r.vec(size_t(s.D)), gy = r.vec(x.size());
          auto rstd = r.vec(size_t(s.N), 0.2f, 2.f), dw0 = r.vec(size_t(s.D));
          Dev<float> dx(x), dw(w), dr(rstd), dgy(gy), dgx(x.size(), NAN), dgw(dw0);
          bts::RmsNormBackwardParams p;
          p.N = s.N, p.D = s.D;
          auto g = p;
          g.x = dx.d, g.w = dw.d, g.rstd = dr.d, g.dy = dgy.d, g.dx = dgx.d, g.dw = dgw.d;
          bts::cuda::rmsnorm_backward(g, g_stream);
          vector<float> gx(x.size()), gw = dw0;
          p.x = x.data(), p.w = w.data(), p.rstd = rstd.data(), p.dy = gy.data(), p.dx = gx.data(), p.dw = gw.data();
          bts::reference::rmsnorm_backward(p);
          c.add("dx", dgx.host(), gx);
          c.add("dw", dgw.host(), gw);
        });
  }
}

void test_rope() {
  if (selected("rope_table")) {
    if (!&bts::reference::rope_table) skip("rope_table", "reference not built");
    else
      for (double factor : {0.0, 8.0})
        for (auto s : {std::pair<int64_t, int64_t>{7, 8}, {33, 64}, {5, 2}})
          run_case("rope_table", fmt("P=%ld Dh=%ld factor=%g", s.first, s.second, factor), 1e-6, [&](Check& c) {
            bts::RopeTableParams p;
            p.P = s.first, p.Dh = s.second, p.theta = 500000.0, p.factor = factor;
            p.original_max_position_embeddings = 64;  // small, so every llama3 band is exercised
            vector<float> tab(size_t(p.P * p.Dh)), inv(size_t(p.Dh / 2));
            Dev<float> dt(tab.size()), di(inv.size());
            auto g = p;
            g.table = dt.d, g.inv_freq = di.d;
            bts::cuda::rope_table(g, g_stream);
            p.table = tab.data(), p.inv_freq = inv.data();
            bts::reference::rope_table(p);
            c.add("table", dt.host(), tab);
            c.add("inv_freq", di.host(), inv);
          });
  }
  if (selected("rope_forward")) {
    if (!&bts::reference::rope_forward) skip("rope_forward", "reference not built");
    else
      for (bool inverse : {false, true})
        for (auto s : {std::array<int64_t, 4>{1, 1, 2, 1}, {7, 3, 8, 16}, {33, 2, 66, 40}})
          for (int pad = 0; pad < 2; pad++)
            run_case("rope_forward",
                     fmt("N=%ld nh=%ld Dh=%ld P=%ld inverse=%d ld_pad=%d", s[0], s[1], s[2], s[3], int(inverse), pad), 1e-6,
                     [&](Check& c) {
                       Rng r(uint64_t(s[0] + s[2]));
                       bts::RopeParams p;
                       p.N = s[0], p.nh = s[1], p.Dh = s[2], p.P = s[3], p.inverse = inverse;
                       p.ld_x = pad ? p.nh * p.Dh + 5 : 0;
                       p.ld_out = pad ? p.nh * p.Dh + 2 : 0;
                       const int64_t ldx = pad ? p.ld_x : p.nh * p.Dh, ldo = pad ? p.ld_out : p.nh * p.Dh;
                       auto x = r.vec(size_t(p.N * ldx));
                       auto tab = r.vec(size_t(p.P * p.Dh));
                       auto pos = r.ids(size_t(p.N), int32_t(p.P));
                       auto out = r.vec(size_t(p.N * ldo));
                       Dev<float> dx(x), dt(tab), dout(out);
                       Dev<int32_t> dpos(pos);
                       auto g = p;
                       g.x = dx.d, g.table = dt.d, g.pos = dpos.d, g.out = dout.d;
                       bts::cuda::rope_forward(g, g_stream);
                       p.x = x.data(), p.table = tab.data(), p.pos = pos.data(), p.out = out.data();
                       bts::reference::rope_forward(p);
                       c.add("out", dout.host(), out);
                     });
  }
}

void test_swiglu() {
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1}, {7, 33}, {5, 1000}};
  if (selected("swiglu")) {
    if (!&bts::reference::swiglu_forward || !&bts::reference::swiglu_backward) skip("swiglu", "reference not built");
    else
      for (auto s : shapes) {
        run_case("swiglu_forward", fmt("N=%ld F=%ld", s.first, s.second), 1e-6, [&](Check& c) {
          Rng r(uint64_t(s.first + s.second));
          auto ga = r.vec(size_t(s.first * s.second), -6, 6), up = r.vec(ga.size());
          vector<float> h(ga.size());
          Dev<float> dg(ga), du(up), dh(h.size());
          bts::SwigluParams p;
          p.N = s.first, p.F = s.second;
          auto g = p;
          g.gate = dg.d, g.up = du.d, g.h = dh.d;
          bts::cuda::swiglu_forward(g, g_stream);
          p.gate = ga.data(), p.up = up.data(), p.h = h.data();
          bts::reference::swiglu_forward(p);
          c.add("h", dh.host(), h);
        });
        run_case("swiglu_backward", fmt("N=%ld F=%ld", s.first, s.second), 1e-6, [&](Check& c) {
          Rng r(uint64_t(s.first * 3 + s.second));
          auto ga = r.vec(size_t(s.first * s.second), -6, 6), up = r.vec(ga.size()), gh = r.vec(ga.size());
          vector<float> gg(ga.size()), gu(ga.size());
          Dev<float> dg(ga), du(up), dgh(gh), dgg(ga.size()), dgu(ga.size());
          bts::SwigluBackwardParams p;
          p.N = s.first, p.F = s.second;
          auto g = p;
          g.gate = dg.d, g.up = du.d, g.dh = dgh.d, g.dgate = dgg.d, g.dup = dgu.d;
          bts::cuda::swiglu_backward(g, g_stream);
          p.gate = ga.data(), p.up = up.data(), p.dh = gh.data(), p.dgate = gg.data(), p.dup = gu.data();
          bts::reference::swiglu_backward(p);
          c.add("dgate", dgg.host(), gg);
          c.add("dup", dgu.host(), gu);
        });
      }
  }
}

void test_embedding() {
  struct S {
    int64_t N, V, D;
  };
  const S shapes[] = {{1, 1, 1}, {7, 11, 33}, {40, 5, 300}};
  if (selected("embedding")) {
    if (!&bts::reference::embedding_forward || !&bts::reference::embedding_backward)
      skip("embedding", "reference not built");
    else {
      for (const S& s : shapes) {
        run_case("embedding_forward", fmt("N=%ld V=%ld D=%ld", s.N, s.V, s.D), 0, [&](Check& c) {
          Rng r(uint64_t(s.N + s.D));
          auto ids = r.ids(size_t(s.N), int32_t(s.V));
          auto tab = r.vec(size_t(s.V * s.D));
          vector<float> out(size_t(s.N * s.D));
          Dev<int32_t> di(ids);
          Dev<float> dt(tab), dout(out.size());
          bts::EmbeddingParams p;
          p.N = s.N, p.V = s.V, p.D = s.D;
          auto g = p;
          g.ids = di.d, g.table = dt.d, g.out = dout.d;
          bts::cuda::embedding_forward(g, g_stream);
          p.ids = ids.data(), p.table = tab.data(), p.out = out.data();
          bts::reference::embedding_forward(p);
          c.add("out", dout.host(), out);
        });
        // Sums in token order, like the reference: bit-exact.
        run_case("embedding_backward", fmt("N=%ld V=%ld D=%ld", s.N, s.V, s.D), 0, [&](Check& c) {
          Rng r(uint64_t(s.N * 7 + s.D));
          auto ids = r.ids(size_t(s.N), int32_t(s.V));
          auto go = r.vec(size_t(s.N * s.D));
          auto tab = r.vec(size_t(s.V * s.D));
          Dev<int32_t> di(ids);
          Dev<float> dgo(go), dt(tab);
          bts::EmbeddingBackwardParams p;
          p.N = s.N, p.V = s.V, p.D = s.D;
          auto g = p;
          g.ids = di.d, g.dout = dgo.d, g.dtable = dt.d;
          bts::cuda::embedding_backward(g, g_stream);
          p.ids = ids.data(), p.dout = go.data(), p.dtable = tab.data();
          bts::reference::embedding_backward(p);
          c.add("dtable", dt.host(), tab);
        });
      }
      run_case("embedding_forward", "bad id -> E_TOKEN_RANGE", 0, [&](Check& c) {
        vector<int32_t> ids = {0, 2, 5, -1};
        Dev<int32_t> di(ids);
        Dev<float> dt(size_t(3 * 4), 1.f), dout(size_t(4 * 4));
        bts::EmbeddingParams p;
        p.N = 4, p.V = 3, p.D = 4, p.ids = di.d, p.table = dt.d, p.out = dout.d;
        try {
          bts::cuda::embedding_forward(p, g_stream);
          c.err = 1, c.note = "no error thrown";
        } catch (const bts::Error& e) {
          if (e.code != "E_TOKEN_RANGE" || !std::strstr(e.what(), "position 2 is 5")) c.err = 1, c.note = e.what();
        }
      });
    }
  }
}

void test_cross_entropy() {
  struct S {
    int64_t N, D, V, chunk;
    bool dx, dw;
  };
  const S shapes[] = {{1, 1, 2, 0, true, true},      {7, 33, 50, 0, true, true},    {9, 16, 300, 128, true, true},
                      {9, 16, 300, 128, false, false}, {5, 20, 77, 32, true, false}, {33, 8, 129, 0, true, true}};
  if (!selected("cross_entropy")) return;
  if (!&bts::reference::cross_entropy_forward_backward) return skip("cross_entropy", "reference not built");
  for (const S& s : shapes)
    run_case("cross_entropy",
             fmt("N=%ld D=%ld V=%ld chunk=%ld dx=%d dw=%d", s.N, s.D, s.V, s.chunk, int(s.dx), int(s.dw)), 2e-5,
             [&](Check& c) {
               Rng r(uint64_t(s.N * 11 + s.V));
               auto x = r.vec(size_t(s.N * s.D), -2, 2), w = r.vec(size_t(s.V * s.D), -2, 2);
               auto t = r.ids(size_t(s.N), int32_t(s.V));
               if (s.N > 2) t[1] = -100;  // ignored row
               auto dw0 = r.vec(w.size());
               Dev<float> dx_(x), dw_(w), dlos(size_t(s.N), NAN), ddx(x.size(), NAN), ddw(dw0);
               Dev<int32_t> dt(t);
               Dev<double> dsum(1);
               Dev<int64_t> dcnt(1);
               bts::CrossEntropyParams p;
               p.N = s.N, p.D = s.D, p.V = s.V, p.grad_scale = 0.37f;
               auto g = p;
               g.x = dx_.d, g.w = dw_.d, g.targets = dt.d, g.losses = dlos.d, g.loss_sum = dsum.d, g.count = dcnt.d;
               g.dx = s.dx ? ddx.d : nullptr, g.dw = s.dw ? ddw.d : nullptr;
               bts::cuda::cross_entropy_vocab_chunk_for_tests = s.chunk;
               bts::cuda::cross_entropy_forward_backward(g, g_stream);
               bts::cuda::cross_entropy_vocab_chunk_for_tests = 0;
               vector<float> los(size_t(s.N)), gx(x.size()), gw = dw0;
               double sum = 0;
               int64_t cnt = 0;
               p.x = x.data(), p.w = w.data(), p.targets = t.data(), p.losses = los.data(), p.loss_sum = &sum,
               p.count = &cnt;
               p.dx = s.dx ? gx.data() : nullptr, p.dw = s.dw ? gw.data() : nullptr;
               bts::reference::cross_entropy_forward_backward(p);
               c.add("losses", dlos.host(), los);
               c.add("loss_sum", {float(dsum.host()[0])}, {float(sum)});
               if (dcnt.host()[0] != cnt) c.err = INFINITY, c.note = "count";
               if (s.dx) c.add("dx", ddx.host(), gx);
               if (s.dw) c.add("dw", ddw.host(), gw);
             });
}

void test_adamw() {
  if (!selected("adamw")) return;
  if (!&bts::reference::adamw_step) return skip("adamw", "reference not built");
  struct S {
    int64_t n, n_decay;
    float max_norm;
  };
  const S shapes[] = {{1, 1, 0.f}, {7, 3, 0.5f}, {1000, 600, 1e9f}, {5000, 4097, 1.f}, {3000, 0, 0.f}};
  for (const S& s : shapes)
    run_case("adamw", fmt("n=%ld n_decay=%ld max_grad_norm=%g", s.n, s.n_decay, s.max_norm), 1e-5, [&](Check& c) {
      Rng r(uint64_t(s.n + s.n_decay));
      auto p0 = r.vec(size_t(s.n)), g0 = r.vec(size_t(s.n)), m0 = r.vec(size_t(s.n), -0.1f, 0.1f),
           v0 = r.vec(size_t(s.n), 0.f, 0.01f);
      Dev<float> dp(p0), dg(g0), dm(m0), dv(v0), dn(1);
      bts::AdamWParams p;
      p.n = s.n, p.n_decay = s.n_decay, p.lr = 1e-2f, p.weight_decay = 0.1f, p.step = 3, p.max_grad_norm = s.max_norm;
      p.grad_scale = 0.5f;
      auto g = p;
      g.p = dp.d, g.g = dg.d, g.m = dm.d, g.v = dv.d, g.grad_norm = dn.d;
      bts::cuda::adamw_step(g, g_stream);
      auto pr = p0, mr = m0, vr = v0;
      float norm = 0;
      p.p = pr.data(), p.g = g0.data(), p.m = mr.data(), p.v = vr.data(), p.grad_norm = &norm;
      bts::reference::adamw_step(p);
      c.add("p", dp.host(), pr);
      c.add("m", dm.host(), mr);
      c.add("v", dv.host(), vr);
      c.add("grad_norm", dn.host(), {norm});
    });
}

void test_stitch() {
  struct S {
    int64_t N, D, n;
  };
  const S shapes[] = {{1, 1, 1}, {7, 33, 2}, {5, 64, 3}};
  if (!selected("stitch")) return;
  if (!&bts::reference::stitch_eh_forward) return skip("stitch", "reference not built");
  for (const S& s : shapes) {
    const string shape = fmt("N=%ld D=%ld n=%ld", s.N, s.D, s.n);
    const size_t ND = size_t(s.N * s.D), nND = size_t(s.n) * ND, G = ND * size_t(s.n + 1);
    run_case("stitch_eh_forward", shape, 1e-6, [&](Check& c) {
      Rng r(uint64_t(s.N + s.D + s.n));
      auto h0 = r.vec(ND), pp = r.vec(nND), Gl = r.vec(G, -3, 3);
      vector<float> out(ND);
      Dev<float> a(h0), b(pp), gg(Gl), o(ND);
      bts::StitchEHParams p;
      p.N = s.N, p.D = s.D, p.n = s.n;
      auto q = p;
      q.h0 = a.d, q.p = b.d, q.G = gg.d, q.out = o.d;
      bts::cuda::stitch_eh_forward(q, g_stream);
      p.h0 = h0.data(), p.p = pp.data(), p.G = Gl.data(), p.out = out.data();
      bts::reference::stitch_eh_forward(p);
      c.add("out", o.host(), out);
    });
    run_case("stitch_eh_backward", shape, 1e-6, [&](Check& c) {
      Rng r(uint64_t(s.N * 2 + s.D + s.n));
      auto h0 = r.vec(ND), pp = r.vec(nND), Gl = r.vec(G, -3, 3), go = r.vec(ND);
      vector<float> gh(ND), gp(nND), gG(G);
      Dev<float> a(h0), b(pp), gg(Gl), dgo(go), o1(ND, NAN), o2(nND, NAN), o3(G, NAN);
      bts::StitchEHBackwardParams p;
      p.N = s.N, p.D = s.D, p.n = s.n;
      auto q = p;
      q.h0 = a.d, q.p = b.d, q.G = gg.d, q.dout = dgo.d, q.dh0 = o1.d, q.dp = o2.d, q.dG = o3.d;
      bts::cuda::stitch_eh_backward(q, g_stream);
      p.h0 = h0.data(), p.p = pp.data(), p.G = Gl.data(), p.dout = go.data(), p.dh0 = gh.data(), p.dp = gp.data(),
      p.dG = gG.data();
      bts::reference::stitch_eh_backward(p);
      c.add("dh0", o1.host(), gh);
      c.add("dp", o2.host(), gp);
      c.add("dG", o3.host(), gG);
    });
    run_case("stitch_he_forward", shape, 1e-6, [&](Check& c) {
      Rng r(uint64_t(s.N + s.D * 3 + s.n));
      auto h = r.vec(nND), qq = r.vec(nND), Gl = r.vec(G, -3, 3);
      vector<float> out(nND);
      Dev<float> a(h), b(qq), gg(Gl), o(nND);
      bts::StitchHEParams p;
      p.N = s.N, p.D = s.D, p.n = s.n;
      auto q = p;
      q.h = a.d, q.q = b.d, q.G = gg.d, q.out = o.d;
      bts::cuda::stitch_he_forward(q, g_stream);
      p.h = h.data(), p.q = qq.data(), p.G = Gl.data(), p.out = out.data();
      bts::reference::stitch_he_forward(p);
      c.add("out", o.host(), out);
    });
    run_case("stitch_he_backward", shape, 1e-6, [&](Check& c) {
      Rng r(uint64_t(s.N + s.D * 5 + s.n));
      auto h = r.vec(nND), qq = r.vec(nND), Gl = r.vec(G, -3, 3), go = r.vec(nND);
      vector<float> gh(nND), gq(nND), gG(G);
      Dev<float> a(h), b(qq), gg(Gl), dgo(go), o1(nND, NAN), o2(nND, NAN), o3(G, NAN);
      bts::StitchHEBackwardParams p;
      p.N = s.N, p.D = s.D, p.n = s.n;
      auto q = p;
      q.h = a.d, q.q = b.d, q.G = gg.d, q.dout = dgo.d, q.dh = o1.d, q.dq = o2.d, q.dG = o3.d;
      bts::cuda::stitch_he_backward(q, g_stream);
      p.h = h.data(), p.q = qq.data(), p.G = Gl.data(), p.dout = go.data(), p.dh = gh.data(), p.dq = gq.data(),
      p.dG = gG.data();
      bts::reference::stitch_he_backward(p);
      c.add("dh", o1.host(), gh);
      c.add("dq", o2.host(), gq);
      c.add("dG", o3.host(), gG);
    });
  }
}

// ---------------------------------------------------------------------------------------------------
// The emulator's own checks: a deliberately missing __syncthreads must be reported as a race, the
// same kernel with the barrier must pass, and a barrier skipped by part of the block is divergence.
#if defined(BTS_CUDA_EMULATOR)
__global__ void reverse_kernel(const float* in /* [64] */, float* out /* [64] */, bool with_barrier) {
  BTS_SHARED(float, buf, 64);
  buf[threadIdx.x] = in[threadIdx.x];
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = buf[63 - threadIdx.x];
}
// Missing the SECOND barrier of a tiled loop: the next tile overwrites data still being read.
__global__ void tiled_sum_kernel(const float* in /* [4, 32] */, float* out /* [32] */, bool second_barrier) {
  BTS_SHARED(float, tile, 32);
  float acc = 0.f;
  for (int t = 0; t < 4; t++) {
    tile[threadIdx.x] = in[t * 32 + threadIdx.x];
    __syncthreads();
    acc += tile[31 - threadIdx.x];
    if (second_barrier) __syncthreads();
  }
  out[threadIdx.x] = acc;
}
__global__ void divergent_kernel(float* out /* [64] */) {
  BTS_SHARED(float, buf, 64);
  if (threadIdx.x >= 40) return;  // bug: these threads skip the barrier below
  buf[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

void test_emulator() {
  if (!selected("emulator")) return;
  vector<float> in(128);
  for (int i = 0; i < 128; i++) in[size_t(i)] = float(i);
  Dev<float> din(in), dout(64);
  auto expect_error = [&](const char* name, const char* needle, const std::function<void()>& fn) {
    run_case("emulator", name, 0, [&](Check& c) {
      try {
        fn();
        c.err = 1, c.note = "no error reported";
      } catch (const bts::Error& e) {
        if (!std::strstr(e.what(), needle)) c.err = 1, c.note = e.what();
        else std::printf("  (reported: %s)\n", e.what());
      }
    });
  };
  expect_error("missing_syncthreads_race", "race", [&] {
    BTS_LAUNCH(reverse_kernel, 1, 64, 0, g_stream, din.d, dout.d, false);
  });
  expect_error("missing_second_syncthreads_race", "race", [&] {
    BTS_LAUNCH(tiled_sum_kernel, 1, 32, 0, g_stream, din.d, dout.d, false);
  });
  expect_error("barrier_divergence", "divergence", [&] { BTS_LAUNCH(divergent_kernel, 1, 64, 0, g_stream, dout.d); });
  // Device memory provenance: a host pointer as a kernel argument or as a copy's device side is an
  // error (on a GPU it faults), so the Node binding's host/device bookkeeping is checked here too.
  expect_error("host_pointer_kernel_argument", "outside every device allocation", [&] {
    BTS_LAUNCH(reverse_kernel, 1, 64, 0, g_stream, in.data(), dout.d, true);
  });
  expect_error("host_pointer_copy", "invalid argument", [&] {
    BTS_CUDA_CHECK(cudaMemcpy(in.data(), din.d, sizeof(float), cudaMemcpyHostToDevice));
  });
  run_case("emulator", "fresh_allocation_is_nan", 0, [&](Check& c) {
    float* d = nullptr;
    BTS_CUDA_CHECK(cudaMalloc(&d, 8 * sizeof(float)));
    vector<float> h(8, 0.f);
    BTS_CUDA_CHECK(cudaMemcpy(h.data(), d, 8 * sizeof(float), cudaMemcpyDeviceToHost));
    BTS_CUDA_CHECK(cudaFree(d));
    for (float v : h)
      if (!std::isnan(v)) c.err = 1, c.note = "cudaMalloc returned memory that is not NaN-filled";
  });
  run_case("emulator", "with_syncthreads_no_race", 0, [&](Check& c) {
    BTS_LAUNCH(reverse_kernel, 1, 64, 0, g_stream, din.d, dout.d, true);
    vector<float> ref(64);
    for (int i = 0; i < 64; i++) ref[size_t(i)] = float(63 - i);
    c.add("out", dout.host(), ref);
    BTS_LAUNCH(tiled_sum_kernel, 1, 32, 0, g_stream, din.d, dout.d, true);
    vector<float> ref2(64, 0.f);
    auto got = dout.host();
    for (int i = 0; i < 32; i++)
      for (int t = 0; t < 4; t++) ref2[size_t(i)] += float(t * 32 + 31 - i);
    for (int i = 32; i < 64; i++) ref2[size_t(i)] = got[size_t(i)];
    c.add("tiled", got, ref2);
  });
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) g_filter = argv[1];
  const auto t0 = std::chrono::steady_clock::now();
#if defined(BTS_CUDA_EMULATOR)
  std::printf("# backend: SIMT emulator (CPU)\n");
  test_emulator();
#else
  std::printf("# backend: CUDA device\n");
  BTS_CUDA_CHECK(cudaStreamCreate(&g_stream));
#endif
  test_rmsnorm();
  test_swiglu();
  test_stitch();
  test_embedding();
  test_rope();
  test_adamw();
  test_gemm();
  test_attention();
  test_cross_entropy();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("SUMMARY pass=%d fail=%d skip=%d seconds=%.1f\n", g_pass, g_fail, g_skip, secs);
  return g_fail ? 1 : 0;
}
