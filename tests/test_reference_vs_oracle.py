"""The vectorised reference (concept_kernels) equals the loop-by-loop oracle (tests/oracle.py).

The oracle is an independent transcription of the published algorithm (method_spec §3.2, §5.1-5.8)
with per-sample Python loops and one host sync per Sinkhorn iteration. Every test here runs both
on the same random inputs in float64 (float32 where stated) and compares VALUES and GRADIENTS.

Ties of the transport plan: which plan entry is "largest" is only defined when the entries are
separated, and near-permutation plans (random unit rows) routinely have top entries within 1e-11
of each other (all ~ 1/P). Each Sinkhorn comparison therefore ranks the oracle's own log plan and
groups ranks closer than ``SEP`` into tie clusters. On every problem the API's value at a rank
must be one of the oracle's values in that rank's cluster (and a cluster selected as a whole must
give the same sorted values); on problems whose top k+1 entries are all separated (at least half,
asserted) values are compared in order and gradients of sum(w * out) are compared with w = 0 on
the other problems. ``test_ot_exact_plan_ties_compare_values`` covers exact ties. The loss tests
instead assert that their inputs have no near-tie where the loss could see it.

The API side always runs the ``reference`` backend (``CONCEPT_KERNELS_BACKEND=reference``).
"""
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import concept_kernels as ck  # noqa: E402
from concept_kernels.ops.ot_similarity.reference import sinkhorn_log, stop_groups  # noqa: E402
from concept_kernels.testing import assert_close, feature_map, logit_like_rows  # noqa: E402
from oracle import (  # noqa: E402
    QueuesPublished,
    cam_published,
    contrastive_losses_published,
    danet_published,
    ib_kl_published,
    momentum_update_published,
    pam_published,
    picks_to_api,
    queue_z_to_api,
    search_patches_published,
    sinkhorn_call_to_api,
    sinkhorn_distance_published,
)

DT = torch.float64
EPS = 0.01
# Min gap between plan entries, in log-plan units (f+g-C)/eps, for an index-level comparison.
# The two implementations' log plans agree to ~1e-12 up to a uniform shift (test_ot_duals_agree);
# near-permutation plans do have entries closer than that (all ~ log(1/P)).
SEP = 1e-9
KINDS = ("logit", "unit")  # logit-like rows (15-60 Sinkhorn iterations) and random unit rows


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """Always test the reference, also inside the losses, whatever fused backends exist."""
    monkeypatch.setenv("CONCEPT_KERNELS_BACKEND", "reference")


def _rows(kind, *shape, dim, gen):
    """(*shape, dim) float64 unit rows: logit-like or plain random directions."""
    if kind == "logit":
        return logit_like_rows(*shape, classes=dim, generator=gen, dtype=DT)
    return F.normalize(torch.randn(*shape, dim, dtype=DT, generator=gen), dim=-1)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _ranked(info):
    """The oracle's plan entries of every problem in descending plan order:
    (similarities 1 - C (Q, P*P), gaps between consecutive log-plan entries (Q, P*P - 1))."""
    lp = ((info["f"][:, :, None] + info["g"][:, None, :] - info["C"].detach()) / EPS).flatten(1)
    lp_sorted, order = lp.sort(dim=1, descending=True, stable=True)
    sim = (1 - info["C"].detach()).flatten(1).gather(1, order)
    return sim, lp_sorted[:, :-1] - lp_sorted[:, 1:]


def _separated(info, k):
    """(Q,) bool: the top k+1 entries of each problem's (oracle) plan are pairwise > SEP apart,
    so the k selected entries and their order are unambiguous."""
    return (_ranked(info)[1][:, :k] > SEP).all(dim=1)


def _check_tied_values(api_vals, info, positions):
    """Tie-robust value check of every problem, separated or not.

    api_vals (Q, n): the API's values at plan ranks ``positions`` (Q, n) of the oracle's ranking.
    Ranks whose log-plan entries are within SEP form one tie cluster; the API's value at rank p
    must be the oracle's value at some rank of p's cluster, and for a cluster lying entirely among
    the selected ranks the sorted values must agree (the same entries, in either order).
    """
    sim, gaps = _ranked(info)
    cluster = torch.cat([gaps.new_zeros(gaps.shape[0], 1, dtype=torch.long),
                         (gaps > SEP).long().cumsum(dim=1)], dim=1)  # (Q, P*P) per rank
    atol, rtol = 1e-12, 1e-10
    for q in range(sim.shape[0]):
        sel = cluster[q, positions[q]]
        for p, c in enumerate(sel.tolist()):
            cand = sim[q][cluster[q] == c]
            assert (cand - api_vals[q, p]).abs().min() <= atol + rtol * api_vals[q, p].abs(), (
                f"problem {q}, rank {int(positions[q, p])}: {float(api_vals[q, p])!r} is not in "
                f"the oracle's tie cluster {cand.tolist()}")
        for c in sel.unique().tolist():
            members = (cluster[q] == c).nonzero().flatten()
            if set(members.tolist()) <= set(positions[q].tolist()):
                assert_close(api_vals[q][sel == c].sort().values, sim[q, members].sort().values,
                             name=f"problem {q}: sorted values of tie cluster {members.tolist()}")


