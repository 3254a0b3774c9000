// Per-problem math of ot_similarity, shared by the CPU launcher (ot_similarity_cpu.cpp, compiled by
// the host compiler) and the CUDA launcher (ot_similarity_cuda.cu, one problem per thread).
// No torch includes: raw pointers and sizes only (docs/OT_BACKEND_CONTRACT.md is the spec).
//
// One problem (b, m): X = query[b] (P, D), Y = bank[index[b, m]] (P, D), read in place.
//   C_ij = 1 - <x_i, y_j>;  f = g = 0;  per iteration
//   f_i = eps (log(1/P) - LSE_j((g_j - C_ij)/eps)),  g_j = eps (log(1/P) - LSE_i((f_i - C_ij)/eps)),
//   err = sum_i |f_i - f_i_old|; stop after the iteration where err < tol (or max_iter);
//   log pi_ij = (f_i + g_j - C_ij)/eps ranked (ties: lowest flat index i*P + j first).
//
// Absorption (performance_notes §2.6 (ii), Schmitzer's stabilised Sinkhorn): the potentials are
// kept as f = f0 + eps log u, g = g0 + eps log v with the kernel K_ij = exp((f0_i + g0_j - C_ij)/eps)
// cached, so an iteration is two P x P multiply-adds plus 2P divisions and P logs (for err)
// instead of 2 P^2 exps. The update is the same math as the log-domain one:
//   LSE_j((g_j - C_ij)/eps) = -f0_i/eps + log(sum_j K_ij v_j)  =>  u_i' = (1/P) / sum_j K_ij v_j.
// Safeguards keep it as accurate as the log domain: a half-step whose sums leave [kSumLo, kSumHi]
// (underflow of K, e.g. at the start or for eps = 1e-3) is redone exactly in the log domain with
// max-subtraction, and scalings outside [1/kTau, kTau] are absorbed into f0/g0 (K rebuilt). Entries
// of K that underflow are below exp(-87) of a row whose sum is ~1/P, so dropping them is below
// fp32 rounding even after the scalings move them by kTau^2.
#pragma once

#include "common/fast_math.h"
#include "common/host_device.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CK_UNROLL _Pragma("unroll")
#else
#define CK_UNROLL
#endif

namespace concept_kernels {
namespace ot {

constexpr int kSelectSample = 0, kSelectTopk = 1, kSelectCost = 2;
constexpr int kStopProblem = 0, kStopRow = 1, kStopAll = 2;
constexpr int kMaxP = 16;  // largest patch count of the fused backends

// ---- elementary functions: host float uses common/fast_math.h (Cephes polynomials) ----------

CK_HOST_DEVICE CK_INLINE float ck_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return fast_expf(x);
#endif
}
CK_HOST_DEVICE CK_INLINE double ck_exp(double x) { return exp(x); }
CK_HOST_DEVICE CK_INLINE float ck_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return fast_logf(x);
#endif
}
CK_HOST_DEVICE CK_INLINE double ck_log(double x) { return log(x); }
template <typename T>
CK_HOST_DEVICE CK_INLINE T ck_abs(T x) { return x < T(0) ? -x : x; }

// Thresholds of the absorption safeguards (see the file comment). A kernel is (re)built right after
// a half step, when the plan's rows or columns sum to 1/P, so its entries are <= 1 and the sums
// stay below P kTau^2 (1.6e17 for float, P <= 16) < kSumHi until the scalings are absorbed. For
// float, kTau = 1e8 rather than 1e4 absorbed (and rebuilt the P*P exps of) a kernel less often:
// raw forward 13.7 -> 12.9 ms at the CPU benchmark shape (bench/RESULTS.md).
template <typename T>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float kTau = 1e8f, kSumLo = 1e-20f, kSumHi = 1e20f;
};
template <>
struct Limits<double> {
  static constexpr double kTau = 1e10, kSumLo = 1e-200, kSumHi = 1e200;
};

