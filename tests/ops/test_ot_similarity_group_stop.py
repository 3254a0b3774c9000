"""The group stopping rules (stop="row" / "all") of the cpu backend's float32 lane solver.

Every problem of a group must run exactly T_g iterations: the first iteration whose mean err over
the group is below tol (or max_iter). T_g comes from the loop-by-loop oracle (tests/oracle.py, the
published routine, float64, on the float32 inputs' costs), checked to be unambiguous (the mean err
is not within rounding of tol at T_g - 1 or T_g). The cpu result of the group rule must then equal,
bitwise, the cpu result of running every problem of the group for exactly T_g iterations
(tol=0, max_iter=T_g): the two passes of the group driver reproduce the lockstep trajectory.
"""
import os
import sys

import pytest
import torch

import concept_kernels as ck
from concept_kernels import _ext
from concept_kernels.testing import logit_like_rows, ot_problem

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from oracle import sinkhorn_plan_published  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"extension not built: {_ext.EXT_ERROR}")

EPS = 0.01


def _costs64(q, b, i):
    """(B, M, P, P) float64 costs of the float32 inputs."""
    return 1 - torch.einsum("bpd,bmqd->bmpq", q.double(), b.double()[i])


def _oracle_iters(C, tol, max_iter, margin=1e-4):
    """Iterations the published routine runs on the problems C (n, P, P), asserting that the stop is
    not decided within `margin` (relative) of tol, so float32 rounding cannot move it."""
    *_, n_iter, errs = sinkhorn_plan_published(C, eps=EPS, max_iter=max_iter, thresh=tol)
    if n_iter < max_iter or errs[-1] < tol:
        assert errs[-1] < tol * (1 - margin), f"stop at {n_iter} decided within rounding of tol: {errs[-1]}"
    for e in errs[:-1]:
        assert e > tol * (1 + margin), f"an earlier iteration's mean err {e} is within rounding of tol {tol}"
    return n_iter


def _group_iters(q, b, i, stop, tol, max_iter):
    """Per row (B,) the oracle's iteration count of the row's group."""
    C = _costs64(q, b, i)
    B, M, P, _ = C.shape
    if stop == "row":
        return [_oracle_iters(C[r], tol, max_iter) for r in range(B)]
    return [_oracle_iters(C.reshape(B * M, P, P), tol, max_iter)] * B


def _cpu(q, b, i, **kw):
    return ck.ot_similarity(q, b, i, backend="cpu", eps=EPS, **kw)


def _assert_group_rule(q, b, i, stop, *, tol, max_iter=200, selects=(("topk", 10), ("cost", 1))):
    iters = _group_iters(q, b, i, stop, tol, max_iter)
    for select, k in selects:
        got = _cpu(q, b, i, select=select, k=k, stop=stop, tol=tol, max_iter=max_iter)
        for r, n in enumerate(iters):
            fixed = _cpu(q, b, i, select=select, k=k, stop="problem", tol=0.0, max_iter=n)
            assert torch.equal(got[r], fixed[r]), f"{stop}/{select}: row {r} is not the {n}-iteration result"
    return iters


@pytest.fixture(params=["narrow", "wide"])
def simd_path(request, monkeypatch):
    """8-problem (narrow) and 16-problem (wide, AVX-512 builds) lane groups."""
    if request.param == "wide" and _ext.simd_bits() != 512:
        pytest.skip(f"this build's CPU vectors are {_ext.simd_bits()}-bit: no wide path")
    monkeypatch.setenv("CONCEPT_KERNELS_WIDE_SIMD", "1" if request.param == "wide" else "0")
    return request.param


@pytest.mark.usefixtures("simd_path")
@pytest.mark.parametrize("stop", ["row", "all"])
@pytest.mark.parametrize("bank_rows", [50, 400])  # GEMM costs (R <= 2M) / dot products (R > 2M)
def test_groups_split_over_lane_groups_and_chunks_run_to_the_oracle_iteration(stop, bank_rows):
    """M = 37 problems per row (not a multiple of the lanes); problems come in bank-row order, so
    lane groups mix rows and a row is spread over many lane groups and GEMM chunks."""
    q, b, i = ot_problem(4, 37, bank_rows, dim=48, seed=5)
    iters = _assert_group_rule(q, b, i, stop, tol=1e-3)
    assert min(iters) > 5


