"""Vectorized concept-patch search (method_spec §5.1), generalized to any backbone geometry.

The published code loops over samples, hard-codes 2048 channels, 224-px inputs and a 7x7 map
(stride 32), and syncs the host ~5 times per box. Here one batched pass does the same for any C,
any input size and any feature-map stride, with no host sync.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .._checks import (check_float, check_index, check_no_nan, check_positive, check_same_device, check_tensor,
                       compute_dtype)


def default_group_geometry(channels: int) -> Tuple[int, int]:
    """(group_stride, channels_per_group) scaled with C so that C=2048 gives the published (250, 30)."""
    return max(1, channels * 250 // 2048), max(1, channels * 30 // 2048)


def search_concept_patches(
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    head_weight: torch.Tensor,
    image_size: Sequence[int],
    *,
    num_confusing: int,
    num_patches: int = 9,
    channels_per_group: Optional[int] = None,
    group_stride: Optional[int] = None,
    patch_size: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Find each image's concept patches: where groups of class-discriminative channels peak.

    Per sample b with label y:

    1. confusing classes: the ``num_confusing`` highest-logit classes other than y, most
       confusing first (never y itself, also when other logits tie with it at -inf: -inf logits
       are allowed, e.g. for masked classes);
    2. channel score s = 3 W[y] - W[c0] - W[c1] - W[c2] (W = ``head_weight``, c_i the top-3
       confusing classes); channels ranked by descending s;
    3. group p (p < num_patches) = ranked channels [p*group_stride, p*group_stride + channels_per_group);
       its map is the plain sum of those channels of ``features[b]`` (h, w);
    4. peak = first arg-max of the map in row-major order, at cell (r, q); the anchor is the cell's
       top-left corner in input pixels (x, y) = (q * W/w, r * H/h);
    5. box = (b, max(0, x - s/2), max(0, y - s/2), min(W, x + s/2), min(H, y + s/2)) with s the patch
       size (default 2 x the stride, i.e. 64 px at 224/7), so border boxes are clipped.

    With C=2048, a 7x7 map and 224-px inputs the defaults reproduce the published geometry exactly.

    Args:
        features: (B, C, h, w) float feature map (the key encoder's; not differentiated).
        logits: (B, Cls) float logits of the same images.
        labels: (B,) int64 true classes in [0, Cls).
        head_weight: (Cls, C) float classifier weight.
        image_size: (H, W) input size in pixels.
        num_confusing: N_conf, 3 <= N_conf <= Cls - 1.
        num_patches: P patches per image (9 as published).
        channels_per_group: channels summed per map (default C*30//2048, 30 at C=2048).
        group_stride: rank offset between groups (default C*250//2048, 250 at C=2048).
        patch_size: box side in pixels (default twice the feature stride).

    NaN in ``logits`` and NaN or inf in ``features`` or ``head_weight`` raise a ``ValueError`` (on
    CUDA a device-side assert): a NaN would otherwise rank as the largest value and give a
    plausible-looking but meaningless class or box.

    Returns:
        boxes: (B*P, 5) float32 rows (batch_idx, x1, y1, x2, y2), sample-major.
        confusing: (B, N_conf) int64 confusing classes, most confusing first.
    """
    check_float("features", features, ndim=4, shape_doc="(B, C, h, w)")
    B, C, h, w = features.shape
    check_float("logits", logits, ndim=2, shape_doc="(B, Cls)")
    if logits.shape[0] != B:
        raise ValueError(f"logits must have shape ({B}, Cls) to match features' batch, got {tuple(logits.shape)}")
    n_cls = logits.shape[1]
    check_tensor("labels", labels, shape=(B,), shape_doc="(B,)")
    check_index("labels", labels, n_cls, "classes in logits")
    check_float("head_weight", head_weight, shape=(n_cls, C), shape_doc="(Cls, C)")
    check_same_device(features=features, logits=logits, labels=labels, head_weight=head_weight)
    if len(image_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in image_size):
        raise ValueError(f"image_size must be two positive ints (H, W), got {tuple(image_size)}")
    H, W = image_size
    if H < h or W < w:
        raise ValueError(f"image_size {tuple(image_size)} must be at least the feature map size ({h}, {w})")
    check_positive("num_confusing", num_confusing, integer=True)
    if not 3 <= num_confusing <= n_cls - 1:
        raise ValueError(f"num_confusing must be in [3, Cls-1] = [3, {n_cls - 1}], got {num_confusing}")
    check_positive("num_patches", num_patches, integer=True)
    stride_default, group_default = default_group_geometry(C)
    group_stride = stride_default if group_stride is None else group_stride
    channels_per_group = group_default if channels_per_group is None else channels_per_group
    check_positive("group_stride", group_stride, integer=True)
    check_positive("channels_per_group", channels_per_group, integer=True)
    last = (num_patches - 1) * group_stride + channels_per_group
    if last > C:
        raise ValueError(
            f"(num_patches-1)*group_stride + channels_per_group = {last} must be <= C = {C} "
            f"(num_patches={num_patches}, group_stride={group_stride}, channels_per_group={channels_per_group})"
        )
    if patch_size is not None:
        check_positive("patch_size", patch_size)
    check_no_nan("logits", logits)
    check_no_nan("features", features, finite=True)
    check_no_nan("head_weight", head_weight, finite=True)

    with torch.no_grad():
        # rank in the inputs' precision (float64 stays float64), as the published code does
        masked = logits.detach().to(compute_dtype(logits.dtype)).scatter(1, labels[:, None], float("-inf"))
        # Nc + 1 candidates (Nc <= Cls - 1): y is among them only when other logits tie with it at
        # -inf; a stable sort moves y behind the others, and the first Nc are kept.
        top = masked.topk(num_confusing + 1, dim=1).indices  # (B, Nc+1), most confusing first
        not_label = (top != labels[:, None]).to(torch.int8)
        confusing = top.gather(1, not_label.argsort(dim=1, descending=True, stable=True)[:, :num_confusing])
        wt = head_weight.detach().to(compute_dtype(head_weight.dtype))
        score = 3.0 * wt[labels] - wt[confusing[:, 0]] - wt[confusing[:, 1]] - wt[confusing[:, 2]]
        ranked = score.topk(C, dim=1).indices  # (B, C) descending score
        offsets = torch.arange(num_patches, device=features.device) * group_stride
        group_idx = offsets[:, None] + torch.arange(channels_per_group, device=features.device)
        channels = ranked[:, group_idx.reshape(-1)]  # (B, P*G)
        maps = features.detach().gather(1, channels[:, :, None, None].expand(-1, -1, h, w))
        maps = maps.reshape(B, num_patches, channels_per_group, h * w).sum(dim=2)  # (B, P, h*w)
        peak = maps.argmax(dim=-1)  # first maximum, row-major
        row, col = peak // w, peak % w
        sy, sx = H / h, W / w
        half_y, half_x = (sy, sx) if patch_size is None else (patch_size / 2, patch_size / 2)
        x, y = col.float() * sx, row.float() * sy
        batch_idx = torch.arange(B, device=features.device, dtype=torch.float32)[:, None].expand(-1, num_patches)
        boxes = torch.stack(
            [
                batch_idx,
                (x - half_x).clamp(min=0),
                (y - half_y).clamp(min=0),
                (x + half_x).clamp(max=W),
                (y + half_y).clamp(max=H),
            ],
            dim=-1,
        ).reshape(B * num_patches, 5)
    return boxes, confusing
