"""Reference ``position_attention``: the DANet position-attention (PAM) module, method_spec §3.2.

The three 1x1 projections run as ONE matmul with concatenated weights ([wq; wk; wv] is
(2C'+C) x C), which is where >97% of PAM's FLOPs are (performance_notes §1.1); the N x N attention
is tiny. No 1/sqrt(d) scaling, as published.
"""
from __future__ import annotations

import torch

from ..._checks import compute_dtype


def position_attention_ref(
    x: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """out = gamma * V softmax_keys(Qᵀ K)ᵀ + x.

    x (B, C, H, W); wq, wk (C', C); bq, bk (C',); wv (C, C); bv (C,); gamma () or (1,).
    Q = wq X + bq, K = wk X + bk (C', N); V = wv X + bv (C, N). Returns x's dtype.
    """
    B, C, H, W = x.shape
    c_qk = wq.shape[0]
    cdt = compute_dtype(x.dtype)
    X = x.reshape(B, C, H * W).to(cdt)
    weight = torch.cat([wq, wk, wv]).to(cdt)  # (2C'+C, C)
    bias = torch.cat([bq, bk, bv]).to(cdt)
    qkv = torch.matmul(weight, X) + bias[:, None]  # (B, 2C'+C, N)
    q, k, v = qkv.split([c_qk, c_qk, C], dim=1)
    energy = torch.bmm(q.transpose(1, 2), k)  # (B, N, N): query position n vs key position n'
    attention = torch.softmax(energy, dim=-1)
    out = torch.bmm(v, attention.transpose(1, 2)).reshape(B, C, H, W)
    return (gamma.to(cdt).reshape(()) * out + x.to(cdt)).to(x.dtype)
