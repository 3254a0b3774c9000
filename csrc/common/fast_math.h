// Branch-free single-precision exp/log for the host compiler, shared by every CPU kernel: scalar
// forms here, SIMD forms (same polynomial cores, lane by lane the same results) in common/simd.h.
// Cephes polynomials, ~1 ulp; glibc's expf/logf are scalar calls, these vectorise. Device code uses
// the CUDA math library instead (everything below is host only).
#pragma once

#include "common/host_device.h"

#include <cstdint>
#include <cstring>

// The polynomial cores are also instantiated with GCC vector types (common/simd.h) inside the
// flattened workers, where the vector-ABI note does not apply.
#if !defined(__CUDACC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace concept_kernels {

#if !defined(__CUDA_ARCH__)
CK_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
CK_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// The two Cephes polynomial cores, written once for the scalar form below and the SIMD form
// (common/simd.h): T is float or a GCC float vector (vector op float-constant broadcasts).
// exp: e^r for the reduced argument r in [-ln2/2, ln2/2].
template <typename T>
CK_INLINE T expf_poly(T r) {
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * (r * r) + r) + 1.0f;
}
// log: log(x) = log1p(m) + fe ln2 with x = (1 + m) 2^fe, m in [sqrt(1/2) - 1, sqrt(2) - 1].
template <typename T>
CK_INLINE T logf_poly(T m, T fe) {
  const T z = m * m;
  T y = T{} + 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return (m + y) + fe * 0.693359375f;
}

// exp(x), flushed to 0 below -87.33 (no denormals), clamped at 88.3.
CK_INLINE float fast_expf(float x) {
  const bool under = x < -87.33f;
  x = x < -87.33f ? -87.33f : (x > 88.3f ? 88.3f : x);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest, |t| < 2^22
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float y = expf_poly(r);
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return under ? 0.0f : y * scale;
}

// log(x) for positive normal x (callers guarantee it).
CK_INLINE float fast_logf(float x) {
  const int32_t bits = float_to_bits(x);
  const int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m 2^e, m in [0.5, 1)
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);
  const bool small = m < 0.707106781186547524f;
  const float fe = static_cast<float>(small ? e - 1 : e);
  m = small ? (m + m) - 1.0f : m - 1.0f;
  return logf_poly(m, fe);
}
#endif

}  // namespace concept_kernels
