// Elementwise math written so that `#pragma omp simd` loops over it vectorise
// (GCC/Clang with -fopenmp-simd): no branches, no calls into libm.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

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

// float64 keeps libm's exp: float64 is the checking precision, not the fast path.
inline double exp_simd(double x) { return std::exp(x); }

}  // namespace mlot
