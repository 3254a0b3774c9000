"""feature_distill, L1-SP and AFT (the methods that keep a frozen pretrained backbone) against independent
float64 computations of their formulas on a tiny model: the term's value, its gradient with respect to
the backbone parameters (AFT: and to its learned scale s), how it enters the loss, the optimizer groups,
and that the pretrained copy stays frozen and unchanged while the model trains.

The numpy oracles transcribe each formula; their gradients with respect to the pooled features (and s)
come from central finite differences of those transcriptions (not from autograd), and reach the backbone
parameters through a copy of the backbone (the chain rule through the network is not under test)."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from concept_kernels.train import ConceptTuner
from concept_kernels.train.methods.aft import centred_cosine_kernel, kernel_rmse

CLS = 5
TEACHER_METHODS = ("feature_distill", "l1sp", "aft")


def _tuner(tiny_net, method, **options):
    torch.manual_seed(0)
    return ConceptTuner(tiny_net(), CLS, (32, 32), method=method, method_options=options).double()


def _batch(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(CLS, (n,), generator=g)


def _perturb(params, scale=0.1, seed=2):
    """Move parameters away from their start (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _pooled(net, backbone, x):
    return net.features(backbone, x).mean((2, 3))


def _backbone_grads(net, views, grad_f: np.ndarray) -> dict[str, torch.Tensor]:
    """d(term)/d(backbone params) given d(term)/d(pooled features) = grad_f (B, C): through a copy of the
    backbone in train mode (the step's batch statistics)."""
    twin = copy.deepcopy(net.backbone).train()
    f = _pooled(net, twin, views[0])
    grads = torch.autograd.grad(f, list(twin.parameters()), grad_outputs=torch.from_numpy(grad_f))
    return dict(zip((n for n, _ in twin.named_parameters()), grads))


def _numeric_grad(fn, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Central finite differences of the scalar fn at x (float64)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        grad[i] = (fn(x + e) - fn(x - e)) / (2 * h)
    return grad


def _assert_grads(net, expected: dict[str, torch.Tensor]):
    for n, p in net.backbone.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-6, atol=1e-8 * float(expected[n].abs().max()) + 1e-14)


# -- feature distillation ------------------------------------------------------------------------------

def _np_distill(f, t):
    return float(np.mean((f - t) ** 2))


def test_feature_distill_value_gradient_and_teacher(tiny_net):
    lam = 0.7
    net = _tuner(tiny_net, "feature_distill", weight=lam)
    teacher = copy.deepcopy(net.backbone).train()  # the pretrained backbone (batch-statistics BN), a copy
    _perturb(net.backbone.parameters())
    views, labels = _batch()
    out = net.step(views, labels)
    f = _pooled(net, copy.deepcopy(net.backbone).train(), views[0]).detach().numpy()
    t = _pooled(net, teacher, views[0]).detach().numpy()
    value = _np_distill(f, t)
    assert out["distill"].item() == pytest.approx(value, rel=1e-10) and value > 0
    assert out["loss"].item() == pytest.approx(out["ce"].item() + lam * value, rel=1e-12)
    out["distill"].backward()
    grad_f = _numeric_grad(lambda x: _np_distill(x, t), f)
    _assert_grads(net, _backbone_grads(net, views, grad_f))
    assert all(p.grad is None for p in net.source_backbone.parameters())
    assert net.head.weight.grad is None  # the term does not reach the head


# -- L1-SP ---------------------------------------------------------------------------------------------

def test_l1sp_value_gradient_and_groups(tiny_net):
    a, b = 0.03, 0.2
    net = _tuner(tiny_net, "l1sp", alpha=a, beta=b)
    w0 = {n: p.detach().clone() for n, p in net.backbone.named_parameters()}
    out = net.step(*_batch())  # at w = w0: value 0, gradient 0 (the subgradient at the kink)
    assert out["l1sp"].item() == 0.0
    out["l1sp"].backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.backbone.parameters())
    net.zero_grad(set_to_none=True)
    _perturb([*net.backbone.parameters(), *net.head.parameters()])
    out = net.step(*_batch())
    d = {n: (p.detach() - w0[n]).numpy() for n, p in net.backbone.named_parameters()}
    sp = sum(float(np.abs(v).sum()) for v in d.values())
    head = 0.5 * sum(float((p.detach().numpy() ** 2).sum()) for p in net.head.parameters())
    assert out["l1sp"].item() == pytest.approx(sp, rel=1e-12) and sp > 0
    assert out["l2_head"].item() == pytest.approx(head, rel=1e-12)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + a * sp + b * head, rel=1e-12)
    (a * out["l1sp"] + b * out["l2_head"]).backward()
    for n, p in net.backbone.named_parameters():
        np.testing.assert_array_equal(p.grad.numpy(), a * np.sign(d[n]))
    for p in net.head.parameters():
        torch.testing.assert_close(p.grad, b * p.detach(), rtol=1e-12, atol=1e-15)
    groups = net.param_groups(0.01)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]  # no decay towards 0 on top of the pull to w0
    assert "l2sp" not in net.weights  # its own term, not L2-SP's


