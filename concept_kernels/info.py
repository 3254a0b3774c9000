"""``python -m concept_kernels.info``: versions, what is built, and which backend runs each op here.

For every op it lists every backend with "ok" or the reason it cannot run, on the CPU and (when
one is visible) on the GPU, and marks with ``*`` the backend that auto-selection picks.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import List

import torch

from . import _backends, _ext, _isa
from . import ops as _ops  # noqa: F401  (registers every op's backends)


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:
        return f"not importable ({type(e).__name__})"


def _gpu_line() -> str:
    try:
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})"
    except Exception as e:  # pragma: no cover - driver trouble
        return f"error querying CUDA ({e})"
    return "none visible"


def _isa_lines() -> List[str]:
    """The build's ISA, this CPU's, and the loader's verdict (nothing when no _C was built)."""
    facts = _ext.build_info()
    if not facts.get("ext_requested"):
        return []
    check = _ext.isa_check(facts)
    march = "?" if check["build_arch"] is None else check["build_arch"] or "(compiler default)"
    cpu = "unreadable here" if check["cpu_isa"] is None else _isa.short(check["cpu_isa"])
    return [f"ISA: build -march={march}: {_isa.short(check['build_isa'])}",
            f"ISA: this CPU: {cpu}",
            f"ISA: verdict: {check['verdict']}"]


def report() -> str:
    """The whole report as text."""
    lines: List[str] = []
    lines.append(f"concept_kernels {__import__('concept_kernels').__version__}")
    lines.append(f"python {platform.python_version()} on {platform.machine()}, torch {torch.__version__} "
                 f"(CUDA build: {torch.version.cuda or 'no'}), triton {_version('triton')}")
    lines.append(f"threads: torch {torch.get_num_threads()}, OpenMP in _C {_ext.omp_max_threads() or '-'}")
    if _ext.HAS_EXT:
        arch = [f for f in _ext.build_info().get("cxx_flags", []) if f.startswith("-march=")]
        target = arch[0] if arch else "the compiler's default -march"
        lines.append(f"extension concept_kernels._C: built (CPU kernels for {target}; "
                     f"CUDA kernels: {'yes' if _ext.ext_has_cuda() else 'no'})")
        if _ext.build_info().get("cuda_skipped"):
            lines.append(f"  CUDA kernels not built: {_ext.build_info()['cuda_skipped']}")
        try:
            wide = "yes" if _ext.wide_simd() else "no"
        except ValueError as e:  # a bad CONCEPT_KERNELS_WIDE_SIMD: the kernels would raise it too
            wide = f"error: {e}"
        lines.append(f"CPU vectors: {_ext.simd_bits()}-bit; wide paths (512-bit at full width): {wide} "
                     f"(CONCEPT_KERNELS_WIDE_SIMD={os.environ.get('CONCEPT_KERNELS_WIDE_SIMD', '(unset: detected)')})")
    else:
        lines.append(f"extension concept_kernels._C: NOT available: {_ext.EXT_ERROR}")
    lines.extend(_isa_lines())
    lines.append(f"GPU: {_gpu_line()}")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}   "
                 f"{_backends.ENV_VAR}={os.environ.get(_backends.ENV_VAR, '(unset: auto)')}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for op in _backends.ops():
        lines.append("")
        lines.append(f"{op}:")
        for dev in devices:
            try:
                chosen = _backends.select(op, dev).name
            except Exception as e:  # a forced backend that cannot run
                chosen = None
                lines.append(f"  on {dev.type}: forced backend cannot run: {e}")
            for b in _backends.backends_of(op):
                why = _backends.reasons(op, b.name, dev, explicit=True)
                mark = "*" if b.name == chosen else " "
                state = "no: " + "; ".join(why) if why else "ok" + (f" ({b.detail()})" if b.detail() else "")
                lines.append(f"  {mark} {dev.type:4s} {b.name:9s} {state}")
    lines.append("")
    lines.append("* = what runs for inputs on that device with no backend requested")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
