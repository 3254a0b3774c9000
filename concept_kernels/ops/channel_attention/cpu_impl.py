"""CPU backend of ``channel_attention``: a C++ kernel that uses the symmetry of the energy matrix.

CAM is attention with q = -X, k = v = X, scale = 1 on (B, 1, C, N) (performance_notes §1.1), so
S = -X Xᵀ is symmetric. The kernel (csrc/channel_attention/, ops
``torch.ops.concept_kernels.channel_attention_symm_fwd`` / ``_bwd``) cuts the C channels into blocks
of 32 and walks the tile pairs (I, J), I <= J, once: one S tile serves row block I (P_IJ with the
row statistics of I) and row block J (P_JI = its transpose with the statistics of J).

* forward: online softmax with the running (max, sum, O) of both row blocks updated from one tile:
  3 GEMMs of 32 x 32 x N per pair = 1.5 per tile (flash attention: 2);
* backward: dx = sum_i P_ik dO_i - sum_m (dS_km + dS_mk) x_m from S, dO_I X_Jᵀ and X_I dO_Jᵀ:
  7 GEMMs per pair = 3.5 per tile (flash attention: 5);
* exp, dS = P (dP - Δ) and the symmetric sum are fused on tiles that stay in L1; a register-blocked
  micro-kernel (GCC vectors, AVX-512 / AVX2 / baseline clones picked at load time) runs every GEMM;
* OpenMP over (sample, part of the tile pairs) items with their own accumulators, merged in a fixed
  order: deterministic for a given thread count, no atomics, no C x C buffer (O(C N) per item).

float32 and float64 run natively; float16 / bfloat16 are computed in float32 (outputs cast back).

PyTorch's CPU flash-attention op (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
backward) stays available as ``CONCEPT_KERNELS_CAM_CPU=aten``: the previous cpu backend, for A/B
comparisons and machines without the extension. It is never used silently: without the extension
and without that setting the cpu backend reports itself unavailable (``python -m concept_kernels.info``
says why) and auto-selection moves on. ``CONCEPT_KERNELS_CAM_CPU=symm`` requires the C++ kernel.

Measured with bench/ab_channel_attention.py (interleaved rounds, 2 threads, a 2-core AMD EPYC Zen 4
shared with other jobs, load 2.5-3.8; medians of wall and process CPU time): B=8, C=2048, N=49
fwd+bwd 1.4-1.7x the SDPA composition and 4.9-5.8x the eager form, forward alone 0.95-1.15x;
N=196 fwd+bwd 1.2x, forward alone 0.75-0.95x. The backward carries the gain (3.5 vs 5 GEMMs per
tile, and PyTorch's CPU flash backward is slow here); the forward's 1.5 vs 2 GEMMs are eaten by the
two exp passes per tile and the 8-lane padding of N on the row side.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from torch.compiler import assume_constant_result

from ... import _ext

ENV_VAR = "CONCEPT_KERNELS_CAM_CPU"
KERNELS = ("symm", "aten")
_aten = torch.ops.aten


def cpu_kernel() -> str:
    """Which kernel the cpu backend runs now: "symm" (C++) or "aten" (PyTorch's CPU flash op).

    ``CONCEPT_KERNELS_CAM_CPU`` (read at every call) picks one explicitly; unset means "symm".
    Raises RuntimeError when "symm" is wanted and the extension is missing (see :func:`unavailable`).
    """
    name = os.environ.get(ENV_VAR) or "symm"
    if name not in KERNELS:
        raise ValueError(f"{ENV_VAR} must be one of {KERNELS}, got {name!r}")
    if name == "symm":
        why = _symm_missing()
        if why:
            raise RuntimeError(why)
    return name


@assume_constant_result
def _symm_missing() -> str:
    """"" when the C++ kernel is loaded (its fakes registered), else why not; run once, not traced, under
    ``torch.compile`` (loading and registering are side effects of the process, not of the graph)."""
    if not _ext.load():
        return (f"the cpu backend of channel_attention (set CONCEPT_KERNELS_CAM_CPU=aten for PyTorch's CPU flash "
                f"kernel instead) needs the compiled extension: {_ext.EXT_ERROR}")
    register_cpp_fakes()
    return ""


def unavailable() -> Optional[str]:
    """None when the cpu backend can run here, else why not (for ``_backends``)."""
    try:
        cpu_kernel()
    except (RuntimeError, ValueError) as e:
        return str(e)
    return None


def describe() -> str:
    """What the cpu backend runs (shown by ``python -m concept_kernels.info``)."""
    if cpu_kernel() == "aten":
        return f"PyTorch's CPU flash-attention op, {ENV_VAR}=aten"
    return "C++ symmetric tile-pair kernel, concept_kernels._C"


def _compute(x3: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 run the C++ kernel in float32."""
    return x3 if x3.dtype in (torch.float32, torch.float64) else x3.float()


def channel_attention_fwd_cpu(x3: torch.Tensor, gamma: torch.Tensor):
    """x3 (B, C, N) -> (out x.dtype, att (B, C, N) x.dtype, lse (B, C) fp32|fp64)."""
    if cpu_kernel() == "aten":
        return _fwd_aten(x3, gamma)
    out, att, lse = torch.ops.concept_kernels.channel_attention_symm_fwd(_compute(x3), gamma)
    return out.to(x3.dtype), att.to(x3.dtype), lse


def channel_attention_bwd_cpu(dout: torch.Tensor, x3: torch.Tensor, gamma: torch.Tensor, att: torch.Tensor,
                              lse: torch.Tensor):
    """-> (dx (B, C, N) x.dtype, dgamma () fp32|fp64): dx = dout + gamma (-dQ + dK + dV)."""
    if cpu_kernel() == "aten":
        return _bwd_aten(dout, x3, gamma, att, lse)
    xc = _compute(x3)
    dx, dgamma = torch.ops.concept_kernels.channel_attention_symm_bwd(dout.to(xc.dtype), xc, gamma,
                                                                      att.to(xc.dtype), lse)
    return dx.to(x3.dtype), dgamma


# ---- PyTorch's CPU flash kernel (CONCEPT_KERNELS_CAM_CPU=aten) ------------------------------------

def _qk(x3: torch.Tensor):
    k = x3.unsqueeze(1)  # (B, 1, C, N): one head, C tokens, head dim N
    return (-x3).unsqueeze(1), k


def _fwd_aten(x3: torch.Tensor, gamma: torch.Tensor):
    x3 = x3.contiguous()
    q, k = _qk(x3)
    o, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=1.0)
    att = o.squeeze(1)
    cdt = lse.dtype
    out = torch.addcmul(x3.to(cdt), gamma.to(cdt).reshape(()), att.to(cdt)).to(x3.dtype)
    return out, att.contiguous(), lse.squeeze(1).contiguous()


