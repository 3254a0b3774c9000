// SIMD form (host only) of the per-problem Sinkhorn of ot_similarity_problem.h: the same math,
// update for update (same stabilisation thresholds, same absorption and log-domain fallbacks), with
// the lanes of a P x P plan held in GCC vector types (vector_size) so that every hot loop is
// explicit SIMD whatever the auto-vectoriser decides. MAXP = 8 or 16 lanes: with AVX-512
// a 16-float row is one zmm register; with AVX2 or the baseline, wider-than-hardware
// vectors are split by the compiler (correct, slower). Rows C[i] (lanes j) and their transposes
// CT[j] (lanes i) let both half steps run over contiguous lanes: s = sum_j KT[j] v_j,
// t = sum_i K[i] u_i. Sums use two partial chains / trees where the scalar form sums in one chain,
// so the two forms agree to rounding, not bitwise.
//
// Dot products of the cost: 3 x 3 tiles of 32-byte partial-sum vectors (6 loads per 9 FMAs),
// reduced in a fixed tree.
#pragma once

#if defined(__CUDACC__)
#error "ot_similarity_simd.h is host-only (GCC vector extensions); CUDA uses ot_similarity_problem.h"
#endif

#include "common/simd.h"
#include "ot_similarity/ot_similarity_problem.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace concept_kernels {
namespace ot {

// FIXP > 0: P is known at compile time (= FIXP; the launcher specialises P = 9, the method's 3x3
// patch grid) so that loops over rows unroll exactly; FIXP = 0: runtime P.
template <typename T, int MAXP, int FIXP = 0>
struct SinkhornSimd {
  static_assert(FIXP >= 0 && FIXP <= MAXP, "FIXP must fit the lanes");
  using V = typename Vec<T, MAXP>::type;
  using VI = typename Vec<T, MAXP>::itype;
  static constexpr int L = 32 / sizeof(T);  // lanes of the dot-product partial sums
  using W = typename Vec<T, L>::type;

  int P;
  T eps, inv_eps, log_a, a;
  V C[MAXP], CT[MAXP];  // C[i] lanes j; CT[j] lanes i
  V K[MAXP], KT[MAXP];  // exp((f0_i + g0_j - C_ij)/eps) in both layouts, valid when k_valid
  V f0, g0, u, lu, v;   // f = f0 + eps lu, g = g0 + eps log v
  VI in;                // lane < P
  bool k_valid;

  static V ex(V x) { return vexp<V, VI>(x, T()); }
  static V lg(V x) { return vlog<V, VI>(x, T()); }
  V ones_in() const { return sel<V, VI>(in, splat<V>(T(1)), V{}); }
  V or_one(V x) const { return sel<V, VI>(in, x, splat<V>(T(1))); }  // lanes >= P -> 1
  V only_in(V x) const { return sel<V, VI>(in, x, V{}); }            // lanes >= P -> 0
  static V vabs(V x) { return sel<V, VI>(x < 0, -x, x); }
  static V vmax(V x, V y) { return sel<V, VI>(x > y, x, y); }
  int np() const { return FIXP > 0 ? FIXP : P; }  // rows/lanes in use
  // min and max over the lanes < P of x (NaN lanes make the range checks below fail)
  void lane_range(V x, T& mn, T& mx) const {
    const V y = sel<V, VI>(in, x, splat<V>(x[0]));
    mn = Horizontal<T, MAXP>::min(y);
    mx = Horizontal<T, MAXP>::max(y);
    if (mn != mn || mx != mx) mn = mx = NAN;
  }

  void setup(int P_, T eps_) {
    P = P_;
    eps = eps_;
    inv_eps = T(1) / eps_;
    a = T(1) / T(P_);
    log_a = -ck_log(T(P_));
    for (int l = 0; l < MAXP; ++l) in[l] = l < P_ ? -1 : 0;
  }

