// Host-only float GEMM for tall-skinny products S = A @ Bt, A (rows, K) row-major, Bt (K, ldb)
// column-packed (ldb a multiple of 8, zero-padded), S (rows, ldb). Register tiles of MR rows x
// 8*NC columns of GCC vector types (8 floats: one ymm with AVX2 / AVX-512VL), so it is compiled for
// whatever ISA the extension targets. Used where the product feeds a consumer that reads it at once
// from cache (ot_similarity: a chunk of bank rows against every query patch), which a BLAS call
// on the whole product cannot do; on the development machine it runs at the speed of MKL's sgemm
// for these shapes. Deterministic: each output is one k-ascending chain.
#pragma once

#if defined(__CUDACC__)
#error "row_gemm.h is host-only"
#endif

#include <cstdint>
#include <cstring>

namespace concept_kernels {
namespace row_gemm {

typedef float V8 __attribute__((vector_size(32)));

#if defined(__AVX512F__)
constexpr int kMR = 2;  // 2 x 9 accumulators + operands fit the 32 vector registers
#else
constexpr int kMR = 1;  // 16 registers
#endif
constexpr int kNC = 9;  // column vectors per tile: 72 columns (B*P at the method's B=8, P=9)

inline V8 load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int MR, int NC>
inline void tile(const float* a, int64_t K, const float* bt, int64_t ldb, float* s) {
  V8 acc[MR][NC] = {};
  for (int64_t k = 0; k < K; ++k) {
    V8 q[NC];
    for (int n = 0; n < NC; ++n) q[n] = load8(bt + k * ldb + 8 * n);
    for (int m = 0; m < MR; ++m) {
      const V8 x = V8{} + a[m * K + k];
      for (int n = 0; n < NC; ++n) acc[m][n] += x * q[n];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NC; ++n) std::memcpy(s + m * ldb + 8 * n, &acc[m][n], sizeof(V8));
}

// Columns [8*c0, 8*(c0 + NC)) of rows [0, rows).
template <int NC>
inline void column_block(const float* a, int64_t rows, int64_t K, const float* bt, int64_t ldb, float* s, int64_t c0) {
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR) tile<kMR, NC>(a + r * K, K, bt + 8 * c0, ldb, s + r * ldb + 8 * c0);
  for (; r < rows; ++r) tile<1, NC>(a + r * K, K, bt + 8 * c0, ldb, s + r * ldb + 8 * c0);
}

template <int NC = 1>
inline void remainder_block(int nc, const float* a, int64_t rows, int64_t K, const float* bt, int64_t ldb, float* s,
                            int64_t c0) {
  if constexpr (NC < kNC) {
    if (nc == NC) return column_block<NC>(a, rows, K, bt, ldb, s, c0);
    remainder_block<NC + 1>(nc, a, rows, K, bt, ldb, s, c0);
  }
}

// S (rows, ldb) = A (rows, K) @ Bt (K, ldb); ldb % 8 == 0.
inline void multiply(const float* a, int64_t rows, int64_t K, const float* bt, int64_t ldb, float* s) {
  const int64_t vecs = ldb / 8;
  int64_t c0 = 0;
  for (; c0 + kNC <= vecs; c0 += kNC) column_block<kNC>(a, rows, K, bt, ldb, s, c0);
  if (c0 < vecs) remainder_block(static_cast<int>(vecs - c0), a, rows, K, bt, ldb, s, c0);
}

// Bt (K, ldb) from B (cols, K) row-major: the transpose, zero-padded to ldb columns.
inline void pack_transposed(const float* b, int64_t cols, int64_t K, int64_t ldb, float* bt) {
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < cols; ++c) bt[k * ldb + c] = b[c * K + k];
    for (int64_t c = cols; c < ldb; ++c) bt[k * ldb + c] = 0.0f;
  }
}

}  // namespace row_gemm
}  // namespace concept_kernels
