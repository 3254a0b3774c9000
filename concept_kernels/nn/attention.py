"""DANet attention modules built on the fused ops (method_spec §3.2).

State-dict keys match the published DANet module, so its checkpoints load unchanged:

===========================  ===================  =========================================
key                          shape                meaning
===========================  ===================  =========================================
``sa.query_conv.weight``     (C/r, C, 1, 1)       PAM query projection
``sa.query_conv.bias``       (C/r,)
``sa.key_conv.weight``       (C/r, C, 1, 1)       PAM key projection
``sa.key_conv.bias``         (C/r,)
``sa.value_conv.weight``     (C, C, 1, 1)         PAM value projection
``sa.value_conv.bias``       (C,)
``sa.gamma``                 (1,)                 PAM residual scale, 0 at init
``sc.gamma``                 (1,)                 CAM residual scale, 0 at init
===========================  ===================  =========================================
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_positive
from ..ops import channel_attention, position_attention


class ChannelAttention(nn.Module):
    """CAM: ``gamma * softmax(rowmax(E) - E) @ X + x`` over channels; gamma (1,) starts at 0.

    Input and output (B, C, H, W).
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_attention(x, self.gamma)


class PositionAttention(nn.Module):
    """PAM: attention over the H*W positions with 1x1-conv projections to C//reduction (query,
    key) and C (value); ``gamma * out + x``, gamma (1,) starts at 0. Input and output (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        check_positive("channels", channels, integer=True)
        check_positive("reduction", reduction, integer=True)
        if channels // reduction < 1:
            raise ValueError(
                f"channels // reduction must be >= 1, got channels={channels}, reduction={reduction}"
            )
        inner = channels // reduction
        self.query_conv = nn.Conv2d(channels, inner, kernel_size=1)
        self.key_conv = nn.Conv2d(channels, inner, kernel_size=1)
        self.value_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.value_conv.in_channels
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != C:
            raise ValueError(f"x must have {C} channels (B, {C}, H, W) for this module (channels={C}), "
                             f"got shape {tuple(x.shape)}")
        return position_attention(
            x,
            self.query_conv.weight.flatten(1), self.query_conv.bias,
            self.key_conv.weight.flatten(1), self.key_conv.bias,
            self.value_conv.weight.flatten(1), self.value_conv.bias,
            self.gamma,
        )


class DualAttention(nn.Module):
    """DANet as used by Concept-Tuning: ``PAM(x) + CAM(x)`` (a sum, so ``2x`` at init).

    Args:
        channels: C of the (B, C, H, W) input.
        reduction: PAM query/key width is C // reduction (8 as published).
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        check_positive("channels", channels, integer=True)
        check_positive("reduction", reduction, integer=True)
        self.sa = PositionAttention(channels, reduction)
        self.sc = ChannelAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sa(x) + self.sc(x)
