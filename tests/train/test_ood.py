"""Shifted (OOD) test sets (issue #17): concept_kernels.train.ood against a per-image count, the trainer's
end-of-run OOD metrics and ood.json, the same numbers post hoc from the checkpoint and from the eval CLI,
an ImageFolder's ood/ folder, and bad flags."""
import json

import pytest
import torch
from conftest import tiny_config
from torch.utils.data import TensorDataset

from concept_kernels.train import run
from concept_kernels.train.corruptions import corrupt
from concept_kernels.train.eval import main as eval_main
from concept_kernels.train.eval import shifted_accuracy
from concept_kernels.train.ood import ShiftSpec, evaluate_shifted, set_seed, spread
from concept_kernels.train.trainer import CHECKPOINT

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LinearStub(torch.nn.Module):
    """predict: "main" and "ib" logits, fixed linear maps of the normalised pixels."""

    def __init__(self, pixels: int, classes: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(2, pixels, classes, generator=g, dtype=torch.float64)

    def predict(self, x):
        f = x.double().flatten(1)
        return {"main": f @ self.w[0], "ib": f @ self.w[1]}


def test_spread_is_even_and_bounded():
    assert spread(10, 0) == list(range(10)) and spread(10, 20) == list(range(10))
    assert spread(10, 4) == [0, 2, 5, 7] and spread(2000, 200) == list(range(0, 2000, 10))


def test_evaluate_shifted_matches_a_per_image_count():
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(30, 3, 8, 8, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    normed = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    model = LinearStub(3 * 8 * 8).train()
    spec = ShiftSpec.parse("gaussian_noise,contrast", "2,4", limit=10)
    rng_before = torch.get_rng_state()
    res = evaluate_shifted(model, TensorDataset(normed, labels), spec, MEAN, STD, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng_before) and model.training  # caller's RNG and mode kept
    keep = list(range(0, 30, 3))  # 10 of 30, evenly spaced
    assert res["n_images"] == {name: 10 for name in spec.set_names()}
    for c in spec.corruptions:
        for s in spec.severities:
            shifted = corrupt(pixels[keep].double(), c, s, torch.Generator().manual_seed(set_seed(c, s)))
            for head in ("main", "ib"):
                hits = 0
                for i, pos in enumerate(keep):  # one image at a time, normalised here in float64
                    x = (shifted[i] - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
                        STD, dtype=torch.float64).view(3, 1, 1)
                    hits += int(model.predict(x[None])[head].argmax(1).item() == labels[pos].item())
                assert res["sets"][f"{c}_s{s}"][head] == hits / 10, (c, s, head)
    for head in ("main", "ib"):
        assert res["mean"][head] == pytest.approx(sum(a[head] for a in res["sets"].values()) / 4, abs=1e-15)
    assert res["acc"] == max(res["mean"].values())


def test_trainer_ood_metrics_json_and_post_hoc(tmp_path, capsys):
    """A 2-epoch run: OOD only in the last row (+ ood.json, printed); the checkpoint evaluated post hoc and by
    the eval CLI gives the same numbers."""
    cfg = tiny_config(tmp_path, epochs=2, iters_per_epoch=1, ood_severities=(1, 4), ood_limit=12)
    hist = run(cfg)
    out = capsys.readouterr().out
    assert "final model: OOD accuracy, mean over 8 shifted sets (12 images each)" in out
    assert not any(k.startswith("ood") for k in hist[0])
    last, saved = hist[-1], json.loads((tmp_path / "run" / "ood.json").read_text())
    assert saved["epoch"] == 2 and set(saved["sets"]) == {f"{c}_s{s}" for c in
                                                          ("gaussian_noise", "blur", "contrast", "affine")
                                                          for s in (1, 4)}
    assert last["ood_acc_main"] == saved["mean"]["main"] and last["ood_acc_ib"] == saved["mean"]["ib"]
    assert last["ood_acc"] == max(saved["mean"].values())
    assert last["ood_blur_s4_acc_ib"] == saved["sets"]["blur_s4"]["ib"]
    assert "ood_acc_main" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    spec = ShiftSpec.parse("all", (1, 4), 12)
    post, ckpt = shifted_accuracy(tmp_path / "run" / CHECKPOINT, spec)
    assert ckpt["history"][-1]["ood_acc_main"] == last["ood_acc_main"]
    assert saved["id"] == {"main": last["acc_main"], "ib": last["acc_ib"]}  # the ID accuracy next to it
    assert post == {k: v for k, v in saved.items() if k not in ("epoch", "id")}  # both heads, every set, exactly
    report = tmp_path / "report"
    assert eval_main(["--run", cfg.out, "--checkpoint", "last", "--test-limit", "40", "--ood-severities", "4",
                      "--threads", "1", "--no-plot", "--out", str(report)]) == 0
    ev = json.loads((report / "eval_last.json").read_text())["ood"]
    assert ev["setting"]["severities"] == [4] and ev["n_images"]["affine_s4"] == 12
    assert ev["sets"]["affine_s4"]["main"] == saved["sets"]["affine_s4"]["main"]
    assert "OOD accuracy, mean over 4 shifted sets" in capsys.readouterr().out


def test_every_epoch_none_and_bad_flags(tmp_path):
    hist = run(tiny_config(tmp_path / "a", epochs=2, iters_per_epoch=1, ood_corruptions="contrast",
                           ood_every_epoch=True, ood_limit=8))
    assert all(set(r) >= {"ood_acc_main", "ood_contrast_s3_acc_main"} for r in hist)
    hist = run(tiny_config(tmp_path / "b", iters_per_epoch=1, ood_corruptions="none"))
    assert not any(k.startswith("ood") for k in hist[-1]) and not (tmp_path / "b" / "run" / "ood.json").exists()
    for kw, match in ((dict(ood_corruptions="blur,fog"), r"unknown \['fog'\]"), (dict(ood_severities=(6,)), "1..5"),
                      (dict(ood_limit=-1), "ood limit")):
        with pytest.raises(ValueError, match=match):
            run(tiny_config(tmp_path / "c", **kw))
        assert not (tmp_path / "c" / "run" / CHECKPOINT).exists()  # refused before training


def _png_folder(root, splits, classes="abcd"):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 255, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / c / f"{i}.png")


def test_image_folder_ood_folder(tmp_path):
    _png_folder(tmp_path / "imgs", (("train", 2), ("val", 1), ("ood", 2)))
    cfg = tiny_config(tmp_path, data=str(tmp_path / "imgs"), iters_per_epoch=1, shots_per_class=0,
                      ood_corruptions="blur", ood_limit=5)
    hist = run(cfg)
    saved = json.loads((tmp_path / "run" / "ood.json").read_text())
    assert saved["n_images"] == {"blur_s3": 4, "folder": 5} and "ood_folder_acc_main" in hist[-1]
    sets = saved["sets"]
    assert hist[-1]["ood_acc_main"] == pytest.approx((sets["blur_s3"]["main"] + sets["folder"]["main"]) / 2)
    _png_folder(tmp_path / "bad", (("train", 2), ("val", 1)))
    _png_folder(tmp_path / "bad", (("ood", 1),), classes="abce")
    with pytest.raises(ValueError, match="ood/ has class folders"):
        run(tiny_config(tmp_path, data=str(tmp_path / "bad"), iters_per_epoch=1, shots_per_class=0,
                        out=str(tmp_path / "r2")))
