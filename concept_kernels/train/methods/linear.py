"""linear probe: the backbone is frozen, parameters and BN running statistics (always in eval mode)."""
from __future__ import annotations

from .base import Method, register


@register
class LinearProbe(Method):
    name = "linear"
    summary = "frozen backbone (BN statistics too), only the head trains"

    def build(self, tuner) -> None:
        tuner.backbone.requires_grad_(False)

    def train_mode(self, tuner, mode: bool) -> None:
        tuner.backbone.eval()  # fixed features, BN running stats included