def _oracle(x, y, pos, r=None, **kw):
    """One published call; returns (leaf x, similarities 1 - C (grad to x), info)."""
    x = _leaf(x)
    cost, info = sinkhorn_distance_published(x, y, pos, r=r, return_info=True, **kw)
    return x, 1 - cost, info


def _iters(cost, B, M, stop, tol=1e-3, max_iter=200):
    """Iterations per problem of the reference Sinkhorn on (B*M, P, P) costs."""
    groups = stop_groups(B, M, stop, cost.device)
    return sinkhorn_log(cost.detach(), eps=EPS, max_iter=max_iter, tol=tol, groups=groups)[2]


def _check_calls(api_out, api_leaf, calls, leaves, k, gen, choice=None):
    """Compare published calls with the API output for the same problems.

    api_out: (Q, n) API values of all problems, the calls' problems concatenated in order; n = 1
    for POS (``choice`` (Q,): the picks) and n = k for NEG. calls: list of (oracle output (Q_c, n)
    carrying grad, oracle info). api_leaf.grad must equal the oracle ``leaves``' grads
    concatenated on dim 0 (the oracle's query tensors, in the order of api_leaf's rows).

    Every problem: tie-robust values (``_check_tied_values``). Problems whose top k+1 plan entries
    are separated: values in order and gradients of sum(w * out) (w = 0 on the other problems).
    """
    Q = api_out.shape[0]
    positions = torch.arange(k).expand(Q, k) if choice is None else choice.reshape(Q, 1)
    outs, seps, start = [], [], 0
    for ora_out, info in calls:
        q = ora_out.shape[0]
        _check_tied_values(api_out.detach()[start:start + q], info, positions[start:start + q])
        outs.append(ora_out)
        seps.append(_separated(info, k))
        start += q
    assert start == Q
    ora, sep = torch.cat(outs), torch.cat(seps)
    assert sep.float().mean() >= 0.5, f"inputs too tied to compare gradients: {sep.tolist()}"
    assert_close(api_out.detach()[sep], ora.detach()[sep], name="values")
    w = torch.randn(api_out.shape, dtype=DT, generator=gen) * sep[:, None].to(DT)
    (api_out * w).sum().backward()
    (ora * w).sum().backward()
    assert api_leaf.grad.abs().sum() > 0
    assert_close(api_leaf.grad, torch.cat([x.grad for x in leaves]), name="grad")
    return sep


# ================================================================================ ot_similarity
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_ot_pos_per_sample_call(kind, seed):
    """Published POS call OTsel(q (1,P,D), queue[c] (K,P,D)) == stop="row", choice = r."""
    g = torch.Generator().manual_seed(100 + seed)
    K, P, D = 6, 9, 64 if kind == "logit" else 16
    q, bank = _rows(kind, 1, P, dim=D, gen=g), _rows(kind, K, P, dim=D, gen=g)
    r = torch.randint(3, (K,), generator=g)
    xo, so, info = _oracle(q, bank, True, r=r)
    query, bank_, index, stop = sinkhorn_call_to_api(q, bank)
    assert stop == "row"
    query = _leaf(query)
    out = ck.ot_similarity(query, bank_, index, select="sample", k=3, choice=r[None], stop=stop,
                           backend="reference")
    assert out.shape == (1, K) and out.dtype == DT
    _check_calls(out.reshape(K, 1), query, [(so[:, None], info)], [xo], 3, g, choice=r)
    assert _iters(info["C"], 1, K, "row").tolist() == [info["n_iter"]] * K
    assert info["n_iter"] >= 10  # a non-trivial number of iterations


@pytest.mark.parametrize("kind", KINDS)
def test_ot_neg_per_sample_call(kind):
    """Published NEG call (top-10, problem-major flattening) == select="topk", k=10, stop="row"."""
    g = torch.Generator().manual_seed(110)
    M, P, D = 8, 9, 64 if kind == "logit" else 16
    q, bank = _rows(kind, 1, P, dim=D, gen=g), _rows(kind, M, P, dim=D, gen=g)
    xo, so, info = _oracle(q, bank, False)
    assert so.shape == (10 * M,)
    query = _leaf(q)
    out = ck.ot_similarity(query, bank, torch.arange(M)[None], select="topk", k=10, stop="row")
    assert out.shape == (1, M, 10)
    # published flattening: (10 M,) problem-major == API (1, M, 10).reshape(-1)
    _check_calls(out.reshape(-1).reshape(M, 10), query, [(so.reshape(M, 10), info)], [xo],
                 10, g)
    assert _iters(info["C"], 1, M, "row").tolist() == [info["n_iter"]] * M
    assert info["n_iter"] >= 10


