"""Public entry point of ``channel_attention``: documentation, validation and backend dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _backends
from ..._checks import check_same_device
from .._common import check_feature_map, check_gamma
from . import cpu_impl
from .function import channel_attention_fused
from .reference import channel_attention_ref

OP = "channel_attention"

# Priority order: triton (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 and explicitly),
# cpu (CPU tensors: the C++ symmetric kernel, or PyTorch's CPU flash op when CONCEPT_KERNELS_CAM_CPU=aten;
# unavailable without the extension unless that is set), reference (anything) last.
_backends.register(OP, _backends.Backend("triton", impl="triton", available=_backends.triton_missing,
                                         unsupported=_backends.triton_unsupported))
_backends.register(OP, _backends.Backend("cpu", impl="cpu", available=cpu_impl.unavailable,
                                         unsupported=_backends.cpu_only, detail=cpu_impl.describe))
_backends.register(OP, _backends.Backend("reference", impl=channel_attention_ref))


def channel_attention(x: torch.Tensor, gamma: torch.Tensor, *, backend: Optional[str] = None,
                      input_precision: str = "ieee") -> torch.Tensor:
    r"""DANet channel attention (CAM) with a residual: ``gamma * softmax(rowmax(E) - E) @ X + x``.

    With X = x.view(B, C, N) (N = H·W) and the channel Gram matrix E = X Xᵀ (B, C, C), each channel
    attends to the channels *least* similar to it (max-minus-energy, method_spec §3.2). Since a
    softmax is shift-invariant, softmax(rowmax(E) - E) = softmax(-E): this is attention with the C
    channels as tokens and the N positions as the head dimension; fused backends never build E.

    Args:
        x: (B, C, H, W) float16/bfloat16/float32/float64 (any strides, channels-last included).
        gamma: one-element tensor, shape () or (1,), the learnable residual scale (0 at init).
        backend: force a backend; None = fastest available (``CONCEPT_KERNELS_BACKEND`` honoured).
        input_precision: dot precision of the triton backend for float32 inputs: "ieee" (default)
            or "tf32x3" (near-fp32, faster on tensor cores). Plain "tf32" is refused: unscaled
            energies reach the hundreds and TF32 perturbs them by 0.1-1. Ignored by other backends.

    Backends (auto order): ``triton`` (CUDA tensors: flash-style fused kernel, saves O and the
    per-row logsumexp, backward recomputes), ``cpu`` (CPU tensors: C++ kernel that walks each pair
    of 32-channel tiles once, since S = -X Xᵀ is symmetric: 1.5 GEMMs per tile forward, 3.5
    backward, against flash attention's 2 and 5; needs the extension, or
    ``CONCEPT_KERNELS_CAM_CPU=aten`` for PyTorch's CPU flash kernel), ``reference`` (eager DANet
    form, builds B x C x C). The fused backends share one autograd (function.py) and never build
    a C x C buffer. Low precision (fp16/bf16) is opt-in by passing such inputs; it is held to the
    2x error rule, not to fp32 tolerances.

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
    if input_precision not in ("ieee", "tf32x3"):
        raise ValueError(f"input_precision must be 'ieee' or 'tf32x3', got {input_precision!r}")
    impl = _backends.select(OP, x.device, backend)
    if impl.name == "reference":
        return channel_attention_ref(x, gamma)
    return _nan_where_nonfinite(x, channel_attention_fused(x, gamma, impl.impl, input_precision))


def _nan_where_nonfinite(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b] = NaN wherever x[b] holds a NaN or inf, as the eager form gives (inf - inf in the energies):
    a fused kernel's online softmax could otherwise rank an inf away and return finite garbage. One
    read of x and one of out, no host sync; gradients of the other images are untouched."""
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)  # (B,)
    return out + torch.where(bad, float("nan"), 0.0).to(out.dtype).view(-1, 1, 1, 1)
