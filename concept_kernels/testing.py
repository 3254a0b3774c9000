"""Tolerances, comparison helpers and input factories shared by the tests and the benchmarks.

Policy (design.md §4): compare against float64 references; for low precision apply the 2x rule
(kernel error <= 2 x the error of the same PyTorch math run in that dtype, both against float64).
Every tolerance lives in the one table below.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# (atol, rtol) per dtype for kernel-vs-reference comparisons of values and gradients.
TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-5, 1.3e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, name: str, dtype: Optional[torch.dtype] = None,
                 atol: Optional[float] = None, rtol: Optional[float] = None) -> None:
    """``torch.testing.assert_close`` with the table's tolerances and the tensor's name in the message."""
    a, r = tolerance(dtype or actual.dtype)
    atol = a if atol is None else atol
    rtol = r if rtol is None else rtol
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def assert_within_2x(actual: torch.Tensor, baseline: torch.Tensor, exact: torch.Tensor, *, name: str,
                     floor: float = 0.0) -> None:
    """The 2x rule: max|actual - exact| <= 2 * max|baseline - exact| + floor (exact in float64)."""
    err = (actual.double() - exact.double()).abs().max().item()
    base = (baseline.double() - exact.double()).abs().max().item()
    assert err <= 2.0 * base + floor, f"{name}: error {err:.3e} > 2 x baseline error {base:.3e} + {floor:.1e}"


def run_with_grads(f, dout: torch.Tensor, *inputs: torch.Tensor):
    """(out, *grads): ``f(*inputs)`` on fresh leaf copies of ``inputs``, backward of ``dout``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = f(*leaves)
    out.backward(dout)
    return (out.detach(), *(t.grad for t in leaves))


def logit_like_rows(*shape: int, classes: int, hot: int = 3, spike: float = 4.0,
                    generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2-normalised rows that look like classifier logits: noise plus a few large classes.

    shape + (classes,) output; each row has ``hot`` classes raised by about ``spike`` standard
    deviations. Sinkhorn on such patch sets needs ~15-30 iterations as in training, whereas random
    unit vectors converge in a couple and would measure nothing (design.md §3).
    """
    logits = torch.randn(*shape, classes, generator=generator)
    hot_idx = torch.randint(classes, (*shape, hot), generator=generator)
    bumps = spike * (1.0 + 0.5 * torch.rand(*shape, hot, generator=generator))
    logits.scatter_add_(-1, hot_idx, bumps)
    return F.normalize(logits, dim=-1).to(dtype)


def ot_problem(batch: int, num_sets: int, bank_rows: int, patches: int = 9, dim: int = 200, *,
               seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(query (B,P,D), bank (R,P,D), index (B,M)) with logit-like rows, for tests and benchmarks.

    Bank rows share the query's "hot" classes often enough for plans to be non-trivial.
    """
    g = torch.Generator().manual_seed(seed)
    query = logit_like_rows(batch, patches, classes=dim, generator=g)
    bank = logit_like_rows(bank_rows, patches, classes=dim, generator=g)
    index = torch.randint(bank_rows, (batch, num_sets), generator=g)
    return query.to(device, dtype), bank.to(device, dtype), index.to(device)


def feature_map(batch: int, channels: int, height: int, width: int, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """A post-ReLU-like backbone feature map (non-negative, sparse-ish, O(1) values).

    Channel Gram energies of such maps reach the hundreds (performance_notes §1.2), which is what
    stresses low-precision attention.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(batch, channels, height, width, generator=g) * 0.7 + 0.2)
    return x.to(device, dtype)
