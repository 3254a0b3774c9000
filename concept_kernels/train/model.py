"""Concept-Tuning (and the baselines) around any backbone that returns a 4-D feature map.

``ConceptTuner(backbone, num_classes, image_size, method=...)``; ``step(views, labels)`` is one
training step's forward (call ``loss.backward()`` and the optimiser yourself), ``predict(x)``
evaluates. ``forward`` is ``step``, so a ``DistributedDataParallel`` wrapper syncs its gradients.

Shapes: views (V, B, 3, H, W) (or a list of V tensors (B, 3, H, W)); V = 4 for ``concept``
(views 0/1 "image" augmentation, 2/3 "patch" augmentation, method_spec §7), V >= 2 for
``bituning``, V >= 1 otherwise; labels (B,) int64 in [0, Cls).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import concept_kernels as ck

from .patches import default_patch_pixels, feature_stride, grouped_batch_norm, roi_align

METHODS = ("concept", "vanilla", "linear", "bituning", "surgical")
PATCH_MODES = ("image", "roi")


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


class ConceptTuner(nn.Module):
    """A classifier on ``backbone`` trained with Concept-Tuning or a baseline.

    Args:
        backbone: module mapping (B, 3, H, W) to a (B, C, h, w) map, e.g.
            ``timm.create_model(name, num_classes=0, global_pool="")``; its ``forward_features``
            is used when it has one.
        num_classes: Cls.
        image_size: (H, W) of training views; patch geometry follows from it and the map size.
        method: "concept" (the method), "vanilla" (CE), "linear" (frozen backbone, CE),
            "bituning" (CE + image-level contrastive), "surgical" (CE, only ``train_blocks`` train).
        patch_mode: "image" (published: crop patches from the view, encode them with the network;
            per-position BN statistics in one pass) or "roi" (fast, NOT equivalent: 2x2 RoIAlign
            of the views' feature maps, averaged, see :meth:`_roi_patches`).
        num_patches, num_confusing, queue_len, momentum, temperature: P, N_conf, K, m, T
            (N_conf default min(100, Cls-1); 3 <= N_conf <= Cls-1).
        patch_pixels: side of each image-mode crop (default 2x the stride = exact pixel crops).
        w_img, w_con, w_ce_ib, w_kl: loss weights (1, 1, 1, 0.005 as published, §5.8).
        train_blocks: for "surgical", prefixes of backbone parameter names that train.
        latent_dim: IB latent size.
        bn_momentum: if set, the momentum of every backbone batch norm (timm's tf_* ports use 0.01,
            too slow for running stats to follow a few hundred fine-tuning steps; torch's default 0.1).
        channels_last: run the backbones in channels-last memory format (oneDNN's fast path on
            CPU: ~1.5x faster steps for lite0, and the grouped batch norm needs no copies).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, image_size: Tuple[int, int], *,
                 method: str = "concept", patch_mode: str = "image", num_patches: int = 9,
                 num_confusing: Optional[int] = None, queue_len: int = 40, momentum: float = 0.999,
                 temperature: float = 0.07, patch_pixels: Optional[int] = None, w_img: float = 1.0,
                 w_con: float = 1.0, w_ce_ib: float = 1.0, w_kl: float = 5e-3,
                 train_blocks: Sequence[str] = (), latent_dim: int = 512, bn_momentum: Optional[float] = None,
                 channels_last: bool = True) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if patch_mode not in PATCH_MODES:
            raise ValueError(f"patch_mode must be one of {PATCH_MODES}, got {patch_mode!r}")
        self.method, self.patch_mode, self.num_classes = method, patch_mode, num_classes
        self.image_size = tuple(int(s) for s in image_size)
        self.backbone, self.channels_last = backbone, False
        if bn_momentum is not None:
            for m in backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = bn_momentum
        C, h, w = self._probe_features()
        if channels_last:
            self.backbone, self.channels_last = backbone.to(memory_format=torch.channels_last), True
        self.feature_size = (h, w)
        self.head = nn.Linear(C, num_classes)
        nn.init.normal_(self.head.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.bias)
        self.num_patches, self.momentum, self.temperature = num_patches, momentum, temperature
        self.weights = dict(img=w_img, con=w_con, ce_ib=w_ce_ib, kl=w_kl)
        self.patch_pixels = patch_pixels or default_patch_pixels(self.image_size, self.feature_size)
        n_conf = min(100, num_classes - 1) if num_confusing is None else num_confusing
        if method == "concept" and not 3 <= n_conf <= num_classes - 1:
            raise ValueError(f"Concept-Tuning needs 3 <= num_confusing <= num_classes - 1, got num_confusing="
                             f"{n_conf} with {num_classes} classes (at least 4 classes are needed)")
        self.num_confusing = n_conf
        if method == "concept" and num_patches < 4:
            raise ValueError(f"num_patches must be >= 4 (the 10 negatives per OT problem need P*P >= 10), got {num_patches}")
        self.ib = ck.nn.InformationBottleneckHead(C, num_classes, latent_dim) if method == "concept" else None
        if method in ("concept", "bituning"):
            self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.key_head = copy.deepcopy(self.head).requires_grad_(False)
            self.queues = ck.ClassQueues(num_classes, queue_len, num_classes, num_patches if method == "concept" else 1)
        if method == "linear":
            self.backbone.requires_grad_(False)
        elif method == "surgical":
            if not train_blocks:
                raise ValueError("surgical fine-tuning needs train_blocks, e.g. ('blocks.0', 'blocks.1')")
            names = [n for n, _ in self.backbone.named_parameters()]
            for prefix in train_blocks:
                if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                    raise ValueError(f"train_blocks: no backbone parameter under {prefix!r}; top-level "
                                     f"names: {sorted({n.split('.')[0] for n in names})}")
            for n, p in self.backbone.named_parameters():
                p.requires_grad_(any(n == t or n.startswith(t + ".") for t in train_blocks))

    # ---- backbone helpers ---------------------------------------------------------------------
    def _probe_features(self) -> Tuple[int, int, int]:
        was = self.backbone.training
        self.backbone.eval()
        p = next(self.backbone.parameters(), None)
        try:
            with torch.no_grad():
                f = self.features(self.backbone, torch.zeros(1, 3, *self.image_size, device=p.device if p is not None else None))
        except Exception as e:
            raise ValueError(f"the backbone cannot run on {self.image_size} inputs ({type(e).__name__}: {e})") from e
        finally:
            self.backbone.train(was)
        if f.dim() != 4:
            raise ValueError(f"the backbone returns features of shape {tuple(f.shape)}; Concept-Tuning needs a 4-D "
                             "(B, C, h, w) feature map (CNNs; ViT-style token outputs are not supported)")
        return f.shape[1], f.shape[2], f.shape[3]

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) feature map (input made channels-last if ``channels_last``)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fn = getattr(backbone, "forward_features", None)
        return fn(x) if callable(fn) else backbone(x)

    def train(self, mode: bool = True) -> "ConceptTuner":
        super().train(mode)
        if self.method == "linear":
            self.backbone.eval()  # linear probing: fixed features, BN running stats included
        return self

    def param_groups(self, lr: float, backbone_mult: float = 0.1) -> List[dict]:
        """SGD groups: trainable backbone parameters at lr*backbone_mult, heads at lr (§6)."""
        bb = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = list(self.head.parameters()) + (list(self.ib.parameters()) if self.ib is not None else [])
        groups = [dict(params=heads, lr=lr, name="heads")]
        if bb:
            groups.insert(0, dict(params=bb, lr=lr * backbone_mult, name="backbone"))
        return groups

    @property
    def num_views(self) -> int:
        """Views a step uses: 4 for concept (image mode), 2 for concept (roi) and bituning, else 1."""
        return {"concept": 4 if self.patch_mode == "image" else 2, "bituning": 2}.get(self.method, 1)

    # ---- training step ------------------------------------------------------------------------
    def forward(self, views, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.step(views, labels)

    def step(self, views: Union[torch.Tensor, Sequence[torch.Tensor]], labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One training forward. Returns scalars {"loss", "ce", "img", "con", "ce_ib", "kl"} (parts a
        method does not use are 0) and "logits" (B, Cls) of the main head on view 0.

        Side effects (concept/bituning): EMA of the key encoder and enqueue of this step's keys
        (all-gathered over ranks under torch.distributed, so every rank holds the same queues).
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
        w = self.weights
        out["loss"] = out["ce"] + w["img"] * out["img"] + w["con"] * out["con"] + w["ce_ib"] * out["ce_ib"] + w["kl"] * out["kl"]
        out["logits"] = logits
        return out

    def _key_pass(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.features(self.key_backbone, x)
        return f, self.key_head(f.mean((2, 3)))

    def _search(self, f: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor):
        return ck.search_concept_patches(f, logits, labels, weight.detach(), self.image_size,
                                         num_confusing=self.num_confusing, num_patches=self.num_patches)

    def _contrastive(self, views, labels, f0, logits) -> Dict[str, torch.Tensor]:
        """method_spec §4 steps 3-7 (image mode) for concept; the image-level part for bituning."""
        B, P = labels.shape[0], self.num_patches
        concept, image_mode = self.method == "concept", self.patch_mode == "image"
        z_q = F.normalize(logits, dim=1)
        if concept and image_mode:  # query side: key-encoder search on view 2, query-encoder patches
            with torch.no_grad():
                f2, y2 = self._key_pass(views[2])
                boxes_q, conf = self._search(f2, y2, labels, self.key_head.weight)
            zq_p = self._image_patches(self.backbone, self.head, views[2], boxes_q, B)
        elif concept:  # roi: search on the query's own (detached) view-0 map, crop that map
            boxes_q, conf = self._search(f0.detach(), logits.detach(), labels, self.head.weight)
            zq_p = self._roi_patches(f0, self.head, boxes_q, B)
        with torch.no_grad():
            ck.momentum_update_(nn.ModuleList([self.key_backbone, self.key_head]),
                                nn.ModuleList([self.backbone, self.head]), self.momentum)
            f1, y1 = self._key_pass(views[1])  # views 1 and 3: separate passes, as published (and faster
            if concept and image_mode:          # on CPU than one pass with per-view BN statistics)
                f3, y3 = self._key_pass(views[3])
                boxes_k, _ = self._search(f3, y3, labels, self.key_head.weight)
                zk_p = self._image_patches(self.key_backbone, self.key_head, views[3], boxes_k, B)
            elif concept:
                boxes_k, _ = self._search(f1, y1, labels, self.key_head.weight)
                zk_p = self._roi_patches(f1, self.key_head, boxes_k, B)
            z_k = F.normalize(y1, dim=1)
        queue_z, queue_h = self.queues.snapshot()
        out = dict(img=ck.image_contrastive_loss(z_q, z_k, queue_z, labels, temperature=self.temperature))
        if concept:
            out["con"] = ck.concept_contrastive_loss(zq_p, zk_p, queue_h, labels, conf, temperature=self.temperature)
        else:
            zk_p = z_k[:, None].expand(B, 1, -1)  # bituning keeps a 1-patch concept queue (unused)
        self.queues.enqueue(_gather(z_k), _gather(zk_p.contiguous()), _gather(labels))
        return out

    def _image_patches(self, backbone, head, view, boxes, B) -> torch.Tensor:
        """(B, P, Cls) unit rows: crops (P*B, 3, S, S) of ``view``, position-major, through ``backbone``
        in one pass with per-position BN statistics (= the published P passes with momentum 0), GAP,
        and the head's weights detached (the head gets no gradient from L_con). The IB branch is skipped."""
        P = self.num_patches
        crops = roi_align(view, boxes.view(B, P, 5).transpose(0, 1).reshape(P * B, 5), (self.patch_pixels,) * 2)
        with grouped_batch_norm(P):
            h = self.features(backbone, crops).mean((2, 3))
        return _embed(h, head).view(P, B, -1).transpose(0, 1)

    def _roi_patches(self, fmap, head, boxes, B) -> torch.Tensor:
        """Fast patches (B, P, Cls): RoIAlign (2x2 output, scale 1/stride, adaptive sampling) of the
        view's feature map, averaged to one C-vector (as GAP over the 2x2 map a 64-px patch gives),
        then the detached head. NOT equivalent to image mode: the features see the whole image."""
        sy, _ = feature_stride(self.image_size, self.feature_size)
        h = roi_align(fmap, boxes, (2, 2), spatial_scale=1.0 / sy).mean((2, 3))
        return _embed(h, head).view(B, self.num_patches, -1)

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"main": (B, Cls) logits, "ib": (B, Cls) logits (concept only)}.

        Runs in the module's current mode; call ``.eval()`` first for evaluation. The IB head
        samples its latent in eval mode too, as published.
        """
        f = self.features(self.backbone, x)
        out = {"main": self.head(f.mean((2, 3)))}
        if self.ib is not None:
            out["ib"] = self.ib(f.contiguous())[0]
        return out
