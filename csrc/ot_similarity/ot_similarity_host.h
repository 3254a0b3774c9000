// Host-side code shared by the ot_similarity launchers (ot_similarity_cpu.cpp, ot_similarity_cuda.cu):
// argument checks, output allocation, FwdArgs / backward pointer packing. Host only, no CUDA headers:
// compiles with g++ (CPU build) and nvcc. `dev` is the launcher's device type; where the CPU and CUDA
// launchers check differently (device placement, stop, the aux shape message, value ranges that
// read host memory) the branch on `dev` keeps each launcher's own check, message and order.
#pragma once

#include "ot_similarity/ot_similarity_problem.h"

#include "common/checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace concept_kernels {
namespace ot_host {

constexpr const char* kOp = "ot_similarity";

// values of an int64 CPU tensor lie in [0, upper) (a min/max pass that vectorizes; the first bad
// value is looked up only to report it)
inline void check_range(const at::Tensor& t, int64_t upper, const char* name) {
  const int64_t* d = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  if (n == 0) return;
  int64_t lo = d[0], hi = d[0];
  for (int64_t e = 1; e < n; ++e) {
    lo = std::min(lo, d[e]);
    hi = std::max(hi, d[e]);
  }
  if (lo >= 0 && hi < upper) return;
  const int64_t* bad = std::find_if(d, d + n, [upper](int64_t v) { return v < 0 || v >= upper; });
  TORCH_CHECK(false, kOp, ": ", name, " values must lie in [0, ", upper, "), got ", *bad);
}

// CPU: t is on the CPU; CUDA: t is on query's device
inline void check_placed(const at::Tensor& query, const at::Tensor& t, c10::DeviceType dev, const char* name) {
  if (dev == c10::DeviceType::CPU) {
    check_device(t, c10::DeviceType::CPU, kOp, name);
  } else {
    check_same_device(query, t, kOp, "query", name);
  }
}

inline void check_inputs(const at::Tensor& query, const at::Tensor& bank, const at::Tensor& index,
                         c10::DeviceType dev) {
  check_dim(query, 3, kOp, "query");
  check_dim(bank, 3, kOp, "bank");
  check_dim(index, 2, kOp, "index");
  check_dtype(query, {at::kFloat, at::kDouble}, kOp, "query");
  check_dtype(bank, {query.scalar_type()}, kOp, "bank");
  check_dtype(index, {at::kLong}, kOp, "index");
  if (dev == c10::DeviceType::CPU) {
    for (auto* t : {&query, &bank, &index}) check_device(*t, c10::DeviceType::CPU, kOp, "every input");
  } else {
    check_device(query, dev, kOp, "query");
    check_same_device(query, bank, kOp, "query", "bank");
    check_same_device(query, index, kOp, "query", "index");
  }
  check_contiguous(query, kOp, "query");
  check_contiguous(bank, kOp, "bank");
  check_contiguous(index, kOp, "index");
  const int64_t P = query.size(1);
  TORCH_CHECK(P >= 1 && P <= ot::kMaxP, kOp, ": the fused backends take 1 <= P <= ", ot::kMaxP,
              " patches, got query shape ", query.sizes());
  TORCH_CHECK(query.size(2) >= 1, kOp, ": query must have D >= 1, got shape ", query.sizes());
  check_size(bank, 1, P, kOp, "bank");
  check_size(bank, 2, query.size(2), kOp, "bank");
  check_size(index, 0, query.size(0), kOp, "index");
}

// the sizes both directions use; kk = selected entries per problem (fwd) / grad_out.size(2) (bwd)
struct Shape {
  int64_t B, P, D, M, kk;
};

inline Shape shape_of(const at::Tensor& query, const at::Tensor& index, int64_t kk) {
  return {query.size(0), query.size(1), query.size(2), index.size(1), kk};
}

// ---- forward ---------------------------------------------------------------------------------

inline Shape check_fwd_inputs(const at::Tensor& query, const at::Tensor& bank, const at::Tensor& index,
                              const at::Tensor& choice, int64_t select, int64_t k, double eps, int64_t max_iter,
                              double tol, int64_t stop, c10::DeviceType dev) {
  const bool cpu = dev == c10::DeviceType::CPU;
  check_inputs(query, bank, index, dev);
  TORCH_CHECK(select >= 0 && select <= 2, kOp, ": select must be 0 (sample), 1 (topk) or 2 (cost), got ", select);
  if (cpu) {
    TORCH_CHECK(stop >= 0 && stop <= 2, kOp, ": stop must be 0 (problem), 1 (row) or 2 (all), got ", stop);
  } else {
    TORCH_CHECK(stop == ot::kStopProblem, kOp,
                ": the cuda launcher implements stop=0 (problem) only, got stop=", stop,
                " (the triton backend implements row/all)");
  }
  TORCH_CHECK(eps > 0, kOp, ": eps must be > 0, got ", eps);
  TORCH_CHECK(max_iter >= 1, kOp, ": max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK(tol >= 0, kOp, ": tol must be >= 0, got ", tol);
  const Shape s = shape_of(query, index, select == ot::kSelectTopk ? k : 1);
  if (select != ot::kSelectCost)
    TORCH_CHECK(k >= 1 && k <= s.P * s.P, kOp, ": k must lie in [1, P*P = ", s.P * s.P, "], got ", k);
  if (cpu) check_range(index, bank.size(0), "index");
  if (select == ot::kSelectSample) {
    check_dtype(choice, {at::kLong}, kOp, "choice");
    check_placed(query, choice, dev, "choice");
    check_contiguous(choice, kOp, "choice");
    check_dim(choice, 2, kOp, "choice");
    check_size(choice, 0, s.B, kOp, "choice");
    check_size(choice, 1, s.M, kOp, "choice");
    if (cpu) check_range(choice, k, "choice");
  }
  return s;
}

// (out, aux): out (B, M, kk); aux = the plans (B, M, P, P) for select=cost, else the flat indices
// (B, M, kk) of the selected entries
inline std::tuple<at::Tensor, at::Tensor> alloc_fwd_outputs(const at::Tensor& query, const at::Tensor& index,
                                                            const Shape& s, int64_t select) {
  at::Tensor out = at::empty({s.B, s.M, s.kk}, query.options());
  at::Tensor aux = select == ot::kSelectCost ? at::empty({s.B, s.M, s.P, s.P}, query.options())
                                             : at::empty({s.B, s.M, s.kk}, index.options());
  return {out, aux};
}

template <class T>
ot::FwdArgs<T> make_fwd_args(const at::Tensor& query, const at::Tensor& bank, const at::Tensor& index,
                             const at::Tensor& choice, const at::Tensor& out, const at::Tensor& aux, const Shape& s,
                             int64_t select, int64_t k, double eps, int64_t max_iter, double tol) {
  ot::FwdArgs<T> A;
  A.query = query.data_ptr<T>();
  A.bank = bank.data_ptr<T>();
  A.index = index.data_ptr<int64_t>();
  A.choice = select == ot::kSelectSample ? choice.data_ptr<int64_t>() : nullptr;
  A.sim = nullptr;
  A.sim_r0 = A.sim_ld = A.sim_own = 0;
  A.out = out.data_ptr<T>();
  A.aux_idx = select == ot::kSelectCost ? nullptr : aux.data_ptr<int64_t>();
  A.aux_pi = select == ot::kSelectCost ? aux.data_ptr<T>() : nullptr;
  A.B = s.B;
  A.M = s.M;
  A.P = static_cast<int>(s.P);
  A.D = static_cast<int>(s.D);
  A.select = static_cast<int>(select);
  A.k = static_cast<int>(k);
  A.kk = static_cast<int>(s.kk);
  A.max_iter = static_cast<int>(std::min<int64_t>(max_iter, 1 << 30));
  A.eps = static_cast<T>(eps);
  A.tol = static_cast<T>(tol);
  return A;
}

// ---- backward --------------------------------------------------------------------------------

// the checks on the raw arguments, before grad_out / aux are converted (kk = grad_out.size(2))
inline Shape check_bwd_inputs(const at::Tensor& grad_out_in, const at::Tensor& query, const at::Tensor& bank,
                              const at::Tensor& index, const at::Tensor& aux_in, int64_t select,
                              c10::DeviceType dev) {
  check_inputs(query, bank, index, dev);
  TORCH_CHECK(select >= 0 && select <= 2, kOp, ": select must be 0, 1 or 2, got ", select);
  const int64_t B = query.size(0), M = index.size(1);
  check_dim(grad_out_in, 3, kOp, "grad_out");
  check_size(grad_out_in, 0, B, kOp, "grad_out");
  check_size(grad_out_in, 1, M, kOp, "grad_out");
  check_placed(query, grad_out_in, dev, "grad_out");
  check_placed(query, aux_in, dev, "aux");
  return shape_of(query, index, grad_out_in.size(2));
}

// the checks on grad_out (converted to query's dtype, contiguous) and aux (contiguous)
inline void check_bwd_aux(const at::Tensor& grad_out, const at::Tensor& aux, const at::Tensor& query,
                          const at::Tensor& bank, const at::Tensor& index, const Shape& s, int64_t select,
                          c10::DeviceType dev) {
  const bool cpu = dev == c10::DeviceType::CPU;
  const int64_t B = s.B, M = s.M, P = s.P, kk = s.kk;
  if (select == ot::kSelectCost) {
    check_dtype(aux, {query.scalar_type()}, kOp, "aux");
    if (cpu) {
      check_dim(aux, 4, kOp, "aux");
      TORCH_CHECK(kk == 1, kOp, ": grad_out must be (B, M, 1) for select=cost, got ", grad_out.sizes());
      TORCH_CHECK(aux.size(0) == B && aux.size(1) == M && aux.size(2) == P && aux.size(3) == P, kOp,
                  ": aux must be the plan (B, M, P, P) for select=cost, got ", aux.sizes());
    } else {
      TORCH_CHECK(kk == 1 && aux.dim() == 4 && aux.size(0) == B && aux.size(1) == M && aux.size(2) == P &&
                      aux.size(3) == P,
                  kOp, ": select=cost needs grad_out (B, M, 1) and the plan (B, M, P, P), got ", grad_out.sizes(),
                  " and ", aux.sizes());
    }
  } else {
    check_dtype(aux, {at::kLong}, kOp, "aux");
    TORCH_CHECK(aux.sizes() == grad_out.sizes(), kOp, ": aux must have grad_out's shape ", grad_out.sizes(),
                ", got ", aux.sizes());
    if (cpu) check_range(aux, P * P, "aux");
  }
  if (cpu) check_range(index, bank.size(0), "index");
}

// grad_query, zeroed: (B, P, D)
inline at::Tensor alloc_bwd_output(const at::Tensor& query, const Shape& s) {
  return at::zeros({s.B, s.P, s.D}, query.options());
}

// the tensors the backward reads and writes; aux_idx (select 0/1) or aux_pi (select 2), the other null
template <class T>
struct BwdPtrs {
  const T* go;             // (B, M, kk)
  const T* bank;           // (R, P, D)
  const int64_t* index;    // (B, M)
  const int64_t* aux_idx;  // (B, M, kk), select 0/1
  const T* aux_pi;         // (B, M, P, P), select 2
  T* gq;                   // (B, P, D), zeroed
};

template <class T>
BwdPtrs<T> make_bwd_ptrs(const at::Tensor& grad_out, const at::Tensor& bank, const at::Tensor& index,
                         const at::Tensor& aux, const at::Tensor& gq, int64_t select) {
  BwdPtrs<T> p;
  p.go = grad_out.data_ptr<T>();
  p.bank = bank.data_ptr<T>();
  p.index = index.data_ptr<int64_t>();
  p.aux_idx = select == ot::kSelectCost ? nullptr : aux.data_ptr<int64_t>();
  p.aux_pi = select == ot::kSelectCost ? aux.data_ptr<T>() : nullptr;
  p.gq = gq.data_ptr<T>();
  return p;
}

}  // namespace ot_host
}  // namespace concept_kernels
