// The group stopping rules (stop="row" / "all") on the lane solver of ot_similarity_lanes.h (float,
// host only): every problem of a group runs the same number of iterations T_g, the first iteration
// whose group mean err (err = sum_i |f_i - f_i_old|, summed over the group in problem order p) is
// < tol, or max_iter.
//
// The problems never interact: only T_g is shared, and a problem's err history depends on the
// problem alone. So instead of stepping a group's problems in lockstep (their states would go to
// memory and back at every step: ~800 bytes per problem), the driver runs each lane group (NL
// problems, one per SIMD lane, state in registers and L1) straight through, in two passes:
//
//   1. record: every problem runs `horizon` iterations (32; no lane stops) and writes its err of
//      each iteration to hist[p * horizon + t]; each lane group's whole state (costs, kernel,
//      potentials) is saved after `saved_at` iterations (20) on the way. Each group's mean err per
//      iteration is summed in p order (deterministic, independent of threads and lane grouping)
//      and gives T_g; groups still running are recorded further (extend: segments doubling the
//      iterations, from the saved states, into a second buffer) until decided.
//   2. finish: every lane group resumes from its saved state (or restarts from its saved costs if
//      one of its lanes' groups stopped before saved_at) and runs exactly T_g iterations per lane
//      (lanes of different rows stop at their own group's T_g), without err; then its outputs.
//
// A lane's trajectory depends on its own problem only (the 8- and 16-lane groups agree bitwise),
// f_step's update is the same in every mode and a restored state is bitwise the stored one, so
// pass 2 reproduces pass 1's iterates exactly: the result is that of running each group in
// lockstep to T_g. At the CPU benchmark shape (31,680 problems, eps 0.01, tol 1e-3) every group
// stops after ~24 iterations: 32 recorded + ~4 resumed, all lanes busy, where a lane group of
// stop="problem" waits ~38 iterations for its slowest lane.
#pragma once

#if defined(__CUDACC__)
#error "ot_similarity_group_lanes.h is host-only (GCC vector extensions)"
#endif

#include "ot_similarity/ot_similarity_lanes.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace concept_kernels {
namespace ot {

// Where the driver's lane groups ("slots") lie in the problem order: slot s holds the problems
// order[pos[s] .. pos[s] + used[s]). Each work item [n0, n1) of positions is cut into slots of NL
// from n0; first[c] is the first slot of work item c.
struct LaneSlots {
  std::vector<int64_t> pos, first;
  std::vector<int> used;
};

inline LaneSlots lane_slots(const std::vector<std::pair<int64_t, int64_t>>& items, int NL) {
  LaneSlots ls;
  for (auto [n0, n1] : items) {
    ls.first.push_back(static_cast<int64_t>(ls.pos.size()));
    for (int64_t n = n0; n < n1; n += NL) {
      ls.pos.push_back(n);
      ls.used.push_back(static_cast<int>(std::min<int64_t>(NL, n1 - n)));
    }
  }
  ls.first.push_back(static_cast<int64_t>(ls.pos.size()));
  return ls;
}

// Group of problem p (the contract's stop: 1 row -> b = p / M, 2 all -> 0) and the groups' size.
struct StopGroups {
  int64_t M, n_groups, size;
  StopGroups(int stop, int64_t B, int64_t M_) : M(M_), n_groups(stop == kStopRow ? B : 1),
                                               size(stop == kStopRow ? M_ : B * M_) {}
  int64_t of(int64_t p) const { return n_groups == 1 ? 0 : p / M; }
};

template <int NL, int FIXP>
struct GroupLanes {
  using S = SinkhornLanes<NL, FIXP>;
  using V = typename S::V;
  using VI = typename S::VI;
  static constexpr int G = 4;  // lane groups stepped in turn (their dependency chains overlap)

