"""Public entry point of ``ot_similarity``: documentation, validation and backend dispatch."""
from __future__ import annotations

from typing import List, Optional

import torch

from ... import _backends, _ext
from ..._checks import check_choice, check_float, check_index, check_positive, check_same_device, check_tensor
from .function import ot_similarity_fused
from .reference import ot_similarity_ref

OP = "ot_similarity"
SELECT_MODES = ("sample", "topk", "cost")  # position = the contract's select int
STOP_MODES = ("problem", "row", "all")  # position = the contract's stop int
MAX_FUSED_P = 16  # patches per set the cpu/cuda kernels hold (csrc/ot_similarity, kMaxP)
# eps the op computes correctly (in float32, as the fused kernels do for every input, triton even
# for float64): the plan's log (f_i + g_j - C_ij)/eps carries the potentials' float32 rounding
# (~1e-7) divided by eps, so 1 - <pi, C> is off by ~4e-8/eps (4e-4 at 1e-4; NaN at 1e-40 where 1/eps
# overflows); above 1e3 the plan's entries differ by less than float32 resolves (a 3% wrong
# top-k selection at 1e4, 94% at 1e6). Measured against the float64 reference (tests).
EPS_RANGE = (1e-4, 1e3)


def _cpu_available() -> Optional[str]:
    return None if _ext.HAS_EXT else _ext.EXT_ERROR


def _cuda_available() -> Optional[str]:
    if not _ext.HAS_EXT:
        return _ext.EXT_ERROR
    if not _ext.ext_has_cuda():
        return ("concept_kernels._C was built without its CUDA kernels (the installed torch has no CUDA, "
                "or nvcc was not found at build time)")
    return None


def _triton_available() -> Optional[str]:
    why = _backends.triton_missing()
    if why is not None:
        return why
    try:
        from . import triton_impl  # noqa: F401
    except Exception as e:  # noqa: BLE001  (a broken or missing module is a reason, not a crash)
        return f"concept_kernels.ops.ot_similarity.triton_impl is not importable ({type(e).__name__}: {e})"
    return None


# priority: cuda, triton, cpu, then reference (always last)
_backends.register(OP, _backends.Backend("reference", impl=ot_similarity_ref))
_backends.register(OP, _backends.Backend("cuda", impl="cuda", available=_cuda_available,
                                         unsupported=_backends.cuda_only))
_backends.register(OP, _backends.Backend("triton", impl="triton", available=_triton_available,
                                         unsupported=_backends.triton_unsupported))
_backends.register(OP, _backends.Backend("cpu", impl="cpu", available=_cpu_available,
                                         unsupported=_backends.cpu_only))


def _mode_reasons(name: str, P: int, select: str, stop: str) -> List[str]:
    """Why fused backend ``name`` cannot run these sizes/modes (empty = it can)."""
    why = []
    if name in ("cpu", "cuda") and P > MAX_FUSED_P:
        why.append(f"the {name} kernels take P <= {MAX_FUSED_P} patches, got P={P}")
    if name == "cuda" and stop != "problem":
        why.append(f"the cuda backend implements stop='problem' only, got stop={stop!r}")
    if name == "triton":
        from . import triton_impl

        reasons = getattr(triton_impl, "triton_unsupported_reasons", None)
        if reasons is not None:
            why.extend(reasons(SELECT_MODES.index(select), STOP_MODES.index(stop)))
    return why


def _fused(query, bank, index, *, select, k, choice, eps, max_iter, tol, stop, backend):
    """Prepare the inputs for the contract (fp32/fp64, contiguous, int modes) and run the custom op."""
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.to(cdt).contiguous()
    b = bank.detach().to(cdt).contiguous()
    ch = choice.contiguous() if select == "sample" else torch.empty(0, dtype=torch.int64, device=query.device)
    out, _aux = ot_similarity_fused(q, b, index.contiguous(), ch, SELECT_MODES.index(select), int(k),
                                    float(eps), int(max_iter), float(tol), STOP_MODES.index(stop), backend)
    return out if select == "topk" else out.squeeze(-1)


