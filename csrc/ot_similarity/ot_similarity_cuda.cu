// CUDA launchers of ot_similarity (docs/OT_BACKEND_CONTRACT.md), on the current stream.
//
//   fwd: one problem per thread (so a 9 x 9 plan is not padded to 16 x 16), running the scalar
//        per-problem solver of ot_similarity_problem.h — the code the CPU tests also run
//        (CONCEPT_KERNELS_OT_SCALAR=1). MAXP = 4, 9 or 16 by P. stop = problem only: the group
//        rules (row / all) need a grid-wide mean per iteration; the triton backend implements them.
//   bwd: one thread per (b, i, d), m ascending then the selected entries (or j) ascending:
//        deterministic, no atomics, coalesced over d.
//
// Not run on this project's development machines (no GPU): compile-checked with nvcc
// (`make cuda-check`); the GPU tests in tests/ops/test_ot_similarity_fused.py skip without CUDA.
#include "ot_similarity/ot_similarity_host.h"
#include "ot_similarity/ot_similarity_problem.h"

#include "common/checks.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace concept_kernels {
namespace {

using ot::FwdArgs;

constexpr int kFwdThreads = 128;
constexpr int kBwdThreads = 256;

template <typename T, int MAXP>
__global__ void __launch_bounds__(kFwdThreads) ot_fwd_kernel(FwdArgs<T> A, int64_t bank_rows) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= A.B * A.M) return;
  const int64_t r = A.index[p];
  if (r < 0 || r >= bank_rows) {  // the caller validates; never read out of bounds
    for (int s = 0; s < A.kk; ++s) A.out[p * A.kk + s] = T(NAN);
    if (A.aux_idx != nullptr)
      for (int s = 0; s < A.kk; ++s) A.aux_idx[p * A.kk + s] = 0;
    return;
  }
  ot::Sinkhorn<T, MAXP> s;
  T lp[MAXP * MAXP];
  ot::solve_problem<MAXP>(A, p, s, lp);
}

// grad_query[b, i, d] (see the file comment)
template <typename T>
__global__ void ot_bwd_kernel(const T* __restrict__ go, const T* __restrict__ bank, const int64_t* __restrict__ index,
                              const int64_t* __restrict__ aux_idx, const T* __restrict__ aux_pi, T* __restrict__ gq,
                              int64_t B, int64_t M, int64_t P, int64_t D, int64_t kk, int select) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B * P * D) return;
  const int64_t d = t % D, i = (t / D) % P, b = t / (D * P);
  T acc = 0;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t p = b * M + m;
    const T* Y = bank + index[p] * P * D;
    if (select == ot::kSelectCost) {
      const T w = go[p];
      const T* pi = aux_pi + (p * P + i) * P;
      for (int64_t j = 0; j < P; ++j) acc += (w * pi[j]) * Y[j * D + d];
    } else {
      for (int64_t s = 0; s < kk; ++s) {
        const int64_t e = aux_idx[p * kk + s];
        if (e / P == i) acc += go[p * kk + s] * Y[(e % P) * D + d];
      }
    }
  }
  gq[t] = acc;
}

template <typename T, int MAXP>
void launch_fwd(const FwdArgs<T>& A, int64_t bank_rows, cudaStream_t stream) {
  const int64_t Q = A.B * A.M;
  const int64_t blocks = (Q + kFwdThreads - 1) / kFwdThreads;
  ot_fwd_kernel<T, MAXP><<<static_cast<unsigned>(blocks), kFwdThreads, 0, stream>>>(A, bank_rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ot_similarity_fwd_cuda(const at::Tensor& query, const at::Tensor& bank,
                                                          const at::Tensor& index, const at::Tensor& choice,
                                                          int64_t select, int64_t k, double eps,
                                                          int64_t max_iter, double tol, int64_t stop) {
  const ot_host::Shape sh = ot_host::check_fwd_inputs(query, bank, index, choice, select, k, eps, max_iter, tol,
                                                      stop, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out, aux;
  std::tie(out, aux) = ot_host::alloc_fwd_outputs(query, index, sh, select);
  if (sh.B * sh.M == 0) return {out, aux};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "ot_similarity_fwd_cuda", [&] {
    const FwdArgs<scalar_t> A =
        ot_host::make_fwd_args<scalar_t>(query, bank, index, choice, out, aux, sh, select, k, eps, max_iter, tol);
    const int64_t R = bank.size(0);
    if (sh.P <= 4) {
      launch_fwd<scalar_t, 4>(A, R, stream);
    } else if (sh.P <= 9) {
      launch_fwd<scalar_t, 9>(A, R, stream);
    } else {
      launch_fwd<scalar_t, 16>(A, R, stream);
    }
  });
  return {out, aux};
}

at::Tensor ot_similarity_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& query, const at::Tensor& bank,
                                  const at::Tensor& index, const at::Tensor& aux_in, int64_t select) {
  const ot_host::Shape sh =
      ot_host::check_bwd_inputs(grad_out_in, query, bank, index, aux_in, select, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor grad_out = grad_out_in.to(query.scalar_type()).contiguous();
  const at::Tensor aux = aux_in.contiguous();
  ot_host::check_bwd_aux(grad_out, aux, query, bank, index, sh, select, c10::DeviceType::CUDA);
  at::Tensor gq = ot_host::alloc_bwd_output(query, sh);
  if (sh.B * sh.M == 0) return gq;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "ot_similarity_bwd_cuda", [&] {
    const ot_host::BwdPtrs<scalar_t> p = ot_host::make_bwd_ptrs<scalar_t>(grad_out, bank, index, aux, gq, select);
    const int64_t n = sh.B * sh.P * sh.D;
    const int64_t blocks = (n + kBwdThreads - 1) / kBwdThreads;
    ot_bwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kBwdThreads, 0, stream>>>(
        p.go, p.bank, p.index, p.aux_idx, p.aux_pi, p.gq, sh.B, sh.M, sh.P, sh.D, sh.kk, static_cast<int>(select));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gq;
}

}  // namespace
}  // namespace concept_kernels

TORCH_LIBRARY_IMPL(concept_kernels, CUDA, m) {
  m.impl("ot_similarity_fwd", &concept_kernels::ot_similarity_fwd_cuda);
  m.impl("ot_similarity_bwd", &concept_kernels::ot_similarity_bwd_cuda);
}
