"""The trainer's defaults are the published recipe (method_spec §2, §6), and the settings that depart from it
(key momentum "auto", Sinkhorn stop "problem") are explicit: Config/CLI -> ConceptTuner plumbing, the key
momentum rule, the lr groups of both schedules, and the second built-in task."""
import math

import pytest
import torch
from conftest import tiny_config

import concept_kernels as ck
from concept_kernels.train import ConceptTuner, resolve_key_momentum, run
from concept_kernels.train.__main__ import parse_args
from concept_kernels.train.trainer import Config, backbone_lr_mult, build


def test_defaults_are_published():
    cfg = Config()
    assert (cfg.key_momentum, cfg.temperature, cfg.sinkhorn_stop) == (0.999, 0.07, "published")
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov, cfg.milestones) == (0.01, 0.9, 5e-4, True, (12, 24))
    assert (cfg.w_img, cfg.w_con, cfg.w_ce_ib, cfg.w_kl, cfg.queue_len, cfg.num_patches) == (1, 1, 1, 5e-3, 40, 9)
    assert backbone_lr_mult(cfg) == 0.1  # multistep: backbone at 0.1 lr
    cfg.schedule = "cos"
    assert backbone_lr_mult(cfg) == 1.0  # the published --cos trains every parameter at lr
    cfg.backbone_lr_mult = 0.25
    assert backbone_lr_mult(cfg) == 0.25


def test_tuner_defaults_are_published(tiny_net):
    net = ConceptTuner(tiny_net(), 5, (32, 32), num_patches=4, num_confusing=3, queue_len=4, patch_pixels=16)
    assert (net.sinkhorn_stop, net.momentum, net.temperature) == ("published", 0.999, 0.07)


@pytest.mark.parametrize("steps,expected", [(20_000, 0.999), (400, 0.95), (40, 0.5), (10, 0.5), (10**7, 0.9999)])
def test_auto_key_momentum_keeps_the_published_lag(steps, expected):
    m = resolve_key_momentum("auto", steps)
    assert m == pytest.approx(expected, abs=1e-12)
    if 0.5 < m < 0.9999:  # unclamped: the EMA's time constant is 5% of the run, as 1000 of 20,000 steps
        assert 1 / (1 - m) / steps == pytest.approx(1000 / 20_000)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "fast", math.nan, True, None])
def test_key_momentum_is_validated(bad):
    with pytest.raises(ValueError, match="key_momentum"):
        resolve_key_momentum(bad, 100)


def test_given_key_momentum_is_used_as_is():
    assert resolve_key_momentum(0.9, 10) == 0.9 and resolve_key_momentum("0.25", 10) == 0.25


def test_cli_flags_reach_the_model(tmp_path, monkeypatch):
    cfg = parse_args(["--key-momentum", "auto", "--temperature", "0.2", "--sinkhorn-stop", "problem",
                      "--schedule", "cos", "--out", str(tmp_path)])
    assert (cfg.key_momentum, cfg.temperature, cfg.sinkhorn_stop, cfg.schedule) == ("auto", 0.2, "problem", "cos")
    assert parse_args([]).key_momentum == 0.999 and parse_args(["--key-momentum", "0.9"]).key_momentum == 0.9
    with pytest.raises(SystemExit):
        parse_args(["--sinkhorn-stop", "sometimes"])
    model, *_ = build(tiny_config(tmp_path, temperature=0.2, sinkhorn_stop="problem"), torch.device("cpu"))
    assert (model.temperature, model.sinkhorn_stop) == (0.2, "problem")


def test_run_uses_the_resolved_key_momentum_and_the_stop_rule(tmp_path, monkeypatch):
    """The training loop calls the concept loss with the configured stop rule and the key encoder's EMA
    with m from resolve_key_momentum over the run's steps."""
    seen = {"stop": set(), "m": set()}
    loss, ema = ck.concept_contrastive_loss, ck.momentum_update_

    def spy_loss(*a, **kw):
        seen["stop"].add(kw.get("stop"))
        return loss(*a, **kw)

    def spy_ema(key, query, m):
        seen["m"].add(m)
        return ema(key, query, m)

    monkeypatch.setattr(ck, "concept_contrastive_loss", spy_loss)
    monkeypatch.setattr(ck, "momentum_update_", spy_ema)
    run(tiny_config(tmp_path / "a", key_momentum="auto", epochs=2, iters_per_epoch=3))
    assert seen == {"stop": {"published"}, "m": {0.5}}  # 6 steps: clamped to 0.5
    seen = {"stop": set(), "m": set()}
    run(tiny_config(tmp_path / "b", key_momentum=0.75, sinkhorn_stop="problem"))
    assert seen == {"stop": {"problem"}, "m": {0.75}}


def test_cos_schedule_groups_follow_the_published_option(tmp_path, monkeypatch):
    """multistep: backbone at 0.1 lr; cos: every parameter at lr (method_spec §6, §9.10)."""
    groups = []
    real_sgd = torch.optim.SGD

    def spy(params, **kw):
        opt = real_sgd(params, **kw)
        groups.append({g.get("name"): g["lr"] for g in opt.param_groups})
        return opt

    monkeypatch.setattr(torch.optim, "SGD", spy)
    run(tiny_config(tmp_path / "m", lr=0.02, iters_per_epoch=1))
    run(tiny_config(tmp_path / "c", lr=0.02, schedule="cos", iters_per_epoch=1))
    assert groups == [{"backbone": pytest.approx(0.002), "heads": 0.02}, {"backbone": 0.02, "heads": 0.02}]


def test_animals_task_is_built_in():
    from concept_kernels.train.data import ANIMALS, animals, builtin

    train, test, names = animals(32, 3, seed=1)
    assert names == list(ANIMALS) and len(test) == 2000 and len(train) == 30
    assert torch.bincount(train.tensors[1], minlength=10).tolist() == [3] * 10
    assert torch.bincount(test.tensors[1], minlength=10).tolist() == [200] * 10
    x = train.tensors[0]
    assert x.shape == (30, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.3
    full, _, _ = animals(32, 0)
    assert len(full) == 8000
    with pytest.raises(ValueError, match="built in: digits, animals"):
        builtin("cifar", 32, 1)


def test_unpickler_accepts_only_arrays(tmp_path):
    import io
    import pickle

    from concept_kernels.train.data import _NumpyOnlyUnpickler

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
