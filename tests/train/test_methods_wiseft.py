"""WiSE-FT: the interpolated weights against a float64 transcription of (1 - a) theta_0 + a theta_ft, the
linear probe (theta_0's head) against the optimality condition of its objective computed independently,
and a trainer run that writes the sweep."""
import json

import pytest
import torch

from concept_kernels.train import ConceptTuner
from concept_kernels.train.methods.wiseft import fit_linear_probe, interpolate

CLS = 5


def _tuner(tiny_net, **options):
    torch.manual_seed(0)
    return ConceptTuner(tiny_net(), CLS, (32, 32), method="wiseft", method_options=options).double()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_interpolated_weights(tiny_net, alpha):
    net = _tuner(tiny_net)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # theta_ft != theta_0 everywhere, BN running stats included
        for t in [*net.backbone.state_dict().values(), *net.head.state_dict().values()]:
            if t.is_floating_point():
                t.add_(0.5 * torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.1)
    mixed = interpolate(net, alpha)
    for part, start in (("backbone", net.source_backbone), ("head", net.source_head)):
        s0, s1, got = start.state_dict(), getattr(net, part).state_dict(), getattr(mixed, part).state_dict()
        for k in s1:
            want = s1[k] if not s1[k].is_floating_point() else [(1 - alpha) * a + alpha * b for a, b in
                                                                zip(s0[k].flatten().tolist(), s1[k].flatten().tolist())]
            got_k = got[k] if not s1[k].is_floating_point() else got[k].flatten().tolist()
            assert got_k == pytest.approx(want, rel=1e-12, abs=1e-15) if isinstance(want, list) \
                else torch.equal(got_k, want), (part, k)
    assert interpolate(net, 1.0).state_dict().keys() == net.state_dict().keys()


def test_linear_probe_is_optimal():
    """At the fitted head, the gradient of mean CE + l2/2 ||W||^2, written out (softmax - onehot), is ~0."""
    g = torch.Generator().manual_seed(2)
    feats, labels, l2 = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randint(4, (30,), generator=g), 0.01
    head = torch.nn.Linear(8, 4).double()
    fit_linear_probe(head, feats, labels, l2)
    W, b = head.weight.detach(), head.bias.detach()
    z = feats @ W.T + b
    prob = torch.exp(z - z.max(1, keepdim=True).values)
    prob = prob / prob.sum(1, keepdim=True)
    residual = (prob - torch.nn.functional.one_hot(labels, 4)) / len(labels)
    grad_w, grad_b = residual.T @ feats + l2 * W, residual.sum(0)
    assert grad_w.abs().max() < 1e-6 and grad_b.abs().max() < 1e-6
    assert W.abs().max() > 1e-2  # it moved from zero


def test_trainer_runs_the_sweep(tmp_path):
    from conftest import tiny_config

    from concept_kernels.train import run
    from concept_kernels.train.trainer import CHECKPOINT, load_checkpoint

    cfg = tiny_config(tmp_path, method="wiseft", wise_alphas=(0.0, 0.5, 1.0))
    history = run(cfg)
    sweep = json.loads((tmp_path / "run" / "wise_ft.json").read_text())
    assert list(sweep) == ["0", "0.5", "1"]
    assert sweep["1"]["acc_main"] == pytest.approx(history[-1]["acc_main"])  # alpha 1: the fine-tuned model
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)["model"]
    assert not torch.equal(state["source_head.weight"], torch.zeros_like(state["source_head.weight"]))  # the probe
    assert not torch.equal(state["source_head.weight"], state["head.weight"])  # fine-tuning moved on from it
