"""ot_similarity reference: semantics, gradients, numerics and bad input.

The reference-vs-published-loop comparison lives in tests/test_reference_vs_oracle.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import concept_kernels as ck
from concept_kernels.ops.ot_similarity.reference import log_plan, sinkhorn_log
from concept_kernels.testing import logit_like_rows, ot_problem


def _cost(query, bank, index):
    keys = bank[index]
    B, M, P, _ = keys.shape
    return (1 - torch.einsum("bpd,bmqd->bmpq", query, keys)).reshape(B * M, P, P)


def test_sinkhorn_column_marginals_exact_and_rows_converge():
    q, b, i = ot_problem(2, 6, 10, seed=1, dtype=torch.float64)
    C = _cost(q, b, i)
    # eps=0.05: at 0.01 Sinkhorn needs thousands of iterations to converge this tightly
    f, g, iters = sinkhorn_log(C, eps=0.05, max_iter=2000, tol=1e-9)
    pi = log_plan(C, f, g, 0.05).exp()
    torch.testing.assert_close(pi.sum(1), torch.full_like(pi.sum(1), 1 / 9), atol=1e-12, rtol=0)
    torch.testing.assert_close(pi.sum(2), torch.full_like(pi.sum(2), 1 / 9), atol=1e-6, rtol=0)
    assert (iters > 1).all() and (iters < 2000).all()


def test_per_problem_stop_freezes_each_problem_at_its_own_iteration():
    q, b, i = ot_problem(1, 8, 12, seed=2, dtype=torch.float64)
    C = _cost(q, b, i)
    _, _, iters = sinkhorn_log(C, eps=0.01, max_iter=200, tol=1e-3)
    assert iters.unique().numel() > 1  # problems stop at different iterations
    for p in range(C.shape[0]):  # each equals a solo solve of that problem
        f1, g1, it1 = sinkhorn_log(C[p:p + 1], eps=0.01, max_iter=200, tol=1e-3)
        assert it1.item() == iters[p].item()


def test_tol_zero_runs_max_iter_and_all_stop_rules_agree():
    q, b, i = ot_problem(3, 4, 10, seed=3, dtype=torch.float64)
    outs = [ck.ot_similarity(q, b, i, select="topk", k=5, tol=0.0, max_iter=17, stop=s) for s in ("problem", "row", "all")]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=0, rtol=0)


def test_select_modes_are_consistent_with_the_plan():
    q, b, i = ot_problem(2, 5, 9, seed=4, dtype=torch.float64)
    topk = ck.ot_similarity(q, b, i, select="topk", k=3)
    for c in range(3):
        pick = ck.ot_similarity(q, b, i, select="sample", k=3, choice=torch.full((2, 5), c))
        torch.testing.assert_close(pick, topk[..., c], atol=0, rtol=0)
    # "cost" = 1 - <pi, C> from an independent recomputation of the plan
    C = _cost(q, b, i)
    f, g, _ = sinkhorn_log(C, eps=0.01, max_iter=200, tol=1e-3)
    pi = log_plan(C, f, g, 0.01).exp()
    expected = (1 - (pi * C).sum((1, 2))).reshape(2, 5)
    torch.testing.assert_close(ck.ot_similarity(q, b, i, select="cost"), expected)
    # topk values are similarities of real pairs: within [-1, 1] for unit rows
    assert topk.abs().max() <= 1 + 1e-12


def test_identical_sets_match_each_patch_with_itself():
    q = F.normalize(torch.randn(1, 9, 32, dtype=torch.float64), dim=-1)
    perm = torch.randperm(9)
    bank = q[0, perm][None]
    out = ck.ot_similarity(q, bank, torch.zeros(1, 1, dtype=torch.long), select="topk", k=9, max_iter=500, tol=1e-9)
    torch.testing.assert_close(out, torch.ones_like(out), atol=1e-9, rtol=0)  # the permutation is found


@pytest.mark.parametrize("select,k", [("sample", 3), ("topk", 4)])
def test_gradcheck_float64(select, k):
    # exact for selections (locally constant indices); "cost" uses the envelope gradient by
    # contract (plan held constant), which finite differences cannot see: tested below instead.
    q, b, i = ot_problem(2, 3, 5, patches=4, dim=6, seed=5, dtype=torch.float64)
    q.requires_grad_(True)
    choice = torch.randint(k, (2, 3)) if select == "sample" else None
    fn = lambda x: ck.ot_similarity(x, b, i, select=select, k=k, choice=choice, eps=0.1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q,), eps=1e-6, atol=1e-6)


def test_gradient_is_the_selected_bank_rows():
    q, b, i = ot_problem(2, 3, 5, seed=6, dtype=torch.float64)
    q.requires_grad_(True)
    choice = torch.randint(3, (2, 3))
    w = torch.randn(2, 3, dtype=torch.float64)
    (ck.ot_similarity(q, b, i, choice=choice) * w).sum().backward()
    # independent: recompute the plan, pick the entry, scatter the bank row
    C = _cost(q.detach(), b, i)
    f, g, _ = sinkhorn_log(C, eps=0.01, max_iter=200, tol=1e-3)
    flat = log_plan(C, f, g, 0.01).reshape(2, 3, 81).topk(3, dim=-1).indices.gather(-1, choice[..., None]).squeeze(-1)
    expected = torch.zeros_like(q)
    for bb in range(2):
        for m in range(3):
            r, c = divmod(int(flat[bb, m]), 9)
            expected[bb, r] += w[bb, m] * b[i[bb, m], c]
    torch.testing.assert_close(q.grad, expected)


def test_cost_gradient_holds_the_plan_constant():
    q, b, i = ot_problem(2, 3, 5, seed=12, dtype=torch.float64)
    q.requires_grad_(True)
    w = torch.randn(2, 3, dtype=torch.float64)
    (ck.ot_similarity(q, b, i, select="cost") * w).sum().backward()
    C = _cost(q.detach(), b, i)
    f, g, _ = sinkhorn_log(C, eps=0.01, max_iter=200, tol=1e-3)
    pi = log_plan(C, f, g, 0.01).exp().reshape(2, 3, 9, 9)
    expected = torch.einsum("bm,bmpq,bmqd->bpd", w, pi, b[i])  # d(1 - <pi, C>)/dq_p = sum_q pi_pq y_q
    torch.testing.assert_close(q.grad, expected)


def test_choice_is_seeded_with_torch_rng():
    q, b, i = ot_problem(2, 30, 9, seed=7)
    torch.manual_seed(123)
    a = ck.ot_similarity(q, b, i)
    torch.manual_seed(123)
    c = ck.ot_similarity(q, b, i)
    torch.manual_seed(124)
    d = ck.ot_similarity(q, b, i)
    assert torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finite_for_small_eps_duplicates_and_odd_sizes(eps, dtype):
    g = torch.Generator().manual_seed(8)
    q = logit_like_rows(3, 9, classes=10, generator=g).to(dtype)  # D=10 as in the demo
    q[1] = q[0]  # duplicate query sets
    q[2, 1:] = q[2, 0]  # duplicate vectors inside a set
    bank = torch.cat([q.float(), logit_like_rows(2, 9, classes=10, generator=g)]).to(dtype)
    index = torch.tensor([[0, 1, 3], [0, 1, 4], [2, 2, 3]])
    for select in ("sample", "topk", "cost"):
        out = ck.ot_similarity(q, bank, index, select=select, k=10 if select == "topk" else 3, eps=eps)
        assert torch.isfinite(out).all(), (select, eps, dtype)
        assert out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)


@pytest.mark.parametrize("P", [1, 2, 16])
def test_patch_counts(P):
    q, b, i = ot_problem(2, 3, 4, patches=P, dim=7, seed=9)
    out = ck.ot_similarity(q, b, i, select="topk", k=min(P * P, 10))
    assert out.shape == (2, 3, min(P * P, 10)) and torch.isfinite(out).all()
    if P == 1:  # a 1x1 plan: the only pair
        torch.testing.assert_close(out[..., 0], torch.einsum("bd,bmd->bm", q[:, 0], b[i][:, :, 0]))


def test_empty_batch_and_empty_sets():
    q, b, _ = ot_problem(2, 1, 4, seed=10)
    assert ck.ot_similarity(q, b, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    assert ck.ot_similarity(q[:0], b, torch.zeros(0, 3, dtype=torch.long), select="topk", k=4).shape == (0, 3, 4)


def test_non_unit_rows_and_non_contiguous_inputs():
    q, b, i = ot_problem(2, 4, 6, seed=11, dtype=torch.float64)
    out = ck.ot_similarity(q * 3, b, i, select="cost")
    assert torch.isfinite(out).all()
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    torch.testing.assert_close(ck.ot_similarity(qt, b, i, select="topk", k=3), ck.ot_similarity(q, b, i, select="topk", k=3))


BAD = [
    (dict(query=torch.zeros(2, 9)), ValueError, "query must have 3 dimensions"),
    (dict(query=torch.zeros(2, 9, 4, dtype=torch.long)), TypeError, "query must have dtype"),
    (dict(bank=torch.zeros(5, 8, 4)), ValueError, "bank must have shape (R, 9, 4)"),
    (dict(index=torch.zeros(3, 2, dtype=torch.long)), ValueError, "index must have shape (2, M)"),
    (dict(index=torch.zeros(2, 2, dtype=torch.int32)), TypeError, "index must have dtype int64"),
    (dict(index=torch.full((2, 2), 5)), ValueError, "index values must lie in [0, 5)"),
    (dict(index=torch.full((2, 2), -1)), ValueError, "index values must lie in [0, 5)"),
    (dict(select="mean"), ValueError, "select must be one of"),
    (dict(stop="group"), ValueError, "stop must be one of"),
    (dict(k=82, select="topk"), ValueError, "k must be <= P*P = 81"),
    (dict(k=0, select="topk"), ValueError, "k must be > 0"),
    (dict(choice=torch.full((2, 2), 3)), ValueError, "choice values must lie in [0, 3)"),
    (dict(choice=torch.zeros(2, 3, dtype=torch.long)), ValueError, "choice must have shape (2, 2)"),
    (dict(choice=torch.zeros(2, 2, dtype=torch.long), select="topk"), ValueError, "choice is only used"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(eps=1e-40), ValueError, "eps must lie in [0.0001, 1000]"),
    (dict(eps=9e-5), ValueError, "eps must lie in [0.0001, 1000]"),
    (dict(eps=1.1e3), ValueError, "eps must lie in [0.0001, 1000]"),
    (dict(eps=1e6), ValueError, "eps must lie in [0.0001, 1000]"),
    (dict(eps=float("nan")), ValueError, "eps must be > 0"),
    (dict(eps=float("inf")), ValueError, "eps must be > 0"),
    (dict(max_iter=0), ValueError, "max_iter must be > 0"),
    (dict(max_iter=2.5), TypeError, "max_iter must be an int"),
    (dict(tol=-1.0), ValueError, "tol must be >= 0"),
    (dict(backend="metal"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ck.BackendUnavailableError, "backend 'cuda' was requested but cannot run here"),
]


@pytest.mark.parametrize("override,exc,msg", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_names_the_argument(override, exc, msg):
    args = dict(query=torch.zeros(2, 9, 4), bank=torch.zeros(5, 9, 4), index=torch.zeros(2, 2, dtype=torch.long))
    kw = {k: v for k, v in override.items() if k not in args}
    args.update({k: v for k, v in override.items() if k in args})
    with pytest.raises(exc) as e:
        ck.ot_similarity(args["query"], args["bank"], args["index"], **kw)
    assert msg in str(e.value), str(e.value)


def test_device_mismatch_is_reported():
    meta = torch.zeros(5, 9, 4, device="meta")
    with pytest.raises(ValueError, match="same device.*bank on meta"):
        ck.ot_similarity(torch.zeros(2, 9, 4), meta, torch.zeros(2, 2, dtype=torch.long))
