// Register-blocked tile GEMM of the channel_attention CPU kernel (host only, GCC vector types).
//
//   C[r, l] (+)= sum_t sum_k A_t(r, k) * B_t(k, l)      r < M rows, l < nl lanes (nl % kLanes == 0)
//
// A_t(r, k) = a[r * ars + k * acs] is read one scalar at a time and broadcast (any strides), B_t is
// row-major (row k at b + k * ldb, lanes contiguous), C is row-major (ldc). Up to two terms share
// one set of accumulators, so "dx += P dO + dS x" is one pass over C. Every GEMM of the kernel has
// this form once its operands are laid out with the lanes along a padded dimension (see
// channel_attention_tiles.h), so one micro-kernel serves all of them.
//
// Vectors are 32 bytes (8 floats / 4 doubles): on AVX-512 (AVX-512VL) they are ymm registers
// of which there are 32, enough for an R x NV = 6 x 4 accumulator block plus operands (AVX2 has
// 16: 6 x 2 there, see Blocks in channel_attention_tiles.h); Zen 4 runs
// 256-bit FMAs at the same FLOP rate as 512-bit ones, and 8-lane padding of N = 49 wastes 12.5%
// where 16 lanes would waste 23%. Remainder blocks (rows % R, vectors % NV) are dispatched to
// smaller instantiations by direct calls (inlined into the CK_CPU_WORKER clones; no pointers).
#pragma once

#include "common/simd.h"

#include <cstddef>
#include <cstring>

namespace concept_kernels {
namespace cam {

template <typename T>
struct Simd {
  static constexpr int kLanes = 32 / static_cast<int>(sizeof(T));
  using V = typename Vec<T, kLanes>::type;
  using VI = typename Vec<T, kLanes>::itype;
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof v); }
};

// One product term: A_t(r, k) = a[r * ars + k * acs], B_t(k, :) at b + k * ldb, k < K.
template <typename T>
struct Term {
  const T* a;
  ptrdiff_t ars, acs;
  const T* b;
  ptrdiff_t ldb;
  int K;
};

// R rows x NV vectors of C, NT terms; accumulate into C when acc, else overwrite.
template <typename T, int R, int NV, int NT>
inline void micro_kernel(const Term<T>* t, T* c, ptrdiff_t ldc, bool acc) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes;
  V s[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) s[r][v] = acc ? S::load(c + r * ldc + v * L) : V{};
  for (int q = 0; q < NT; ++q) {
    const T* a = t[q].a;
    const T* b = t[q].b;
    const ptrdiff_t ars = t[q].ars, acs = t[q].acs, ldb = t[q].ldb;
    for (int k = 0; k < t[q].K; ++k, a += acs, b += ldb) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = S::load(b + v * L);
      for (int r = 0; r < R; ++r) {
        const V av = broadcast<V>(a[r * ars]);
        for (int v = 0; v < NV; ++v) s[r][v] += av * bv[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) S::store(c + r * ldc + v * L, s[r][v]);
}

// micro_kernel<R, nv> for a runtime nv in [1, NV] (direct calls only, so that flatten inlines).
template <typename T, int R, int NV, int NT>
inline void micro_nv(int nv, const Term<T>* t, T* c, ptrdiff_t ldc, bool acc) {
  if constexpr (NV > 0) {
    if (nv == NV) return micro_kernel<T, R, NV, NT>(t, c, ldc, acc);
    micro_nv<T, R, NV - 1, NT>(nv, t, c, ldc, acc);
  }
}

// micro_kernel<r, nv> for runtime r in [1, R], nv in [1, NV].
template <typename T, int R, int NV, int NT>
inline void micro_rnv(int r, int nv, const Term<T>* t, T* c, ptrdiff_t ldc, bool acc) {
  if constexpr (R > 0) {
    if (r == R) return micro_nv<T, R, NV, NT>(nv, t, c, ldc, acc);
    micro_rnv<T, R - 1, NV, NT>(r, nv, t, c, ldc, acc);
  }
}

// C (M x nl, ldc) (+)= sum of the NT terms, in R x NV register blocks.
template <typename T, int R, int NV, int NT>
inline void tile_gemm(int M, int nl, const Term<T> (&terms)[NT], T* c, ptrdiff_t ldc, bool acc) {
  constexpr int L = Simd<T>::kLanes;
  const int nvec = nl / L;
  for (int r0 = 0; r0 < M; r0 += R) {
    const int r = M - r0 < R ? M - r0 : R;
    for (int v0 = 0; v0 < nvec; v0 += NV) {
      const int nv = nvec - v0 < NV ? nvec - v0 : NV;
      Term<T> t[NT];
      for (int q = 0; q < NT; ++q) {
        t[q] = terms[q];
        t[q].a += r0 * terms[q].ars;
        t[q].b += v0 * L;
      }
      micro_rnv<T, R, NV, NT>(r, nv, t, c + r0 * ldc + v0 * L, ldc, acc);
    }
  }
}

}  // namespace cam
}  // namespace concept_kernels
