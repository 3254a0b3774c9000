"""Linear CKA and the KITE score (Guo 2024), in float64, on feature matrices (rows = examples).

Linear CKA of representations X (n, d1) and Y (n, d2) of the same n examples (Kornblith et al. 2019):
``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the linear kernels K = X X^T, L = Y Y^T and
``HSIC(K, L) = tr(K H L H) / (n - 1)^2``, H = I - 11^T / n (the (n - 1)^2 cancel). With column-centred
Xc, Yc that is ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``; :func:`linear_cka` evaluates whichever
of the two forms is cheaper (n x n Gram matrices when n is small against the feature dimensions).

KITE = CKA(K_pretrained, K_labels) / CKA(K_pretrained, K_random): the pretrained features' alignment with
the one-hot labels (separability, "target alignment") over their alignment with the features of a
randomly initialised network of the same architecture ("random alignment"). Higher = expected to
transfer better: features that separate the target classes and are unlike random features.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch


def _matrix(name: str, value, rows: int | None = None) -> torch.Tensor:
    """``value`` (a tensor or ndarray of real numbers, 2-D) as a float64 CPU tensor; clear errors."""
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    t = torch.as_tensor(value)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (examples, features), got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} must have one row per example ({rows}), got shape {tuple(t.shape)}")
    if t.shape[0] < 2 or t.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 examples and 1 feature, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.float64)


def _centred_unit_scale(t: torch.Tensor) -> torch.Tensor:
    """Columns centred, then divided by the largest |entry| (CKA is scale invariant; this keeps the
    fourth powers in the Frobenius norms finite for features near 1e+-80). Non-finite input stays so."""
    t = t - t.mean(0)
    peak = t.abs().max()
    return t / peak if bool(torch.isfinite(peak)) and peak > 0 else t


def linear_cka(x, y) -> float:
    """Linear CKA of two representations of the same examples, in float64.

    x: (n, d1), y: (n, d2) real tensors or arrays, row i of both = example i (n >= 2). Returns a float in
    [0, 1]; 1 when y is an isotropic scaling / orthogonal transform / translation of x. NaN when x or y
    holds a NaN or inf. ValueError when a representation is constant over the examples (CKA undefined).
    """
    return _cka(x, y, "x", "y")


def _cka(x, y, x_name: str, y_name: str) -> float:
    """:func:`linear_cka` with errors naming the caller's arguments."""
    x = _matrix(x_name, x)
    y = _matrix(y_name, y, rows=x.shape[0])
    x, y = _centred_unit_scale(x), _centred_unit_scale(y)
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if n * n * (d1 + d2) < n * (d1 * d2 + d1 * d1 + d2 * d2):  # Gram form: K = X X^T (n, n)
        k, l = x @ x.T, y @ y.T
        cross, self_x, self_y = (k * l).sum(), k.square().sum().sqrt(), l.square().sum().sqrt()
    else:  # feature form: ||Y^T X||^2 / (||X^T X|| ||Y^T Y||)
        cross = (y.T @ x).square().sum()
        self_x, self_y = (x.T @ x).square().sum().sqrt(), (y.T @ y).square().sum().sqrt()
    for name, s in ((x_name, self_x), (y_name, self_y)):
        if s == 0:
            raise ValueError(f"{name} is the same for all {n} examples (zero variance): its CKA is undefined")
    return float(cross / (self_x * self_y))


def one_hot(labels, num_classes: int | None = None) -> torch.Tensor:
    """labels: (n,) integers in [0, num_classes) -> (n, num_classes) float64 one-hot rows
    (``num_classes`` default: max label + 1)."""
    if not isinstance(labels, (torch.Tensor, np.ndarray)):
        raise TypeError(f"labels must be a torch.Tensor or numpy.ndarray, got {type(labels).__name__}")
    t = torch.as_tensor(labels)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"labels must be integers (class indices), got dtype {t.dtype}")
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"labels must be 1-D with at least 2 entries, got shape {tuple(t.shape)}")
    t = t.to("cpu", torch.long)
    lo, hi = int(t.min()), int(t.max())
    if lo == hi:
        raise ValueError(f"labels hold a single class ({lo}): KITE's label alignment needs at least 2 classes")
    if num_classes is None:
        num_classes = hi + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return torch.nn.functional.one_hot(t, num_classes).to(torch.float64)


@dataclasses.dataclass(frozen=True)
class KiteScore:
    """score = target_alignment / random_alignment (higher: expected to transfer better)."""
    score: float
    target_alignment: float  # CKA(pretrained features, one-hot labels)
    random_alignment: float  # CKA(pretrained features, random-init features)


def kite_score(features, labels, random_features, num_classes: int | None = None) -> KiteScore:
    """KITE of one pretrained model on a labelled target set (Guo 2024, linear CKA).

    features: (n, d) the pretrained model's pooled features of the n target training images;
    labels: (n,) their class indices in [0, num_classes) (at least 2 classes present);
    random_features: (n, d_r) the same images' pooled features from a randomly initialised network of the
    same architecture (d_r = d for the same architecture; any d_r is accepted).
    Returns :class:`KiteScore` (score = CKA(features, one-hot labels) / CKA(features, random_features)).
    A NaN/inf in the features gives NaN; ValueError for constant features or orthogonal (CKA 0) random
    features.
    """
    features, y = _matrix("features", features), one_hot(labels, num_classes)
    if y.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have one entry per row of features ({features.shape[0]}), got "
                         f"{y.shape[0]}")
    target = _cka(features, y, "features", "one-hot labels")
    random = _cka(features, random_features, "features", "random_features")
    if random == 0:
        raise ValueError("features and random_features have CKA 0 (orthogonal after centring): KITE = "
                         "target alignment / 0 is undefined")
    return KiteScore(score=target / random, target_alignment=target, random_alignment=random)
