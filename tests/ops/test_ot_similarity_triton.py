"""Triton backend of ot_similarity (triton_impl fwd/bwd of docs/OT_BACKEND_CONTRACT.md) against the
reference, under TRITON_INTERPRET=1 on CPU (set by tests/conftest.py) with tiny grids.

The functions are called directly; the public-API wiring is tested elsewhere. topk/sample values
are compared through the reference's plan: at eps=0.01 the P largest plan entries are near-ties
(all ~1/P), so which of them comes first may differ; we check that every selected entry has the
reference's log-plan value of that rank (up to a small slack), that ``out`` is the similarity at
``aux``, exact values where the ranking is well separated, and index sets on separated ranks.
"""
import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: the Triton backend is not tested")

from concept_kernels.ops.ot_similarity import triton_impl as T  # noqa: E402
from concept_kernels.ops.ot_similarity.reference import (  # noqa: E402
    log_plan,
    ot_similarity_ref,
    sinkhorn_log,
    stop_groups,
)
from concept_kernels.testing import logit_like_rows, ot_problem  # noqa: E402

pytestmark = pytest.mark.triton

SELECTS = {"sample": T.SELECT_SAMPLE, "topk": T.SELECT_TOPK, "cost": T.SELECT_COST}
STOPS = {"problem": T.STOP_PROBLEM, "row": T.STOP_ROW, "all": T.STOP_ALL}
EMPTY = torch.empty(0, dtype=torch.long)
LP_SLACK = 2e-3  # |log pi| slack for near-ties (fp32 f, g differ by ~1e-6, divided by eps=0.01)



@pytest.fixture(autouse=True)
def _cpu_tests_need_the_interpreter(request):
    if not T._interpreting() and request.node.get_closest_marker("cuda") is None:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")

def _fwd(q, b, i, *, select="topk", k=5, choice=None, eps=0.01, max_iter=30, tol=1e-3,
         stop="problem"):
    ch = choice if select == "sample" else EMPTY
    return T.ot_similarity_fwd_triton(q, b, i, ch, SELECTS[select], k, eps, max_iter, tol,
                                      STOPS[stop])


def _sim(q, b, i):
    """(B, M, P*P) similarities <q_i, y_j> in q's dtype."""
    B, M = i.shape
    return torch.einsum("bpd,bmqd->bmpq", q, b[i]).reshape(B, M, -1)


def _ref_lp(q, b, i, *, eps, max_iter, tol, stop):
    B, M = i.shape
    P = q.shape[1]
    cost = (1 - _sim(q, b, i)).reshape(B * M, P, P)
    groups = stop_groups(B, M, stop, q.device)
    f, g, _ = sinkhorn_log(cost, eps=eps, max_iter=max_iter, tol=tol, groups=groups)
    return log_plan(cost, f, g, eps).reshape(B, M, P * P)


def _check_selection(out, aux, q, b, i, lp, *, ranks, name):
    """aux consistent with out; each pick has the reference's rank value (near-ties allowed);
    exact values where the reference ranking is separated by more than the slack."""
    B, M = i.shape
    P = q.shape[1]
    assert aux.dtype == torch.int64 and out.dtype == q.dtype
    assert ((aux >= 0) & (aux < P * P)).all(), f"{name}: aux out of range"
    torch.testing.assert_close(out, _sim(q, b, i).gather(-1, aux), atol=1e-6, rtol=1e-6,
                               msg=lambda m: f"{name}: out is not the similarity at aux: {m}")
    ref_sorted = lp.sort(dim=-1, descending=True).values
    want = ref_sorted.gather(-1, ranks)  # the reference's log-plan value at each picked rank
    got = lp.gather(-1, aux)
    dev = (got - want).abs().max()
    assert dev <= LP_SLACK, f"{name}: a pick is not of its rank: {dev}"
    # separated ranks: the pick is the reference's entry, so the values agree exactly
    prev = torch.cat([torch.full_like(ref_sorted[..., :1], math.inf), ref_sorted[..., :-1]], -1)
    nxt = torch.cat([ref_sorted[..., 1:], torch.full_like(ref_sorted[..., :1], -math.inf)], -1)
    gap = torch.minimum(prev - ref_sorted, ref_sorted - nxt).gather(-1, ranks)
    sep = gap > 4 * LP_SLACK
    ref_idx = lp.sort(dim=-1, descending=True).indices.gather(-1, ranks)
    assert torch.equal(aux[sep], ref_idx[sep]), f"{name}: separated ranks picked other entries"
    return int(sep.sum())