@pytest.mark.parametrize("kind", KINDS)
def test_ot_current_key_batched_call(kind):
    """Published batched call OTsel(Zq (B,P,D), Zk (B,P,D), POS) == stop="all", index = own row."""
    g = torch.Generator().manual_seed(120)
    B, P, D = 6, 9, 64 if kind == "logit" else 16
    zq, zk = _rows(kind, B, P, dim=D, gen=g), _rows(kind, B, P, dim=D, gen=g)
    r = torch.randint(3, (B,), generator=g)
    xo, so, info = _oracle(zq, zk, True, r=r)
    query, bank, index, stop = sinkhorn_call_to_api(zq, zk)
    assert stop == "all" and index.shape == (B, 1)
    query = _leaf(query)
    out = ck.ot_similarity(query, bank, index, select="sample", k=3, choice=r[:, None], stop=stop)
    assert out.shape == (B, 1)
    _check_calls(out, query, [(so[:, None], info)], [xo], 3, g, choice=r)
    assert _iters(info["C"], B, 1, "all").tolist() == [info["n_iter"]] * B
    # the joint stop is a real constraint here: per problem the counts would differ
    assert len(set(_iters(info["C"], B, 1, "problem").tolist())) > 1


@pytest.mark.parametrize("select", ["sample", "topk"])
@pytest.mark.parametrize("kind", KINDS)
def test_ot_several_samples_row_stop_equals_one_call_per_sample(select, kind):
    """One ot_similarity call with B rows and stop="row" == B separate published calls."""
    g = torch.Generator().manual_seed(130)
    B, M, R, P, D = 4, 5, 7, 9, 64 if kind == "logit" else 16
    qs, bank = _rows(kind, B, P, dim=D, gen=g), _rows(kind, R, P, dim=D, gen=g)
    index = torch.randint(R, (B, M), generator=g)
    index[0, 1] = index[0, 0]  # a repeated bank row within one sample
    choice = torch.randint(3, (B, M), generator=g)
    k = 3 if select == "sample" else 10
    query = _leaf(qs)
    kw = dict(choice=choice) if select == "sample" else {}
    out = ck.ot_similarity(query, bank, index, select=select, k=k, stop="row", **kw)
    calls, leaves, n_iter = [], [], []
    for b in range(B):
        xo, so, info = _oracle(qs[b:b + 1], bank[index[b]], select == "sample", r=choice[b])
        calls.append((so.reshape(M, -1), info))
        leaves.append(xo)
        n_iter.append(info["n_iter"])
    _check_calls(out.reshape(B * M, -1), query, calls, leaves, k, g,
                 choice=choice.reshape(-1) if select == "sample" else None)
    it = _iters(torch.cat([info["C"] for _, info in calls]), B, M, "row").reshape(B, M)
    assert it.tolist() == [[n] * M for n in n_iter]
    assert len(set(n_iter)) > 1  # rows stop independently


@pytest.mark.parametrize("kind", KINDS)
def test_ot_problem_stop_equals_one_call_per_problem(kind):
    """The default stop="problem" == one published call per (b, m) (a mean over one problem)."""
    g = torch.Generator().manual_seed(140)
    B, M, R, P, D = 3, 4, 6, 9, 64 if kind == "logit" else 16
    qs, bank = _rows(kind, B, P, dim=D, gen=g), _rows(kind, R, P, dim=D, gen=g)
    index = torch.randint(R, (B, M), generator=g)
    query = _leaf(qs)
    out = ck.ot_similarity(query, bank, index, select="topk", k=10)  # stop="problem" by default
    calls, leaves = [], []
    for b in range(B):
        xb = _leaf(qs[b:b + 1])
        for m in range(M):
            cost, info = sinkhorn_distance_published(xb, bank[index[b, m]][None], False,
                                                     return_info=True)
            calls.append(((1 - cost)[None], info))
        leaves.append(xb)
    _check_calls(out.reshape(B * M, 10), query, calls, leaves, 10, g)
    n_iter = [info["n_iter"] for _, info in calls]
    assert _iters(torch.cat([info["C"] for _, info in calls]), B, M, "problem").tolist() == n_iter
    assert len(set(n_iter)) > 1