  const FwdArgs<float>& A;
  const int64_t* order;
  StopGroups groups;
  LaneSlots slots;
  int64_t Q, sv;  // problems; vectors of one saved lane state
  int64_t horizon = 0;   // iterations recorded by pass 1
  int64_t saved_at = 0;  // iterations of the saved states (<= horizon)
  // (uninitialised: every entry read is written first; zeroing them cost ~5% of the forward)
  std::unique_ptr<V[]> saved;      // slot s's state after saved_at iterations, at s * sv
  std::unique_ptr<V[]> ext;        // slot s's state at the end of the last extension segment
  std::unique_ptr<float[]> hist;   // err of iteration t0 + 1 + i of problem p at p * (t1 - t0) + i
  std::vector<int> T;              // iterations of each group, 0 while undecided

  GroupLanes(const FwdArgs<float>& A_, const int64_t* order_, int stop, LaneSlots ls)
      : A(A_), order(order_), groups(stop, A_.B, A_.M), slots(std::move(ls)), Q(A_.B * A_.M),
        sv(S::state_vectors(A_.P)), T(groups.n_groups, 0) {}

  int64_t n_slots() const { return static_cast<int64_t>(slots.pos.size()); }
  const int64_t* probs(int64_t s) const { return order + slots.pos[s]; }

  // Iterations a segment may record: hist holds at most kHistFloats floats.
  int64_t segment_cap() const {
    constexpr int64_t kHistFloats = int64_t(1) << 24;
    return std::max<int64_t>(1, kHistFloats / std::max<int64_t>(Q, 1));
  }

  // Run x[0 .. n) (n <= G) for iterations t0 + 1 .. t1, recording each used lane's err at
  // hist[p * (t1 - t0) + t - t0] (a lane group's problems' records stay in L1 while it runs), and
  // storing the states to `to` after save_at iterations (when t0 <= save_at <= t1).
  void record(S* x, const int64_t* slot, int n, int64_t t0, int64_t t1, int64_t save_at, V* to) {
    const int64_t H = t1 - t0;
    float* rec[G][NL];
    for (int h = 0; h < n; ++h)
      for (int l = 0; l < slots.used[slot[h]]; ++l) rec[h][l] = hist.get() + probs(slot[h])[l] * H;
    for (int64_t t = 0; t <= H; ++t) {
      if (t0 + t == save_at)
        for (int h = 0; h < n; ++h) x[h].store_state(to + slot[h] * sv);
      if (t == H) break;
      for (int h = 0; h < n; ++h) {
        const V err = x[h].iterate_err();
        for (int l = 0; l < slots.used[slot[h]]; ++l) rec[h][l][t] = err[l];
      }
    }
  }

  // Pass 1 on the slots of work item `item`, whose costs A_item provides (a GEMM chunk or dot
  // products): iterations 1 .. horizon, the states saved after saved_at.
  void record_item(const FwdArgs<float>& A_item, int64_t item) {
    S x[G];
    int64_t slot[G];
    for (S& s : x) s.setup(A.P, A.eps);
    for (int64_t s0 = slots.first[item]; s0 < slots.first[item + 1]; s0 += G) {
      const int n = static_cast<int>(std::min<int64_t>(G, slots.first[item + 1] - s0));
      for (int h = 0; h < n; ++h) {
        slot[h] = s0 + h;
        x[h].load_costs(A_item, probs(slot[h]), slots.used[slot[h]]);
      }
      record(x, slot, n, 0, horizon, saved_at, saved.get());
    }
  }

  // The first iteration in t0 + 1 .. t1 whose group mean err is < tol, for each undecided group
  // (summed in p order; a NaN mean stops as in the reference: not >= tol); t1 = max_iter decides.
  void decide(int64_t t0, int64_t t1) {
    for (int64_t g = 0; g < groups.n_groups; ++g) {
      if (T[g] > 0) continue;
      const int64_t H = t1 - t0, a = g * groups.size, b = a + groups.size;
      std::vector<float> sum(H, 0.0f);
      for (int64_t p = a; p < b; ++p)
        for (int64_t t = 0; t < H; ++t) sum[t] += hist[p * H + t];
      for (int64_t t = 0; t < H && T[g] == 0; ++t)
        if (!(sum[t] / static_cast<float>(groups.size) >= A.tol)) T[g] = static_cast<int>(t0 + t + 1);
      if (T[g] == 0 && t1 >= A.max_iter) T[g] = A.max_iter;
    }
  }

