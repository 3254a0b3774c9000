"""The training CLI as a new user meets it (issue #14): the shots default per kind of data, threads and
DataLoader workers, the start-up summary and the run's files (config.json, metrics.csv, TensorBoard
scalars), Ctrl-C's exit status, --help, and a missing optional dependency."""
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn

from concept_kernels.train import run
from concept_kernels.train import runtime
from concept_kernels.train.__main__ import build_parser, main, parse_args
from concept_kernels.train.report import TensorBoardScalars
from concept_kernels.train.trainer import CHECKPOINT, Config, build_data, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--no-pretrained", "--image-size", "32", "--batch-size", "4", "--iters-per-epoch", "1", "--num-patches", "4",
        "--num-confusing", "3", "--queue-len", "4", "--patch-pixels", "16", "--test-limit", "40", "--no-progress",
        "--threads", "1"]


def image_folder(root: Path, classes: str, per_class: dict[str, int], side: int = 12) -> Path:
    """root/{train,val}/<class>/<i>.png with per_class[split] random images per class."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in per_class.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 255, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / c / f"{i}.png")
    return root


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")


def run_module_without(blocked: str, module: str, argv: list[str]) -> tuple[int, list[str]]:
    """Run ``python -m module *argv`` in a child where importing ``blocked`` fails; (exit code, stderr lines)."""
    code = (f"import sys, runpy; sys.modules[{blocked!r}] = None; sys.argv = [{module!r}, *{argv!r}]; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


# ---- 1. --shots-per-class: 10 for the built-in few-shot tasks, all of an ImageFolder --------------

def test_shots_default_depends_on_the_data(tmp_path, capsys):
    data = image_folder(tmp_path / "imgs", "ab", {"train": 11, "val": 2})
    on_disk = len(list((data / "train").rglob("*.png")))  # 22 (more than 10 per class)
    train, _, _ = build_data(Config(data=str(data), image_size=16), nn.Identity())
    assert len(train) == on_disk
    train, _, names = build_data(Config(image_size=16), nn.Identity())  # built-in digits: 10 per class
    assert len(train) == 10 * len(names) and sorted(train.tensors[1].bincount().tolist()) == [10] * 10
    train, _, _ = build_data(Config(image_size=16, shots_per_class=3), nn.Identity())
    assert len(train) == 30

    out = tmp_path / "run"
    assert main(TINY + ["--data", str(data), "--method", "vanilla", "--batch-size", "11", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{on_disk} training images (all: the default for an ImageFolder" in printed
    assert json.loads((out / "config.json").read_text())["shots_per_class"] == 0  # resolved: all


# ---- 2. --threads and --workers ------------------------------------------------------------------

def test_physical_cores_count_smt_siblings_once(tmp_path):
    topology = {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0)}  # cpu -> (package, core); 0/2, 1/3 siblings
    for cpu, (pkg, core) in topology.items():
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "physical_package_id").write_text(f"{pkg}\n")
        (tmp_path / f"cpu{cpu}" / "topology" / "core_id").write_text(f"{core}\n")
    assert runtime.physical_cores([0, 1, 2, 3], tmp_path) == 2
    assert runtime.physical_cores([0, 2], tmp_path) == 1
    assert runtime.physical_cores([0, 1, 2, 3, 4], tmp_path) == 3  # core 0 of package 1 is another core
    assert runtime.physical_cores([0, 9], tmp_path) == 2  # cpu9 has no topology: counted on its own


def test_default_threads_rule(monkeypatch):
    cpus = os.cpu_count() or 1
    monkeypatch.setattr(runtime, "physical_cores", lambda: 6)
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cpus), 0.0, 0.0))  # busy: load >= CPUs
    assert runtime.default_threads()[0] == 1 and "busy" in runtime.default_threads()[1]
    assert runtime.default_workers(True)[0] == 0
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus - 0.5, 0.0, 0.0))
    assert runtime.default_threads()[0] == 6
    assert runtime.default_threads(local_ranks=4)[0] == 1  # 6 // 4
    assert runtime.default_threads(local_ranks=2)[0] == 3
    assert runtime.default_workers(True)[0] == 3 and runtime.default_workers(False)[0] == 0
    with pytest.raises(ValueError, match="workers=2.*ImageFolder"):
        runtime.resolve_workers(2, decodes_files=False)
    with pytest.raises(ValueError, match="threads"):
        runtime.resolve_threads(-1)


def test_threads_apply_during_the_run_and_are_restored(tmp_path):
    seen = []
    assert torch.get_num_threads() == 1  # (conftest)
    run(tiny_config(tmp_path, threads=2), on_step=lambda step, model: seen.append(torch.get_num_threads()))
    assert seen == [2, 2] and torch.get_num_threads() == 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["threads"] == 2 and config["workers"] == 0


def test_dataloader_workers_give_the_same_run(tmp_path, capsys):
    """An ImageFolder decoded by 2 worker processes trains bit-exactly as in the main process (the
    DataLoader draws nothing from the augmentation RNG)."""
    data = image_folder(tmp_path / "imgs", "abcd", {"train": 2, "val": 1})
    states = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        assert main(TINY + ["--data", str(data), "--workers", str(workers), "--iters-per-epoch", "2",
                            "--out", str(out)]) == 0
        assert f"data workers: {workers} (given)" in capsys.readouterr().out
        states.append(load_checkpoint(out / CHECKPOINT)["model"])
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0, msg=k)


# ---- 3. start-up summary, config.json, metrics.csv, TensorBoard ----------------------------------

class _FakeWriter:
    made: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_summary_config_csv_and_tensorboard(tmp_path, capsys, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeWriter.made.clear()
    out = tmp_path / "run"
    args = TINY + ["--shots-per-class", "2", "--epochs", "2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for head in ("data:", "model:", "parameters:", "method:", "optimizer:", "device:", "steps:", "output:"):
        assert sum(line.startswith(head) for line in printed.splitlines()) == 1, head
    assert "data: builtin:digits: 20 training images (2 per class" in printed
    assert "40 test images" in printed and "10 classes" in printed
    assert "torch threads: 1 (given)" in printed and "steps: 1 per epoch x 2 epochs = 2" in printed
    assert "method: concept (P=4 patches" in printed and "N_conf=3" in printed and "K=4" in printed
    assert "weight decay 0.0005, " in printed  # the optimizer's groups use --weight-decay

    from concept_kernels.train.eval import load_tuner

    model, cfg = load_tuner(out / CHECKPOINT)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"parameters: {total:,} total, {trainable:,} trainable" in printed and trainable < total

    config = json.loads((out / "config.json").read_text())
    given = dataclasses.asdict(parse_args(args))
    assert config == {k: list(v) if isinstance(v, tuple) else v for k, v in {**given, "threads": 1, "workers": 0}.items()}
    assert cfg == Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with open(out / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(rows) == len(table) == 2
    columns = list(dict.fromkeys(k for row in rows for k in row))  # the last row adds the OOD metrics
    assert any(k.startswith("ood_") for k in columns) and not any(k.startswith("ood_") for k in rows[0])
    for row, rec in zip(rows, table):
        assert list(rec) == columns and all(float(rec[k]) == float(v) for k, v in row.items())
        assert all(rec[k] == "" for k in columns if k not in row)

    (writer,) = _FakeWriter.made
    assert Path(writer.log_dir) == out / "tensorboard" and writer.closed
    expected = [(k, v, row["epoch"]) for row in rows for k, v in row.items() if k != "epoch"]
    assert writer.scalars == expected


def test_summary_shows_the_weight_decay_the_method_sets(tmp_path, capsys):
    """L2-SP trains without weight decay: the summary prints what the optimizer uses, not --weight-decay."""
    args = TINY + ["--method", "l2sp", "--shots-per-class", "2", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("optimizer:")]
    assert "weight decay 0 (backbone), 0 (heads): set by the method (--weight-decay 0.0005)" in line


def test_tensorboard_absent_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    tb = TensorBoardScalars(tmp_path)
    assert tb.writer is None and "not installed" in tb.note
    tb.log({"epoch": 1, "acc": 0.5})  # nothing to do, no crash
    tb.close()
    assert not (tmp_path / "tensorboard").exists()


# ---- 5. Ctrl-C exits 130 after saving; --help ----------------------------------------------------

def test_ctrl_c_saves_then_exits_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "concept_kernels.train", *TINY, "--shots-per-class", "2", "--iters-per-epoch",
           "100000", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # the summary is printed once the Ctrl-C handler is in place
        lines.append(line)
        if line.startswith("steps:"):
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + rest + err
    assert "saved" in rest and "Traceback" not in err
    assert load_checkpoint(out / CHECKPOINT)["state"]["epoch"] == 0  # a mid-epoch save


def test_help_has_text_and_default_for_every_flag():
    parser = build_parser()
    text = parser.format_help()
    assert "examples:" in text and "concept_kernels.train.eval --run" in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        rendered = formatter._expand_help(action) if action.help else ""
        assert rendered.strip() and "default" in rendered.lower(), action.option_strings


# ---- 6. a missing optional dependency: one line naming the extra ---------------------------------

def test_missing_timm_is_one_line(tmp_path):
    rc, err = run_module_without("timm", "concept_kernels.train", TINY + ["--out", str(tmp_path / "run")])
    assert rc == 2 and len(err) == 1, err
    assert "'timm'" in err[0] and "pip install 'concept_kernels[train]'" in err[0] and "whl/cpu" in err[0]
