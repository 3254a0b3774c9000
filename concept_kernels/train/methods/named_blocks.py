"""Surgical fine-tuning's blocks by name (Lee et al. 2023): "first" (input-level shifts), "middle"
(feature-level) and "last" (output-level), resolved to parameter-name prefixes of any timm backbone.

The backbone's own coarse parameter groups (timm's ``group_matcher(coarse=True)``, in forward order: the
stem, then one group per stage, e.g. EfficientNet ``blocks.0`` ... ``blocks.6`` (+ conv_head/bn2),
ResNet ``layer1`` ... ``layer4``, ViT ``blocks.0`` ... ``blocks.11`` (+ norm)) define the blocks: a trailing
group of only 1-D parameters (a final norm, e.g. ConvNeXt's ``head.norm``) joins the stage before it. With
stages S_1..S_k after the stem:

    first = stem + S_1,   middle = S_{k//2 + 1} (the middle stage; the upper one for even k),   last = S_k.

The new linear head always trains (it is not part of the backbone).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import under

BLOCKS = ("first", "middle", "last")


def stage_groups(backbone: nn.Module) -> list[list[str]]:
    """The backbone's parameter names in coarse groups, forward order: [stem, S_1, ..., S_k]."""
    matcher = getattr(backbone, "group_matcher", None)
    if not callable(matcher):
        raise ValueError(f"surgical_block needs a timm backbone with group_matcher() (its stem and stages); "
                         f"{type(backbone).__name__} has none: give train_blocks (parameter-name prefixes) instead")
    from ..._compat import import_timm

    import_timm()
    from timm.models import group_parameters

    shapes = {n: p.ndim for n, p in backbone.named_parameters()}
    groups = [list(names) for _, names in sorted(group_parameters(backbone, matcher(coarse=True)).items())]
    if len(groups) > 2 and all(shapes[n] <= 1 for n in groups[-1]):
        groups[-2:] = [groups[-2] + groups[-1]]
    if len(groups) < 2:
        raise ValueError(f"surgical_block: {type(backbone).__name__} has {len(groups)} parameter group(s), "
                         "needs a stem and at least one stage: give train_blocks instead")
    return groups


def module_prefixes(names: Sequence[str], all_names: Sequence[str]) -> tuple[str, ...]:
    """The shortest module prefixes that cover exactly ``names`` among ``all_names`` (``layer1``, not
    ``layer1.0`` and ``layer1.1``; ``blocks.3`` when ``blocks`` also holds other stages), in order."""
    chosen, group = [], set(names)
    for n in names:
        parts = n.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if all(m in group for m in all_names if under(m, (prefix,))):
                break
        if prefix not in chosen:
            chosen.append(prefix)
    return tuple(chosen)


def resolve_block(backbone: nn.Module, block: str) -> tuple[str, ...]:
    """Parameter-name prefixes of the backbone's ``block`` ("first", "middle" or "last", module docstring)."""
    if block not in BLOCKS:
        raise ValueError(f"surgical_block must be one of {BLOCKS}, got {block!r}")
    groups = stage_groups(backbone)
    stem, stages = groups[0], groups[1:]
    chosen = {"first": stem + stages[0], "middle": stages[len(stages) // 2], "last": stages[-1]}[block]
    return module_prefixes(chosen, [n for n, _ in backbone.named_parameters()])
