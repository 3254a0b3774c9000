"""Bi-Tuning's image-level part (Zhong et al. 2020) as this project runs it: CE + the supervised
image-level contrastive loss of view 0's unit logits against the momentum key encoder's key of view 1
and the per-class queue of K keys (temperature T), the same term Concept-Tuning uses (method_spec §4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import concept_kernels as ck

from . import key_encoder
from .base import Method, register


@register
class BiTuning(Method):
    name = "bituning"
    summary = "CE + image-level contrastive against a momentum key encoder and class queues"

    def num_views(self, tuner) -> int:
        return 2  # view 0: query, view 1: key

    def build(self, tuner) -> None:
        key_encoder.add_key_encoder(tuner, queue_patches=1)  # a 1-patch concept queue (unused)

    def loss_terms(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            key_encoder.momentum_update(tuner)
            z_k = F.normalize(key_encoder.key_pass(tuner, views[1])[1], dim=1)
        queue_z, _ = tuner.queues.snapshot()
        img = ck.image_contrastive_loss(F.normalize(logits, dim=1), z_k, queue_z, labels,
                                        temperature=tuner.temperature)
        key_encoder.enqueue(tuner, z_k, z_k[:, None].expand(labels.shape[0], 1, -1), labels)
        return dict(img=img)
