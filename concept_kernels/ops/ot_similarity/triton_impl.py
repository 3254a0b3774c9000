"""Triton backend of ``ot_similarity``: the fwd/bwd pair of ``docs/OT_BACKEND_CONTRACT.md``.

Layout: many Sinkhorn problems per program. A program owns ``BLOCK_PROB`` consecutive problems
p = b*M + m of one *row group* (see below) and holds, for each of them, the padded PP x PP
(PP = next power of two >= P) similarity, cost and log-plan tiles plus the potentials f, g in
registers. Padded rows/columns are masked with -inf before every max/LSE and -inf maxima are
zeroed, so no inf - inf NaN can arise; padded potentials are held at 0.

* The cost C_ij = 1 - <q_i, y_j> is computed in-kernel from ``query[b]`` and the bank rows
  ``bank[index[b, m]]`` (read through ``index``, the gathered keys are never materialised), as
  elementwise products summed with ``tl.sum`` over D in chunks of ``BLOCK_D`` (exact fp32/fp64, no
  ``tl.dot`` and so no TF32: cosine costs at eps=0.01 tolerate TF32 poorly, perf notes §2.6).
* Precision: the similarities S = <q_i, y_j> are accumulated in the input dtype (fp32 or fp64);
  the Sinkhorn iterations, the plan and the ranking run in **fp32** even for fp64 inputs (the
  contract asks for "at least fp32"; fp64 transcendental functions would need libdevice, which the
  interpreter lacks). The returned similarities are the input-dtype S at the selected entries, so
  for fp64 inputs ``out`` is an exact fp64 dot product (and its gradient w.r.t. ``query`` is exact);
  only *which* entries are selected (and pi for ``select="cost"``) carries fp32 rounding.
* Stopping rules (``stop``):
  - 0 "problem": one launch; each problem freezes after the iteration where its own
    err = sum_i |f_i - f_i_old| < tol; the program leaves its loop as soon as all its problems
    froze (``while`` on a scalar flag), at most ``max_iter`` iterations.
  - 1 "row" / 2 "all" (group mean err): two passes, no host synchronisation on a GPU.
    Pass 1 (``_ot_err_kernel``) runs all problems without freezing in launches of
    ``_ERR_ITERS_PER_LAUNCH`` iterations from a saved (f, g) state and writes per-(program,
    iteration) partial sums of err (deterministic: ``tl.sum`` in the program, then a fixed-order
    torch sum over programs). Between launches torch computes each group's mean err per iteration
    on the device, its stop iteration once found and a ``done`` flag per group; launches of
    finished groups return at once. The host reads the flags after launches 2, 4, 8, ... on a GPU
    (after each on the CPU) and stops launching once every group is done, so a huge ``max_iter``
    costs no launch storm, and memory is O(B*M*P), independent of ``max_iter``. A group's
    iteration count is the first iteration whose mean err < tol (+1), else ``max_iter``. Since all
    problems of a group freeze together, the unfrozen trajectory up to that point is the frozen
    one. The (f, g) state at the start of the launch that decided a group is kept, and pass 2
    (``_ot_fwd_kernel`` with ``FIXED=True``) resumes every problem from it for the iterations
    left (at most ``_ERR_ITERS_PER_LAUNCH``, not the whole count again) and selects. Programs
    never straddle two groups (the grid is (chunks of a group, groups)).
* Selection: top-k of log pi_ij = (f_i + g_j - C_ij)/eps over the P*P flattened entries by k
  iterative arg-maxima, ties to the lowest flat index i*P + j; "sample" keeps the choice[b, m]-th,
  "topk" all k (descending plan order), "cost" writes pi and 1 - sum_ij pi_ij C_ij. A problem
  whose plan is not finite (NaN or inf in its query or bank patches) outputs NaN.
* Backward: gather/accumulate, one program per (b, block of D) looping over m in ascending chunks
  of BLOCK_M problems (inside a chunk: picks s ascending, a fixed-shape tl.sum over the chunk's
  problems): a fixed summation order, deterministic, no atomics, in the input dtype.

Inputs must be contiguous (``api.py`` guarantees it); the wrappers call ``.contiguous()`` anyway.
"""
from __future__ import annotations

