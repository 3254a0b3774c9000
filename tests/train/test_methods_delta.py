"""DELTA against independent float64 computations on a tiny model: the regularizer's value and gradient (a
loop over layers, images and channels on a copy of the network), the channel attention (a loop that zeroes
one channel at a time, measures the mean CE, z-scores and takes softmax(z / 5)), the cache of the attention
(reused for the same weights and data, recomputed otherwise, reused by a resumed run), bad options."""
import copy
import math

import pytest
import torch

from concept_kernels.train import ConceptTuner
from concept_kernels.train.methods import delta as delta_mod
from concept_kernels.train.methods.wiseft import fit_linear_probe

CLS = 5
LAYERS = ("blocks.2", "blocks.5")  # TinyNet: the ReLU outputs of its first two convolutions (16, 32 channels)


def _tuner(tiny_net, **options):
    torch.manual_seed(0)
    options.setdefault("layers", LAYERS)
    return ConceptTuner(tiny_net(), CLS, (32, 32), method="delta", method_options=options).double()


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.arange(n) % CLS)


def _maps(blocks, x, layer_idx=(2, 5)):
    """Outputs of blocks[i] for i in layer_idx, running the Sequential child by child."""
    out = []
    for i, m in enumerate(blocks):
        x = m(x)
        if i in layer_idx:
            out.append(x)
    return out


def test_regularizer_value_and_gradient(tiny_net):
    a, b = 0.3, 0.2
    net = _tuner(tiny_net, alpha=a, beta=b)
    net.prepare(_data(), None)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for w in net.delta_attention.vectors():  # any weights summing to 1 (not only the measured ones)
            w.copy_(torch.softmax(torch.randn(w.shape, generator=g, dtype=torch.float64), 0))
    views = torch.randn(1, 6, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.arange(6) % CLS
    net.train()
    assert net.step(views, labels)["delta"].item() == 0.0  # the pretrained copy normalises with batch stats too
    with torch.no_grad():  # move away from w0 (as training would)
        for p in [*net.backbone.parameters(), *net.head.parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    tuned, source = copy.deepcopy(net.backbone).train(), copy.deepcopy(net.source_backbone).train()
    out = net.step(views, labels)
    (out["delta"]).backward()

    maps = _maps(tuned.blocks, views[0])
    with torch.no_grad():
        maps0 = _maps(source.blocks, views[0])
    attention = [w.detach().clone() for w in net.delta_attention.vectors()]
    want = 0.0
    for fm, fm0, w in zip(maps, maps0, attention):
        B, C, h, wd = fm.shape
        for i in range(B):
            for c in range(C):
                want = want + C * w[c] * ((fm[i, c] - fm0[i, c]) ** 2).sum() / (h * wd) / (2 * B)
    want.backward()
    assert out["delta"].item() == pytest.approx(want.item(), rel=1e-10) and want.item() > 0
    head = 0.5 * sum(float((p.detach() ** 2).sum()) for p in net.head.parameters())
    assert out["l2_head"].item() == pytest.approx(head, rel=1e-12)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + a * want.item() + b * head, rel=1e-10)
    for (n, p), q in zip(net.backbone.named_parameters(), tuned.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)
    assert not any(p.requires_grad for p in net.source_backbone.parameters())
    assert [g["weight_decay"] for g in net.param_groups(0.01)] == [0.0, 0.0]
    # the pretrained copy's running statistics stay as they were (momentum 0 under batch statistics)
    for k, v in net.source_backbone.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, source.state_dict()[k], rtol=0, atol=0)


def _loop_attention(backbone, head, x, y, layers):
    """Loop-by-loop: for each layer and channel c, zero channel c of that layer's output (a hook), mean CE
    of head(pooled features) over the images one at a time, minus the unablated mean CE; z-score (unbiased
    std), softmax(z / 5) by hand."""
    backbone = copy.deepcopy(backbone).eval()

    def mean_ce():
        total = 0.0
        for i in range(x.shape[0]):
            logits = head(backbone(x[i:i + 1]).mean((2, 3)))[0].tolist()
            m = max(logits)
            total += m + math.log(sum(math.exp(v - m) for v in logits)) - logits[int(y[i])]
        return total / x.shape[0]

    out = []
    with torch.no_grad():
        base = mean_ce()
        for layer in layers:
            module = backbone.get_submodule(layer)
            C = dict(zip(LAYERS, (16, 32)))[layer]
            d = []
            for c in range(C):
                def zero_c(mod, inp, o, c=c):
                    o = o.clone()
                    o[:, c] = 0
                    return o

                handle = module.register_forward_hook(zero_c)
                d.append(mean_ce() - base)
                handle.remove()
            mean = sum(d) / C
            std = math.sqrt(sum((v - mean) ** 2 for v in d) / (C - 1))
            e = [math.exp((v - mean) / std / 5) for v in d]
            out.append([v / sum(e) for v in e])
    return out


