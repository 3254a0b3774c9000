// CPU backward of ot_similarity (docs/OT_BACKEND_CONTRACT.md):
//
//   bwd(grad_out, query, bank, index, aux, select) -> grad_query (B, P, D)
//   grad_query[b, i, :] = sum over the problems p = (b, m) and their selected plan entries (i, j) of
//                         grad_out x bank[index[p], j, :]   (select=cost: every (i, j), weight
//                         grad_out[p] x plan_ij)
//
// How the work is laid out (the forward has just streamed the bank; this pass reads it once more):
// * the problems in bank-row order (ot_similarity_order.h) are cut into PIECES whose bank rows fit
//   in half of L2;
// * a piece's entries (output row (b, i), bank patch row, weight) are bucketed by output row
//   (counting sort, stable), and each output row then adds its bucket with its D values held in
//   registers: one load and one store per output vector per piece instead of one per entry (the
//   per-entry multiply-adds into memory were bound by their loads and stores);
// * when grad_query is too large to stay in cache (a large batch B), the problems go in query order
//   instead (run_queries): each query's entries are bucketed by its P output rows, written once;
//   in bank-row order each entry would load and store its output row from memory (and bucketing
//   over all B*P rows per piece cost O(B*P) per piece: 684 ms at B=4000, M=8 vs 46 ms at B=8,
//   M=4000 for the same 32,000 problems);
// * pieces are grouped into at most kMaxSpans SPANS, fixed by the shapes (never by the thread
//   count): a span's pieces run in order on one thread into the span's own accumulator (span 0:
//   grad_query itself), then the spans are added in span order. Every element is summed in one
//   fixed order whatever the thread count: bitwise reproducible, no atomics.
#include "ot_similarity/ot_similarity_host.h"
#include "ot_similarity/ot_similarity_order.h"
#include "ot_similarity/ot_similarity_problem.h"

#include "common/simd.h"
#include "common/threads.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace concept_kernels {
namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64, kMaxVecs = 16;  // 16 zmm accumulators of the 32 registers
#else
constexpr int kVecBytes = 32, kMaxVecs = 8;  // 8 ymm of 16
#endif
constexpr int64_t kPieceBytes = int64_t(256) << 10;  // bank rows per piece (it and the next fit in L2)
constexpr int64_t kPieceEntries = int64_t(1) << 14;  // entries per piece (its bucket arrays stay in L2)
constexpr int64_t kMaxSpans = 16;                    // independent accumulators (parallelism)
constexpr int64_t kSpansBytes = int64_t(64) << 20;   // all span accumulators together at most

template <typename T>
struct Entry {
  const T* y;  // bank patch row (D values)
  T c;         // its weight
};

template <typename T>
struct BwdJob : ot_host::BwdPtrs<T> {  // go, bank, index, aux_idx, aux_pi, gq
  const int64_t* order;                // problems in bank-row order
  int64_t B, M, P, D, kk, select;
  int64_t per;  // entries per problem: kk, or P * P for select=cost
  uint8_t row_of[ot::kMaxP * ot::kMaxP], col_of[ot::kMaxP * ot::kMaxP];  // flat e -> (i, j)
};

template <typename X, typename T>
inline X loadu(const T* p) {
  X x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
template <typename X, typename T>
inline void storeu(T* p, X x) {
  std::memcpy(p, &x, sizeof x);
}

// out[d0, d0 + NV W + NH W/2) += sum_k e[k].c e[k].y[same columns], k ascending, the sums held in
// NV vectors (+ NH half vectors) of registers.
template <typename T, int NV, int NH>
inline void accumulate_block(T* out, const Entry<T>* e, int64_t n, int64_t d0) {
  constexpr int W = kVecBytes / static_cast<int>(sizeof(T));
  using V = typename Vec<T, W>::type;
  using H = typename Vec<T, W / 2>::type;
  V acc[NV > 0 ? NV : 1];
  H half{};
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) acc[v] = loadu<V>(out + d0 + v * W);
  if constexpr (NH > 0) half = loadu<H>(out + d0 + NV * W);
  for (int64_t k = 0; k < n; ++k) {
    const T* y = e[k].y + d0;
    const V c = broadcast<V>(e[k].c);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[v] += c * loadu<V>(y + v * W);
    if constexpr (NH > 0) half += broadcast<H>(e[k].c) * loadu<H>(y + NV * W);
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) storeu(out + d0 + v * W, acc[v]);
  if constexpr (NH > 0) storeu(out + d0 + NV * W, half);
}

