"""Co-Tuning against independent float64 computations on a tiny model with a source head: the relationship
p(y_s | y_t) (a loop over classes and images), the soft-target loss term and its gradient, the optimizer
groups; the error for a backbone without a source classifier; the offline lite0 weights' classifier kept
as the source head, and a trained run rebuilt from its checkpoint."""
import copy
import math

import pytest
import torch

from concept_kernels.train import ConceptTuner
from concept_kernels.train.methods.cotuning import class_relationship

CLS, KS = 4, 7


def _backbone(tiny_net, seed=0):
    torch.manual_seed(seed)
    net = tiny_net()
    g = torch.Generator().manual_seed(10 + seed)
    net.source_classifier = {"weight": torch.randn(KS, 64, generator=g), "bias": torch.randn(KS, generator=g)}
    return net


def _tuner(tiny_net, **options):
    return ConceptTuner(_backbone(tiny_net), CLS, (32, 32), method="cotuning", method_options=options).double()


def _data(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
                                          torch.arange(n) % CLS)


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _loop_relationship(backbone, W, b, ds):
    """For each class y: mean over its images of softmax(W pool(backbone_eval(x)) + b), one image at a time."""
    backbone = copy.deepcopy(backbone).eval()
    rows = []
    with torch.no_grad():
        for cls in range(CLS):
            probs = []
            for x, y in zip(*ds.tensors):
                if int(y) == cls:
                    f = backbone(x[None]).mean((2, 3))[0]
                    probs.append(_softmax([float(W[s] @ f + b[s]) for s in range(KS)]))
            rows.append([sum(p[s] for p in probs) / len(probs) for s in range(KS)])
    return rows


def test_relationship_matches_loop(tiny_net):
    net = _tuner(tiny_net)
    W, b = net.source_head.weight.detach().clone(), net.source_head.bias.detach().clone()
    ds = _data()
    net.prepare(ds, None)
    want = _loop_relationship(net.backbone, W, b, ds)
    for got, row in zip(net.cotuning_relationship.tolist(), want):
        assert got == pytest.approx(row, rel=1e-10)
        assert sum(got) == pytest.approx(1.0)


def test_class_relationship_function():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(11, KS, generator=g, dtype=torch.float64), 1)
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 3, 1, 0, 3, 3])
    got = class_relationship(probs, labels, CLS)
    for cls in range(CLS):
        rows = [probs[i].tolist() for i in range(11) if labels[i] == cls]
        assert got[cls].tolist() == pytest.approx([sum(r[s] for r in rows) / len(rows) for s in range(KS)], rel=1e-12)
    with pytest.raises(ValueError, match=r"classes \[4\] have no training images"):
        class_relationship(probs, labels, CLS + 1)


def test_loss_term_gradient_and_groups(tiny_net):
    lam = 0.7
    net = _tuner(tiny_net, lam=lam)
    net.prepare(_data(), None)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        net.source_head.weight.add_(0.1 * torch.randn(net.source_head.weight.shape, generator=g, dtype=torch.float64))
    views = torch.randn(1, 6, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    net.train()
    feats = copy.deepcopy(net.backbone).train()(views[0]).mean((2, 3)).detach()  # the step's batch statistics
    out = net.step(views, labels)
    W, b, R = net.source_head.weight.detach(), net.source_head.bias.detach(), net.cotuning_relationship
    want, grad_w = 0.0, torch.zeros(KS, 64, dtype=torch.float64)
    for i in range(6):
        z = [float(W[s] @ feats[i] + b[s]) for s in range(KS)]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        want -= sum(float(R[labels[i], s]) * (z[s] - lse) for s in range(KS)) / 6
        p = _softmax(z)  # d/dz of the soft CE: softmax - target (the target sums to 1)
        residual = torch.tensor([p[s] - float(R[labels[i], s]) for s in range(KS)], dtype=torch.float64)
        grad_w += residual[:, None] * feats[i][None] / 6
    assert out["cotuning"].item() == pytest.approx(want, rel=1e-10)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + lam * want, rel=1e-10)
    out["cotuning"].backward()
    torch.testing.assert_close(net.source_head.weight.grad, grad_w, rtol=1e-9, atol=1e-12)
    groups = {g["name"]: g for g in net.param_groups(0.01, 0.1)}
    assert groups["source_head"]["lr"] == pytest.approx(0.001) and groups["heads"]["lr"] == 0.01
    assert {id(p) for p in groups["source_head"]["params"]} == {id(p) for p in net.source_head.parameters()}
    assert not any(id(p) in {id(q) for q in groups["heads"]["params"]} for p in net.source_head.parameters())


def test_errors(tiny_net):
    with pytest.raises(ValueError, match="lam must be"):
        _tuner(tiny_net, lam=-1.0)
    with pytest.raises(ValueError, match=r"source \(ImageNet\) classifier of the backbone 'TinyNet'"):
        ConceptTuner(tiny_net(), CLS, (32, 32), method="cotuning")
    bad = _backbone(tiny_net)
    bad.source_classifier = {"weight": torch.zeros(KS, 63), "bias": torch.zeros(KS)}
    with pytest.raises(ValueError, match=r"not \(K_s, 64\)"):
        ConceptTuner(bad, CLS, (32, 32), method="cotuning")
    with pytest.raises(RuntimeError, match="prepare"):
        _tuner(tiny_net).step(_data().tensors[0][None, :4], torch.arange(4))


def test_random_init_timm_backbone_is_refused():
    from concept_kernels.train import create_backbone

    with pytest.raises(ValueError, match="'tf_efficientnet_lite0'.*--no-pretrained"):
        ConceptTuner(create_backbone("tf_efficientnet_lite0", pretrained=False), CLS, (32, 32), method="cotuning")


def _lite0_file():
    from concept_kernels.train.backbones import lite0_weights_file

    try:
        return lite0_weights_file()
    except RuntimeError as e:
        pytest.skip(f"offline lite0 weights not installed: {e}")


def test_lite0_keeps_its_imagenet_classifier(tmp_path):
    from safetensors.torch import load_file

    from concept_kernels.train import create_backbone, run
    from concept_kernels.train.eval import load_tuner
    from concept_kernels.train.trainer import CHECKPOINT, load_checkpoint

    from concept_kernels.train.backbones import source_classifier

    saved = load_file(str(_lite0_file()))
    torch.manual_seed(0)
    backbone = create_backbone("tf_efficientnet_lite0")
    after_create = torch.get_rng_state()
    src = source_classifier(backbone)  # loaded now, under a forked RNG: the caller's stream is unchanged
    assert torch.equal(torch.get_rng_state(), after_create)
    assert torch.equal(src["weight"], saved["classifier.weight"])
    assert torch.equal(src["bias"], saved["classifier.bias"])
    assert src["weight"].shape == (1000, 1280) and source_classifier(backbone) is src
    assert not any(k.startswith("classifier") for k in backbone.state_dict())  # no classifier in the backbone

    from conftest import tiny_config

    run(tiny_config(tmp_path, method="cotuning", pretrained=True))
    model, cfg = load_tuner(tmp_path / "run")  # rebuilt without pretrained weights: the checkpoint has the head
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)["model"]
    assert torch.equal(model.source_head.weight, state["source_head.weight"])
    assert not torch.equal(state["source_head.weight"], saved["classifier.weight"])  # trained (lr x0.1)
    rel = state["cotuning_relationship"]
    assert rel.shape == (10, 1000) and torch.allclose(rel.sum(1), torch.ones(10, dtype=rel.dtype))
