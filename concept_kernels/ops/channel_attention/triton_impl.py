"""Triton backend of ``channel_attention``: a flash-style fused kernel that never builds B x C x C.

Math (method_spec §3.2, performance_notes §1.1). With X = x.view(B, C, N) the channels are the
tokens and the N = H·W positions the head dimension:

    S_ij = -x_i · x_j                     (= q_i · k_j with q = -x, k = v = x, scale 1)
    P    = softmax_j(S)                   (= softmax(rowmax(E) - E), E = X Xᵀ)
    O    = P X,   out = gamma * O + x,    lse_i = logsumexp_j S_ij

Forward: one program per (block of BLOCK_M query channels, sample); online softmax over blocks of
BLOCK_N key channels; writes out, O and lse (the backward contract, see function.py).

Backward: S is symmetric (S_ij = S_ji), so ONE kernel over key blocks j computes every role of x_j:

    dx_j = dout_j + gamma * ( Σ_i P_ij dO_i  -  Σ_i (dS_ij + dS_ji) x_i )
                              └ v-role ┘       └ k-role ┘ └ q-role ┘
    dS_ij = P_ij (dO_i · x_j - Δ_i),   Δ_i = dO_i · O_i,   dO = dout (gamma applied at the end)

Per (i, j) tile it recomputes S once and both P_ij (with lse_i) and P_ji (with lse_j): 5 dots and no
atomics, against 7 dots in the two-kernel FlashAttention-2 backward. dgamma = Σ_i Δ_i.

Head dimension N is arbitrary (49, 196, 4, ..., 12544): the kernels pad it to BLOCK_D = next power of
two (>= 16, tl.dot's minimum) with masked loads; zero columns add nothing to any dot product. Above
MAX_BLOCK_D positions N is tiled: a third grid axis gives each program one tile of output positions,
and every program sums S (and the backward's dO x products) over all N tiles (recomputed per output
tile: (tiles + 1) / 2 times the forward's dot work, against a block size that grew with N and broke
Triton's tensor limit from N > 32768).

Accuracy: fp32 inputs use ``input_precision="ieee"`` by default ("tf32x3" selectable). Plain TF32 is
refused: unscaled energies reach the hundreds and TF32 moves them by 0.1-1 (performance_notes §1.2).
fp16/bf16 inputs run their dots in the input dtype on the GPU (opt-in low precision, checked with
the 2x rule); the interpreter cannot do bf16 dots, so there operands are upcast to fp32.
fp64 runs fp64 dots (tests, gradcheck).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

PRECISIONS = ("ieee", "tf32x3")


@triton.jit
def _row_dots(A, B, base, offs_i, mask_i, offs_j, mask_j, stride_c, N,
              BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, LOWP_DOT: tl.constexpr, ACC: tl.constexpr):
    """[i, j] = A_i . B_j over all N positions, BLOCK_D at a time (rows of two (C, N) slices at base)."""
    out = tl.zeros([BLOCK_I, BLOCK_J], ACC)
    for d0 in range(0, N, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < N
        a = tl.load(A + base + offs_i[:, None] * stride_c + offs_d[None, :],
                    mask=mask_i[:, None] & mask_d[None, :], other=0.0)
        b = tl.load(B + base + offs_j[:, None] * stride_c + offs_d[None, :],
                    mask=mask_j[:, None] & mask_d[None, :], other=0.0)
        a = a if LOWP_DOT else a.to(ACC)
        b = b if LOWP_DOT else b.to(ACC)
        out += tl.dot(a, tl.trans(b), input_precision=PRECISION, out_dtype=ACC)
    return out


@triton.jit
def _channel_attention_fwd_kernel(
    X,  # (B, C, N) input, last dim contiguous
    GAMMA,  # one-element tensor: the residual scale (read on device, no host sync)
    OUT,  # (B, C, N) out = gamma * O + x, x's dtype
    ATT,  # (B, C, N) O = softmax(-X Xᵀ) X, x's dtype (saved for backward)
    LSE,  # (B, C) logsumexp of each query row of S, ACC dtype (saved for backward)
    C,  # channels = tokens
    N,  # positions = head dimension (unpadded)
    stride_b,  # elements between samples in X / OUT / ATT
    stride_c,  # elements between channels (rows) in X / OUT / ATT
    BLOCK_M: tl.constexpr,  # query channels per program
    BLOCK_N: tl.constexpr,  # key channels per inner step
    BLOCK_D: tl.constexpr,  # positions per tile: N padded to a power of two >= 16, at most MAX_BLOCK_D
    ONE_TILE: tl.constexpr,  # N <= BLOCK_D: rows stay in registers; else S sums over the N tiles
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
    LOWP_DOT: tl.constexpr,  # run dots in X's dtype (fp16/bf16 on a GPU); else in ACC dtype
    ACC: tl.constexpr,  # accumulation dtype (fp32, or fp64 for fp64 inputs)
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)  # this program's tile of output positions
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < C
    mask_d = offs_d < N
    base = b * stride_b
    ptr_m = base + offs_m[:, None] * stride_c + offs_d[None, :]
    xq = tl.load(X + ptr_m, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q = xq if LOWP_DOT else xq.to(ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, C, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < C
        xk = tl.load(X + base + offs_n[:, None] * stride_c + offs_d[None, :],
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        k = xk if LOWP_DOT else xk.to(ACC)
        if ONE_TILE:
            s = -tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)  # S_ij = -x_i . x_j
        else:  # every N tile (each program of the row block recomputes S for its output tile)
            s = -_row_dots(X, X, base, offs_m, mask_m, offs_n, mask_n, stride_c, N,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, LOWP_DOT, ACC)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block has a valid column
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(xk.dtype) if LOWP_DOT else p
        acc = acc * alpha[:, None] + tl.dot(pv, k, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new

    o = acc / l_i[:, None]
    lse = m_i + tl.log(l_i)
    gamma = tl.load(GAMMA).to(ACC)
    out = gamma * o + xq.to(ACC)
    mask = mask_m[:, None] & mask_d[None, :]
    tl.store(OUT + ptr_m, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(ATT + ptr_m, o.to(ATT.dtype.element_ty), mask=mask)
    tl.store(LSE + b * C + offs_m, lse, mask=mask_m & (pid_d == 0))  # the same in every N tile


@triton.jit
def _channel_attention_bwd_kernel(
    X,  # (B, C, N) input, last dim contiguous
    DOUT,  # (B, C, N) upstream gradient of out, same strides as X
    GAMMA,  # one-element tensor
    LSE,  # (B, C) from the forward, ACC dtype
    DELTA,  # (B, C) Δ_i = dout_i · O_i, ACC dtype
    DX,  # (B, C, N) output gradient of x, same strides as X
    C,  # channels
    N,  # positions (unpadded)
    stride_b,  # elements between samples in X / DOUT / DX
    stride_c,  # elements between channels in X / DOUT / DX
    BLOCK_M: tl.constexpr,  # channels i per inner step
    BLOCK_N: tl.constexpr,  # channels j owned by this program
    BLOCK_D: tl.constexpr,  # positions per tile (as in the forward)
    ONE_TILE: tl.constexpr,  # N <= BLOCK_D
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
    LOWP_DOT: tl.constexpr,  # run dots in X's dtype
    ACC: tl.constexpr,  # accumulation dtype
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)  # this program's tile of output positions
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_j = offs_j < C
    mask_d = offs_d < N
    base = b * stride_b
    ptr_j = base + offs_j[:, None] * stride_c + offs_d[None, :]
    mask_jd = mask_j[:, None] & mask_d[None, :]
    xj_raw = tl.load(X + ptr_j, mask=mask_jd, other=0.0)
    doj_raw = tl.load(DOUT + ptr_j, mask=mask_jd, other=0.0)
    xj = xj_raw if LOWP_DOT else xj_raw.to(ACC)
    doj = doj_raw if LOWP_DOT else doj_raw.to(ACC)
    lse_j = tl.load(LSE + b * C + offs_j, mask=mask_j, other=float("inf"))  # padded: P = 0
    delta_j = tl.load(DELTA + b * C + offs_j, mask=mask_j, other=0.0)

    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, C, BLOCK_M):
        offs_i = start_m + tl.arange(0, BLOCK_M)
        mask_i = offs_i < C
        ptr_i = base + offs_i[:, None] * stride_c + offs_d[None, :]
        mask_id = mask_i[:, None] & mask_d[None, :]
        xi_raw = tl.load(X + ptr_i, mask=mask_id, other=0.0)
        doi_raw = tl.load(DOUT + ptr_i, mask=mask_id, other=0.0)
        xi = xi_raw if LOWP_DOT else xi_raw.to(ACC)
        doi = doi_raw if LOWP_DOT else doi_raw.to(ACC)
        lse_i = tl.load(LSE + b * C + offs_i, mask=mask_i, other=float("inf"))
        delta_i = tl.load(DELTA + b * C + offs_i, mask=mask_i, other=0.0)

        if ONE_TILE:
            s = -tl.dot(xi, tl.trans(xj), input_precision=PRECISION, out_dtype=ACC)  # [i, j] = S_ij = S_ji
            dp_ij = tl.dot(doi, tl.trans(xj), input_precision=PRECISION, out_dtype=ACC)  # dO_i . x_j
            dp_ji = tl.dot(xi, tl.trans(doj), input_precision=PRECISION, out_dtype=ACC)  # dO_j . x_i
        else:  # the same three products over every N tile
            s = -_row_dots(X, X, base, offs_i, mask_i, offs_j, mask_j, stride_c, N,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, LOWP_DOT, ACC)
            dp_ij = _row_dots(DOUT, X, base, offs_i, mask_i, offs_j, mask_j, stride_c, N,
                              BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, LOWP_DOT, ACC)
            dp_ji = _row_dots(X, DOUT, base, offs_i, mask_i, offs_j, mask_j, stride_c, N,
                              BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, LOWP_DOT, ACC)
        p_ij = tl.exp(s - lse_i[:, None])  # query i attends key j (0 on padded i / j via lse = inf)
        p_ji = tl.exp(s - lse_j[None, :])  # query j attends key i, stored at [i, j]
        p_ji = tl.where(mask_i[:, None], p_ji, 0.0)
        ds = p_ij * (dp_ij - delta_i[:, None]) + p_ji * (dp_ji - delta_j[None, :])  # dS_ij + dS_ji
        if LOWP_DOT:
            acc += tl.dot(tl.trans(p_ij.to(xi_raw.dtype)), doi, input_precision=PRECISION, out_dtype=ACC)
            acc -= tl.dot(tl.trans(ds.to(xi_raw.dtype)), xi, input_precision=PRECISION, out_dtype=ACC)
        else:
            acc += tl.dot(tl.trans(p_ij), doi, input_precision=PRECISION, out_dtype=ACC)
            acc -= tl.dot(tl.trans(ds), xi, input_precision=PRECISION, out_dtype=ACC)

    gamma = tl.load(GAMMA).to(ACC)
    dx = doj_raw.to(ACC) + gamma * acc
    tl.store(DX + ptr_j, dx.to(DX.dtype.element_ty), mask=mask_jd)


# ---- launchers ---------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _acc_dtype(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


MAX_BLOCK_D = 256  # positions per tile (untuned): a (64, 256) fp32 accumulator is 128 registers a thread


def _block_d(n: int, block_d: Optional[int]) -> Tuple[int, int]:
    """(BLOCK_D, number of N tiles): N padded to a power of two >= 16 (tl.dot's minimum), at most
    MAX_BLOCK_D, or ``block_d`` (a power of two >= 16; tests force small tiles)."""
    if block_d is None:
        bd = min(max(16, triton.next_power_of_2(n)), MAX_BLOCK_D)
    elif isinstance(block_d, int) and block_d >= 16 and block_d & (block_d - 1) == 0:
        bd = block_d
    else:
        raise ValueError(f"block_d must be a power of two >= 16, got {block_d!r}")
    return bd, triton.cdiv(n, bd)


def _blocks(C: int, block_d: int, block_m: Optional[int], block_n: Optional[int]) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). Untuned GPU defaults (no multi-config autotune: the interpreter
    cannot run one); smaller tiles for wide heads so the (BLOCK, BLOCK_D) accumulators fit registers."""
    default = 64 if block_d <= 64 else 32
    if _interpreting():
        default = 32  # interpreter cost ~ programs x ops: few programs, but small tests
    bm = block_m or default
    bn = block_n or default
    return bm, bn, (8 if block_d >= 128 else 4)


def _dot_mode(dtype: torch.dtype, precision: str) -> Tuple[bool, str]:
    """(LOWP_DOT, PRECISION): fp16/bf16 dots stay in their dtype on a GPU (input_precision is then
    irrelevant: pass Triton's default); the interpreter cannot do bf16 dots, so it upcasts."""
    lowp = dtype in (torch.float16, torch.bfloat16) and not _interpreting()
    return lowp, ("tf32" if lowp else precision)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS} (plain tf32 is too coarse for "
                         f"unscaled channel energies), got {precision!r}")


