"""The frozen pretrained backbone that several methods compare against: L2-SP / L1-SP pull the weights
towards it, feature distillation and AFT match its features, WiSE-FT interpolates with it.

It is a copy of the backbone taken when the method is built (the pretrained weights: ``ConceptTuner``
builds its method before any step), kept as ``tuner.source_backbone``: a state_dict entry, so a checkpoint
holds it (the backbone's size once more) and a model rebuilt from a checkpoint (``train.eval.load_tuner``
creates the backbone WITHOUT pretrained weights) keeps the source it trained with. It never trains: no
parameter requires grad, none is in an optimizer group, and it stays in eval mode (BN running statistics
fixed, its forward uses them) whatever ``tuner.train(mode)`` says."""
from __future__ import annotations

import copy

import torch

from .base import Method


def add_source_backbone(tuner) -> None:
    """tuner.source_backbone: a frozen copy of the backbone as it is now (the pretrained weights), in
    eval mode for good (BN running statistics fixed)."""
    tuner.source_backbone = copy.deepcopy(tuner.backbone).requires_grad_(False).eval()


@torch.no_grad()
def source_pooled_features(tuner, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C): the frozen pretrained backbone's spatially averaged feature map on x
    (eval mode, no graph)."""
    return tuner.features(tuner.source_backbone, x).mean((2, 3))


class WithSourceBackbone(Method):
    """A method that keeps the frozen pretrained backbone (``tuner.source_backbone``) next to the one it
    fine-tunes; subclasses add their loss terms."""

    def build(self, tuner) -> None:
        add_source_backbone(tuner)

    def train_mode(self, tuner, mode: bool) -> None:
        tuner.source_backbone.eval()
