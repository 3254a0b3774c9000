"""Public entry point of ``position_attention``: documentation, validation and backend dispatch."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _backends
from ..._checks import check_float, check_same_device
from .._common import check_feature_map, check_gamma
from .function import position_attention_fused
from .reference import position_attention_ref

OP = "position_attention"


# The fused composition (one concatenated-weight GEMM + SDPA over positions + fused epilogue) is
# pure PyTorch, so it serves as the "cpu" backend for CPU tensors and the "cuda" backend for CUDA
# tensors (cuBLAS + SDPA's memory-efficient kernel). A Triton kernel for the 49x49 attention would
# not pay: >97% of PAM is the GEMM. Reference last.
_backends.register(OP, _backends.Backend("cuda", impl=position_attention_fused, unsupported=_backends.cuda_only))
_backends.register(OP, _backends.Backend("cpu", impl=position_attention_fused, unsupported=_backends.cpu_only))
_backends.register(OP, _backends.Backend("reference", impl=position_attention_ref))


def position_attention(
    x: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    gamma: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""DANet position attention (PAM) with a residual: ``gamma * V softmax(Qᵀ K)ᵀ + x``.

    With X = x.view(B, C, N): Q = wq X + bq and K = wk X + bk are (C', N) (C' = C/8 in DANet),
    V = wv X + bv is (C, N); A = softmax over key positions of QᵀK (N x N), no 1/sqrt(C') scaling
    (as published); out[:, :, n] = Σ_n' A[n, n'] V[:, n'].

    Args:
        x: (B, C, H, W) float tensor.
        wq, wk: (C', C) projection weights (a 1x1 conv weight ``w.flatten(1)``); bq, bk: (C',).
        wv: (C, C); bv: (C,).
        gamma: one-element tensor, shape () or (1,).
        backend: force a backend; None = fastest available. ``"cpu"``: one GEMM with the
            concatenated [wq; wk; wv] weights, SDPA over positions (scale 1) and a fused
            ``gamma * out + x`` (pure PyTorch, any device; function.py). ``"reference"``: the
            eager DANet form.

    Returns:
        (B, C, H, W) in x's dtype. Gradients flow to x, every weight, bias and gamma.
    """
    check_feature_map(x)
    C = x.shape[1]
    check_float("wq", wq, ndim=2, shape_doc="(C', C)")
    c_qk = wq.shape[0]
    check_float("wq", wq, shape=(c_qk, C), shape_doc=f"(C', C) with C={C} from x")
    check_float("wk", wk, shape=(c_qk, C), shape_doc=f"(C', C) with C'={c_qk} from wq, C={C} from x")
    check_float("bq", bq, shape=(c_qk,), shape_doc="(C',)")
    check_float("bk", bk, shape=(c_qk,), shape_doc="(C',)")
    check_float("wv", wv, shape=(C, C), shape_doc="(C, C)")
    check_float("bv", bv, shape=(C,), shape_doc="(C,)")
    check_gamma(gamma)
    check_same_device(x=x, wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, gamma=gamma)
    impl = _backends.select(OP, x.device, backend)
    args = (x, wq, bq, wk, bk, wv, bv, gamma)
    if impl.name == "reference":
        return position_attention_ref(*args)
    return impl.impl(*args)
