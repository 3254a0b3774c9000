// GCC vector-extension SIMD helpers for the host compiler (GCC >= 11 or clang >= 14, never nvcc),
// shared by every CPU kernel:
// Vec<T, N>::type / ::itype (N lanes of float or double and the same-width integers), splat,
// bitwise select, horizontal min/max/sum, and exp/log on whole vectors (float lanes: the Cephes
// polynomials of common/fast_math.h, bit-identical to the scalar forms; double lanes: libm).
// Vectors wider than the target ISA are split by the compiler (correct, slower).
#pragma once

#if defined(__CUDACC__)
#error "common/simd.h is host-only (GCC vector extensions)"
#endif

#include "common/fast_math.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

// Vectors wider than the baseline ISA are passed in memory between non-inlined functions; every
// function here is inlined into the workers (flatten), so the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// CK_CPU_WORKER: a hot entry point with every callee (the SIMD helpers below, templates) inlined
// into it (flatten). The extension is compiled for the machine it is built on (setup.py:
// -march=native), so GCC's vector types map to its widest registers; per-function target_clones
// were measured 3x slower for them (GCC lowers wide vector types to the baseline ISA before the
// clones exist).
#define CK_CPU_WORKER __attribute__((flatten, noinline))

namespace concept_kernels {

template <typename T, int N>
struct Vec;
template <int N>
struct Vec<float, N> {
  typedef float type __attribute__((vector_size(N * sizeof(float))));
  typedef int32_t itype __attribute__((vector_size(N * sizeof(float))));
};
template <int N>
struct Vec<double, N> {
  typedef double type __attribute__((vector_size(N * sizeof(double))));
  typedef int64_t itype __attribute__((vector_size(N * sizeof(double))));
};

template <typename V, typename T>
inline V splat(T x) {
  return V{} + x;
}

#if !__has_builtin(__builtin_shuffle)
// clang has no __builtin_shuffle (GCC's mask-vector form, in every GCC); its __builtin_shufflevector
// takes one constant index per lane: Lane... are all 0 here.
template <typename V, std::size_t... Lane>
inline V shuffle_lane0(V v, std::index_sequence<Lane...>) {
  return __builtin_shufflevector(v, v, (static_cast<void>(Lane), 0)...);
}
#endif

// All lanes = x as one broadcast instruction (lane 0, then a shuffle with an all-zero mask). splat's
// 0 + x cannot be folded (it turns -0 into +0) and costs an add per call; hot loops use this.
template <typename V, typename T>
inline V broadcast(T x) {
  constexpr int N = static_cast<int>(sizeof(V) / sizeof(T));
  V v{};
  v[0] = x;
#if __has_builtin(__builtin_shuffle)
  return __builtin_shuffle(v, typename Vec<T, N>::itype{});
#else
  return shuffle_lane0(v, std::make_index_sequence<N>{});
#endif
}

// m ? a : b lane-wise with bitwise operations (GCC lowers the vector ?: of wider-than-hardware
// vectors lane by lane; and/or stay SIMD).
template <typename V, typename VI>
inline V sel(VI m, V a, V b) {
  return (V)(((VI)a & m) | ((VI)b & ~m));  // vector casts reinterpret the bits in registers
}

// Horizontal min / max of the N lanes: halve in registers (memcpy of a half is a lane extract).
template <typename T, int N>
struct Horizontal {
  using V = typename Vec<T, N>::type;
  using H = typename Vec<T, N / 2>::type;
  static void halves(V v, H& lo, H& hi) {
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  }
  static T min(V v) {
    H lo, hi;
    halves(v, lo, hi);
    return Horizontal<T, N / 2>::min(lo < hi ? lo : hi);
  }
  static T max(V v) {
    H lo, hi;
    halves(v, lo, hi);
    return Horizontal<T, N / 2>::max(lo > hi ? lo : hi);
  }
  static T sum(V v) {
    H lo, hi;
    halves(v, lo, hi);
    return Horizontal<T, N / 2>::sum(lo + hi);
  }
};
template <typename T>
struct Horizontal<T, 4> {
  static T sum(typename Vec<T, 4>::type v) { return (v[0] + v[2]) + (v[1] + v[3]); }
  using V = typename Vec<T, 4>::type;
  static T min(V v) {
    const T a = v[0] < v[1] ? v[0] : v[1], b = v[2] < v[3] ? v[2] : v[3];
    return a < b ? a : b;
  }
  static T max(V v) {
    const T a = v[0] > v[1] ? v[0] : v[1], b = v[2] > v[3] ? v[2] : v[3];
    return a > b ? a : b;
  }
};

// exp / log on a whole vector: float lanes with the Cephes polynomials of fast_expf / fast_logf
// (bitwise the same results lane by lane), double lanes with the math library.
template <typename V, typename VI>
inline V vexp(V x, float) {
  const VI under = x < -87.33f;
  x = sel<V, VI>(under, splat<V>(-87.33f), x);
  x = sel<V, VI>(x > 88.3f, splat<V>(88.3f), x);
  const V t = x * 1.44269504088896341f;
  const V n = (t + 12582912.0f) - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V y = expf_poly(r);
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  const V res = y * (V)e;
  return sel<V, VI>(under, V{}, res);
}
template <typename V, typename VI>
inline V vlog(V x, float) {
  const VI bits = (VI)x;
  const VI e = ((bits >> 23) & 0xff) - 126;
  V m = (V)((bits & 0x007fffff) | 0x3f000000);
  const VI small = m < 0.707106781186547524f;
  const V fe = __builtin_convertvector(e + small, V);  // small lanes are -1: e - 1
  m = sel<V, VI>(small, m + m, m) - 1.0f;
  return logf_poly(m, fe);
}
template <typename V, typename VI>
inline V vexp(V x, double) {
  constexpr int N = sizeof(V) / sizeof(double);
  for (int l = 0; l < N; ++l) x[l] = std::exp(x[l]);
  return x;
}
template <typename V, typename VI>
inline V vlog(V x, double) {
  constexpr int N = sizeof(V) / sizeof(double);
  for (int l = 0; l < N; ++l) x[l] = std::log(x[l]);
  return x;
}

}  // namespace concept_kernels
