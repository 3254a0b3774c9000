"""Masked images as counterfactuals (Xiao et al., CVPR 2023): mask the class-relevant (or the context)
patches of each training image, refill them with the same patches of other images of the batch, and
distil the fine-tuned model's features on these counterfactual images to the frozen pretrained model's.

Each step, on the training view x (B, 3, H, W) with labels y, W the new head's weight (Cls, C) and f0 the
current model's feature map of x (B, C, h, w) (the CE's forward, reused; no gradient through the masks):

    cam_b = relu(sum_c W[y_b, c] f0[b, c])        (h, w) class activation map of the label class
    a_b   = bilinear resize of cam_b to the g x g patch grid, divided by its max (floor 1e-12)
    M_b   = {a_b >= threshold}                    region "object": the class-relevant patches
          | {a_b <  threshold}                    region "context": the other patches
          | one of the two, a fair coin per image region "either"
    x~_b  = x_b outside M_b; each masked patch (i, j) holds the same patch of image s_b(i, j) != b:
            fill "single": s_b = pi(b), pi a random cyclic permutation of the batch (one donor per image);
            fill "multi":  s_b(i, j) = (b + u) mod B, u uniform in [1, B-1] per patch
    cf    = mean_{b, c} (phi(x~)_bc - phi0(x~)_bc)^2      phi: pooled features of the fine-tuned backbone,
                                                           phi0: of its frozen pretrained copy (the teacher)
    loss  = CE + weight * cf,                    weight 30 as published.

Patch (i, j) of the g x g grid covers the pixels (y, x) with floor(y g / H) = i and floor(x g / W) = j
(:func:`masked_refill`). Defaults: object region, threshold 0.3, single fill, g = 7 (the 7 x 7 patches of
the paper's ViT-B/32 at 224 px), as in the authors' ``ObjMaskSingleFill(0.3)`` example.

Where this departs from the paper (which fine-tunes CLIP ViTs from their zero-shot classifier):
* the CAM is the classic one of the new linear head on the pooled map (exact for this GAP + linear
  classifier); the paper uses a gradient-weighted attention map of the ViT being fine-tuned. Both are the
  current model's. Our head starts random, so the first masks are uninformative until it learns;
* the teacher is the frozen pretrained backbone (a copy at construction, ``tuner.source_backbone``, in
  checkpoints), not CLIP; the distilled features are its average-pooled map, not CLIP's image embedding;
* the paper's runs each fix one region (object-mask or context-mask runs); "either" (a coin per image)
  is offered as an option, not the default;
* the student's pass on x~ runs in training mode (its batch norms see the counterfactual batch too, and
  their running statistics move with it). The paper's ViTs have no batch norm; with one, a teacher in eval
  mode (its ImageNet running statistics) differs from the train-mode student even at identical weights
  (on the built-in digits with EfficientNet-Lite0, 30 * cf ~ 78 at the first step against a CE of ~2.3).
  ``teacher_bn`` chooses: "batch" (default) normalises the teacher's batch norms with the counterfactual
  batch's own statistics as the student's (its running statistics never move: momentum 0), so cf = 0 at
  the start and measures only how far the weights drifted; "running" keeps the teacher wholly in eval mode
  (its pretrained running statistics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._checks import check_float, check_index, check_same_device, check_tensor
from .base import Method, check_number, register
from .l2sp import add_source_backbone

REGIONS = ("object", "context", "either")
FILLS = ("single", "multi")
TEACHER_BN = ("batch", "running")
BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)


def masked_refill(images: torch.Tensor, mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Refill the masked patches of each image with the same patches of other images of the batch.

    Args:
        images: (B, C, H, W) float.
        mask: (B, gh, gw) bool, 1 <= gh <= H, 1 <= gw <= W: the patches to replace. Patch (i, j) covers the
            pixels (y, x) with floor(y * gh / H) == i and floor(x * gw / W) == j (equal patches when gh
            divides H and gw divides W).
        source: (B, gh, gw) int64 in [0, B): the image whose same patch fills patch (i, j) of image b
            where ``mask[b, i, j]`` (ignored elsewhere).

    Returns:
        (B, C, H, W): ``out[b, :, y, x] = images[source[b, i, j], :, y, x]`` where ``mask[b, i, j]``, else
        ``images[b, :, y, x]``. One batched gather, no loop over images; differentiable w.r.t. images.

    Example:
        >>> x = torch.randn(4, 3, 32, 32); m = torch.rand(4, 7, 7) < 0.5
        >>> out = masked_refill(x, m, (torch.arange(4) + 1).remainder(4)[:, None, None].expand(4, 7, 7))
    """
    check_float("images", images, ndim=4, shape_doc="(B, C, H, W)")
    B, C, H, W = images.shape
    check_tensor("mask", mask, ndim=3, dtypes=(torch.bool,), shape_doc="(B, gh, gw)")
    if mask.shape[0] != B:
        raise ValueError(f"mask must have shape (B, gh, gw) with B = {B} (images), got {tuple(mask.shape)}")
    check_tensor("source", source, shape=(B, *mask.shape[1:]), shape_doc="(B, gh, gw) like mask")
    gh, gw = mask.shape[1:]
    if gh > H or gw > W:
        raise ValueError(f"mask's patch grid (gh, gw) = ({gh}, {gw}) must not exceed the image size (H, W) = "
                         f"({H}, {W})")
    check_same_device(images=images, mask=mask, source=source)
    check_index("source", source, B, "the batch size B of images")
    device = images.device
    rows = torch.arange(H, device=device) * gh // H  # patch row of each pixel row
    cols = torch.arange(W, device=device) * gw // W
    m = mask[:, rows][:, :, cols]  # (B, H, W)
    s = source[:, rows][:, :, cols]
    s = torch.where(m, s, torch.arange(B, device=device)[:, None, None])  # unmasked pixels: the image itself
    return images.gather(0, s[:, None].expand(B, C, H, W))


