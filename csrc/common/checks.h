// Argument checks shared by every launcher. Each message names the argument and states what was
// expected and what was passed, e.g. "ot_similarity: query must be float32 or float64, got Half".
// TORCH_CHECK raises c10::Error, which Python sees as RuntimeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace concept_kernels {

// t.dim() == ndim
inline void check_dim(const at::Tensor& t, int64_t ndim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got shape ", t.sizes());
}

// t.size(d) == expected (negative d counts from the end)
inline void check_size(const at::Tensor& t, int64_t d, int64_t expected, const char* op,
                       const char* name) {
  TORCH_CHECK(t.size(d) == expected, op, ": ", name, ".size(", d, ") must be ", expected,
              ", got shape ", t.sizes());
}

// t.scalar_type() is one of `allowed`
inline void check_dtype(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed,
                        const char* op, const char* name) {
  for (auto s : allowed) {
    if (t.scalar_type() == s) return;
  }
  std::ostringstream want;
  const char* sep = "";
  for (auto s : allowed) {
    want << sep << c10::toString(s);
    sep = " or ";
  }
  TORCH_CHECK(false, op, ": ", name, " must be ", want.str(), ", got ", t.scalar_type());
}

// a and b live on the same device (e.g. query and bank)
inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// t is on a device of type `type` (kCPU for the CPU launcher, kCUDA for the CUDA one)
inline void check_device(const at::Tensor& t, c10::DeviceType type, const char* op,
                         const char* name) {
  TORCH_CHECK(t.device().type() == type, op, ": ", name, " must be a ", c10::DeviceTypeName(type),
              " tensor, got ", t.device());
}

// raw-pointer kernels assume dense row-major memory; launchers call .contiguous() first or check
inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

}  // namespace concept_kernels
