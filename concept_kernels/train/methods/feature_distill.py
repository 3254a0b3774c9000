"""Feature distillation to the frozen pretrained backbone, the feature-space "feature protection" of
Tan et al. (2024) (who find it, with WiSE-FT, keeps out-of-distribution accuracy best):

    loss = CE + lam * distill,  distill = 1/(B C) sum_{b, c} (f_bc - f0_bc)^2,

f (B, C): the fine-tuned backbone's pooled (spatially averaged) features of view 0, the ones the head
sees; f0 (B, C): the frozen pretrained copy's pooled features of the same images, without a graph (the
gradient reaches the fine-tuned backbone only), its batch norms on the batch's statistics as the
fine-tuned backbone's in training (``source.py``: otherwise a BN backbone's term would start large and
measure the train/eval gap of batch norm, not drift; 0 at the first step this way).
The mean over the B x C entries keeps the term's scale independent of the batch and the feature width.
Default lam = 1 (not tuned: Tan et al. tune the weight per task). Weight decay: the trainer's, as vanilla.

The teacher is ``tuner.source_backbone`` (``source.py``): a state_dict entry, so a checkpoint (and
--resume) carries it; a model rebuilt from a checkpoint gets it from there, not from pretrained
weights. It costs one more forward (no backward) per step and the backbone's size once more in
checkpoints."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import check_number, register
from .source import WithSourceBackbone, source_pooled_features


@register
class FeatureDistill(WithSourceBackbone):
    name = "feature_distill"
    summary = "CE + lam * MSE(pooled features, those of the frozen pretrained backbone)"
    options = dict(weight=1.0)
    config_fields = dict(weight="feature_distill_weight")

    def check(self) -> None:
        check_number(self.opts, "weight", 0.0)

    def weights(self) -> dict[str, float]:
        return dict(distill=self.opts["weight"])

    def loss_terms(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        return dict(distill=F.mse_loss(f0.mean((2, 3)), source_pooled_features(tuner, views[0])))