@pytest.mark.parametrize("groups", ["row", "problem"])
def test_ot_duals_agree_with_published_iterations(groups):
    """Reference duals == the oracle's up to the published 1e-8 inside log(a + 1e-8): it shifts f
    by eps*log(1 + 1e-8 n) and cancels in g (n = m), so it shifts the log plan uniformly and
    changes no ranking. Checked iteration by iteration through the error trace."""
    g = torch.Generator().manual_seed(170)
    M, P, D = 4, 9, 64
    q, bank = _rows("logit", 1, P, dim=D, gen=g), _rows("logit", M, P, dim=D, gen=g)
    calls = [bank] if groups == "row" else [bank[m:m + 1] for m in range(M)]
    for y in calls:
        _, info = sinkhorn_distance_published(q, y, False, return_info=True)
        C = info["C"].detach()
        n = info["n_iter"]
        grp = stop_groups(1, y.shape[0], "row", C.device)
        f, gg, it = sinkhorn_log(C, eps=EPS, max_iter=200, tol=1e-3, groups=grp)
        assert it.tolist() == [n] * y.shape[0]
        shift = EPS * (torch.log(torch.tensor(1.0 / P + 1e-8, dtype=DT)) - torch.log(
            torch.tensor(1.0 / P, dtype=DT)))
        assert_close(f + shift, info["f"], name="f", atol=1e-12, rtol=0)
        assert_close(gg, info["g"], name="g", atol=1e-12, rtol=0)
        # the same error trace: iteration t of the reference stops iff the oracle's did
        for t in (1, n // 2, n - 1):
            f_t = sinkhorn_log(C, eps=EPS, max_iter=t, tol=0.0, groups=grp)[0]
            f_t1 = sinkhorn_log(C, eps=EPS, max_iter=t + 1, tol=0.0, groups=grp)[0]
            err = (f_t1 - f_t).abs().sum(dim=1).mean().item()
            assert abs(err - info["errs"][t]) <= 1e-12 + 1e-9 * err
        assert info["errs"][-1] < 1e-3 <= min(info["errs"][:-1], default=1.0)


def test_ot_exact_plan_ties_compare_values():
    """Two identical query patches make plan entries (0, j) and (1, j) tie exactly: which one is
    taken is arbitrary, but the selected VALUES (and the gradient summed over the twins) are not."""
    g = torch.Generator().manual_seed(150)
    M, P, D = 5, 9, 64
    q = _rows("logit", 1, P, dim=D, gen=g)
    q[0, 1] = q[0, 0]
    bank = _rows("logit", M, P, dim=D, gen=g)
    xo, so, info = _oracle(q, bank, False)
    lp = (info["f"][:, :, None] + info["g"][:, None, :] - info["C"].detach()) / EPS
    top = lp.flatten(1).topk(11, dim=1).values
    assert ((top[:, :-1] - top[:, 1:]).min(dim=1).values < SEP).any()  # ties really occur
    query = _leaf(q)
    out = ck.ot_similarity(query, bank, torch.arange(M)[None], select="topk", k=10, stop="row")
    # tied entries have equal cost, so the ordered values agree whichever twin is picked
    assert_close(out[0].detach(), so.detach().reshape(M, 10), name="tied values")
    assert_close(out[0].detach().sort(dim=1).values, so.detach().reshape(M, 10).sort(dim=1).values,
                 name="sorted tied values")
    w = torch.randn(M, 10, dtype=DT, generator=g)
    (out[0] * w).sum().backward()
    (so.reshape(M, 10) * w).sum().backward()
    ga, go = query.grad[0], xo.grad[0]
    assert_close(ga[0] + ga[1], go[0] + go[1], name="grad summed over the twins")
    assert_close(ga[2:], go[2:], name="grad of the other patches")


def test_ot_stop_rules_problem_vs_row():
    """Per-problem vs group stop: different iteration counts at tol=1e-3; with tol=0 both run
    max_iter and give identical outputs (and match the published call with thresh=0)."""
    g = torch.Generator().manual_seed(160)
    B, M, R, P, D = 3, 4, 8, 9, 64
    qs, bank = _rows("logit", B, P, dim=D, gen=g), _rows("logit", R, P, dim=D, gen=g)
    index = torch.randint(R, (B, M), generator=g)
    cost = 1 - torch.einsum("bpd,bmqd->bmpq", qs, bank[index]).reshape(B * M, P, P)
    it_problem = _iters(cost, B, M, "problem").reshape(B, M)
    it_row = _iters(cost, B, M, "row").reshape(B, M)
    assert not torch.equal(it_problem, it_row)
    assert (it_row == it_row[:, :1]).all() and (it_problem != it_problem[:, :1]).any()
    assert (it_row.max(1).values <= it_problem.max(1).values).all()  # here: not after the slowest

    max_iter = 40
    assert (_iters(cost, B, M, "problem", tol=0.0, max_iter=max_iter) == max_iter).all()
    assert (_iters(cost, B, M, "row", tol=0.0, max_iter=max_iter) == max_iter).all()
    choice = torch.randint(3, (B, M), generator=g)
    for select, k, kw in (("sample", 3, dict(choice=choice)), ("topk", 10, {})):
        a = ck.ot_similarity(qs, bank, index, select=select, k=k, tol=0.0, max_iter=max_iter,
                             stop="problem", **kw)
        b = ck.ot_similarity(qs, bank, index, select=select, k=k, tol=0.0, max_iter=max_iter,
                             stop="row", **kw)
        assert torch.equal(a, b)
    # ... and the published call with thresh=0 runs max_iter too and selects the same entries
    xo, so, info = _oracle(qs[:1], bank[index[0]], False, thresh=0.0, max_iter=max_iter)
    assert info["n_iter"] == max_iter
    query = _leaf(qs[:1])
    out = ck.ot_similarity(query, bank, index[:1], select="topk", k=10, tol=0.0,
                           max_iter=max_iter)
    assert torch.equal(out.detach(), b[:1])
    _check_calls(out[0], query, [(so.reshape(M, 10), info)], [xo], 10, g)


# ================================================================================ patch search
def _search_inputs(seed, dtype, B=3, C=2048, Cls=20):
    g = torch.Generator().manual_seed(seed)
    fm = feature_map(B, C, 7, 7, seed=seed, dtype=DT).to(dtype)  # non-negative, like layer4
    logits = torch.randn(B, Cls, dtype=DT, generator=g).to(dtype)
    W = (torch.randn(Cls, C, dtype=DT, generator=g) * 0.05).to(dtype)
    y = torch.randint(Cls, (B,), generator=g)
    y[0] = int(logits[0].argmax())  # one sample whose true class is the top-1 logit
    return fm, logits, y, W


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_conf", [3, 6])
def test_patch_search_published_geometry(dtype, n_conf):
    """224 px / 7x7 / stride 32 / C=2048: boxes and confusing classes exactly equal."""
    for seed in (0, 1):
        fm, logits, y, W = _search_inputs(200 + seed, dtype)
        boxes, conf = ck.search_concept_patches(fm, logits, y, W, (224, 224), num_confusing=n_conf)
        boxes_o, conf_o = search_patches_published(fm, logits, y, W, n_conf)
        assert torch.equal(conf, conf_o)
        assert boxes.shape == boxes_o.shape == (fm.shape[0] * 9, 5)
        assert torch.equal(boxes.to(DT), boxes_o.to(DT))
        # the boxes are not all the same (the comparison is not vacuous)
        assert len({tuple(b) for b in boxes_o[:, 1:].tolist()}) > 3


# Regression: the reference once ranked after casting logits / head_weight to float32, which
# disagrees with the published (input-precision) ranking on float64 inputs.
def test_patch_search_float64_confusing_order_below_float32_resolution():
    """float64 logits 3.0 and 3.0 + 1e-12: class 5 is more confusing than class 2."""
    g = torch.Generator().manual_seed(210)
    C, Cls = 2048, 8
    logits = torch.tensor([[0.0, 1.0, 3.0, 0.5, 0.2, 3.0 + 1e-12, -1.0, -2.0]], dtype=DT)
    W = torch.randn(Cls, C, dtype=DT, generator=g)
    fm = torch.randn(1, C, 7, 7, dtype=DT, generator=g)
    y = torch.tensor([0])
    _, conf_o = search_patches_published(fm, logits, y, W, 3)
    assert conf_o.tolist() == [[5, 2, 1]]
    _, conf = ck.search_concept_patches(fm, logits, y, W, (224, 224), num_confusing=3)
    assert conf.tolist() == conf_o.tolist()


def test_patch_search_float64_channel_rank_below_float32_resolution():
    """Channels 29 and 30 straddle group 0's end; in float64 channel 30 scores 1e-13 higher."""
    C, Cls = 2048, 8
    W = torch.zeros(Cls, C, dtype=DT)
    W[0] = torch.linspace(10.0, 1.0, C, dtype=DT)  # score = 3 W[0]: rank == channel index
    W[0, 30] = W[0, 29] + 1e-13
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]], dtype=DT)
    fm = torch.zeros(1, C, 7, 7, dtype=DT)
    fm[0, 29, 1, 1] = 1.0
    fm[0, 30, 5, 5] = 1.0
    y = torch.tensor([0])
    boxes_o, _ = search_patches_published(fm, logits, y, W, 3)
    assert boxes_o[0].tolist() == [0, 128, 128, 192, 192]  # peak of channel 30 at cell (5, 5)
    boxes, _ = ck.search_concept_patches(fm, logits, y, W, (224, 224), num_confusing=3)
    assert boxes[0].tolist() == boxes_o[0].tolist()


