"""Corruptions of test images for shifted (out-of-distribution) test sets, in the style of CIFAR-10-C
(Hendrycks & Dietterich, ICLR 2019): Gaussian noise, Gaussian blur, contrast and an affine warp
(rotation + zoom-out), each at severities 1..5.

All work batched in PIXEL space: x is a (B, C, H, W) float tensor with values in [0, 1] (un-normalise a
model's input first: :func:`to_pixels` / :func:`from_pixels`), and the result, clipped to [0, 1] as in
CIFAR-10-C, has the same shape. The random corruptions (noise, the affine warp's rotation direction) draw
from the ``torch.Generator`` given, so a seed fixes them. NaN/inf in the input stay visible in the output.

Severity parameters (index = severity - 1):

* ``gaussian_noise``: x + N(0, s^2), s = 0.04, 0.06, 0.08, 0.09, 0.10 (CIFAR-10-C), per pixel and channel.
* ``blur``: Gaussian blur, sigma = 0.4, 0.6, 0.7, 0.8, 1.0 (CIFAR-10-C's, for 32 px) x min(H, W) / 32 px,
  kernel radius ceil(3 sigma), borders replicated.
* ``contrast``: (x - m) c + m with m the per-image, per-channel mean, c = 0.75, 0.5, 0.4, 0.3, 0.15
  (CIFAR-10-C).
* ``affine`` (not in CIFAR-10-C): rotation by 6, 12, 18, 24, 30 degrees (direction drawn per image) and
  zoom-out to 0.95, 0.90, 0.85, 0.80, 0.75 of the size about the centre, bilinear, black (0) outside.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CORRUPTIONS = ("gaussian_noise", "blur", "contrast", "affine")
SEVERITIES = (1, 2, 3, 4, 5)
NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
BLUR_SIGMA_AT_32PX = (0.4, 0.6, 0.7, 0.8, 1.0)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
ROTATION_DEGREES = (6.0, 12.0, 18.0, 24.0, 30.0)
ZOOM = (0.95, 0.90, 0.85, 0.80, 0.75)
RANDOM = ("gaussian_noise", "affine")  # the corruptions that draw from the generator


def parse_corruptions(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Corruption names from "all", "none"/"" or a comma-separated list (order kept, duplicates dropped);
    ValueError naming the unknown ones."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if names in (["all"], ["none"]) or not names:
        return CORRUPTIONS if names == ["all"] else ()
    if unknown := [n for n in names if n not in CORRUPTIONS]:
        raise ValueError(f"ood corruptions: unknown {unknown}; expected a comma-separated list of "
                         f"{', '.join(CORRUPTIONS)}, or 'all' or 'none'")
    return tuple(dict.fromkeys(names))


def check_severity(severity) -> int:
    """``severity`` as an int in 1..5, else ValueError."""
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be an integer in 1..5, got {severity!r}")
    return severity


def parse_severities(spec) -> tuple[int, ...]:
    """Severities from a comma-separated string or a sequence of ints (each in 1..5, duplicates dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for s in items:
        if isinstance(s, str):
            if not s.strip():
                continue
            try:
                s = int(s)
            except ValueError:
                raise ValueError(f"ood severities: {s!r} is not an integer in 1..5") from None
        out.append(check_severity(s))
    if not out:
        raise ValueError("ood severities: give at least one severity in 1..5")
    return tuple(dict.fromkeys(out))


def _check_images(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor of pixels in [0, 1], got "
                        f"{type(x).__name__}{'' if not isinstance(x, torch.Tensor) else ' of ' + str(x.dtype)}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")


def _normal(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(like)


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): clip(x + s * z) with z ~ N(0, 1), drawn (float64, on the CPU) as one
    ``torch.randn(x.shape, generator=generator, dtype=torch.float64)``."""
    return (x + NOISE_STD[severity - 1] * _normal(x.shape, generator, x)).clamp(0.0, 1.0)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """(2r + 1,) float64 weights exp(-k^2 / (2 sigma^2)), k = -r..r, r = max(1, ceil(3 sigma)), summing to 1."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-k * k / (2 * sigma * sigma))
    return w / w.sum()


def blur_sigma(severity: int, height: int, width: int) -> float:
    """The blur's sigma in pixels for an H x W image (CIFAR-10-C's 32-px sigma scaled by min(H, W) / 32)."""
    return BLUR_SIGMA_AT_32PX[severity - 1] * min(height, width) / 32


def blur(x: torch.Tensor, severity: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): separable Gaussian blur (:func:`gaussian_kernel`, :func:`blur_sigma`),
    replicated borders."""
    B, C, H, W = x.shape
    k = gaussian_kernel(blur_sigma(severity, H, W)).to(x)
    r = (len(k) - 1) // 2
    y = x.reshape(B * C, 1, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(B, C, H, W).clamp(0.0, 1.0)


def contrast(x: torch.Tensor, severity: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): (x - m) c + m, m = the mean of each image's channel, clipped."""
    m = x.mean(dim=(2, 3), keepdim=True)
    return ((x - m) * CONTRAST[severity - 1] + m).clamp(0.0, 1.0)


def affine_angles(batch: int, severity: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) float64 rotation angles in radians: +-ROTATION_DEGREES[severity - 1], the sign drawn per image as
    ``torch.randint(0, 2, (batch,), generator=generator)``."""
    sign = torch.randint(0, 2, (batch,), generator=generator).to(torch.float64) * 2 - 1
    return sign * math.radians(ROTATION_DEGREES[severity - 1])


def affine(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): output pixel centre p (in pixels from the image centre) takes the
    bilinear input value at R(angle) p / zoom (zero outside the image); angles: :func:`affine_angles`."""
    B, C, H, W = x.shape
    a, z = affine_angles(B, severity, generator), ZOOM[severity - 1]
    cos, sin = a.cos() / z, a.sin() / z
    theta = torch.zeros(B, 2, 3, dtype=torch.float64)  # in grid units [-1, 1] per axis: aspect corrected
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * H / W
    theta[:, 1, 0], theta[:, 1, 1] = sin * W / H, cos
    grid = F.affine_grid(theta.to(x), [B, C, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0.0, 1.0)


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, H, W) pixels in [0, 1] -> the same shape, corrupted by ``name`` (one of :data:`CORRUPTIONS`)
    at ``severity`` (1..5). ``gaussian_noise`` and ``affine`` need a ``torch.Generator`` (their draws are
    sequential in it, so a seeded generator fixes a whole shifted set)."""
    _check_images(x)
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    check_severity(severity)
    if name in RANDOM and not isinstance(generator, torch.Generator):
        raise TypeError(f"corruption {name!r} is random: pass generator=torch.Generator().manual_seed(seed), "
                        f"got {type(generator).__name__}")
    if name == "gaussian_noise":
        return gaussian_noise(x, severity, generator)
    if name == "affine":
        return affine(x, severity, generator)
    return blur(x, severity) if name == "blur" else contrast(x, severity)


def _per_channel(v, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(-1)
    if t.numel() not in (1, x.shape[1]):
        raise ValueError(f"mean/std must have 1 or C = {x.shape[1]} entries, got {t.numel()}")
    return t.view(1, -1, 1, 1)


def to_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised (B, C, H, W) -> pixels x * std + mean (mean/std: C or 1 values, as in Normalize)."""
    return x * _per_channel(std, x) + _per_channel(mean, x)


def from_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Pixels (B, C, H, W) -> normalised (x - mean) / std."""
    return (x - _per_channel(mean, x)) / _per_channel(std, x)
