"""The ONE autograd of ``channel_attention``: two ``torch.library`` custom ops + ``register_autograd``.

Backend contract (every fused backend implements exactly this; ``backend`` is a string argument):

    fwd(x3, gamma)                         -> (out, att, lse)
    bwd(dout, x3, gamma, att, lse)         -> (dx, dgamma)

    x3     (B, C, N)  the input viewed as channels x positions, any float dtype
    gamma  () or (1,) residual scale, read on the device (no host sync)
    out    (B, C, N)  x3.dtype   gamma * O + x3,  O = softmax_j(-x_i . x_j) X
    att    (B, C, N)  x3.dtype   O (before the residual): Δ_i = dout_i . O_i and dgamma = Σ Δ_i
    lse    (B, C)     float32 (float64 for float64 x3)  logsumexp_j(-x_i . x_j) per query row
    dx     (B, C, N)  x3.dtype   dout + gamma * (-dQ + dK + dV)   (x plays q = -x, k and v)
    dgamma ()         float32 / float64, cast to gamma's dtype and shape here

Saved for backward: x3, gamma, att, lse. Nothing of size C x C is saved or built by any backend:
O(B·C·N + B·C) memory instead of the reference's B·C·C attention.

Ops (``torch.ops.concept_kernels.*``): ``channel_attention_fwd(x3, gamma, backend, input_precision)``
and ``channel_attention_bwd(dout, x3, gamma, att, lse, backend, input_precision)``, with fake kernels
so ``torch.compile(fullgraph=True)`` and ``opcheck`` work (the ops are opaque to the compiler).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

BACKENDS = ("cpu", "triton")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_impl(backend: str):
    if backend == "cpu":
        from .cpu_impl import channel_attention_fwd_cpu
        return lambda x3, gamma, precision: channel_attention_fwd_cpu(x3, gamma)
    if backend == "triton":
        from .triton_impl import channel_attention_fwd_triton
        return channel_attention_fwd_triton
    raise ValueError(f"channel_attention: unknown fused backend {backend!r}; known: {BACKENDS}")


def _bwd_impl(backend: str):
    if backend == "cpu":
        from .cpu_impl import channel_attention_bwd_cpu
        return lambda dout, x3, gamma, att, lse, precision: channel_attention_bwd_cpu(dout, x3, gamma, att, lse)
    if backend == "triton":
        from .triton_impl import channel_attention_bwd_triton
        return channel_attention_bwd_triton
    raise ValueError(f"channel_attention: unknown fused backend {backend!r}; known: {BACKENDS}")


@torch.library.custom_op("concept_kernels::channel_attention_fwd", mutates_args=())
def channel_attention_fwd(x3: Tensor, gamma: Tensor, backend: str, input_precision: str) -> Tuple[Tensor, Tensor, Tensor]:
    B, C, N = x3.shape
    if B == 0:
        return torch.empty_like(x3), torch.empty_like(x3), x3.new_empty((0, C), dtype=_acc(x3.dtype))
    out, att, lse = _fwd_impl(backend)(x3, gamma, input_precision)
    return out, att, lse


@channel_attention_fwd.register_fake
def _(x3, gamma, backend, input_precision):
    B, C, N = x3.shape
    like = torch.empty((B, C, N), dtype=x3.dtype, device=x3.device)
    return like, torch.empty_like(like), x3.new_empty((B, C), dtype=_acc(x3.dtype))


@torch.library.custom_op("concept_kernels::channel_attention_bwd", mutates_args=())
def channel_attention_bwd(dout: Tensor, x3: Tensor, gamma: Tensor, att: Tensor, lse: Tensor, backend: str,
                          input_precision: str) -> Tuple[Tensor, Tensor]:
    if x3.shape[0] == 0:
        return torch.zeros_like(x3, memory_format=torch.contiguous_format), torch.zeros_like(gamma)
    dx, dgamma = _bwd_impl(backend)(dout, x3, gamma, att, lse, input_precision)
    return dx, dgamma.to(gamma.dtype).reshape(gamma.shape)


@channel_attention_bwd.register_fake
def _(dout, x3, gamma, att, lse, backend, input_precision):
    return torch.empty(x3.shape, dtype=x3.dtype, device=x3.device), torch.empty_like(gamma)


def _setup_context(ctx, inputs, output):
    x3, gamma, backend, precision = inputs
    _, att, lse = output
    ctx.save_for_backward(x3, gamma, att, lse)
    ctx.backend = backend
    ctx.precision = precision


def _backward(ctx, dout, d_att, d_lse):
    x3, gamma, att, lse = ctx.saved_tensors
    # att and lse are internal outputs (the public op returns only out): their grads are ignored.
    dx, dgamma = channel_attention_bwd(dout, x3, gamma, att, lse, ctx.backend, ctx.precision)
    return dx, dgamma, None, None


channel_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def channel_attention_fused(x: Tensor, gamma: Tensor, backend: str, input_precision: str = "ieee") -> Tensor:
    """(B, C, H, W) -> (B, C, H, W) through the custom ops (autograd to x and gamma)."""
    B, C, H, W = x.shape
    out, _, _ = channel_attention_fwd(x.reshape(B, C, H * W), gamma, backend, input_precision)
    return out.reshape(B, C, H, W)
