"""The x86 instruction-set extensions a build of ``concept_kernels._C`` may execute, and whether this
CPU has them (the guard against SIGILL when a wheel built with ``-march=native`` on one machine is
installed on an older one).

Build time (setup.py loads this file by path, before the package is importable): the compiler is
asked which ISA macros (``__AVX2__``, ``__AVX512F__``, ...) the extension's flags define
(:func:`compiler_isa`); setup.py records them in ``concept_kernels/_build_info.py``.
Load time (concept_kernels._ext, BEFORE importing ``_C``): the recorded macros are compared with the
CPU's feature flags from ``/proc/cpuinfo`` (:func:`cpu_flags`). Linux lists a flag there only when
the CPU has the feature AND the kernel enabled it (AVX-512 register state), i.e. exactly when the
instructions can run. Elsewhere (macOS, Windows) the CPU's flags are not read: the check reports
"unknown" and does not refuse.

No torch import here, and nothing that needs the extension: the check must run before ``_C`` loads.
"""

from __future__ import annotations

import os
import shlex
import subprocess

# compiler macro -> the /proc/cpuinfo flag of the same extension (x86; the ones GCC/clang may emit
# for -march values up to Zen 5 / Sapphire Rapids). A macro outside this table is not checked.
ISA_FLAGS = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__SSE4A__": "sse4a", "__POPCNT__": "popcnt", "__LZCNT__": "abm", "__ABM__": "abm",
    "__LAHF_SAHF__": "lahf_lm", "__MOVBE__": "movbe", "__PCLMUL__": "pclmulqdq", "__AES__": "aes",
    "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__FMA4__": "fma4", "__F16C__": "f16c",
    "__BMI__": "bmi1", "__BMI2__": "bmi2", "__ADX__": "adx", "__SHA__": "sha_ni",
    "__RDRND__": "rdrand", "__RDSEED__": "rdseed", "__GFNI__": "gfni", "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq", "__AVXVNNI__": "avx_vnni",
    "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd", "__AVX512DQ__": "avx512dq",
    "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AVX512VP2INTERSECT__": "avx512_vp2intersect",
}

CPUINFO = "/proc/cpuinfo"


def compiler_isa(cxx: str, flags: list[str]) -> list[str]:
    """The macros of :data:`ISA_FLAGS` that ``cxx`` defines when compiling C++ with ``flags``
    (in the table's order). Raises ``RuntimeError`` with the compiler's message when the probe fails."""
    cmd = [*shlex.split(cxx), *flags, "-dM", "-E", "-x", "c++", os.devnull]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise RuntimeError(f"could not run the C++ compiler {cmd[0]!r} ({e}); set CXX") from e
    if r.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed: {r.stderr.strip()[-500:]}")
    defined = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("#define ")}
    return [m for m in ISA_FLAGS if m in defined]


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags (the first ``flags`` line of :data:`CPUINFO`), or None where that
    file does not exist or lists none (not Linux, not x86)."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        return None
    return None


def missing_isa(build_isa: list[str], flags: set[str]) -> list[str]:
    """The recorded build macros whose feature ``flags`` lacks, in ``build_isa``'s order."""
    return [m for m in build_isa if ISA_FLAGS.get(m) is not None and ISA_FLAGS[m] not in flags]


def short(macros: list[str]) -> str:
    """``["__AVX2__", "__FMA__"]`` -> ``"AVX2 FMA"``."""
    return " ".join(m.strip("_") for m in macros) or "(none beyond the x86-64 baseline)"
