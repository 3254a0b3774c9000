// Lane form (host only, float) of the per-problem Sinkhorn of ot_similarity_problem.h: NL problems
// at once, ONE PROBLEM PER SIMD LANE (NL = 8 or 16 below). Entry (i, j) of the NL cost matrices is
// one vector, so a half step is P*P vector FMAs with no padding of 9 to 16 and no horizontal
// reductions, and the exp/log work of the rare log-domain steps runs on full vectors. Same math,
// update for update, as Sinkhorn / SinkhornSimd (same absorption thresholds and log-domain
// fallbacks), decided per lane: a step whose sums leave the safe range, or a lane whose kernel must
// be rebuilt, takes the log-domain path for that lane only (computed for the vector, blended into
// the lanes that need it). Stopping is per lane (stop="problem"): a lane freezes after the
// iteration whose err < tol; the group runs until its last lane stops or max_iter. The lane and
// per-problem forms agree to rounding (sums in two chains here, exps reused at the log-domain
// steps); the 8- and 16-lane groups give bitwise the same results (tested).
//
// Used by the CPU launcher for float inputs: stop="problem" (its hot path) and the group rules
// stop="row" / "all" (ot_similarity_group_lanes.h, which reads each lane's err per iteration);
// double inputs keep the per-problem forms.
#pragma once

#if defined(__CUDACC__)
#error "ot_similarity_lanes.h is host-only (GCC vector extensions)"
#endif

#include "ot_similarity/ot_similarity_problem.h"
#include "ot_similarity/ot_similarity_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX__)
#include <immintrin.h>
#endif

// Problems per lane group: NL = 8 (one ymm register with AVX2 / AVX-512VL, two xmm on the x86-64
// baseline) or 16 (one zmm, AVX-512 builds). The launcher takes 16 where 512-bit FMAs run at full
// width (cpu_features.h; on Zen 5 the iterations took 3.1 instead of 4.5 ms at the CPU benchmark
// shape, although a group waits for the slowest of 16 problems: 40 vs 35 iterations per group at
// a mean of 24) and 8 elsewhere. On Zen 4, which halves 512-bit operations, 16 lanes measured 2x
// slower (in a build whose 16-lane gathers and lane tests were still scalar loops; not remeasured).
namespace concept_kernels {
namespace ot {

// NLANES: problems per group (8 or 16). FIXP > 0: P known at compile time (the launcher
// specialises P = 9); FIXP = 0: runtime P.
template <int NLANES, int FIXP = 0>
struct SinkhornLanes {
  static constexpr int NL = NLANES;
  static constexpr int CAP = FIXP > 0 ? FIXP : kMaxP;       // rows/columns capacity
  using V = typename Vec<float, NL>::type;
  using VI = typename Vec<float, NL>::itype;
  using Lim = Limits<float>;

  int P;
  float eps, inv_eps, a, log_a;
  V C[CAP * CAP], K[CAP * CAP];  // entry (i, j) of every lane's cost / kernel
  V f0[CAP], g0[CAP], u[CAP], v[CAP];  // f = f0 + eps log u, g = g0 + eps log v
  VI kvalid;  // lanes whose K matches (f0, g0)
  VI live;    // lanes still iterating

  int np() const { return FIXP > 0 ? FIXP : P; }
  static V ex(V x) { return vexp<V, VI>(x, 0.0f); }
  static V lg(V x) { return vlog<V, VI>(x, 0.0f); }
  // (the lane vector is one hardware register, so ?: is one blend instruction)
  static V vabs(V x) { return x < 0 ? -x : x; }
  static V vmin(V x, V y) { return x < y ? x : y; }
  static V vmax(V x, V y) { return x > y ? x : y; }
  static bool any(VI m) {
#if defined(__AVX512F__)
    if constexpr (NL == 16) return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#endif
#if defined(__AVX__)
    if constexpr (NL == 8) return _mm256_movemask_ps((__m256)m) != 0;
#endif
    for (int l = 0; l < NL; ++l)
      if (m[l]) return true;
    return false;
  }
  static V blend(VI m, V x, V old) { return m ? x : old; }
  // The range of a half step's P sums in each lane: safe = all within [kSumLo, kSumHi] (the
  // multiplicative update is exact there), small = all within [a/tau, a tau] (the scalings a/sum
  // stay in [1/tau, tau]). A NaN sum fails both (probe carries it: min/max would drop it).
  struct Range {
    V lo = V{} + INFINITY, hi = V{} - INFINITY, probe{};
    void add(V x) {
      lo = vmin(x, lo);
      hi = vmax(x, hi);
      probe += x;
    }
  };
  void range_masks(const Range& r, VI& safe, VI& small) const {
    const V sum_lo = V{} + Lim::kSumLo, sum_hi = V{} + Lim::kSumHi;
    const V s_lo = V{} + a / Lim::kTau, s_hi = V{} + a * Lim::kTau;
    safe &= (r.lo >= sum_lo) & (r.hi <= sum_hi) & (r.probe == r.probe);
    small &= (r.lo >= s_lo) & (r.hi <= s_hi);
  }