def class_activation_map(f: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         grid: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) CAM of the label class on the patch grid, each image's divided by its max (floor 1e-12):
    relu(sum_c weight[labels_b, c] f[b, c]) (f (B, C, h, w), weight (Cls, C), labels (B,)), resized to
    ``grid`` bilinearly (align_corners=False; the identity when grid == (h, w))."""
    cam = torch.einsum("bchw,bc->bhw", f, weight[labels]).relu()
    cam = F.interpolate(cam[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)


def counterfactual_mask(cam: torch.Tensor, threshold: float, region: str) -> torch.Tensor:
    """(B, gh, gw) bool patches to mask, from the normalised CAM (B, gh, gw): ``cam >= threshold`` (object),
    its complement (context), or, per image, one of the two with probability 1/2 (either; torch's RNG)."""
    obj = cam >= threshold
    if region == "object":
        return obj
    if region == "context":
        return ~obj
    if region == "either":
        pick_object = torch.rand(cam.shape[0], device=cam.device) < 0.5
        return torch.where(pick_object[:, None, None], obj, ~obj)
    raise ValueError(f"region must be one of {REGIONS}, got {region!r}")


def refill_sources(batch: int, grid: tuple[int, int], fill: str, device: torch.device) -> torch.Tensor:
    """(B, gh, gw) int64 donor image of every patch, never the image itself (needs B >= 2; torch's RNG):
    "single": one donor per image, s_b = pi(b) with pi a random cyclic permutation (a derangement);
    "multi": a donor per patch, (b + u) mod B with u uniform in [1, B-1]."""
    if batch < 2:
        raise ValueError(f"counterfactual refill needs a batch of at least 2 images (patches come from the "
                         f"other images), got {batch}")
    b = torch.arange(batch, device=device)
    if fill == "single":
        order = torch.randperm(batch, device=device)
        donor = torch.empty_like(order)
        donor[order] = order.roll(-1)  # order[k] takes from order[k + 1]: one cycle through the batch
        return donor[:, None, None].expand(batch, *grid).contiguous()
    if fill == "multi":
        return (b[:, None, None] + torch.randint(1, batch, (batch, *grid), device=device)) % batch
    raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")


@register
class Counterfactual(Method):
    name = "counterfactual"
    summary = ("CE + w * MSE(features, frozen pretrained features) on images whose CAM-selected patches are "
               "refilled from other images")
    options = dict(weight=30.0, threshold=0.3, region="object", fill="single", grid=7, teacher_bn="batch")
    config_fields = dict(weight="cf_weight", threshold="cf_threshold", region="cf_region", fill="cf_fill",
                         grid="cf_grid", teacher_bn="cf_teacher_bn")

    def check(self) -> None:
        check_number(self.opts, "weight", 0.0)
        check_number(self.opts, "threshold", 0.0, 1.0, low_open=True)
        if self.opts["region"] not in REGIONS:
            raise ValueError(f"region (cf_region) must be one of {REGIONS}, got {self.opts['region']!r}")
        if self.opts["fill"] not in FILLS:
            raise ValueError(f"fill (cf_fill) must be one of {FILLS}, got {self.opts['fill']!r}")
        if self.opts["teacher_bn"] not in TEACHER_BN:
            raise ValueError(f"teacher_bn (cf_teacher_bn) must be one of {TEACHER_BN}, got {self.opts['teacher_bn']!r}")
        g = self.opts["grid"]
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"grid (cf_grid) must be an int >= 1 (patches per side), got {g!r}")

    def build(self, tuner) -> None:
        g = self.opts["grid"]
        if g > min(tuner.image_size):
            raise ValueError(f"grid (cf_grid) = {g} patches per side exceeds the image size {tuner.image_size}")
        add_source_backbone(tuner)
        if self.opts["teacher_bn"] == "batch":
            for m in tuner.source_backbone.modules():
                if isinstance(m, BATCH_NORMS):
                    m.momentum = 0.0  # batch statistics in its forward, running statistics never updated
        self.train_mode(tuner, tuner.training)

    def train_mode(self, tuner, mode: bool) -> None:
        """The teacher stays in eval mode (no dropout / drop-path), its batch norms in train mode under
        teacher_bn "batch"."""
        tuner.source_backbone.eval()
        if self.opts["teacher_bn"] == "batch":
            for m in tuner.source_backbone.modules():
                if isinstance(m, BATCH_NORMS):
                    m.train()

    def weights(self) -> dict[str, float]:
        return dict(cf=self.opts["weight"])

    def counterfactuals(self, tuner, x: torch.Tensor, labels: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        """The counterfactual images x~ (B, 3, H, W) of x (module docstring), without gradient."""
        grid = (self.opts["grid"],) * 2
        with torch.no_grad():
            dtype = torch.promote_types(f0.dtype, torch.float32)  # (a bf16 map under autocast: CAM in fp32)
            cam = class_activation_map(f0.detach().to(dtype), tuner.head.weight.detach().to(dtype), labels, grid)
            mask = counterfactual_mask(cam, self.opts["threshold"], self.opts["region"])
            source = refill_sources(x.shape[0], grid, self.opts["fill"], x.device)
            return masked_refill(x.detach(), mask, source)

    def loss_terms(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        x_cf = self.counterfactuals(tuner, views[0], labels, f0)
        student = tuner.features(tuner.backbone, x_cf).mean((2, 3))
        with torch.no_grad():
            teacher = tuner.features(tuner.source_backbone, x_cf).mean((2, 3))
        return dict(cf=F.mse_loss(student, teacher))
