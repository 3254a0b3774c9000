"""Patch cropping and per-position batch-norm statistics for the patch passes (method_spec §5.2).

* :func:`roi_align`: torchvision's ``roi_align(aligned=True, sampling_ratio=-1)`` in pure torch
  (``F.grid_sample``), since torchvision's compiled ops do not load next to the CPU torch.
* :func:`grouped_batch_norm`: a context manager under which every batch norm that normalises with
  batch statistics computes them per group of the batch and leaves the running stats alone. For a
  position-major batch of P*B patches this is exactly the published P separate passes with BN
  momentum 0, in one pass.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F


def roi_align(x: torch.Tensor, boxes: torch.Tensor, output_size: Tuple[int, int],
              spatial_scale: float = 1.0) -> torch.Tensor:
    """RoIAlign with ``aligned=True`` and the adaptive sampling ratio (torchvision semantics).

    Bin (i, j) of a box averages ceil(roi_h/oh) x ceil(roi_w/ow) bilinear samples placed evenly in
    the bin, in pixel coordinates shifted by -0.5 (aligned); samples beyond 1 pixel outside the
    map are 0, the rest are clamped to the border. A 64-px box at integer coordinates with output
    64 is therefore an exact pixel crop. Boxes with equal sample counts are handled in one
    ``grid_sample`` call (the counts differ only for clipped border boxes).

    Args:
        x: (N, C, H, W) float input.
        boxes: (R, 5) rows (batch_idx, x1, y1, x2, y2) in input coordinates / ``spatial_scale``.
        output_size: (oh, ow).
        spatial_scale: factor from box coordinates to ``x``'s pixels.

    Returns:
        (R, C, oh, ow).
    """
    oh, ow = output_size
    N, C, H, W = x.shape
    out = x.new_zeros(boxes.shape[0], C, oh, ow)
    coords = boxes[:, 1:].to(x.dtype) * spatial_scale - 0.5  # aligned=True
    x1, y1, x2, y2 = coords.unbind(1)
    gh = torch.ceil((y2 - y1) / oh).clamp(min=1).long()
    gw = torch.ceil((x2 - x1) / ow).clamp(min=1).long()
    key = gh * 100_000 + gw
    for k in torch.unique(key).tolist():  # host sync: a handful of distinct counts per call
        sel = (key == k).nonzero().squeeze(1)
        sh, sw = divmod(k, 100_000)
        ty = (torch.arange(oh * sh, device=x.device, dtype=x.dtype) + 0.5) / sh  # bin units
        tx = (torch.arange(ow * sw, device=x.device, dtype=x.dtype) + 0.5) / sw
        py = y1[sel, None] + ty * ((y2 - y1)[sel, None] / oh)  # (r, oh*sh) pixel rows
        px = x1[sel, None] + tx * ((x2 - x1)[sel, None] / ow)
        valid = (py >= -1) & (py <= H)
        valid = valid[:, :, None] & ((px >= -1) & (px <= W))[:, None, :]
        gy = 2 * py.clamp(0, H - 1) / max(H - 1, 1) - 1  # align_corners=True: pixel 0 -> -1
        gx = 2 * px.clamp(0, W - 1) / max(W - 1, 1) - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        img = x[boxes[sel, 0].long()]
        s = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)
        s = s * valid[:, None].to(s.dtype)
        out[sel] = F.avg_pool2d(s, (sh, sw)) if sh * sw > 1 else s
    return out


class _GroupBatchNorm(torch.autograd.Function):
    """Batch norm of ``x`` (G*B, C, ...) with statistics per group of B consecutive entries.

    Forward: each group is a contiguous slice of the batch (NCHW and channels-last alike), normalised
    by one call of ATen's native batch-norm kernel writing into the matching slice of one output
    with ``x``'s own strides. Backward: all groups at once on the (G, M, C) view of channels-last
    data (M = B*H*W), with xhat = (x - mean) * invstd:
    dx = w * invstd * (dy - mean_M(dy) - xhat * mean_M(dy * xhat)), dw = sum dy * xhat, db = sum dy.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, groups):
        out, mean, invstd = torch.empty_like(x), x.new_empty(groups, x.shape[1]), x.new_empty(groups, x.shape[1])
        for g, (xg, og) in enumerate(zip(x.chunk(groups), out.chunk(groups))):
            torch.ops.aten._native_batch_norm_legit.no_stats_out(
                xg, weight, bias, True, 0.0, eps, out=og, save_mean=mean[g], save_invstd=invstd[g])
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
        return dx.view(last.shape).movedim(-1, 1), dw, db, None, None


def _layout(x: torch.Tensor) -> torch.memory_format:
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@contextmanager
def grouped_batch_norm(groups: int) -> Iterator[None]:
    """Batch norms in batch-statistics mode use per-group statistics; running stats stay as they are.

    The batch must be group-major: (G*B, C, ...) where entries g*B .. g*B + B - 1 form group g (as
    ``torch.cat`` of G batches, or the patch crops of ``ConceptTuner._image_patches``). Group g is
    normalised with the mean/var of its B entries: identical to G separate passes in train mode with
    BN momentum 0 (running stats untouched; ``num_batches_tracked`` still counts, as in the
    published momentum-0 passes), in one autograd op per layer. Batch norms that use running stats
    (eval mode) are unaffected. It works by swapping ``torch.nn.functional.batch_norm`` while the
    block runs (not thread-safe), which catches ``nn.BatchNorm*`` and timm's ``BatchNormAct2d``.
    """
    original = F.batch_norm

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5):
        if not (training or running_mean is None):
            return original(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if input.shape[0] % groups:
            raise ValueError(f"grouped_batch_norm({groups}): batch {input.shape[0]} is not a multiple of the group count")
        return _GroupBatchNorm.apply(input.contiguous(memory_format=_layout(input)), weight, bias, eps, groups)

    torch.nn.functional.batch_norm = batch_norm
    try:
        yield
    finally:
        torch.nn.functional.batch_norm = original


def feature_stride(image_size: Tuple[int, int], feature_size: Tuple[int, int]) -> Tuple[float, float]:
    """Pixels per feature cell along (H, W), e.g. (32, 32) for a 7x7 map of a 224-px input."""
    return image_size[0] / feature_size[0], image_size[1] / feature_size[1]


def default_patch_pixels(image_size: Tuple[int, int], feature_size: Tuple[int, int]) -> int:
    """Side of an exact crop of a full (unclipped) box: twice the stride (64 at 224 px / 7x7)."""
    return int(math.ceil(2 * max(feature_stride(image_size, feature_size))))