# ================================================================================ losses
def _loss_inputs(seed, y, Cls=12, K=5, P=9, D=32, n_conf=4):
    """Small loss inputs, float64. D=32 rather than 12: with 12-d logit-like patch rows most seeds
    give near-permutation plans with near-tied top entries (see ``_assert_loss_calls_separated``).
    """
    g = torch.Generator().manual_seed(seed)
    B = len(y)
    y = torch.tensor(y)
    zq, zk = _rows("unit", B, dim=D, gen=g), _rows("unit", B, dim=D, gen=g)
    Zq, Zk = _rows("logit", B, P, dim=D, gen=g), _rows("logit", B, P, dim=D, gen=g)
    conf = torch.stack([torch.tensor([c for c in torch.randperm(Cls, generator=g).tolist()
                                      if c != int(y[i])][:n_conf]) for i in range(B)])
    Q = QueuesPublished(Cls, K, D, P, dtype=DT, generator=g)
    Q.queue_h = _rows("logit", Cls, K, P, dim=D, gen=g)  # logit-like concept queue
    r_cur = torch.randint(3, (B,), generator=g)
    r_pos = torch.randint(3, (B, K), generator=g)
    return zq, zk, Zq, Zk, y, conf, Q, r_cur, r_pos


def _assert_loss_calls_separated(Zq, Zk, y, conf, Qh, thresh=1e-3):
    """Input design check: no near-tie where it matters for the loss (else the picks are moot):
    among the top 3 plan entries (and the 4th) of the POS calls, and at the top-10 boundary of the
    NEG calls (the loss only sees the SET of negatives: their order does not matter)."""
    P, D = Zq.shape[1:]
    calls = [(Zq, Zk, True)]
    for i in range(Zq.shape[0]):
        calls.append((Zq[i:i + 1], Qh[int(y[i])], True))
        calls.append((Zq[i:i + 1], Qh[conf[i]].reshape(-1, P, D), False))
    for x, bank, pos in calls:
        r = torch.zeros(bank.shape[0], dtype=torch.long)
        info = sinkhorn_distance_published(x, bank, pos, r=r, thresh=thresh, return_info=True)[1]
        gaps = _ranked(info)[1]
        ok = (gaps[:, :3] > SEP).all(dim=1) if pos else gaps[:, 9] > SEP
        assert ok.all(), "loss inputs have a near-tie in a transport plan"


