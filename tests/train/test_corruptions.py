"""concept_kernels.train.corruptions against float64 numpy transcriptions of each corruption (CIFAR-10-C's
parameters, written out here from the paper's code, not imported), determinism per seed, distortion growing
with severity, the pixel-space round trip of each task's normalisation, and errors for bad input."""
import math

import numpy as np
import pytest
import torch

from concept_kernels.train import corruptions as C

NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # CIFAR-10-C gaussian_noise
BLUR_AT_32 = (0.4, 0.6, 0.7, 0.8, 1.0)  # CIFAR-10-C gaussian_blur (32 px)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # CIFAR-10-C contrast
ROT_DEG, ZOOM = (6, 12, 18, 24, 30), (0.95, 0.90, 0.85, 0.80, 0.75)  # documented affine


def _images(b=2, c=3, h=12, w=16, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _structured(b=4, h=32, w=32):
    """Smooth images with an off-centre bright square: rotation, zoom, blur and contrast all change them."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    base = 0.5 + 0.3 * np.sin(2 * np.pi * i / h) * np.cos(2 * np.pi * j / w)
    base[4:12, 18:28] = 0.95
    x = np.stack([np.stack([base, 1 - base, base ** 2]) for _ in range(b)])
    return torch.tensor(x, dtype=torch.float32)


def _np_blur(x, sigma):
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    B, Ch, H, W = x.shape
    out = np.zeros_like(x)
    for i in range(H):
        for j in range(W):
            for a in range(-r, r + 1):
                for b in range(-r, r + 1):
                    ii, jj = min(max(i + a, 0), H - 1), min(max(j + b, 0), W - 1)  # replicated border
                    out[:, :, i, j] += k[a + r] * k[b + r] * x[:, :, ii, jj]
    return np.clip(out, 0, 1)


def _np_affine(x, angles, zoom):
    """Loop over output pixels: the input point R(angle) p / zoom (p from the image centre, in pixels),
    bilinear, zero outside."""
    B, Ch, H, W = x.shape
    out = np.zeros_like(x)
    for n in range(B):
        ca, sa = math.cos(angles[n]), math.sin(angles[n])
        for i in range(H):
            for j in range(W):
                X, Y = j + 0.5 - W / 2, i + 0.5 - H / 2
                px = (ca * X - sa * Y) / zoom + W / 2 - 0.5
                py = (sa * X + ca * Y) / zoom + H / 2 - 0.5
                x0, y0 = math.floor(px), math.floor(py)
                for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                    for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                        if 0 <= yy < H and 0 <= xx < W:
                            out[n, :, i, j] += wy * wx * x[n, :, yy, xx]
    return np.clip(out, 0, 1)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_matches_numpy(severity):
    x = _images()
    got = C.corrupt(x, "gaussian_noise", severity, torch.Generator().manual_seed(7))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()
    want = np.clip(x.double().numpy() + NOISE[severity - 1] * z, 0, 1)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-6)
    # the noise itself, measured on mid-grey images (no clipping): zero mean, std = the severity's sigma
    grey = torch.full((4, 3, 64, 64), 0.5, dtype=torch.float64)
    d = C.corrupt(grey, "gaussian_noise", severity, torch.Generator().manual_seed(1)) - 0.5
    assert abs(float(d.mean())) < 0.05 * NOISE[severity - 1]  # 11 standard errors of 49,152 draws
    assert float(d.std()) == pytest.approx(NOISE[severity - 1], rel=0.03)


@pytest.mark.parametrize("severity", [1, 3, 5])
@pytest.mark.parametrize("shape", [(2, 3, 12, 16), (1, 1, 40, 40)])
def test_blur_matches_numpy(severity, shape):
    x = _images(*shape)
    sigma = BLUR_AT_32[severity - 1] * min(shape[2:]) / 32
    want = _np_blur(x.double().numpy(), sigma)
    np.testing.assert_allclose(C.corrupt(x, "blur", severity).double().numpy(), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(C.corrupt(x.double(), "blur", severity).numpy(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_contrast_matches_numpy(severity):
    x = _images().double().numpy()
    m = x.mean(axis=(2, 3), keepdims=True)
    want = np.clip((x - m) * CONTRAST[severity - 1] + m, 0, 1)
    np.testing.assert_allclose(C.corrupt(torch.tensor(x), "contrast", severity).numpy(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("severity", [1, 3, 5])
@pytest.mark.parametrize("shape", [(3, 2, 9, 13), (2, 3, 10, 10)])
def test_affine_matches_numpy(severity, shape):
    x = _images(*shape, seed=3).double()
    got = C.corrupt(x, "affine", severity, torch.Generator().manual_seed(5))
    sign = torch.randint(0, 2, (shape[0],), generator=torch.Generator().manual_seed(5)).numpy() * 2 - 1
    want = _np_affine(x.numpy(), sign * math.radians(ROT_DEG[severity - 1]), ZOOM[severity - 1])
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_deterministic_per_seed_and_distortion_grows_with_severity(name):
    x = _structured()

    def run(severity, seed=0):
        return C.corrupt(x, name, severity, torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    if name in C.RANDOM:
        assert not torch.equal(run(3, seed=0), run(3, seed=1))
    dist = [float((run(s) - x).abs().mean()) for s in C.SEVERITIES]
    assert all(a < b for a, b in zip(dist, dist[1:])), dist
    assert dist[0] > 0 and run(5).shape == x.shape and 0 <= float(run(5).min()) and float(run(5).max()) <= 1


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_nan_stays_visible(name):
    x = _images()
    x[0, 1, 5, 7] = float("nan")
    y = C.corrupt(x, name, 3, torch.Generator().manual_seed(0))
    assert bool(y[0].isnan().any()) and not bool(y[1].isnan().any())


def test_pixel_round_trip_of_each_normalisation():
    from concept_kernels.train.data import digits

    _, test, _ = digits(16, 1)
    x = test.tensors[0][:50]
    px = C.to_pixels(x, (0.5,) * 3, (0.5,) * 3)  # the built-in tasks: [-1, 1] -> [0, 1]
    assert float(px.min()) == pytest.approx(0.0, abs=1e-6) and float(px.max()) == pytest.approx(1.0, abs=0.05)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # an ImageFolder's (ImageNet) Normalize
    p = _images()
    normed = C.from_pixels(p, mean, std)
    np.testing.assert_allclose(normed[:, 1].double().numpy(), (p[:, 1].double().numpy() - 0.456) / 0.224, atol=1e-6)
    torch.testing.assert_close(C.to_pixels(normed, mean, std), p, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="1 or C = 3"):
        C.to_pixels(p, (0.1, 0.2), std)


def test_parsing_and_bad_input():
    assert C.parse_corruptions("all") == C.CORRUPTIONS and C.parse_corruptions("none") == ()
    assert C.parse_corruptions("blur, contrast,blur") == ("blur", "contrast")
    with pytest.raises(ValueError, match=r"unknown \['fog'\]"):
        C.parse_corruptions("blur,fog")
    assert C.parse_severities("5,1,5") == (5, 1) and C.parse_severities((3,)) == (3,)
    for bad in ("0", "6", "2.5", "", (True,)):
        with pytest.raises(ValueError, match="1..5"):
            C.parse_severities(bad)
    x = _images()
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        C.corrupt(x, "snow", 1)
    for bad in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity must be an integer in 1..5"):
            C.corrupt(x, "blur", bad)
    with pytest.raises(TypeError, match="generator=torch.Generator"):
        C.corrupt(x, "gaussian_noise", 1)
    with pytest.raises(TypeError, match="floating-point"):
        C.corrupt((x * 255).to(torch.uint8), "blur", 1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        C.corrupt(x[0], "contrast", 1)
