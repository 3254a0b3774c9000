"""Concept-Tuning (and the baselines) around any backbone with a spatial feature map: CNNs, ViT/DeiT and Swin
(their tokens laid out on the patch grid, ``feature_maps.py``)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .feature_maps import model_name, to_feature_map
from .methods import METHODS, create_method
from .methods.concept import patch_embeddings

PATCH_MODES = ("image", "roi")
SINKHORN_STOPS = ("published", "problem")


class ConceptTuner(nn.Module):
    """A classifier on ``backbone`` trained with Concept-Tuning or a baseline: ``step(views, labels)`` is
    one training forward (also ``forward``, so DDP syncs its gradients), ``predict(x)`` evaluates.

    Args:
        backbone: (B, 3, H, W) -> (B, C, h, w), or tokens / NHWC maps that ``feature_maps.to_feature_map``
            lays out as such (its ``forward_features`` when it has one), e.g. ``create_backbone(name)``
            (transformers need inputs of other sizes for the patch pass: ``create_backbone`` makes them
            accept any size).
        num_classes, image_size: Cls and the views' (H, W) (the patch geometry follows).
        method: a registered method (``METHODS``, one file each in ``methods/``): "concept", "vanilla" (CE),
            "linear" (frozen backbone), "bituning" (CE + image-level contrastive), "surgical" (only
            ``train_blocks``, prefixes of parameter names, train), ...
        method_options: the method's own hyper-parameters (its ``options``; unknown names: TypeError).
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
                 channels_last: bool = True, method_options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        impl = create_method(method, dict(method_options or {}))  # validates the name and the options
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
        self.queue_len, self.latent_dim, self.train_blocks = queue_len, latent_dim, tuple(train_blocks)
        self.patch_pixels = patch_pixels or math.ceil(2 * max(self.stride))
        self.num_confusing = min(100, num_classes - 1) if num_confusing is None else num_confusing
        self.impl = impl  # the method's hooks (methods/base.py); a plain object: no state_dict entries
        self.weights = dict(img=w_img, con=w_con, ce_ib=w_ce_ib, kl=w_kl) | impl.weights()
        impl.build(self)

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) feature map (input made channels-last if ``channels_last``): a CNN's
        map, a ViT's patch tokens on their grid, a Swin's NHWC map permuted (``feature_maps.py``)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fn = getattr(backbone, "forward_features", None)
        return to_feature_map(backbone, fn(x) if callable(fn) else backbone(x), tuple(x.shape[-2:]))

    def train(self, mode: bool = True) -> ConceptTuner:
        super().train(mode)
        if hasattr(self, "impl"):  # (nn.Module.__init__ does not call train)
            self.impl.train_mode(self, mode)
        return self

    def param_groups(self, lr: float, backbone_mult: float = 0.1) -> list[dict]:
        """Optimizer groups, the method's (default: trainable backbone parameters at lr*backbone_mult,
        heads at lr, §6)."""
        return self.impl.param_groups(self, lr, backbone_mult)

    @property
    def num_views(self) -> int:
        """Views a step uses: 4 for concept (image mode), 2 for concept (roi) and bituning, else 1."""
        return self.impl.num_views(self)

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
        f0, logits = self.impl.classify(self, views[0])  # (default: head(features(view 0).mean((2, 3))))
        zero = views[0].new_zeros(())
        out = dict(img=zero, con=zero, ce_ib=zero, kl=zero, ce=F.cross_entropy(logits, labels))
        out.update(self.impl.loss_terms(self, views, labels, f0, logits))
        out["loss"] = sum((w * out[k] for k, w in self.weights.items()), out["ce"])
        out["logits"] = logits
        return out

    def _patches(self, backbone, head, x, boxes, B, fix_bn: bool = False) -> torch.Tensor:
        """Concept-Tuning's patch embeddings (B, P, Cls): ``methods.concept.patch_embeddings``."""
        return patch_embeddings(self, backbone, head, x, boxes, B, fix_bn)

    def prepare(self, train_set, out_dir) -> None:
        """The method's once-per-run preparation (the trainer calls it before the first step)."""
        self.impl.prepare(self, train_set, out_dir)

    def on_epoch_start(self, epoch: int, optimizer: torch.optim.Optimizer, sample) -> None:
        """The method's start-of-epoch hook (the trainer calls it each epoch, also on a mid-epoch resume;
        ``sample(n)`` -> the epoch's first n (views, labels) batches; ``methods/base.py``)."""
        self.impl.on_epoch_start(self, epoch, optimizer, sample)

    def on_epoch_end(self, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """The method's end-of-epoch hook (before the lr scheduler steps)."""
        self.impl.on_epoch_end(self, epoch, optimizer)

    def finish(self, evaluate, out_dir=None) -> dict:
        """The method's end-of-run evaluations (``evaluate(model)`` -> accuracies), e.g. WiSE-FT's sweep."""
        return self.impl.finish(self, evaluate, out_dir)

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
        f, main = self.impl.classify(self, x)
        return {"main": main, **self.impl.predict_heads(self, f)}
