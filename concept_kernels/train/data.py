"""Data: sklearn digits (built in, offline) or an ImageFolder, and the four augmented views (§7).

Images are kept as normalised (3, S, S) tensors with S = round(size / 0.875) (like Resize(256) for
224); views are random resized crops (+ optional flip) to ``size`` drawn in one batched
``grid_sample`` from the torch RNG, so a checkpoint's RNG state replays them exactly. Evaluation
uses the centre ``size`` crop (digits: the whole digit, resized to ``size``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

IMAGE_SCALE, PATCH_SCALE = (0.2, 1.0), (0.5, 1.0)  # RandomResizedCrop scales of views 0/1 and 2/3


class Digits(TensorDataset):
    """sklearn digits kept at 8x8; ``batch(idx)`` / ``[i]`` upsample (bilinear) to ``size``, RGB in [-1, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int) -> None:
        super().__init__(images, labels)
        self.size = size

    def batch(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(self.tensors[0][idx], size=(self.size, self.size), mode="bilinear", align_corners=False)
        return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(), self.tensors[1][idx]

    def __getitem__(self, i):
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]


def digits(size: int, shots_per_class: int, seed: int = 0) -> Tuple[Digits, Digits, List[str]]:
    """sklearn digits (8x8 grey, 10 classes) as (3, size, size) tensors in [-1, 1] (mean = std = 0.5).

    Test split: a fixed half of the 1797 images (every second image); train: ``shots_per_class``
    images per class drawn with ``seed`` from the other half (all of it when <= 0).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    test = torch.arange(0, len(y), 2)
    pool = torch.arange(1, len(y), 2)
    if shots_per_class > 0:
        g = torch.Generator().manual_seed(seed)
        pool = torch.cat([c[torch.randperm(len(c), generator=g)[:shots_per_class]]
                          for c in (pool[y[pool] == k] for k in range(10))])
    names = [str(k) for k in range(10)]
    return Digits(x[pool], y[pool], size), Digits(x[test], y[test], size), names


def image_folder(root: str, size: int, mean: Tuple[float, ...], std: Tuple[float, ...],
                 shots_per_class: int = 0, seed: int = 0) -> Tuple[Dataset, Dataset, List[str]]:
    """``root/train`` and ``root/val`` ImageFolders (same class folders in both)."""
    from .._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from torchvision import datasets, transforms

    root_p = Path(root)
    for split in ("train", "val"):
        if not (root_p / split).is_dir():
            raise FileNotFoundError(f"--data {root}: expected an ImageFolder with '{split}/' inside "
                                    f"({root_p / split} is missing); layout: {root}/{{train,val}}/<class>/<image>")
    big = int(round(size / 0.875))
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose([transforms.Resize(big), transforms.CenterCrop(big), *norm])
    test_tf = transforms.Compose([transforms.Resize(big), transforms.CenterCrop(size), *norm])
    try:
        train = datasets.ImageFolder(str(root_p / "train"), transform=train_tf)
        test = datasets.ImageFolder(str(root_p / "val"), transform=test_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"--data {root}: not a usable ImageFolder: {e}") from e
    if train.classes != test.classes:
        raise ValueError(f"--data {root}: train/ and val/ have different class folders")
    if shots_per_class > 0:
        g = torch.Generator().manual_seed(seed)
        targets = torch.tensor(train.targets)
        keep = torch.cat([c[torch.randperm(len(c), generator=g)[:shots_per_class]]
                          for c in (torch.nonzero(targets == k).squeeze(1) for k in range(len(train.classes)))])
        train = torch.utils.data.Subset(train, sorted(keep.tolist()))
    return train, test, list(test.classes)


def random_resized_crop(x: torch.Tensor, size: int, scale: Tuple[float, float], hflip: bool) -> torch.Tensor:
    """Per-image RandomResizedCrop(size, scale, ratio 3/4-4/3) (+ flip p=0.5), batched: (B,3,S,S) -> (B,3,size,size).

    Crops larger than the image are clamped to it (torchvision retries, then centre-crops).
    """
    B = x.shape[0]
    area = torch.empty(B).uniform_(*scale)
    logr = torch.empty(B).uniform_(math.log(3 / 4), math.log(4 / 3))
    w = (area * logr.exp()).sqrt().clamp(max=1.0)  # fraction of the side
    h = (area / logr.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(B) * 2 - 1) * (1 - w)  # centre in [-1, 1] keeping the crop inside
    cy = (torch.rand(B) * 2 - 1) * (1 - h)
    sx = w * (torch.where(torch.rand(B) < 0.5, -1.0, 1.0) if hflip else 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta.to(x), (B, 3, size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def make_views(x: torch.Tensor, size: int, num_views: int, hflip: bool, min_scale: float = IMAGE_SCALE[0]) -> torch.Tensor:
    """(B, 3, S, S) -> (V, B, 3, size, size): views 0/1 "image" augmentation (crop area scale
    (min_scale, 1), published 0.2), views 2/3 "patch" augmentation (scale (max(min_scale, 0.5), 1))."""
    return torch.stack([random_resized_crop(x, size, (min_scale if v < 2 else max(min_scale, PATCH_SCALE[0]), 1.0), hflip)
                        for v in range(num_views)])
