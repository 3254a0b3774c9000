"""Sanity checks of the independent oracle (tests/oracle.py) itself. Fast, CPU, float64."""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from oracle import (  # noqa: E402
    QueuesPublished,
    cam_published,
    contrastive_losses_published,
    danet_published,
    ib_kl_published,
    momentum_update_published,
    pam_published,
    picks_from_api,
    picks_to_api,
    queue_z_from_api,
    queue_z_to_api,
    search_patches_published,
    sinkhorn_distance_published,
    sinkhorn_plan_published,
)

DT = torch.float64


def _unit(*shape, gen):
    return F.normalize(torch.randn(*shape, dtype=DT, generator=gen), dim=-1)


# ----------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_column_marginals_exact_and_batch_mean_stop():
    g = torch.Generator().manual_seed(0)
    x, y = _unit(6, 9, 16, gen=g), _unit(6, 9, 16, gen=g)
    C = 1 - x @ y.transpose(-2, -1)
    f, gg, pi, n_iter, errs = sinkhorn_plan_published(C)
    # the column update is last -> column sums are exactly b (+1e-8 inside the log)
    torch.testing.assert_close(pi.sum(-2), torch.full((6, 9), 1 / 9 + 1e-8, dtype=DT),
                               rtol=1e-10, atol=1e-12)
    # batch-mean stop: stopped at the first iteration whose mean error is below 1e-3
    assert 1 < n_iter < 200
    assert errs[-1] < 1e-3 and all(e >= 1e-3 for e in errs[:-1])
    # rows approximately right once converged
    assert (pi.sum(-1) - 1 / 9).abs().max() < 1e-2
    # plan is exp of the dual potentials
    torch.testing.assert_close(pi, torch.exp((f[:, :, None] + gg[:, None, :] - C) / 0.01))


def test_sinkhorn_thresh_zero_runs_max_iter():
    g = torch.Generator().manual_seed(1)
    x, y = _unit(2, 9, 8, gen=g), _unit(2, 9, 8, gen=g)
    _, info = sinkhorn_distance_published(x, y, True, r=torch.zeros(2, dtype=torch.long),
                                          thresh=0.0, max_iter=17, return_info=True)
    assert info["n_iter"] == 17


def test_sinkhorn_joint_stop_is_batch_mean_not_per_problem():
    g = torch.Generator().manual_seed(2)
    same = _unit(1, 9, 8, gen=g)  # identical sets converge in ~2 iterations, random ones in ~100
    x = torch.cat([same, _unit(1, 9, 8, gen=g)])
    y = torch.cat([same, _unit(1, 9, 8, gen=g)])
    _, joint = sinkhorn_distance_published(x, y, False, return_info=True)
    n_each = [sinkhorn_distance_published(x[i:i + 1], y[i:i + 1], False,
                                          return_info=True)[1]["n_iter"] for i in range(2)]
    # one call stops when the MEAN error over its problems is < thresh: strictly between the
    # per-problem counts (neither per-problem nor wait-for-all)
    assert min(n_each) < joint["n_iter"] < max(n_each)


