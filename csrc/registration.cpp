// The one TORCH_LIBRARY(concept_kernels, m): every schema of the extension is defined here, so
// `grep m.def csrc/registration.cpp` lists the whole C++ surface. Kernels live in csrc/<op>/ and
// attach themselves with TORCH_LIBRARY_IMPL(concept_kernels, CPU|CUDA, m) in their own files.
//
// Lean on purpose: no torch/extension.h and no pybind11 (build 12-22 s instead of 50-90 s). The
// Python module below is empty; importing it only loads this .so so the static registrations run,
// after which the ops are reachable as torch.ops.concept_kernels.<name> (pytorch/extension-cpp).
#include <Python.h>  // limited API only: setup.py builds with py_limited_api=True

#include "common/cpu_features.h"
#include "common/threads.h"

#include <torch/library.h>

#include <cstdint>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace concept_kernels {

// Threads an OpenMP parallel region of this extension uses in the calling thread: torch's count,
// applied to the thread as every op does at entry (common/threads.h). The extension links the same
// libgomp.so.1 that torch ships (the soname is already loaded when _C is imported). 1 without OpenMP.
int64_t omp_max_threads() {
#ifdef _OPENMP
  return static_cast<int64_t>(use_torch_threads());
#else
  return 1;
#endif
}

// Introspection for tests: the calling thread's OpenMP thread count as it is now (omp_get_max_threads,
// NOT synced with torch): in a new Python thread the runtime's default until an op of this extension
// (or a parallel torch op) ran there. 1 without OpenMP.
int64_t omp_thread_icv() {
#ifdef _OPENMP
  return static_cast<int64_t>(omp_get_max_threads());
#else
  return 1;
#endif
}

// Whether this build compiled the CUDA sources (csrc/**/*.cu); setup.py defines CK_WITH_CUDA then.
bool with_cuda() {
#ifdef CK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Width in bits of the widest float vectors the CPU kernels were compiled for (setup.py -march).
int64_t simd_bits() {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX__)
  return 256;
#else
  return 128;
#endif
}

// The ISA macros this library was compiled with (cpu_features.h), e.g. "__SSE3__ ... __AVX2__ __FMA__".
std::string build_isa() { return compiled_isa(); }

// Whether the CPU kernels take their wide-vector paths now (common/cpu_features.h: AVX-512 at full
// width, or CONCEPT_KERNELS_WIDE_SIMD).
bool wide_simd_now() { return wide_simd(); }

}  // namespace concept_kernels

TORCH_LIBRARY(concept_kernels, m) {
  // Build facts (no tensor arguments: one kernel for every dispatch key).
  m.def("omp_max_threads() -> int", &concept_kernels::omp_max_threads);
  m.def("omp_thread_icv() -> int", &concept_kernels::omp_thread_icv);
  m.def("with_cuda() -> bool", &concept_kernels::with_cuda);
  m.def("simd_bits() -> int", &concept_kernels::simd_bits);
  m.def("wide_simd() -> bool", &concept_kernels::wide_simd_now);
  m.def("build_isa() -> str", &concept_kernels::build_isa);

  // Op schemas go here, one block per op.

  // ot_similarity (csrc/ot_similarity/; contract: docs/OT_BACKEND_CONTRACT.md). select 0 sample,
  // 1 topk, 2 cost; stop 0 problem, 1 row, 2 all. aux: int64 (B, M, kk) flat plan indices, or the
  // plan (B, M, P, P) for select=2. Autograd lives in Python (ops/ot_similarity/function.py).
  m.def("ot_similarity_fwd(Tensor query, Tensor bank, Tensor index, Tensor choice, int select, int k, "
        "float eps, int max_iter, float tol, int stop) -> (Tensor, Tensor)");
  m.def("ot_similarity_bwd(Tensor grad_out, Tensor query, Tensor bank, Tensor index, Tensor aux, "
        "int select) -> Tensor");

  // channel_attention (csrc/channel_attention/; CPU only): the symmetric tile-pair kernel of CAM,
  // the contract of concept_kernels/ops/channel_attention/function.py (x3 (B, C, N) float32/64).
  // Autograd lives in Python (the cpu backend of ops/channel_attention/function.py).
  m.def("channel_attention_symm_fwd(Tensor x3, Tensor gamma) -> (Tensor out, Tensor att, Tensor lse)");
  m.def("channel_attention_symm_bwd(Tensor dout, Tensor x3, Tensor gamma, Tensor att, Tensor lse) "
        "-> (Tensor dx, Tensor dgamma)");
}

extern "C" {
// `import concept_kernels._C` calls this; it returns an empty module. Loading the library is the
// point: it runs the TORCH_LIBRARY / TORCH_LIBRARY_IMPL static initializers above and in csrc/<op>/.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                       // m_name
      "concept_kernels C++/CUDA ops; use torch.ops.concept_kernels",  // m_doc
      -1,                                                         // m_size: no per-interpreter state
      nullptr,                                                    // m_methods
  };
  return PyModule_Create(&module_def);
}
}