@pytest.mark.parametrize("stop", ["problem", "row", "all"])
@pytest.mark.parametrize("select", ["topk", "sample", "cost"])
def test_fwd_matches_reference(select, stop):
    B, M, P, D, k = 2, 5, 9, 16, 5
    q, b, i = ot_problem(B, M, 7, patches=P, dim=D, seed=1)
    # tol=1e-2: problems stop after 5..35 iterations, rows after 15/28, all after 21
    kw = dict(eps=0.01, max_iter=40, tol=1e-2, stop=stop)
    choice = torch.randint(k, (B, M)) if select == "sample" else None
    out, aux = _fwd(q, b, i, select=select, k=k, choice=choice, **kw)
    kk = k if select == "topk" else 1
    assert out.shape == (B, M, kk) and out.dtype == q.dtype
    ref = ot_similarity_ref(q, b, i, select=select, k=k, choice=choice, **kw)
    lp = _ref_lp(q, b, i, **kw)
    if select == "cost":
        assert aux.shape == (B, M, P, P) and aux.dtype == q.dtype
        torch.testing.assert_close(out[..., 0], ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(aux.reshape(B, M, -1), lp.exp(), atol=2e-5, rtol=1e-3)
        pi = aux.reshape(B, M, -1)
        torch.testing.assert_close(out[..., 0], 1 - (pi * (1 - _sim(q, b, i))).sum(-1))
        return
    assert aux.shape == (B, M, kk)
    ranks = torch.arange(k).expand(B, M, k) if select == "topk" else choice[..., None]
    n_sep = _check_selection(out, aux, q, b, i, lp, ranks=ranks, name=f"{select}/{stop}")
    assert n_sep > 0
    # the values of the reference itself agree wherever its ranking is not a near-tie
    ref = ref if select == "topk" else ref[..., None]
    ok = (out - ref).abs() <= 1e-6
    assert ok.float().mean() > 0.3, f"{select}/{stop}: too few values equal the reference's"


def test_topk_index_sets_on_well_separated_ranks():
    # at eps=0.01 the P entries of the near-permutation plan are ~1/P each and far above the rest:
    # the top-P *set* is well separated even though its order is a near-tie
    B, M, P, D = 2, 6, 9, 16
    q, b, i = ot_problem(B, M, 8, patches=P, dim=D, seed=2)
    kw = dict(eps=0.01, max_iter=40, tol=1e-3, stop="problem")
    out, aux = _fwd(q, b, i, select="topk", k=P, **kw)
    lp = _ref_lp(q, b, i, **kw)
    top = lp.topk(P + 1, dim=-1).values
    sep = (top[..., P - 1] - top[..., P]) > 1e-2
    assert sep.float().mean() > 0.5
    assert torch.equal(aux.sort(-1).values[sep], lp.topk(P, dim=-1).indices.sort(-1).values[sep])


@pytest.mark.parametrize("per_launch", [4, 16])
def test_group_iteration_counts_match_reference(monkeypatch, per_launch):
    # rows stop after 26, 18 and 20 iterations, "all" after 20: with 4 iterations per pass-1
    # launch, finished rows skip later launches while the others go on
    monkeypatch.setattr(T, "_ERR_ITERS_PER_LAUNCH", per_launch)
    B, M, P, D = 3, 4, 9, 16
    q, b, i = ot_problem(B, M, 8, patches=P, dim=D, seed=3)
    cost = (1 - _sim(q, b, i)).reshape(B * M, P, P)
    for stop, G, L in (("row", B, M), ("all", 1, B * M)):
        groups = stop_groups(B, M, stop, q.device)
        _, _, iters = sinkhorn_log(cost, eps=0.01, max_iter=40, tol=1e-2, groups=groups)
        blocks = T._blocks(P, D, L)
        n, start, f, g = T._group_iterations(q, b, i, 0.01, 40, 1e-2, G, L, blocks)
        expect = iters.reshape(G, L)[:, 0]
        assert (expect < 40).all()
        assert torch.equal(n, expect), (stop, n, expect)
        # pass 2 resumes from the start of the launch that decided each group: the state after
        # that many iterations (the reference run with tol=0 and max_iter=start)
        assert torch.equal(start, (n - 1) // per_launch * per_launch)
        for grp in range(G):
            rows = slice(grp * L, (grp + 1) * L)
            f_ref, g_ref, _ = sinkhorn_log(cost[rows], eps=0.01, max_iter=max(int(start[grp]), 1), tol=0.0)
            if int(start[grp]) == 0:
                f_ref, g_ref = torch.zeros_like(f_ref), torch.zeros_like(g_ref)
            torch.testing.assert_close(f[rows], f_ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(g[rows], g_ref, atol=1e-5, rtol=0)


def test_group_rules_with_a_huge_max_iter_use_bounded_memory():
    """Pass 1 keeps no (groups x max_iter) table: max_iter = 2**40 (a table of 3 TB) runs, stops
    launching once every group is decided, and gives the result of a modest max_iter."""
    q, b, i = ot_problem(3, 5, 8, patches=9, dim=16, seed=4)
    for stop in ("row", "all"):
        huge, aux_h = _fwd(q, b, i, select="topk", k=4, eps=0.01, max_iter=2**40, tol=1e-2, stop=stop)
        small, aux_s = _fwd(q, b, i, select="topk", k=4, eps=0.01, max_iter=60, tol=1e-2, stop=stop)
        assert torch.equal(aux_h, aux_s) and torch.equal(huge, small)


def test_group_rules_hitting_max_iter_finish_from_the_last_state(monkeypatch):
    """tol not reached within max_iter: every group runs exactly max_iter iterations (not a
    multiple of the launch length), as stop="problem" with tol=0 does."""
    monkeypatch.setattr(T, "_ERR_ITERS_PER_LAUNCH", 4)
    q, b, i = ot_problem(2, 6, 8, patches=9, dim=16, seed=6)
    fixed, aux_f = _fwd(q, b, i, select="cost", k=1, eps=0.01, max_iter=11, tol=0.0, stop="problem")
    for stop in ("row", "all"):
        got, aux_g = _fwd(q, b, i, select="cost", k=1, eps=0.01, max_iter=11, tol=1e-9, stop=stop)
        torch.testing.assert_close(got, fixed, atol=1e-6, rtol=0)
        torch.testing.assert_close(aux_g, aux_f, atol=1e-6, rtol=0)


def _grad_with_aux(q, b, i, aux, grad_out, select):
    """The contract's gradient through torch autograd of the reference math, given aux."""
    qq = q.detach().clone().requires_grad_(True)
    sim = _sim(qq, b, i)
    if select == "cost":
        out = 1 - (aux.reshape(sim.shape) * (1 - sim)).sum(-1, keepdim=True)
    else:
        out = sim.gather(-1, aux)
    out.backward(grad_out)
    return qq.grad


@pytest.mark.parametrize("select", ["topk", "sample", "cost"])
def test_bwd_matches_autograd(select):
    B, M, P, D, k = 2, 5, 9, 12, 4
    q, b, i = ot_problem(B, M, 6, patches=P, dim=D, seed=4)
    choice = torch.randint(k, (B, M)) if select == "sample" else None
    out, aux = _fwd(q, b, i, select=select, k=k, choice=choice, max_iter=20)
    grad_out = torch.randn_like(out)
    gq = T.ot_similarity_bwd_triton(grad_out, q, b, i, aux, SELECTS[select])
    assert gq.shape == q.shape and gq.dtype == q.dtype
    expect = _grad_with_aux(q, b, i, aux, grad_out, select)
    torch.testing.assert_close(gq, expect, atol=1e-5, rtol=1e-5)
    again = T.ot_similarity_bwd_triton(grad_out, q, b, i, aux, SELECTS[select])
    assert torch.equal(gq, again)  # deterministic
    if select == "cost":  # the plan is a constant: the reference's autograd directly
        qq = q.clone().requires_grad_(True)
        ref = ot_similarity_ref(qq, b, i, select="cost", max_iter=20)
        ref.backward(grad_out[..., 0])
        torch.testing.assert_close(gq, qq.grad, atol=1e-4, rtol=1e-4)


def test_bwd_matches_reference_autograd_on_separated_sets():
    # grad_out constant over the k = P picks: the gradient depends on the set only (well separated)
    B, M, P, D = 2, 4, 9, 16
    q, b, i = ot_problem(B, M, 6, patches=P, dim=D, seed=5)
    kw = dict(eps=0.01, max_iter=40, tol=1e-3)
    lp = _ref_lp(q, b, i, stop="problem", **kw)
    top = lp.topk(P + 1, dim=-1).values
    assert ((top[..., P - 1] - top[..., P]) > 1e-2).all()
    out, aux = _fwd(q, b, i, select="topk", k=P, **kw)
    grad_out = torch.randn(B, M, 1).expand(B, M, P).contiguous()
    gq = T.ot_similarity_bwd_triton(grad_out, q, b, i, aux, T.SELECT_TOPK)
    qq = q.clone().requires_grad_(True)
    ot_similarity_ref(qq, b, i, select="topk", k=P, **kw).backward(grad_out)
    torch.testing.assert_close(gq, qq.grad, atol=1e-5, rtol=1e-5)


def test_float64_inputs():
    B, M, P, D, k = 2, 3, 9, 10, 3
    q, b, i = ot_problem(B, M, 5, patches=P, dim=D, seed=6, dtype=torch.float64)
    out, aux = _fwd(q, b, i, select="topk", k=k)
    assert out.dtype == torch.float64
    # out is the exact fp64 similarity at the picks (only the ranking ran in fp32)
    torch.testing.assert_close(out, _sim(q, b, i).gather(-1, aux), atol=1e-12, rtol=1e-12)
    lp = _ref_lp(q, b, i, eps=0.01, max_iter=30, tol=1e-3, stop="problem")
    ranks = torch.arange(k).expand(B, M, k)
    want = lp.sort(-1, descending=True).values.gather(-1, ranks)
    assert (lp.gather(-1, aux) - want).abs().max() < 5e-3
    oc, pi = _fwd(q, b, i, select="cost")
    assert oc.dtype == pi.dtype == torch.float64
    ref = ot_similarity_ref(q, b, i, select="cost", max_iter=30)
    torch.testing.assert_close(oc[..., 0], ref, atol=5e-5, rtol=0)
    gq = T.ot_similarity_bwd_triton(torch.ones_like(out), q, b, i, aux, T.SELECT_TOPK)
    assert gq.dtype == torch.float64
    expect = _grad_with_aux(q, b, i, aux, torch.ones_like(out), "topk")
    torch.testing.assert_close(gq, expect, atol=1e-12, rtol=1e-12)


def _assert_finite(out, aux, P, name):
    assert torch.isfinite(out).all(), f"{name}: non-finite out"
    if aux.dtype == torch.int64:
        assert ((aux >= 0) & (aux < P * P)).all(), f"{name}: aux out of range"
    else:
        assert torch.isfinite(aux).all(), f"{name}: non-finite plan"


@pytest.mark.parametrize("select", ["topk", "cost"])
def test_no_nan_at_small_eps_and_duplicates(select):
    B, M, P, D = 2, 3, 9, 16
    g = torch.Generator().manual_seed(7)
    q = logit_like_rows(B, P, classes=D, generator=g)
    q[:, 1] = q[:, 0]  # duplicate patches inside a set
    bank = torch.cat([q, logit_like_rows(2, P, classes=D, generator=g)])  # bank rows = query sets
    bank[2, :] = bank[2, 0]  # a set of identical patches
    i = torch.tensor([[0, 2, 3], [1, 2, 0]])
    for stop in ("problem", "all"):
        out, aux = _fwd(q, bank, i, select=select, k=5, eps=1e-3, max_iter=25, stop=stop)
        _assert_finite(out, aux, P, f"{select}/{stop}")
        ref = ot_similarity_ref(q, bank, i, select=select, k=5, eps=1e-3, max_iter=25, stop=stop)
        if select == "cost":
            torch.testing.assert_close(out[..., 0], ref, atol=1e-4, rtol=0)
    gq = T.ot_similarity_bwd_triton(torch.ones_like(out), q, bank, i, aux, SELECTS[select])
    assert torch.isfinite(gq).all()


@pytest.mark.parametrize("P,D", [(1, 8), (16, 10), (3, 10)])
def test_odd_shapes(P, D):
    B, M = 2, 3
    q, b, i = ot_problem(B, M, 4, patches=P, dim=D, seed=8)
    kw = dict(eps=0.01, max_iter=15, tol=1e-3, stop="problem")
    k = min(3, P * P)
    out, aux = _fwd(q, b, i, select="topk", k=k, **kw)
    _assert_finite(out, aux, P, f"P={P}")
    lp = _ref_lp(q, b, i, **kw)
    ranks = torch.arange(k).expand(B, M, k)
    _check_selection(out, aux, q, b, i, lp, ranks=ranks, name=f"P={P},D={D}")
    oc, pi = _fwd(q, b, i, select="cost", **kw)
    ref = ot_similarity_ref(q, b, i, select="cost", **kw)
    torch.testing.assert_close(oc[..., 0], ref, atol=2e-5, rtol=0)
    gq = T.ot_similarity_bwd_triton(torch.ones_like(out), q, b, i, aux, T.SELECT_TOPK)
    expect = _grad_with_aux(q, b, i, aux, torch.ones_like(out), "topk")
    torch.testing.assert_close(gq, expect, atol=1e-5, rtol=1e-5)


def test_exact_ties_take_the_lowest_flat_index():
    # identical patches everywhere: every plan entry is the same number, so picks are 0, 1, 2, ...
    q = torch.nn.functional.normalize(torch.ones(1, 9, 16), dim=-1)
    i = torch.zeros(1, 2, dtype=torch.long)
    out, aux = _fwd(q, q.clone(), i, select="topk", k=12, max_iter=5)
    assert torch.equal(aux, torch.arange(12).expand(1, 2, 12))
    choice = torch.tensor([[3, 11]])
    _, aux_s = _fwd(q, q.clone(), i, select="sample", k=12, choice=choice, max_iter=5)
    assert torch.equal(aux_s[..., 0], choice)


def test_p1_is_the_single_similarity():
    q, b, i = ot_problem(2, 3, 4, patches=1, dim=10, seed=9)
    out, aux = _fwd(q, b, i, select="topk", k=1, max_iter=3)
    assert (aux == 0).all()
    torch.testing.assert_close(out, _sim(q, b, i), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("select", ["topk", "sample", "cost"])
def test_empty_m(select):
    B, P, D, k = 2, 9, 16, 3
    q, b, _ = ot_problem(B, 1, 3, patches=P, dim=D, seed=10)
    i = torch.empty(B, 0, dtype=torch.long)
    choice = torch.empty(B, 0, dtype=torch.long) if select == "sample" else None
    for stop in ("problem", "row"):
        out, aux = _fwd(q, b, i, select=select, k=k, choice=choice, stop=stop)
        kk = k if select == "topk" else 1
        assert out.shape == (B, 0, kk)
        assert aux.shape == ((B, 0, P, P) if select == "cost" else (B, 0, kk))
    gq = T.ot_similarity_bwd_triton(torch.zeros(B, 0, kk), q, b, i, aux, SELECTS[select])
    assert gq.shape == q.shape and (gq == 0).all()


def test_supported_modes_and_errors():
    for s in range(3):
        for st in range(3):
            assert T.triton_unsupported_reasons(s, st) == []
    assert T.triton_unsupported_reasons(5, 0) and T.triton_unsupported_reasons(0, 7)
    q, b, i = ot_problem(1, 2, 3, patches=4, dim=8, seed=11)
    with pytest.raises(NotImplementedError, match="stop mode"):
        T.ot_similarity_fwd_triton(q, b, i, EMPTY, 1, 2, 0.01, 5, 1e-3, 9)


def test_forward_is_deterministic():
    q, b, i = ot_problem(2, 4, 6, patches=9, dim=16, seed=12)
    a1, x1 = _fwd(q, b, i, select="topk", k=4, max_iter=10, stop="row")
    a2, x2 = _fwd(q, b, i, select="topk", k=4, max_iter=10, stop="row")
    assert torch.equal(a1, a2) and torch.equal(x1, x2)


@pytest.mark.parametrize("stop", ["problem", "row", "all"])
def test_gpu_block_sizes_many_programs(monkeypatch, stop):
    # the GPU block choice (small blocks, BLOCK_D = 1): several programs per group, group tails
    monkeypatch.setattr(T, "_interpreting", lambda: False)
    B, M, P, D, k = 2, 11, 9, 6, 3
    assert T._blocks(P, D, M)[0] < M  # more than one program per row
    q, b, i = ot_problem(B, M, 9, patches=P, dim=D, seed=13)
    kw = dict(eps=0.01, max_iter=20, tol=2e-2, stop=stop)  # rows stop after 14 and 8, all after 11
    out, aux = _fwd(q, b, i, select="topk", k=k, **kw)
    lp = _ref_lp(q, b, i, **kw)
    ranks = torch.arange(k).expand(B, M, k)
    _check_selection(out, aux, q, b, i, lp, ranks=ranks, name=f"gpu-blocks/{stop}")
    oc, pi = _fwd(q, b, i, select="cost", **kw)
    ref = ot_similarity_ref(q, b, i, select="cost", **kw)
    torch.testing.assert_close(oc[..., 0], ref, atol=2e-5, rtol=0)
    if stop == "problem":
        for sel, a in (("topk", aux), ("cost", pi)):
            grad_out = torch.randn(B, M, k if sel == "topk" else 1)
            gq = T.ot_similarity_bwd_triton(grad_out, q, b, i, a, SELECTS[sel])
            expect = _grad_with_aux(q, b, i, a, grad_out, sel)
            torch.testing.assert_close(gq, expect, atol=1e-5, rtol=1e-5)


_ON_GPU = torch.cuda.is_available() and not T._interpreting()


@pytest.mark.cuda
@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU and TRITON_INTERPRET=0 (compiled)")
@pytest.mark.parametrize("stop", ["problem", "row", "all"])
@pytest.mark.parametrize("select", ["topk", "sample", "cost"])
@pytest.mark.parametrize("P,D", [(9, 200), (16, 10)])
def test_compiled_gpu_kernels_match_reference(select, stop, P, D):
    # run with: TRITON_INTERPRET=0 pytest -m cuda tests/ops/test_ot_similarity_triton.py
    B, M, k = 4, 37, 5
    q, b, i = ot_problem(B, M, 23, patches=P, dim=D, seed=14, device="cuda")
    kw = dict(eps=0.01, max_iter=60, tol=1e-2, stop=stop)
    choice = torch.randint(k, (B, M), device="cuda") if select == "sample" else None
    out, aux = _fwd(q, b, i, select=select, k=k, choice=choice, **kw)
    lp = _ref_lp(q, b, i, **kw)
    if select == "cost":
        ref = ot_similarity_ref(q, b, i, select="cost", **kw)
        torch.testing.assert_close(out[..., 0], ref, atol=1e-4, rtol=0)  # GPU exp/log: approximate
    else:
        ranks = torch.arange(k, device="cuda").expand(B, M, k)
        ranks = choice[..., None] if select == "sample" else ranks
        _check_selection(out, aux, q, b, i, lp, ranks=ranks, name=f"cuda {select}/{stop}")
    grad_out = torch.randn_like(out)
    gq = T.ot_similarity_bwd_triton(grad_out, q, b, i, aux, SELECTS[select])
    expect = _grad_with_aux(q, b, i, aux, grad_out, select)
    torch.testing.assert_close(gq, expect, atol=1e-4, rtol=1e-4)
    assert torch.equal(gq, T.ot_similarity_bwd_triton(grad_out, q, b, i, aux, SELECTS[select]))
