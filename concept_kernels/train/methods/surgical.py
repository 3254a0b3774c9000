"""surgical fine-tuning (Lee et al. 2023): only the backbone parameters under ``tuner.train_blocks`` (name
prefixes, e.g. ``blocks.0``) train; the rest of the backbone is frozen (its BN statistics still move).

The block is given either as prefixes (``train_blocks``, CLI ``--train-blocks``) or by name (option
``block``, CLI ``--surgical-block``): "first" (input-level shifts), "middle" (feature-level) or "last"
(output-level), resolved for any timm backbone by ``named_blocks.resolve_block``; the resolved prefixes
become ``tuner.train_blocks`` (the start-up summary prints them)."""
from __future__ import annotations

from .base import Method, register, under
from .named_blocks import BLOCKS, resolve_block


@register
class Surgical(Method):
    name = "surgical"
    summary = "only --train-blocks (prefixes) or --surgical-block (first|middle|last) of the backbone train"
    options = dict(block=None)
    config_fields = dict(block="surgical_block")

    def check(self) -> None:
        if self.opts["block"] is not None and self.opts["block"] not in BLOCKS:
            raise ValueError(f"surgical_block must be one of {BLOCKS} (or None: train_blocks), "
                             f"got {self.opts['block']!r}")

    def build(self, tuner) -> None:
        block, blocks = self.opts["block"], tuner.train_blocks
        if block is not None and blocks:
            raise ValueError(f"surgical: give train_blocks {blocks} or surgical_block {block!r}, not both")
        if block is not None:
            blocks = tuner.train_blocks = resolve_block(tuner.backbone, block)
        if not blocks:
            raise ValueError("surgical fine-tuning needs train_blocks, e.g. ('blocks.0', 'blocks.1'), "
                             f"or surgical_block, one of {BLOCKS}")
        names = [n for n, _ in tuner.backbone.named_parameters()]
        for prefix in blocks:
            if not any(under(n, (prefix,)) for n in names):
                raise ValueError(f"train_blocks: no backbone parameter under {prefix!r}; top-level "
                                 f"names: {sorted({n.split('.')[0] for n in names})}")
        for n, p in tuner.backbone.named_parameters():
            p.requires_grad_(under(n, blocks))
