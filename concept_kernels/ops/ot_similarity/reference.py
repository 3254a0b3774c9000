"""Vectorized pure-PyTorch reference of ``ot_similarity`` (the specification of the op).

All B*M Sinkhorn problems run together as one batch of (P x P) log-domain iterations with a
per-problem (or per-group) freeze mask, under ``no_grad``: the published routine returns values
gathered from the cost matrix, so no gradient flows through the iterations (method_spec §5.6).
The selected similarities are then gathered from a grad-carrying similarity tensor, so autograd
gives d out / d query = the selected bank rows.

Inputs are assumed validated by ``api.ot_similarity``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from ..._checks import compute_dtype

# How often (in iterations) the loop asks "how many problems still run?" on a GPU; the answer is a
# host read. Stopped problems do not change, so this only trims no-op work: results do not depend
# on it. On the CPU the check is free and runs every iteration.
_CUDA_CHECK_EVERY = 8


def stop_groups(B: int, M: int, stop: str, device: torch.device) -> Optional[torch.Tensor]:
    """Group id of each of the B*M problems for the stopping rule, or None for per-problem.

    stop="problem": None. stop="row": problem (b, m) belongs to group b. stop="all": one group.
    """
    if stop == "problem":
        return None
    if stop == "row":
        return torch.arange(B, device=device).repeat_interleave(M)
    return torch.zeros(B * M, dtype=torch.long, device=device)


def sinkhorn_step(neg_c: torch.Tensor, f: torch.Tensor, g: torch.Tensor, *, eps: float, log_a: float,
                  log_b: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One log-domain iteration for (Q, n, m) problems given -C/eps: returns (f_new, g_new, err (Q,))."""
    f_new = eps * (log_a - torch.logsumexp(neg_c + (g / eps)[:, None, :], dim=2))
    g_new = eps * (log_b - torch.logsumexp(neg_c + (f_new / eps)[:, :, None], dim=1))
    return f_new, g_new, (f_new - f).abs().sum(dim=1)


def sinkhorn_log(
    cost: torch.Tensor,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    groups: Optional[torch.Tensor] = None,
    step: Callable = sinkhorn_step,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched log-domain Sinkhorn with uniform marginals on ``cost`` (Q, n, m).

    f, g start at 0. Each iteration: f_i = eps*(log(1/n) - LSE_j((g_j - C_ij)/eps)), then
    g_j = eps*(log(1/m) - LSE_i((f_i - C_ij)/eps)) with the new f; err = sum_i |f_i - f_i_old|.
    A problem freezes after the iteration in which its error (or, with ``groups`` (Q,) int64, the
    mean error of its group) falls below ``tol``; at most ``max_iter`` iterations.

    At each check point the stopped problems are compacted away, so the work follows the
    iterations each problem needs rather than the slowest problem's count. ``step`` is the
    per-iteration function (``sinkhorn_step``; benchmarks pass a compiled one).

    Returns (f (Q, n), g (Q, m), iterations (Q,) int64 run by each problem).
    """
    Q, n, m = cost.shape
    f = cost.new_zeros(Q, n)
    g = cost.new_zeros(Q, m)
    iters = torch.zeros(Q, dtype=torch.long, device=cost.device)
    if Q == 0:
        return f, g, iters
    log_a, log_b = -math.log(n), -math.log(m)
    if groups is not None:
        n_groups = int(groups.max()) + 1
        group_size = torch.bincount(groups, minlength=n_groups).to(cost.dtype)
    check_every = 1 if cost.device.type == "cpu" else _CUDA_CHECK_EVERY
    # the live set: problems still iterating, compacted at check points
    live = torch.arange(Q, device=cost.device)
    neg_c, f_l, g_l, it_l = -cost / eps, f, g, iters.clone()
    grp_l = groups
    active = torch.ones(Q, dtype=torch.bool, device=cost.device)
    for t in range(max_iter):
        f_new, g_new, err = step(neg_c, f_l, g_l, eps=eps, log_a=log_a, log_b=log_b)
        f_l = torch.where(active[:, None], f_new, f_l)
        g_l = torch.where(active[:, None], g_new, g_l)
        it_l += active.long()
        if grp_l is not None:
            sums = torch.zeros(n_groups, dtype=err.dtype, device=err.device).index_add_(0, grp_l, err)
            err = (sums / group_size)[grp_l]
        active = active & (err >= tol)
        if (t + 1) % check_every == 0 or t + 1 == max_iter:
            n_active = int(active.sum())
            if n_active == 0 or t + 1 == max_iter:
                break
            if n_active < 0.75 * active.numel():  # compact: write back the stopped, keep the rest
                f[live], g[live], iters[live] = f_l, g_l, it_l
                keep = active.nonzero().squeeze(1)
                live, neg_c, f_l, g_l, it_l = live[keep], neg_c[keep], f_l[keep], g_l[keep], it_l[keep]
                grp_l = None if grp_l is None else grp_l[keep]
                active = active[keep]
    f[live], g[live], iters[live] = f_l, g_l, it_l
    return f, g, iters


def log_plan(cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """log pi_ij = (f_i + g_j - C_ij)/eps, (Q, n, m). Ranking on log pi avoids exp underflow ties."""
    return (f[:, :, None] + g[:, None, :] - cost) / eps


def ot_similarity_ref(
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
) -> torch.Tensor:
    """Reference ``ot_similarity`` (see ``concept_kernels.ot_similarity`` for the contract).

    query (B,P,D), bank (R,P,D), index (B,M) int64; choice (B,M) int64 when select="sample".
    Returns (B,M) for "sample"/"cost", (B,M,k) for "topk".
    """
    B, P, D = query.shape
    M = index.shape[1]
    out_dtype = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    cdt = compute_dtype(query.dtype)
    q = query.to(cdt)
    keys = bank.detach().to(cdt)[index]  # (B, M, P, D): the gathered bank rows (constants)
    sim = torch.einsum("bpd,bmqd->bmpq", q, keys)  # (B, M, P, P), carries the grad to query
    cost = (1.0 - sim.detach()).reshape(B * M, P, P)
    with torch.no_grad():
        groups = stop_groups(B, M, stop, query.device)
        f, g, _ = sinkhorn_log(cost, eps=eps, max_iter=max_iter, tol=tol, groups=groups)
        lp = log_plan(cost, f, g, eps).reshape(B, M, P * P)
    flat_sim = sim.reshape(B, M, P * P)
    if select == "cost":
        pi = lp.exp()
        out = 1.0 - (pi * (1.0 - flat_sim)).sum(dim=-1)
    else:
        # descending plan; exact ties (duplicate patches) go to the lowest flat index, as in every
        # backend, so that backends agree (torch.topk leaves the order of ties unspecified)
        top = lp.sort(dim=-1, descending=True, stable=True).indices[..., :k]  # (B, M, k)
        if select == "sample":
            top = top.gather(-1, choice.unsqueeze(-1))  # (B, M, 1)
        out = flat_sim.gather(-1, top)
        # a problem whose plan is not finite (a NaN or inf input) outputs NaN, as "cost" does: a
        # ranking of a NaN plan would pick some entry and return a finite, meaningless value
        bad = ~torch.isfinite(lp).all(dim=-1, keepdim=True)  # (B, M, 1)
        out = out + torch.where(bad, float("nan"), 0.0).to(out.dtype)
        if select == "sample":
            out = out.squeeze(-1)
    return out.to(out_dtype)
