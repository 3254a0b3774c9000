// CPU forward of ot_similarity (docs/OT_BACKEND_CONTRACT.md; the backward is ot_similarity_bwd_cpu.cpp):
// OpenMP over problems, the per-problem math of ot_similarity_problem.h (the code the CUDA launcher
// runs), SIMD over the plan's lanes.
//
//   fwd(query, bank, index, choice, select, k, eps, max_iter, tol, stop) -> (out, aux)
//
// SIMD: float inputs run one problem per SIMD lane (ot_similarity_lanes.h); double inputs (and
// CONCEPT_KERNELS_OT_SCALAR=1) run one problem at a time over fixed-size lane arrays
// (ot_similarity_simd.h) or the scalar form. All use GCC vector types, compiled for this machine's
// ISA (setup.py).
//
// Stopping rules: stop=problem runs each problem to its own stop. stop=row / all (one mean err per
// group: the M problems of a row, or all B*M): float runs the lane solver in two passes (record
// every problem's err per iteration, decide each group's iteration count, resume each lane group
// to exactly that count: ot_similarity_group_lanes.h). Double inputs run the group's problems in lockstep chunks
// of kChunk iterations from a saved (f, g) state, recording every problem's err per iteration; the
// first iteration whose group mean is < tol ends the group, whose problems are then re-run from
// the chunk's start for exactly that many iterations (deterministic: same code, same state).
#include "ot_similarity/ot_similarity_group_lanes.h"
#include "ot_similarity/ot_similarity_host.h"
#include "ot_similarity/ot_similarity_lanes.h"
#include "ot_similarity/ot_similarity_order.h"
#include "ot_similarity/ot_similarity_problem.h"
#include "ot_similarity/ot_similarity_simd.h"

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/row_gemm.h"
#include "common/threads.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace concept_kernels {
namespace {

using ot::FwdArgs;
using ot::problem_order;
using ot::RowOrder;

constexpr int kChunk = 8;        // lockstep iterations between group checks (stop = row / all)
constexpr int kGroupsInFlight = 4;  // lane groups stepped in turn (their chains overlap)
constexpr int64_t kBlock = 64;   // problems per OpenMP work item (4 lane groups)

// ---- workers: one range of problems each (templates on the solver, instantiated below) -------
// `order` lists the problems sorted by bank row (see problem_order), so that consecutive problems
// share the bank row read through index: each row is fetched from memory about once.

// stop = problem: the whole forward of problems order[n0 .. n1).
template <typename S, typename T>
inline void solve_range(const FwdArgs<T>& A, const int64_t* order, int64_t n0, int64_t n1) {
  S s;
  T lp[ot::kMaxP * ot::kMaxP];
  for (int64_t n = n0; n < n1; ++n) ot::solve_problem<ot::kMaxP>(A, order[n], s, lp);
}

// stop = problem, float: NL problems per lane group, G groups in turn (ot_similarity_lanes.h).
template <int NL, int FIXP>
inline void solve_lanes_range(const FwdArgs<float>& A, const int64_t* order, int64_t n0, int64_t n1) {
  using S = ot::SinkhornLanes<NL, FIXP>;
  constexpr int64_t G = kGroupsInFlight;
  S s[G];
  for (S& x : s) x.setup(A.P, A.eps);
  for (int64_t g = n0; g < n1; g += G * NL) {
    // the problems come in bank-row order: their index and outputs are scattered
    for (int64_t n = g + 2 * G * NL; n < std::min(n1, g + 3 * G * NL); ++n) __builtin_prefetch(A.index + order[n]);
    for (int64_t n = g + G * NL; n < std::min(n1, g + 2 * G * NL); ++n) {
      const int64_t p = order[n];
      __builtin_prefetch(A.out + p * A.kk, 1);
      if (A.aux_idx != nullptr) __builtin_prefetch(A.aux_idx + p * A.kk, 1);
    }
    int used[G];
    for (int h = 0; h < G; ++h) {
      used[h] = static_cast<int>(std::clamp<int64_t>(n1 - (g + h * NL), 0, NL));
      s[h].load_costs(A, order + g + (used[h] > 0 ? h * NL : 0), used[h]);  // used 0: every lane idle
    }
    S::template iterate_groups<G>(s, A.max_iter, A.tol);
    for (int h = 0; h < G; ++h)
      if (used[h] > 0) s[h].write_outputs(A, order + g + h * NL, used[h]);
  }
}
template <int NL, int FIXP>
CK_CPU_WORKER void solve_lanes(const FwdArgs<float>& A, const int64_t* o, int64_t n0, int64_t n1) {
  solve_lanes_range<NL, FIXP>(A, o, n0, n1);
}

// Lockstep, start: cost matrices of problems order[n0 .. n1) into Cb (compact P x P each).
template <typename S, typename T>
inline void cost_range(const FwdArgs<T>& A, const int64_t* order, T* Cb, int64_t n0, int64_t n1) {
  S s;
  const int64_t PP = A.P * A.P;
  s.setup(A.P, A.eps);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t p = order[n];
    ot::set_problem_cost<ot::kMaxP>(A, p, s);
    s.store_cost(Cb + p * PP);
  }
}

