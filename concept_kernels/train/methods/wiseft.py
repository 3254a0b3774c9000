"""WiSE-FT (Wortsman et al. 2022): fine-tune, then ensemble in weight space with the starting point:

    theta(alpha) = (1 - alpha) theta_0 + alpha theta_ft,   evaluated for each alpha of a sweep at the end.

A classifier has no zero-shot head, so theta_0 = the pretrained backbone + a linear-probe head: before
the first step (``prepare``) the head is fitted on the frozen pretrained backbone's pooled features of
the training images (full-batch L-BFGS on CE + probe_l2/2 ||W||^2, from zero, deterministic), and
fine-tuning (as vanilla) starts from it. theta_0 is kept as ``source_backbone`` / ``source_head`` (in
checkpoints). Every floating-point entry of the backbone's and head's state is interpolated (BN running
statistics too); integer counters are the fine-tuned model's. The sweep's test accuracies go to
``<out>/wise_ft.json`` when the run ends."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import check_number, register
from .source import WithSourceBackbone


def interpolate(tuner, alpha: float):
    """A copy of ``tuner`` whose backbone and head are (1 - alpha) theta_0 + alpha theta_ft."""
    out = copy.deepcopy(tuner)
    for mine, start, ft in ((out.backbone, tuner.source_backbone, tuner.backbone),
                            (out.head, tuner.source_head, tuner.head)):
        s0, s1 = start.state_dict(), ft.state_dict()
        mine.load_state_dict({k: torch.lerp(s0[k], v, alpha) if v.is_floating_point() else v for k, v in s1.items()})
    return out


@torch.no_grad()
def pooled_features(tuner, backbone, dataset, batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) pooled features of ``backbone`` (eval mode) on every image of ``dataset``, and (N,) labels."""
    from ..trainer import batches

    was, device = backbone.training, tuner.head.weight.device
    backbone.eval()
    chunks = [list(range(s, min(len(dataset), s + batch_size))) for s in range(0, len(dataset), batch_size)]
    feats, labels = [], []
    for x, y in batches(dataset, chunks):
        feats.append(tuner.features(backbone, x.to(device, tuner.head.weight.dtype)).mean((2, 3)))
        labels.append(y.to(device))
    backbone.train(was)
    return torch.cat(feats), torch.cat(labels)


def fit_linear_probe(head: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor, l2: float,
                     max_iter: int = 200) -> None:
    """Fit ``head`` in place: minimise mean CE(head(feats), labels) + l2/2 ||W||^2 (full batch, L-BFGS,
    from zero). feats (N, C), labels (N,)."""
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + 0.5 * l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head.zero_grad(set_to_none=True)


@register
class WiSEFT(WithSourceBackbone):
    name = "wiseft"
    summary = "fine-tune from a linear-probe head, then a sweep of weight-space interpolations"
    options = dict(alphas=(0.0, 0.25, 0.5, 0.75, 1.0), probe_l2=1e-3)
    config_fields = dict(alphas="wise_alphas", probe_l2="wise_probe_l2")

    def check(self) -> None:
        alphas = tuple(self.opts["alphas"])
        if not alphas or not all(isinstance(a, (int, float)) and 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"alphas must be numbers in [0, 1], at least one, got {alphas!r}")
        self.opts["alphas"] = alphas
        check_number(self.opts, "probe_l2", 0.0)

    def build(self, tuner) -> None:
        super().build(tuner)  # tuner.source_backbone
        tuner.source_head = copy.deepcopy(tuner.head).requires_grad_(False)

    def prepare(self, tuner, train_set, out_dir) -> None:
        feats, labels = pooled_features(tuner, tuner.source_backbone, train_set)
        fit_linear_probe(tuner.head, feats, labels, self.opts["probe_l2"])
        tuner.source_head.load_state_dict(tuner.head.state_dict())

    def finish(self, tuner, evaluate, out_dir) -> dict:
        sweep = {f"{a:g}": evaluate(interpolate(tuner, a)) for a in self.opts["alphas"]}
        if out_dir is not None:
            (Path(out_dir) / "wise_ft.json").write_text(json.dumps(sweep, indent=1))
        return sweep
