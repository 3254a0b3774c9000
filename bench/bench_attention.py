"""Benchmarks of ``channel_attention`` (DANet CAM) and ``position_attention`` (DANet PAM).

Providers (one table per ``<op>-<mode>-<shape>`` group):

* ``reference``: ``channel_attention_ref`` (the eager DANet form, materialises B x C x C) /
  ``position_attention_ref`` (one fused QKV matmul, N x N softmax).
* ``compile``: ``torch.compile(<reference>, dynamic=False)``, fresh Dynamo cache per benchmark;
  the compile happens in the untimed warm-up call.
* ``sdpa``: the SDPA composition (performance_notes §1.1). CAM: softmax(rowmax(E) - E) =
  softmax(-E), so ``F.scaled_dot_product_attention(q=-X, k=X, v=X, scale=1.0)`` on (B, 1, C, N)
  (``q=-X``, never ``scale=-1``: fused kernels take the row max of unscaled scores), then
  ``gamma * out + x``. On CUDA, N is zero-padded to a multiple of 8 (exact for CAM: it adds 0 to
  every dot product; the padded output columns are dropped) so the memory-efficient kernel is
  eligible (fp32 needs N % 4 == 0; the design §3 GPU target is "SDPA memory-efficient (padded)").
  PAM: the reference's fused QKV matmul, then SDPA with tokens = positions:
  q = Qᵀ (B,1,N,C'), k = Kᵀ (B,1,N,C'), v = Vᵀ (B,1,N,C), scale=1.0.
* ``cpu`` / ``triton`` / ``cuda``: the public op with ``backend=<name>``; skipped with the
  backend's reason where it cannot run, or "not implemented yet". For channel_attention ``cpu`` is
  the C++ symmetric kernel (``CONCEPT_KERNELS_CAM_CPU=aten`` measures PyTorch's CPU flash kernel
  instead); ab_channel_attention.py compares them in interleaved rounds.

Modes: ``fwd``; ``fwd_bwd`` = forward + backward of ``(out * w).sum()`` (fixed random w), gradient
to ``x`` only (gamma = 0.5 and the PAM weights are constants, so every provider does the same
backward work). Inputs: ``concept_kernels.testing.feature_map`` (post-ReLU-like), float32.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from shapes import ATTN_SHAPES, rounds

import concept_kernels as ck
from concept_kernels.ops.channel_attention.reference import channel_attention_ref
from concept_kernels.ops.position_attention.reference import position_attention_ref
from concept_kernels.testing import feature_map

OPS = ("channel_attention", "position_attention")
PROVIDERS = ("reference", "compile", "sdpa", "cpu", "triton", "cuda")
MODES = ("fwd", "fwd_bwd")
DTYPE = torch.float32
GAMMA = 0.5  # nonzero, so the attention branch matters for the output and the gradient


def cam_sdpa(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """CAM as one SDPA call with the C channels as tokens and the N positions as head dim."""
    B, C, H, W = x.shape
    N = H * W
    X = x.reshape(B, 1, C, N)
    pad = (-N) % 8 if x.is_cuda else 0
    if pad:
        X = F.pad(X, (0, pad))
    out = F.scaled_dot_product_attention(-X, X, X, scale=1.0)
    if pad:
        out = out[..., :N]
    return gamma.reshape(()) * out.reshape(B, C, H, W) + x


def pam_sdpa(x, wq, bq, wk, bk, wv, bv, gamma) -> torch.Tensor:
    """PAM as one fused QKV matmul plus one SDPA call with the N positions as tokens."""
    B, C, H, W = x.shape
    c_qk = wq.shape[0]
    X = x.reshape(B, C, H * W)
    qkv = torch.matmul(torch.cat([wq, wk, wv]), X) + torch.cat([bq, bk, bv])[:, None]  # (B, 2C'+C, N)
    q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in qkv.split([c_qk, c_qk, C], dim=1))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, 1, N, C)
    return gamma.reshape(()) * out.squeeze(1).transpose(1, 2).reshape(B, C, H, W) + x


_REFERENCE = {"channel_attention": channel_attention_ref, "position_attention": position_attention_ref}
_SDPA = {"channel_attention": cam_sdpa, "position_attention": pam_sdpa}
_PUBLIC = {"channel_attention": ck.channel_attention, "position_attention": ck.position_attention}


def _provider_fn(op: str, provider: str) -> Callable:
    if provider == "reference":
        return _REFERENCE[op]
    if provider == "compile":
        torch._dynamo.reset()
        return torch.compile(_REFERENCE[op], dynamic=False)
    if provider == "sdpa":
        return _SDPA[op]
    public = _PUBLIC[op]
    return lambda *args: public(*args, backend=provider)


def _inputs(op: str, shape, device: torch.device, dtype: torch.dtype = DTYPE):
    """(x, *params): x from ``feature_map``; PAM weights like a 1x1 conv's default init scale."""
    x = feature_map(shape.B, shape.C, shape.H, shape.W, seed=0, dtype=dtype, device=str(device))
    gamma = torch.full((1,), GAMMA, dtype=dtype, device=device)
    if op == "channel_attention":
        return x, gamma
    g = torch.Generator().manual_seed(2)
    C, c_qk = shape.C, shape.c_qk
    bound = C ** -0.5

    def param(*size):
        return ((torch.rand(*size, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(device, dtype)

    return x, param(c_qk, C), param(c_qk), param(c_qk, C), param(c_qk), param(C, C), param(C), gamma


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("op", OPS)
def test_attention(benchmark, bench, op, shape, mode, provider):
    benchmark.group = bench.group(op, mode, shape)
    device = bench.device(op, mode, shape, provider)
    bench.require(op, provider, mode, shape, device, benchmark)
    args = _inputs(op, shape, device)
    x = args[0]
    impl = _provider_fn(op, provider)
    setup = None
    if mode == "fwd":
        def fn():
            return impl(*args)
    else:
        x.requires_grad_(True)
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, DTYPE)

        def setup():
            x.grad = None

        def fn():
            (impl(*args) * w).sum().backward()

    extra = dict(bcc_mb=round(shape.B * shape.C * shape.C * 4 / 2**20, 1))  # one fp32 B x C x C buffer
    bench.run(benchmark, fn, op=op, provider=provider, mode=mode, shape=shape, device=device, dtype=DTYPE,
              rounds=rounds(shape), setup=setup, extra=extra)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "reference"])
@pytest.mark.parametrize("op", OPS)
def test_attention_providers_agree_smoke(bench, op, provider):
    """float64, smoke shape, value and x-gradient vs the reference."""
    shape = ATTN_SHAPES[0]
    assert shape.smoke
    device = torch.device("cpu")
    if provider in bench.BACKEND_PROVIDERS:
        why = bench.backend_reason(op, provider, device, shape)
        if why:
            pytest.skip(why)
    args = _inputs(op, shape, device, torch.float64)
    w = torch.randn(args[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for impl in (_REFERENCE[op], _provider_fn(op, provider)):
        x = args[0].clone().requires_grad_(True)
        out = impl(x, *args[1:])
        (out * w).sum().backward()
        results.append((out.detach(), x.grad))
    (ref_out, ref_grad), (out, grad) = results
    torch.testing.assert_close(out, ref_out, atol=1e-9, rtol=1e-9, msg=lambda m: f"{op} {provider} value: {m}")
    torch.testing.assert_close(grad, ref_grad, atol=1e-9, rtol=1e-9, msg=lambda m: f"{op} {provider} grad: {m}")
