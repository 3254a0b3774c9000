"""BSS, Batch Spectral Shrinkage (Chen et al. 2019): shrink the smallest singular values of the batch's
pooled features F (B, d), which carry the pretrained knowledge least transferable to the new task.

    loss = CE + eta * bss,  bss = sum of the k smallest sigma_i^2,  sigma = singular values of F
                                  (min(B, d) of them; torch.linalg.svdvals works on the small side).

Defaults k = 1, eta = 0.001."""
from __future__ import annotations

import torch

from .base import Method, check_number, register


def smallest_squared_singular_values(features: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the k smallest squared singular values of features (B, d); needs k <= min(B, d)."""
    if features.dim() != 2:
        raise ValueError(f"features must be (B, d), got shape {tuple(features.shape)}")
    if not 1 <= k <= min(features.shape):
        raise ValueError(f"k (bss_k) must be in [1, min(B, d)] = [1, {min(features.shape)}] for features of "
                         f"shape {tuple(features.shape)}, got {k}")
    sigma = torch.linalg.svdvals(features)  # descending
    return sigma[-k:].pow(2).sum()


@register
class BSS(Method):
    name = "bss"
    summary = "CE + eta * sum of the k smallest squared singular values of the batch features"
    options = dict(eta=1e-3, k=1)
    config_fields = dict(eta="bss_eta", k="bss_k")

    def check(self) -> None:
        check_number(self.opts, "eta", 0.0)
        k = self.opts["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")

    def weights(self) -> dict[str, float]:
        return dict(bss=self.opts["eta"])

    def loss_terms(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        return dict(bss=smallest_squared_singular_values(f0.mean((2, 3)), self.opts["k"]))
