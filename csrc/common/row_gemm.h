// Host-only float GEMM for tall-skinny products S = A @ Bt, A (rows, K) row-major, Bt (K, ldb)
// column-packed (ldb = padded(columns), zero-padded), S (rows, ldb). Register tiles of MR rows x
// NC vectors of GCC vector types sized for the ISA the extension is compiled for (zmm with
// AVX-512, else ymm). Used where the product feeds a consumer that reads it at once from cache
// (ot_similarity: a chunk of bank rows against every query patch), which a BLAS call on the whole
// product cannot do; on the development machine (AMD EPYC, Zen 4) it also ran 1.3-1.5x faster than
// MKL's sgemm for these shapes (MKL takes a generic AVX2 kernel there). Deterministic: each output
// is one k-ascending chain.
#pragma once

#if defined(__CUDACC__)
#error "row_gemm.h is host-only"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace concept_kernels {
namespace row_gemm {

#if defined(__AVX512F__)
constexpr int kW = 16;  // floats per vector: one zmm
constexpr int kMR = 5;  // 5 x 5 zmm accumulators: 13 ms vs 17 ms for 2 x 9 ymm (36,000 x 200 x 72, Zen 4)
constexpr int kNC = 5;
#else
constexpr int kW = 8;   // one ymm (AVX2), two xmm on the baseline
constexpr int kMR = 3;  // 3 x 4 accumulators + operands fit 16 registers
constexpr int kNC = 4;
#endif
constexpr int kH = 8;  // columns are padded to half vectors: a last half vector (ymm) where kW = 16
typedef float Vec __attribute__((vector_size(kW * sizeof(float))));
typedef float Half __attribute__((vector_size(kH * sizeof(float))));

// Leading dimension of the packed operand and of S for `cols` columns: a multiple of 8, not of
// the vector (72 query patches at B = 8: 4.5 zmm; padding to 80 did 11% more FMAs).
inline int64_t padded(int64_t cols) { return (cols + kH - 1) / kH * kH; }

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// x in every lane, as one broadcast (a load-broadcast when x comes from memory)
inline Vec broadcast(float x) {
#if defined(__AVX512F__)
  return (Vec)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (Vec)_mm256_set1_ps(x);
#else
  return Vec{} + x;
#endif
}
// The first kH lanes of v (the low half of a zmm register: no instruction). GCC has
// __builtin_shufflevector only from version 12; GCC 11 takes the cast intrinsic (also no
// instruction, but in GCC 12 it changed the loop code of some tiles, so it is only the fallback).
inline Half low_half(Vec v) {
#if defined(__AVX512F__) && __has_builtin(__builtin_shufflevector)
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
#elif defined(__AVX512F__)
  return (Half)_mm512_castps512_ps256((__m512)v);
#else
  return v;
#endif
}

// Rows [0, MR) x (NC vectors + NH half vectors) of S. One broadcast per row and k serves the
// vectors and the half vector (from a scalar, GCC emitted one per width: 10 shuffles per 25 FMAs).
// The 36,000 x 200 x 72 product on 2 Zen 5 cores: 3.0-3.4 ms before, 2.35-2.45 ms now.
template <int MR, int NC, int NH>
inline void tile(const float* a, int64_t K, const float* bt, int64_t ldb, float* s) {
  Vec acc[MR][NC > 0 ? NC : 1];
  Half acch[MR][NH > 0 ? NH : 1];
  for (int m = 0; m < MR; ++m) {  // (not `= {}`: GCC then zeroes them with a memset on the stack)
    for (int n = 0; n < NC; ++n) acc[m][n] = Vec{};
    for (int n = 0; n < NH; ++n) acch[m][n] = Half{};
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec q[NC > 0 ? NC : 1];
    Half qh[NH > 0 ? NH : 1];
    for (int n = 0; n < NC; ++n) q[n] = load<Vec>(bt + k * ldb + kW * n);
    for (int n = 0; n < NH; ++n) qh[n] = load<Half>(bt + k * ldb + kW * NC + kH * n);
    for (int m = 0; m < MR; ++m) {
      const Vec x = broadcast(a[m * K + k]);
      for (int n = 0; n < NC; ++n) acc[m][n] += x * q[n];
      for (int n = 0; n < NH; ++n) acch[m][n] += low_half(x) * qh[n];
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NC; ++n) std::memcpy(s + m * ldb + kW * n, &acc[m][n], sizeof(Vec));
    for (int n = 0; n < NH; ++n) std::memcpy(s + m * ldb + kW * NC + kH * n, &acch[m][n], sizeof(Half));
  }
}

// Columns [c0, c0 + NC * kW + NH * kH) of rows [0, rows).
template <int NC, int NH>
inline void column_block(const float* a, int64_t rows, int64_t K, const float* bt, int64_t ldb, float* s, int64_t c0) {
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR) tile<kMR, NC, NH>(a + r * K, K, bt + c0, ldb, s + r * ldb + c0);
  for (; r < rows; ++r) tile<1, NC, NH>(a + r * K, K, bt + c0, ldb, s + r * ldb + c0);
}