def ot_similarity(
    query: torch.Tensor,
    bank: torch.Tensor,
    index: torch.Tensor,
    *,
    select: str = "sample",
    k: int = 3,
    choice: Optional[torch.Tensor] = None,
    eps: float = 0.01,
    max_iter: int = 200,
    tol: float = 1e-3,
    stop: str = "problem",
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Similarity of entropic-OT-matched patch pairs between query sets and bank sets.

    For every query set ``b`` and each of its ``M`` paired bank sets ``index[b, m]`` this solves one
    small optimal-transport problem between the ``P`` query patches and the ``P`` bank patches and
    returns the cosine similarity of the pair(s) the transport plan matches most strongly. It is
    the concept-level similarity of Concept-Tuning (method_spec §5.5–§5.6), batched over all
    problems with no host synchronisation per iteration.

    Math, per problem (b, m) with X = query[b] (P, D), Y = bank[index[b, m]] (P, D):

    * cost C = 1 - X Yᵀ (P x P); rows need not be unit-norm (then C is not a cosine distance,
      but everything below still applies);
    * log-domain Sinkhorn with uniform marginals, f = g = 0 at start, per iteration
      f_i = eps (log(1/P) - LSE_j((g_j - C_ij)/eps)), then g_j = eps (log(1/P) - LSE_i((f_i - C_ij)/eps));
    * stopping: err = Σ_i |f_i - f_i^old|; ``stop="problem"`` freezes each problem once its own
      err < tol; ``stop="row"`` freezes the M problems of a row together once their mean err < tol
      (the published per-sample call); ``stop="all"`` uses one mean over all B·M problems (the
      published batched call). At most ``max_iter`` iterations;
    * plan π_ij = exp((f_i + g_j - C_ij)/eps), ranked over its P·P entries.

    Selection:

    * ``"sample"``: 1 - C at the ``choice[b, m]``-th largest π entry among the top ``k``
      (``choice`` drawn uniformly from [0, k) with ``torch.randint`` on the query's device when
      None, so ``torch.manual_seed`` makes it reproducible) -> (B, M);
    * ``"topk"``: 1 - C at the ``k`` largest π entries, in descending π order -> (B, M, k);
    * ``"cost"``: 1 - <π, C> -> (B, M).

    A NaN or inf in a problem's query patches or bank entry makes its outputs NaN (every select
    mode, every backend).

    Gradients flow to ``query`` only; ``bank`` and the plan are constants (for ``"cost"`` this is
    the envelope gradient). Near-ties of π may swap which entries are selected between backends.

    Backends (auto picks the first that is built and takes the inputs, in the order cuda, triton,
    cpu, reference: so cuda for CUDA tensors, cpu for CPU tensors when the extension is built):

    * ``"cpu"``: C++/OpenMP/SIMD, needs the extension ``concept_kernels._C``; P <= 16;
    * ``"cuda"``: C++/CUDA, one problem per thread; P <= 16, ``stop="problem"`` only;
    * ``"triton"``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` when requested;
    * ``"reference"``: vectorized PyTorch, any device.

    The fused backends share one autograd (``concept_kernels::ot_similarity_fused``, see
    ``function.py``). Inputs of every dtype are computed in float32 (float64 stays float64).

    Args:
        query: (B, P, D) float16/bfloat16/float32/float64, the query patch sets.
        bank: (R, P, D) float, the key patch sets (e.g. a class queue viewed as rows).
        index: (B, M) int64 with values in [0, R): the bank rows paired with each query.
        select: "sample", "topk" or "cost".
        k: top-k size, 1 <= k <= P*P ("sample" and "topk").
        choice: (B, M) int64 in [0, k), the pick for ``select="sample"``.
        eps: entropic regulariser in [1e-4, 1e3] (the method uses 0.01). The plan is computed in
            float32, whose rounding limits it: 1 - <pi, C> is off by about 4e-8 / eps, and above
            1e3 the plan's entries are too close to rank; outside the range: ValueError.
        max_iter: maximum Sinkhorn iterations (>= 1).
        tol: stopping threshold on the L1 change of f (>= 0; 0 runs ``max_iter`` iterations).
        stop: "problem", "row" or "all" (see above).
        backend: force a backend ("reference", "cpu", "triton", "cuda"); None = fastest available.
            ``CONCEPT_KERNELS_BACKEND`` forces one when this is None.

    Returns:
        (B, M) or (B, M, k) tensor, float32/float64 (half inputs are computed and returned in float32).

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(2, 9, 16), dim=-1)
        >>> bank = torch.nn.functional.normalize(torch.randn(5, 9, 16), dim=-1)
        >>> ot_similarity(q, bank, torch.tensor([[0, 1, 2], [2, 3, 4]]), select="topk", k=10).shape
        torch.Size([2, 3, 10])
    """
    check_float("query", query, ndim=3, shape_doc="(B, P, D)", allow_empty=True)
    check_float("bank", bank, ndim=3, shape_doc="(R, P, D)", allow_empty=True)
    check_tensor("index", index, ndim=2, shape_doc="(B, M)", allow_empty=True)
    check_same_device(query=query, bank=bank, index=index, choice=choice)
    B, P, D = query.shape
    if P == 0 or D == 0:
        raise ValueError(f"query must have P >= 1 patches and D >= 1 features (B, P, D), got {tuple(query.shape)}")
    if bank.shape[1:] != query.shape[1:]:
        raise ValueError(f"bank must have shape (R, {P}, {D}) to match query (B, P, D), got {tuple(bank.shape)}")
    if index.shape[0] != B:
        raise ValueError(f"index must have shape ({B}, M) to match query's batch B={B}, got {tuple(index.shape)}")
    compiling = torch.compiler.is_compiling()  # no host reads while tracing (the kernels check)
    if not compiling:
        check_index("index", index, bank.shape[0], "rows of bank")
    check_choice("select", select, SELECT_MODES)
    check_choice("stop", stop, STOP_MODES)
    check_positive("eps", eps)
    if not EPS_RANGE[0] <= eps <= EPS_RANGE[1]:
        raise ValueError(f"eps must lie in [{EPS_RANGE[0]:g}, {EPS_RANGE[1]:g}] (the range the kernels compute "
                         f"correctly in float32), got {eps}")
    check_positive("max_iter", max_iter, integer=True)
    check_positive("tol", tol, allow_zero=True)
    M = index.shape[1]
    if select != "cost":
        check_positive("k", k, integer=True)
        if k > P * P:
            raise ValueError(f"k must be <= P*P = {P * P} (entries of a {P}x{P} plan), got {k}")
    if select == "sample":
        if choice is None:
            choice = torch.randint(k, (B, M), device=query.device)
        else:
            check_tensor("choice", choice, shape=(B, M), shape_doc="(B, M)", allow_empty=True)
            if not compiling:
                check_index("choice", choice, k, "k")
    elif choice is not None:
        raise ValueError(f"choice is only used with select='sample', got select={select!r}")
    impl = _backends.select(OP, query.device, backend, limits=lambda name: _mode_reasons(name, P, select, stop))
    if B * M == 0:
        shape = (B, M, k) if select == "topk" else (B, M)
        out_dtype = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
        return query.new_zeros(shape, dtype=out_dtype) + 0.0 * query.sum()
    kwargs = dict(select=select, k=k, choice=choice, eps=eps, max_iter=max_iter, tol=tol, stop=stop)
    if impl.name == "reference":
        return ot_similarity_ref(query, bank, index, **kwargs)
    return _fused(query, bank, index, backend=impl.name, **kwargs)
