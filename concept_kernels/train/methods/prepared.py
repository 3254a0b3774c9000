"""What the methods' ``prepare`` hooks share: the training images at the model's input size, and a cache
of what they compute before training under the run's output directory, keyed by a digest of everything
the result depends on (weights, images, labels, options), so a resumed run reuses it and another model,
data set or seed does not."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F


class Digest:
    """Incremental SHA-256 of what a cached result depends on: ``add(*parts)`` takes tensors (by dtype,
    shape and bytes), dicts of them (state dicts, entry by entry in key order) and anything JSON can write."""

    def __init__(self, *parts) -> None:
        self._h = hashlib.sha256()
        self.add(*parts)

    def add(self, *parts) -> Digest:
        for x in parts:
            if isinstance(x, torch.Tensor):
                t = x.detach().cpu().contiguous()
                self._h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                self._h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            elif isinstance(x, dict):
                for k in sorted(x):
                    self._h.update(str(k).encode())
                    self.add(x[k])
            else:
                self._h.update(json.dumps(x, sort_keys=True).encode())
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def dataset_digest(tuner, dataset, positions: Sequence[int] | None, *parts) -> str:
    """The :class:`Digest` of ``parts`` and of the images and labels :func:`training_images` yields."""
    d = Digest(*parts)
    for x, y in training_images(tuner, dataset, positions):
        d.add(x, y)
    return d.hexdigest()


def cached(out_dir, filename: str, key: str, compute: Callable[[], torch.Tensor | list[torch.Tensor]],
           label: str):
    """``compute()``, or the value saved in ``<out_dir>/<filename>`` under the same ``key``; a new value
    is saved there (atomically). ``out_dir`` None: no cache. Prints which of the two happened."""
    path = None if out_dir is None else Path(out_dir) / filename
    if path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(saved, dict) and saved.get("key") == key:
            print(f"{label}: reusing {path}", flush=True)
            return saved["value"]
        print(f"{label}: {path} was computed for another model, data set or setting; recomputing", flush=True)
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(dict(key=key, value=value), tmp)
        os.replace(tmp, path)
        print(f"{label}: saved {path}", flush=True)
    return value


def training_images(tuner, dataset, positions: Sequence[int] | None = None,
                    batch_size: int = 100) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(x (b, 3, H, W), y (b,)) chunks of ``dataset`` (its ``positions``, default all) on the tuner's
    device and dtype, resized (bilinear) to the tuner's ``image_size`` where they differ (an ImageFolder's
    training images are stored larger, for the random crops)."""
    from ..trainer import batches

    ref = tuner.head.weight
    positions = list(range(len(dataset))) if positions is None else list(positions)
    chunks = [positions[s:s + batch_size] for s in range(0, len(positions), batch_size)]
    for x, y in batches(dataset, chunks):
        x = x.to(ref.device, ref.dtype)
        if tuple(x.shape[-2:]) != tuner.image_size:
            x = F.interpolate(x, size=tuner.image_size, mode="bilinear", align_corners=False)
        yield x, y.to(ref.device)