@pytest.mark.parametrize("batch_images", [5, 64])  # 5: one image and 5 channels a forward; 64: 4 images x 16 / 2 x 32
def test_attention_matches_loop(tiny_net, batch_images):
    net = _tuner(tiny_net)
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(64, CLS).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(CLS, 64, generator=g, dtype=torch.float64))
    ds = _data(7)
    x, y = ds.tensors
    got = delta_mod.channel_attention(net, net.source_backbone, head, x, y, LAYERS, batch_images=batch_images)
    want = _loop_attention(net.source_backbone, head, x, y, LAYERS)
    for gw, ww in zip(got, want):
        assert gw.tolist() == pytest.approx(ww, rel=1e-9, abs=1e-14)
        assert max(ww) / min(ww) > 1.01  # the channels differ (not the uniform weights)


def test_prepare_fits_the_probe_on_the_frozen_backbone(tiny_net):
    """prepare: a head fitted on the pretrained backbone's pooled features of every training image, then the
    loop above on the images (attention_images=0: all)."""
    net = _tuner(tiny_net, attention_images=0)
    with torch.no_grad():  # the fine-tuned backbone differs: the attention must come from the pretrained copy
        for p in net.backbone.parameters():
            p.mul_(1.5)
    ds = _data(10)
    x, y = ds.tensors
    src = copy.deepcopy(net.source_backbone).eval()
    with torch.no_grad():
        feats = torch.stack([src(x[i:i + 1]).mean((2, 3))[0] for i in range(len(x))])
    head = torch.nn.Linear(64, CLS).double()
    fit_linear_probe(head, feats, y, delta_mod.PROBE_L2)
    want = _loop_attention(src, head, x, y, LAYERS)
    net.prepare(ds, None)
    for gw, ww in zip(net.delta_attention.vectors(), want):
        assert gw.tolist() == pytest.approx(ww, rel=1e-6)


def test_attention_cache(tiny_net, tmp_path, monkeypatch):
    calls = []
    real = delta_mod.channel_attention
    monkeypatch.setattr(delta_mod, "channel_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = _tuner(tiny_net)
    first.prepare(_data(), tmp_path)
    assert len(calls) == 1 and (tmp_path / delta_mod.CACHE_FILE).exists()
    again = _tuner(tiny_net)  # same weights, data, layers: the file is reused
    again.prepare(_data(), tmp_path)
    assert len(calls) == 1
    for a, b in zip(first.delta_attention.vectors(), again.delta_attention.vectors()):
        assert torch.equal(a, b)
    _tuner(tiny_net).prepare(_data(seed=5), tmp_path)  # other images
    assert len(calls) == 2
    other = _tuner(tiny_net)
    with torch.no_grad():
        next(other.source_backbone.parameters()).add_(1e-3)  # other pretrained weights
    other.prepare(_data(seed=5), tmp_path)
    assert len(calls) == 3
    _tuner(tiny_net, layers=("blocks.5",)).prepare(_data(seed=5), tmp_path)  # other layers
    assert len(calls) == 4


def test_resumed_run_reuses_the_attention(tmp_path, monkeypatch):
    from conftest import tiny_config

    from concept_kernels.train import run

    cfg = tiny_config(tmp_path, method="delta", delta_attention_images=4)
    run(cfg)
    assert (tmp_path / "run" / delta_mod.CACHE_FILE).exists()

    def refuse(*a, **k):
        raise AssertionError("the resumed run recomputed the attention")

    monkeypatch.setattr(delta_mod, "channel_attention", refuse)
    history = run(tiny_config(tmp_path, method="delta", delta_attention_images=4, epochs=2, resume=True))
    assert [r["epoch"] for r in history] == [1, 2]
    with pytest.raises(AssertionError, match="recomputed"):  # another seed: other images, computed anew
        run(tiny_config(tmp_path, method="delta", delta_attention_images=4, seed=1, overwrite=True))


def test_bad_options_and_order(tiny_net):
    with pytest.raises(ValueError, match="alpha"):
        _tuner(tiny_net, alpha=-1.0)
    with pytest.raises(ValueError, match="layers must be"):
        _tuner(tiny_net, layers="blocks.2")
    with pytest.raises(ValueError, match="attention_images must be"):
        _tuner(tiny_net, attention_images=-1)
    with pytest.raises(ValueError, match=r"no module\(s\) \['blocks.99'\]"):
        _tuner(tiny_net, layers=("blocks.99",))
    with pytest.raises(ValueError, match="'TinyNet' lists no timm feature_info"):
        _tuner(tiny_net, layers=())
    with pytest.raises(RuntimeError, match="prepare"):
        _tuner(tiny_net).step(_data().tensors[0][None, :4], torch.arange(4))