// Lockstep, one chunk: `iters` iterations of problems [p0, p1) from (Fi, Gi) into (Fo, Go); err
// of every iteration into errs[p * kChunk + t].
template <typename S, typename T>
inline void chunk_range(const FwdArgs<T>& A, const T* Cb, const T* Fi, const T* Gi, T* Fo, T* Go,
                        T* errs, int iters, int64_t p0, int64_t p1) {
  S s;
  const int64_t PP = A.P * A.P;
  s.setup(A.P, A.eps);
  for (int64_t p = p0; p < p1; ++p) {
    s.load_cost(Cb + p * PP);
    s.load_potentials(Fi + p * A.P, Gi + p * A.P);
    for (int t = 0; t < iters; ++t) errs[p * kChunk + t] = s.step();
    s.store_potentials(Fo + p * A.P, Go + p * A.P);
  }
}

// Lockstep, end: outputs of problems [p0, p1) from their final (F, G).
template <typename S, typename T>
inline void final_range(const FwdArgs<T>& A, const T* Cb, const T* F, const T* G, int64_t p0, int64_t p1) {
  S s;
  T lp[ot::kMaxP * ot::kMaxP];
  const int64_t PP = A.P * A.P;
  s.setup(A.P, A.eps);
  for (int64_t p = p0; p < p1; ++p) {
    s.load_cost(Cb + p * PP);
    s.load_potentials(F + p * A.P, G + p * A.P);
    ot::write_outputs<ot::kMaxP>(A, p, s, lp);
  }
}

// Plain entry points per solver.
template <typename T>
struct Workers {
  void (*solve)(const FwdArgs<T>&, const int64_t*, int64_t, int64_t);
  void (*cost)(const FwdArgs<T>&, const int64_t*, T*, int64_t, int64_t);
  void (*chunk)(const FwdArgs<T>&, const T*, const T*, const T*, T*, T*, T*, int, int64_t, int64_t);
  void (*final)(const FwdArgs<T>&, const T*, const T*, const T*, int64_t, int64_t);
};

#define CK_OT_WORKERS(T, S, SUFFIX, ATTR)                                                          \
  ATTR void solve_##SUFFIX(const FwdArgs<T>& A, const int64_t* o, int64_t n0, int64_t n1) {        \
    solve_range<S>(A, o, n0, n1);                                                                  \
  }                                                                                                \
  ATTR void cost_##SUFFIX(const FwdArgs<T>& A, const int64_t* o, T* Cb, int64_t n0, int64_t n1) {  \
    cost_range<S>(A, o, Cb, n0, n1);                                                               \
  }                                                                                                \
  ATTR void chunk_##SUFFIX(const FwdArgs<T>& A, const T* Cb, const T* Fi, const T* Gi, T* Fo,      \
                           T* Go, T* errs, int iters, int64_t p0, int64_t p1) {                    \
    chunk_range<S>(A, Cb, Fi, Gi, Fo, Go, errs, iters, p0, p1);                                    \
  }                                                                                                \
  ATTR void final_##SUFFIX(const FwdArgs<T>& A, const T* Cb, const T* F, const T* G, int64_t p0,   \
                           int64_t p1) {                                                           \
    final_range<S>(A, Cb, F, G, p0, p1);                                                           \
  }                                                                                                \
  constexpr Workers<T> workers_##SUFFIX{&solve_##SUFFIX, &cost_##SUFFIX, &chunk_##SUFFIX,          \
                                        &final_##SUFFIX};