  void setup(int P_, float eps_) {
    P = P_;
    eps = eps_;
    inv_eps = 1.0f / eps_;
    a = 1.0f / static_cast<float>(P_);
    log_a = -ck_log(static_cast<float>(P_));
  }

  // x[l] = base[idx[l]] (the hardware gather with AVX2)
  static V gather(const float* base, VI idx) {
#if defined(__AVX512F__)
    if constexpr (NL == 16) return (V)_mm512_i32gather_ps((__m512i)idx, base, 4);
#endif
#if defined(__AVX2__)
    if constexpr (NL == 8) return (V)_mm256_i32gather_ps(base, (__m256i)idx, 4);
#endif
    V x;
    for (int l = 0; l < NL; ++l) x[l] = base[idx[l]];
    return x;
  }

  // The costs of problems probs[0 .. used) into lanes [0, used); the other lanes repeat lane 0 (so
  // that no lane computes on garbage) and never iterate. From the GEMM's similarities with one
  // gather per entry (A.sim, a chunk small enough for int32 offsets), else dot products.
  void load_costs(const FwdArgs<float>& A, const int64_t* probs, int used) {
    const int p = np();
    if (A.sim != nullptr) {
      // lane l: offset of <bank[r, 0], query[b, i]> in sim, i < sim_own (own) or not (rest), minus i
      VI own{}, rest{};
      for (int l = 0; l < NL; ++l) {
        const int64_t q = probs[l < used ? l : 0], b = q / A.M, row = (A.index[q] - A.sim_r0) * p * A.sim_ld;
        own[l] = static_cast<int32_t>(row + sim_column(A, b, 0));
        rest[l] = static_cast<int32_t>(row + sim_column(A, b, p - 1) - (p - 1));
      }
      for (int i = 0; i < p; ++i) {
        const VI col = (i < A.sim_own ? own : rest) + i;
        for (int j = 0; j < p; ++j) C[i * p + j] = 1.0f - gather(A.sim, col + static_cast<int32_t>(j * A.sim_ld));
      }
    } else {
      float c[CAP * CAP];
      for (int l = 0; l < NL; ++l) {
        if (l < used || l == used) problem_cost(A, probs[l < used ? l : 0], c);  // idle: lane 0's
        for (int e = 0; e < p * p; ++e) C[e][l] = c[e];
      }
    }
    reset(used);
  }

  // The start of a solve (f = g = 0) with lanes [0, used) live.
  void reset(int used) {
    for (int l = 0; l < NL; ++l) live[l] = l < used ? -1 : 0;
    for (int i = 0; i < np(); ++i) f0[i] = g0[i] = V{}, u[i] = v[i] = V{} + 1.0f;
    kvalid = VI{};
  }

  // The solve's whole state (costs, kernel, potentials, masks: state_vectors(P) vectors) to / from
  // d, for the group driver, which resumes lane groups later. Restoring gives bitwise the state
  // that was stored (setup() first).
  static int state_vectors(int p) { return 2 * p * p + 4 * p + 2; }
  void store_state(V* d) const {
    const int p = np(), pp = p * p;
    std::copy(C, C + pp, d);
    std::copy(K, K + pp, d + pp);
    d += 2 * pp;
    for (const V* x : {f0, g0, u, v}) d = std::copy(x, x + p, d);
    d[0] = (V)kvalid;  // (bit casts: same-size vector types)
    d[1] = (V)live;
  }
  void load_state(const V* d) {
    const int p = np(), pp = p * p;
    std::copy(d, d + pp, C);
    std::copy(d + pp, d + 2 * pp, K);
    d += 2 * pp;
    for (V* x : {f0, g0, u, v}) std::copy(d, d + p, x), d += p;
    kvalid = (VI)d[0];
    live = (VI)d[1];
  }

