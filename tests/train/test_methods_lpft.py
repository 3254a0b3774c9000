"""LP-FT: in stage 1 the backbone (parameters and BN buffers) is bit-unchanged while the head trains; in
stage 2 everything trains at the lrs the docstring states (ft_lr_mult x the usual group lrs, x the
schedule); stage 1 in the trainer is the house linear probe, bit for bit; bad options are refused."""
import dataclasses

import pytest
import torch

from concept_kernels.train import ConceptTuner

CLS, LR, MULT, FT = 5, 0.05, 0.1, 0.3


def _tuner(tiny_net, **options):
    torch.manual_seed(0)
    return ConceptTuner(tiny_net(), CLS, (32, 32), method="lpft", method_options=options).double().train()


def _train_epoch(net, opt, epoch, steps=3):
    """What the trainer does in one epoch: hooks around SGD steps on random batches."""
    net.train()
    net.on_epoch_start(epoch, opt, sample=None)
    g = torch.Generator().manual_seed(10 + epoch)
    for _ in range(steps):
        x, y = torch.randn(1, 6, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(CLS, (6,), generator=g)
        opt.zero_grad(set_to_none=True)
        net.step(x, y)["loss"].backward()
        opt.step()
    lrs = {grp["name"]: grp["lr"] for grp in opt.param_groups}
    net.on_epoch_end(epoch, opt)
    return lrs


@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("ft_bn", ["frozen", "train"])
def test_probe_then_fine_tune(tiny_net, ft_bn):
    net = _tuner(tiny_net, probe="sgd", probe_epochs=2, ft_lr_mult=FT, ft_bn=ft_bn)
    opt = torch.optim.SGD(net.param_groups(LR, MULT), lr=LR, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1, 3], gamma=0.1)
    start_backbone = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    start_head = net.head.weight.detach().clone()
    want = [dict(backbone=LR * MULT, heads=LR), dict(backbone=0.1 * LR * MULT, heads=0.1 * LR),  # probe
            dict(backbone=0.1 * LR * MULT * FT, heads=0.1 * LR * FT),  # fine-tune, x0.1 schedule since epoch 1
            dict(backbone=0.01 * LR * MULT * FT, heads=0.01 * LR * FT)]  # 2nd milestone
    for epoch in range(4):
        lrs = _train_epoch(net, opt, epoch)
        assert lrs == pytest.approx(want[epoch], rel=1e-12), epoch
        assert [grp["lr"] for grp in opt.param_groups] == pytest.approx(  # scheduler's own lrs restored
            [want[epoch]["backbone"] / (FT if epoch >= 2 else 1), want[epoch]["heads"] / (FT if epoch >= 2 else 1)],
            rel=1e-12)
        sched.step()
        state = net.backbone.state_dict()
        if epoch < 2:
            assert not any(p.requires_grad for p in net.backbone.parameters())
            assert not net.backbone.training  # BN in eval mode: running statistics fixed
            assert all(torch.equal(state[k], v) for k, v in start_backbone.items()), epoch  # buffers included
            assert not torch.equal(net.head.weight, start_head)
            probed_head = net.head.weight.detach().clone()
        else:
            assert all(p.requires_grad for p in net.backbone.parameters()) and net.backbone.training
            bn_modes = {m.training for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)}
            assert bn_modes == {ft_bn == "train"}
            moved = {k: not torch.equal(state[k], v) for k, v in start_backbone.items()}
            stats = {k for k in moved if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
            assert stats and all(moved[k] == (ft_bn == "train") for k in stats), epoch  # statistics: per ft_bn
            assert all(moved[k] for k in moved if k not in stats), epoch  # every parameter trains
    assert not torch.equal(net.head.weight, probed_head)


@pytest.mark.parametrize("ft_bn", ["frozen", "train"])
def test_fine_tuning_starts_from_the_features_the_probe_saw(tiny_net, ft_bn):
    """frozen: the first fine-tuning forward (train mode, stage 2) gives the probe's logits (eval-mode BN),
    bit for bit; train: batch statistics give other logits (the mismatch frozen avoids)."""
    net = _tuner(tiny_net, probe="sgd", probe_epochs=1, ft_bn=ft_bn)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net.on_epoch_start(0, torch.optim.SGD(net.param_groups(LR, MULT), lr=LR), sample=None)
    probe_logits = net.step(x[None], torch.zeros(6, dtype=torch.long))["logits"]
    net.on_epoch_start(1, torch.optim.SGD(net.param_groups(LR, MULT), lr=LR), sample=None)
    ft_logits = net.step(x[None], torch.zeros(6, dtype=torch.long))["logits"]
    assert torch.equal(ft_logits, probe_logits) == (ft_bn == "frozen")


def test_lbfgs_probe_is_the_regularised_optimum(tmp_path):
    """probe="lbfgs": before the first step the head minimises mean CE + l2/2 ||W||^2 on the frozen pretrained
    features of the training images: the objective's gradient, computed here in float64 from features of an
    independent forward, vanishes at the fitted head (and not at a perturbed one); no epoch probes."""
    from conftest import tiny_config

    from concept_kernels.train.trainer import build

    cfg = tiny_config(tmp_path, method="lpft", lpft_probe_l2=1e-2)
    model, train_set, _, _ = build(cfg, torch.device("cpu"))
    assert all(p.requires_grad for p in model.backbone.parameters())  # probe_epochs 0: fine-tunes from step 1
    model.prepare(train_set, tmp_path)
    model.backbone.eval()
    with torch.no_grad():
        x, y = train_set.tensors
        f = model.features(model.backbone, x).mean((2, 3)).double()

    def grad_norm(w, b):
        w, b = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        loss = torch.nn.functional.cross_entropy(f @ w.T + b, y) + 0.5 * 1e-2 * w.pow(2).sum()
        gw, gb = torch.autograd.grad(loss, (w, b))
        return float(torch.cat([gw.flatten(), gb]).norm())

    assert grad_norm(model.head.weight, model.head.bias) < 1e-4
    assert grad_norm(model.head.weight + 0.01, model.head.bias) > 1e-2


def test_stage_one_in_the_trainer_is_the_linear_probe(tmp_path):
    """One probe epoch of lpft == one epoch of --method linear: same head, same backbone, bit for bit."""
    from conftest import tiny_config

    from concept_kernels.train import run
    from concept_kernels.train.trainer import CHECKPOINT, load_checkpoint

    cfg = tiny_config(tmp_path / "lpft", method="lpft", lpft_probe="sgd", lpft_probe_epochs=1)
    run(cfg)
    run(dataclasses.replace(cfg, method="linear", out=str(tmp_path / "linear" / "run")))
    a, b = (load_checkpoint(tmp_path / d / "run" / CHECKPOINT)["model"] for d in ("lpft", "linear"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("options", [dict(probe_epochs=1.5), dict(probe_epochs=True),
                                     dict(ft_lr_mult=0.0), dict(ft_lr_mult=-1.0), dict(ft_lr_mult=float("nan")),
                                     dict(ft_bn="eval"), dict(probe="adam"), dict(probe="sgd", probe_epochs=0),
                                     dict(probe_epochs=-1), dict(probe_l2=-1.0)])
def test_bad_options(tiny_net, options):
    with pytest.raises(ValueError, match=next(iter(options))):
        _tuner(tiny_net, **options)
