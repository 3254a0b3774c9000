// Per-tile-pair math of the channel_attention CPU kernel (host only): the symmetric forward and
// backward of CAM = attention with q = -x, k = v = x, scale 1 over the C channels of one sample.
//
//   S_ij = -x_i . x_j (symmetric),  P = softmax_j(S),  O = P X,  lse_i = logsumexp_j S_ij
//   dS_ij = P_ij (dO_i . x_j - D_i),  D_i = dO_i . O_i
//   dx_k (before gamma and the residual) = sum_i P_ik dO_i - sum_m (dS_km + dS_mk) x_m
//
// Channels are cut into blocks of kTile; the work is the tile pairs (I, J), I <= J. One E = X_I X_Jᵀ
// tile serves both row blocks: P_IJ = exp(S_IJ - m_I) feeds row block I and P_JI (stored as its
// transpose, exp(S_IJ - m_J) column-wise) feeds row block J. Diagonal pairs (I == J) run the
// column side only. Per pair the forward does 3 GEMMs of kTile x kTile x N (1.5 per tile instead
// of flash attention's 2) and the backward 7 (3.5 instead of 5).
//
// Layouts (per sample, zero padded: channels to Cp = a multiple of kTile, positions to Np = a
// multiple of the SIMD lanes), chosen so that every GEMM has contiguous lanes (channel_attention_
// gemm.h): xr (Cp, Np) = X and xT = Xᵀ stored as panels (Cp / kTile, N, kTile) (block I's Xᵀ is
// one contiguous N x kTile panel: with a plain (N, Cp) layout the panel's rows would sit Cp apart,
// 8 KB for C = 2048, all in the same L1 sets), likewise dT / dr for dO. Results of block I as a
// row block accumulate in "row" form (Cp, Np), results of block J as a column block in "column"
// (panel) form; the launcher adds the two at the end. Padded channels are masked with -inf
// penalties where they would act as keys (pen_* vectors); as queries they are harmless rows of 0.
#pragma once