def test_groups_converging_at_very_different_speeds():
    """Row 0 pairs its query with near-copies of itself (near-permutation plans), rows 1 and 2 with
    unrelated sets (row 1 also with row 0's near-copies): the rows stop far apart (and "all" in
    between). The driver saves its lane states after 20 iterations: lane groups of row 0's
    problems restart from their costs, the others resume, and lane groups holding problems of
    rows 0 and 1 (the same bank rows) restart with a different count per lane."""
    g = torch.Generator().manual_seed(7)
    B, M, P, D = 3, 21, 9, 32
    q = logit_like_rows(B, P, classes=D, generator=g)
    noise = logit_like_rows(B, 7, P, classes=D, generator=g)
    near = torch.nn.functional.normalize(q[:, None] + 0.02 * noise, dim=-1)  # (B, 7, P, D)
    far = logit_like_rows(40, P, classes=D, generator=g)
    bank = torch.cat([near.reshape(B * 7, P, D), far])
    index = torch.randint(B * 7, 40 + B * 7, (B, M), generator=g)
    index[0] = torch.arange(7).repeat(3)  # row 0: its own near-copies only
    index[1, :7] = torch.arange(7)
    iters = _assert_group_rule(q, bank, index, "row", tol=1e-3)
    assert min(iters) < 20 < max(iters), iters
    iters_all = _assert_group_rule(q, bank, index, "all", tol=1e-3)
    assert min(iters) < iters_all[0] <= max(iters)


@pytest.mark.usefixtures("simd_path")
def test_groups_beyond_the_first_horizon_are_extended():
    """A tight tol needs more iterations than the driver records in its first pass (32) and its first
    extension (to 64, from the states saved after 20): the later segments continue from the
    segments' end states."""
    q, b, i = ot_problem(2, 19, 30, dim=40, seed=9)
    iters = _assert_group_rule(q, b, i, "row", tol=2e-6, max_iter=400, selects=(("cost", 1),))
    assert max(iters) > 64, iters


@pytest.mark.parametrize("stop", ["row", "all"])
def test_max_iter_hit_and_tol_zero_run_max_iter(stop):
    q, b, i = ot_problem(3, 20, 30, dim=24, seed=11)
    fixed = _cpu(q, b, i, select="topk", k=5, stop="problem", tol=0.0, max_iter=7)
    for tol in (0.0, 1e-9):  # tol=0: never below; 1e-9: not reached in 7 iterations
        got = _cpu(q, b, i, select="topk", k=5, stop=stop, tol=tol, max_iter=7)
        assert torch.equal(got, fixed)
    # and one iteration: every group stops at max_iter = 1 whatever tol
    one = _cpu(q, b, i, select="cost", stop=stop, tol=10.0, max_iter=1)
    assert torch.equal(one, _cpu(q, b, i, select="cost", stop="problem", tol=0.0, max_iter=1))


def test_group_rules_agree_bitwise_across_lane_widths_and_threads(monkeypatch):
    """The decision sums each group's err in problem order, whatever the lane grouping, and each
    lane computes its problem alone: 8- and 16-lane groups and 1 or 2 threads agree bitwise."""
    q, b, i = ot_problem(5, 45, 80, dim=40, seed=13)
    results = []
    widths = ["0", "1"] if _ext.simd_bits() == 512 else ["0"]
    threads = torch.get_num_threads()
    try:
        for wide in widths:
            monkeypatch.setenv("CONCEPT_KERNELS_WIDE_SIMD", wide)
            for n in (1, 2):
                torch.set_num_threads(n)
                results.append([_cpu(q, b, i, select="topk", k=6, stop=s) for s in ("row", "all")])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)
