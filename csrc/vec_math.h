// Elementwise math written so that `#pragma omp simd` loops over it vectorise
// (GCC/Clang with -fopenmp-simd): no branches, no calls into libm; and Simd<T>, one vector
// register of T through the GCC/Clang vector extensions, for kernels written in registers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace mlot {

// exp(x) in float32, within 2 ulp of the correctly rounded value on
// [log(FLT_MIN), log(FLT_MAX)]; 0 below (no denormals), +inf above, NaN for NaN.
// Cody-Waite reduction x = k*ln2 + r with |r| <= ln2/2, then Cephes' expf
// polynomial for exp(r), then scaling by 2^k through the exponent bits.
inline float exp_simd(float x) {
  constexpr float kMin = -87.33654475f;  // log(FLT_MIN)
  constexpr float kMax = 88.72283905f;   // log(FLT_MAX)
  float xc = x >= kMin ? x : kMin;       // NaN goes to kMin, restored at the end
  xc = xc <= kMax ? xc : kMax;
  // Round to nearest by adding and removing 1.5 * 2^23 (exact for |k| < 2^22); a
  // call to floor would keep the loop from vectorising.
  constexpr float kRound = 12582912.0f;
  float k = (xc * 1.44269504088896341f + kRound) - kRound;
  k = k <= 127.0f ? k : 127.0f;  // keeps 2^k a normal float; r grows to ln2 only near kMax
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  const float poly =
      ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
        4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
  float y = poly * (r * r) + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y *= scale;
  y = x < kMin ? 0.0f : y;
  y = x > kMax ? std::numeric_limits<float>::infinity() : y;
  return x == x ? y : x;
}

// float64 keeps libm's exp and log: float64 is the checking precision, not the fast path.
inline double exp_simd(double x) { return std::exp(x); }

// log(x) in float32 for positive normal x, within 2 ulp of the correctly rounded value; other
// inputs give an unspecified finite or NaN value (callers select it away). x = 2^e * m with m
// in [sqrt(1/2), sqrt(2)) through the exponent bits, then Cephes' logf polynomial for log(m).
inline float log_simd(float x) {
  std::int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);  // x = 2^e * m, m in [0.5, 1)
  bits = (bits & 0x807fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m -
                  1.2420140846e-1f) * m + 1.4249322787e-1f) * m - 1.6668057665e-1f) * m +
               2.0000714765e-1f) * m - 2.4999993993e-1f) * m + 3.3333331174e-1f) * m * z;
  y += -2.12194440e-4f * e - 0.5f * z;
  return (m + y) + 0.693359375f * e;
}

inline double log_simd(double x) { return std::log(x); }

// One vector register of T (GCC/Clang vector extensions, lowered to the widest unit that
// -march=native allows): 64 bytes with AVX-512, else 32 (AVX2; two registers on NEON). The
// kernels written with it keep register blocks of kRegisters / 2 vectors or fewer.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kRegisters = 32;
#else
constexpr int kVectorBytes = 32;
constexpr int kRegisters = 16;
#endif

template <typename T>
struct Simd {
  using Bits = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
  typedef T V __attribute__((vector_size(kVectorBytes)));
  typedef Bits B __attribute__((vector_size(kVectorBytes)));
  static constexpr int kLanes = kVectorBytes / sizeof(T);

  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static V splat(T s) { return V{} + s; }
  static T sum(V v) { return Halves<kVectorBytes>::sum(v); }
  static V abs(V v) { return (V)((B)v & ~sign_bit()); }
  static V max(V a, V b) { return a > b ? a : b; }
  // exp lane by lane: exp_simd's float32 steps as vector operations (float64: libm's exp).
  static V exp(V x) {
    if constexpr (sizeof(T) == 8) {
      for (int k = 0; k < kLanes; ++k) x[k] = std::exp(x[k]);
      return x;
    } else {
      const V lo = splat(-87.33654475f), hi = splat(88.72283905f);
      V xc = x >= lo ? x : lo;  // NaN goes to lo, restored at the end
      xc = xc <= hi ? xc : hi;
      V k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
      k = k <= splat(127.0f) ? k : splat(127.0f);
      V r = xc - k * 0.693359375f;
      r = r - k * -2.12194440e-4f;
      const V poly = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                       4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
      V y = poly * (r * r) + r + 1.0f;
      y *= (V)((__builtin_convertvector(k, B) + 127) << 23);
      y = x < lo ? V{} : y;
      y = x > hi ? splat(std::numeric_limits<T>::infinity()) : y;
      return x == x ? y : x;
    }
  }
  // w * sign(d), with sign(0) = 0: w with d's sign bit flipped in, zero where d == 0.
  static V times_sign(V w, V d) { return (V)(((B)w ^ ((B)d & sign_bit())) & (B)(d != 0)); }

 private:
  static B sign_bit() { return B{} + std::numeric_limits<Bits>::min(); }

  // The sum of a vector's lanes as a tree of halves (register extracts and adds).
  template <int Bytes, bool = (Bytes > 2 * int(sizeof(T)))>
  struct Halves {
    typedef T W __attribute__((vector_size(Bytes)));
    typedef T H __attribute__((vector_size(Bytes / 2)));
    static T sum(W v) {
      H lo, hi;
      std::memcpy(&lo, &v, sizeof(lo));
      std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
      return Halves<Bytes / 2>::sum(lo + hi);
    }
  };
  template <int Bytes>
  struct Halves<Bytes, false> {
    typedef T W __attribute__((vector_size(Bytes)));
    static T sum(W v) { return v[0] + v[1]; }
  };
};

// max_k p[k] (-inf for n == 0) and sum_k p[k] q[k]: whole vectors, then the tail one by one.
template <typename T>
T max_of(const T* p, int64_t n) {
  using S = Simd<T>;
  auto acc = S::splat(-std::numeric_limits<T>::infinity());
  int64_t k = 0;
  for (; k + S::kLanes <= n; k += S::kLanes) acc = S::max(acc, S::load(p + k));
  T out = acc[0];
  for (int lane = 1; lane < S::kLanes; ++lane) out = acc[lane] > out ? acc[lane] : out;
  for (; k < n; ++k) out = p[k] > out ? p[k] : out;
  return out;
}

template <typename T>
T dot(const T* p, const T* q, int64_t n) {
  using S = Simd<T>;
  typename S::V acc{};
  int64_t k = 0;
  for (; k + S::kLanes <= n; k += S::kLanes) acc += S::load(p + k) * S::load(q + k);
  T out = S::sum(acc);
  for (; k < n; ++k) out += p[k] * q[k];
  return out;
}

}  // namespace mlot