#include "channel_attention/channel_attention_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace concept_kernels {
namespace cam {

constexpr int kTile = 32;  // channels per block (a multiple of every lane count)

// Register blocks (rows x vectors) of the three GEMM shapes: kTile x kTile outputs over K = N
// ("inner"), N x kTile over K = kTile ("col" side), kTile x Np over K = kTile ("row" side).
// With AVX-512 (32 vector registers), measured on Zen 4 (1 thread, B = 2, C = 2048, N = 49): 6 x 4
// everywhere beat 4 x 4 by 5-12%; 4 x 7 on the row side and kTile = 64 (tiles leave L1) were slower.
// With 16 registers (AVX2) 6 x 4 spills accumulators to the stack in the inner loop; 6 x 2 (12
// accumulators + 2 operands + 1 broadcast) does not: an x86-64-v3 build on Zen 4 (1 thread, B = 8,
// C = 2048, N = 49, fwd+bwd, CPU time) took 258 ms instead of 364-373 ms; 4 x 3 and 3 x 4 were
// within the noise of 6 x 2.
template <typename T>
struct Blocks {
#if defined(__AVX512F__)
  static constexpr int kInnerR = 6, kInnerV = 4, kColR = 6, kColV = 4, kRowR = 6, kRowV = 4;
#else
  static constexpr int kInnerR = 6, kInnerV = 2, kColR = 6, kColV = 2, kRowR = 6, kRowV = 2;
#endif
};

// One sample's operands in the padded layouts above (dT / dr only in the backward).
template <typename T>
struct SampleView {
  int C, N, Cp, Np;
  const T* xT;  // (Cp / kTile, N, kTile) panels of Xᵀ
  const T* xr;  // (Cp, Np)
  const T* dT;  // panels of dOᵀ
  const T* dr;  // (Cp, Np) dO
  // offset of the panel of the block starting at channel c0, and of element (c, n) in panel form
  int64_t panel(int c0) const { return static_cast<int64_t>(c0) * N; }
  int64_t tpos(int c, int n) const { return panel(c - c % kTile) + static_cast<int64_t>(n) * kTile + c % kTile; }
};

// Forward online-softmax state of one part of a sample: running max m, sum l (Cp each) and the
// unnormalised output in row form (Cp, Np) and column (panel) form.
template <typename T>
struct FwdState {
  T* m;
  T* l;
  T* orow;
  T* ocol;
};

// Backward accumulators of one part: dx (before gamma) in row form (Cp, Np) and panel form.
template <typename T>
struct BwdState {
  T* drow;
  T* dcol;
};

// Positions per accumulation chain of the inner (K = N) GEMMs. One chain of N products carries a
// rounding error growing like N (N = H * W = 12,544 at 112 x 112 maps: 20x the error of the float32
// reference's sgemm), so longer sums run as chains of kNChain, each added into a double tile: the
// error then grows like kNChain, and the adds cost 1 / kNChain of the FMAs. N <= kNChain (7 x 7
// maps) keeps the single chain.
constexpr int kNChain = 64;

// Per-thread scratch: three kTile x kTile tiles, the chain tile and its double sum (inner GEMMs
// with N > kNChain), and the two penalty vectors.
template <typename T>
struct Scratch {
  alignas(64) T t0[kTile * kTile];
  alignas(64) T t1[kTile * kTile];
  alignas(64) T t2[kTile * kTile];
  alignas(64) T chain[kTile * kTile];
  alignas(64) double chain_sum[kTile * kTile];
  alignas(64) T pen_i[kTile];  // 0 for real channels of block I, -inf for padding
  alignas(64) T pen_j[kTile];
};

template <typename T>
inline T vexp_scalar(T x) {
  using S = Simd<T>;
  return vexp<typename S::V, typename S::VI>(broadcast<typename S::V>(x), T())[0];
}

template <typename T>
inline void set_penalties(T* pen, int c0, int C) {
  for (int i = 0; i < kTile; ++i) pen[i] = c0 + i < C ? T(0) : T(-INFINITY);
}

// out[i, j] = sum_n a[n, i0 + i] * b[n, j0 + j] over the N rows of two panel-form operands: one
// chain when N <= kNChain, else chains of kNChain positions summed in double (w.chain_sum).
template <typename T>
inline void inner_tile(const SampleView<T>& s, const T* a, int i0, const T* b, int j0, T* out, Scratch<T>& w) {
  constexpr int R = Blocks<T>::kInnerR, NV = Blocks<T>::kInnerV;
  a += s.panel(i0);
  b += s.panel(j0);
  if (s.N <= kNChain) {
    const Term<T> t[1] = {{a, 1, kTile, b, kTile, s.N}};
    return tile_gemm<T, R, NV, 1>(kTile, kTile, t, out, kTile, false);
  }
  for (int e = 0; e < kTile * kTile; ++e) w.chain_sum[e] = 0.0;
  for (int n0 = 0; n0 < s.N; n0 += kNChain) {
    const int64_t row = static_cast<int64_t>(n0) * kTile;  // panel row n0
    const Term<T> t[1] = {{a + row, 1, kTile, b + row, kTile, std::min(kNChain, s.N - n0)}};
    tile_gemm<T, R, NV, 1>(kTile, kTile, t, w.chain, kTile, false);
    for (int e = 0; e < kTile * kTile; ++e) w.chain_sum[e] += w.chain[e];
  }
  for (int e = 0; e < kTile * kTile; ++e) out[e] = static_cast<T>(w.chain_sum[e]);
}

// Online-softmax update of the row state k (running max m, sum l) with a new max candidate mx and
// the sum of exp(s - mx_new) that the caller computes after; returns the rescale factor of the old
// accumulators (exactly 1 when the max did not move).
template <typename T>
inline T move_max(T& m, T mx) {
  if (!(mx > m)) return T(1);
  const T alpha = vexp_scalar<T>(m - mx);
  m = mx;
  return alpha;
}

template <typename T>
inline void rescale_row(const SampleView<T>& s, const FwdState<T>& st, int c, T alpha) {
  if (alpha == T(1)) return;
  st.l[c] *= alpha;
  for (int n = 0; n < s.Np; ++n) st.orow[static_cast<int64_t>(c) * s.Np + n] *= alpha;
  for (int n = 0; n < s.N; ++n) st.ocol[s.tpos(c, n)] *= alpha;
}

// The SIMD parts of the pair math, sharing one set of vector types: V holds L lanes of T, a tile
// row is NV vectors.
template <typename T>
struct PairMath {
  using S = Simd<T>;
  using V = typename S::V;
  using VI = typename S::VI;
  static constexpr int L = S::kLanes, NV = kTile / L;