def _bwd_aten(dout, x3, gamma, att, lse):
    x3 = x3.contiguous()
    cdt = lse.dtype
    dout = dout.to(x3.dtype).contiguous()
    dgamma = (dout.to(cdt) * att.to(cdt)).sum()
    q, k = _qk(x3)
    # The backward is linear in its upstream gradient: run it on dout and scale by gamma once,
    # in the same in-place pass that combines the three roles of x and adds the residual.
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.unsqueeze(1), q, k, k, att.unsqueeze(1), lse.unsqueeze(1), 0.0, False, scale=1.0)
    dq, dk, dv = dq.squeeze(1), dk.squeeze(1), dv.squeeze(1)
    g = gamma.to(cdt).reshape(())
    if dk.dtype == cdt:
        return dk.sub_(dq).add_(dv).mul_(g).add_(dout), dgamma
    dx = (dk.to(cdt) - dq.to(cdt) + dv.to(cdt)) * g + dout.to(cdt)  # fp16/bf16: combine in fp32
    return dx.to(x3.dtype), dgamma


# ---- fakes of the C++ ops (they exist only once the extension is loaded) --------------------------

_CPP_FAKES_DONE = False


def register_cpp_fakes() -> None:
    """Give ``concept_kernels::channel_attention_symm_fwd`` / ``_bwd`` fakes so that they can be
    opchecked and traced on their own (the public path goes through function.py's custom ops)."""
    global _CPP_FAKES_DONE
    if _CPP_FAKES_DONE or not _ext.HAS_EXT:
        return
    _CPP_FAKES_DONE = True

    @torch.library.register_fake("concept_kernels::channel_attention_symm_fwd")
    def _fwd_fake(x3, gamma):
        B, C, N = x3.shape
        out = x3.new_empty((B, C, N))
        return out, torch.empty_like(out), x3.new_empty((B, C))

    @torch.library.register_fake("concept_kernels::channel_attention_symm_bwd")
    def _bwd_fake(dout, x3, gamma, att, lse):
        return x3.new_empty(x3.shape), x3.new_empty(())
