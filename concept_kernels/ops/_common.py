"""Validation pieces shared by the attention ops."""
from __future__ import annotations

import torch

from .._checks import check_float


def check_gamma(gamma: torch.Tensor) -> None:
    """gamma is a one-element float tensor of shape () or (1,)."""
    check_float("gamma", gamma)
    if gamma.shape not in (torch.Size([]), torch.Size([1])):
        raise ValueError(f"gamma must have shape () or (1,), got {tuple(gamma.shape)}")


def check_feature_map(x: torch.Tensor) -> None:
    """x is a float (B, C, H, W) map with C >= 1 and H*W >= 1 (B may be 0)."""
    check_float("x", x, ndim=4, shape_doc="(B, C, H, W)", allow_empty=True)
    if x.shape[1] == 0 or x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x must have C >= 1 channels and H*W >= 1 positions (B, C, H, W), got {tuple(x.shape)}")