def test_sinkhorn_pos_neg_selection_and_gradient():
    g = torch.Generator().manual_seed(3)
    x = _unit(1, 9, 12, gen=g).requires_grad_(True)
    y = _unit(4, 9, 12, gen=g)
    r = torch.tensor([0, 1, 2, 1])
    out, info = sinkhorn_distance_published(x, y, True, r=r, return_info=True)
    assert out.shape == (4,)
    pi, C = info["pi"], info["C"].detach()
    top3 = torch.topk(pi.reshape(4, -1), 3).indices
    for p in range(4):
        j = int(top3[p, r[p]])
        assert float(out[p].detach()) == float(C[p].reshape(-1)[j])
    # gradient of C[p, a, b] = 1 - <x_a, y_p,b> w.r.t. x_a is -y_p,b (x repeated -> summed)
    out.sum().backward()
    expect = torch.zeros_like(x)
    for p in range(4):
        j = int(top3[p, r[p]])
        expect[0, j // 9] -= y[p, j % 9]
    torch.testing.assert_close(x.grad, expect)
    # NEG: 10 per problem, problem-major, descending plan order
    neg, ninfo = sinkhorn_distance_published(x.detach(), y, False, return_info=True)
    assert neg.shape == (40,)
    pif = ninfo["pi"].reshape(4, -1)
    Cf = ninfo["C"].reshape(4, -1)
    for p in range(4):
        vals, idx = torch.sort(pif[p], descending=True)
        torch.testing.assert_close(neg[10 * p:10 * p + 10], Cf[p, idx[:10]])


def test_sinkhorn_repeat_equals_explicit_and_matched_pairs():
    g = torch.Generator().manual_seed(4)
    x = _unit(1, 9, 32, gen=g)
    perm = torch.randperm(9, generator=g)
    y = torch.cat([x[:, perm], _unit(2, 9, 32, gen=g)])
    r = torch.zeros(3, dtype=torch.long)
    a = sinkhorn_distance_published(x, y, True, r=r)
    b = sinkhorn_distance_published(x.repeat(3, 1, 1), y, True, r=r)
    assert torch.equal(a, b)
    # the permuted copy is matched: the top plan entry is a zero-cost pair
    assert abs(float(a[0])) < 1e-12


# ----------------------------------------------------------------------------- patch search
def test_patch_boxes_geometry_and_conf():
    g = torch.Generator().manual_seed(5)
    B, C, Cls, n_conf = 3, 2048, 12, 5
    Fm = torch.randn(B, C, 7, 7, dtype=DT, generator=g)
    logits = torch.randn(B, Cls, dtype=DT, generator=g)
    y = torch.tensor([int(torch.argmax(logits[0])), 3, 7])  # sample 0: true class is the top-1
    W = torch.randn(Cls, C, dtype=DT, generator=g)
    boxes, conf = search_patches_published(Fm, logits, y, W, n_conf)
    assert boxes.shape == (B * 9, 5) and conf.shape == (B, n_conf)
    assert torch.equal(boxes[:, 0], torch.arange(B, dtype=DT).repeat_interleave(9))
    wdt, hgt = boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2]
    assert ((wdt == 64) | (wdt == 32)).all() and ((hgt == 64) | (hgt == 32)).all()
    assert (boxes[:, 1:] >= 0).all() and (boxes[:, 1:] <= 224).all()
    # 32-px exactly when the anchor is in column/row 0 (box [0, 32)); a row-1 anchor gives [0, 64)
    assert torch.equal(wdt == 32, boxes[:, 3] == 32) and torch.equal(hgt == 32, boxes[:, 4] == 32)
    assert ((boxes[:, 1:] % 32) == 0).all()
    for i in range(B):
        order = torch.argsort(logits[i], descending=True).tolist()
        expect = [c for c in order if c != int(y[i])][:n_conf]
        assert conf[i].tolist() == expect


def test_patch_box_known_peak():
    B, C, Cls = 1, 2048, 6
    W = torch.zeros(Cls, C, dtype=DT)
    W[2, :30] = torch.linspace(2.0, 1.0, 30, dtype=DT)  # top-30 channels of class 2 are 0..29
    logits = torch.tensor([[0.0, 5.0, 9.0, 4.0, 3.0, 1.0]], dtype=DT)
    Fm = torch.zeros(B, C, 7, 7, dtype=DT)
    Fm[0, :30, 3, 5] = 1.0  # peak of group 0 at row 3, column 5
    Fm[0, 5, 0, 0] = 0.5
    boxes, conf = search_patches_published(Fm, logits, torch.tensor([2]), W, 3)
    assert conf.tolist() == [[1, 3, 4]]
    # anchor = top-left of cell (x=32*5, y=32*3) = (160, 96)
    assert boxes[0].tolist() == [0, 128, 64, 192, 128]
    # all-zero maps -> first argmax = cell (0,0) -> clipped 32x32 box at the origin
    assert boxes[1].tolist() == [0, 0, 0, 32, 32]


def test_patch_search_rejects_small_C():
    Fm = torch.randn(1, 512, 7, 7)
    with pytest.raises(AssertionError):
        search_patches_published(Fm, torch.randn(1, 5), torch.tensor([0]), torch.randn(5, 512), 3)


# ----------------------------------------------------------------------------- queues
def test_queues_init_enqueue_and_converters():
    g = torch.Generator().manual_seed(6)
    Q = QueuesPublished(num_classes=4, K=3, D=5, P=2, generator=g)
    torch.testing.assert_close(Q.queue_z.norm(dim=0), torch.ones(4, 3, dtype=DT))
    torch.testing.assert_close(Q.queue_h.norm(dim=-1), torch.ones(4, 3, 2, dtype=DT))
    zs, hs = _unit(4, 5, gen=g), _unit(4, 2, 5, gen=g)
    for i in range(4):  # class 1 four times -> slots 0,1,2 then wrap to 0
        Q.enqueue_one(zs[i], hs[i], 1)
    assert torch.equal(Q.queue_z[:, 1, 0], zs[3]) and torch.equal(Q.queue_z[:, 1, 1], zs[1])
    assert torch.equal(Q.queue_z[:, 1, 2], zs[2]) and torch.equal(Q.queue_h[1, 0], hs[3])
    assert Q.ptr_z.tolist() == [0, 1, 0, 0] and Q.ptr_h.tolist() == [0, 1, 0, 0]
    qz, qh, ptr = Q.to_api()
    assert qz.shape == (4, 3, 5) and torch.equal(qz[1, 2], zs[2])
    assert torch.equal(queue_z_from_api(qz), Q.queue_z)
    assert torch.equal(queue_z_to_api(Q.queue_z), qz)
    Q2 = QueuesPublished.from_api(qz, qh, ptr)
    assert torch.equal(Q2.queue_z, Q.queue_z) and torch.equal(Q2.ptr_h, Q.ptr_h)
    rc, rp = torch.tensor([0, 2]), torch.tensor([[1, 0, 2], [2, 2, 0]])
    cc, cp = picks_to_api(rc, rp)
    assert cc.shape == (2, 1) and torch.equal(cc[:, 0], rc) and torch.equal(cp, rp)
    assert all(torch.equal(a, b) for a, b in zip(picks_from_api(cc, cp), (rc, rp)))