#define CK_COMMA ,
// SIMD solvers: P = 9 specialised (float), P <= 8 in 8 lanes, P <= 16 in 16 lanes.
CK_OT_WORKERS(float, ot::SinkhornSimd<float CK_COMMA 16 CK_COMMA 9>, f32_p9, CK_CPU_WORKER)
CK_OT_WORKERS(float, ot::SinkhornSimd<float CK_COMMA 8>, f32_l8, CK_CPU_WORKER)
CK_OT_WORKERS(float, ot::SinkhornSimd<float CK_COMMA 16>, f32_l16, CK_CPU_WORKER)
CK_OT_WORKERS(double, ot::SinkhornSimd<double CK_COMMA 8>, f64_l8, CK_CPU_WORKER)
CK_OT_WORKERS(double, ot::SinkhornSimd<double CK_COMMA 16>, f64_l16, CK_CPU_WORKER)
// The scalar solver the CUDA launcher runs (CONCEPT_KERNELS_OT_SCALAR=1, for tests).
CK_OT_WORKERS(float, ot::Sinkhorn<float CK_COMMA 16>, f32_scalar, __attribute__((noinline)))
CK_OT_WORKERS(double, ot::Sinkhorn<double CK_COMMA 16>, f64_scalar, __attribute__((noinline)))
#undef CK_OT_WORKERS
#undef CK_COMMA

bool use_scalar_solver() {
  const char* e = std::getenv("CONCEPT_KERNELS_OT_SCALAR");
  return e != nullptr && e[0] != '\0' && !(e[0] == '0' && e[1] == '\0');
}

const Workers<float>& workers_for(float, int P) {
  if (use_scalar_solver()) return workers_f32_scalar;
  if (P == 9) return workers_f32_p9;
  return P <= 8 ? workers_f32_l8 : workers_f32_l16;
}

// The stop=problem solver: one problem per lane for float (the hot path), else per problem; 16
// lanes where 512-bit vectors run at full width (common/cpu_features.h), else 8.
using SolveFn = void (*)(const FwdArgs<float>&, const int64_t*, int64_t, int64_t);
SolveFn lanes_solver(float, int P) {
  if (use_scalar_solver()) return nullptr;
#if defined(__AVX512F__)
  if (wide_simd()) return P == 9 ? &solve_lanes<16, 9> : &solve_lanes<16, 0>;
#endif
  return P == 9 ? &solve_lanes<8, 9> : &solve_lanes<8, 0>;
}
std::nullptr_t lanes_solver(double, int) { return nullptr; }
const Workers<double>& workers_for(double, int P) {
  if (use_scalar_solver()) return workers_f64_scalar;
  return P <= 8 ? workers_f64_l8 : workers_f64_l16;
}

// stop = row / all, float: the lane solver in two passes (ot_similarity_group_lanes.h).
using GroupSolveFn = void (*)(const FwdArgs<float>&, const RowOrder&, int64_t, bool, int);
template <int NL, int FIXP>
CK_CPU_WORKER void group_record(ot::GroupLanes<NL, FIXP>& gl, const FwdArgs<float>& C, int64_t item) {
  gl.record_item(C, item);
}
template <int NL, int FIXP>
CK_CPU_WORKER void group_finish(const ot::GroupLanes<NL, FIXP>& gl, int64_t s0, int64_t s1) {
  gl.finish(s0, s1);
}
template <int NL, int FIXP>
void solve_group_lanes(const FwdArgs<float>& A, const RowOrder& ro, int64_t R, bool fused, int stop);
GroupSolveFn group_lanes_solver(int P) {
  if (use_scalar_solver()) return nullptr;
#if defined(__AVX512F__)
  if (wide_simd()) return P == 9 ? &solve_group_lanes<16, 9> : &solve_group_lanes<16, 0>;
#endif
  return P == 9 ? &solve_group_lanes<8, 9> : &solve_group_lanes<8, 0>;
}