  static W loadw(const T* p) {
    W w;
    std::memcpy(&w, p, sizeof w);
    return w;
  }
  static T hsum(W w) {
    for (int s = L / 2; s >= 1; s /= 2)
      for (int l = 0; l < s; ++l) w[l] += w[l + s];
    return w[0];
  }
  static T dot1(const T* x, const T* y, int D) {
    W acc{};
    int d = 0;
    for (; d + L <= D; d += L) acc += loadw(x + d) * loadw(y + d);
    T tail = 0;
    for (; d < D; ++d) tail += x[d] * y[d];
    return hsum(acc) + tail;
  }
  void tile3(const T* x, const T* y, int D, int i0, int j0) {
    W acc[3][3] = {};
    int d = 0;
    for (; d + L <= D; d += L) {
      const W x0 = loadw(x + d), x1 = loadw(x + D + d), x2 = loadw(x + 2 * D + d);
      const W y0 = loadw(y + d), y1 = loadw(y + D + d), y2 = loadw(y + 2 * D + d);
      acc[0][0] += x0 * y0, acc[0][1] += x0 * y1, acc[0][2] += x0 * y2;
      acc[1][0] += x1 * y0, acc[1][1] += x1 * y1, acc[1][2] += x1 * y2;
      acc[2][0] += x2 * y0, acc[2][1] += x2 * y1, acc[2][2] += x2 * y2;
    }
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < 3; ++c) {
        T tail = 0;
        for (int e = d; e < D; ++e) tail += x[r * D + e] * y[c * D + e];
        C[i0 + r][j0 + c] = T(1) - (hsum(acc[r][c]) + tail);
      }
  }

