"""vanilla (ERM): cross-entropy on the new head, the backbone at lr x backbone_mult (0.1 as published)."""
from __future__ import annotations

from .base import Method, register


@register
class Vanilla(Method):
    name = "vanilla"
    summary = "cross-entropy only (backbone at lr x --backbone-lr-mult)"