// Work items [n0, n1) of at most kBlock problems covering the given ranges.
std::vector<std::pair<int64_t, int64_t>> blocks_of(const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (auto [a, b] : ranges)
    for (int64_t p = a; p < b; p += kBlock) out.emplace_back(p, std::min(b, p + kBlock));
  return out;
}

// fn(t) for t < n, in parallel (dynamic schedule: work items differ in cost)
template <typename Fn>
void parallel_items(int64_t n, const Fn& fn) {
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
  for (int64_t t = 0; t < n; ++t) fn(t);
}

template <typename Fn>
void parallel_blocks(const std::vector<std::pair<int64_t, int64_t>>& blocks, const Fn& fn) {
  parallel_items(static_cast<int64_t>(blocks.size()), [&](int64_t t) { fn(blocks[t].first, blocks[t].second); });
}

// stop = row / all: lockstep chunks with a group-mean stop (see the file comment).
template <typename T>
void solve_groups(const FwdArgs<T>& A, const Workers<T>& W, const std::vector<int64_t>& order, int stop) {
  const int64_t Q = A.B * A.M, P = A.P;
  const int64_t n_groups = stop == ot::kStopRow ? A.B : 1;
  const int64_t gsize = Q / n_groups;
  std::vector<T> Cb(Q * P * P), F(Q * P, T(0)), G(Q * P, T(0)), F2(Q * P), G2(Q * P);
  std::vector<T> errs(Q * kChunk);
  parallel_blocks(blocks_of({{0, Q}}), [&](int64_t a, int64_t b) { W.cost(A, order.data(), Cb.data(), a, b); });

  std::vector<int64_t> active(n_groups);
  for (int64_t g = 0; g < n_groups; ++g) active[g] = g;
  int done = 0;
  auto run_chunk = [&](const std::vector<std::pair<int64_t, int64_t>>& ranges, int iters) {
    parallel_blocks(blocks_of(ranges), [&](int64_t a, int64_t b) {
      W.chunk(A, Cb.data(), F.data(), G.data(), F2.data(), G2.data(), errs.data(), iters, a, b);
    });
    for (auto [a, b] : ranges) {
      std::copy(F2.begin() + a * P, F2.begin() + b * P, F.begin() + a * P);
      std::copy(G2.begin() + a * P, G2.begin() + b * P, G.begin() + a * P);
    }
  };
  while (!active.empty() && done < A.max_iter) {
    const int n = std::min(kChunk, A.max_iter - done);
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (int64_t g : active) ranges.emplace_back(g * gsize, (g + 1) * gsize);
    parallel_blocks(blocks_of(ranges), [&](int64_t a, int64_t b) {
      W.chunk(A, Cb.data(), F.data(), G.data(), F2.data(), G2.data(), errs.data(), n, a, b);
    });
    std::vector<int64_t> still;
    for (int64_t g : active) {
      const int64_t a = g * gsize, b = (g + 1) * gsize;
      int stop_at = -1;  // first iteration of the chunk whose group mean err < tol, summed in p order
      for (int t = 0; t < n && stop_at < 0; ++t) {
        T sum = 0;
        for (int64_t p = a; p < b; ++p) sum += errs[p * kChunk + t];
        if (sum / static_cast<T>(gsize) < A.tol) stop_at = t + 1;
      }
      if (stop_at > 0 && stop_at < n) {
        run_chunk({{a, b}}, stop_at);  // stopped inside the chunk: redo its iterations up to there
        continue;
      }
      std::copy(F2.begin() + a * P, F2.begin() + b * P, F.begin() + a * P);
      std::copy(G2.begin() + a * P, G2.begin() + b * P, G.begin() + a * P);
      if (stop_at < 0) still.push_back(g);
    }
    active.swap(still);
    done += n;
  }
  parallel_blocks(blocks_of({{0, Q}}),
                  [&](int64_t a, int64_t b) { W.final(A, Cb.data(), F.data(), G.data(), a, b); });
}