def channel_attention_fwd_triton(x3: torch.Tensor, gamma: torch.Tensor, precision: str = "ieee", *,
                                 block_m: Optional[int] = None, block_n: Optional[int] = None,
                                 block_d: Optional[int] = None):
    """x3 (B, C, N) -> (out (B, C, N) x.dtype, att (B, C, N) x.dtype, lse (B, C) fp32|fp64)."""
    _check_precision(precision)
    x3 = x3.contiguous()
    B, C, N = x3.shape
    acc_tl, acc_t = _acc_dtype(x3.dtype)
    out = torch.empty_like(x3)
    att = torch.empty_like(x3)
    lse = torch.empty(B, C, device=x3.device, dtype=acc_t)
    if B == 0:
        return out, att, lse
    bd, tiles = _block_d(N, block_d)
    bm, bn, warps = _blocks(C, bd, block_m, block_n)
    lowp, prec = _dot_mode(x3.dtype, precision)
    grid = (triton.cdiv(C, bm), B, tiles)
    _channel_attention_fwd_kernel[grid](
        x3, gamma, out, att, lse, C, N, x3.stride(0), x3.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ONE_TILE=tiles == 1, PRECISION=prec, LOWP_DOT=lowp, ACC=acc_tl,
        num_warps=warps,
    )
    return out, att, lse