  // f_i = eps (log a - LSE_j((g_j - C_ij)/eps)) for every lane, with max-subtraction. In the lanes
  // m it also leaves the kernel of the new potentials in K: exp((f_i + g_j - C_ij)/eps) =
  // (a / sum_i) exp((g_j - C_ij)/eps - max_i), from the exps the LSE took anyway (the per-problem
  // forms recompute them: same values to rounding).
  void c_transform_rows(const V* g, V* out, VI m) {
    const int p = np();
    for (int i = 0; i < p; ++i) {
      V mx = V{} - INFINITY;
      for (int j = 0; j < p; ++j) mx = vmax((g[j] - C[i * p + j]) * inv_eps, mx);
      V sum{};
      for (int j = 0; j < p; ++j) {
        const V e = ex((g[j] - C[i * p + j]) * inv_eps - mx);
        sum += e;
        K[i * p + j] = blend(m, e, K[i * p + j]);
      }
      const V scale = a / sum;
      for (int j = 0; j < p; ++j) K[i * p + j] = blend(m, K[i * p + j] * scale, K[i * p + j]);
      out[i] = eps * (log_a - (mx + lg(sum)));
    }
    kvalid |= m;
  }
  void c_transform_cols(const V* f, V* out) const {
    const int p = np();
    for (int j = 0; j < p; ++j) {
      V mx = V{} - INFINITY;
      for (int i = 0; i < p; ++i) mx = vmax((f[i] - C[i * p + j]) * inv_eps, mx);
      V sum{};
      for (int i = 0; i < p; ++i) sum += ex((f[i] - C[i * p + j]) * inv_eps - mx);
      out[j] = eps * (log_a - (mx + lg(sum)));
    }
  }

  void rebuild_kernel(VI m) {
    const int p = np();
    for (int i = 0; i < p; ++i)
      for (int j = 0; j < p; ++j) K[i * p + j] = blend(m, ex(((f0[i] + g0[j]) - C[i * p + j]) * inv_eps), K[i * p + j]);
    kvalid |= m;
  }

  // What f_step computes besides the update (the update itself is the same in every mode):
  // kStopTol: the lanes that stop (err < tol, stop="problem"); kErr: every live lane's err (the
  // group rules, which sum err over a group); kNoErr: nothing (a known number of iterations).
  enum Mode { kStopTol, kErr, kNoErr };