  void set_cost(const T* x, const T* y, int D) {
    for (int i = 0; i < MAXP; ++i) C[i] = V{};
    int i0 = 0;
    for (; i0 + 3 <= P; i0 += 3) {
      int j0 = 0;
      for (; j0 + 3 <= P; j0 += 3) tile3(x + i0 * D, y + j0 * D, D, i0, j0);
      for (int i = i0; i < i0 + 3; ++i)
        for (int j = j0; j < P; ++j) C[i][j] = T(1) - dot1(x + i * D, y + j * D, D);
    }
    for (int i = i0; i < P; ++i)
      for (int j = 0; j < P; ++j) C[i][j] = T(1) - dot1(x + i * D, y + j * D, D);
    transpose_cost();
  }
  void transpose_cost() {
    for (int j = 0; j < MAXP; ++j) CT[j] = V{};
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j) CT[j][i] = C[i][j];
  }
  void load_cost(const T* Cc) {
    for (int i = 0; i < MAXP; ++i) C[i] = V{};
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j) C[i][j] = Cc[i * P + j];
    transpose_cost();
  }
  void store_cost(T* Cc) const {
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j) Cc[i * P + j] = C[i][j];
  }
  T cost_at(int flat) const { return C[flat / np()][flat % np()]; }

  void load_potentials(const T* f, const T* g) {
    f0 = V{};
    g0 = V{};
    for (int l = 0; l < P; ++l) {
      f0[l] = f ? f[l] : T(0);
      g0[l] = g ? g[l] : T(0);
    }
    u = v = ones_in();
    lu = V{};
    k_valid = false;
  }
  void fold() {
    f0 = f0 + eps * lu;
    g0 = g0 + eps * lg(or_one(v));
    u = v = ones_in();
    lu = V{};
    k_valid = false;
  }
  void store_potentials(T* f, T* g) {
    fold();
    for (int l = 0; l < P; ++l) {
      f[l] = f0[l];
      g[l] = g0[l];
    }
  }

  void rebuild_kernel() {
    for (int i = 0, n = np(); i < n; ++i) {
      K[i] = only_in(ex(((f0[i] + g0) - C[i]) * inv_eps));
      KT[i] = only_in(ex(((f0 + g0[i]) - CT[i]) * inv_eps));  // lane l: K[l][i], bitwise
    }
    k_valid = true;
  }

  T f_step_log() {
    g0 = g0 + eps * lg(or_one(v));
    v = ones_in();
    V mx = splat<V>(-INFINITY);
    const int n = np();
    for (int j = 0; j < n; ++j) {
      const V x = (g0[j] - CT[j]) * inv_eps;
      mx = vmax(x, mx);
    }
    V sum{};
    for (int j = 0; j < n; ++j) sum += ex((g0[j] - CT[j]) * inv_eps - mx);
    const V fn = only_in(eps * (log_a - (mx + lg(or_one(sum)))));
    const V d = fn - (f0 + eps * lu);
    const T err = Horizontal<T, MAXP>::sum(only_in(vabs(d)));
    f0 = fn;
    u = ones_in();
    lu = V{};
    k_valid = false;
    return err;
  }

  void g_step_log() {
    f0 = f0 + eps * lu;
    u = ones_in();
    lu = V{};
    V mx = splat<V>(-INFINITY);
    const int n = np();
    for (int i = 0; i < n; ++i) {
      const V x = (f0[i] - C[i]) * inv_eps;
      mx = vmax(x, mx);
    }
    V sum{};
    for (int i = 0; i < n; ++i) sum += ex((f0[i] - C[i]) * inv_eps - mx);
    g0 = only_in(eps * (log_a - (mx + lg(or_one(sum)))));
    v = ones_in();
    k_valid = false;
  }

  // s = sum_j KT[j] v_j (or t = sum_i K[i] u_i) with two partial sums (even / odd terms) to halve
  // the dependency chain; the scalar solver sums in one chain (rounding-level differences).
  V matvec(const V* rows, V w) const {
    V s0{}, s1{};
    const int n = np();
    int j = 0;
    for (; j + 1 < n; j += 2) {
      s0 += rows[j] * w[j];
      s1 += rows[j + 1] * w[j + 1];
    }
    if (j < n) s0 += rows[j] * w[j];
    return s0 + s1;
  }

  T f_step() {
    if (!k_valid) return f_step_log();
    const V s = matvec(KT, v);
    T mn, mx;  // s in the safe range, and u' = a / s within [1/tau, tau] (s in [a/tau, a tau])
    lane_range(s, mn, mx);
    if (!(mn >= Limits<T>::kSumLo && mx <= Limits<T>::kSumHi)) return f_step_log();
    const V un = only_in(a / or_one(s));
    const V lun = only_in(lg(or_one(un)));
    const T err = Horizontal<T, MAXP>::sum(only_in(vabs(lun - lu))) * eps;
    if (mn >= a / Limits<T>::kTau && mx <= a * Limits<T>::kTau) {
      u = un;
      lu = lun;
    } else {
      f0 = f0 + eps * lun;
      u = ones_in();
      lu = V{};
      k_valid = false;
    }
    return err;
  }

  void g_step() {
    if (!k_valid) rebuild_kernel();
    const V t = matvec(K, u);
    T mn, mx;
    lane_range(t, mn, mx);
    if (!(mn >= Limits<T>::kSumLo && mx <= Limits<T>::kSumHi)) {
      g_step_log();
      return;
    }
    const V vn = only_in(a / or_one(t));
    if (mn >= a / Limits<T>::kTau && mx <= a * Limits<T>::kTau) {
      v = vn;
    } else {
      g0 = g0 + eps * lg(or_one(vn));
      v = ones_in();
      k_valid = false;
    }
  }

  T step() {
    const T err = f_step();
    g_step();
    return err;
  }

  int solve(int max_iter, T tol) {
    int it = 0;
    while (it < max_iter) {
      const T err = step();
      ++it;
      if (err < tol) break;
    }
    return it;
  }

  // The k first entries of the ranking (log pi descending, ties: lowest flat index) into idx, by
  // k branch-free vectorised arg-max passes over the plan's rows (each lane keeps its earliest row
  // reaching the lane maximum; the lowest flat index among the lanes at the overall maximum wins).
  // Same result as select_topk_insert / next_ranked.
  void select_topk(int k, int* idx) const {
    const int n = np();
    const V neg = splat<V>(T(-INFINITY)), inf = splat<V>(T(INFINITY));
    V lane{};
    for (int l = 0; l < MAXP; ++l) lane[l] = T(l);
    V R[MAXP];
    for (int i = 0; i < n; ++i) R[i] = sel<V, VI>(in, ((f0[i] + g0) - C[i]) / eps, neg);
    for (int r = 0; r < k; ++r) {
      V mx = R[0], row{};
      for (int i = 1; i < n; ++i) {
        const VI better = R[i] > mx;
        mx = sel<V, VI>(better, R[i], mx);
        row = sel<V, VI>(better, splat<V>(T(i)), row);
      }
      const T m = Horizontal<T, MAXP>::max(mx);
      const T ef = Horizontal<T, MAXP>::min(sel<V, VI>(in & (mx == m), row * T(n) + lane, inf));
      const int e = ef < T(n * n) ? static_cast<int>(ef) : 0;  // 0 only with NaN in the plan
      idx[r] = e;
      R[e / n][e % n] = T(-INFINITY);
    }
  }

  void log_plan(T* lp) const {
    for (int i = 0; i < P; ++i) {
      const V row = ((f0[i] + g0) - C[i]) / eps;
      for (int j = 0; j < P; ++j) lp[i * P + j] = row[j];
    }
  }
};

}  // namespace ot
}  // namespace concept_kernels
