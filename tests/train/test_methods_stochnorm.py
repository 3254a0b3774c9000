"""StochNorm against an independent float64 transcription of its formula: in training each channel is
the batch-statistics or the moving-statistics batch norm (pre-update running stats), the share of batch
channels follows p, the running statistics update as in a batch norm, gradients match the formula's;
in eval mode it is the plain batch norm."""
import copy

import pytest
import torch

from concept_kernels.train import ConceptTuner
from concept_kernels.train.methods.stochnorm import to_stochnorm_

C = 400


def _bn(gen, momentum=0.1):
    bn = torch.nn.BatchNorm2d(C, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(1 + 0.3 * torch.randn(C, generator=gen, dtype=torch.float64))
        bn.bias.copy_(0.3 * torch.randn(C, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(0.5 + torch.rand(C, generator=gen, dtype=torch.float64))
    return bn


def _reference(x, w, b, mean, var, eps):
    return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps) * w.view(1, -1, 1, 1) \
        + b.view(1, -1, 1, 1)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_train_mode_mixes_batch_and_moving_statistics(p):
    gen = torch.Generator().manual_seed(0)
    bn = _bn(gen)
    w, b = bn.weight.detach().clone(), bn.bias.detach().clone()
    rm0, rv0, m, eps = bn.running_mean.clone(), bn.running_var.clone(), bn.momentum, bn.eps
    assert to_stochnorm_(torch.nn.Sequential(bn), p) == 1
    x = (2 + 3 * torch.randn(4, C, 3, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    r = torch.randn(4, C, 3, 5, generator=gen, dtype=torch.float64)
    out = bn.train()(x)
    (out * r).sum().backward()

    xd = x.detach().requires_grad_()
    mean_b, var_b = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    batch, moving = _reference(xd, w, b, mean_b, var_b, eps), _reference(xd, w, b, rm0, rv0, eps)
    is_batch = torch.tensor([torch.allclose(out[:, c], batch[:, c], rtol=1e-12, atol=1e-12) for c in range(C)])
    is_moving = torch.tensor([torch.allclose(out[:, c], moving[:, c], rtol=1e-12, atol=1e-12) for c in range(C)])
    assert bool((is_batch | is_moving).all())  # every channel is one of the two
    n_batch = int(is_batch.sum())
    if p in (0.0, 1.0):
        assert n_batch == C * p
    else:  # Binomial(400, 0.5): mean 200, sd 10
        assert 150 <= n_batch <= 250, n_batch
    mixed = torch.where(is_batch.view(1, -1, 1, 1), batch, moving)
    (grad_ref,) = torch.autograd.grad((mixed * r).sum(), xd)
    torch.testing.assert_close(x.grad, grad_ref, rtol=1e-10, atol=1e-12)
    n = x.numel() // C
    torch.testing.assert_close(bn.running_mean, (1 - m) * rm0 + m * mean_b.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, (1 - m) * rv0 + m * var_b.detach() * n / (n - 1), rtol=1e-12,
                               atol=1e-14)
    assert int(bn.num_batches_tracked) == 1
    evaluated = bn.eval()(x.detach())  # eval: plain BN with the (updated) running statistics
    torch.testing.assert_close(evaluated, _reference(x.detach(), w, b, bn.running_mean, bn.running_var, eps),
                               rtol=1e-12, atol=1e-12)


def test_timm_batchnorm_act_keeps_its_activation():
    from concept_kernels._compat import import_timm

    timm = import_timm()
    gen = torch.Generator().manual_seed(1)
    bn = timm.layers.BatchNormAct2d(C, act_layer=torch.nn.ReLU).double()
    plain = copy.deepcopy(bn)
    to_stochnorm_(bn, 1.0)  # p = 1: always the batch statistics, i.e. the plain module in training
    x = torch.randn(2, C, 4, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(bn.train()(x), plain.train()(x), rtol=1e-12, atol=1e-12)
    assert (bn(x) >= 0).all() and (bn(x) == 0).any()  # the ReLU is applied


def test_tuner_converts_every_backbone_bn_and_keeps_the_state_dict(tiny_net):
    torch.manual_seed(0)
    net = ConceptTuner(tiny_net(), 5, (32, 32), method="stochnorm", method_options=dict(p=0.3))
    torch.manual_seed(0)
    plain = ConceptTuner(tiny_net(), 5, (32, 32), method="vanilla")
    bns = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 3 and all(type(m).__name__ == "StochNorm2d" and m.stoch_p == 0.3 for m in bns)
    assert net.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(ValueError, match="p must be"):
        ConceptTuner(tiny_net(), 5, (32, 32), method="stochnorm", method_options=dict(p=1.5))
    with pytest.raises(ValueError, match="no batch norm"):
        ConceptTuner(torch.nn.Conv2d(3, 8, 8, 8), 5, (32, 32), method="stochnorm")