# -- AFT -----------------------------------------------------------------------------------------------

def _np_unit_centred(x):
    c = x - x.mean(0, keepdims=True)
    return c / np.sqrt((c ** 2).sum(1, keepdims=True))


def _np_aft(f, t, s):
    """RMSE between the centred-cosine kernels of f and of t * sigmoid(s), transcribed from the docstring."""
    u, v = _np_unit_centred(f), _np_unit_centred(t / (1.0 + np.exp(-s)))
    return float(np.sqrt(np.mean((u @ u.T - v @ v.T) ** 2)))


@pytest.mark.parametrize("batch", [6, 3])
def test_aft_value_gradients_and_groups(tiny_net, batch):
    beta = 4.0
    net = _tuner(tiny_net, "aft", beta=beta)
    teacher = copy.deepcopy(net.backbone).train()
    assert net.aft_scale.shape == (64,) and not net.aft_scale.detach().any()  # s starts at 0
    _perturb([*net.backbone.parameters(), net.aft_scale], scale=0.5)
    s = net.aft_scale.detach().numpy().copy()
    views, labels = _batch(n=batch)
    out = net.step(views, labels)
    f = _pooled(net, copy.deepcopy(net.backbone).train(), views[0]).detach().numpy()
    t = _pooled(net, teacher, views[0]).detach().numpy()
    value = _np_aft(f, t, s)
    assert out["aft"].item() == pytest.approx(value, rel=1e-10) and value > 0
    assert out["loss"].item() == pytest.approx(out["ce"].item() + beta * value, rel=1e-12)
    out["aft"].backward()
    grad_s = _numeric_grad(lambda x: _np_aft(f, t, x), s)
    np.testing.assert_allclose(net.aft_scale.grad.numpy(), grad_s, rtol=1e-6, atol=1e-8 * np.abs(grad_s).max())
    assert np.abs(grad_s).max() > 0
    _assert_grads(net, _backbone_grads(net, views, _numeric_grad(lambda x: _np_aft(x, t, s), f)))
    assert all(p.grad is None for p in net.source_backbone.parameters())
    groups = {g["name"]: g for g in net.param_groups(0.01, 0.1)}
    assert [g["name"] for g in net.param_groups(0.01, 0.1)] == ["backbone", "aft_scale", "heads"]
    assert groups["aft_scale"]["params"] == [net.aft_scale]
    assert groups["aft_scale"]["lr"] == 0.01 and groups["aft_scale"]["weight_decay"] == 0.0
    assert "weight_decay" not in groups["backbone"]  # the backbone keeps the trainer's decay


def test_aft_kernel_rmse_at_zero_and_with_nan():
    x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    k = centred_cosine_kernel(x)
    np.testing.assert_allclose(k.detach().numpy(), _np_unit_centred(x.detach().numpy()) @
                               _np_unit_centred(x.detach().numpy()).T, rtol=1e-12, atol=1e-14)
    loss = kernel_rmse(k, k.detach().clone())  # identical kernels: value 0, gradient 0 (not NaN)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    bad = x.detach().clone()
    bad[2, 3] = float("nan")
    assert torch.isnan(kernel_rmse(centred_cosine_kernel(bad), k.detach()))