  // Forward, row side of pair (I, J), I < J: block I's queries against block J's keys.
  // E (t0) = X_I X_Jᵀ; P (t1) = exp(-E + pen_j - m_I) after moving m_I; orow_I += P xr_J.
  static void fwd_row_side(const SampleView<T>& s, const FwdState<T>& st, Scratch<T>& w, int i0, int j0) {
    for (int i = 0; i < kTile; ++i) {
      const T* e = w.t0 + i * kTile;
      T* p = w.t1 + i * kTile;
      V mx = broadcast<V>(T(-INFINITY));
      for (int v = 0; v < NV; ++v) {
        const V x = S::load(w.pen_j + v * L) - S::load(e + v * L);
        mx = sel<V, VI>(x > mx, x, mx);
      }
      const T alpha = move_max(st.m[i0 + i], Horizontal<T, L>::max(mx));
      rescale_row(s, st, i0 + i, alpha);
      const V m = broadcast<V>(st.m[i0 + i]);
      V sum = V{};
      for (int v = 0; v < NV; ++v) {
        const V x = vexp<V, VI>(S::load(w.pen_j + v * L) - S::load(e + v * L) - m, T());
        S::store(p + v * L, x);
        sum += x;
      }
      st.l[i0 + i] += Horizontal<T, L>::sum(sum);
    }
    const Term<T> t[1] = {{w.t1, kTile, 1, s.xr + static_cast<int64_t>(j0) * s.Np, s.Np, kTile}};
    T* out = st.orow + static_cast<int64_t>(i0) * s.Np;
    tile_gemm<T, Blocks<T>::kRowR, Blocks<T>::kRowV, 1>(kTile, s.Np, t, out, s.Np, true);
  }

  // Forward, column side of pair (I, J), I <= J: block J's queries against block I's keys, from the
  // same E (t0). P (t2)[i, j] = exp(-E[i, j] + pen_i - m_J[j]); ocol[:, J] += xT_I P.
  static void fwd_col_side(const SampleView<T>& s, const FwdState<T>& st, Scratch<T>& w, int i0, int j0) {
    V mx[NV], sum[NV];
    for (int v = 0; v < NV; ++v) mx[v] = broadcast<V>(T(-INFINITY));
    for (int i = 0; i < kTile; ++i) {
      const V pen = broadcast<V>(w.pen_i[i]);
      for (int v = 0; v < NV; ++v) {
        const V x = pen - S::load(w.t0 + i * kTile + v * L);
        mx[v] = sel<V, VI>(x > mx[v], x, mx[v]);
      }
    }
    for (int v = 0; v < NV; ++v)
      for (int q = 0; q < L; ++q) {
        const int j = v * L + q;
        rescale_row(s, st, j0 + j, move_max(st.m[j0 + j], mx[v][q]));
      }
    for (int v = 0; v < NV; ++v) {
      mx[v] = S::load(st.m + j0 + v * L);
      sum[v] = V{};
    }
    for (int i = 0; i < kTile; ++i) {
      const V pen = broadcast<V>(w.pen_i[i]);
      for (int v = 0; v < NV; ++v) {
        const V x = vexp<V, VI>(pen - S::load(w.t0 + i * kTile + v * L) - mx[v], T());
        S::store(w.t2 + i * kTile + v * L, x);
        sum[v] += x;
      }
    }
    for (int v = 0; v < NV; ++v) S::store(st.l + j0 + v * L, S::load(st.l + j0 + v * L) + sum[v]);
    const Term<T> t[1] = {{s.xT + s.panel(i0), kTile, 1, w.t2, kTile, kTile}};
    tile_gemm<T, Blocks<T>::kColR, Blocks<T>::kColV, 1>(s.N, kTile, t, st.ocol + s.panel(j0), kTile, true);
  }

