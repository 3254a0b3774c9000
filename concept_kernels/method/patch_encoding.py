"""Patch crops (:func:`roi_align`), per-position batch-norm statistics for the patch passes
(:func:`grouped_batch_norm`) and the query encoder's BN momentum 0 there (:func:`fixed_batch_norm`),
method_spec §5.2."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def roi_align(x: torch.Tensor, boxes: torch.Tensor, output_size: tuple[int, int],
              spatial_scale: float = 1.0) -> torch.Tensor:
    """torchvision's ``roi_align(aligned=True, sampling_ratio=-1)`` in pure torch (torchvision's
    compiled ops do not load next to the CPU torch).

    x (N, C, H, W); boxes (R, 5) rows (batch_idx, x1, y1, x2, y2) in x's pixels / ``spatial_scale``
    -> (R, C, oh, ow). Bin (i, j) averages ceil(roi_h/oh) x ceil(roi_w/ow) bilinear samples at pixel
    coordinates shifted by -0.5; samples beyond 1 pixel outside the map are 0, the rest are clamped
    to the border, so a 64-px box at integer coordinates with output 64 is an exact pixel crop.
    """
    oh, ow = output_size
    N, C, H, W = x.shape
    out = x.new_zeros(boxes.shape[0], C, oh, ow)
    x1, y1, x2, y2 = (boxes[:, 1:].to(x.dtype) * spatial_scale - 0.5).unbind(1)  # aligned=True
    gh = torch.ceil((y2 - y1) / oh).clamp(min=1).long()
    gw = torch.ceil((x2 - x1) / ow).clamp(min=1).long()
    key = gh * 100_000 + gw
    for k in torch.unique(key).tolist():  # one grid_sample per sample count (they differ at clipped borders)
        sel = (key == k).nonzero().squeeze(1)
        sh, sw = divmod(k, 100_000)
        ty = (torch.arange(oh * sh, device=x.device, dtype=x.dtype) + 0.5) / sh  # bin units
        tx = (torch.arange(ow * sw, device=x.device, dtype=x.dtype) + 0.5) / sw
        py = y1[sel, None] + ty * ((y2 - y1)[sel, None] / oh)  # (r, oh*sh) pixel rows
        px = x1[sel, None] + tx * ((x2 - x1)[sel, None] / ow)
        valid = ((py >= -1) & (py <= H))[:, :, None] & ((px >= -1) & (px <= W))[:, None, :]
        gy = 2 * py.clamp(0, H - 1) / max(H - 1, 1) - 1  # align_corners=True: pixel 0 -> -1
        gx = 2 * px.clamp(0, W - 1) / max(W - 1, 1) - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        s = F.grid_sample(x[boxes[sel, 0].long()], grid, mode="bilinear", padding_mode="border", align_corners=True)
        s = s * valid[:, None].to(s.dtype)
        out[sel] = F.avg_pool2d(s, (sh, sw)) if sh * sw > 1 else s
    return out


class _GroupBatchNorm(torch.autograd.Function):
    """Batch norm of x (G*B, C, ...) with statistics per group of B consecutive entries (NCHW or
    channels-last). Forward: ATen's batch-norm kernel per group, into slices of one output; with
    running stats, group g also updates them in place at momentum ``momenta[g]`` (ATen's own EMA with
    the unbiased variance, in group order: what G sequential train-mode calls do). Backward: all groups
    at once on the (G, M, C) view (M = B*H*W), xhat = (x - mean) * invstd:
    dx = w * invstd * (dy - mean_M(dy) - xhat * mean_M(dy * xhat)), dw = sum dy * xhat, db = sum dy.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momenta, eps, groups):
        out, mean, invstd = torch.empty_like(x), x.new_empty(groups, x.shape[1]), x.new_empty(groups, x.shape[1])
        for g, (xg, og) in enumerate(zip(x.chunk(groups), out.chunk(groups))):
            if running_mean is None:
                torch.ops.aten._native_batch_norm_legit.no_stats_out(
                    xg, weight, bias, True, 0.0, eps, out=og, save_mean=mean[g], save_invstd=invstd[g])
            else:
                torch.ops.aten._native_batch_norm_legit.out(
                    xg, weight, bias, running_mean, running_var, True, momenta[g], eps, out=og,
                    save_mean=mean[g], save_invstd=invstd[g])
        ctx.save_for_backward(x, weight, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        (G, C), last = mean.shape, x.movedim(1, -1)  # (N, ..., C): a view of channels-last data
        xv, dyv = last.reshape(G, -1, C), dy.movedim(1, -1).reshape(G, -1, C)
        mean, invstd = mean[:, None], invstd[:, None]
        s_dy = dyv.sum(1, keepdim=True)
        s_dyxhat = ((dyv * xv).sum(1, keepdim=True) - mean * s_dy) * invstd
        a = invstd if weight is None else invstd * weight
        coef = a * invstd * s_dyxhat / xv.shape[1]
        dx = torch.addcmul(coef * mean - a * s_dy / xv.shape[1], dyv, a).addcmul_(xv, coef, value=-1)
        dw = s_dyxhat.sum((0, 1)) if ctx.needs_input_grad[1] else None
        db = s_dy.sum((0, 1)) if ctx.needs_input_grad[2] else None
        return dx.view(last.shape).movedim(-1, 1), dw, db, None, None, None, None, None


def _batch_norms(network: nn.Module) -> list[_BatchNorm]:
    return [m for m in network.modules() if isinstance(m, _BatchNorm)]


def _sequential_momenta(bn: _BatchNorm, momentum: float, groups: int) -> list[float]:
    """The EMA factors of ``groups`` train-mode calls of ``bn`` in a row, the first of which was
    given ``momentum``: that constant, or with ``bn.momentum`` None (cumulative average) 1/n, 1/(n+1),
    ... where n = ``bn.num_batches_tracked`` (read on the host), already counted for the first call by
    ``bn.forward``."""
    if bn.momentum is not None:
        return [momentum] * groups
    n = int(bn.num_batches_tracked)
    return [1.0 / (n + g) for g in range(groups)]


@contextmanager
def grouped_batch_norm(groups: int, network: nn.Module) -> Iterator[None]:
    """Within the block, the batch norms of ``network`` in batch-statistics mode normalise a
    group-major batch (G*B, C, ...) with each group's own statistics: one forward of ``network`` ==
    G separate train-mode forwards of the B-entry groups in group order, outputs, gradients and
    buffers alike. A batch norm that tracks running stats updates them as the G calls would (one
    EMA step per group at its momentum, with that group's unbiased variance; momentum None: the
    cumulative average) and counts G in ``num_batches_tracked``; momentum 0 leaves them unchanged
    (the published patch passes of the query encoder, see :func:`fixed_batch_norm`). Eval-mode batch
    norms are unaffected.

    It swaps ``torch.nn.functional.batch_norm`` (not thread-safe), which catches ``nn.BatchNorm*`` and
    timm's ``BatchNormAct2d``. Raises ValueError if the batch is not a multiple of G, if a batch norm
    with running stats that is not part of ``network`` runs in batch-statistics mode, or if one runs
    twice in the block (G passes would interleave its running-stat updates differently).
    """
    if not (isinstance(groups, int) and groups >= 1):
        raise ValueError(f"grouped_batch_norm: groups must be an int >= 1, got {groups!r}")
    if not isinstance(network, nn.Module):
        raise TypeError(f"grouped_batch_norm: network must be an nn.Module, got {type(network).__name__}")
    by_stats = {id(m.running_mean): m for m in _batch_norms(network) if m.running_mean is not None}
    ran: set[int] = set()
    original = F.batch_norm

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5):
        if not (training or running_mean is None):
            return original(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if input.shape[0] % groups:
            raise ValueError(f"grouped_batch_norm({groups}): batch {input.shape[0]} is not a multiple "
                             "of the group count")
        bn, momenta = None, None
        if running_mean is not None:
            bn = by_stats.get(id(running_mean))
            if bn is None:
                raise ValueError(f"grouped_batch_norm({groups}): a batch norm with running stats that is not "
                                 f"part of network ({type(network).__name__}) ran in batch-statistics mode")
            if id(running_mean) in ran:
                raise ValueError(f"grouped_batch_norm({groups}): a batch norm ({bn}) ran twice in one block; "
                                 f"its running stats cannot be updated as {groups} separate passes would")
            ran.add(id(running_mean))
            momenta = _sequential_momenta(bn, momentum, groups)
        if not input.is_contiguous(memory_format=torch.channels_last):
            input = input.contiguous()
        out = _GroupBatchNorm.apply(input, weight, bias, running_mean, running_var, momenta, eps, groups)
        if bn is not None and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(groups - 1)  # bn.forward counted the first group
        return out

    torch.nn.functional.batch_norm = batch_norm
    try:
        yield
    finally:
        torch.nn.functional.batch_norm = original


@contextmanager
def fixed_batch_norm(network: nn.Module) -> Iterator[None]:
    """Within the block every batch norm of ``network`` has momentum 0 (the published ``fix_bn``):
    train-mode passes normalise with batch statistics, leave the running stats unchanged and still
    count ``num_batches_tracked``. Restores each module's momentum (None included) on exit."""
    saved = [(m, m.momentum) for m in _batch_norms(network)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum
