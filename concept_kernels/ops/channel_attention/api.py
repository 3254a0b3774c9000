"""Public entry point of ``channel_attention``: documentation, validation and backend dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _backends
from ..._checks import check_same_device
from .._common import check_feature_map, check_gamma
from .reference import channel_attention_ref

OP = "channel_attention"

_backends.register(OP, _backends.Backend("reference", impl=channel_attention_ref))


def channel_attention(x: torch.Tensor, gamma: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    r"""DANet channel attention (CAM) with a residual: ``gamma * softmax(rowmax(E) - E) @ X + x``.

    With X = x.view(B, C, N) (N = H·W) and the channel Gram matrix E = X Xᵀ (B, C, C), each channel
    attends to the channels *least* similar to it (max-minus-energy, method_spec §3.2). Since a
    softmax is shift-invariant, softmax(rowmax(E) - E) = softmax(-E): this is attention with the C
    channels as tokens and the N positions as the head dimension; fused backends never build E.

    Args:
        x: (B, C, H, W) float16/bfloat16/float32/float64 (any strides, channels-last included).
        gamma: one-element tensor, shape () or (1,), the learnable residual scale (0 at init).
        backend: force a backend; None = fastest available (``CONCEPT_KERNELS_BACKEND`` honoured).

    Returns:
        (B, C, H, W) in x's dtype. Gradients flow to x and gamma.

    Example:
        >>> x = torch.randn(2, 64, 7, 7)
        >>> channel_attention(x, torch.zeros(1)).equal(x)
        True
    """
    check_feature_map(x)
    check_gamma(gamma)
    check_same_device(x=x, gamma=gamma)
    impl = _backends.select(OP, x.device, backend)
    if impl.name == "reference":
        return channel_attention_ref(x, gamma)
    return impl.impl(x, gamma)  # pragma: no cover - fused backends land later