// ---- inputs and outputs of the forward, shared by the launchers ------------------------------
template <typename T>
struct FwdArgs {
  const T* query;         // (B, P, D)
  const T* bank;          // (R, P, D)
  const int64_t* index;   // (B, M) in [0, R)
  const int64_t* choice;  // (B, M) in [0, k), select == sample only
  T* out;                 // (B, M, kk)
  int64_t* aux_idx;       // (B, M, kk) flat plan indices (sample, topk)
  T* aux_pi;              // (B, M, P, P) final plan (cost)
  // optional: similarities of bank patches with every query patch from a GEMM: row
  // (r - sim_r0) * P + j of sim (leading dimension sim_ld) holds <bank[r, j], query[b, i]> at column
  // sim_column(A, b, i), for the bank rows r the caller covers; nullptr -> dot products per problem.
  // Columns: query b's first sim_own patches at b * sim_own + i ("own" block), its other P - sim_own
  // after all the own blocks (sim_own = P: plainly b * P + i).
  const T* sim;
  int64_t sim_r0, sim_ld, sim_own;
  int64_t B, M;
  int P, D, select, k, kk, max_iter;
  T eps, tol;
};

// ---- cost: dot products read in place -------------------------------------------------------
// <a, b> over D. Host: 32-byte lanes of partial sums (vectorised without -ffast-math), fixed tree.
template <typename T>
CK_HOST_DEVICE CK_INLINE T dot(const T* a, const T* b, int D) {
#if defined(__CUDA_ARCH__)
  T acc = 0;
  for (int d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
#else
  constexpr int L = 32 / sizeof(T);
  T acc[L] = {};
  int d = 0;
  for (; d + L <= D; d += L)
    for (int l = 0; l < L; ++l) acc[l] += a[d + l] * b[d + l];
  T tail = 0;
  for (; d < D; ++d) tail += a[d] * b[d];
  for (int w = L / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0] + tail;
#endif
}


// ---- the Sinkhorn state of one problem (scalar form) -------------------------------------------
// MAXP: compile-time capacity, P <= MAXP at run time; padded entries hold 0. This is the form the
// CUDA launcher runs (one problem per thread). The CPU launcher runs the SIMD form of the same math
// (ot_similarity_simd.h) and this one when CONCEPT_KERNELS_OT_SCALAR=1 (tests), so CPU tests cover
// the code the GPU runs.
template <typename T, int MAXP>
struct Sinkhorn {
  int P;
  T eps, inv_eps, log_a, a;  // log_a = log(1/P), a = 1/P
  T C[MAXP * MAXP];          // C[i*MAXP + j]
  T K[MAXP * MAXP];          // exp((f0_i + g0_j - C_ij)/eps), valid when k_valid
  T f0[MAXP], g0[MAXP], u[MAXP], lu[MAXP], v[MAXP];  // f = f0 + eps lu, lu = log u; g = g0 + eps log v
  bool k_valid;

  CK_HOST_DEVICE void setup(int P_, T eps_) {
    P = P_;
    eps = eps_;
    inv_eps = T(1) / eps_;
    a = T(1) / T(P_);
    log_a = -ck_log(T(P_));
  }

  // C from query rows x (P, D) and bank rows y (P, D), both read in place.
  CK_HOST_DEVICE void set_cost(const T* x, const T* y, int D) {
    for (int i = 0; i < MAXP; ++i)
      for (int j = 0; j < MAXP; ++j)
        C[i * MAXP + j] = (i < P && j < P) ? T(1) - dot(x + i * D, y + j * D, D) : T(0);
  }

  // C from / to a compact (P, P) array (the lockstep driver stores costs between chunks).
  CK_HOST_DEVICE void load_cost(const T* Cc) {
    for (int i = 0; i < MAXP; ++i)
      for (int j = 0; j < MAXP; ++j) C[i * MAXP + j] = (i < P && j < P) ? Cc[i * P + j] : T(0);
  }
  CK_HOST_DEVICE void store_cost(T* Cc) const {
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j) Cc[i * P + j] = C[i * MAXP + j];
  }
  CK_HOST_DEVICE T cost_at(int flat) const { return C[(flat / P) * MAXP + flat % P]; }

  // Potentials f, g (nullptr = 0, the start of the solve); K is rebuilt lazily.
  CK_HOST_DEVICE void load_potentials(const T* f, const T* g) {
    for (int l = 0; l < MAXP; ++l) {
      const bool in = l < P;
      f0[l] = (in && f) ? f[l] : T(0);
      g0[l] = (in && g) ? g[l] : T(0);
      u[l] = in ? T(1) : T(0);
      v[l] = in ? T(1) : T(0);
      lu[l] = T(0);
    }
    k_valid = false;
  }

  // Fold the scalings into the potentials: afterwards f = f0, g = g0 exactly.
  CK_HOST_DEVICE void fold() {
    for (int l = 0; l < MAXP; ++l) {
      const bool in = l < P;
      f0[l] = f0[l] + eps * lu[l];
      g0[l] = g0[l] + eps * ck_log(in ? v[l] : T(1));
      u[l] = in ? T(1) : T(0);
      v[l] = in ? T(1) : T(0);
      lu[l] = T(0);
    }
    k_valid = false;
  }

  CK_HOST_DEVICE void store_potentials(T* f, T* g) {
    fold();
    for (int l = 0; l < P; ++l) {
      f[l] = f0[l];
      g[l] = g0[l];
    }
  }

  CK_HOST_DEVICE void rebuild_kernel() {
    for (int i = 0; i < MAXP; ++i)
      for (int j = 0; j < MAXP; ++j) {
        const T x = ((f0[i] + g0[j]) - C[i * MAXP + j]) * inv_eps;
        K[i * MAXP + j] = (i < P && j < P) ? ck_exp(x) : T(0);
      }
    k_valid = true;
  }

  // Exact log-domain f half-step with max-subtraction (g = g0 + eps log v). Returns err.
  CK_HOST_DEVICE T f_step_log() {
    for (int j = 0; j < MAXP; ++j) {  // absorb v into g0
      g0[j] = g0[j] + eps * ck_log(j < P ? v[j] : T(1));
      v[j] = j < P ? T(1) : T(0);
    }
    T err = 0;
    for (int i = 0; i < MAXP; ++i) {
      T mx = -INFINITY, sum = 0;
      for (int j = 0; j < MAXP; ++j)
        if (j < P) {
          const T x = (g0[j] - C[i * MAXP + j]) * inv_eps;
          mx = x > mx ? x : mx;
        }
      for (int j = 0; j < MAXP; ++j)
        if (j < P) sum += ck_exp((g0[j] - C[i * MAXP + j]) * inv_eps - mx);
      const bool in = i < P;
      const T fn = in ? eps * (log_a - (mx + ck_log(sum))) : T(0);
      if (in) err += ck_abs(fn - (f0[i] + eps * lu[i]));
      f0[i] = fn;
      u[i] = in ? T(1) : T(0);
      lu[i] = T(0);
    }
    k_valid = false;
    return err;
  }

  // Exact log-domain g half-step (f = f0 + eps lu).
  CK_HOST_DEVICE void g_step_log() {
    for (int i = 0; i < MAXP; ++i) {  // absorb u into f0
      f0[i] = f0[i] + eps * lu[i];
      u[i] = i < P ? T(1) : T(0);
      lu[i] = T(0);
    }
    for (int j = 0; j < MAXP; ++j) {
      T mx = -INFINITY, sum = 0;
      for (int i = 0; i < MAXP; ++i)
        if (i < P) {
          const T x = (f0[i] - C[i * MAXP + j]) * inv_eps;
          mx = x > mx ? x : mx;
        }
      for (int i = 0; i < MAXP; ++i)
        if (i < P) sum += ck_exp((f0[i] - C[i * MAXP + j]) * inv_eps - mx);
      const bool in = j < P;
      g0[j] = in ? eps * (log_a - (mx + ck_log(sum))) : T(0);
      v[j] = in ? T(1) : T(0);
    }
    k_valid = false;
  }

  // f half-step: multiplicative when K is valid and the sums are safe, else exact. Returns err.
  CK_HOST_DEVICE T f_step() {
    if (!k_valid) return f_step_log();
    T un[MAXP], lun[MAXP];
    bool safe = true, keep = true;
    for (int i = 0; i < MAXP; ++i) {
      T s = 0;  // s_i = sum_j K_ij v_j
      for (int j = 0; j < MAXP; ++j)
        if (j < P) s += K[i * MAXP + j] * v[j];
      const bool in = i < P;
      safe &= (!in) | ((s >= Limits<T>::kSumLo) & (s <= Limits<T>::kSumHi));
      un[i] = in ? a / s : T(0);
      keep &= (!in) | ((un[i] >= T(1) / Limits<T>::kTau) & (un[i] <= Limits<T>::kTau));
    }
    if (!safe) return f_step_log();
    T err = 0;
    for (int i = 0; i < MAXP; ++i) {
      lun[i] = i < P ? ck_log(un[i]) : T(0);
      if (i < P) err += ck_abs(lun[i] - lu[i]);
    }
    err *= eps;
    for (int i = 0; i < MAXP; ++i) {
      if (keep) {
        u[i] = un[i];
        lu[i] = lun[i];
      } else {  // absorb: f0 += eps log u', K rebuilt at the next g half-step
        f0[i] = f0[i] + eps * lun[i];
        u[i] = i < P ? T(1) : T(0);
        lu[i] = T(0);
      }
    }
    if (!keep) k_valid = false;
    return err;
  }

  // g half-step with the new f.
  CK_HOST_DEVICE void g_step() {
    if (!k_valid) rebuild_kernel();
    T vn[MAXP];
    bool safe = true, keep = true;
    for (int j = 0; j < MAXP; ++j) {
      T t = 0;  // t_j = sum_i K_ij u_i
      for (int i = 0; i < MAXP; ++i)
        if (i < P) t += K[i * MAXP + j] * u[i];
      const bool in = j < P;
      safe &= (!in) | ((t >= Limits<T>::kSumLo) & (t <= Limits<T>::kSumHi));
      vn[j] = in ? a / t : T(0);
      keep &= (!in) | ((vn[j] >= T(1) / Limits<T>::kTau) & (vn[j] <= Limits<T>::kTau));
    }
    if (!safe) {
      g_step_log();
      return;
    }
    for (int j = 0; j < MAXP; ++j) {
      if (keep) {
        v[j] = vn[j];
      } else {
        g0[j] = g0[j] + eps * ck_log(j < P ? vn[j] : T(1));
        v[j] = j < P ? T(1) : T(0);
      }
    }
    if (!keep) k_valid = false;
  }

  // One Sinkhorn iteration; returns err = sum_i |f_i - f_i_old|.
  CK_HOST_DEVICE T step() {
    const T err = f_step();
    g_step();
    return err;
  }

  // Iterate until err < tol or max_iter iterations (stop = problem). Returns the iterations run.
  CK_HOST_DEVICE int solve(int max_iter, T tol) {
    int it = 0;
    while (it < max_iter) {
      const T err = step();
      ++it;
      if (err < tol) break;
    }
    return it;
  }

  // log pi (flat i*P + j, compact) from the folded potentials; call fold() first.
  CK_HOST_DEVICE void log_plan(T* lp) const {
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j) lp[i * P + j] = ((f0[i] + g0[j]) - C[i * MAXP + j]) / eps;
  }
};

