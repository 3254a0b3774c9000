"""surgical fine-tuning (Lee et al. 2023): only the backbone parameters under ``tuner.train_blocks`` (name
prefixes, e.g. ``blocks.0``) train; the rest of the backbone is frozen (its BN statistics still move)."""
from __future__ import annotations

from .base import Method, register, under


@register
class Surgical(Method):
    name = "surgical"
    summary = "only --train-blocks of the backbone train"

    def build(self, tuner) -> None:
        blocks = tuner.train_blocks
        if not blocks:
            raise ValueError("surgical fine-tuning needs train_blocks, e.g. ('blocks.0', 'blocks.1')")
        names = [n for n, _ in tuner.backbone.named_parameters()]
        for prefix in blocks:
            if not any(under(n, (prefix,)) for n in names):
                raise ValueError(f"train_blocks: no backbone parameter under {prefix!r}; top-level "
                                 f"names: {sorted({n.split('.')[0] for n in names})}")
        for n, p in tuner.backbone.named_parameters():
            p.requires_grad_(under(n, blocks))