// The 8-column groups of the similarity buffer that bank row r's problems read (see FwdArgs::sim):
// the own groups of each query that indexes r, then every group of the rest block. Its problems
// come in p = b*M + m order (problem_order is stable), so each query shows up in one run.
int row_groups(const FwdArgs<float>& A, const RowOrder& ro, int64_t r, int64_t ldb, int32_t* groups) {
  const int64_t own = A.sim_own;
  int n = 0;
  int64_t last = -1;
  for (int64_t t = ro.start[r]; t < ro.start[r + 1]; ++t) {
    const int64_t b = ro.order[t] / A.M;
    if (b == last) continue;
    last = b;
    for (int64_t c = 0; c < own; c += row_gemm::kH) groups[n++] = static_cast<int32_t>(b * own + c);
  }
  for (int64_t c = A.B * own; c < ldb; c += row_gemm::kH) groups[n++] = static_cast<int32_t>(c);
  return n;
}

// stop = problem, float, costs from a GEMM: work items are chunks of consecutive bank rows (about
// kChunkProblems problems each, in bank-row order). Each computes its rows' similarities with the
// query patches of their problems (row_gemm, into a buffer that stays in cache) and solves their
// problems at once from it: the GEMM's result never goes to memory and the cost reads hit cache.
//
// Columns (FwdArgs::sim): query b's first 8*floor(P/8) patches in its own 8-column groups, its
// other P mod 8 patches in a rest block shared by all queries. A row computes only the own groups
// of the queries that index it (and the rest block): with a random index a query meets about 63%
// of the bank, and the GEMM was about 40% of the forward. A chunk where that leaves little to skip
// runs the dense GEMM: its tiles are wider, and the group tiles (half vectors, 8 floats) are half
// as fast per FLOP where 512-bit FMAs run at full width (Zen 5: dense 2.5 ms vs 3.7 ms for the 2/3
// of the groups a random index needs, at the CPU benchmark shape). So the dense GEMM runs from 45%
// of the groups there (wide_simd()), from 90% elsewhere (Zen 4, AVX2).
constexpr int64_t kMaxChunkFloats = 1 << 16;  // similarities of one chunk (cache-sized)

int64_t fused_max_rows(const FwdArgs<float>& A) {
  return std::max<int64_t>(1, kMaxChunkFloats / (A.P * row_gemm::padded(A.B * A.P)));
}

// The work items of solve_fused: bank rows [r0, r1), about kChunkProblems problems each.
std::vector<std::pair<int64_t, int64_t>> fused_chunks(const FwdArgs<float>& A, const RowOrder& ro, int64_t R) {
  constexpr int64_t kChunkProblems = 256;
  const int64_t max_rows = fused_max_rows(A);
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t r0 = 0, r1; r0 < R; r0 = r1) {
    r1 = r0 + 1;
    while (r1 < R && r1 - r0 < max_rows && ro.start[r1] - ro.start[r0] < kChunkProblems) ++r1;
    if (ro.start[r1] > ro.start[r0]) chunks.emplace_back(r0, r1);
  }
  return chunks;
}