def test_momentum_update():
    k = [torch.ones(3, dtype=DT), torch.zeros(2, dtype=DT)]
    q = [torch.zeros(3, dtype=DT), torch.ones(2, dtype=DT)]
    momentum_update_published(k, q, 0.9)
    torch.testing.assert_close(k[0], torch.full((3,), 0.9, dtype=DT))
    torch.testing.assert_close(k[1], torch.full((2,), 0.1, dtype=DT))


# ----------------------------------------------------------------------------- losses
def _loss_inputs(seed, B=3, Cls=5, K=4, P=9, D=8, n_conf=3):
    g = torch.Generator().manual_seed(seed)
    zq = _unit(B, D, gen=g).requires_grad_(True)
    zk = _unit(B, D, gen=g)
    Zq = _unit(B, P, D, gen=g).requires_grad_(True)
    Zk = _unit(B, P, D, gen=g)
    y = torch.tensor([1, 3, 1])[:B]
    conf = torch.stack([torch.tensor([c for c in torch.randperm(Cls, generator=g).tolist()
                                      if c != int(y[i])][:n_conf]) for i in range(B)])
    Q = QueuesPublished(Cls, K, D, P, generator=g)
    r_cur = torch.randint(3, (B,), generator=g)
    r_pos = torch.randint(3, (B, K), generator=g)
    return zq, zk, Zq, Zk, y, conf, Q, r_cur, r_pos


def test_contrastive_losses_shapes_kl_form_snapshot_and_enqueue():
    B, Cls, K, P, D, n_conf = 3, 5, 4, 9, 8, 3
    zq, zk, Zq, Zk, y, conf, Q, r_cur, r_pos = _loss_inputs(7)
    qz0, qh0 = Q.snapshot()
    L_img, L_con, li, lc, info = contrastive_losses_published(
        zq, zk, Zq, Zk, y, conf, Q, T=0.07, r_cur=r_cur, r_pos=r_pos, return_info=True)
    assert li.shape == (B, 1 + Cls * K) and lc.shape == (B, 1 + K + 10 * n_conf * K)
    # KLDiv batchmean to uniform-on-(K+1) == -log(K+1) - mean positive log-prob
    for L, lg in ((L_img, li), (L_con, lc)):
        logp = F.log_softmax(lg / 0.07, dim=1)
        closed = (-math.log(K + 1) - logp[:, :K + 1].mean(1)).mean()
        torch.testing.assert_close(L, closed)
        assert float(L.detach()) >= -1e-12
    # image logits from the snapshot: row i = [<zq,zk>, own class K, other classes class-major]
    for i in range(B):
        c = int(y[i])
        others = [cc for cc in range(Cls) if cc != c]
        ref = torch.cat([(zq[i] * zk[i]).sum()[None], zq[i] @ qz0[:, c, :],
                         torch.cat([zq[i] @ qz0[:, cc, :] for cc in others])])
        torch.testing.assert_close(li[i], ref)
    # concept cur logit and one positive, recomputed by hand from the snapshot
    cur = 1 - sinkhorn_distance_published(Zq, Zk, True, r=r_cur)
    torch.testing.assert_close(lc[:, 0], cur)
    pos1 = 1 - sinkhorn_distance_published(Zq[1:2], qh0[int(y[1])], True, r=r_pos[1])
    torch.testing.assert_close(lc[1, 1:K + 1], pos1)
    neg0 = 1 - sinkhorn_distance_published(Zq[0:1], qh0[conf[0]].reshape(-1, P, D), False)
    torch.testing.assert_close(lc[0, K + 1:], neg0)
    # enqueue: samples 0 and 2 are both class 1 -> consecutive slots 0, 1; class 3 slot 0
    assert Q.ptr_z.tolist() == [0, 2, 0, 1, 0] and torch.equal(Q.ptr_z, Q.ptr_h)
    assert torch.equal(Q.queue_z[:, 1, 0], zk[0]) and torch.equal(Q.queue_z[:, 1, 1], zk[2])
    assert torch.equal(Q.queue_h[1, 1], Zk[2]) and torch.equal(Q.queue_h[3, 0], Zk[1])
    assert torch.equal(Q.queue_z[:, 1, 2:], qz0[:, 1, 2:])  # untouched slots
    # gradients reach the query side only
    (L_img + L_con).backward()
    assert zq.grad is not None and zq.grad.abs().sum() > 0
    assert Zq.grad is not None and Zq.grad.abs().sum() > 0
    assert info["n_iter_cur"] >= 1 and len(info["n_iter_neg"]) == B