// The last block: nc < kNC vectors, plus a half vector when nh = 1.
template <int NC = 0>
inline void remainder_block(int nc, int nh, const float* a, int64_t rows, int64_t K, const float* bt, int64_t ldb,
                            float* s, int64_t c0) {
  if constexpr (NC < kNC) {
    if (nc == NC) {
      if (nh == 1) return column_block<NC, 1>(a, rows, K, bt, ldb, s, c0);
      if constexpr (NC > 0) return column_block<NC, 0>(a, rows, K, bt, ldb, s, c0);
      return;
    }
    remainder_block<NC + 1>(nc, nh, a, rows, K, bt, ldb, s, c0);
  }
}

// S (rows, ldb) = A (rows, K) @ Bt (K, ldb); ldb = padded(columns).
inline void multiply(const float* a, int64_t rows, int64_t K, const float* bt, int64_t ldb, float* s) {
  const int64_t vecs = ldb / kW;
  const int nh = static_cast<int>((ldb % kW) / kH);
  int64_t c0 = 0;
  for (; c0 + kNC * kW <= vecs * kW; c0 += kNC * kW) column_block<kNC, 0>(a, rows, K, bt, ldb, s, c0);
  remainder_block(static_cast<int>(vecs - c0 / kW), nh, a, rows, K, bt, ldb, s, c0);
}

// ---- column groups: S[:, c .. c + 8) for a listed set of 8-column groups only -------------------
// For a product where each row needs only some columns (ot_similarity: a bank row is matched with
// the queries that index it, about 63% of them with a random index). Tiles of kGR rows x kGC
// groups; each group has its own pointer into Bg, so any set of groups costs what it computes.
// Bg holds Bt group by group (pack_groups): a group's K x 8 values are one contiguous panel, read
// in sequence, where Bt's rows would put each k in another cache line (ldb floats apart). The
// groups go in chunks of kGC, each chunk against all row tiles in turn, so that with several row
// tiles (16 registers) the chunk's panels (kGC x K x 8 floats: 19 KB for K = 200) are read from L1
// after the first. An x86-64-v3 build on Zen 4 (1 thread, ot_similarity CPU benchmark shape, perf
// samples): with Bt and the row tiles outer, its GEMM took 1.55x the AVX-512 build's time (3 x 3
// tiles read each Bt line three times, mostly from L2); now the same as that build's (and the op's
// fwd+bwd 4-5% faster). The AVX-512 build (one 9-row tile) moved by -2%, within the noise.
#if defined(__AVX512F__)
constexpr int kGR = 9;  // 27 ymm accumulators of the 32 registers (9 = the method's patches per row)
constexpr int kGC = 3;
#else
constexpr int kGR = 3;  // 9 accumulators + operands fit 16 registers
constexpr int kGC = 3;
#endif

