"""After training (issue #14): best.pt by the published protocol, ``load_tuner`` and
``python -m concept_kernels.train.eval`` (per-head accuracy, confusion matrices, JSON, PNG)."""
import json

import pytest
import torch
from conftest import tiny_config
from test_cli import run_module_without

from concept_kernels.train import run
from concept_kernels.train.eval import load_tuner, main
from concept_kernels.train.trainer import BEST, CHECKPOINT, build_data, load_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-epoch concept run on digits (one step per epoch, 40 test images); its output dir."""
    cfg = tiny_config(tmp_path_factory.mktemp("eval"), epochs=3, threads=1)
    history = run(cfg)
    assert len(history) == 3
    return cfg


def _first_best_epoch(history: list[dict]) -> int:
    best = 0
    for i, row in enumerate(history):  # strictly better only: the first epoch reaching the max
        if row["acc"] > history[best]["acc"]:
            best = i
    return history[best]["epoch"]


def test_best_checkpoint_is_the_best_epoch(trained):
    out = trained.out
    last, best = load_checkpoint(f"{out}/{CHECKPOINT}"), load_checkpoint(f"{out}/{BEST}")  # digests checked
    assert best["state"]["epoch"] == _first_best_epoch(last["history"])
    assert best["history"] == last["history"][: best["state"]["epoch"]]


def test_best_checkpoint_by_max_over_heads_first_epoch_wins(tmp_path, monkeypatch):
    """Scripted test accuracies (main, IB) per epoch: best.pt is the first epoch with the highest max over
    heads (epoch 2; by the main head alone it would be epoch 3; epoch 4 only ties)."""
    from concept_kernels.train import trainer

    script = iter([(0.5, 0.1), (0.2, 0.7), (0.6, 0.3), (0.1, 0.7)])

    def scripted(model, ds, device, **kw):
        main_acc, ib_acc = next(script)
        return dict(acc_main=main_acc, acc_ib=ib_acc, acc=max(main_acc, ib_acc))

    monkeypatch.setattr(trainer, "evaluate", scripted)
    cfg = tiny_config(tmp_path, epochs=4, iters_per_epoch=1)
    run(cfg)
    best = load_checkpoint(f"{cfg.out}/{BEST}")
    assert best["state"]["epoch"] == 2 and len(best["history"]) == 2
    last = load_checkpoint(f"{cfg.out}/{CHECKPOINT}")
    assert last["state"]["epoch"] == 4 and not torch.equal(best["model"]["head.weight"], last["model"]["head.weight"])


def test_load_tuner_rebuilds_the_trained_model(trained):
    model, cfg = load_tuner(f"{trained.out}/{CHECKPOINT}")
    saved = load_checkpoint(f"{trained.out}/{CHECKPOINT}")["model"]
    assert not model.training and cfg.method == trained.method and cfg.shots_per_class == trained.shots_per_class
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for k in saved:
        torch.testing.assert_close(state[k], saved[k], rtol=0, atol=0, msg=k)
    logits = model.predict(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    assert set(logits) == {"main", "ib"} and logits["main"].shape == (2, 10)
    from concept_kernels.train import ConceptTuner

    again = ConceptTuner.from_checkpoint(f"{trained.out}/{CHECKPOINT}")
    assert not again.training
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("which", ["best", "last"])
def test_eval_cli_per_head_accuracy_confusion_and_plot(trained, tmp_path, which):
    report = tmp_path / "report"
    assert main(["--run", trained.out, "--checkpoint", which, "--test-limit", "40", "--threads", "1",
                 "--out", str(report)]) == 0
    res = json.loads((report / f"eval_{which}.json").read_text())
    history = load_checkpoint(f"{trained.out}/{CHECKPOINT}")["history"]
    epoch = _first_best_epoch(history) if which == "best" else len(history)
    assert res["epoch"] == epoch and res["n_test"] == 40
    # the main head is deterministic: the same accuracy as logged after that epoch in training
    assert res["heads"]["main"]["acc"] == history[epoch - 1]["acc_main"]
    # the confusion matrix, counted here one image at a time from the loaded checkpoint's predictions
    model, cfg = load_tuner(f"{trained.out}/{BEST if which == 'best' else CHECKPOINT}")
    _, test_set, names = build_data(cfg, model.backbone)
    expected = [[0] * len(names) for _ in names]
    for i in range(40):
        x, y = test_set[i]
        expected[int(y)][int(model.predict(x[None])["main"].argmax())] += 1
    assert res["heads"]["main"]["confusion"] == expected
    for head, r in res["heads"].items():
        cm = torch.tensor(r["confusion"])
        assert cm.sum() == 40 and r["acc"] == pytest.approx(float(cm.diag().sum()) / 40, abs=0)
        for c, acc in enumerate(r["per_class_acc"]):
            assert acc is None if cm[c].sum() == 0 else acc == pytest.approx(float(cm[c, c] / cm[c].sum()))
    assert res["acc"] == max(r["acc"] for r in res["heads"].values())
    from PIL import Image

    with Image.open(report / f"confusion_{which}.png") as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_eval_errors(trained, tmp_path, capsys):
    assert main(["--run", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--run", str(tmp_path / "empty")]) == 2
    assert "best.pt does not exist" in capsys.readouterr().err


def test_missing_matplotlib_is_one_line_after_the_json(trained, tmp_path):
    report = tmp_path / "report"
    rc, err = run_module_without("matplotlib", "concept_kernels.train.eval",
                                 ["--run", str(trained.out), "--test-limit", "8", "--threads", "1", "--out", str(report)])
    assert rc == 2 and len(err) == 1, err
    assert "'matplotlib'" in err[0] and "pip install 'concept_kernels[train]'" in err[0] and "--no-plot" in err[0]
    assert json.loads((report / "eval_best.json").read_text())["n_test"] == 8
    assert not (report / "confusion_best.png").exists()
