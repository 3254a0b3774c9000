"""Masked images as counterfactuals: the batched patch refill against a loop over images and patches, the
CAM / mask / donor pieces against their definitions, and the loss term of a step against an independent
float64 transcription of the method (CAM of the current model, masks, refill, MSE to the frozen copy)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from concept_kernels.train import ConceptTuner
from concept_kernels.train.methods import counterfactual as cf_module
from concept_kernels.train.methods.counterfactual import (class_activation_map, counterfactual_mask, masked_refill,
                                                          refill_sources)

CLS = 5


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def loop_refill(images, mask, source):
    """Loop transcription: patch (i, j) of a gh x gw grid spans rows [ceil(i H / gh), ceil((i + 1) H / gh)) and
    columns likewise; a masked patch of image b is copied from image source[b, i, j]."""
    B, C, H, W = images.shape
    gh, gw = mask.shape[1:]
    out = images.clone()
    for b in range(B):
        for i in range(gh):
            r0, r1 = _ceil_div(i * H, gh), _ceil_div((i + 1) * H, gh)
            for j in range(gw):
                c0, c1 = _ceil_div(j * W, gw), _ceil_div((j + 1) * W, gw)
                if mask[b, i, j]:
                    out[b, :, r0:r1, c0:c1] = images[int(source[b, i, j]), :, r0:r1, c0:c1]
    return out


@pytest.mark.parametrize("shape,grid", [((4, 3, 32, 32), (7, 7)), ((3, 2, 10, 13), (3, 4)), ((5, 1, 8, 8), (8, 8)),
                                        ((2, 3, 9, 5), (1, 5))])
def test_masked_refill_matches_the_loop(shape, grid):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(shape[0], *grid, generator=g) < 0.5
    source = torch.randint(shape[0], (shape[0], *grid), generator=g)  # (self allowed: the op does not care)
    out = masked_refill(images, mask, source)
    ref = loop_refill(images, mask, source)
    assert torch.equal(out, ref)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    grad, = torch.autograd.grad((out * w).sum(), images)
    grad_ref, = torch.autograd.grad((ref * w).sum(), images)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=0)


def test_masked_refill_channels_last_and_nan():
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    mask = torch.zeros(3, 3, 3, dtype=torch.bool)
    mask[0, 1, 2] = True
    source = torch.full((3, 3, 3), 2)
    images[2, 1, 5, 9] = float("nan")  # in patch (1, 2) of image 2: refilled into image 0
    out = masked_refill(images, mask, source)
    assert torch.equal(out.isnan().nonzero(), torch.tensor([[0, 1, 5, 9], [2, 1, 5, 9]]))
    torch.testing.assert_close(out, loop_refill(images, mask, source), equal_nan=True, rtol=0, atol=0)


def test_masked_refill_rejects_bad_input():
    x, m, s = torch.randn(2, 3, 8, 8), torch.ones(2, 4, 4, dtype=torch.bool), torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="images must have dtype"):
        masked_refill(x.long(), m, s)
    with pytest.raises(ValueError, match=r"images must have 4 dimensions \(B, C, H, W\)"):
        masked_refill(x[0], m, s)
    with pytest.raises(TypeError, match="mask must have dtype in \\(bool\\), got float32"):
        masked_refill(x, m.float(), s)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, gh, gw\) with B = 2"):
        masked_refill(x, m[:1], s[:1])
    with pytest.raises(ValueError, match=r"source must have shape \(2, 4, 4\)"):
        masked_refill(x, m, s[:, :3])
    with pytest.raises(TypeError, match="source must have dtype int64"):
        masked_refill(x, m, s.int())
    with pytest.raises(ValueError, match=r"source values must lie in \[0, 2\)"):
        masked_refill(x, m, s + 2)
    with pytest.raises(ValueError, match=r"must not exceed the image size \(H, W\) = \(8, 8\)"):
        masked_refill(x, torch.ones(2, 9, 4, dtype=torch.bool), torch.zeros(2, 9, 4, dtype=torch.long))


def test_class_activation_map_and_masks():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(6, 8, 4, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(CLS, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(CLS, (6,), generator=g)
    cam = class_activation_map(f, weight, labels, (4, 4))
    for b in range(6):
        raw = sum(weight[labels[b], c] * f[b, c] for c in range(8)).clamp_min(0)
        torch.testing.assert_close(cam[b], raw / raw.max(), rtol=1e-13, atol=0)
    obj = counterfactual_mask(cam, 0.3, "object")
    assert torch.equal(obj, cam >= 0.3) and torch.equal(counterfactual_mask(cam, 0.3, "context"), cam < 0.3)
    assert obj.flatten(1).any(1).all()  # the max patch (1.0) is always class-relevant
    torch.manual_seed(0)
    big = torch.rand(64, 3, 3)
    either = counterfactual_mask(big, 0.5, "either")
    is_obj = (either == (big >= 0.5)).flatten(1).all(1)
    is_ctx = (either == (big < 0.5)).flatten(1).all(1)
    assert (is_obj | is_ctx).all() and is_obj.any() and is_ctx.any()


def test_refill_sources_are_other_images():
    for seed in range(5):
        torch.manual_seed(seed)
        single = refill_sources(7, (3, 3), "single", torch.device("cpu"))
        donor = single[:, 0, 0]
        assert (single == donor[:, None, None]).all()  # one donor per image
        assert sorted(donor.tolist()) == list(range(7)) and (donor != torch.arange(7)).all()  # a derangement
        multi = refill_sources(7, (3, 3), "multi", torch.device("cpu"))
        assert ((multi >= 0) & (multi < 7) & (multi != torch.arange(7)[:, None, None])).all()
        assert len(multi[0].unique()) > 1
    with pytest.raises(ValueError, match="at least 2 images"):
        refill_sources(1, (3, 3), "single", torch.device("cpu"))


def _tuner(tiny_net, **options):
    torch.manual_seed(0)
    return ConceptTuner(tiny_net(), CLS, (32, 32), method="counterfactual", method_options=options).double()


@pytest.mark.parametrize("region,fill,B,teacher_bn", [
    ("object", "single", 2, "batch"), ("context", "multi", 2, "running"),
    ("object", "multi", 5, "running"), ("context", "single", 5, "batch")])
def test_loss_term_against_float64_transcription(tiny_net, monkeypatch, region, fill, B, teacher_bn):
    weight, threshold = 7.0, 0.4
    net = _tuner(tiny_net, weight=weight, threshold=threshold, region=region, fill=fill, grid=4, teacher_bn=teacher_bn)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the fine-tuned model has moved away from the frozen copy; a trained-looking head
        for p in net.backbone.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        net.head.weight.normal_(0, 1, generator=g)
    views = torch.randn(1, B, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(CLS, (B,), generator=g)
    if B == 2:  # the only donors: the other image, for every patch, with either fill
        source = torch.tensor([1, 0])[:, None, None].expand(2, 4, 4)
    else:
        source = torch.randint(1, B, (B, 4, 4), generator=g).add(torch.arange(B)[:, None, None]).remainder(B)
        monkeypatch.setattr(cf_module, "refill_sources", lambda *a: source)  # fixed donors (drawn: tested above)
    ref = copy.deepcopy(net)
    out = net.step(views, labels)

    x = views[0]
    f0 = ref.backbone(x).detach()  # train mode, as the step's first pass (same BN statistics)
    W = ref.head.weight.detach()
    mask = torch.zeros(B, 4, 4, dtype=torch.bool)
    for b in range(B):
        cam = [[max(float((W[labels[b]] * f0[b, :, i, j]).sum()), 0.0) for j in range(4)] for i in range(4)]
        top = max(max(row) for row in cam)
        for i in range(4):
            for j in range(4):
                relevant = cam[i][j] / top >= threshold
                mask[b, i, j] = relevant if region == "object" else not relevant
    assert 0 < int(mask.sum()) < mask.numel()  # a real partition: some patches masked, some kept
    x_cf = loop_refill(x, mask, source)
    student = ref.backbone(x_cf).mean((2, 3))
    teacher_net = ref.source_backbone if teacher_bn == "running" else copy.deepcopy(ref.source_backbone).train()
    assert teacher_net.training == (teacher_bn == "batch")  # batch: BN with the batch's statistics
    teacher = teacher_net(x_cf).mean((2, 3))
    expected = float(((student - teacher) ** 2).sum().detach()) / student.numel()
    assert expected > 0
    assert out["cf"].item() == pytest.approx(expected, rel=1e-10)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + weight * expected, rel=1e-12)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(ref.head(f0.mean((2, 3))), labels).item(), rel=1e-12)

    net.zero_grad()
    out["cf"].backward()
    assert net.head.weight.grad is None or not net.head.weight.grad.any()  # masks carry no gradient to the head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.parameters())
    assert not any(p.requires_grad for p in net.source_backbone.parameters())
    net.train()
    assert not net.source_backbone.training


def test_batch_statistics_teacher_starts_equal_and_stays_frozen(tiny_net):
    net = _tuner(tiny_net, grid=4)  # teacher_bn="batch"
    frozen = {k: v.clone() for k, v in net.source_backbone.state_dict().items() if "num_batches" not in k}
    g = torch.Generator().manual_seed(4)
    views = torch.randn(1, 6, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(CLS, (6,), generator=g)
    first = net.step(views, labels)
    assert first["cf"].item() == 0.0  # same weights, same normalisation: only weight drift counts
    opt = torch.optim.SGD(net.param_groups(0.5), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        net.step(views, labels)["loss"].backward()
        opt.step()
    assert net.step(views, labels)["cf"].item() > 0
    now = net.source_backbone.state_dict()
    assert all(torch.equal(frozen[k], now[k]) for k in frozen)  # weights and running statistics
    running = _tuner(tiny_net, grid=4, teacher_bn="running")
    assert running.step(views, labels)["cf"].item() > 0  # eval-mode BN differs from the train-mode student


def test_bad_options(tiny_net):
    for opts, match in [(dict(weight=-1.0), "weight must be"), (dict(threshold=0.0), "threshold must be"),
                        (dict(threshold=1.5), "threshold must be"), (dict(region="objects"), r"region \(cf_region\)"),
                        (dict(fill="many"), r"fill \(cf_fill\)"), (dict(grid=0), r"grid \(cf_grid\)"),
                        (dict(grid=33), "exceeds the image size"), (dict(teacher_bn="eval"), "cf_teacher_bn")]:
        with pytest.raises(ValueError, match=match):
            _tuner(tiny_net, **opts)
    net = _tuner(tiny_net, grid=4)
    with pytest.raises(ValueError, match="at least 2 images"):
        net.step(torch.randn(1, 1, 3, 32, 32, dtype=torch.float64), torch.tensor([0]))