// ---- selection --------------------------------------------------------------------------------
// Ranking order: larger log pi first, equal values by lower flat index.
template <typename T>
CK_HOST_DEVICE CK_INLINE bool ranks_before(T va, int ia, T vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// The entry ranked right after (prev_v, prev_i) in lp[0..n) (the first one when prev_i < 0): one
// scan, no buffer. Updates prev_i/prev_v to the entry found and returns its flat index.
template <typename T>
CK_HOST_DEVICE CK_INLINE int next_ranked(const T* lp, int n, int& prev_i, T& prev_v) {
  int best_i = -1;
  T best_v = 0;
  for (int e = 0; e < n; ++e) {
    const T x = lp[e];
    const bool after = prev_i < 0 || ranks_before(prev_v, prev_i, x, e);
    if (after && (best_i < 0 || ranks_before(x, e, best_v, best_i))) {
      best_i = e;
      best_v = x;
    }
  }
  if (best_i < 0) best_i = 0;  // only with NaN in lp
  prev_i = best_i;
  prev_v = lp[best_i];
  return best_i;
}

// Flat index of the r-th entry (0-based) in ranking order: r + 1 scans (sample; device topk).
template <typename T>
CK_HOST_DEVICE CK_INLINE int select_rank(const T* lp, int n, int r) {
  int prev_i = -1;
  T prev_v = 0;
  int e = 0;
  for (int s = 0; s <= r; ++s) e = next_ranked(lp, n, prev_i, prev_v);
  return e;
}

#if !defined(__CUDA_ARCH__)
// The k first entries of lp[0..n) in ranking order, by insertion into a sorted buffer (host).
// Entries arrive in flat-index order, so an entry moves before a buffered one only when strictly
// larger: equal values keep the lower index first, as ranks_before says.
template <typename T>
CK_INLINE void select_topk_insert(const T* lp, int n, int k, T* buf_v, int* buf_i) {
  int cnt = 0;
  for (int e = 0; e < n; ++e) {
    const T x = lp[e];
    if (cnt == k && !(x > buf_v[k - 1])) continue;
    int pos = cnt < k ? cnt++ : k - 1;  // the last slot is dropped when the buffer is full
    while (pos > 0 && x > buf_v[pos - 1]) {
      buf_v[pos] = buf_v[pos - 1];
      buf_i[pos] = buf_i[pos - 1];
      --pos;
    }
    buf_v[pos] = x;
    buf_i[pos] = e;
  }
}
#endif

// Whether every entry of the log plan lp[0..n) is finite. It is for finite inputs (finite costs
// and potentials); a NaN or inf in a query patch or a bank entry leaves NaN or inf in it, and the
// selected similarities are then NaN (select="cost" gets NaN from the plan itself): a ranking of
// a NaN plan would otherwise pick some entry and return a finite, meaningless value.
template <typename T>
CK_HOST_DEVICE CK_INLINE bool plan_finite(const T* lp, int n) {
  bool ok = true;
  for (int e = 0; e < n; ++e) ok &= (lp[e] - lp[e]) == T(0);  // NaN for NaN and +-inf
  return ok;
}

// Outputs of problem p from a solved state (folds it). Solver: Sinkhorn (scalar) or SinkhornSimd;
// lp: scratch of MAXP * MAXP.
template <int MAXP, typename T, typename Solver>
CK_HOST_DEVICE void write_outputs(const FwdArgs<T>& A, int64_t p, Solver& s, T* lp) {
  s.fold();
  const int P = A.P, n = P * P;
  T* out = A.out + p * A.kk;
  if (A.select == kSelectCost) {
    s.log_plan(lp);
    T* pi = A.aux_pi + p * n;
    T acc = 0;
    for (int e = 0; e < n; ++e) {
      const T w = ck_exp(lp[e]);
      pi[e] = w;
      acc += w * s.cost_at(e);
    }
    out[0] = T(1) - acc;
    return;
  }
  int64_t* aux = A.aux_idx + p * A.kk;
  s.log_plan(lp);
  const T nan_or_0 = plan_finite(lp, n) ? T(0) : T(NAN);  // added to every output
#if !defined(__CUDA_ARCH__)
  if constexpr (requires(int* ip) { s.select_topk(1, ip); }) {  // SIMD solver (host)
    int idx[MAXP * MAXP];
    const bool sample = A.select == kSelectSample;
    const int c = sample ? static_cast<int>(A.choice[p]) : 0;
    s.select_topk(sample ? c + 1 : A.k, idx);
    for (int r = sample ? c : 0, o = 0; r < (sample ? c + 1 : A.k); ++r, ++o) {
      out[o] = (T(1) - s.cost_at(idx[r])) + nan_or_0;
      aux[o] = idx[r];
    }
    return;
  }
#endif
  if (A.select == kSelectSample) {
    const int e = select_rank(lp, n, static_cast<int>(A.choice[p]));
    out[0] = (T(1) - s.cost_at(e)) + nan_or_0;
    aux[0] = e;
    return;
  }
#if defined(__CUDA_ARCH__)
  int prev_i = -1;
  T prev_v = 0;
  for (int r = 0; r < A.k; ++r) {  // one scan per rank, continuing after the previous entry
    const int e = next_ranked(lp, n, prev_i, prev_v);
    out[r] = (T(1) - s.cost_at(e)) + nan_or_0;
    aux[r] = e;
  }
#else
  T buf_v[MAXP * MAXP];
  int buf_i[MAXP * MAXP];
  select_topk_insert(lp, n, A.k, buf_v, buf_i);
  for (int r = 0; r < A.k; ++r) {
    out[r] = (T(1) - s.cost_at(buf_i[r])) + nan_or_0;
    aux[r] = buf_i[r];
  }
#endif
}

// The column of query patch (b, i) in A.sim (see FwdArgs::sim).
template <typename T>
CK_HOST_DEVICE CK_INLINE int64_t sim_column(const FwdArgs<T>& A, int64_t b, int i) {
  const int64_t own = A.sim_own;
  return i < own ? b * own + i : A.B * own + b * (A.P - own) + (i - own);
}

// The compact cost matrix c[i*P + j] = C_ij = 1 - <query[b, i], bank[index[p], j]> of problem
// p = b*M + m: read from A.sim when a GEMM computed it (sim row (r - sim_r0)*P + j holds column j
// of C for every query patch), else dot products in place.
template <typename T>
CK_HOST_DEVICE void problem_cost(const FwdArgs<T>& A, int64_t p, T* c) {
  const int64_t b = p / A.M, r = A.index[p];
  const int P = A.P;
  if (A.sim != nullptr) {
    const int64_t ld = A.sim_ld;
    for (int j = 0; j < P; ++j) {
      const T* row = A.sim + ((r - A.sim_r0) * P + j) * ld;
      for (int i = 0; i < P; ++i) c[i * P + j] = T(1) - row[sim_column(A, b, i)];
    }
    return;
  }
  const T* x = A.query + b * P * A.D;
  const T* y = A.bank + r * P * A.D;
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < P; ++j) c[i * P + j] = T(1) - dot(x + i * A.D, y + j * A.D, A.D);
}

// The cost of problem p into a set-up per-problem solver (its own tiled dot products when there is
// no GEMM result).
template <int MAXP, typename T, typename Solver>
CK_HOST_DEVICE void set_problem_cost(const FwdArgs<T>& A, int64_t p, Solver& s) {
  if (A.sim == nullptr) {
    const int64_t PD = static_cast<int64_t>(A.P) * A.D;
    s.set_cost(A.query + (p / A.M) * PD, A.bank + A.index[p] * PD, A.D);
    return;
  }
  T c[MAXP * MAXP];
  problem_cost(A, p, c);
  s.load_cost(c);
}

// The whole stop="problem" forward of problem p = b*M + m.
template <int MAXP, typename T, typename Solver>
CK_HOST_DEVICE void solve_problem(const FwdArgs<T>& A, int64_t p, Solver& s, T* lp) {
  s.setup(A.P, A.eps);
  set_problem_cost<MAXP>(A, p, s);
  s.load_potentials(nullptr, nullptr);
  s.solve(A.max_iter, A.tol);
  write_outputs<MAXP>(A, p, s, lp);
}

}  // namespace ot
}  // namespace concept_kernels