// accumulate_block<T, nv, nh> for a runtime nv < kMaxVecs
template <typename T, int NV = 0>
inline void accumulate_rest(int nv, bool nh, T* out, const Entry<T>* e, int64_t n, int64_t d0) {
  if constexpr (NV < kMaxVecs) {
    if (nv != NV) return accumulate_rest<T, NV + 1>(nv, nh, out, e, n, d0);
    if (nh) return accumulate_block<T, NV, 1>(out, e, n, d0);
    return accumulate_block<T, NV, 0>(out, e, n, d0);
  }
}

// out[0, D) += sum_k e[k].c e[k].y[0, D): blocks of kMaxVecs vectors, then the rest in one block,
// then the last columns (fewer than half a vector) one by one.
template <typename T>
inline void accumulate_row(T* out, const Entry<T>* e, int64_t n, int64_t D) {
  constexpr int W = kVecBytes / static_cast<int>(sizeof(T));
  int64_t d = 0;
  for (; D - d >= kMaxVecs * W; d += kMaxVecs * W) accumulate_block<T, kMaxVecs, 0>(out, e, n, d);
  const int nv = static_cast<int>((D - d) / W);
  const bool nh = (D - d) % W >= W / 2;
  if (nv > 0 || nh) accumulate_rest<T>(nv, nh, out, e, n, d);
  for (d += nv * W + (nh ? W / 2 : 0); d < D; ++d) {
    T s = out[d];
    for (int64_t k = 0; k < n; ++k) s += e[k].c * e[k].y[d];
    out[d] = s;
  }
}

template <typename T>
struct PieceScratch {
  std::vector<Entry<T>> raw, sorted;
  std::vector<int32_t> key;
  std::vector<int64_t> start;
  std::vector<std::pair<int32_t, int64_t>> runs;  // (output row, end of its entries in sorted)
};

// Buckets n entries by output row (counting sort over the `rows` keys, stable: entries keep their
// order within a row) into s.sorted and lists the rows that have entries, ascending, with the end
// of their entries, in s.runs.
template <typename T>
void bucket_entries(PieceScratch<T>& s, int64_t n, int64_t rows) {
  s.runs.clear();
  s.start.assign(rows + 1, 0);
  for (int64_t x = 0; x < n; ++x) ++s.start[s.key[x] + 1];
  for (int64_t r = 0; r < rows; ++r) s.start[r + 1] += s.start[r];
  for (int64_t r = 0; r < rows; ++r)
    if (s.start[r + 1] > s.start[r]) s.runs.emplace_back(static_cast<int32_t>(r), s.start[r + 1]);
  std::vector<int64_t>& next = s.start;  // rows' next free slots
  for (int64_t x = 0; x < n; ++x) s.sorted[next[s.key[x]]++] = s.raw[x];
}

// The entries of problem p (keys: output rows row0 + i) into s.raw / s.key from position t; returns
// the position after them.
template <typename T>
inline int64_t add_entries(const BwdJob<T>& J, int64_t p, int64_t row0, PieceScratch<T>& s, int64_t t) {
  const int64_t P = J.P, D = J.D;
  const T* Y = J.bank + J.index[p] * P * D;
  if (J.select == ot::kSelectCost) {
    const T w = J.go[p];
    const T* pi = J.aux_pi + p * P * P;
    for (int64_t i = 0; i < P; ++i)
      for (int64_t j = 0; j < P; ++j, ++t) {
        s.key[t] = static_cast<int32_t>(row0 + i);
        s.raw[t] = {Y + j * D, w * pi[i * P + j]};
      }
  } else {
    for (int64_t k = 0; k < J.kk; ++k, ++t) {
      const int64_t e = J.aux_idx[p * J.kk + k];
      s.key[t] = static_cast<int32_t>(row0 + J.row_of[e]);
      s.raw[t] = {Y + J.col_of[e] * D, J.go[p * J.kk + k]};
    }
  }
  return t;
}

// Query order, for outputs too large to stay in cache (see run_bwd): queries [b0, b1), each adding
// its M problems' entries (p ascending) into its own P output rows, bucketed by row. The threads
// own distinct rows: no accumulators to add up, every element summed in one fixed order.
template <typename T>
CK_CPU_WORKER void run_queries(const BwdJob<T>& J, int64_t b0, int64_t b1, PieceScratch<T>& s) {
  const int64_t P = J.P, D = J.D, n = J.M * J.per;
  s.raw.resize(n);
  s.sorted.resize(n);
  s.key.resize(n);
  for (int64_t b = b0; b < b1; ++b) {
    int64_t t = 0;
    for (int64_t p = b * J.M; p < (b + 1) * J.M; ++p) t = add_entries(J, p, 0, s, t);
    bucket_entries(s, n, P);
    int64_t a = 0;
    for (auto [r, e] : s.runs) {
      accumulate_row(J.gq + (b * P + r) * D, s.sorted.data() + a, e - a, D);
      a = e;
    }
  }
}