@pytest.mark.parametrize("labels", [[1, 3, 7, 0], [1, 3, 1, 1]], ids=["distinct", "duplicates"])
def test_contrastive_losses_values_and_grads(labels):
    zq, zk, Zq, Zk, y, conf, Q, r_cur, r_pos = _loss_inputs(300, labels)
    qz_snap, qh_snap = Q.snapshot()
    _assert_loss_calls_separated(Zq, Zk, y, conf, qh_snap)
    # API side: closed-form losses on the snapshot, API layouts, identical picks
    zq_a, Zq_a = _leaf(zq), _leaf(Zq)
    choice_cur, choice_pos = picks_to_api(r_cur, r_pos)
    L_img = ck.image_contrastive_loss(zq_a, zk, queue_z_to_api(qz_snap), y, temperature=0.07)
    L_con = ck.concept_contrastive_loss(Zq_a, Zk, qh_snap, y, conf, temperature=0.07,
                                        choice_cur=choice_cur, choice_pos=choice_pos,
                                        stop="published")
    # oracle: the published per-sample loop (it also enqueues into Q, after the snapshot)
    zq_o, Zq_o = _leaf(zq), _leaf(Zq)
    L_img_o, L_con_o, _, con_logits, info = contrastive_losses_published(
        zq_o, zk, Zq_o, Zk, y, conf, Q, T=0.07, r_cur=r_cur, r_pos=r_pos, return_info=True)
    assert con_logits.shape == (len(labels), 1 + 5 + 10 * 4 * 5)
    assert max(info["n_iter_neg"] + info["n_iter_pos"] + [info["n_iter_cur"]]) >= 15
    assert_close(L_img, L_img_o, name="L_img")
    assert_close(L_con, L_con_o, name="L_con")
    assert L_img.item() > 0.1 and L_con.item() > 0.1
    L_img.backward()
    L_img_o.backward()
    assert_close(zq_a.grad, zq_o.grad, name="dL_img/dzq")
    L_con.backward()
    L_con_o.backward()
    assert Zq_a.grad.abs().sum() > 0
    assert_close(Zq_a.grad, Zq_o.grad, name="dL_con/dZq_p")
    # enqueue: ClassQueues from the same snapshot ends in the oracle's post-step state
    cq = ck.ClassQueues(*qh_snap.shape[:2], zq.shape[1], Zq.shape[1]).double()
    cq.queue_z.copy_(queue_z_to_api(qz_snap))
    cq.queue_h.copy_(qh_snap)
    cq.enqueue(zk, Zk, y)
    qz_o, qh_o, ptr_o = Q.to_api()
    assert torch.equal(cq.ptr, ptr_o)
    assert torch.equal(cq.queue_z, qz_o) and torch.equal(cq.queue_h, qh_o)