template <int MR, int NC>
inline void group_tile(const float* a, int64_t K, const float* bg, const int32_t* groups, float* s, int64_t lds) {
  Half acc[MR][NC] = {};
  const float* b[NC];
  for (int n = 0; n < NC; ++n) b[n] = bg + groups[n] * K;  // (group g = column / 8 starts at g * 8 * K)
  for (int64_t k = 0; k < K; ++k) {
    Half q[NC];
    for (int n = 0; n < NC; ++n) q[n] = load<Half>(b[n] + k * kH);
    for (int m = 0; m < MR; ++m) {
      const float x = a[m * K + k];
      for (int n = 0; n < NC; ++n) acc[m][n] += x * q[n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NC; ++n) std::memcpy(s + m * lds + groups[n], &acc[m][n], sizeof(Half));
}

// Row-tile height for a chunk of NC groups: kGR for a full chunk (NC = kGC); the last chunk of a
// row, with fewer groups, takes taller tiles (16 registers: 9 x 1 and 5 x 2 instead of 3 x 1 and
// 3 x 2), so that it keeps about kGR x kGC independent accumulators: 3 of them wait on the FMA
// latency. At most kGRMax rows (9: the method's P). x86-64-v3 build on Zen 4 (1 thread, CPU
// benchmark shape, fwd+bwd): 31.3-33.0 ms instead of 32.6-33.4 ms (3 alternating runs each).
constexpr int kGRMax = 9;
template <int NC>
constexpr int rows_for() {
  return std::max(kGR, std::min(kGRMax, (kGR * kGC + NC - 1) / NC));
}

// Rows [0, mr) against groups[0 .. NC), M <= mr < MR, by the tile of exactly mr rows.
template <int NC, int M, int MR>
inline void group_rest_rows(int mr, const float* a, int64_t K, const float* bg, const int32_t* groups, float* s,
                            int64_t lds) {
  if constexpr (M < MR) {
    if (mr == M) return group_tile<M, NC>(a, K, bg, groups, s, lds);
    group_rest_rows<NC, M + 1, MR>(mr, a, K, bg, groups, s, lds);
  }
}

// Rows [0, rows) against groups[0 .. NC): tiles of rows_for<NC>() rows, then the rest in one tile.
template <int NC>
inline void group_chunk(int64_t rows, const float* a, int64_t K, const float* bg, const int32_t* groups, float* s,
                        int64_t lds) {
  constexpr int MR = rows_for<NC>();
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) group_tile<MR, NC>(a + r * K, K, bg, groups, s + r * lds, lds);
  if (r < rows) group_rest_rows<NC, 1, MR>(static_cast<int>(rows - r), a + r * K, K, bg, groups, s + r * lds, lds);
}

// group_chunk<nc> for a runtime nc in [NC, kGC].
template <int NC = 1>
inline void group_chunk_of(int nc, int64_t rows, const float* a, int64_t K, const float* bg, const int32_t* groups,
                           float* s, int64_t lds) {
  if constexpr (NC <= kGC) {
    if (nc == NC) return group_chunk<NC>(rows, a, K, bg, groups, s, lds);
    group_chunk_of<NC + 1>(nc, rows, a, K, bg, groups, s, lds);
  }
}

// S[r, g .. g + 8) = A[r, :] @ Bt[:, g .. g + 8) for r < rows and each g in groups[0 .. n) (column
// offsets, multiples of 8 below ldb = padded(columns)), from Bg = pack_groups(Bt); S has leading
// dimension ldb; its other columns are not written.
inline void multiply_groups(const float* a, int64_t rows, int64_t K, const float* bg, int64_t ldb,
                            const int32_t* groups, int n, float* s) {
  for (int c = 0; c < n; c += kGC) group_chunk_of(std::min(kGC, n - c), rows, a, K, bg, groups + c, s, ldb);
}

// Bg (ldb / 8, K, 8) from Bt (K, ldb): each 8-column group of Bt as one contiguous K x 8 panel.
inline void pack_groups(const float* bt, int64_t K, int64_t ldb, float* bg) {
  for (int64_t c = 0; c < ldb; c += kH)
    for (int64_t k = 0; k < K; ++k) std::memcpy(bg + c * K + k * kH, bt + k * ldb + c, kH * sizeof(float));
}

// Bt (K, ldb) from B (cols, K) row-major: the transpose, zero-padded to ldb = padded(cols) columns;
// row c of B goes to column column[c] of Bt (a permutation of [0, cols)), or to column c.
inline void pack_transposed(const float* b, int64_t cols, int64_t K, int64_t ldb, float* bt,
                            const int64_t* column = nullptr) {
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < cols; ++c) bt[k * ldb + (column != nullptr ? column[c] : c)] = b[c * K + k];
    for (int64_t c = cols; c < ldb; ++c) bt[k * ldb + c] = 0.0f;
  }
}

}  // namespace row_gemm
}  // namespace concept_kernels
