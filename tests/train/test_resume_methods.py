"""Resume stays bit-exact for the methods with epoch hooks: lpft across its stage boundary and autorgn
(per-epoch lrs measured on training batches) across an epoch boundary, with the schedule's milestone
there too. 4 steps straight == stopped (Ctrl-C) after step 1 (mid stage 1 / epoch 0), 2 (the boundary,
before the epoch ended), 3 (mid stage 2 / epoch 1) or after a finished 1-epoch run, then --resume."""
import dataclasses
import signal

import pytest
import torch
from conftest import tiny_config

from concept_kernels.train import run
from concept_kernels.train.trainer import CHECKPOINT, load_checkpoint

METHODS = dict(lpft=dict(lpft_probe_epochs=1, lpft_ft_lr_mult=0.5), autorgn=dict(rgn_batches=2))


def _config(path, method, **kw):
    # threads=1: the module-scoped straight runs start before the per-test one-thread fixture
    return tiny_config(path, method=method, epochs=2, milestones=(1,), threads=1, **METHODS[method], **kw)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Each method's uninterrupted 2-epoch run: {method: its final checkpoint}."""
    out = {}
    for method in METHODS:
        path = tmp_path_factory.mktemp(method)
        run(_config(path, method))
        out[method] = load_checkpoint(path / "run" / CHECKPOINT)
    return out


def _same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("stop", [1, 2, 3, "epoch"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_bit_exact(tmp_path, straight, method, stop):
    cfg = _config(tmp_path, method)
    if stop == "epoch":
        run(dataclasses.replace(cfg, epochs=1))
    else:
        def ctrl_c(step, model):
            if step == stop:
                signal.raise_signal(signal.SIGINT)

        run(cfg, on_step=ctrl_c)
        saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)
        assert saved["state"]["global_step"] == stop
        if method == "autorgn":  # saved mid-epoch: this epoch's per-tensor lrs, distinct, in the optimizer
            lrs = [g["lr"] for g in saved["optimizer"]["param_groups"] if g["name"] != "heads"]
            assert all(g.get("scaled_epoch") == (stop - 1) // 2 for g in saved["optimizer"]["param_groups"])
            assert len(set(lrs)) > len(lrs) // 2
    run(dataclasses.replace(cfg, resume=True))
    a, b = straight[method], load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert a["state"]["global_step"] == 4
    for key in ("model", "optimizer", "scheduler", "state"):
        _same(a[key], b[key], key)
    def same_run(row):  # timings differ; a run that ended at epoch 1 (then extended) also evaluated OOD there
        return {k: v for k, v in row.items() if "sec" not in k and not k.startswith("ood_")}

    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert same_run(ra) == same_run(rb)