def channel_attention_bwd_triton(dout: torch.Tensor, x3: torch.Tensor, gamma: torch.Tensor, att: torch.Tensor,
                                 lse: torch.Tensor, precision: str = "ieee", *,
                                 block_m: Optional[int] = None, block_n: Optional[int] = None,
                                 block_d: Optional[int] = None):
    """-> (dx (B, C, N) x.dtype, dgamma () in the accumulation dtype)."""
    _check_precision(precision)
    x3 = x3.contiguous()
    dout = dout.to(x3.dtype).contiguous()
    B, C, N = x3.shape
    acc_tl, acc_t = _acc_dtype(x3.dtype)
    delta = (dout.to(acc_t) * att.to(acc_t)).sum(-1)  # (B, C): Δ_i = dout_i . O_i
    dgamma = delta.sum()
    dx = torch.empty_like(x3)
    if B == 0:
        return dx, dgamma
    bd, tiles = _block_d(N, block_d)
    bm, bn, warps = _blocks(C, bd, block_m, block_n)
    lowp, prec = _dot_mode(x3.dtype, precision)
    grid = (triton.cdiv(C, bn), B, tiles)
    _channel_attention_bwd_kernel[grid](
        x3, dout, gamma, lse.contiguous(), delta, dx, C, N, x3.stride(0), x3.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, ONE_TILE=tiles == 1, PRECISION=prec, LOWP_DOT=lowp, ACC=acc_tl,
        num_warps=warps,
    )
    return dx, dgamma


def flops(B: int, C: int, N: int, mode: str = "fwd") -> float:
    """Matmul FLOPs of the fused kernels (for benchmark TFLOP/s): fwd 2 dots, bwd 5 dots of C x C x N."""
    per_dot = 2.0 * B * C * C * N
    return per_dot * (2 if mode == "fwd" else 5 if mode == "bwd" else 7)
