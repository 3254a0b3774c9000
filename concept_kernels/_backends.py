"""Backend selection for every op, in one place.

Each op registers its backends in priority order (fastest first). A backend record says whether it
is built/installed here (``available``) and whether it can run particular inputs (``unsupported``).

* ``backend=None`` (auto): the first backend that is available and supports the inputs runs.
  ``reference`` supports everything, so auto never fails.
* ``backend="<name>"`` or ``CONCEPT_KERNELS_BACKEND=<name>`` (read at every call; the argument wins
  over the variable): that backend runs or the call raises ``BackendUnavailableError`` listing
  why. Explicit requests fail loudly; there are no silent fallbacks.

``python -m concept_kernels.info`` prints the same records.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "CONCEPT_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs (the message says why)."""


def _always() -> Optional[str]:
    return None


def _no_reasons(device: torch.device, explicit: bool) -> List[str]:
    return []


@dataclass(frozen=True)
class Backend:
    """One way to run one op.

    available: () -> None if usable on this machine, else the reason it is not.
    unsupported: (device, explicit) -> reasons it cannot run inputs on ``device`` (empty = ok).
    impl: whatever the op's dispatcher needs (a module or object with fwd/bwd), opaque here.
    detail: () -> what an available backend runs here, when it has more than one way (shown by
        ``python -m concept_kernels.info``), or None.
    """

    name: str
    impl: Any = None
    available: Callable[[], Optional[str]] = _always
    unsupported: Callable[[torch.device, bool], List[str]] = _no_reasons
    detail: Callable[[], Optional[str]] = lambda: None


@dataclass
class _OpRecord:
    backends: Dict[str, Backend] = field(default_factory=dict)  # insertion order = priority


_REGISTRY: Dict[str, _OpRecord] = {}


def register(op: str, backend: Backend) -> None:
    """Add ``backend`` to ``op`` (later registrations have lower priority, except ``reference``,
    which always stays last)."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; known: {BACKEND_NAMES}")
    rec = _REGISTRY.setdefault(op, _OpRecord())
    ref = rec.backends.pop("reference", None)
    rec.backends[backend.name] = backend
    if ref is not None and backend.name != "reference":
        rec.backends["reference"] = ref


def ops() -> List[str]:
    return list(_REGISTRY)


def backends_of(op: str) -> List[Backend]:
    return list(_REGISTRY[op].backends.values())


def requested_backend(backend: Optional[str] = None) -> Optional[str]:
    """The explicit request for this call: the argument, else the environment variable, else None."""
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if name is not None and name not in BACKEND_NAMES:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


Limits = Callable[[str], List[str]]


def reasons(op: str, name: str, device: torch.device, explicit: bool, limits: Optional[Limits] = None) -> List[str]:
    """Why backend ``name`` of ``op`` cannot run inputs on ``device`` (empty list = it can).

    ``limits(name)`` adds the op's input-dependent reasons (sizes, modes) for this call; it is
    never applied to ``reference``, which takes every valid input.
    """
    b = _REGISTRY[op].backends[name]
    why = b.available()
    if why is not None:
        return [why]
    why = list(b.unsupported(device, explicit))
    if not why and limits is not None and name != "reference":
        why = list(limits(name))
    return why


def select(op: str, device: torch.device, backend: Optional[str] = None, *, limits: Optional[Limits] = None) -> Backend:
    """Pick the backend that runs ``op`` for inputs on ``device`` (see module docstring).

    ``limits``: optional ``name -> reasons`` callback for the call's sizes and modes.
    """
    rec = _REGISTRY[op]
    name = requested_backend(backend)
    if name is not None:
        if name not in rec.backends:
            have = ", ".join(rec.backends)
            raise BackendUnavailableError(f"{op} has no {name!r} backend (it has: {have})")
        why = reasons(op, name, device, explicit=True, limits=limits)
        if why:
            raise BackendUnavailableError(
                f"{op}: backend {name!r} was requested but cannot run here: " + "; ".join(why)
            )
        return rec.backends[name]
    for b in rec.backends.values():
        if not reasons(op, b.name, device, explicit=False, limits=limits):
            return b
    raise AssertionError(f"{op}: no backend, not even reference, accepted device {device}")


# ---- availability / support predicates shared by the ops' registrations -----------------------

def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_missing() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def triton_unsupported(device: torch.device, explicit: bool) -> List[str]:
    if device.type == "cuda":
        return []
    if device.type == "cpu" and triton_interpreting():
        # The interpreter runs programs one by one in numpy: for tests, never picked automatically.
        return [] if explicit else ["Triton on CPU tensors runs only under TRITON_INTERPRET=1 when requested explicitly"]
    return [f"Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"]


def cpu_only(device: torch.device, explicit: bool) -> List[str]:
    return [] if device.type == "cpu" else [f"the cpu backend takes CPU tensors, got {device.type}"]


def cuda_only(device: torch.device, explicit: bool) -> List[str]:
    return [] if device.type == "cuda" else [f"the cuda backend takes CUDA tensors, got {device.type}"]
