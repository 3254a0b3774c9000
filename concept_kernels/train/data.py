"""Data: sklearn digits (built in, offline) or an ImageFolder, and the four augmented views (§7).

Training images are normalised (3, S, S) tensors, S = round(size / 0.875) (Resize(256) for 224; digits:
S = size); views are random resized crops (+ flip) to ``size`` drawn in one batched ``grid_sample`` from
the torch RNG, so a checkpoint's RNG state replays them. Evaluation uses the centre ``size`` crop.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset


BUILTIN_MEAN, BUILTIN_STD = 0.5, 0.5  # the built-in tasks' pixels in [0, 1] -> [-1, 1]


def _few_shot(targets: torch.Tensor, num_classes: int, shots: int, seed: int) -> torch.Tensor:
    """Positions of ``shots`` random entries of each class in ``targets`` (drawn with ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c[torch.randperm(len(c), generator=g)[:shots]]
                      for c in (torch.nonzero(targets == k).squeeze(1) for k in range(num_classes))])


def digits(size: int, shots_per_class: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset, list[str]]:
    """sklearn digits (8x8 grey, 10 classes) upsampled (bilinear) to (3, size, size) in [-1, 1] (mean =
    std = 0.5). Test split: every second of the 1797 images; train: ``shots_per_class`` images per
    class of the other half (all of it when <= 0)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    test, pool = torch.arange(0, len(y), 2), torch.arange(1, len(y), 2)
    if shots_per_class > 0:
        pool = pool[_few_shot(y[pool], 10, shots_per_class, seed)]
    sets = [TensorDataset(F.interpolate(x[i], size=(size, size), mode="bilinear", align_corners=False)
                          .sub(BUILTIN_MEAN).div(BUILTIN_STD).expand(-1, 3, -1, -1), y[i]) for i in (pool, test)]
    return sets[0], sets[1], [str(k) for k in range(10)]


ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
BUILTIN = ("digits", "animals")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (the animal-mnist files are pickled ndarrays)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def _load_animal_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """(10000, 28, 28) uint8 silhouettes and (10000,) labels from the ``animal-mnist`` wheel's data files
    (the package itself imports tensorflow, so only its files are read; install it with
    ``pip install --no-deps animal-mnist==0.4``)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the built-in 'animals' data needs the animal-mnist package's files: "
                           "pip install --no-deps animal-mnist==0.4 (its tensorflow dependency is not needed)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(folder / name, "rb") as fh:
            arrays.append(torch.from_numpy(np.asarray(_NumpyOnlyUnpickler(fh).load()).copy()))
    return arrays[0], arrays[1]


def animals(size: int, shots_per_class: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset, list[str]]:
    """Animal silhouettes (animal-mnist 0.4: 10,000 28x28 grey images, 10 classes of 1,000), upsampled
    (bilinear) to (3, size, size) in [-1, 1]. Test split: every fifth image (2,000); train:
    ``shots_per_class`` images per class of the rest (all 8,000 when <= 0)."""
    images, labels = _load_animal_arrays()
    x = images.to(torch.float32)[:, None] / 255.0
    y = labels.to(torch.long).reshape(-1)
    if x.shape[0] != y.shape[0] or not bool(((y >= 0) & (y < len(ANIMALS))).all()):
        raise RuntimeError(f"unexpected animal-mnist files: {tuple(x.shape)} images, labels in "
                           f"[{int(y.min())}, {int(y.max())}]")
    every = torch.arange(len(y))
    test, pool = every[every % 5 == 0], every[every % 5 != 0]
    if shots_per_class > 0:
        pool = pool[_few_shot(y[pool], len(ANIMALS), shots_per_class, seed)]
    sets = [TensorDataset(F.interpolate(x[i], size=(size, size), mode="bilinear", align_corners=False)
                          .sub(BUILTIN_MEAN).div(BUILTIN_STD).expand(-1, 3, -1, -1), y[i]) for i in (pool, test)]
    return sets[0], sets[1], list(ANIMALS)


def builtin(name: str, size: int, shots_per_class: int, seed: int = 0):
    """A built-in offline task by name: "digits" (sklearn) or "animals" (animal-mnist)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in data {name!r}; built in: {', '.join(BUILTIN)}")
    return (digits if name == "digits" else animals)(size, shots_per_class, seed)


def image_folder(root: str, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 shots_per_class: int = 0, seed: int = 0) -> tuple[Dataset, Dataset, list[str]]:
    """``root/train`` and ``root/val`` ImageFolders (same class folders in both)."""
    from .._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from torchvision import datasets, transforms

    root_p, big = Path(root), int(round(size / 0.875))
    for split in ("train", "val"):
        if not (root_p / split).is_dir():
            raise FileNotFoundError(f"--data {root}: expected an ImageFolder with '{split}/' inside "
                                    f"({root_p / split} is missing); layout: {root}/{{train,val}}/<class>/<image>")
    tfs = [transforms.Compose([transforms.Resize(big), transforms.CenterCrop(crop), transforms.ToTensor(),
                               transforms.Normalize(mean, std)]) for crop in (big, size)]
    try:
        train, test = (datasets.ImageFolder(str(root_p / split), transform=tf)
                       for split, tf in zip(("train", "val"), tfs))
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"--data {root}: not a usable ImageFolder: {e}") from e
    if train.classes != test.classes:
        raise ValueError(f"--data {root}: train/ and val/ have different class folders")
    if shots_per_class > 0:
        keep = _few_shot(torch.tensor(train.targets), len(train.classes), shots_per_class, seed)
        train = Subset(train, sorted(keep.tolist()))
    return train, test, list(test.classes)


def ood_folder(root: str, size: int, mean: tuple[float, ...], std: tuple[float, ...],
               classes: list[str]) -> Dataset | None:
    """``root/ood``, a shifted test set next to ``train/`` and ``val/`` (same class folders), transformed as
    ``val/`` (centre ``size`` crop, normalised); None when ``root/ood`` does not exist."""
    from .._compat import ensure_torchvision_importable

    folder = Path(root) / "ood"
    if not folder.is_dir():
        return None
    ensure_torchvision_importable()
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(int(round(size / 0.875))), transforms.CenterCrop(size),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    try:
        ds = datasets.ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise FileNotFoundError(f"--data {root}: ood/ is not a usable ImageFolder: {e}") from e
    if ds.classes != list(classes):
        raise ValueError(f"--data {root}: ood/ has class folders {ds.classes}, train/ has {list(classes)}")
    return ds


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float], hflip: bool) -> torch.Tensor:
    """Per-image RandomResizedCrop(size, scale, ratio 3/4-4/3) (+ flip, p=0.5), batched: (B, 3, S, S) ->
    (B, 3, size, size). Crops larger than the image are clamped to it (torchvision retries, then
    centre-crops)."""
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


def make_views(x: torch.Tensor, size: int, num_views: int, hflip: bool, min_scale: float = 0.2) -> torch.Tensor:
    """(B, 3, S, S) -> (V, B, 3, size, size): views 0/1 "image" augmentation (crop area in
    (min_scale, 1), published 0.2), views 2/3 "patch" augmentation (area in (max(min_scale, 0.5), 1))."""
    return torch.stack([random_resized_crop(x, size, (min_scale if v < 2 else max(min_scale, 0.5), 1.0), hflip)
                        for v in range(num_views)])
