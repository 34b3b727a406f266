// simd.h: the small vector layer the CPU kernels are written against, one definition per ISA level.
//
// Included only through isa_begin.h, so it is compiled three times, inside namespace
// bts::cpu::<isa>::simd. A kernel written with `vf` (W floats) runs at every level: W = 16 (AVX-512),
// 8 (AVX2) or 1 (scalar). Partial loads/stores handle row tails without reading past the end.
// exp() is a Cephes-style polynomial (max rel. error about 2e-7 over the clamped range [-87.3, 88.7]);
// the scalar level uses std::exp.
#pragma once
#include <cstddef>

namespace bts {
namespace cpu {
namespace BTS_ISA {
namespace simd {

#if BTS_ISA_LEVEL == 3
constexpr int W = 16;
struct vf {
  __m512 v;
};
inline vf zero() { return {_mm512_setzero_ps()}; }
inline vf set1(float x) { return {_mm512_set1_ps(x)}; }
inline vf load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, vf a) { _mm512_storeu_ps(p, a.v); }
inline __mmask16 tail_mask(int n) { return __mmask16((1u << n) - 1u); }
inline vf load_partial(const float* p, int n) { return {_mm512_maskz_loadu_ps(tail_mask(n), p)}; }
inline void store_partial(float* p, vf a, int n) { _mm512_mask_storeu_ps(p, tail_mask(n), a.v); }
inline vf operator+(vf a, vf b) { return {_mm512_add_ps(a.v, b.v)}; }
inline vf operator-(vf a, vf b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline vf operator*(vf a, vf b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline vf operator/(vf a, vf b) { return {_mm512_div_ps(a.v, b.v)}; }
inline vf fmadd(vf a, vf b, vf c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline vf fnmadd(vf a, vf b, vf c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a*b
inline vf max(vf a, vf b) { return {_mm512_max_ps(a.v, b.v)}; }
inline vf min(vf a, vf b) { return {_mm512_min_ps(a.v, b.v)}; }
inline float reduce_add(vf a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(vf a) { return _mm512_reduce_max_ps(a.v); }
inline vf round_nearest(vf a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline vf pow2i(vf n) {  // 2^n for integral n in [-126, 127]
  __m512i i = _mm512_cvtps_epi32(n.v);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(i, _mm512_set1_epi32(127)), 23))};
}
inline vf load_bf16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline vf load_bf16_partial(const uint16_t* p, int n) {
  __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}

#elif BTS_ISA_LEVEL == 2
constexpr int W = 8;
struct vf {
  __m256 v;
};
inline vf zero() { return {_mm256_setzero_ps()}; }
inline vf set1(float x) { return {_mm256_set1_ps(x)}; }
inline vf load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void store(float* p, vf a) { _mm256_storeu_ps(p, a.v); }
inline __m256i tail_mask(int n) {
  static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n));
}
inline vf load_partial(const float* p, int n) { return {_mm256_maskload_ps(p, tail_mask(n))}; }
inline void store_partial(float* p, vf a, int n) { _mm256_maskstore_ps(p, tail_mask(n), a.v); }
inline vf operator+(vf a, vf b) { return {_mm256_add_ps(a.v, b.v)}; }
inline vf operator-(vf a, vf b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline vf operator*(vf a, vf b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline vf operator/(vf a, vf b) { return {_mm256_div_ps(a.v, b.v)}; }
inline vf fmadd(vf a, vf b, vf c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline vf fnmadd(vf a, vf b, vf c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; }
inline vf max(vf a, vf b) { return {_mm256_max_ps(a.v, b.v)}; }
inline vf min(vf a, vf b) { return {_mm256_min_ps(a.v, b.v)}; }
inline float reduce_add(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf round_nearest(vf a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline vf pow2i(vf n) {
  __m256i i = _mm256_cvtps_epi32(n.v);
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(i, _mm256_set1_epi32(127)), 23))};
}
inline vf load_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
inline vf load_bf16_partial(const uint16_t* p, int n) {
  uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; i++) tmp[i] = p[i];
  return load_bf16(tmp);
}

#else  // scalar
constexpr int W = 1;
struct vf {
  float v;
};
inline vf zero() { return {0.f}; }
inline vf set1(float x) { return {x}; }
inline vf load(const float* p) { return {*p}; }
inline void store(float* p, vf a) { *p = a.v; }
inline vf load_partial(const float* p, int n) { return {n > 0 ? *p : 0.f}; }
inline void store_partial(float* p, vf a, int n) {
  if (n > 0) *p = a.v;
}
inline vf operator+(vf a, vf b) { return {a.v + b.v}; }
inline vf operator-(vf a, vf b) { return {a.v - b.v}; }
inline vf operator*(vf a, vf b) { return {a.v * b.v}; }
inline vf operator/(vf a, vf b) { return {a.v / b.v}; }
inline vf fmadd(vf a, vf b, vf c) { return {a.v * b.v + c.v}; }
inline vf fnmadd(vf a, vf b, vf c) { return {c.v - a.v * b.v}; }
inline vf max(vf a, vf b) { return {a.v > b.v ? a.v : b.v}; }
inline vf min(vf a, vf b) { return {a.v < b.v ? a.v : b.v}; }
inline float reduce_add(vf a) { return a.v; }
inline float reduce_max(vf a) { return a.v; }
inline vf load_bf16(const uint16_t* p) {
  uint32_t u = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return {f};
}
inline vf load_bf16_partial(const uint16_t* p, int n) { return n > 0 ? load_bf16(p) : vf{0.f}; }
#endif

inline vf& operator+=(vf& a, vf b) { return a = a + b; }
inline vf& operator*=(vf& a, vf b) { return a = a * b; }

#if BTS_ISA_LEVEL == 1
inline vf exp(vf x) { return {std::exp(x.v)}; }
#else
// e^x = 2^n * e^r with n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2]; degree-6 polynomial.
inline vf exp(vf x) {
  x = min(max(x, set1(-87.33654f)), set1(88.72283f));
  vf n = round_nearest(x * set1(1.44269504088896341f));
  vf r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, r * r, r + set1(1.f));
  // n = 128 (x near 88.7) would overflow the exponent field: split 2^n = 2^(n-1) * 2.
  vf big = set1(127.f);
  vf n1 = min(n, big);
  return p * pow2i(n1) * (set1(1.f) + (n - n1));
}
#endif

// 1 / (1 + e^-x). exp() clamps its argument, so e^-x saturates near 1.7e38 for x < -88.7 and
// sigmoid bottoms out near 6e-39 instead of 0: callers computing x * sigmoid(x) must clamp x.
inline vf sigmoid(vf x) { return set1(1.f) / (set1(1.f) + exp(set1(0.f) - x)); }

}  // namespace simd

// ---------------------------------------------------------------------------------------------------
// Scratch arrays and range helpers for kernel code. Kernel files must NOT use std::vector, std::fill,
// std::copy or other standard-library templates that are instantiated out of line: an instantiation
// made inside an ISA region is compiled with that level's instructions, and because its symbol is the
// same in every copy of the file (and in baseline code), the linker may pick the AVX-512 one for the
// whole program (seen: std::vector<float>::_M_default_append with zmm in the prebuild). Templates
// defined here live in namespace bts::cpu::<isa>, so every level gets its own symbols.
// test/build.test.ts checks the ISA object files for any other shared symbol.

// An owning array of n value-initialised T (std::vector's subset the kernels need).
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) { reset(n); }
  Buffer(size_t n, const T& v) { assign(n, v); }
  ~Buffer() { delete[] p_; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      delete[] p_;
      p_ = o.p_, n_ = o.n_, o.p_ = nullptr, o.n_ = 0;
    }
    return *this;
  }
  // n elements, all equal to v (previous contents dropped).
  void assign(size_t n, const T& v) {
    if (n != n_) reset(n);
    for (size_t i = 0; i < n; i++) p_[i] = v;
  }
  // n elements; the first min(n, size()) keep their values, new ones are value-initialised.
  void resize(size_t n) {
    if (n == n_) return;
    T* q = n ? new T[n]() : nullptr;
    for (size_t i = 0; i < (n < n_ ? n : n_); i++) q[i] = static_cast<T&&>(p_[i]);
    delete[] p_;
    p_ = q, n_ = n;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  T* begin() { return p_; }
  T* end() { return p_ + n_; }
  const T* begin() const { return p_; }
  const T* end() const { return p_ + n_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  T& operator[](size_t i) { return p_[i]; }
  const T& operator[](size_t i) const { return p_[i]; }

 private:
  void reset(size_t n) {
    delete[] p_;
    p_ = nullptr, n_ = 0;
    if (n) p_ = new T[n]();
    n_ = n;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
};

template <class T, class V>
inline void fill(T* first, T* last, const V& v) {
  for (; first != last; ++first) *first = v;
}

template <class T>
inline T* copy(const T* first, const T* last, T* out) {
  for (; first != last; ++first, ++out) *out = *first;
  return out;
}

}  // namespace BTS_ISA
}  // namespace cpu
}  // namespace bts
