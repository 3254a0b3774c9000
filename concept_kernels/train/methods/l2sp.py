"""L2-SP (Li et al. 2018): keep the backbone near its pretrained weights w0 (the starting point).

    loss = CE + a * sp + b * l2_head,  sp = 1/2 sum_i ||w_i - w0_i||^2 over every backbone parameter,
                                       l2_head = 1/2 sum ||p||^2 over the new head's weight and bias,

with no weight decay on either (it would pull towards 0, not w0). Defaults a = b = 0.01 (TLlib's delta.py).
w0 is a frozen copy of the backbone at construction (``tuner.source_backbone``, saved in checkpoints, so
a model rebuilt from one keeps the w0 it trained with; ``source.py``). ``l1sp.py`` is the same method
with the L1 distance."""
from __future__ import annotations

import torch

from .base import check_number, register
from .source import WithSourceBackbone, add_source_backbone  # noqa: F401  (re-exported for older imports)


def head_l2(tuner) -> torch.Tensor:
    """1/2 sum ||p||^2 over the head's parameters (weight and bias)."""
    return sum(0.5 * p.pow(2).sum() for p in tuner.head.parameters())


def without_weight_decay(groups: list[dict]) -> list[dict]:
    return [dict(g, weight_decay=0.0) for g in groups]


@register
class L2SP(WithSourceBackbone):
    name = "l2sp"
    summary = "CE + a/2 ||w - w0||^2 (backbone) + b/2 ||w_head||^2, no weight decay"
    options = dict(alpha=0.01, beta=0.01)
    config_fields = dict(alpha="l2sp_alpha", beta="l2sp_beta")
    term = "l2sp"  # the name of the distance's loss part (metrics: train_<term>)

    @staticmethod
    def distance(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """The penalty of one parameter tensor w at its pretrained value w0 (same shape): 1/2 ||w - w0||^2."""
        return 0.5 * (w - w0).pow(2).sum()

    def check(self) -> None:
        check_number(self.opts, "alpha", 0.0)
        check_number(self.opts, "beta", 0.0)

    def weights(self) -> dict[str, float]:
        return {self.term: self.opts["alpha"], "l2_head": self.opts["beta"]}

    def loss_terms(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        sp = sum(self.distance(w, w0)
                 for w, w0 in zip(tuner.backbone.parameters(), tuner.source_backbone.parameters()))
        return {self.term: sp, "l2_head": head_l2(tuner)}

    def param_groups(self, tuner, lr: float, backbone_mult: float) -> list[dict]:
        return without_weight_decay(super().param_groups(tuner, lr, backbone_mult))
