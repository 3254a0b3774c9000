"""The frozen pretrained backbone that several methods compare against: L2-SP / L1-SP pull the weights
towards it, feature distillation and AFT match its features, WiSE-FT interpolates with it.

It is a copy of the backbone taken when the method is built (the pretrained weights: ``ConceptTuner``
builds its method before any step), kept as ``tuner.source_backbone``: a state_dict entry, so a checkpoint
holds it (the backbone's size once more) and a model rebuilt from a checkpoint (``train.eval.load_tuner``
creates the backbone WITHOUT pretrained weights) keeps the source it trained with. It never trains: no
parameter requires grad, none is in an optimizer group, and it stays in eval mode (BN running statistics
fixed) whatever ``tuner.train(mode)`` says.

Its features (``source_pooled_features``, the teacher of feature distillation and AFT) are computed the
way the fine-tuned backbone computes its own: while the tuner trains, its batch norms normalise with the
batch's statistics (their running statistics neither used nor updated; every other layer, e.g. dropout,
stays in eval mode), so at the first step both feature sets are equal and the terms measure how far the
fine-tuned weights moved, not the train/eval gap of batch norm. That gap is large on a new domain:
on one batch of 16 built-in digits (``Config(image_size=64)``: EfficientNet-Lite0, ImageNet weights), the
pooled features' mean square is 0.36, their MSE to the same network with running statistics 2.41."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .base import Method


def add_source_backbone(tuner) -> None:
    """tuner.source_backbone: a frozen copy of the backbone as it is now (the pretrained weights), in
    eval mode for good (BN running statistics fixed)."""
    tuner.source_backbone = copy.deepcopy(tuner.backbone).requires_grad_(False).eval()


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Within: the batch norms of ``module`` normalise with each batch's statistics and leave their running
    statistics (and counters) untouched; the other layers keep their mode."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, (training, track) in zip(norms, saved):
            m.training, m.track_running_stats = training, track


@torch.no_grad()
def source_pooled_features(tuner, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C): the frozen pretrained backbone's spatially averaged feature map on x, no
    graph; while ``tuner`` trains, with batch-statistics batch norms (as the fine-tuned backbone's)."""
    if not tuner.training:
        return tuner.features(tuner.source_backbone, x).mean((2, 3))
    with batch_statistics(tuner.source_backbone):
        return tuner.features(tuner.source_backbone, x).mean((2, 3))


class WithSourceBackbone(Method):
    """A method that keeps the frozen pretrained backbone (``tuner.source_backbone``) next to the one it
    fine-tunes; subclasses add their loss terms."""

    def build(self, tuner) -> None:
        add_source_backbone(tuner)

    def train_mode(self, tuner, mode: bool) -> None:
        tuner.source_backbone.eval()
