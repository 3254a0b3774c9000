"""AFT, Adaptive Feature Transfer (Qiu et al., ICML 2024): make the batch's kernel of the fine-tuned
features match that of the frozen pretrained features, each pretrained feature weighted by a learned scale
so that the features useless for the task can be ignored:

    loss = CE + beta * aft,   aft = RMSE(K - K_t) = sqrt(1/B^2 sum_{i,j} (K_ij - K_t,ij)^2),
    K   = U U^T,   U   = rownorm(centre(f)),                   f   (B, C): pooled features of view 0,
    K_t = V V^T,   V   = rownorm(centre(f0 * sigmoid(s))),     f0  (B, C): the frozen pretrained copy's,
    centre(x) = x - mean_b x_b  (over the batch, per feature),   rownorm(x)_b = x_b / ||x_b||.

Choices (the spec says "centred and L2-normalised per sample"):
* centring is over the batch (each feature's batch mean removed: the centring of a kernel / CKA); then
  each sample's vector is scaled to unit L2 norm, so K and K_t are cosine similarities (diagonal 1);
  scaling each feature commutes with centring, so centre(f0) * sigmoid(s) is the same V;
* teacher: ``tuner.source_backbone`` (``source.py``), the fine-tuned backbone's own pretrained weights
  (the paper uses larger DINOv2 / CLIP teachers, not available offline), no graph, its batch norms on
  the batch's statistics as the fine-tuned backbone's in training (``source.py``);
* s (C,) is ``tuner.aft_scale`` (a state_dict entry, saved and resumed with the optimizer state), zero at
  the start (sigmoid 1/2 for all: a uniform scale, which the row norm removes, so K_t starts as the plain
  pretrained kernel), trained jointly with the model in its own optimizer group at the heads' lr (the
  full --lr) without weight decay (decay would pull every feature's weight towards 1/2);
* the gradient of sqrt at a zero mean square (K = K_t exactly, e.g. a BN-free backbone at step 0) is
  taken as 0, a subgradient of the norm there, not NaN;
* beta = 10 (the spec's order of magnitude); batches need >= 3 images (with 2, centred features are
  +-v and both kernels are [[1, -1], [-1, 1]] whatever the features)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_number, register
from .source import WithSourceBackbone, source_pooled_features

MIN_BATCH = 3


def centred_cosine_kernel(x: torch.Tensor) -> torch.Tensor:
    """(B, d) -> (B, B): U U^T with U = x minus its batch mean, each row scaled to unit L2 norm (a row
    that centres to zero stays zero). Half-precision input (--amp) is computed in float32, outside
    autocast: the term is a small difference of two kernels whose entries are O(1)."""
    if x.dim() != 2:
        raise ValueError(f"features must be (B, d), got shape {tuple(x.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        u = F.normalize(x - x.mean(0, keepdim=True), dim=1)
        return u @ u.T


def kernel_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(mean((a - b)^2)) of two (B, B) kernels, with gradient 0 (not NaN) where a == b everywhere; a NaN
    in either gives NaN."""
    ms = (a - b).pow(2).mean()
    return torch.where(ms == 0, torch.zeros_like(ms), ms.clamp_min(torch.finfo(ms.dtype).tiny).sqrt())


@register
class AFT(WithSourceBackbone):
    name = "aft"
    summary = "CE + beta * RMSE between the batch kernels of the features and of the frozen pretrained " \
              "features scaled by a learned sigmoid(s)"
    options = dict(beta=10.0)
    config_fields = dict(beta="aft_beta")

    def check(self) -> None:
        check_number(self.opts, "beta", 0.0)

    def build(self, tuner) -> None:
        super().build(tuner)
        w = tuner.head.weight
        tuner.aft_scale = nn.Parameter(torch.zeros(w.shape[1], device=w.device, dtype=w.dtype))

    def weights(self) -> dict[str, float]:
        return dict(aft=self.opts["beta"])

    def loss_terms(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        if f0.shape[0] < MIN_BATCH:
            raise ValueError(f"aft needs batches of >= {MIN_BATCH} images (its kernels are over the batch), "
                             f"got {f0.shape[0]}")
        target = source_pooled_features(tuner, views[0]) * torch.sigmoid(tuner.aft_scale)
        return dict(aft=kernel_rmse(centred_cosine_kernel(f0.mean((2, 3))), centred_cosine_kernel(target)))

    def param_groups(self, tuner, lr: float, backbone_mult: float) -> list[dict]:
        *groups, heads = super().param_groups(tuner, lr, backbone_mult)  # (heads last: the lr the trainer logs)
        return [*groups, dict(params=[tuner.aft_scale], lr=lr, weight_decay=0.0, name="aft_scale"), heads]
