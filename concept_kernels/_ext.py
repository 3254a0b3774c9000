"""The one place that loads the optional C++/CUDA extension ``concept_kernels._C``.

The extension is loaded lazily, once, on first use of anything below (never at package import, and
never querying CUDA). Loading it registers the ``torch.ops.concept_kernels.*`` ops. When it is missing
or broken the package still imports; callers check :data:`HAS_EXT` or call :func:`require_ext`, whose
error carries the reason and the build command.

Before importing ``_C`` the loader checks the facts setup.py recorded (``_build_info.py``): ``_C`` is
refused, with the reason and the rebuild command, when it was built against another torch version
(undefined symbols or silent ABI trouble otherwise) or for an ISA this CPU lacks (a ``-march=native``
wheel from an AVX-512 machine on an AVX2 one: SIGILL at the first call otherwise). See
:func:`isa_check`.

``CONCEPT_KERNELS_NO_EXT=1`` (read at first load) skips loading, to exercise the pure-Python paths.
Module attributes ``HAS_EXT`` and ``EXT_ERROR`` are computed on first access (PEP 562).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import threading

from . import _isa

__all__ = ["HAS_EXT", "EXT_ERROR", "BUILD_HINT", "build_info", "ext_has_cuda", "isa_check", "load",
           "omp_max_threads", "require_ext", "simd_bits", "wide_simd"]

BUILD_HINT = (
    "build it with `pip install --no-build-isolation --no-deps -e .` in the repository root "
    "(or `make build`), using the same torch that runs the code"
)
PORTABLE_HINT = (
    "or, for a build that runs on any x86-64 CPU with AVX2 and FMA, prefix that command with "
    "CONCEPT_KERNELS_CPU_ARCH=x86-64-v3"
)

from torch.compiler import assume_constant_result  # noqa: E402  (selection under torch.compile: see load)

_lock = threading.Lock()
_state: tuple[bool, str | None] | None = None  # (loaded, error) once load() has run


def _import_ext():
    # a separate function so tests can monkeypatch the import to simulate a broken build
    return importlib.import_module("concept_kernels._C")


@assume_constant_result
def load() -> bool:
    """Import ``concept_kernels._C`` once; return whether it loaded (errors are kept, not raised)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _try_load()
    return _state[0]


def _try_load() -> tuple[bool, str | None]:
    if os.environ.get("CONCEPT_KERNELS_NO_EXT", "") not in ("", "0"):
        return False, "concept_kernels._C disabled by CONCEPT_KERNELS_NO_EXT=1"
    import torch  # noqa: F401  (load torch's libc10/libtorch and libgomp before _C links against them)

    if _ext_present():  # a missing _C fails its import below, with that reason
        refusal = _build_refusal(build_info(), torch.__version__)
        if refusal is not None:
            return False, f"concept_kernels._C refused: {refusal}"
    try:
        _import_ext()
    except ImportError as e:  # not built, or built against another torch (undefined symbol ...)
        why = f"{type(e).__name__}: {e}"
        if build_info().get("ext_requested") is False:
            why += "; this install was built with CONCEPT_KERNELS_NO_EXT=1 (pure Python)"
        return False, f"concept_kernels._C could not be imported ({why}); {BUILD_HINT}"
    except Exception as e:  # noqa: BLE001  a static registration failed (e.g. duplicate schema)
        return False, f"concept_kernels._C failed while loading ({type(e).__name__}: {e}); {BUILD_HINT}"
    return True, None


def _ext_present() -> bool:
    try:
        return importlib.util.find_spec("concept_kernels._C") is not None
    except ImportError:
        return False


def _build_refusal(facts: dict, running_torch: str) -> str | None:
    """Why the built ``_C`` must not be loaded here (with the way out), or None: checked before
    importing it, since its code (static initialisers included) may use the recorded ISA."""
    if "torch" not in facts or "isa" not in facts:
        return ("concept_kernels/_build_info.py does not describe it (missing, written by a "
                f"CONCEPT_KERNELS_NO_EXT=1 build, or by an older setup.py); re{BUILD_HINT}")
    if facts["torch"] != running_torch:
        return (f"it was built against torch {facts['torch']}, but torch {running_torch} is running; "
                f"re{BUILD_HINT}")
    check = isa_check(facts)
    if check["missing"]:
        return (f"it was compiled for -march={check['build_arch'] or '(compiler default)'}, whose "
                f"instructions {_isa.short(check['missing'])} this CPU lacks (it would die with SIGILL); "
                f"re{BUILD_HINT} on this machine, {PORTABLE_HINT}")
    return None


