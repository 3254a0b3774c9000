"""Reference ``channel_attention``: the eager DANet channel-attention (CAM) form, method_spec §3.2.

It materialises the B x C x C energy matrix exactly as the published module does (max-minus-energy,
softmax, bmm). That is the specification and the baseline the fused backends are measured against;
it is not the fast path.
"""
from __future__ import annotations

import torch

from ..._checks import compute_dtype


def channel_attention_ref(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """out = gamma * softmax(rowmax(E) - E) @ X + x with X = x.view(B, C, N), E = X Xᵀ.

    x (B, C, H, W), gamma () or (1,). Computes in float32 (float64 stays float64) and returns
    x's dtype.
    """
    B, C, H, W = x.shape
    cdt = compute_dtype(x.dtype)
    X = x.reshape(B, C, H * W).to(cdt)
    energy = torch.bmm(X, X.transpose(1, 2))  # (B, C, C)
    energy_new = energy.amax(dim=-1, keepdim=True).expand_as(energy) - energy
    attention = torch.softmax(energy_new, dim=-1)
    out = torch.bmm(attention, X).reshape(B, C, H, W)
    return (gamma.to(cdt).reshape(()) * out + x.to(cdt)).to(x.dtype)
