"""The front-door / information-bottleneck branch of Concept-Tuning (method_spec §3.1, §5.7)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float, check_positive, check_same_device
from .attention import DualAttention


class InformationBottleneckHead(nn.Module):
    """DualAttention -> global average pool -> Linear(C, 2L) -> (mu, sigma) -> sample -> Linear(L, Cls).

    sigma = softplus(s[:, L:] - 5) (about 0.0067 at init); z = mu + xi * sigma with fresh
    xi ~ N(0, I) on every call. The published code samples in eval mode too; that is the default
    here (``sample_in_eval=True``); set it False to use z = mu in eval mode.

    Args:
        in_channels: C of the backbone feature map.
        num_classes: output classes.
        latent_dim: L (512 as published).
        reduction: DualAttention's PAM reduction.
        sample_in_eval: draw noise in eval mode as the published code does.

    forward(features (B, C, H, W)) -> (logits (B, num_classes), mu (B, L), sigma (B, L)).
    Submodules: ``encoder`` = Sequential(attention, pool, flatten, linear), ``decoder``.
    """

    def __init__(self, in_channels: int, num_classes: int, latent_dim: int = 512, reduction: int = 8,
                 sample_in_eval: bool = True) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("latent_dim", latent_dim),
                            ("reduction", reduction)):
            check_positive(name, value, integer=True)
        if not isinstance(sample_in_eval, bool):
            raise TypeError(f"sample_in_eval must be a bool, got {type(sample_in_eval).__name__}")
        self.latent_dim = latent_dim
        self.sample_in_eval = sample_in_eval
        self.encoder = nn.Sequential(
            DualAttention(in_channels, reduction),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, 2 * latent_dim),
        )
        self.decoder = nn.Linear(latent_dim, num_classes)

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stats = self.encoder(features)
        mu = stats[:, : self.latent_dim]
        sigma = F.softplus(stats[:, self.latent_dim:] - 5.0, beta=1)
        if self.training or self.sample_in_eval:
            z = mu + torch.randn_like(sigma) * sigma
        else:
            z = mu
        return self.decoder(z), mu, sigma


def information_bottleneck_kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, diag(exp(sigma))^2) || N(0, I) ), summed over dims, averaged over the batch.

    = mean_i Σ_d [ -sigma + (exp(2 sigma) + mu²)/2 - 1/2 ]. The scale is exp(sigma), not sigma: the
    published code's quirk (method_spec §5.7, §9.2), kept so losses match it.

    mu, sigma: (B, L) float. Returns a scalar.
    """
    check_float("mu", mu, ndim=2, shape_doc="(B, L)")
    check_float("sigma", sigma, shape=tuple(mu.shape), shape_doc="(B, L) like mu")
    check_same_device(mu=mu, sigma=sigma)
    per_dim = -sigma + 0.5 * (torch.exp(2.0 * sigma) + mu * mu) - 0.5
    return per_dim.sum(dim=1).mean()
