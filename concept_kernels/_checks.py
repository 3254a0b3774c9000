"""Input validation shared by every public function.

Every check raises a ``ValueError`` (shape, value, device) or ``TypeError`` (dtype, type) whose
message names the argument and states what was expected and what was given, so that bad input
fails here, in Python, and never deep inside a kernel.

Tensors on the ``meta`` device (shapes without data) are refused by :func:`check_same_device` and
:func:`check_index`, which every public function calls before it reads any value; a mix of devices
is reported as such first.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fmt(dims) -> str:
    """Python tuple style: (3,), (2, 4), ()."""
    dims = [str(d) for d in dims]
    return "(" + dims[0] + ",)" if len(dims) == 1 else "(" + ", ".join(dims) + ")"


def _shape(t: torch.Tensor) -> str:
    return _fmt(t.shape)


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    shape_doc: Optional[str] = None,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Validate one tensor argument and return it.

    ``shape`` may hold ``None`` for a free dimension; ``shape_doc`` (e.g. ``"(B, P, D)"``) is quoted
    in the error so users see the names used in the docstrings.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    doc = f" {shape_doc}" if shape_doc else ""
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions{doc}, got shape {_shape(t)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({want}), got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = _fmt("*" if s is None else s for s in shape)
            raise ValueError(f"{name} must have shape {want}{doc}, got {_shape(t)}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {_shape(t)}")
    return t


def check_float(name: str, t, **kw) -> torch.Tensor:
    """``check_tensor`` restricted to floating dtypes (fp16, bf16, fp32, fp64)."""
    return check_tensor(name, t, dtypes=FLOAT_DTYPES, **kw)


def check_has_data(**tensors: Optional[torch.Tensor]) -> None:
    """No tensor is on the ``meta`` device (a shape without values: reading it would fail deep inside,
    computing on it would silently return more meta tensors)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise ValueError(f"{name} on meta holds no data (a shape-only tensor, shape {_shape(t)}): "
                             "pass it on a device with storage, e.g. cpu or cuda")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and not ``meta``; returns it. Errors name each argument."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    devices = {v.device for _, v in items}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in items)
        raise ValueError(f"all tensors must be on the same device, got {listing}")
    check_has_data(**dict(items))
    return items[0][1].device


def check_no_nan(name: str, t: torch.Tensor, *, finite: bool = False) -> None:
    """No NaN in ``t`` (no NaN or +-inf when ``finite``): host check on CPU, device assert on CUDA."""
    bad = ~torch.isfinite(t) if finite else torch.isnan(t)
    what = "NaN or infinite" if finite else "NaN"
    if t.device.type == "cuda":
        torch._assert_async(~bad.any(), f"{name} must not contain {what} values")
        return
    n = int(bad.sum())
    if n:
        raise ValueError(f"{name} must not contain {what} values, got {n} of {t.numel()} entries")


def check_index(name: str, index: torch.Tensor, upper: int, upper_name: str) -> None:
    """``index`` holds int64 values in ``[0, upper)`` (host check on CPU, device assert on CUDA and inside
    ``torch.compile``, where reading a value on the host would break the graph)."""
    check_has_data(**{name: index})
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype int64, got {str(index.dtype).replace('torch.', '')}")
    if index.numel() == 0:
        return
    if index.device.type == "cuda" or torch.compiler.is_compiling():
        # No host read on the GPU (it would sync and break CUDA-graph capture) nor while compiling: an assert op.
        ok = ((index >= 0) & (index < upper)).all()
        torch._assert_async(ok, f"{name} values must lie in [0, {upper}) ({upper_name})")
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} values must lie in [0, {upper}) ({upper_name}), got min {lo}, max {hi}")


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    """A finite positive Python scalar (int when ``integer``)."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")


def check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reference computes in: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
