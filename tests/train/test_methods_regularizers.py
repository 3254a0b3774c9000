"""L2-SP and BSS against independent float64 computations of their formulas on a tiny model: the
regularizer's value, its gradient, how it enters the loss, and the optimizer groups."""
import copy

import numpy as np
import pytest
import torch

from concept_kernels.train import ConceptTuner
from concept_kernels.train.methods.bss import smallest_squared_singular_values

CLS = 5


def _tuner(tiny_net, method, **options):
    torch.manual_seed(0)
    return ConceptTuner(tiny_net(), CLS, (32, 32), method=method, method_options=options).double()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 6, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(CLS, (6,), generator=g)


def test_l2sp_value_gradient_and_groups(tiny_net):
    a, b = 0.03, 0.2
    net = _tuner(tiny_net, "l2sp", alpha=a, beta=b)
    w0 = {n: p.detach().clone() for n, p in net.backbone.named_parameters()}  # the pretrained point
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # move away from w0 (as training would)
        for p in [*net.backbone.parameters(), *net.head.parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    out = net.step(*_batch())
    sp = sum(0.5 * float(((p.detach() - w0[n]) ** 2).sum()) for n, p in net.backbone.named_parameters())
    head = 0.5 * sum(float((p.detach() ** 2).sum()) for p in net.head.parameters())
    assert out["l2sp"].item() == pytest.approx(sp, rel=1e-12) and sp > 0
    assert out["l2_head"].item() == pytest.approx(head, rel=1e-12)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + a * sp + b * head, rel=1e-12)
    (a * out["l2sp"] + b * out["l2_head"]).backward()
    for n, p in net.backbone.named_parameters():
        torch.testing.assert_close(p.grad, a * (p.detach() - w0[n]), rtol=1e-12, atol=1e-15)
    for p in net.head.parameters():
        torch.testing.assert_close(p.grad, b * p.detach(), rtol=1e-12, atol=1e-15)
    assert not any(p.requires_grad for p in net.source_backbone.parameters())
    groups = net.param_groups(0.01)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]  # no decay towards 0 on top of the pull to w0
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_groups for p in net.source_backbone.parameters())
    net.train()
    assert not net.source_backbone.training  # w0's BN statistics stay fixed


def _numpy_bss(x: np.ndarray, k: int):
    u, s, vt = np.linalg.svd(x, full_matrices=False)  # s descending
    idx = range(len(s) - k, len(s))
    return sum(s[i] ** 2 for i in idx), sum(2 * s[i] * np.outer(u[:, i], vt[i]) for i in idx)


@pytest.mark.parametrize("shape,k", [((6, 64), 1), ((6, 64), 3), ((40, 8), 2)])
def test_bss_penalty_value_and_gradient(shape, k):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    value, grad = _numpy_bss(x.detach().numpy(), k)
    out = smallest_squared_singular_values(x, k)
    out.backward()
    assert out.item() == pytest.approx(value, rel=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), grad, rtol=1e-8, atol=1e-12)


def test_bss_in_the_step(tiny_net):
    eta, k = 0.5, 2
    net = _tuner(tiny_net, "bss", eta=eta, k=k)
    views, labels = _batch()
    out = net.step(views, labels)
    feats = copy.deepcopy(net.backbone)(views[0]).mean((2, 3))  # a copy: same BN batch statistics
    value, _ = _numpy_bss(feats.detach().numpy(), k)
    assert out["bss"].item() == pytest.approx(value, rel=1e-10)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + eta * value, rel=1e-12)


def test_bad_options(tiny_net):
    with pytest.raises(ValueError, match="alpha"):
        _tuner(tiny_net, "l2sp", alpha=-1.0)
    with pytest.raises(ValueError, match="k must be"):
        _tuner(tiny_net, "bss", k=0)
    with pytest.raises(ValueError, match=r"bss_k\) must be in \[1, min\(B, d\)\]"):
        _tuner(tiny_net, "bss", k=7).step(*_batch())  # 6 images: 6 singular values
    with pytest.raises(TypeError, match="no option"):
        _tuner(tiny_net, "bss", alpha=1.0)
