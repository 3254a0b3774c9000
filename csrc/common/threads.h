// Host-only: torch's intra-op thread count applied to the calling thread's OpenMP regions.
//
// OpenMP keeps its thread count per thread (the nthreads ICV). torch.set_num_threads sets it in the
// calling thread and records the value; any other thread gets it only once a torch op there runs
// at::parallel_for (at::internal::lazy_init_num_threads). An extension op called first thing in a
// new Python thread would otherwise run teams of OpenMP's default size (OMP_NUM_THREADS or the core
// count). Every C++ op calls use_torch_threads() at entry, before it plans or opens a parallel
// region.
#pragma once

#if defined(__CUDACC__)
#error "common/threads.h is host-only"
#endif

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace concept_kernels {

// Sets this thread's OpenMP thread count to torch's (at::get_num_threads(): the value of
// torch.set_num_threads, else torch's default) and returns it.
inline int use_torch_threads() {
  const int threads = at::get_num_threads();
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  return threads;
}

}  // namespace concept_kernels