def test_contrastive_losses_enqueue_does_not_change_logits():
    zq, zk, Zq, Zk, y, conf, Q, r_cur, r_pos = _loss_inputs(8)
    qz, qh = Q.snapshot()
    ptr_z, ptr_h = Q.ptr_z.clone(), Q.ptr_h.clone()
    a = contrastive_losses_published(zq, zk, Zq, Zk, y, conf, Q, r_cur=r_cur, r_pos=r_pos)
    b = contrastive_losses_published(zq, zk, Zq, Zk, y, conf, qz.clone(), qh.clone(),
                                     r_cur=r_cur, r_pos=r_pos, enqueue=False,
                                     ptr_z=ptr_z, ptr_h=ptr_h)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert ptr_z.sum() == 0  # enqueue=False left the pointers alone


# ----------------------------------------------------------------------------- DANet / IB
def _danet_params(C, gen):
    Cp = max(1, C // 8)
    return (torch.randn(Cp, C, dtype=DT, generator=gen) * 0.2, torch.randn(Cp, dtype=DT, generator=gen),
            torch.randn(Cp, C, dtype=DT, generator=gen) * 0.2, torch.randn(Cp, dtype=DT, generator=gen),
            torch.randn(C, C, dtype=DT, generator=gen) * 0.2, torch.randn(C, dtype=DT, generator=gen))


def test_attention_gamma_zero_and_closed_forms():
    g = torch.Generator().manual_seed(9)
    B, C, H, W = 2, 16, 3, 4
    x = torch.randn(B, C, H, W, dtype=DT, generator=g)
    wq, bq, wk, bk, wv, bv = _danet_params(C, g)
    zero = torch.zeros(1, dtype=DT)
    assert torch.equal(cam_published(x, zero), x)
    assert torch.equal(pam_published(x, zero, wq, bq, wk, bk, wv, bv), x)
    torch.testing.assert_close(danet_published(x, zero, zero, wq, bq, wk, bk, wv, bv), 2 * x)
    # CAM: softmax(rowmax(E) - E) == softmax(-E) (shift invariance)
    X = x.reshape(B, C, -1)
    E = X @ X.transpose(1, 2)
    gm = torch.tensor(0.7, dtype=DT)
    ref = gm * (torch.softmax(-E, -1) @ X).reshape_as(x) + x
    torch.testing.assert_close(cam_published(x, gm), ref)
    # PAM: out[:, :, n] = sum_n' A[n, n'] V[:, :, n'], A = softmax_n'(Q_n . K_n')
    Q = torch.einsum("oc,bcn->bon", wq, X) + bq[None, :, None]
    Kk = torch.einsum("oc,bcn->bon", wk, X) + bk[None, :, None]
    V = torch.einsum("oc,bcn->bon", wv, X) + bv[None, :, None]
    A = torch.softmax(torch.einsum("bon,bom->bnm", Q, Kk), -1)
    ref = gm * torch.einsum("bcm,bnm->bcn", V, A).reshape_as(x) + x
    torch.testing.assert_close(pam_published(x, gm, wq, bq, wk, bk, wv, bv), ref)
    # 4-D conv weights accepted
    torch.testing.assert_close(
        pam_published(x, gm, wq[..., None, None], bq, wk[..., None, None], bk,
                      wv[..., None, None], bv), ref)


def test_ib_kl_closed_form():
    g = torch.Generator().manual_seed(10)
    mu = torch.randn(4, 7, dtype=DT, generator=g)
    sigma = F.softplus(torch.randn(4, 7, dtype=DT, generator=g) - 1)
    closed = (-sigma + (torch.exp(2 * sigma) + mu ** 2) / 2 - 0.5).sum(1).mean()
    torch.testing.assert_close(ib_kl_published(mu, sigma), closed)
    assert float(ib_kl_published(torch.zeros(3, 5), torch.zeros(3, 5))) == 0.0