  // The f half step of the live lanes; returns the lanes that stop (kStopTol, else none).
  //
  // err = eps sum_i |log r_i| with r_i = u_i'/u_i = a/(s_i u_i), the change of f_i over eps.
  // kStopTol: the exact err needs P logs per iteration; the bracket 1 - min(r, 1/r) <= |log r| <=
  // max(r, 1/r) - 1 needs none and decides almost every lane (the err of a running problem is far
  // above tol, of a converged one far below), so logs are taken only for the lanes the bracket
  // leaves open (within the rounding margin of the sums). The decision is the exact err's, not an
  // approximation. kErr: err = eps log prod_i max(r_i, 1/r_i) (= eps sum_i |log r_i|: one log per
  // lane instead of P; the product's rounding, ~P ulp, moves err by ~eps P 6e-8, the size of the
  // rounding of the P logs' sum), or the P logs in the lanes where the product leaves [1, 1e30].
  template <Mode MODE = kStopTol>
  VI f_step(float tol, V* err_out = nullptr) {
    const int p = np();
    V s[CAP];
    Range range;
    for (int i = 0; i < p; ++i) {
      V acc0{}, acc1{};  // two chains: the half step is latency-bound (it depends on the last one)
      int j = 0;
      for (; j + 1 < p; j += 2) acc0 += K[i * p + j] * v[j], acc1 += K[i * p + j + 1] * v[j + 1];
      if (j < p) acc0 += K[i * p + j] * v[j];
      s[i] = acc0 + acc1;
      range.add(s[i]);
    }
    VI safe = live & kvalid, small = safe;
    range_masks(range, safe, small);
    // multiplicative where the kernel is valid and the sums are safe, kept as scalings while they
    // stay within [1/tau, tau], else absorbed into f0
    const VI mult = safe, keep = small & safe, absorb = mult & ~keep;
    V r[CAP], un[CAP], sum_min{}, sum_max{}, prod = V{} + 1.0f;
    const V fp = V{} + static_cast<float>(p);
    for (int i = 0; i < p; ++i) {
      const V q = s[i] * u[i];
      r[i] = a / q;
      un[i] = r[i] * u[i];  // = a / s_i (one division per entry instead of two)
      const V r_inv = q * fp;
      if constexpr (MODE == kStopTol) {
        sum_min += vmin(r[i], r_inv);
        sum_max += vmax(r[i], r_inv);
      }
      if constexpr (MODE == kErr) prod *= vmax(r[i], r_inv);
    }
    const V tolv = V{} + tol;
    VI stop{};
    if constexpr (MODE == kStopTol) {
      const V margin = V{} + eps * static_cast<float>(p) * 4e-7f;
      const V err_lo = eps * (fp - sum_min), err_hi = eps * (sum_max - fp);
      stop = err_hi + margin < tolv;
      const VI open = mult & ~stop & ~(err_lo - margin >= tolv);
      if (any(open)) {
        V err{};
        for (int i = 0; i < p; ++i) err += vabs(lg(r[i]));
        stop = sel<VI, VI>(open, eps * err < tolv, stop);
      }
      stop &= mult;
    }
    if constexpr (MODE == kErr) {
      V err = eps * lg(prod);
      const VI wide = mult & ~(prod <= 1e30f);  // (NaN too: its logs give NaN again)
      if (any(wide)) {
        V sum{};
        for (int i = 0; i < p; ++i) sum += vabs(lg(r[i]));
        err = blend(wide, eps * sum, err);
      }
      *err_out = err;
    }
    const bool any_absorb = any(absorb);
    for (int i = 0; i < p; ++i) {
      u[i] = blend(keep, un[i], u[i]);
      if (any_absorb) {
        f0[i] = blend(absorb, f0[i] + eps * lg(un[i]), f0[i]);
        u[i] = blend(absorb, V{} + 1.0f, u[i]);
      }
    }
    kvalid &= ~absorb;
    const VI logm = live & ~mult;
    if (any(logm)) {
      const V err = f_step_log(logm);
      if constexpr (MODE == kStopTol) stop = sel<VI, VI>(logm, err < tolv, stop);
      if constexpr (MODE == kErr) *err_out = blend(logm, err, *err_out);
    }
    return stop;
  }

  // The log-domain f half step of the lanes m (g's scalings folded first, the kernel rebuilt for the
  // new potentials); returns err.
  V f_step_log(VI m) {
    const int p = np();
    V fn[CAP];
    for (int j = 0; j < p; ++j) {
      g0[j] = blend(m, g0[j] + eps * lg(v[j]), g0[j]);
      v[j] = blend(m, V{} + 1.0f, v[j]);
    }
    c_transform_rows(g0, fn, m);  // K valid again in the lanes m
    V err{};
    for (int i = 0; i < p; ++i) {
      err += vabs(fn[i] - (f0[i] + eps * lg(u[i])));
      f0[i] = blend(m, fn[i], f0[i]);
      u[i] = blend(m, V{} + 1.0f, u[i]);
    }
    return err;
  }

  void g_step() {
    const int p = np();
    const VI stale = live & ~kvalid;
    if (any(stale)) rebuild_kernel(stale);
    V t[CAP];
    Range range;
    for (int j = 0; j < p; ++j) {
      V acc0{}, acc1{};
      int i = 0;
      for (; i + 1 < p; i += 2) acc0 += K[i * p + j] * u[i], acc1 += K[(i + 1) * p + j] * u[i + 1];
      if (i < p) acc0 += K[i * p + j] * u[i];
      t[j] = acc0 + acc1;
      range.add(t[j]);
    }
    VI safe = live, small = live;
    range_masks(range, safe, small);
    const VI mult = safe, keep = small & safe, absorb = mult & ~keep;
    const bool any_absorb = any(absorb);
    for (int j = 0; j < p; ++j) {
      const V vn = a / t[j];
      v[j] = blend(keep, vn, v[j]);
      if (any_absorb) {
        g0[j] = blend(absorb, g0[j] + eps * lg(vn), g0[j]);
        v[j] = blend(absorb, V{} + 1.0f, v[j]);
      }
    }
    kvalid &= ~absorb;
    const VI logm = live & ~mult;
    if (any(logm)) g_step_log(logm);
  }