// work(C, c): chunk c's problems order[ro.start[r0] .. ro.start[r1]), with C.sim their similarities.
template <typename Work>
void solve_fused(FwdArgs<float> A, const RowOrder& ro, const std::vector<std::pair<int64_t, int64_t>>& chunks,
                 const Work& work) {
  const int64_t dense_from = wide_simd() ? 45 : 90;  // percent of a chunk's groups
  const int64_t P = A.P, D = A.D, BP = A.B * P, ldb = row_gemm::padded(BP);
  A.sim_own = P / row_gemm::kH * row_gemm::kH;
  A.sim_ld = ldb;
  std::vector<int64_t> column(BP);
  for (int64_t c = 0; c < BP; ++c) column[c] = ot::sim_column(A, c / P, static_cast<int>(c % P));
  std::vector<float> qt(D * ldb);
  row_gemm::pack_transposed(A.query, BP, D, ldb, qt.data(), column.data());
  std::vector<float> qg(D * ldb);  // the same, group by group (row_gemm::multiply_groups)
  row_gemm::pack_groups(qt.data(), D, ldb, qg.data());
  const int64_t max_rows = fused_max_rows(A);
  // one similarity buffer (and group list) per thread for all its chunks (allocating per chunk
  // page-faulted each time once the allocator returned the memory: +25% forward time)
#ifdef _OPENMP
  const int64_t threads = omp_get_max_threads();
#else
  const int64_t threads = 1;
#endif
  const int64_t chunk_floats = max_rows * P * ldb, row_groups_max = ldb / row_gemm::kH;
  std::vector<float> scratch(threads * chunk_floats);
  std::vector<int32_t> group_lists(threads * max_rows * row_groups_max);
  std::vector<int> group_counts(threads * max_rows);
  parallel_items(static_cast<int64_t>(chunks.size()), [&](int64_t chunk) {
    const auto [r0, r1] = chunks[chunk];
#ifdef _OPENMP
    const int64_t thread = omp_get_thread_num();
#else
    const int64_t thread = 0;
#endif
    float* sim = scratch.data() + thread * chunk_floats;
    int32_t* groups = group_lists.data() + thread * max_rows * row_groups_max;
    int* counts = group_counts.data() + thread * max_rows;
    int64_t total = 0;
    for (int64_t r = r0; r < r1; ++r)
      total += counts[r - r0] = row_groups(A, ro, r, ldb, groups + (r - r0) * row_groups_max);
    if (100 * total >= dense_from * (r1 - r0) * row_groups_max) {
      row_gemm::multiply(A.bank + r0 * P * D, (r1 - r0) * P, D, qt.data(), ldb, sim);
    } else {
      for (int64_t r = r0; r < r1; ++r)
        row_gemm::multiply_groups(A.bank + r * P * D, P, D, qg.data(), ldb, groups + (r - r0) * row_groups_max,
                                  counts[r - r0], sim + (r - r0) * P * ldb);
    }
    FwdArgs<float> C = A;
    C.sim = sim;
    C.sim_r0 = r0;
    work(C, chunk);
  });
}

// Pass 1 records kHorizon iterations and saves the states after kSaveAt (a little above and
// below what the group rules need at the method's settings, see ot_similarity_group_lanes.h);
// none for tol <= 0, where every group runs max_iter.
template <int NL, int FIXP>
void solve_group_lanes(const FwdArgs<float>& A, const RowOrder& ro, int64_t R, bool fused, int stop) {
  constexpr int64_t kHorizon = 32, kSaveAt = 20;
  const int64_t Q = A.B * A.M;
  std::vector<std::pair<int64_t, int64_t>> chunks, items;  // bank rows (fused); positions
  if (fused) {
    chunks = fused_chunks(A, ro, R);
    for (auto [r0, r1] : chunks) items.emplace_back(ro.start[r0], ro.start[r1]);
  } else {
    items = blocks_of({{0, Q}});
  }
  using GL = ot::GroupLanes<NL, FIXP>;
  GL gl(A, ro.order.data(), stop, ot::lane_slots(items, NL));
  gl.saved.reset(new typename GL::V[gl.n_slots() * gl.sv]);
  gl.horizon = A.tol > 0 ? std::min<int64_t>({A.max_iter, kHorizon, gl.segment_cap()}) : 0;
  gl.saved_at = std::min(gl.horizon, kSaveAt);
  gl.hist.reset(new float[gl.horizon * Q]);
  if (fused) {
    solve_fused(A, ro, chunks, [&](const FwdArgs<float>& C, int64_t c) { group_record(gl, C, c); });
  } else {
    parallel_items(static_cast<int64_t>(items.size()), [&](int64_t c) { group_record(gl, A, c); });
  }
  if (gl.horizon > 0) {
    gl.decide(0, gl.horizon);
    gl.extend([](int64_t n, const auto& fn) { parallel_items(n, fn); });
  } else {
    std::fill(gl.T.begin(), gl.T.end(), A.max_iter);
  }
  parallel_blocks(blocks_of({{0, gl.n_slots()}}), [&](int64_t s0, int64_t s1) { group_finish(gl, s0, s1); });
}

