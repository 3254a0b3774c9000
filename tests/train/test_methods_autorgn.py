"""Auto-RGN: the per-tensor lrs against an independent float64 computation of
lr * backbone_mult * r_i / max_j r_j (r_i = ||g_i|| / ||theta_i||, g from a hand-written CE forward, norms
summed in Python), how they ride on the lr schedule across epochs, the zero-norm and NaN rules, and that
measuring leaves the model's buffers and gradients alone."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from concept_kernels.train import ConceptTuner

CLS, LR, MULT = 5, 0.05, 0.1


def _tuner(tiny_net, **options):
    torch.manual_seed(0)
    return ConceptTuner(tiny_net(), CLS, (32, 32), method="autorgn", method_options=options).double().train()


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 6, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(CLS, (6,), generator=g))
            for _ in range(n)]


def _optimizer(net, milestones=(1,)):
    opt = torch.optim.SGD(net.param_groups(LR, MULT), lr=LR, momentum=0.9, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma=0.1)


def _expected_scales(net, batches):
    """Independent: a copy of the model, CE of head(mean-pooled backbone features) written out, .grad
    accumulated by backward, norms as Python sums of squares; {backbone parameter name: r_i / max r_j}."""
    twin = copy.deepcopy(net).train()
    for x, y in batches:
        logits = twin.head(twin.backbone(x[0]).mean((2, 3)))
        (F.cross_entropy(logits, y) / len(batches)).backward()
    ratios = {}
    for n, p in twin.backbone.named_parameters():
        g = math.sqrt(sum(v * v for v in p.grad.flatten().tolist()))
        w = math.sqrt(sum(v * v for v in p.detach().flatten().tolist()))
        ratios[n] = g / w if w > 0 else None
    top = max(r for r in ratios.values() if r is not None)
    return {n: 1.0 if r is None else r / top for n, r in ratios.items()}


def _lrs(opt):
    return {g["name"]: g["lr"] for g in opt.param_groups}


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_per_tensor_lrs_match_float64_and_follow_the_schedule(tiny_net):
    net = _tuner(tiny_net, batches=3)
    with torch.no_grad():
        net.backbone.blocks[1].bias.zero_()  # ||theta|| = 0: full backbone lr, not in the max
    opt, sched = _optimizer(net)
    names = [n for n, _ in net.backbone.named_parameters()]
    assert [g["name"] for g in opt.param_groups] == [f"backbone:{n}" for n in names] + ["heads"]
    data = _batches(4)
    asked = []

    def sample(n):
        asked.append(n)
        return data[:n]

    buffers = [b.clone() for b in net.buffers()]
    want = _expected_scales(net, data[:3])
    net.on_epoch_start(0, opt, sample)
    assert asked == [3]
    got = _lrs(opt)
    for n in names:
        assert got[f"backbone:{n}"] == pytest.approx(LR * MULT * want[n], rel=1e-9, abs=1e-15), n
    assert got["backbone:blocks.1.bias"] == LR * MULT and max(want.values()) == 1.0
    assert got["heads"] == LR
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))  # BN statistics restored
    assert all(p.grad is None for p in net.parameters())

    net.on_epoch_start(0, opt, sample)  # resumed mid-epoch: nothing measured, nothing changed
    assert asked == [3] and _lrs(opt) == got
    net.on_epoch_end(0, opt)
    assert _lrs(opt) == {g["name"]: (LR if g["name"] == "heads" else LR * MULT) for g in opt.param_groups}
    sched.step()  # milestone 1: x0.1 on the scheduler's own lrs
    with torch.no_grad():  # new weights: new ratios
        for p in net.backbone.parameters():
            p.mul_(1.5).add_(0.01)
    want = _expected_scales(net, data[:3])
    net.on_epoch_start(1, opt, sample)
    got = _lrs(opt)
    for n in names:
        assert got[f"backbone:{n}"] == pytest.approx(0.1 * LR * MULT * want[n], rel=1e-9, abs=1e-15), n
    assert got["heads"] == pytest.approx(0.1 * LR, rel=1e-12)


def test_nan_input_shows_in_the_lrs(tiny_net):
    net = _tuner(tiny_net, batches=1)
    opt, _ = _optimizer(net)
    (x, y), = _batches(1)
    x[0, 0, 0, 0, 0] = float("nan")
    net.on_epoch_start(0, opt, lambda n: [(x, y)])
    assert all(math.isnan(g["lr"]) for g in opt.param_groups if g["name"] != "heads")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_bad_batches_option(tiny_net, bad):
    with pytest.raises(ValueError, match="rgn_batches"):
        _tuner(tiny_net, batches=bad)


def test_measuring_leaves_the_training_stream_alone(tmp_path):
    """The trainer runs the measurement under a forked RNG: autorgn's first step sees the same augmented
    views as vanilla's (same initial weights), so the first step's loss is the same number."""
    import dataclasses

    from conftest import tiny_config

    from concept_kernels.train import run

    cfg = tiny_config(tmp_path / "autorgn", method="autorgn", iters_per_epoch=1, rgn_batches=2)
    rgn = run(cfg)[0]["train_loss"]
    assert rgn == run(dataclasses.replace(cfg, method="vanilla", out=str(tmp_path / "vanilla")))[0]["train_loss"]