import math
import os
from typing import List, Tuple

import torch

try:  # the module stays importable without triton; the functions then raise
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _TRITON_IMPORT_ERROR = None
except Exception as _e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

SELECT_SAMPLE, SELECT_TOPK, SELECT_COST = 0, 1, 2
STOP_PROBLEM, STOP_ROW, STOP_ALL = 0, 1, 2

# Pass-1 iterations per launch for stop="row"/"all" (a GPU trade-off: overshoot after a group
# converged vs. launches; each launch recomputes the cost tiles).
_ERR_ITERS_PER_LAUNCH = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unsupported_reasons(select: int, stop: int) -> List[str]:
    """Why the Triton backend cannot run these modes (empty list = it can).

    Every select (0 sample, 1 topk, 2 cost) and stop (0 problem, 1 row, 2 all) mode is supported;
    the list is non-empty only for unknown mode numbers or when triton is not importable.
    """
    why = []
    if not HAS_TRITON:
        why.append(f"triton is not importable ({_TRITON_IMPORT_ERROR})")
    if select not in (SELECT_SAMPLE, SELECT_TOPK, SELECT_COST):
        why.append(f"unknown select mode {select!r} (0 sample, 1 topk, 2 cost)")
    if stop not in (STOP_PROBLEM, STOP_ROW, STOP_ALL):
        why.append(f"unknown stop mode {stop!r} (0 problem, 1 row, 2 all)")
    return why


