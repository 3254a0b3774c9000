"""bench/accuracy.py (`make accuracy`): its statistics against textbook values, a smoke run of the whole
harness on both built-in tasks (report rows, pairing by seed, resumability, a changed setting refused), and
OOD accuracy added post hoc to finished runs (from their checkpoint, without retraining)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def acc():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_statistics(acc):
    assert acc.t_quantile(3) == pytest.approx(4.302652729911275)  # t_{0.975, 2 dof}
    assert acc.t_quantile(10) == pytest.approx(2.262157162740991)  # t_{0.975, 9 dof}
    mean, sd = acc.stats([0.5, 0.7, 0.9])
    assert (mean, sd) == (pytest.approx(0.7), pytest.approx(0.2))
    m, lo, hi = acc.paired_ci([0.8, 0.9, 1.0], [0.7, 0.7, 0.7])  # diffs 0.1, 0.2, 0.3: sd 0.1
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert (m, lo, hi) == (pytest.approx(0.2), pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert math.isnan(acc.paired_ci([1.0], [0.5])[1])


def test_smoke_run_is_paired_resumable_and_guarded(acc, tmp_path, capsys):
    runs, report = tmp_path / "runs", tmp_path / "ACC.md"
    args = ["--tasks", "digits,animals", "--shots", "2", "--seeds", "2", "--methods", "vanilla,concept",
            "--steps", "2", "--evals", "1", "--test-limit", "20", "--threads", "1", "--runs", str(runs),
            "--report", str(report), "--ood-limit", "8"]
    assert acc.main(args) == 0
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| digits") or line.startswith("| animals")]
    assert len(rows) == 4, text
    concept = next(r for r in rows if r.startswith("| digits | 2 | concept"))
    cells = [c.strip() for c in concept.strip("|").split("|")]
    assert cells[3] == "2" and "±" in cells[5] and "[" in cells[7]  # seeds, IB head, paired CI
    assert "±" in cells[9] and "[" in cells[10]  # OOD main, its paired CI
    results = acc.collect(runs)
    assert set(results) == {(t, 2, m) for t in ("digits", "animals") for m in ("vanilla", "concept")}
    rec = results[("digits", 2, "concept")][1]
    assert rec["steps"] == 2 and "ib" in rec and rec["best"] >= max(rec["main"], rec["ib"]) - 1e-12
    # the paired difference in the table is the mean of the per-seed differences
    van = results[("digits", 2, "vanilla")]
    diff = sum(results[("digits", 2, "concept")][s]["main"] - van[s]["main"] for s in (0, 1)) / 2
    assert cells[7].startswith(f"{diff:+.3f}")
    assert (tmp_path / "acc.png").stat().st_size > 0
    # resumable: a finished run is loaded, not retrained
    done = runs / "digits" / "shots2" / "concept" / "seed0" / "result.json"
    before = done.stat().st_mtime_ns
    capsys.readouterr()
    assert acc.main(args) == 0
    assert done.stat().st_mtime_ns == before and "epoch" not in capsys.readouterr().out
    # --report-only in a fresh process (nothing trained, nothing imported before the report) rewrites the report
    report.unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "bench" / "accuracy.py"), *args, "--report-only"], check=True,
                   env=env, capture_output=True, timeout=300)
    assert report.read_text().count("| digits | 2 |") == 2
    # a finished run trained with another setting is refused, not mixed into the table
    with pytest.raises(SystemExit, match="pass another --runs"):
        acc.main([*args[:-6], "--steps", "4", "--runs", str(runs), "--report", str(report)])
    assert json.loads(done.read_text())["setting"]["iters_per_epoch"] == 2


def test_ood_is_filled_post_hoc_for_finished_runs(acc, tmp_path, capsys):
    """A finished run as trained before OOD existed (no "ood" in result.json, a checkpoint without digest)
    gets the same OOD numbers post hoc as the trainer gave at the end of training, without retraining."""
    runs, report = tmp_path / "runs", tmp_path / "ACC.md"
    args = ["--tasks", "digits", "--shots", "2", "--seeds", "1", "--methods", "vanilla", "--steps", "2", "--evals",
            "1", "--test-limit", "20", "--threads", "1", "--runs", str(runs), "--report", str(report),
            "--ood-limit", "8"]
    assert acc.main(args) == 0
    folder = runs / "digits" / "shots2" / "vanilla" / "seed0"
    trained = json.loads((folder / "result.json").read_text())
    assert trained["ood"]["source"] == "training" and trained["ood"]["n_images"]["blur_s3"] == 8
    legacy = {k: v for k, v in trained.items() if k != "ood"}
    (folder / "result.json").write_text(json.dumps(legacy))
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    del ckpt["sha256"]
    torch.save(ckpt, folder / "checkpoint.pt")
    weights = (folder / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert acc.main(args) == 0
    assert "epoch" not in capsys.readouterr().out  # not retrained
    rec = json.loads((folder / "result.json").read_text())
    assert rec["ood"]["source"].startswith("post hoc") and rec["ood"]["digest"] is False
    assert {k: rec[k] for k in legacy} == legacy and (folder / "checkpoint.pt").read_bytes() == weights
    assert rec["ood"]["sets"] == trained["ood"]["sets"] and rec["ood"]["mean"] == trained["ood"]["mean"]
    row = next(line for line in report.read_text().splitlines() if line.startswith("| digits | 2 | vanilla"))
    assert row.split("|")[10].strip() == f"{trained['ood']['mean']['main']:.3f} ± 0.000"
    # other OOD flags: evaluated again post hoc
    assert acc.main([*args, "--ood-corruptions", "contrast", "--ood-severities", "1,5"]) == 0
    rec = json.loads((folder / "result.json").read_text())
    assert set(rec["ood"]["sets"]) == {"contrast_s1", "contrast_s5"} and rec["history"] == legacy["history"]
    # a checkpoint that did not write this result.json is refused
    rec["history"][0]["acc_main"] += 0.5
    (folder / "result.json").write_text(json.dumps({k: v for k, v in rec.items() if k != "ood"}))
    with pytest.raises(SystemExit, match="histories differ"):
        acc.main(args)
