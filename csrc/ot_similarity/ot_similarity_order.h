// The problems of ot_similarity in bank-row order, shared by the CPU forward and backward: walking
// them in this order reads each bank row (P x D) from memory about once.
#pragma once

#if defined(__CUDACC__)
#error "ot_similarity_order.h is host-only"
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

namespace concept_kernels {
namespace ot {

// order: the problems sorted by bank row index[p] (stable: p ascending within a row). Counting sort
// when the bank is not much larger than the number of problems (then start[r] .. start[r + 1] are
// the positions of row r's problems), else a stable sort (start empty).
struct RowOrder {
  std::vector<int64_t> order, start;
};

inline RowOrder problem_order(const int64_t* index, int64_t Q, int64_t R) {
  RowOrder ro;
  ro.order.resize(Q);
  if (R <= 4 * Q + 1024) {
    ro.start.assign(R + 1, 0);
    for (int64_t p = 0; p < Q; ++p) ++ro.start[index[p] + 1];
    for (int64_t r = 0; r < R; ++r) ro.start[r + 1] += ro.start[r];
    std::vector<int64_t> next(ro.start.begin(), ro.start.end() - 1);
    for (int64_t p = 0; p < Q; ++p) ro.order[next[index[p]]++] = p;
  } else {
    for (int64_t p = 0; p < Q; ++p) ro.order[p] = p;
    std::stable_sort(ro.order.begin(), ro.order.end(), [&](int64_t x, int64_t y) { return index[x] < index[y]; });
  }
  return ro;
}

}  // namespace ot
}  // namespace concept_kernels