if HAS_TRITON:

    @triton.jit
    def _sim_tile(query_ptr, bank_ptr, index_ptr, p, pvalid, M, P, D,
                  PP: tl.constexpr, BLOCK_D: tl.constexpr):
        """S[p, i, j] = sum_d query[p // M, i, d] * bank[index[p], j, d] for the problems ``p``
        ([BLOCK_PROB] int, ``pvalid`` masks the tail), in the input dtype; padded i/j/p give 0.
        Returns (S [BLOCK_PROB, PP, PP], b [BLOCK_PROB], r [BLOCK_PROB] = index[p])."""
        b = p // M
        r = tl.load(index_ptr + p, mask=pvalid, other=0)
        ii = tl.arange(0, PP)
        dd = tl.arange(0, BLOCK_D)
        # [BLOCK_PROB, PP, 1, BLOCK_D] query rows and [BLOCK_PROB, 1, PP, BLOCK_D] bank rows
        q_off = (b.to(tl.int64) * P * D)[:, None, None, None] + (ii * D)[None, :, None, None]
        y_off = (r * P * D)[:, None, None, None] + (ii * D)[None, None, :, None]
        q_row = pvalid[:, None, None, None] & (ii < P)[None, :, None, None]
        y_row = pvalid[:, None, None, None] & (ii < P)[None, None, :, None]
        q0 = tl.load(query_ptr + q_off + dd[None, None, None, :],
                     mask=q_row & (dd < D)[None, None, None, :], other=0.0)
        y0 = tl.load(bank_ptr + y_off + dd[None, None, None, :],
                     mask=y_row & (dd < D)[None, None, None, :], other=0.0)
        s = tl.sum(q0 * y0, axis=3)
        d0 = BLOCK_D
        while d0 < D:  # a while loop: runtime-bound `range` breaks the triton 3.6 interpreter
            dmask = ((d0 + dd) < D)[None, None, None, :]
            d4 = (d0 + dd)[None, None, None, :]
            qv = tl.load(query_ptr + q_off + d4, mask=q_row & dmask, other=0.0)
            yv = tl.load(bank_ptr + y_off + d4, mask=y_row & dmask, other=0.0)
            s += tl.sum(qv * yv, axis=3)
            d0 += BLOCK_D
        return s, b, r

    @triton.jit
    def _sinkhorn_step(nc, f, g, valid2, rvalid, cvalid, eps, log_a):
        """One log-domain Sinkhorn iteration on [BLOCK_PROB, PP, PP] tiles, nc = -C/eps:
        f_i = eps*(log(1/P) - LSE_j(nc_ij + g_j/eps)), then g_j = eps*(log(1/P) - LSE_i(nc_ij +
        f_i/eps)) with the new f; err = sum_i |f_i - f_i_old|. Padded entries are -inf, -inf
        maxima are zeroed (no inf - inf) and padded potentials stay 0.
        Returns (f_new [BLOCK_PROB, PP], g_new [BLOCK_PROB, PP], err [BLOCK_PROB])."""
        x = tl.where(valid2, nc + (g / eps)[:, None, :], float("-inf"))
        mx = tl.max(x, axis=2)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        sx = tl.sum(tl.exp(x - mx[:, :, None]), axis=2)
        sx = tl.where(rvalid, sx, 1.0)
        f_new = tl.where(rvalid, eps * (log_a - (mx + tl.log(sx))), 0.0)
        y = tl.where(valid2, nc + (f_new / eps)[:, :, None], float("-inf"))
        my = tl.max(y, axis=1)
        my = tl.where(my == float("-inf"), 0.0, my)
        sy = tl.sum(tl.exp(y - my[:, None, :]), axis=1)
        sy = tl.where(cvalid, sy, 1.0)
        g_new = tl.where(cvalid, eps * (log_a - (my + tl.log(sy))), 0.0)
        err = tl.sum(tl.abs(f_new - f), axis=1)
        return f_new, g_new, err

    @triton.jit
    def _ot_fwd_kernel(
        query_ptr,    # (B, P, D) fp32/fp64 contiguous
        bank_ptr,     # (R, P, D) same dtype, contiguous
        index_ptr,    # (B*M,) int64, bank row of each problem p = b*M + m
        choice_ptr,   # (B*M,) int64 in [0, K) (SELECT == 0; any valid pointer otherwise)
        niter_ptr,    # (G,) int64 iterations left for each group (FIXED only; any pointer otherwise)
        f0_ptr, g0_ptr,  # (B*M, P) fp32 potentials to resume from (FIXED only; any pointer otherwise)
        out_ptr,      # (B*M, KK) query dtype: KK = K for topk, 1 for sample/cost
        aux_ptr,      # int64 (B*M, KK) flat index i*P+j (select 0/1) | (B*M, P, P) pi (select 2)
        M, P, D,      # problems per query row, patches, features
        L,            # problems per group g = p in [g*L, (g+1)*L); grid (cdiv(L, BLOCK_PROB), G)
        K,            # top-k size (select 0/1)
        eps, log_a,   # entropic regulariser, log(1/P)
        max_iter, tol,
        SELECT: tl.constexpr,      # 0 sample, 1 topk, 2 cost
        FIXED: tl.constexpr,       # False: per-problem freeze on err < tol; True: niter[g] iters
        BLOCK_PROB: tl.constexpr,  # problems per program (power of two)
        PP: tl.constexpr,          # next power of two >= P
        BLOCK_D: tl.constexpr,     # D chunk of the similarity products (power of two)
    ):
        """Fused forward: similarity tiles, log-domain Sinkhorn, selection, stores.

        S_ij = <q_i, y_j>, C = 1 - S, nc = -C/eps; iterate ``_sinkhorn_step`` (FIXED=False: each
        problem freezes after the iteration where its err < tol, at most max_iter iterations, the
        loop ends when every problem of the program froze; FIXED=True: exactly niter[g] more
        from (f0, g0));
        log pi = (f_i + g_j - C_ij)/eps. select 0/1: k iterative arg-maxima of log pi (ties to the
        lowest flat index i*P+j), out = S at the picked entry; select 2: aux = pi = exp(log pi),
        out = 1 - sum_ij pi_ij (1 - S_ij)."""
        chunk = tl.program_id(0)
        grp = tl.program_id(1)
        lp_ = chunk * BLOCK_PROB + tl.arange(0, BLOCK_PROB)
        pvalid = lp_ < L
        p = grp.to(tl.int64) * L + lp_
        s, b, r = _sim_tile(query_ptr, bank_ptr, index_ptr, p, pvalid, M, P, D, PP, BLOCK_D)
        ii = tl.arange(0, PP)
        rvalid = (ii < P)[None, :]
        cvalid = (ii < P)[None, :]
        valid2 = (ii < P)[None, :, None] & (ii < P)[None, None, :]
        nc = -(1.0 - s.to(tl.float32)) / eps  # -C/eps; C itself is not kept (register pressure)
        if FIXED:
            st_off = (p * P)[:, None] + ii[None, :]
            st_mask = pvalid[:, None] & (ii < P)[None, :]
            f = tl.load(f0_ptr + st_off, mask=st_mask, other=0.0)
            g = tl.load(g0_ptr + st_off, mask=st_mask, other=0.0)
            limit = tl.load(niter_ptr + grp)
        else:
            f = tl.zeros([BLOCK_PROB, PP], dtype=tl.float32)
            g = tl.zeros([BLOCK_PROB, PP], dtype=tl.float32)
            limit = max_iter
        active = pvalid
        t = 0
        go = (t < limit) & (tl.sum(active.to(tl.int32), axis=0) > 0)
        while go:
            f_new, g_new, err = _sinkhorn_step(nc, f, g, valid2, rvalid, cvalid, eps, log_a)
            f = tl.where(active[:, None], f_new, f)
            g = tl.where(active[:, None], g_new, g)
            if not FIXED:
                active = active & (err >= tol)
            t += 1
            go = (t < limit) & (tl.sum(active.to(tl.int32), axis=0) > 0)
        lp = (f[:, :, None] + g[:, None, :] - (1.0 - s.to(tl.float32))) / eps
        if SELECT == 2:
            pi = tl.exp(tl.where(valid2, lp, float("-inf")))  # padded entries -> 0, no overflow
            out = 1.0 - tl.sum(tl.sum(pi.to(s.dtype) * (1.0 - s), axis=2), axis=1)
            tl.store(out_ptr + p, out.to(out_ptr.dtype.element_ty), mask=pvalid)
            pi_off = (p * P * P)[:, None, None] + (ii * P)[None, :, None] + ii[None, None, :]
            tl.store(aux_ptr + pi_off, pi.to(aux_ptr.dtype.element_ty),
                     mask=pvalid[:, None, None] & valid2)
        else:
            flat = (ii * P)[None, :, None] + ii[None, None, :]  # [1, PP, PP] flat index i*P + j
            big = PP * PP + P * P
            # NaN for a problem whose plan is not finite (a NaN or inf input): added to its outputs
            nan_or_0 = tl.sum(tl.sum(tl.where(valid2, lp - lp, 0.0), axis=2), axis=1).to(s.dtype)
            lp = tl.where(valid2, lp, float("-inf"))
            if SELECT == 0:
                ch = tl.load(choice_ptr + p, mask=pvalid, other=0)
                n_pick = tl.max(tl.where(pvalid, ch, 0), axis=0) + 1
            else:
                n_pick = K
            pick_idx = tl.zeros([BLOCK_PROB], dtype=tl.int32)
            pick_val = tl.zeros([BLOCK_PROB], dtype=s.dtype)
            sidx = 0
            while sidx < n_pick:
                mx = tl.max(tl.max(lp, axis=2), axis=1)
                hit = lp == mx[:, None, None]
                idx = tl.min(tl.min(tl.where(hit, flat, big), axis=2), axis=1)  # lowest flat index
                idx = tl.where(idx < big, idx, sidx)  # a NaN plan: entry sidx (valid, distinct)
                sel = flat == idx[:, None, None]
                val = tl.sum(tl.sum(tl.where(sel, s, 0.0), axis=2), axis=1) + nan_or_0
                lp = tl.where(sel, float("-inf"), lp)
                if SELECT == 1:
                    tl.store(out_ptr + p * K + sidx, val.to(out_ptr.dtype.element_ty), mask=pvalid)
                    tl.store(aux_ptr + p * K + sidx, idx.to(tl.int64), mask=pvalid)
                else:
                    take = ch == sidx
                    pick_idx = tl.where(take, idx, pick_idx)
                    pick_val = tl.where(take, val, pick_val)
                sidx += 1
            if SELECT == 0:
                tl.store(out_ptr + p, pick_val.to(out_ptr.dtype.element_ty), mask=pvalid)
                tl.store(aux_ptr + p, pick_idx.to(tl.int64), mask=pvalid)

    @triton.jit
    def _ot_err_kernel(
        query_ptr, bank_ptr, index_ptr,  # as in _ot_fwd_kernel
        f_ptr, g_ptr,    # (B*M, P) fp32 potentials after t0 iterations (zeros before the first launch)
        f_out_ptr, g_out_ptr,  # (B*M, P) fp32: the potentials after t1 iterations
        err_ptr,         # (G, n_chunks, n_t) fp32: sum over the program's problems of err
        done_ptr,        # (G,) int32: 1 = the group already stopped, the program returns at once
        M, P, D, L,
        t0, t1,          # run iterations t0 .. t1-1
        n_t,             # err_ptr's last dimension (>= t1 - t0)
        eps, log_a,
        BLOCK_PROB: tl.constexpr, PP: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Pass 1 of the group stopping rules: iterations t0..t1-1 without freezing from the saved
        (f, g), written to (f_out, g_out); err_ptr[g, chunk, t - t0] = sum over the program's
        problems of sum_i |f_i - f_i_old| at iteration t."""
        chunk = tl.program_id(0)
        grp = tl.program_id(1)
        n_chunks = tl.num_programs(0)
        if tl.load(done_ptr + grp) == 0:
            lp_ = chunk * BLOCK_PROB + tl.arange(0, BLOCK_PROB)
            pvalid = lp_ < L
            p = grp.to(tl.int64) * L + lp_
            s, b, r = _sim_tile(query_ptr, bank_ptr, index_ptr, p, pvalid, M, P, D, PP, BLOCK_D)
            ii = tl.arange(0, PP)
            rvalid = (ii < P)[None, :]
            valid2 = (ii < P)[None, :, None] & (ii < P)[None, None, :]
            nc = -(1.0 - s.to(tl.float32)) / eps
            st_off = (p * P)[:, None] + ii[None, :]
            st_mask = pvalid[:, None] & (ii < P)[None, :]
            f = tl.load(f_ptr + st_off, mask=st_mask, other=0.0)
            g = tl.load(g_ptr + st_off, mask=st_mask, other=0.0)
            err_row = err_ptr + (grp.to(tl.int64) * n_chunks + chunk) * n_t
            t = t0
            while t < t1:
                f, g, err = _sinkhorn_step(nc, f, g, valid2, rvalid, rvalid, eps, log_a)
                tl.store(err_row + (t - t0), tl.sum(tl.where(pvalid, err, 0.0), axis=0))
                t += 1
            tl.store(f_out_ptr + st_off, f, mask=st_mask)
            tl.store(g_out_ptr + st_off, g, mask=st_mask)

    @triton.jit
    def _ot_bwd_kernel(
        grad_out_ptr,  # (B, M, KK) query dtype
        bank_ptr,      # (R, P, D)
        index_ptr,     # (B, M) int64
        aux_ptr,       # int64 (B, M, KK) flat indices (select 0/1) | (B, M, P, P) pi (select 2)
        grad_q_ptr,    # (B, P, D) out, query dtype
        M, P, D, KK,
        SELECT: tl.constexpr,   # 0 sample, 1 topk (aux = flat indices), 2 cost (aux = pi)
        PP: tl.constexpr,       # next power of two >= P
        BLOCK_M: tl.constexpr,  # problems of the row gathered at once
        BLOCK_D: tl.constexpr,  # features per program
    ):
        """grad_q[b, i, d] = sum_m sum_j W_m[i, j] * bank[index[b, m], j, d] for one (b, D block).
        select 0/1: W_m[i, j] = sum_s grad_out[b, m, s] [aux[b, m, s] == i*P + j]; select 2:
        W_m = grad_out[b, m, 0] * pi_m. Deterministic, no atomics: chunks of BLOCK_M problems in
        ascending m, inside a chunk s (select 0/1) or j (select 2) ascending and a fixed-shape
        tl.sum over the chunk's problems."""
        bb = tl.program_id(0).to(tl.int64)
        dblk = tl.program_id(1)
        ii = tl.arange(0, PP)
        mm = tl.arange(0, BLOCK_M)
        dd = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = dd < D
        acc = tl.zeros([PP, BLOCK_D], dtype=grad_q_ptr.dtype.element_ty)
        m0 = 0
        while m0 < M:
            mvalid = (m0 + mm) < M
            pm = bb * M + m0 + mm  # [BLOCK_M] problem ids
            row = tl.load(index_ptr + pm, mask=mvalid, other=0) * P * D  # bank set offsets
            ymask = mvalid[:, None] & dmask[None, :]
            if SELECT == 2:
                go = tl.load(grad_out_ptr + pm, mask=mvalid, other=0.0).to(acc.dtype)
                j = 0
                while j < P:
                    pij = tl.load(aux_ptr + (pm * P * P)[:, None] + (ii * P)[None, :] + j,
                                  mask=mvalid[:, None] & (ii < P)[None, :], other=0.0)
                    w = pij.to(acc.dtype) * go[:, None]  # [BLOCK_M, PP]: W_m[:, j]
                    y = tl.load(bank_ptr + row[:, None] + j * D + dd[None, :], mask=ymask,
                                other=0.0)
                    acc += tl.sum(w[:, :, None] * y[:, None, :], axis=0)
                    j += 1
            else:
                sidx = 0
                while sidx < KK:
                    a = tl.load(aux_ptr + pm * KK + sidx, mask=mvalid, other=0)
                    go = tl.load(grad_out_ptr + pm * KK + sidx, mask=mvalid, other=0.0)
                    go = go.to(acc.dtype)
                    y = tl.load(bank_ptr + row[:, None] + ((a % P) * D)[:, None] + dd[None, :],
                                mask=ymask, other=0.0)  # [BLOCK_M, BLOCK_D] bank row j of each pick
                    hit = (a // P)[:, None] == ii[None, :]  # [BLOCK_M, PP] its query row i
                    contrib = tl.where(hit[:, :, None], (go[:, None] * y)[:, None, :], 0.0)
                    acc += tl.sum(contrib, axis=0)
                    sidx += 1
            m0 += BLOCK_M
        tl.store(grad_q_ptr + bb * P * D + (ii * D)[:, None] + dd[None, :], acc,
                 mask=(ii < P)[:, None] & dmask[None, :])


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            f"the triton backend of ot_similarity needs triton ({_TRITON_IMPORT_ERROR})")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_NUM_WARPS = 4  # GPU launches (ignored by the interpreter)


def _blocks(P: int, D: int, L: int) -> Tuple[int, int, int]:
    """(BLOCK_PROB, PP, BLOCK_D) for L problems per group.

    Interpreter: big blocks (its cost is ~ programs x ops, not elements). GPU (untuned, no GPU
    measurement yet): [BLOCK_PROB, PP, PP] tiles of 2048 elements and BLOCK_D = 1 when PP = 16;
    ptxas (sm_90a, triton 3.7.1, 4 warps) reports 153 registers and no spills for (8, 16, 1),
    255 registers with spills for (16, 16, 1) and (8, 16, 2), heavy spills for (16, 16, 4)."""
    PP = _pow2(P)
    if _interpreting():
        bp = max(1, min(_pow2(L), 16384 // (PP * PP)))
        bd = max(1, min(_pow2(D), 262144 // (bp * PP * PP)))
    else:
        bp = max(1, min(_pow2(L), 2048 // (PP * PP)))
        bd = max(1, min(_pow2(D), 2048 // (bp * PP * PP)))
    return bp, PP, bd


def _group_iterations(query, bank, index, eps, max_iter, tol, G, L, blocks):
    """Pass 1 for stop="row"/"all": each group's iteration count and the state to finish it from.

    Returns (stop_at (G,) int64, start (G,) int64, f (B*M, P), g (B*M, P)): group g stops after
    stop_at[g] = T_g iterations (the first whose mean err < tol, else max_iter); (f, g) hold its
    problems' potentials after start[g] <= T_g iterations (the start of the launch that decided it,
    or max_iter).

    Memory is O(B*M*P + G * launches' partial sums), whatever max_iter (no (G, max_iter) table).
    Launches of ``_ERR_ITERS_PER_LAUNCH`` iterations: on a GPU the host reads the groups' done
    flags after launches 2, 4, 8, ... (a host sync each), so a huge max_iter costs about twice the
    launches the slowest group needs, not max_iter / _ERR_ITERS_PER_LAUNCH; on the CPU after each.
    """
    Q = index.numel()
    bp, PP, bd = blocks
    n_chunks = triton.cdiv(L, bp)
    P, D = query.shape[1], query.shape[2]
    dev = query.device
    f_in = torch.zeros(Q, P, dtype=torch.float32, device=dev)
    g_in = torch.zeros(Q, P, dtype=torch.float32, device=dev)
    f_out, g_out = torch.empty_like(f_in), torch.empty_like(g_in)
    f_ck, g_ck = torch.zeros_like(f_in), torch.zeros_like(g_in)  # state at each group's start
    n_t = _ERR_ITERS_PER_LAUNCH
    err = torch.empty(G, n_chunks, n_t, dtype=torch.float32, device=dev)
    stop_at = torch.zeros(G, dtype=torch.int64, device=dev)  # T_g once decided, else 0
    start = torch.zeros(G, dtype=torch.int64, device=dev)
    done = torch.zeros(G, dtype=torch.int32, device=dev)
    log_a = -math.log(P)
    t0, launches = 0, 0
    while t0 < max_iter:
        t1 = min(t0 + n_t, max_iter)
        err.fill_(float("inf"))  # groups done before this launch skip it
        _ot_err_kernel[(n_chunks, G)](
            query, bank, index, f_in, g_in, f_out, g_out, err, done, index.shape[1], P, D, L, t0, t1, n_t,
            float(eps), log_a, BLOCK_PROB=bp, PP=PP, BLOCK_D=bd, num_warps=_NUM_WARPS,
        )
        # group mean err per iteration: fixed-order (deterministic) sum over the group's programs;
        # a NaN mean stops, as in the reference (not >= tol)
        mean = err[:, :, : t1 - t0].sum(dim=1) / L
        below = ~(mean >= tol) & (done == 0)[:, None]
        hit = below.any(dim=1)
        first = below.to(torch.int8).argmax(dim=1)  # first True
        stop_at = torch.where(hit, t0 + first + 1, stop_at)
        start = torch.where(hit, torch.full_like(start, t0), start)
        mask = hit.repeat_interleave(L)[:, None]
        f_ck, g_ck = torch.where(mask, f_in, f_ck), torch.where(mask, g_in, g_ck)
        done = (stop_at > 0).to(torch.int32)
        f_in, f_out, g_in, g_out = f_out, f_in, g_out, g_in  # the running groups' new state
        t0, launches = t1, launches + 1
        if (dev.type != "cuda" or launches & (launches - 1) == 0) and bool(done.all()):
            break
    never = stop_at == 0  # ran max_iter: finish from the last state, 0 iterations left
    mask = never.repeat_interleave(L)[:, None]
    f_ck, g_ck = torch.where(mask, f_in, f_ck), torch.where(mask, g_in, g_ck)
    stop_at = torch.where(never, torch.full_like(stop_at, max_iter), stop_at)
    start = torch.where(never, torch.full_like(start, max_iter), start)
    return stop_at, start, f_ck, g_ck


def ot_similarity_fwd_triton(query: torch.Tensor, bank: torch.Tensor, index: torch.Tensor,
                             choice: torch.Tensor, select: int, k: int, eps: float, max_iter: int,
                             tol: float, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Contract fwd (docs/OT_BACKEND_CONTRACT.md): returns (out (B, M, kk), aux).

    out has query's dtype; aux is int64 (B, M, kk) flat plan indices for select 0/1 and the plan
    (B, M, P, P) in query's dtype for select 2. Sinkhorn runs in fp32 (see the module docstring).
    """
    _require_triton()
    why = triton_unsupported_reasons(select, stop)
    if why:
        raise NotImplementedError("ot_similarity triton backend: " + "; ".join(why))
    query, bank, index = query.contiguous(), bank.contiguous(), index.contiguous()
    B, P, D = query.shape
    M = index.shape[1]
    Q = B * M
    kk = k if select == SELECT_TOPK else 1
    dev, dt = query.device, query.dtype
    out = torch.empty(B, M, kk, dtype=dt, device=dev)
    if select == SELECT_COST:
        aux = torch.zeros(B, M, P, P, dtype=dt, device=dev)
    else:
        aux = torch.empty(B, M, kk, dtype=torch.int64, device=dev)
    if Q == 0:
        return out, aux
    if stop == STOP_ROW:
        G, L = B, M
    else:
        G, L = 1, Q
    blocks = _blocks(P, D, L)
    bp, PP, bd = blocks
    if stop == STOP_PROBLEM:
        niter, f0, g0, fixed = index, index, index, False  # any pointers: unused
    else:
        stop_at, start, f0, g0 = _group_iterations(query, bank, index, eps, max_iter, tol, G, L, blocks)
        niter, fixed = stop_at - start, True
    ch = choice.contiguous() if select == SELECT_SAMPLE else index
    grid = (triton.cdiv(L, bp), G)
    _ot_fwd_kernel[grid](
        query, bank, index, ch, niter, f0, g0, out, aux, M, P, D, L, k,
        float(eps), -math.log(P), int(max_iter), float(tol),
        SELECT=int(select), FIXED=fixed, BLOCK_PROB=bp, PP=PP, BLOCK_D=bd, num_warps=_NUM_WARPS,
    )
    return out, aux


def ot_similarity_bwd_triton(grad_out: torch.Tensor, query: torch.Tensor, bank: torch.Tensor,
                             index: torch.Tensor, aux: torch.Tensor, select: int) -> torch.Tensor:
    """Contract bwd: grad_query (B, P, D) in query's dtype (see the contract for the formula)."""
    _require_triton()
    B, P, D = query.shape
    M = index.shape[1]
    grad_q = torch.zeros(B, P, D, dtype=query.dtype, device=query.device)
    if B * M == 0:
        return grad_q
    grad_out = grad_out.to(query.dtype).contiguous()
    bank, index, aux = bank.contiguous(), index.contiguous(), aux.contiguous()
    kk = grad_out.shape[-1] if grad_out.dim() == 3 else 1
    PP = _pow2(P)
    # [BLOCK_M, PP, BLOCK_D] temporaries: big in the interpreter, ~4k elements on a GPU (untuned)
    bm, cap = (min(_pow2(M), 64), 65536) if _interpreting() else (16, 4096)
    bd = max(1, min(_pow2(D), cap // (bm * PP)))
    _ot_bwd_kernel[(B, triton.cdiv(D, bd))](
        grad_out, bank, index, aux, grad_q, M, P, D, kk,
        SELECT=int(select), PP=PP, BLOCK_M=bm, BLOCK_D=bd, num_warps=_NUM_WARPS,
    )
    return grad_q