@pytest.mark.parametrize("tol", [1e-3, 3e-2])
def test_contrastive_stop_rules_matter_and_published_is_the_group_rule(tol):
    """stop="published" runs the oracle's per-call iteration counts (cur: one mean over B; pos and
    neg: one mean per sample) and reproduces its loss and gradient; the per-problem default runs
    other counts and gives another loss. At the loose tol the current-key pick itself depends on
    the stop rule, so a per-problem (or per-row) stop of that call would be caught too."""
    zq, zk, Zq, Zk, y, conf, Q, r_cur, r_pos = _loss_inputs(306, [2, 5, 2, 7])
    _, qh = Q.snapshot()
    _assert_loss_calls_separated(Zq, Zk, y, conf, qh, thresh=tol)
    Zq_o = _leaf(Zq)
    _, L_con_o, *_, info = contrastive_losses_published(
        zq, zk, Zq_o, Zk, y, conf, Q, r_cur=r_cur, r_pos=r_pos, return_info=True, enqueue=False,
        thresh=tol)
    B, K, P = Zq.shape[0], qh.shape[1], Zq.shape[1]
    cur_cost = 1 - torch.einsum("bpd,bqd->bpq", Zq, Zk)
    pos_cost = 1 - torch.einsum("bpd,bkqd->bkpq", Zq, qh[y]).reshape(-1, P, P)
    negs = qh[conf].flatten(1, 2)  # (B, Nc*K, P, D), conf-major
    neg_cost = 1 - torch.einsum("bpd,bmqd->bmpq", Zq, negs).reshape(-1, P, P)
    n_neg = negs.shape[1]
    assert _iters(cur_cost, B, 1, "all", tol).tolist() == [info["n_iter_cur"]] * B
    assert _iters(pos_cost, B, K, "row", tol).reshape(B, K)[:, 0].tolist() == info["n_iter_pos"]
    it_neg = _iters(neg_cost, B, n_neg, "row", tol)
    assert it_neg.reshape(B, n_neg)[:, 0].tolist() == info["n_iter_neg"]
    assert not torch.equal(_iters(neg_cost, B, n_neg, "problem", tol), it_neg)
    # the loss itself: "published" reproduces the oracle, the per-problem default does not
    kw = dict(choice_cur=r_cur[:, None], choice_pos=r_pos, tol=tol)
    Zq_a = _leaf(Zq)
    L_pub = ck.concept_contrastive_loss(Zq_a, Zk, qh, y, conf, stop="published", **kw)
    L_prob = ck.concept_contrastive_loss(Zq, Zk, qh, y, conf, **kw)  # stop="problem" default
    assert_close(L_pub, L_con_o, name="L_con published")
    assert (L_prob - L_con_o).abs() > 1e-3
    L_pub.backward()
    L_con_o.backward()
    assert_close(Zq_a.grad, Zq_o.grad, name="dL_con/dZq_p")
    if tol > 1e-2:
        own = torch.arange(B)[:, None]
        cur = [ck.ot_similarity(Zq, Zk, own, choice=r_cur[:, None], stop=stop, tol=tol)
               for stop in ("all", "problem")]
        assert not torch.allclose(*cur)


# ================================================================================ queues
def test_class_queues_enqueue_equals_published_loop():
    g = torch.Generator().manual_seed(400)
    Cls, K, D, P = 5, 3, 6, 4
    qz = _rows("unit", Cls, K, dim=D, gen=g)
    qh = _rows("unit", Cls, K, P, dim=D, gen=g)
    ptr = torch.tensor([0, 2, 1, 0, 2])
    cq = ck.ClassQueues(Cls, K, D, P).double()
    cq.queue_z.copy_(qz)
    cq.queue_h.copy_(qh)
    cq.ptr.copy_(ptr)
    Q = QueuesPublished.from_api(qz, qh, ptr)
    batches = [
        [2, 0, 2, 2, 4, 2, 2, 1, 4],  # class 2 five times (> K): wraps, the last K win
        [1, 1, 1, 1, 3, 0],  # class 1 four times, from ptr 2
        torch.randint(Cls, (12,), generator=g).tolist(),
    ]
    for labels in batches:
        y = torch.tensor(labels)
        zk, Zk = _rows("unit", len(y), dim=D, gen=g), _rows("unit", len(y), P, dim=D, gen=g)
        cq.enqueue(zk, Zk, y)
        for i in range(len(y)):
            Q.enqueue_one(zk[i], Zk[i], int(y[i]))
        qz_o, qh_o, ptr_o = Q.to_api()
        assert torch.equal(cq.ptr, ptr_o)
        assert torch.equal(cq.queue_z, qz_o)
        assert torch.equal(cq.queue_h, qh_o)
    assert not torch.equal(cq.queue_z, qz)  # the queues did change


# ================================================================================ DANet
def _pam_weights(C, gen):
    Cp = C // 8
    shapes = [(Cp, C), (Cp,), (Cp, C), (Cp,), (C, C), (C,)]
    return [(torch.randn(s, dtype=DT, generator=gen) * (0.3 if len(s) == 2 else 0.5))
            .requires_grad_(True) for s in shapes]


def _grads(out, leaves, w):
    return torch.autograd.grad((out * w).sum(), leaves)


