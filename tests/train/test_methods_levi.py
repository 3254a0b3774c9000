"""LEVI: the ensemble's logits (training step and predict) against an independent float64 composition of its
parts (the backbone's layers run by hand, the small CNN as explicit conv / batch-norm / relu calls, the
adapters as explicit layer norms and matrix products); the pretrained backbone stays frozen; gradients
reach the small CNN and the adapters; default layers, checkpoint round trip and bad options."""
import pytest
import torch
import torch.nn.functional as F

from concept_kernels.train import ConceptTuner
from concept_kernels.train.backbones import create_backbone

CLS = 5
LAYERS = ("blocks.2", "blocks.5")  # TinyNet: the ReLU outputs of its first two stages (16 and 32 channels)


def _tuner(tiny_net, **options):
    torch.manual_seed(0)
    options.setdefault("layers", LAYERS)
    options.setdefault("width", 4)
    return ConceptTuner(tiny_net(), CLS, (32, 32), method="levi", method_options=options).double()


def _batch(B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, B, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(CLS, (B,), generator=g)


def composed_logits(net, x, train_small: bool):
    """head(GAP f) + sum_l A_l [GAP h_l ; GAP s_l], every piece written out: the frozen TinyNet run block by
    block in eval mode, each small-CNN stage as conv(stride 2, pad 1) -> batch norm (batch statistics when
    training, else the running ones) -> relu."""
    blocks = net.backbone.blocks
    h1 = blocks[:3](x)
    h2 = blocks[3:6](h1)
    f = blocks[6:](h2)
    small, s = [], x
    for stage in net.levi_cnn.stages:
        conv, bn = stage[0], stage[1]
        s = F.conv2d(s, conv.weight, None, stride=2, padding=1)
        if train_small:
            mean, var = s.mean((0, 2, 3)), s.var((0, 2, 3), unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        s = ((s - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps) * bn.weight[:, None, None]
             + bn.bias[:, None, None]).clamp_min(0)
        small.append(s)
    out = f.mean((2, 3)) @ net.head.weight.T + net.head.bias
    for h, s, (norm, linear) in zip((h1, h2), small, net.levi_adapters):
        z = torch.cat([h.mean((2, 3)), s.mean((2, 3))], 1)
        z = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + norm.eps)
        out = out + (z * norm.weight + norm.bias) @ linear.weight.T + linear.bias
    return out


def _spread_adapters(net, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights as after some training: every part moves the logits visibly
        for p in [*net.head.parameters(), *net.levi_adapters.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))


def test_logits_match_the_composition_of_the_parts(tiny_net):
    net = _tuner(tiny_net)
    _spread_adapters(net)
    views, labels = _batch()
    assert [a[1].in_features for a in net.levi_adapters] == [16 + 4, 32 + 8]
    out = net.step(views, labels)
    with torch.no_grad():
        ref = composed_logits(net, views[0], train_small=True)
    torch.testing.assert_close(out["logits"].detach(), ref, rtol=1e-12, atol=1e-12)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(ref, labels).item(), rel=1e-12)
    assert out["loss"].item() == pytest.approx(out["ce"].item(), rel=1e-15)  # one shared loss, nothing added
    with torch.no_grad():
        probe_only = net.head(net.backbone(views[0]).mean((2, 3)))
    assert (ref - probe_only).abs().min() > 1e-3  # the adapters' views are part of every logit
    pred = net.eval().predict(views[0])["main"]
    with torch.no_grad():
        torch.testing.assert_close(pred, composed_logits(net, views[0], train_small=False), rtol=1e-12, atol=1e-12)


def test_backbone_frozen_and_gradients_reach_the_new_parts(tiny_net):
    net = _tuner(tiny_net)
    assert not any(p.requires_grad for p in net.backbone.parameters())
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    groups = net.param_groups(0.1)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_groups for p in net.backbone.parameters())
    new_parts = [*net.head.parameters(), *net.levi_cnn.parameters(), *net.levi_adapters.parameters()]
    assert in_groups == {id(p) for p in new_parts}
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    net.train()
    assert not net.backbone.training and net.levi_cnn.training
    for seed in range(2):
        opt.zero_grad()
        net.step(*_batch(seed=seed))["loss"].backward()
        for p in new_parts:
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert all(p.grad is None for p in net.backbone.parameters())
        opt.step()
    after = net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers (counters too)


def test_checkpoint_round_trip(tiny_net):
    net = _tuner(tiny_net)
    _spread_adapters(net)
    net.step(*_batch())  # moves the small CNN's BN statistics
    state = net.state_dict()
    assert any(k.startswith("levi_cnn.") for k in state) and any(k.startswith("levi_adapters.") for k in state)
    other = _tuner(tiny_net)
    other.load_state_dict(state)
    x = _batch(seed=5)[0][0]
    assert torch.equal(net.eval().predict(x)["main"], other.eval().predict(x)["main"])


def test_default_layers_from_feature_info():
    torch.manual_seed(0)
    net = ConceptTuner(create_backbone("tf_efficientnet_lite0", pretrained=False), CLS, (64, 64), method="levi")
    assert net.impl.layers == ("blocks.2", "blocks.4", "blocks.6")
    assert [a[1].in_features for a in net.levi_adapters] == [40 + 32, 112 + 64, 320 + 128]


def test_bad_options(tiny_net):
    for opts, match in [(dict(layers=("blocks.9",)), r"levi_layers\): no module \['blocks.9'\]"),
                        (dict(layers="blocks.2"), r"layers \(levi_layers\) must be a sequence"),
                        (dict(layers=()), "no timm feature_info"),
                        (dict(width=0), r"width \(levi_width\) must be an int >= 1"),
                        (dict(width=2.5), r"width \(levi_width\)")]:
        with pytest.raises(ValueError, match=match):
            _tuner(tiny_net, **opts)
