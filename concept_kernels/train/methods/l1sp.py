"""L1-SP: L2-SP (``l2sp.py``) with the L1 distance to the pretrained weights w0, one of the weight-space
"feature protection" regularizers that Tan et al. (2024) compare:

    loss = CE + a * sp + b * l2_head,  sp = sum_i ||w_i - w0_i||_1 over every backbone parameter,
                                       l2_head = 1/2 sum ||p||^2 over the new head's weight and bias,

with no weight decay on either (as L2-SP: decay would pull towards 0, not w0). The head term is kept for
parity with ``l2sp`` (the new head has no pretrained value to stay near; --l1sp-beta 0 drops it). The
gradient of |w - w0| is a * sign(w - w0), 0 where w = w0 (torch's subgradient: at the first step the
term exerts no force). Default a = 1e-4, smaller than L2-SP's 0.01 because the pull does not fade near
w0: each backbone weight moves only where |dCE/dw| exceeds a (not tuned; Tan et al. tune it per task);
b = 0.01 as L2-SP. w0: the frozen ``tuner.source_backbone`` (``source.py``)."""
from __future__ import annotations

import torch

from .base import register
from .l2sp import L2SP


@register
class L1SP(L2SP):
    name = "l1sp"
    summary = "CE + a ||w - w0||_1 (backbone) + b/2 ||w_head||^2, no weight decay"
    options = dict(alpha=1e-4, beta=0.01)
    config_fields = dict(alpha="l1sp_alpha", beta="l1sp_beta")
    term = "l1sp"

    @staticmethod
    def distance(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """||w - w0||_1 of one parameter tensor (w, w0 of the same shape)."""
        return (w - w0).abs().sum()
