"""Limits of ot_similarity (issue #19), on every backend:

* a NaN or inf in a query patch or a bank entry shows as NaN in exactly the affected outputs, in
  every select mode (a ranking of a NaN plan would otherwise pick some entry and return a finite
  similarity);
* eps at the ends of the supported range [1e-4, 1e3] (api.EPS_RANGE) is computed correctly in
  float32 against the float64 reference (outside it: ValueError, tests/ops/test_ot_similarity.py).
"""
import math

import pytest
import torch

import concept_kernels as ck
from concept_kernels import _backends, _ext
from concept_kernels.ops.ot_similarity.reference import log_plan, sinkhorn_log
from concept_kernels.testing import ot_problem

# (backend, dtype, environment): the cpu float32 lane solver (both lane widths), the per-problem
# SIMD solver (float64) and the scalar solver the CUDA launcher runs (CONCEPT_KERNELS_OT_SCALAR=1)
VARIANTS = [
    ("reference", torch.float32, {}),
    ("cpu", torch.float32, {"CONCEPT_KERNELS_WIDE_SIMD": "0"}),
    ("cpu", torch.float32, {"CONCEPT_KERNELS_WIDE_SIMD": "1"}),
    ("cpu", torch.float64, {}),
    ("cpu", torch.float32, {"CONCEPT_KERNELS_OT_SCALAR": "1"}),
    ("triton", torch.float32, {}),
]


def _skip_unless_runs(backend, env):
    if backend == "cpu" and not _ext.HAS_EXT:
        pytest.skip(f"extension not built: {_ext.EXT_ERROR}")
    if env.get("CONCEPT_KERNELS_WIDE_SIMD") == "1" and _ext.simd_bits() != 512:
        pytest.skip("no wide SIMD path in this build")
    if backend == "triton" and not _backends.triton_interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("stop", ["problem", "row"])
@pytest.mark.parametrize("select", ["sample", "topk", "cost"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["query", "bank"])
@pytest.mark.parametrize("backend,dtype,env", VARIANTS, ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k[-6:]}={x}" for k, x in v.items()) or "default")
def test_nonfinite_input_gives_nan_in_the_affected_problems(monkeypatch, backend, dtype, env, where, value,
                                                            select, stop):
    _skip_unless_runs(backend, env)
    for name, x in env.items():
        monkeypatch.setenv(name, x)
    q, b, i = ot_problem(3, 11, 12, dim=16, seed=3, dtype=dtype)
    if where == "query":
        q[1, 4, 7] = value  # patch 4 of query 1 (not patch 0)
        affected = torch.zeros_like(i, dtype=torch.bool)
        affected[1] = True
    else:
        r = int(i[0, 2])
        b[r, 5, 3] = value  # patch 5 of one bank row
        affected = i == r
    assert 0 < int(affected.sum()) < i.numel()
    k = 4 if select != "cost" else 1
    out = ck.ot_similarity(q, b, i, select=select, k=k, stop=stop, backend=backend)
    if select == "topk":
        affected = affected[..., None].expand_as(out)
    assert out[affected].isnan().all(), f"{where} {value}: finite outputs for affected problems"
    if stop == "problem":  # (stop="row": the row's mean err is NaN, its other problems stop at once)
        assert out[~affected].isfinite().all(), f"{where} {value}: unaffected problems are not finite"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("stop", ["problem", "published"])
def test_concept_contrastive_loss_is_nan_for_a_nan_patch(monkeypatch, backend, stop):
    if backend == "cpu" and not _ext.HAS_EXT:
        pytest.skip(f"extension not built: {_ext.EXT_ERROR}")
    monkeypatch.setenv("CONCEPT_KERNELS_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    B, K, n_cls, P, D = 4, 3, 5, 9, 16
    q = torch.nn.functional.normalize(torch.randn(B, P, D, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, P, D, generator=g), dim=-1)
    queue = torch.nn.functional.normalize(torch.randn(n_cls, K, P, D, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 2, 3])
    confusing = torch.tensor([[1, 2], [2, 3], [3, 4], [4, 0]])
    finite = ck.concept_contrastive_loss(q, k, queue, labels, confusing, stop=stop)
    assert finite.isfinite()
    q[2, 6, 1] = math.nan
    assert ck.concept_contrastive_loss(q, k, queue, labels, confusing, stop=stop).isnan()


@pytest.mark.parametrize("eps", [1e-4, 1e3])
@pytest.mark.parametrize("backend,dtype,env", [v for v in VARIANTS if v[1] == torch.float32],
                         ids=lambda v: str(v) if not isinstance(v, dict) else
                         ",".join(f"{k[-6:]}={x}" for k, x in v.items()) or "default")
def test_eps_at_the_ends_of_the_supported_range(monkeypatch, backend, dtype, env, eps):
    """float32 against the float64 reference: 1 - <pi, C> within 1e-3 (the float32 rounding of the
    plan's log, ~4e-8 / eps, is 4e-4 at eps = 1e-4), and the selected top-5 similarities equal the
    reference's wherever the reference's 5th and 6th entries are apart by well above float32's
    rounding of log pi (~1e-7 / eps at 1e-4: 0.1; a cost gap of 1e-3 at 1e3)."""
    _skip_unless_runs(backend, env)
    for name, x in env.items():
        monkeypatch.setenv(name, x)
    q, b, i = ot_problem(4, 100, 150, dim=32, seed=1, dtype=dtype)
    B, M = i.shape
    ref = ck.ot_similarity(q.double(), b.double(), i, select="cost", eps=eps, backend="reference")
    got = ck.ot_similarity(q, b, i, select="cost", eps=eps, backend=backend)
    assert (got.double() - ref).abs().max() < 1e-3
    k, min_gap = 5, (0.1 if eps < 1 else 1e-3 / eps)
    C = (1 - torch.einsum("bpd,bmqd->bmpq", q.double(), b.double()[i])).reshape(B * M, 9, 9)
    f, g, _ = sinkhorn_log(C, eps=eps, max_iter=200, tol=1e-3)
    lp = log_plan(C, f, g, eps).reshape(B, M, 81)
    top = lp.topk(k + 1, dim=-1)
    sep = (top.values[..., k - 1] - top.values[..., k]) > min_gap
    assert int(sep.sum()) > 10
    sim = (1 - C).reshape(B, M, 81)
    want = sim.gather(-1, top.indices[..., :k]).sort(-1).values
    out = ck.ot_similarity(q, b, i, select="topk", k=k, eps=eps, backend=backend).double().sort(-1).values
    assert ((out - want).abs().max(-1).values < 1e-5)[sep].all()
