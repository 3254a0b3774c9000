// Host-only facts about the CPU that runs the extension, for choices a compile-time ISA flag cannot
// make: -march=native gives AVX-512 both to CPUs whose 512-bit FMAs run at full width (Zen 5,
// AVX-512 Xeons: a zmm FMA does twice the work of a ymm FMA) and to Zen 4, which splits each
// 512-bit operation into two 256-bit halves (a zmm FMA costs two ymm FMAs). Kernels pick their
// vector width from wide_simd() at each call.
#pragma once

#if defined(__CUDACC__)
#error "cpu_features.h is host-only"
#endif

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace concept_kernels {

// Whether this build has AVX-512 and the CPU runs it at full width (AMD family 0x19, the only AMD
// family with AVX-512 before Zen 5, is Zen 4: half width). Detected once.
inline bool detect_wide_simd() {
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(__i386__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return true;
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  if (std::strcmp(vendor, "AuthenticAMD") != 0 || !__get_cpuid(1, &a, &b, &c, &d)) return true;
  const unsigned base = (a >> 8) & 0xf, family = base == 0xf ? base + ((a >> 20) & 0xff) : base;
  return family != 0x19;
#else
  return false;
#endif
}

// wide_simd() with the override CONCEPT_KERNELS_WIDE_SIMD=0 / 1 (read at each call, so tests can
// run both paths on any AVX-512 machine). Any other value, or 1 in a build without AVX-512, throws
// std::invalid_argument (a RuntimeError naming the variable in Python).
inline bool wide_simd() {
  static const bool detected = detect_wide_simd();
  const char* e = std::getenv("CONCEPT_KERNELS_WIDE_SIMD");
  if (e == nullptr || e[0] == '\0') return detected;
  if (std::strcmp(e, "0") == 0) return false;
#if defined(__AVX512F__)
  if (std::strcmp(e, "1") == 0) return true;
#else
  if (std::strcmp(e, "1") == 0)
    throw std::invalid_argument("CONCEPT_KERNELS_WIDE_SIMD=1, but concept_kernels._C was built without AVX-512");
#endif
  throw std::invalid_argument(std::string("CONCEPT_KERNELS_WIDE_SIMD must be 0, 1 or unset, got '") + e + "'");
}

// The ISA macros this translation unit was compiled with (space-separated), for the test that the
// facts setup.py recorded (concept_kernels/_isa.py asks the compiler the same question; the Python
// loader checks them against the CPU BEFORE loading this library) match what was really compiled.
// A macro that is defined (as 1) stringifies to its value, an undefined one to its own name.
#define CK_ISA_STR_(x) #x
#define CK_ISA_STR(x) CK_ISA_STR_(x)
#define CK_ISA(m) if (std::strcmp(CK_ISA_STR(m), #m) != 0) out += (out.empty() ? "" : " ") + std::string(#m);
inline std::string compiled_isa() {
  std::string out;
  CK_ISA(__SSE3__) CK_ISA(__SSSE3__) CK_ISA(__SSE4_1__) CK_ISA(__SSE4_2__) CK_ISA(__SSE4A__)
  CK_ISA(__POPCNT__) CK_ISA(__LZCNT__) CK_ISA(__ABM__) CK_ISA(__LAHF_SAHF__) CK_ISA(__MOVBE__)
  CK_ISA(__PCLMUL__) CK_ISA(__AES__) CK_ISA(__AVX__) CK_ISA(__AVX2__) CK_ISA(__FMA__) CK_ISA(__FMA4__)
  CK_ISA(__F16C__) CK_ISA(__BMI__) CK_ISA(__BMI2__) CK_ISA(__ADX__) CK_ISA(__SHA__) CK_ISA(__RDRND__)
  CK_ISA(__RDSEED__) CK_ISA(__GFNI__) CK_ISA(__VAES__) CK_ISA(__VPCLMULQDQ__) CK_ISA(__AVXVNNI__)
  CK_ISA(__AVX512F__) CK_ISA(__AVX512CD__) CK_ISA(__AVX512DQ__) CK_ISA(__AVX512BW__)
  CK_ISA(__AVX512VL__) CK_ISA(__AVX512IFMA__) CK_ISA(__AVX512VBMI__) CK_ISA(__AVX512VBMI2__)
  CK_ISA(__AVX512VNNI__) CK_ISA(__AVX512BITALG__) CK_ISA(__AVX512VPOPCNTDQ__) CK_ISA(__AVX512BF16__)
  CK_ISA(__AVX512FP16__) CK_ISA(__AVX512VP2INTERSECT__)
  return out;
}
#undef CK_ISA
#undef CK_ISA_STR
#undef CK_ISA_STR_

}  // namespace concept_kernels
