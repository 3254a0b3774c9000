"""Concept-Tuning (and the baselines) around any backbone with a spatial feature map: CNNs, ViT/DeiT and Swin
(their tokens laid out on the patch grid, ``feature_maps.py``)."""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import concept_kernels as ck

from ..method import fixed_batch_norm, grouped_batch_norm, roi_align
from .feature_maps import model_name, to_feature_map

METHODS = ("concept", "vanilla", "linear", "bituning", "surgical")
PATCH_MODES = ("image", "roi")
SINKHORN_STOPS = ("published", "problem")


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order (identity outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _embed(h: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Patch embedding: unit-norm logits of a detached copy of the head (L_con gives the head no gradient)."""
    return F.normalize(F.linear(h, head.weight.detach(), head.bias.detach()), dim=1)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == t or name.startswith(t + ".") for t in prefixes)


class ConceptTuner(nn.Module):
    """A classifier on ``backbone`` trained with Concept-Tuning or a baseline: ``step(views, labels)`` is
    one training forward (also ``forward``, so DDP syncs its gradients), ``predict(x)`` evaluates.

    Args:
        backbone: (B, 3, H, W) -> (B, C, h, w), or tokens / NHWC maps that ``feature_maps.to_feature_map``
            lays out as such (its ``forward_features`` when it has one), e.g. ``create_backbone(name)``
            (transformers need inputs of other sizes for the patch pass: ``create_backbone`` makes them
            accept any size).
        num_classes, image_size: Cls and the views' (H, W) (the patch geometry follows).
        method: "concept", "vanilla" (CE), "linear" (frozen backbone), "bituning" (CE + image-level
            contrastive) or "surgical" (only ``train_blocks``, prefixes of parameter names, train).
        patch_mode: "image" (published: crops of the view through the network) or "roi" (fast, NOT
            equivalent: RoIAlign of the feature map).
        num_patches, num_confusing, queue_len, momentum, temperature: P, N_conf (default
            min(100, Cls-1); 3 <= N_conf <= Cls-1), K, the key encoder's EMA momentum m (0 <= m <= 1,
            published 0.999) and the contrastive temperature T (published 0.07).
        sinkhorn_stop: "published" (default: the published group rule and call pattern, one mean
            error per Sinkhorn call, method_spec §5.6) or "problem" (each OT problem stops on its
            own: NOT equivalent, it changes which plan entries are selected).
        patch_pixels: image-mode crop side (default 2x the stride: exact pixel crops).
        w_img, w_con, w_ce_ib, w_kl, latent_dim: loss weights (published 1, 1, 1, 0.005, §5.8), IB size.
        bn_momentum: if set, that of every backbone batch norm (timm's tf_* ports use 0.01, too slow
            for the running stats to follow a few hundred fine-tuning steps).
        channels_last: run the backbones channels-last (oneDNN's fast path on CPU).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, image_size: tuple[int, int], *,
                 method: str = "concept", patch_mode: str = "image", num_patches: int = 9,
                 num_confusing: int | None = None, queue_len: int = 40, momentum: float = 0.999,
                 temperature: float = 0.07, sinkhorn_stop: str = "published", patch_pixels: int | None = None,
                 w_img: float = 1.0,
                 w_con: float = 1.0, w_ce_ib: float = 1.0, w_kl: float = 5e-3,
                 train_blocks: Sequence[str] = (), latent_dim: int = 512, bn_momentum: float | None = None,
                 channels_last: bool = True) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if patch_mode not in PATCH_MODES:
            raise ValueError(f"patch_mode must be one of {PATCH_MODES}, got {patch_mode!r}")
        if sinkhorn_stop not in SINKHORN_STOPS:
            raise ValueError(f"sinkhorn_stop must be one of {SINKHORN_STOPS}, got {sinkhorn_stop!r}")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum (the key encoder's EMA momentum) must be a number in [0, 1], got {momentum!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.sinkhorn_stop = sinkhorn_stop
        self.method, self.patch_mode, self.num_classes = method, patch_mode, num_classes
        self.image_size = tuple(int(s) for s in image_size)
        self.backbone, self.channels_last = backbone, channels_last
        for m in backbone.modules():
            if bn_momentum is not None and isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
        if channels_last:
            backbone.to(memory_format=torch.channels_last)
        was = backbone.training
        try:
            with torch.no_grad():
                ref = next(backbone.parameters(), None)  # probe in the backbone's device and dtype
                kw = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
                f = self.features(backbone.eval(), torch.zeros(1, 3, *self.image_size, **kw))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"the backbone {model_name(backbone)!r} cannot run on {self.image_size} inputs "
                             f"({type(e).__name__}: {e})") from e
        finally:
            backbone.train(was)
        C, h, w = f.shape[1:]
        self.feature_size, self.stride = (h, w), (self.image_size[0] / h, self.image_size[1] / w)  # px per cell
        self.head = nn.Linear(C, num_classes)
        nn.init.normal_(self.head.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.bias)
        self.num_patches, self.momentum, self.temperature = num_patches, momentum, temperature
        self.weights = dict(img=w_img, con=w_con, ce_ib=w_ce_ib, kl=w_kl)
        self.patch_pixels = patch_pixels or math.ceil(2 * max(self.stride))
        self.num_confusing = min(100, num_classes - 1) if num_confusing is None else num_confusing
        if method == "concept" and not 3 <= self.num_confusing <= num_classes - 1:
            raise ValueError(f"Concept-Tuning needs 3 <= num_confusing <= num_classes - 1, got num_confusing="
                             f"{self.num_confusing} with {num_classes} classes (at least 4 classes are needed)")
        if method == "concept" and num_patches < 4:
            raise ValueError("num_patches must be >= 4 (the 10 negatives per OT problem need P*P >= 10), "
                             f"got {num_patches}")
        self.ib = ck.nn.InformationBottleneckHead(C, num_classes, latent_dim) if method == "concept" else None
        if method in ("concept", "bituning"):
            self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.key_head = copy.deepcopy(self.head).requires_grad_(False)
            queue_patches = num_patches if method == "concept" else 1
            self.queues = ck.ClassQueues(num_classes, queue_len, num_classes, queue_patches)
        if method == "linear":
            backbone.requires_grad_(False)
        elif method == "surgical":
            if not train_blocks:
                raise ValueError("surgical fine-tuning needs train_blocks, e.g. ('blocks.0', 'blocks.1')")
            names = [n for n, _ in backbone.named_parameters()]
            for prefix in train_blocks:
                if not any(_under(n, (prefix,)) for n in names):
                    raise ValueError(f"train_blocks: no backbone parameter under {prefix!r}; top-level "
                                     f"names: {sorted({n.split('.')[0] for n in names})}")
            for n, p in backbone.named_parameters():
                p.requires_grad_(_under(n, train_blocks))

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) feature map (input made channels-last if ``channels_last``): a CNN's
        map, a ViT's patch tokens on their grid, a Swin's NHWC map permuted (``feature_maps.py``)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fn = getattr(backbone, "forward_features", None)
        return to_feature_map(backbone, fn(x) if callable(fn) else backbone(x), tuple(x.shape[-2:]))

    def train(self, mode: bool = True) -> ConceptTuner:
        super().train(mode)
        if self.method == "linear":
            self.backbone.eval()  # linear probing: fixed features, BN running stats included
        return self

    def param_groups(self, lr: float, backbone_mult: float = 0.1) -> list[dict]:
        """SGD groups: trainable backbone parameters at lr*backbone_mult, heads at lr (§6)."""
        bb = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [*self.head.parameters(), *(self.ib.parameters() if self.ib is not None else ())]
        groups = [dict(params=bb, lr=lr * backbone_mult, name="backbone")] if bb else []
        return groups + [dict(params=heads, lr=lr, name="heads")]

    @property
    def num_views(self) -> int:
        """Views a step uses: 4 for concept (image mode), 2 for concept (roi) and bituning, else 1."""
        return {"concept": 4 if self.patch_mode == "image" else 2, "bituning": 2}.get(self.method, 1)

    def forward(self, views, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.step(views, labels)

    def step(self, views: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training forward. views (V, B, 3, H, W) or V tensors (B, 3, H, W), V >= ``num_views``
        (concept: 0/1 "image", 2/3 "patch" augmentation, §7); labels (B,) int64 in [0, Cls).

        Returns scalars {"loss", "ce", "img", "con", "ce_ib", "kl"} (0 where the method has no such
        part) and "logits" (B, Cls) of the main head on view 0. concept/bituning also update the key
        encoder (EMA) and enqueue this step's keys (all-gathered under torch.distributed).
        """
        if len(views) < self.num_views:
            raise ValueError(f"method {self.method!r} needs {self.num_views} views, got {len(views)}")
        zero = views[0].new_zeros(())
        out = dict(img=zero, con=zero, ce_ib=zero, kl=zero)
        f0 = self.features(self.backbone, views[0])
        logits = self.head(f0.mean((2, 3)))
        out["ce"] = F.cross_entropy(logits, labels)
        if self.method == "concept":
            ib_logits, mu, sigma = self.ib(f0.contiguous())  # the attention kernels take NCHW
            out["ce_ib"] = F.cross_entropy(ib_logits, labels)
            out["kl"] = ck.information_bottleneck_kl(mu, sigma)
        if self.method in ("concept", "bituning"):
            out.update(self._contrastive(views, labels, f0, logits))
        out["loss"] = sum((w * out[k] for k, w in self.weights.items()), out["ce"])
        out["logits"] = logits
        return out

    def _key_pass(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(self.key_backbone, x)
        return f, self.key_head(f.mean((2, 3)))

    def _search(self, f: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor):
        return ck.search_concept_patches(f, logits, labels, weight.detach(), self.image_size,
                                         num_confusing=self.num_confusing, num_patches=self.num_patches)

    def _contrastive(self, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        """method_spec §4 steps 3-7 (image mode) for concept; the image-level part for bituning."""
        B = labels.shape[0]
        concept, image_mode = self.method == "concept", self.patch_mode == "image"
        if concept:  # query patches; image: key-encoder search on view 2, roi: on view 0's own map
            with torch.no_grad():
                f, y = self._key_pass(views[2]) if image_mode else (f0.detach(), logits.detach())
                boxes, conf = self._search(f, y, labels, (self.key_head if image_mode else self.head).weight)
            zq_p = self._patches(self.backbone, self.head, views[2] if image_mode else f0, boxes, B, fix_bn=True)
        with torch.no_grad():
            ck.momentum_update_(nn.ModuleList([self.key_backbone, self.key_head]),
                                nn.ModuleList([self.backbone, self.head]), self.momentum)
            f1, y1 = self._key_pass(views[1])  # views 1 and 3: separate passes, as published (and faster
            if concept:                         # on CPU than one pass with per-view BN statistics)
                f, y = self._key_pass(views[3]) if image_mode else (f1, y1)
                boxes, _ = self._search(f, y, labels, self.key_head.weight)
                zk_p = self._patches(self.key_backbone, self.key_head, views[3] if image_mode else f1, boxes, B)
            z_k = F.normalize(y1, dim=1)
        queue_z, queue_h = self.queues.snapshot()
        out = dict(img=ck.image_contrastive_loss(F.normalize(logits, dim=1), z_k, queue_z, labels,
                                                 temperature=self.temperature))
        if concept:
            out["con"] = ck.concept_contrastive_loss(zq_p, zk_p, queue_h, labels, conf, temperature=self.temperature,
                                                    stop=self.sinkhorn_stop)
        else:
            zk_p = z_k[:, None].expand(B, 1, -1)  # bituning keeps a 1-patch concept queue (unused)
        self.queues.enqueue(_gather(z_k), _gather(zk_p.contiguous()), _gather(labels))
        return out

    def _patches(self, backbone, head, x, boxes, B, fix_bn: bool = False) -> torch.Tensor:
        """(B, P, Cls) unit rows, the detached head on the patches' features. Image mode: crops
        (P*B, 3, S, S) of the view ``x``, position-major, through ``backbone`` in one pass with
        per-position BN statistics, GAP; the IB branch is skipped. The pass is the published P
        train-mode passes, BN buffers included: running stats move P times at the BN momentum, or stay
        put with ``fix_bn`` (the query encoder's published momentum 0), and ``num_batches_tracked``
        counts P. Transformers (ViT, Swin) normalise per token (LayerNorm): nothing couples the patches of
        a batch, so the one pass IS the P passes; their h is the mean of the patch tokens, as for every
        view. Roi mode (NOT equivalent, the features see the whole image): 2x2 RoIAlign of the
        view's feature map ``x``, averaged (as GAP over the 2x2 map of a 64-px crop)."""
        P = self.num_patches
        if self.patch_mode == "roi":
            h = roi_align(x, boxes, (2, 2), spatial_scale=1.0 / self.stride[0]).mean((2, 3))
            return _embed(h, head).view(B, P, -1)
        crops = roi_align(x, boxes.view(B, P, 5).transpose(0, 1).reshape(P * B, 5), (self.patch_pixels,) * 2)
        momentum_0 = fixed_batch_norm(backbone) if fix_bn else nullcontext()
        with grouped_batch_norm(P, backbone), momentum_0:
            h = self.features(backbone, crops).mean((2, 3))
        return _embed(h, head).view(P, B, -1).transpose(0, 1)

    @classmethod
    def from_checkpoint(cls, path, device: torch.device | str = "cpu") -> ConceptTuner:
        """The model a ``python -m concept_kernels.train`` run saved (``<out>/checkpoint.pt`` or ``best.pt``):
        rebuilt from the checkpoint's config, weights, key encoder and queues loaded, integrity checked; in
        eval mode. ``train.eval.load_tuner(path)`` also returns the config."""
        from .eval import load_tuner

        return load_tuner(path, device)[0]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"main": (B, Cls) logits, "ib": (B, Cls) logits (concept only)}, in the
        module's current mode (call ``.eval()`` first); the IB head samples its latent in eval mode
        too, as published."""
        f = self.features(self.backbone, x)
        out = {"main": self.head(f.mean((2, 3)))}
        if self.ib is not None:
            out["ib"] = self.ib(f.contiguous())[0]
        return out
