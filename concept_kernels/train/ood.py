"""Shifted (out-of-distribution) test sets and their accuracy per head.

The shifted sets are the ID test split's images (at most ``limit``, evenly spaced over it, the same for
every run) corrupted by each of the :mod:`.corruptions` at each severity, in pixel space (un-normalised
with the task's mean/std, corrupted, re-normalised), plus, for an ImageFolder, the images of an ``ood/``
folder next to ``train/`` and ``val/``. The corruptions run on chunks of :data:`OOD_BATCH` images in order,
drawing from one generator per set seeded with :func:`set_seed`, and the IB head's latent draws from the
torch RNG seeded with :data:`OOD_SEED` inside a fork of the RNG state (the caller's stream is untouched), so
a model's OOD accuracy is deterministic and every run sees the same shifted images.

Result (``eval_*.json``'s "ood", accuracy.py's result.json "ood"; ``<out>/ood.json`` adds "epoch" and "id",
the ID test accuracy per head)::

    {"setting": {"corruptions": [...], "severities": [...], "limit": int, "folder": bool},
     "n_images": {set: int}, "sets": {set: {head: acc}}, "mean": {head: acc}, "acc": max over heads of "mean"}

with sets named ``<corruption>_s<severity>`` and ``folder``; "mean" is the plain mean over the sets.
"""
from __future__ import annotations

import dataclasses

import torch

from .corruptions import CORRUPTIONS, corrupt, from_pixels, parse_corruptions, parse_severities, to_pixels

OOD_SEED = 0
OOD_BATCH = 100  # images per corruption call and forward pass (the noise draws depend on it)
OOD_JSON = "ood.json"


def set_seed(corruption: str, severity: int) -> int:
    """The seed of the generator that corrupts the shifted set (``corruption``, ``severity``)."""
    return OOD_SEED * 1000 + CORRUPTIONS.index(corruption) * 10 + severity


@dataclasses.dataclass(frozen=True)
class ShiftSpec:
    """Which shifted sets: corruption names, severities, images per set (0: all), and whether an
    ImageFolder's ``ood/`` folder is evaluated when present."""
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    limit: int
    folder: bool = True

    @classmethod
    def parse(cls, corruptions, severities, limit: int, folder: bool = True) -> ShiftSpec:
        """Validated: ValueError for an unknown corruption, a severity outside 1..5 or a negative limit."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"ood limit must be an integer >= 0 (0: all test images), got {limit!r}")
        return cls(parse_corruptions(corruptions), parse_severities(severities), limit, folder)

    def setting(self) -> dict:
        return dict(corruptions=list(self.corruptions), severities=list(self.severities), limit=self.limit,
                    folder=self.folder)

    def set_names(self) -> list[str]:
        return [f"{c}_s{s}" for c in self.corruptions for s in self.severities]


def spread(n: int, limit: int) -> list[int]:
    """``min(limit, n)`` positions evenly spaced over range(n) (all of them for limit 0 or >= n)."""
    k = n if limit <= 0 or limit >= n else limit
    return [(i * n) // k for i in range(k)]


def head_hits(model, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, int]:
    """{head: correct top-1 predictions} of ``model.predict`` on x (B, 3, S, S) with labels y (B,)."""
    return {k: int((v.argmax(1).cpu() == y.cpu()).sum()) for k, v in model.predict(x.to(device)).items()}


def _add(total: dict[str, int], hits: dict[str, int]) -> None:
    for k, v in hits.items():
        total[k] = total.get(k, 0) + v


@torch.no_grad()
def evaluate_shifted(model, test_set, spec: ShiftSpec, mean, std, device: torch.device, *, folder=None,
                     workers: int = 0) -> dict:
    """Accuracy per head of ``model`` on each shifted set of ``spec`` built from ``test_set`` (normalised
    (3, S, S) images with ``mean``/``std``, C or 1 values each) and on ``folder`` (a dataset, or None);
    the dict of the module docstring. The model's train/eval mode is restored afterwards."""
    from .trainer import batches  # (trainer imports this module)

    batch_size = OOD_BATCH
    was_training = model.training
    model.eval()
    sets: dict[str, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(OOD_SEED)
        if spec.corruptions:
            pos = spread(len(test_set), spec.limit)
            if not pos:
                raise ValueError("the test split is empty: no images for the shifted test sets")
            x, y = (torch.cat(t) for t in zip(*batches(test_set, [pos[s:s + batch_size]
                                                                  for s in range(0, len(pos), batch_size)], workers)))
            pixels = to_pixels(x, mean, std)
            for c in spec.corruptions:
                for s in spec.severities:
                    g = torch.Generator().manual_seed(set_seed(c, s))
                    hits: dict[str, int] = {}
                    for b in range(0, len(pos), batch_size):
                        xb = from_pixels(corrupt(pixels[b:b + batch_size], c, s, g), mean, std)
                        _add(hits, head_hits(model, xb, y[b:b + batch_size], device))
                    sets[f"{c}_s{s}"], sizes[f"{c}_s{s}"] = hits, len(pos)
        if folder is not None and spec.folder:
            pos = spread(len(folder), spec.limit)
            hits = {}
            for xb, yb in batches(folder, [pos[s:s + batch_size] for s in range(0, len(pos), batch_size)], workers):
                _add(hits, head_hits(model, xb, yb, device))
            sets["folder"], sizes["folder"] = hits, len(pos)
    model.train(was_training)
    accs = {name: {k: v / sizes[name] for k, v in h.items()} for name, h in sets.items()}
    heads = list(next(iter(accs.values()), {}))
    means = {k: sum(a[k] for a in accs.values()) / len(accs) for k in heads}
    return dict(setting=spec.setting(), n_images=sizes, sets=accs, mean=means,
                acc=max(means.values()) if means else None)


def metric_row(result: dict) -> dict[str, float]:
    """The metrics-row entries of an :func:`evaluate_shifted` result: ``ood_acc`` (max over heads of the
    mean over sets), ``ood_acc_<head>`` (mean over sets) and ``ood_<set>_acc_<head>``."""
    if not result["sets"]:
        return {}
    row = {"ood_acc": result["acc"], **{f"ood_acc_{k}": v for k, v in result["mean"].items()}}
    for name, accs in result["sets"].items():
        row.update({f"ood_{name}_acc_{k}": v for k, v in accs.items()})
    return row


def summary_line(result: dict, id_acc: dict[str, float] | None = None) -> str:
    """One line: mean OOD accuracy per head (with the ID accuracy when given), then each set's main head."""
    if not result["sets"]:
        return "OOD: no shifted sets"
    heads = ", ".join(f"{k} {v:.3f}" + (f" (ID {id_acc[k]:.3f})" if id_acc and k in id_acc else "")
                      for k, v in result["mean"].items())
    per_set = ", ".join(f"{name} {a['main']:.3f}" for name, a in result["sets"].items())
    n = sorted(set(result["n_images"].values()))
    return (f"OOD accuracy, mean over {len(result['sets'])} shifted sets ({'/'.join(map(str, n))} images each): "
            f"{heads}; main head per set: {per_set}")