  void g_step_log(VI m) {
    const int p = np();
    V gn[CAP];
    for (int i = 0; i < p; ++i) {
      f0[i] = blend(m, f0[i] + eps * lg(u[i]), f0[i]);
      u[i] = blend(m, V{} + 1.0f, u[i]);
    }
    c_transform_cols(f0, gn);
    for (int j = 0; j < p; ++j) {
      g0[j] = blend(m, gn[j], g0[j]);
      v[j] = blend(m, V{} + 1.0f, v[j]);
    }
    kvalid &= ~m;
  }

  // One iteration of the live lanes; a lane stops after the iteration whose err < tol.
  void iterate(float tol) {
    const VI stop = f_step(tol);
    g_step();
    live &= ~stop;
  }
  bool running() const { return any(live); }
  // One iteration of the live lanes for the group rules: each lane's err (kErr), or none.
  V iterate_err() {
    V err;
    f_step<kErr>(0.0f, &err);
    g_step();
    return err;
  }
  void iterate_no_err() {
    f_step<kNoErr>(0.0f);
    g_step();
  }

  // Iterate G groups to their lanes' own stops or max_iter. Stepping them in turn lets the
  // out-of-order core overlap their dependency chains (a half step waits for the previous one).
  template <int G>
  static void iterate_groups(SinkhornLanes* x, int max_iter, float tol) {
    for (int it = 0; it < max_iter; ++it) {
      bool any_running = false;
      for (int h = 0; h < G; ++h)
        if (x[h].running()) x[h].iterate(tol), any_running = true;
      if (!any_running) break;
    }
  }

  // Fold the scalings into the potentials and write lp[e] = eps log pi_e = f_i + g_j - C_ij, or
  // log pi_e itself when `scaled`. Ranking needs no division per entry: x -> x / eps (eps > 0,
  // correctly rounded) never reverses an order, so eps log pi ranks as log pi does (it can only
  // keep apart two entries the division would round to a tie).
  void log_plan(V* lp, bool scaled) {
    const int p = np();
    for (int i = 0; i < p; ++i) {
      f0[i] = f0[i] + eps * lg(u[i]);
      g0[i] = g0[i] + eps * lg(v[i]);
    }
    for (int i = 0; i < p; ++i)
      for (int j = 0; j < p; ++j) lp[i * p + j] = (f0[i] + g0[j]) - C[i * p + j];
    if (scaled)
      for (int e = 0; e < p * p; ++e) lp[e] = lp[e] / eps;
  }

  // rank[r] (lanes) = flat index of the r-th largest entry of lp, r < k (ties: lowest flat index,
  // the contract's order): k arg-max passes, each dropping the previous pass's winner. Each pass
  // runs kChains independent compare chains (entries e = c mod kChains) merged at the end, so it is
  // not one serial dependency chain of P*P compares. lp is consumed. NaN entries never win; a lane
  // of NaN reports entry 0.
  void ranked(V* lp, int k, VI* rank) const {
    constexpr int kChains = 4;
    const int n = np() * np();
    VI prev = VI{} - 1;
    for (int r = 0; r < k; ++r) {
      V best[kChains];
      VI arg[kChains];
      for (int c = 0; c < kChains; ++c) best[c] = V{} - INFINITY, arg[c] = VI{} + n;
      for (int e0 = 0; e0 < n; e0 += kChains)
        for (int c = 0; c < kChains && e0 + c < n; ++c) {
          const int e = e0 + c;
          const V x = prev == e ? V{} - INFINITY : lp[e];
          lp[e] = x;
          const VI better = x > best[c];
          best[c] = better ? x : best[c];
          arg[c] = better ? VI{} + e : arg[c];
        }
      for (int c = 1; c < kChains; ++c) {  // merge: larger value, or equal value and lower index
        const VI better = (best[c] > best[0]) | ((best[c] == best[0]) & (arg[c] < arg[0]));
        best[0] = better ? best[c] : best[0];
        arg[0] = better ? arg[c] : arg[0];
      }
      rank[r] = arg[0] < n ? arg[0] : VI{};  // no entry beat -inf: NaN lane
      prev = rank[r];
    }
  }