  bool slot_undecided(int64_t s) const {
    const int64_t* pr = probs(s);
    for (int l = 0; l < slots.used[s]; ++l)
      if (T[groups.of(pr[l])] == 0) return true;
    return false;
  }

  // Record iterations t0 + 1 .. t1 of the slots todo[w0 .. w1) from their states in src, saving
  // the end states to ext.
  void extend_slots(const std::vector<int64_t>& todo, int64_t w0, int64_t w1, int64_t t0, int64_t t1,
                    const V* src) {
    S x[G];
    int64_t slot[G];
    for (int64_t w = w0; w < w1; w += G) {
      const int n = static_cast<int>(std::min<int64_t>(G, w1 - w));
      for (int h = 0; h < n; ++h) {
        slot[h] = todo[w + h];
        x[h].setup(A.P, A.eps);
        x[h].load_state(src + slot[h] * sv);
      }
      record(x, slot, n, t0, t1, t1, ext.get());
    }
  }

  // Extend the undecided groups' records beyond the horizon until every group is decided, in
  // segments that double the iterations done (at most segment_cap() more): the first from the
  // saved states (kept for pass 2; it records saved_at + 1 .. horizon again), then from each
  // segment's end states. par(n, fn) runs fn(i) for i < n, in parallel.
  template <typename Par>
  void extend(const Par& par) {
    constexpr int64_t kItem = 2 * G;  // slots per work item
    int64_t done = saved_at, known = horizon;
    while (std::find(T.begin(), T.end(), 0) != T.end()) {
      std::vector<int64_t> todo;
      for (int64_t s = 0; s < n_slots(); ++s)
        if (slot_undecided(s)) todo.push_back(s);
      const bool first = !ext;
      if (first) ext.reset(new V[n_slots() * sv]);
      const int64_t t1 = std::min<int64_t>({A.max_iter, 2 * std::max<int64_t>(known, 1), done + segment_cap()});
      hist.reset(new float[static_cast<size_t>((t1 - done) * Q)]);
      const int64_t n_todo = static_cast<int64_t>(todo.size());
      const V* src = first ? saved.get() : ext.get();
      par((n_todo + kItem - 1) / kItem, [&](int64_t i) {
        extend_slots(todo, i * kItem, std::min(n_todo, (i + 1) * kItem), done, t1, src);
      });
      decide(done, t1);
      done = known = t1;
    }
  }

  // Pass 2 on slots [s0, s1): each lane to its group's T_g iterations, resuming from the saved
  // states where every lane of the slot needs at least saved_at iterations (else from the costs,
  // f = g = 0), without err; then the outputs.
  void finish(int64_t s0, int64_t s1) const {
    S x[G];
    VI limit[G];
    int64_t start[G];
    for (int64_t w = s0; w < s1; w += G) {
      const int n = static_cast<int>(std::min<int64_t>(G, s1 - w));
      int64_t first = saved_at, most = 0;
      for (int h = 0; h < n; ++h) {
        const int64_t s = w + h;
        limit[h] = VI{};
        bool resume = true;
        for (int l = 0; l < slots.used[s]; ++l) {
          limit[h][l] = T[groups.of(probs(s)[l])];
          most = std::max<int64_t>(most, limit[h][l]);
          resume &= limit[h][l] >= saved_at;
        }
        x[h].setup(A.P, A.eps);
        x[h].load_state(saved.get() + s * sv);
        if (!resume) x[h].reset(slots.used[s]);
        start[h] = resume ? saved_at : 0;
        first = std::min(first, start[h]);
      }
      for (int64_t it = first; it < most; ++it)
        for (int h = 0; h < n; ++h) {
          if (it < start[h]) continue;
          x[h].live &= limit[h] > static_cast<int>(it);
          if (S::any(x[h].live)) x[h].iterate_no_err();
        }
      for (int h = 0; h < n; ++h) x[h].write_outputs(A, probs(w + h), slots.used[w + h]);
    }
  }
};

}  // namespace ot
}  // namespace concept_kernels