// The forward of every problem. Costs: when a GEMM of every bank patch with every query patch is
// little more work than the B*M*P*P dot products the problems need (R <= 2M: the bank is about as
// large as the sets each query is matched with, as for the confusing-class negatives), from a GEMM
// (fused per chunk of bank rows on the float stop=problem path, else one at::mm when its buffer is
// moderate); else dot products in place. A GEMM runs several times faster than per-problem dot
// products, which dominated the forward.
template <typename T>
void run_fwd(FwdArgs<T> A, const at::Tensor& query, const at::Tensor& bank, int stop) {
  constexpr int64_t kMaxSimElements = int64_t(1) << 26;
  const int64_t Q = A.B * A.M, R = bank.size(0);
  const bool dense = R <= 2 * A.M;
  const Workers<T>& W = workers_for(T(), A.P);
  const RowOrder ro = problem_order(A.index, Q, R);
  if constexpr (std::is_same_v<T, float>) {
    const SolveFn lanes = lanes_solver(T(), A.P);
    // (the lanes gather a chunk's similarities with int32 offsets, below max(2^16, P * B*P))
    const bool int32_ok = A.P * row_gemm::padded(A.B * A.P) < (int64_t(1) << 30);
    const bool fused = dense && !ro.start.empty() && int32_ok;
    if (stop == ot::kStopProblem && lanes != nullptr) {
      if (fused) {
        const auto chunks = fused_chunks(A, ro, R);
        return solve_fused(A, ro, chunks, [&](const FwdArgs<float>& C, int64_t c) {
          lanes(C, ro.order.data(), ro.start[chunks[c].first], ro.start[chunks[c].second]);
        });
      }
      parallel_blocks(blocks_of({{0, Q}}), [&](int64_t a, int64_t b) { lanes(A, ro.order.data(), a, b); });
      return;
    }
    const GroupSolveFn groups = group_lanes_solver(A.P);
    if (groups != nullptr) return groups(A, ro, R, fused, stop);
  }
  at::Tensor sim;
  if (dense && R * A.P * A.B * A.P <= kMaxSimElements) {
    sim = at::mm(bank.view({R * A.P, A.D}), query.view({A.B * A.P, A.D}).t());
    A.sim = sim.data_ptr<T>();
    A.sim_ld = A.B * A.P;
    A.sim_own = A.P;
  }
  if (stop == ot::kStopProblem) {
    parallel_blocks(blocks_of({{0, Q}}), [&](int64_t a, int64_t b) { W.solve(A, ro.order.data(), a, b); });
  } else {
    solve_groups<T>(A, W, ro.order, stop);
  }
}

std::tuple<at::Tensor, at::Tensor> ot_similarity_fwd_cpu(const at::Tensor& query, const at::Tensor& bank,
                                                         const at::Tensor& index, const at::Tensor& choice,
                                                         int64_t select, int64_t k, double eps,
                                                         int64_t max_iter, double tol, int64_t stop) {
  use_torch_threads();  // torch's thread count for this thread's OpenMP regions (common/threads.h)
  const ot_host::Shape sh = ot_host::check_fwd_inputs(query, bank, index, choice, select, k, eps, max_iter, tol,
                                                      stop, c10::DeviceType::CPU);
  at::Tensor out, aux;
  std::tie(out, aux) = ot_host::alloc_fwd_outputs(query, index, sh, select);
  if (sh.B * sh.M == 0) return {out, aux};
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "ot_similarity_fwd_cpu", [&] {
    const FwdArgs<scalar_t> A =
        ot_host::make_fwd_args<scalar_t>(query, bank, index, choice, out, aux, sh, select, k, eps, max_iter, tol);
    run_fwd<scalar_t>(A, query, bank, static_cast<int>(stop));
  });
  return {out, aux};
}

}  // namespace
}  // namespace concept_kernels

TORCH_LIBRARY_IMPL(concept_kernels, CPU, m) {
  m.impl("ot_similarity_fwd", &concept_kernels::ot_similarity_fwd_cpu);
}