  // ranked() through each row's two largest entries and its third largest value, for k > 2: the k
  // largest entries of the plan are prefixes of its rows, so k picks among the rows' heads (a row
  // advancing to its next entry when picked) find them while no row's third entry is picked. A
  // lane where it would be (its index is not kept) is returned in the mask for ranked() to redo.
  // About a third of ranked()'s work for k = 10, P = 9, and no stores; same order (ties: lowest
  // flat index), a NaN entry never wins, a lane left without entries reports entry 0.
  VI ranked_by_rows(const V* lp, int k, VI* rank) const {
    const int p = np();
    const VI none = VI{} + p * p, unknown = VI{} - 1;
    const V lowest = V{} - INFINITY;
    V v1[CAP], v2[CAP], v3[CAP];
    VI i1[CAP], i2[CAP];
    for (int i = 0; i < p; ++i) {
      v1[i] = v2[i] = v3[i] = lowest;
      i1[i] = i2[i] = none;
      for (int j = 0; j < p; ++j) {
        const V x = lp[i * p + j];
        const VI e = VI{} + (i * p + j), c1 = x > v1[i], c2 = x > v2[i], c3 = x > v3[i];
        v3[i] = c2 ? v2[i] : (c3 ? x : v3[i]);
        v2[i] = c1 ? v1[i] : (c2 ? x : v2[i]);
        i2[i] = c1 ? i1[i] : (c2 ? e : i2[i]);
        v1[i] = c1 ? x : v1[i];
        i1[i] = c1 ? e : i1[i];
      }
    }
    VI redo{};
    for (int r = 0; r < k; ++r) {
      V best = v1[0];
      VI row{};
      for (int i = 1; i < p; ++i) {
        const VI c = v1[i] > best;
        best = c ? v1[i] : best;
        row = c ? VI{} + i : row;
      }
      VI win = none;
      for (int i = 0; i < p; ++i) {  // the winning row advances
        const VI m = row == i;
        win = m ? i1[i] : win;
        v1[i] = m ? v2[i] : v1[i];
        i1[i] = m ? i2[i] : i1[i];
        v2[i] = m ? v3[i] : v2[i];
        i2[i] = m ? unknown : i2[i];
        v3[i] = m ? lowest : v3[i];
      }
      const VI found = best > lowest;
      redo |= found & (win == unknown);
      rank[r] = found ? win : VI{};
    }
    return redo;
  }

  // Outputs of the solved lanes [0, used), lane l holding problem probs[l] (see write_outputs of
  // ot_similarity_problem.h for the per-problem form). Consumes the state.
  void write_outputs(const FwdArgs<float>& A, const int64_t* probs, int used) {
    const int n = np() * np();
    V lp[CAP * CAP];
    log_plan(lp, A.select == kSelectCost);
    if (A.select == kSelectCost) {
      V acc{};
      for (int e = 0; e < n; ++e) {
        const V w = ex(lp[e]);
        lp[e] = w;
        acc += w * C[e];
      }
      for (int l = 0; l < used; ++l) {
        const int64_t p = probs[l];
        for (int e = 0; e < n; ++e) A.aux_pi[p * n + e] = lp[e][l];
        A.out[p] = 1.0f - acc[l];
      }
      return;
    }
    const bool sample = A.select == kSelectSample;
    int k = A.k;
    if (sample) {
      k = 1;
      for (int l = 0; l < used; ++l) k = std::max(k, static_cast<int>(A.choice[probs[l]]) + 1);
    }
    V nan_or_0{};  // NaN in the lanes whose plan is not finite (plan_finite of the per-problem form)
    for (int e = 0; e < n; ++e) nan_or_0 += lp[e] - lp[e];
    VI rank[CAP * CAP];
    if (k < 3 || any(ranked_by_rows(lp, k, rank))) ranked(lp, k, rank);
    for (int l = 0; l < used; ++l) {
      const int64_t p = probs[l];
      const int r0 = sample ? static_cast<int>(A.choice[p]) : 0, r1 = sample ? r0 + 1 : k;
      for (int r = r0, o = 0; r < r1; ++r, ++o) {
        const int e = rank[r][l];
        A.out[p * A.kk + o] = (1.0f - C[e][l]) + nan_or_0[l];
        A.aux_idx[p * A.kk + o] = e;
      }
    }
  }
};

}  // namespace ot
}  // namespace concept_kernels
