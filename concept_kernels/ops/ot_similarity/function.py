"""The ONE autograd of the fused ``ot_similarity`` backends (cpu, cuda, triton).

``concept_kernels::ot_similarity_fused`` is a ``torch.library.custom_op`` whose ``backend`` string
argument picks the implementation of the contract in ``docs/OT_BACKEND_CONTRACT.md``:

* ``"cpu"`` / ``"cuda"``: the C++ ops ``torch.ops.concept_kernels.ot_similarity_fwd`` /
  ``ot_similarity_bwd`` of the extension (csrc/ot_similarity/), dispatched on the tensors' device;
* ``"triton"``: ``triton_impl.ot_similarity_fwd_triton`` / ``ot_similarity_bwd_triton`` (imported
  lazily, on first use).

Forward: ``(out (B, M, kk), aux)``; aux holds the selected flat plan indices (int64) or, for
``select=2`` ("cost"), the final plan, and is not differentiable. Backward: a second custom op
``concept_kernels::ot_similarity_fused_bwd`` (gradient to ``query`` only; ``bank``, ``index``,
``choice`` and the plan are constants). Both ops have fakes (shapes only), so ``torch.compile`` and
``torch.library.opcheck`` trace them. Inputs are validated and prepared by ``api.py``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ... import _ext

SELECT_SAMPLE, SELECT_TOPK, SELECT_COST = 0, 1, 2
STOP_PROBLEM, STOP_ROW, STOP_ALL = 0, 1, 2
BACKENDS = ("cpu", "cuda", "triton")


def _cpp_ops():
    _ext.require_ext("the cpu/cuda backend of ot_similarity")
    register_cpp_fakes()
    return torch.ops.concept_kernels.ot_similarity_fwd, torch.ops.concept_kernels.ot_similarity_bwd


def _triton_impl():
    from . import triton_impl  # lazy: triton is optional

    return triton_impl


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"ot_similarity_fused: backend must be one of {BACKENDS}, got {backend!r}")


def _out_shapes(query: Tensor, index: Tensor, select: int, k: int):
    B, P, _ = query.shape
    M = index.shape[1]
    kk = k if select == SELECT_TOPK else 1
    aux_shape = (B, M, P, P) if select == SELECT_COST else (B, M, kk)
    aux_dtype = query.dtype if select == SELECT_COST else torch.int64
    return (B, M, kk), aux_shape, aux_dtype


@torch.library.custom_op("concept_kernels::ot_similarity_fused", mutates_args=())
def ot_similarity_fused(query: Tensor, bank: Tensor, index: Tensor, choice: Tensor, select: int, k: int,
                        eps: float, max_iter: int, tol: float, stop: int, backend: str) -> Tuple[Tensor, Tensor]:
    """Contract fwd on ``backend``: (out (B, M, kk) query.dtype, aux) (docs/OT_BACKEND_CONTRACT.md)."""
    _check_backend(backend)
    # the contract takes contiguous tensors (api.py passes them); no-ops then, robust otherwise
    query, bank, index, choice = query.contiguous(), bank.contiguous(), index.contiguous(), choice.contiguous()
    if backend == "triton":
        return _triton_impl().ot_similarity_fwd_triton(query, bank, index, choice, select, k, eps, max_iter, tol, stop)
    fwd, _ = _cpp_ops()
    return fwd(query, bank, index, choice, select, k, eps, max_iter, tol, stop)


@ot_similarity_fused.register_fake
def _(query, bank, index, choice, select, k, eps, max_iter, tol, stop, backend):
    out_shape, aux_shape, aux_dtype = _out_shapes(query, index, select, k)
    return query.new_empty(out_shape), query.new_empty(aux_shape, dtype=aux_dtype)


@torch.library.custom_op("concept_kernels::ot_similarity_fused_bwd", mutates_args=())
def ot_similarity_fused_bwd(grad_out: Tensor, query: Tensor, bank: Tensor, index: Tensor, aux: Tensor,
                            select: int, backend: str) -> Tensor:
    """Contract bwd on ``backend``: grad_query (B, P, D) in query.dtype, deterministic."""
    _check_backend(backend)
    grad_out = grad_out.to(query.dtype).contiguous()
    query, bank, index, aux = query.contiguous(), bank.contiguous(), index.contiguous(), aux.contiguous()
    if backend == "triton":
        return _triton_impl().ot_similarity_bwd_triton(grad_out, query, bank, index, aux, select)
    _, bwd = _cpp_ops()
    return bwd(grad_out, query, bank, index, aux, select)


@ot_similarity_fused_bwd.register_fake
def _(grad_out, query, bank, index, aux, select, backend):
    return torch.empty_like(query)


def _setup_context(ctx, inputs, output):
    query, bank, index, _choice, select, _k, _eps, _max_iter, _tol, _stop, backend = inputs
    _out, aux = output
    ctx.mark_non_differentiable(aux)
    # aux never gets a gradient: without this, autograd fills a zero tensor of aux's shape (B*M*k
    # int64 or the B*M*P*P plans) for it at every backward (0.25 ms at the CPU benchmark shape)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, bank, index, aux)
    ctx.select, ctx.backend = select, backend


def _backward(ctx, grad_out, _grad_aux):
    query, bank, index, aux = ctx.saved_tensors
    grad_query = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        grad_query = ot_similarity_fused_bwd(grad_out, query, bank, index, aux, ctx.select, ctx.backend)
    return grad_query, None, None, None, None, None, None, None, None, None, None


ot_similarity_fused.register_autograd(_backward, setup_context=_setup_context)


_CPP_FAKES_DONE = False


def register_cpp_fakes() -> None:
    """Give the C++ ops (``concept_kernels::ot_similarity_fwd`` / ``_bwd``) fakes, once the extension
    is loaded (they exist only then), so that they too can be opchecked and traced on their own."""
    global _CPP_FAKES_DONE
    if _CPP_FAKES_DONE or not _ext.HAS_EXT:
        return
    _CPP_FAKES_DONE = True

    @torch.library.register_fake("concept_kernels::ot_similarity_fwd")
    def _fwd_fake(query, bank, index, choice, select, k, eps, max_iter, tol, stop):
        out_shape, aux_shape, aux_dtype = _out_shapes(query, index, select, k)
        return query.new_empty(out_shape), query.new_empty(aux_shape, dtype=aux_dtype)

    @torch.library.register_fake("concept_kernels::ot_similarity_bwd")
    def _bwd_fake(grad_out, query, bank, index, aux, select):
        return torch.empty_like(query)