def test_channel_attention_vs_published():
    g = torch.Generator().manual_seed(500)
    x = _leaf(feature_map(2, 16, 3, 4, seed=500, dtype=DT))
    gamma = torch.tensor([0.7], dtype=DT, requires_grad=True)
    out = ck.channel_attention(x, gamma, backend="reference")
    ref = cam_published(x, gamma)
    assert_close(out, ref, name="CAM")
    assert not torch.allclose(ref, x)
    w = torch.randn(x.shape, dtype=DT, generator=g)
    for name, a, b in zip(("x", "gamma"), _grads(out, [x, gamma], w), _grads(ref, [x, gamma], w)):
        assert_close(a, b, name=f"dCAM/d{name}")


def test_position_attention_vs_published():
    g = torch.Generator().manual_seed(510)
    C = 16
    x = _leaf(feature_map(2, C, 3, 4, seed=510, dtype=DT))
    gamma = torch.tensor([-0.6], dtype=DT, requires_grad=True)
    wq, bq, wk, bk, wv, bv = ws = _pam_weights(C, g)
    out = ck.position_attention(x, wq, bq, wk, bk, wv, bv, gamma, backend="reference")
    ref = pam_published(x, gamma, wq, bq, wk, bk, wv, bv)
    assert_close(out, ref, name="PAM")
    leaves = [x, gamma, *ws]
    w = torch.randn(x.shape, dtype=DT, generator=g)
    names = ("x", "gamma", "wq", "bq", "wk", "bk", "wv", "bv")
    for name, a, b in zip(names, _grads(out, leaves, w), _grads(ref, leaves, w)):
        assert a.abs().sum() > 0
        assert_close(a, b, name=f"dPAM/d{name}")


def test_dual_attention_module_loads_published_weights():
    g = torch.Generator().manual_seed(520)
    C = 16
    x = _leaf(feature_map(2, C, 3, 3, seed=520, dtype=DT))
    wq, bq, wk, bk, wv, bv = _pam_weights(C, g)
    conv = lambda t: _leaf(t.reshape(*t.shape, 1, 1))  # noqa: E731  published 1x1 conv layout
    wq4, wk4, wv4 = conv(wq), conv(wk), conv(wv)
    bq, bk, bv = _leaf(bq), _leaf(bk), _leaf(bv)
    gp = torch.tensor([0.4], dtype=DT, requires_grad=True)
    gc = torch.tensor([-0.3], dtype=DT, requires_grad=True)
    published_state = {
        "sa.query_conv.weight": wq4, "sa.query_conv.bias": bq,
        "sa.key_conv.weight": wk4, "sa.key_conv.bias": bk,
        "sa.value_conv.weight": wv4, "sa.value_conv.bias": bv,
        "sa.gamma": gp, "sc.gamma": gc,
    }
    m = ck.nn.DualAttention(C).double()
    m.load_state_dict({k: v.detach() for k, v in published_state.items()}, strict=True)
    out = m(x)
    ref = danet_published(x, gc, gp, wq4, bq, wk4, bk, wv4, bv)
    assert_close(out, ref, name="DANet")
    w = torch.randn(x.shape, dtype=DT, generator=g)
    params = dict(m.named_parameters())
    api_grads = _grads(out, [x] + [params[k] for k in published_state], w)
    ora_grads = _grads(ref, [x] + list(published_state.values()), w)
    for name, a, b in zip(["x", *published_state], api_grads, ora_grads):
        assert a.abs().sum() > 0
        assert_close(a, b, name=f"dDANet/d{name}")


# ================================================================================ IB / EMA
def test_information_bottleneck_kl_vs_published():
    g = torch.Generator().manual_seed(600)
    mu = torch.randn(5, 7, dtype=DT, generator=g, requires_grad=True)
    sigma = F.softplus(torch.randn(5, 7, dtype=DT, generator=g) - 1).requires_grad_(True)
    a, b = ck.information_bottleneck_kl(mu, sigma), ib_kl_published(mu, sigma)
    assert_close(a, b, name="KL")
    assert a.item() > 0.1
    for name, ga, gb in zip(("mu", "sigma"), torch.autograd.grad(a, [mu, sigma]),
                            torch.autograd.grad(b, [mu, sigma])):
        assert_close(ga, gb, name=f"dKL/d{name}")


@pytest.mark.parametrize("m", [0.999, 0.9])
def test_momentum_update_vs_published(m):
    torch.manual_seed(610)

    def net():
        return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4),
                                   torch.nn.Linear(4, 3)).double()

    q, k = net(), net()
    with torch.no_grad():
        for t in [*q.parameters(), *k.parameters(), q[1].running_mean, k[1].running_mean]:
            t.normal_()
    k0, k_o = copy.deepcopy(k), copy.deepcopy(k)
    ck.momentum_update_(k, q, momentum=m)
    momentum_update_published(k_o, q, m)
    for (name, a), b, a0 in zip(k.named_parameters(), k_o.parameters(), k0.parameters()):
        assert_close(a, b, name=name)
        assert not torch.equal(a, a0), name  # the parameters did move
    for (name, a), b, a0 in zip(k.named_buffers(), k_o.buffers(), k0.buffers()):
        assert torch.equal(a, b) and torch.equal(a, a0), name  # BN buffers untouched
