"""Patch search, contrastive losses, queues and EMA: generalized behaviour and bad input.

The published-geometry comparison with the loop oracle is in tests/test_reference_vs_oracle.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import concept_kernels as ck


def _search_inputs(B=3, C=64, h=5, w=6, n_cls=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, C, h, w, generator=g), torch.randn(B, n_cls, generator=g),
            torch.randint(n_cls, (B,), generator=g), torch.randn(n_cls, C, generator=g))


@pytest.mark.parametrize("image_size,h,w", [((160, 192), 5, 6), ((64, 64), 2, 2), ((225, 225), 7, 7)])
def test_patch_search_geometry_follows_stride_and_input_size(image_size, h, w):
    feats, logits, labels, W = _search_inputs(h=h, w=w)
    boxes, conf = ck.search_concept_patches(feats, logits, labels, W, image_size, num_confusing=4, num_patches=3)
    H, Wd = image_size
    sy, sx = H / h, Wd / w
    assert boxes.shape == (9, 5) and conf.shape == (3, 4)
    assert torch.equal(boxes[:, 0], torch.arange(3).repeat_interleave(3).float())
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= Wd).all() and (boxes[:, 2] >= 0).all() and (boxes[:, 4] <= H).all()
    # anchors are top-left corners of cells: x1 = max(0, q*sx - sx) etc., so widths are 2*stride or clipped
    widths, heights = boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2]
    # full (2 x stride) or clipped to one stride at row/column 0 (the last cell ends at the border)
    for sizes, stride in ((widths, sx), (heights, sy)):
        near = lambda v: (sizes - v).abs() < 1e-3  # noqa: E731
        assert (near(2 * stride) | near(stride)).all(), sizes


def test_patch_search_picks_the_peak_of_the_top_group():
    B, C, n_cls = 1, 32, 6
    W = torch.zeros(n_cls, C)
    W[2, 5] = 10.0  # channel 5 separates class 2 from everything
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 3.0, 4.0]])
    feats = torch.zeros(B, C, 4, 4)
    feats[0, 5, 2, 3] = 1.0  # its peak at row 2, col 3
    boxes, conf = ck.search_concept_patches(feats, logits, torch.tensor([2]), W, (128, 128), num_confusing=3,
                                            num_patches=1, channels_per_group=1)
    assert conf.tolist() == [[5, 4, 3]]  # highest logits, label 2 removed, most confusing first
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 96 - 32, 64 - 32, 96 + 32, 64 + 32]]))


def test_patch_search_default_groups_scale_with_channels():
    from concept_kernels.method.patch_search import default_group_geometry
    assert default_group_geometry(2048) == (250, 30)
    assert default_group_geometry(1280) == (156, 18)
    with pytest.raises(ValueError, match="must be <= C = 64"):
        ck.search_concept_patches(*_search_inputs(), (160, 192), num_confusing=3, num_patches=9, group_stride=8, channels_per_group=4)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(num_confusing=2), ValueError, "num_confusing must be in [3, Cls-1]"),
    (dict(num_confusing=10), ValueError, "num_confusing must be in [3, Cls-1] = [3, 9]"),
    (dict(image_size=(100,)), ValueError, "image_size must be two positive ints"),
    (dict(image_size=(4, 4)), ValueError, "at least the feature map size"),
    (dict(labels=torch.tensor([0, 1, 10])), ValueError, "labels values must lie in [0, 10)"),
    (dict(labels=torch.tensor([0, 1])), ValueError, "labels must have shape (3,)"),
    (dict(head_weight=torch.randn(10, 63)), ValueError, "head_weight must have shape (10, 64)"),
    (dict(logits=torch.randn(2, 10)), ValueError, "logits must have shape (3, Cls)"),
])
def test_patch_search_bad_input(kw, exc, msg):
    feats, logits, labels, W = _search_inputs()
    args = dict(features=feats, logits=logits, labels=labels, head_weight=W, image_size=(160, 192), num_confusing=3)
    args.update(kw)
    with pytest.raises(exc) as e:
        ck.search_concept_patches(args.pop("features"), args.pop("logits"), args.pop("labels"),
                                  args.pop("head_weight"), args.pop("image_size"), **args)
    assert msg in str(e.value), str(e.value)


def test_image_loss_equals_kldiv_of_explicit_published_rows():
    B, D, n_cls, K, T = 4, 8, 5, 3, 0.07
    zq = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1).requires_grad_(True)
    zk = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1)
    qz = F.normalize(torch.randn(n_cls, K, D, dtype=torch.float64), dim=-1)
    y = torch.tensor([0, 2, 2, 4])
    rows = []
    for i in range(B):  # explicit row: [cur, own class K, other classes class-major]
        others = torch.cat([qz[c] for c in range(n_cls) if c != y[i]])
        rows.append(torch.cat([(zq[i] * zk[i]).sum()[None], qz[y[i]] @ zq[i], others @ zq[i]]))
    logits = torch.stack(rows) / T
    target = torch.zeros_like(logits)
    target[:, : K + 1] = 1 / (K + 1)
    expected = F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")
    got = ck.image_contrastive_loss(zq, zk, qz, y, temperature=T)
    torch.testing.assert_close(got, expected)
    g1, = torch.autograd.grad(got, zq)
    g2, = torch.autograd.grad(expected, zq)
    torch.testing.assert_close(g1, g2)


def test_concept_loss_is_finite_differentiable_and_bounded_below():
    B, P, D, n_cls, K = 3, 4, 6, 6, 2
    q = F.normalize(torch.randn(B, P, D), dim=-1).requires_grad_(True)
    k = F.normalize(torch.randn(B, P, D), dim=-1)
    qh = F.normalize(torch.randn(n_cls, K, P, D), dim=-1)
    y = torch.tensor([0, 1, 1])
    conf = torch.tensor([[1, 2, 3], [0, 2, 3], [2, 3, 4]])
    for stop in ("problem", "published"):
        loss = ck.concept_contrastive_loss(q, k, qh, y, conf, stop=stop)
        assert torch.isfinite(loss) and loss > -1e-6
        g, = torch.autograd.grad(loss, q)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="stop must be one of"):
        ck.concept_contrastive_loss(q, k, qh, y, conf, stop="row")
    with pytest.raises(ValueError, match="confusing values must lie in"):
        ck.concept_contrastive_loss(q, k, qh, y, conf + 10)
    with pytest.raises(ValueError, match="queue_h must have shape"):
        ck.concept_contrastive_loss(q, k, qh[:, :, :3], y, conf)


def test_image_loss_bad_input():
    zq = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"queue_z must have shape \(Cls, K, 4\)"):
        ck.image_contrastive_loss(zq, zq, torch.randn(3, 2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ck.image_contrastive_loss(zq, zq, torch.randn(3, 2, 4), torch.tensor([0, 1]), temperature=0.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        ck.image_contrastive_loss(zq, zq, torch.randn(3, 2, 4), torch.tensor([0, 1, 2]))


def test_queues_enqueue_in_batch_order_without_loop():
    q = ck.ClassQueues(num_classes=3, length=2, dim=4, num_patches=2)
    torch.testing.assert_close(q.queue_z.norm(dim=-1), torch.ones(3, 2))
    z = torch.arange(5, dtype=torch.float32)[:, None].expand(5, 4).clone()
    h = z[:, None].expand(5, 2, 4).clone()
    snap_z, _ = q.snapshot()
    q.enqueue(z, h, torch.tensor([1, 1, 1, 0, 2]))  # class 1 three times with K=2: wraps, the last wins
    assert q.queue_z[1, :, 0].tolist() == [2.0, 1.0]
    assert q.queue_z[0, 0, 0].item() == 3.0 and q.queue_z[2, 0, 0].item() == 4.0
    assert q.ptr.tolist() == [1, 1, 1]
    assert not torch.equal(snap_z, q.queue_z)  # the snapshot is a copy
    with pytest.raises(ValueError, match=r"labels values must lie in \[0, 3\)"):
        q.enqueue(z[:1], h[:1], torch.tensor([3]))
    with pytest.raises(ValueError, match=r"patches_k must have shape \(1, 2, 4\)"):
        q.enqueue(z[:1], h[:1, :1], torch.tensor([0]))
    assert set(q.state_dict()) == {"queue_z", "queue_h", "ptr"}


def test_momentum_update():
    key, query = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    k0 = [p.detach().clone() for p in key.parameters()]
    ck.momentum_update_(key, query, 0.9)
    for p0, pk, pq in zip(k0, key.parameters(), query.parameters()):
        torch.testing.assert_close(pk, 0.9 * p0 + 0.1 * pq)
    with pytest.raises(ValueError, match="momentum must be in"):
        ck.momentum_update_(key, query, 1.5)
    with pytest.raises(ValueError, match="parameter 0"):
        ck.momentum_update_(key, torch.nn.Linear(4, 2), 0.9)