def isa_check(facts: dict | None = None) -> dict:
    """The build's ISA against this CPU's.

    Returns ``build_arch`` (the -march value, "" for the compiler default), ``build_isa`` (the ISA
    macros recorded at build time), ``cpu_isa`` (the macros of :data:`_isa.ISA_FLAGS` this CPU has,
    or None where its flags cannot be read), ``missing`` (build macros the CPU lacks) and
    ``verdict`` (one line: ok / refused / unknown, with the reason)."""
    facts = build_info() if facts is None else facts
    build_isa = list(facts.get("isa") or [])
    flags = _isa.cpu_flags()
    cpu_isa = None if flags is None else [m for m, f in _isa.ISA_FLAGS.items() if f in flags]
    missing = [] if flags is None else _isa.missing_isa(build_isa, flags)
    if "isa" not in facts:
        verdict = "unknown: no build ISA recorded"
    elif missing:
        verdict = f"refused: this CPU lacks {_isa.short(missing)}"
    elif flags is None and build_isa:
        verdict = f"unknown: this CPU's features are not readable on {platform.system()} (not checked)"
    else:
        verdict = "ok: this CPU has every instruction-set extension the build uses"
    return {"build_arch": facts.get("cpu_arch"), "build_isa": build_isa, "cpu_isa": cpu_isa,
            "missing": missing, "verdict": verdict}


def _reset_for_tests() -> None:
    """Forget the load result so the next access loads again (tests only)."""
    global _state
    _state = None
    _HAS_CUDA.clear()


def __getattr__(name: str):
    if name == "HAS_EXT":
        return load()
    if name == "EXT_ERROR":
        load()
        return _state[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_ext(feature: str) -> None:
    """Raise ``RuntimeError`` naming ``feature`` and the reason when ``_C`` is not available."""
    if not load():
        raise RuntimeError(f"{feature} needs the compiled extension: {_state[1]}")


_HAS_CUDA: list[bool] = []  # the build fact, asked of the extension once


@assume_constant_result
def ext_has_cuda() -> bool:
    """Whether the loaded extension was built with its CUDA kernels (False when it is not loaded).

    A constant of the process: ``torch.compile`` runs it once while tracing instead of tracing its
    ``with_cuda()`` op (which returns a bool, not a tensor)."""
    if not _HAS_CUDA:
        if not load():
            return False
        import torch

        _HAS_CUDA.append(bool(torch.ops.concept_kernels.with_cuda()))
    return _HAS_CUDA[0]


def omp_max_threads() -> int | None:
    """OpenMP threads the extension's CPU kernels use (follows ``torch.set_num_threads``), or None."""
    if not load():
        return None
    import torch

    return int(torch.ops.concept_kernels.omp_max_threads())


def simd_bits() -> int | None:
    """Width of the widest float vectors the CPU kernels were compiled for (512, 256, 128), or None."""
    if not load():
        return None
    import torch

    return int(torch.ops.concept_kernels.simd_bits())


def wide_simd() -> bool | None:
    """Whether the CPU kernels take their wide-vector paths now (``ot_similarity``: 16-problem lane
    groups, dense cost GEMM from 45% of a chunk's columns): a build with AVX-512 on a CPU that runs
    it at full width (not Zen 4, which halves 512-bit operations), unless
    ``CONCEPT_KERNELS_WIDE_SIMD=0`` / ``1`` says otherwise. None without the extension."""
    if not load():
        return None
    import torch

    return bool(torch.ops.concept_kernels.wide_simd())


def build_info() -> dict:
    """Facts setup.py recorded at build time (torch version, with_cuda, flags, cpu_arch, isa); {} if
    never built."""
    try:
        from concept_kernels._build_info import BUILD_INFO
    except ImportError:
        return {}
    return dict(BUILD_INFO)