// Bytes [begin, end) of the bank rows of problems order[m0 .. m1) (they come in row order), or an
// empty range when those rows are not contiguous enough to be worth fetching as one range.
template <typename T>
std::pair<const char*, const char*> rows_range(const BwdJob<T>& J, int64_t m0, int64_t m1) {
  if (m1 <= m0) return {nullptr, nullptr};
  const int64_t row_bytes = J.P * J.D * static_cast<int64_t>(sizeof(T));
  const char* base = reinterpret_cast<const char*>(J.bank);
  const char* begin = base + J.index[J.order[m0]] * row_bytes;
  const char* end = base + (J.index[J.order[m1 - 1]] + 1) * row_bytes;
  if (end - begin > 2 * kPieceBytes) return {nullptr, nullptr};
  return {begin, end};
}

// The piece of problems order[n0 .. n1) into acc (B * P rows of D), fetching the bank rows of the
// next piece (problems [n1, n2)) into L2 meanwhile. (A worker: everything inlined into it.)
template <typename T>
CK_CPU_WORKER void run_piece(const BwdJob<T>& J, int64_t n0, int64_t n1, int64_t n2, T* acc, PieceScratch<T>& s) {
  constexpr int64_t kAhead = 16;  // problems ahead whose index / selection / grad_out are prefetched
  const int64_t P = J.P, D = J.D, BP = J.B * P, n = (n1 - n0) * J.per;
  s.raw.resize(n);
  s.sorted.resize(n);
  s.key.resize(n);
  int64_t t = 0;
  for (int64_t q = n0; q < n1; ++q) {
    if (q + kAhead < n1) {  // in bank-row order, the problems' own data is scattered
      const int64_t pf = J.order[q + kAhead];
      __builtin_prefetch(J.index + pf);
      if (J.select == ot::kSelectCost) {
        __builtin_prefetch(J.go + pf);
        __builtin_prefetch(J.aux_pi + pf * P * P);
      } else {
        __builtin_prefetch(J.go + pf * J.kk);
        __builtin_prefetch(J.aux_idx + pf * J.kk);
        __builtin_prefetch(J.aux_idx + pf * J.kk + J.kk - 1);
      }
    }
    const int64_t p = J.order[q];
    t = add_entries(J, p, (p / J.M) * P, s, t);
  }
  bucket_entries(s, n, BP);
  auto [pf, pf_end] = rows_range(J, n1, n2);
  const int64_t n_runs = static_cast<int64_t>(s.runs.size());
  const int64_t pf_lines = (pf_end - pf) / 64, pf_step = (pf_lines + n_runs - 1) / std::max<int64_t>(n_runs, 1);
  int64_t a = 0;
  for (auto [r, b] : s.runs) {
    accumulate_row(acc + r * D, s.sorted.data() + a, b - a, D);
    a = b;
    for (int64_t l = 0; l < pf_step && pf < pf_end; ++l, pf += 64) __builtin_prefetch(pf, 0, 2);
  }
}

// Pieces [n0, n1) of the problem order: a new piece starts at a new bank row once the piece's rows
// would exceed kPieceBytes, or anywhere once its entries would exceed kPieceEntries. Walks the
// runs of one bank row (their ends from the row starts of the counting sort when it has them).
template <typename T>
std::vector<std::pair<int64_t, int64_t>> pieces_of(const BwdJob<T>& J, const ot::RowOrder& ro, int64_t Q) {
  const int64_t row_bytes = J.P * J.D * static_cast<int64_t>(sizeof(T));
  std::vector<std::pair<int64_t, int64_t>> pieces;
  int64_t n0 = 0, bytes = 0, entries = 0;
  auto cut = [&](int64_t q) {
    pieces.emplace_back(n0, q);
    n0 = q;
    bytes = entries = 0;
  };
  for (int64_t q0 = 0, q1; q0 < Q; q0 = q1) {
    const int64_t r = J.index[J.order[q0]];
    if (!ro.start.empty()) {
      q1 = ro.start[r + 1];
    } else {
      for (q1 = q0 + 1; q1 < Q && J.index[J.order[q1]] == r;) ++q1;
    }
    if (q0 > n0 && bytes + row_bytes > kPieceBytes) cut(q0);
    bytes += row_bytes;
    for (int64_t q = q0; q < q1;) {
      if (entries + J.per > kPieceEntries) {
        cut(q);
        bytes = row_bytes;
      }
      const int64_t take = std::min(q1 - q, (kPieceEntries - entries) / J.per);
      entries += take * J.per;
      q += take;
    }
  }
  if (Q > n0) pieces.emplace_back(n0, Q);
  return pieces;
}