  // The whole forward contribution of pair (I, J) = (i0 / kTile, j0 / kTile), i0 <= j0.
  static void fwd_pair(const SampleView<T>& s, const FwdState<T>& st, Scratch<T>& w, int i0, int j0) {
    set_penalties(w.pen_i, i0, s.C);
    set_penalties(w.pen_j, j0, s.C);
    inner_tile(s, s.xT, i0, s.xT, j0, w.t0, w);
    if (i0 != j0) fwd_row_side(s, st, w, i0, j0);
    fwd_col_side(s, st, w, i0, j0);
  }

  // The whole backward contribution of pair (I, J), i0 <= j0 (lse, delta: (Cp) of this sample).
  //   t0 = E = X_I X_Jᵀ, t1 = dO_I X_Jᵀ, t2 = X_I dO_Jᵀ, then in place:
  //   t0 <- P_ij = exp(S_ij - lse_i), t2 <- P_ji = exp(S_ij - lse_j),
  //   t1 <- -(dS_ij + dS_ji) = -(P_ij (t1 - D_i) + P_ji (t2 - D_j));
  //   dcol[:, J] += dT_I P_ij + xT_I t1;   (I < J) drow[I] += P_ji dr_J + t1 xr_J.
  static void bwd_pair(const SampleView<T>& s, const T* lse, const T* delta, const BwdState<T>& st, Scratch<T>& w,
                       int i0, int j0) {
    set_penalties(w.pen_i, i0, s.C);
    set_penalties(w.pen_j, j0, s.C);
    inner_tile(s, s.xT, i0, s.xT, j0, w.t0, w);
    inner_tile(s, s.dT, i0, s.xT, j0, w.t1, w);
    inner_tile(s, s.xT, i0, s.dT, j0, w.t2, w);
    for (int i = 0; i < kTile; ++i) {
      const V li = broadcast<V>(lse[i0 + i]), pi = broadcast<V>(w.pen_i[i]), di = broadcast<V>(delta[i0 + i]);
      for (int v = 0; v < NV; ++v) {
        const int o = i * kTile + v * L;
        const V sij = -S::load(w.t0 + o);
        const V pij = vexp<V, VI>(sij + S::load(w.pen_j + v * L) - li, T());
        const V pji = vexp<V, VI>(sij + pi - S::load(lse + j0 + v * L), T());
        const V nds = -(pij * (S::load(w.t1 + o) - di) + pji * (S::load(w.t2 + o) - S::load(delta + j0 + v * L)));
        S::store(w.t0 + o, pij);
        S::store(w.t1 + o, nds);
        S::store(w.t2 + o, pji);
      }
    }
    const int64_t pi = s.panel(i0);
    const Term<T> tc[2] = {{s.dT + pi, kTile, 1, w.t0, kTile, kTile}, {s.xT + pi, kTile, 1, w.t1, kTile, kTile}};
    tile_gemm<T, Blocks<T>::kColR, Blocks<T>::kColV, 2>(s.N, kTile, tc, st.dcol + s.panel(j0), kTile, true);
    if (i0 == j0) return;
    const int64_t jr = static_cast<int64_t>(j0) * s.Np;
    const Term<T> tr[2] = {{w.t2, kTile, 1, s.dr + jr, s.Np, kTile}, {w.t1, kTile, 1, s.xr + jr, s.Np, kTile}};
    T* out = st.drow + static_cast<int64_t>(i0) * s.Np;
    tile_gemm<T, Blocks<T>::kRowR, Blocks<T>::kRowV, 2>(kTile, s.Np, tr, out, s.Np, true);
  }
};

}  // namespace cam
}  // namespace concept_kernels