def test_aft_kernel_is_float32_under_autocast():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x.T).dtype == torch.bfloat16  # (what autocast would do to the kernel's matmul)
        k = centred_cosine_kernel(x.bfloat16())
    u = _np_unit_centred(x.bfloat16().double().numpy())
    assert k.dtype == torch.float32
    np.testing.assert_allclose(k.numpy(), u @ u.T, rtol=0, atol=1e-6)


class _NoBatchNorm(nn.Module):
    """A BN-free backbone: at the first step its train-mode features equal the frozen copy's."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 4, 1), nn.ReLU())

    def forward(self, x):
        return self.blocks(x)


def test_aft_first_step_of_a_bn_free_backbone_is_finite():
    net = _tuner(_NoBatchNorm, "aft")
    out = net.step(*_batch())
    assert out["aft"].item() < 1e-7
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in [*net.backbone.parameters(), net.aft_scale])


# -- all three -----------------------------------------------------------------------------------------

def test_teacher_features_match_at_the_first_step(tiny_net):
    """The teacher's batch norms use the batch's statistics in training, as the student's: with equal
    weights the terms start at 0 (a BN backbone whose running statistics differ a lot from a batch's)."""
    views, labels = _batch()
    for method, term in (("feature_distill", "distill"), ("aft", "aft")):
        net = _tuner(tiny_net, method)
        for m in net.source_backbone.modules():  # pretrained running statistics far from these images'
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(9.0)
        out = net.step(views, labels)
        assert out[term].item() < 1e-7, (method, out[term].item())
        net.eval()  # in eval mode both use running statistics: now they differ
        assert net.step(views, labels)[term].item() > 1e-3
        assert not net.source_backbone.training
        assert all(m.track_running_stats for m in net.source_backbone.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("method", TEACHER_METHODS)
def test_the_pretrained_copy_stays_frozen_while_training(tiny_net, method):
    torch.manual_seed(0)
    net = ConceptTuner(tiny_net(), CLS, (32, 32), method=method)
    start = copy.deepcopy(net.backbone.state_dict())
    opt = torch.optim.SGD(net.param_groups(0.05, 1.0), lr=0.05, momentum=0.9, weight_decay=5e-4)
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_groups for p in net.source_backbone.parameters())
    for seed in range(3):
        net.train()
        views, labels = _batch(seed)
        out = net.step(views.float(), labels)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        assert not net.source_backbone.training
    source = net.source_backbone.state_dict()
    assert source.keys() == start.keys()
    assert all(torch.equal(source[k], start[k]) for k in start)  # weights and BN running statistics
    assert all(p.grad is None and not p.requires_grad for p in net.source_backbone.parameters())
    moved = net.backbone.state_dict()
    assert any(not torch.equal(moved[k], start[k]) for k in start)
    if method == "aft":
        assert net.aft_scale.detach().abs().max() > 0  # s trains


def test_bad_options(tiny_net):
    for method, option in (("feature_distill", "weight"), ("l1sp", "alpha"), ("l1sp", "beta"), ("aft", "beta")):
        for bad in (-1.0, float("nan"), True, "1"):
            with pytest.raises(ValueError, match=f"^{option} must be a number"):
                _tuner(tiny_net, method, **{option: bad})
    with pytest.raises(TypeError, match="no option"):
        _tuner(tiny_net, "aft", alpha=1.0)
    with pytest.raises(ValueError, match=r"aft needs batches of >= 3 images.*got 2"):
        _tuner(tiny_net, "aft").step(*_batch(n=2))


def test_aft_resume_is_bit_exact(tmp_path):
    """s and its optimizer state are saved: 2 epochs straight == 1 epoch + --resume, s included."""
    from conftest import tiny_config

    from concept_kernels.train import run
    from concept_kernels.train.trainer import CHECKPOINT, load_checkpoint

    run(tiny_config(tmp_path / "a", method="aft", epochs=2))
    split = tiny_config(tmp_path / "b", method="aft", epochs=1)
    run(split)
    run(dataclasses.replace(split, epochs=2, resume=True))
    a, b = (load_checkpoint(tmp_path / d / "run" / CHECKPOINT)["model"] for d in "ab")
    assert a.keys() == b.keys() and "aft_scale" in a and any(k.startswith("source_backbone.") for k in a)
    assert a["aft_scale"].abs().max() > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