// Bank-row order (pieces) when grad_query is small enough to stay in cache (the bank is then read
// about once); else query order: in bank-row order a large batch's output rows each take a few of
// a piece's entries and are loaded and stored from memory for them (2 row transfers per entry),
// where query order reads one bank row per entry and writes each output row once.
template <typename T>
void run_bwd(const BwdJob<T>& J, const ot::RowOrder& ro) {
  const int64_t Q = J.B * J.M, rows = J.B * J.P * J.D;
  if (rows * static_cast<int64_t>(sizeof(T)) > 2 * kPieceBytes) {
    constexpr int64_t kQueries = 16;  // per work item
    const int64_t n_items = (J.B + kQueries - 1) / kQueries;
#pragma omp parallel if (n_items > 1)
    {
      PieceScratch<T> scratch;
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < n_items; ++it)
        run_queries(J, it * kQueries, std::min(J.B, (it + 1) * kQueries), scratch);
    }
    return;
  }
  const std::vector<std::pair<int64_t, int64_t>> pieces = pieces_of(J, ro, Q);
  const int64_t n_pieces = static_cast<int64_t>(pieces.size());
  const int64_t by_memory = std::max<int64_t>(1, kSpansBytes / std::max<int64_t>(1, rows * sizeof(T)));
  const int64_t n_spans = std::max<int64_t>(1, std::min({kMaxSpans, n_pieces, by_memory}));
  std::unique_ptr<T[]> partial(new T[(n_spans - 1) * rows]);  // zeroed by the threads
  // static: each thread takes consecutive spans, so the piece after a span's last is its next work
#pragma omp parallel for schedule(static) if (n_spans > 1)
  for (int64_t span = 0; span < n_spans; ++span) {
    PieceScratch<T> scratch;
    T* acc = span == 0 ? J.gq : partial.get() + (span - 1) * rows;
    if (span > 0) std::fill(acc, acc + rows, T(0));
    for (int64_t c = span * n_pieces / n_spans; c < (span + 1) * n_pieces / n_spans; ++c)
      run_piece(J, pieces[c].first, pieces[c].second, c + 1 < n_pieces ? pieces[c + 1].second : Q, acc,
                    scratch);
  }
  if (n_spans == 1) return;
  constexpr int64_t kBlock = 4096;
#pragma omp parallel for schedule(static) if (rows > 4 * kBlock)
  for (int64_t x0 = 0; x0 < rows; x0 += kBlock)
    for (int64_t span = 1; span < n_spans; ++span) {
      const T* src = partial.get() + (span - 1) * rows;
      for (int64_t x = x0; x < std::min(rows, x0 + kBlock); ++x) J.gq[x] += src[x];
    }
}

at::Tensor ot_similarity_bwd_cpu(const at::Tensor& grad_out_in, const at::Tensor& query, const at::Tensor& bank,
                                 const at::Tensor& index, const at::Tensor& aux_in, int64_t select) {
  use_torch_threads();  // torch's thread count for this thread's OpenMP regions (common/threads.h)
  const ot_host::Shape sh =
      ot_host::check_bwd_inputs(grad_out_in, query, bank, index, aux_in, select, c10::DeviceType::CPU);
  const at::Tensor grad_out = grad_out_in.to(query.scalar_type()).contiguous();
  const at::Tensor aux = aux_in.contiguous();
  ot_host::check_bwd_aux(grad_out, aux, query, bank, index, sh, select, c10::DeviceType::CPU);
  at::Tensor gq = ot_host::alloc_bwd_output(query, sh);
  if (sh.B * sh.M == 0) return gq;
  const ot::RowOrder ro = ot::problem_order(index.data_ptr<int64_t>(), sh.B * sh.M, bank.size(0));
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "ot_similarity_bwd_cpu", [&] {
    BwdJob<scalar_t> J;
    static_cast<ot_host::BwdPtrs<scalar_t>&>(J) =
        ot_host::make_bwd_ptrs<scalar_t>(grad_out, bank, index, aux, gq, select);
    J.order = ro.order.data();
    J.B = sh.B;
    J.M = sh.M;
    J.P = sh.P;
    J.D = sh.D;
    J.kk = sh.kk;
    J.select = select;
    J.per = select == ot::kSelectCost ? sh.P * sh.P : sh.kk;
    for (int64_t e = 0; e < sh.P * sh.P; ++e) {
      J.row_of[e] = static_cast<uint8_t>(e / sh.P);
      J.col_of[e] = static_cast<uint8_t>(e % sh.P);
    }
    run_bwd(J, ro);
  });
  return gq;
}

}  // namespace
}  // namespace concept_kernels

TORCH_LIBRARY_IMPL(concept_kernels, CPU, m) {
  m.impl("ot_similarity_bwd", &concept_kernels::ot_similarity_bwd_cpu);
}
