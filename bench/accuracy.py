"""``make accuracy``: fine-tuning accuracy of every trainer method over seeds, shot counts and two offline
tasks -> ``bench/ACCURACY.md`` + ``bench/accuracy.png``.

Every run uses the same budget and hyper-parameters (the demo's, ``concept_kernels.train.demo``: lite0
ImageNet weights, 96 px, batch 20, SGD-Nesterov, lr 0.05 heads / 0.005 backbone, cosine schedule, key
momentum ``auto``; ``--steps`` optimizer steps in ``--evals`` epochs, each followed by an evaluation on
the FULL test split). Per (task, shots, method) row: mean +- std over seeds of the main head's and the IB
head's last-epoch accuracy and of the published protocol (best over epochs of max(main, IB)), and the
difference to vanilla paired by seed (same few-shot draw, same augmentation seed) with its 95% confidence
interval (Student t, n - 1 degrees of freedom). OOD: the main head of the final model on the shifted test sets
(``concept_kernels.train.ood``: the test images corrupted per ``--ood-corruptions`` x ``--ood-severities``, at most
``--ood-limit`` each), the mean over the sets per seed, and its paired difference to vanilla.

Resumable: each finished run leaves ``result.json`` in its folder under ``--runs`` and is not redone; an
interrupted run continues from its checkpoint. A finished run without OOD accuracy for the requested shifted
sets (trained before they existed, or with other OOD flags) gets it post hoc from its final ``checkpoint.pt``
(no retraining), stored in its ``result.json`` ("ood"). The report is rewritten from every finished run after each
run, so a partial grid still gives a (partial) table.

    python bench/accuracy.py                                   # the default grid (see --help)
    python bench/accuracy.py --tasks digits --shots 10 --seeds 3 --methods vanilla,concept --steps 100
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from concept_kernels.train import METHODS, Config, run
from concept_kernels.train.data import BUILTIN
from concept_kernels.train.demo import demo_config
from concept_kernels.train.eval import shifted_accuracy
from concept_kernels.train.ood import OOD_JSON, ShiftSpec

HERE = Path(__file__).resolve().parent
METRICS = ("main", "ib", "best")


def run_config(task: str, shots: int, method: str, seed: int, steps: int, evals: int, runs: Path) -> Config:
    """The demo's configuration of ``method`` on ``task``, ``steps`` steps in ``evals`` epochs, full test split."""
    cfg = demo_config(method, seed, epochs=evals, shots=shots, test_limit=0, out=runs)
    cfg.data = f"builtin:{task}"
    cfg.iters_per_epoch = max(1, steps // evals)
    cfg.out = str(runs / task / f"shots{shots}" / method / f"seed{seed}")
    return cfg


def fill_ood(rec: dict, out: Path, spec: ShiftSpec) -> dict:
    """``rec`` with "ood" for ``spec`` from the run's final ``<out>/checkpoint.pt`` (evaluated now). The
    checkpoint must be the one that wrote ``rec``: its history equal to rec["history"] (SystemExit otherwise);
    checkpoints from before content digests (the digest-less ones) are accepted on that check."""
    result, ckpt = shifted_accuracy(out / "checkpoint.pt", spec, require_digest=False)
    if ckpt["history"] != rec["history"]:
        raise SystemExit(f"{out / 'checkpoint.pt'} is not the final checkpoint of {out / 'result.json'} (their "
                         "histories differ): cannot add its OOD accuracy post hoc")
    return {**rec, "ood": dict(result, source="post hoc, from checkpoint.pt", digest="sha256" in ckpt)}


def _write_record(done: Path, rec: dict) -> None:
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, done)


def run_once(cfg: Config, spec: ShiftSpec | None = None) -> dict:
    """Train ``cfg`` unless its result.json exists (then load it, adding OOD accuracy for ``spec`` post hoc
    when it lacks it: :func:`fill_ood`); returns the result record."""
    out = Path(cfg.out)
    done = out / "result.json"
    setting = {k: getattr(cfg, k) for k in ("epochs", "iters_per_epoch", "test_limit", "lr", "batch_size")}
    wants_ood = spec is not None and bool(spec.corruptions)
    if done.exists():
        rec = json.loads(done.read_text())
        if rec.get("setting") != setting:
            raise SystemExit(f"{done} was trained with {rec.get('setting')}, not {setting}: pass another --runs")
        if wants_ood and (rec.get("ood") or {}).get("setting") != spec.setting():
            rec = fill_ood(rec, out, spec)
            _write_record(done, rec)
        return rec
    cfg.resume = (out / "checkpoint.pt").exists()
    cfg.overwrite = not cfg.resume
    t0 = time.perf_counter()
    hist = run(cfg)
    if not hist or hist[-1]["epoch"] < cfg.epochs:
        raise KeyboardInterrupt  # Ctrl-C inside run() saved a checkpoint and returned early
    rec = dict(main=hist[-1]["acc_main"], best=max(r["acc"] for r in hist), wall=time.perf_counter() - t0,
               steps=hist[-1]["step"], history=hist, threads=torch.get_num_threads(), setting=setting)
    if "acc_ib" in hist[-1]:
        rec["ib"] = hist[-1]["acc_ib"]
    if wants_ood:  # the trainer evaluated the final model on cfg's shifted sets (= spec) into ood.json
        ood = json.loads((out / OOD_JSON).read_text()) if (out / OOD_JSON).exists() else {}
        if ood.get("setting") == spec.setting() and ood.get("epoch") == cfg.epochs:
            rec["ood"] = dict({k: v for k, v in ood.items() if k not in ("epoch", "id")}, source="training",
                              digest=True)
        else:  # (a run that had finished before: its ood.json is missing or for other flags)
            rec = fill_ood(rec, out, spec)
    _write_record(done, rec)
    return rec


def ood_main(rec: dict, spec: ShiftSpec | None) -> float | None:
    """The record's main-head accuracy, mean over the shifted sets of ``spec`` (None: not evaluated for it)."""
    ood = rec.get("ood")
    if spec is None or not ood or ood.get("setting") != spec.setting() or "main" not in ood["mean"]:
        return None
    return ood["mean"]["main"]


def t_quantile(n: int) -> float:
    """The 0.975 quantile of Student's t with n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def stats(xs: list[float]) -> tuple[float, float]:
    """(mean, sample std); std 0 for one value."""
    n = len(xs)
    mean = sum(xs) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0


def paired_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b (paired) and its 95% confidence interval (lo, hi); (mean, nan, nan) for n < 2."""
    d = [x - y for x, y in zip(a, b)]
    mean, sd = stats(d)
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(len(d)) * sd / math.sqrt(len(d))
    return mean, mean - half, mean + half


def diff_cell(values: dict, base: dict, seeds: list[int]) -> str:
    """"mean [95% CI]" of values[s] - base[s] over the seeds both have (a value of None: not there)."""
    paired = [s for s in seeds if values.get(s) is not None and base.get(s) is not None]
    if not paired:
        return "—"
    m, lo, hi = paired_ci([values[s] for s in paired], [base[s] for s in paired])
    ci = f"[{lo:+.3f}, {hi:+.3f}]" if len(paired) > 1 else "[no CI: 1 seed]"
    return f"{m:+.3f} {ci}" + (f" (n={len(paired)})" if len(paired) != len(seeds) else "")


def table_rows(results: dict, spec: ShiftSpec | None = None) -> list[str]:
    """Markdown rows: results[(task, shots, method)] = {seed: record}; OOD columns for ``spec``'s sets."""
    fmt = lambda m, s: f"{m:.3f} ± {s:.3f}"  # noqa: E731
    rows = ["| task | shots/class | method | seeds | acc main | acc IB | best (published) | main - vanilla "
            "[95% CI] | best - vanilla [95% CI] | OOD main | OOD main - vanilla [95% CI] | s/run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = ["vanilla", *(m for m in METHODS if m != "vanilla")]  # the baseline of the differences first
    for (task, shots, method), by_seed in sorted(results.items(), key=lambda kv: (
            kv[0][0], kv[0][1], order.index(kv[0][2]))):
        seeds = sorted(by_seed)
        cols = {k: [by_seed[s][k] for s in seeds] for k in METRICS if k in by_seed[seeds[0]]}
        base = results.get((task, shots, "vanilla"), {}) if method != "vanilla" else {}
        diffs = [diff_cell({s: r[k] for s, r in by_seed.items()}, {s: r[k] for s, r in base.items()}, seeds)
                 for k in ("main", "best")]
        ood = {s: ood_main(r, spec) for s, r in by_seed.items()}
        have = [v for v in ood.values() if v is not None]
        ood_cell = "—" if not have else fmt(*stats(have)) + (f" (n={len(have)})" if len(have) != len(seeds) else "")
        ood_diff = diff_cell(ood, {s: ood_main(r, spec) for s, r in base.items()}, seeds)
        wall = stats([by_seed[s]["wall"] for s in seeds])[0]
        rows.append(f"| {task} | {'all' if shots <= 0 else shots} | {method} | {len(seeds)} | "
                    f"{fmt(*stats(cols['main']))} | {fmt(*stats(cols['ib'])) if 'ib' in cols else '—'} | "
                    f"{fmt(*stats(cols['best']))} | {diffs[0]} | {diffs[1]} | {ood_cell} | {ood_diff} | {wall:.0f} |")
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        fam = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("cpu family"))
        cpu = f"{name} (CPU family {fam})"
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ood_text(spec: ShiftSpec | None) -> str:
    """The report's paragraph on the OOD columns."""
    if spec is None or not spec.corruptions:
        return "OOD columns: not evaluated (--ood-corruptions none)."
    limit = f"the first {spec.limit} evenly spaced" if spec.limit else "all"
    return (f"OOD main: main-head accuracy of the final model on shifted test sets, {limit} test images "
            f"corrupted by {', '.join(spec.corruptions)} at severity {', '.join(map(str, spec.severities))} "
            "(CIFAR-10-C style, `concept_kernels/train/corruptions.py`; the same images and corruption draws for "
            "every run), the mean over those sets per seed, then mean ± std over seeds; its difference to "
            "vanilla is paired by seed with a 95% t interval. Runs finished before OOD existed got it post hoc "
            "from their final checkpoint (no retraining).")


# where each baseline's own hyper-parameters come from (the values themselves: method_options_text)
DEFAULTS_SOURCE = (
    "the paper's or its reference code's published defaults (baselines_spec.md) for l2sp, bss, delta, stochnorm, "
    "cotuning, aft, counterfactual; lpft probes the first half of the epochs, then fine-tunes at lr x 0.1; "
    "feature_distill's weight 1.0 and l1sp's a = 1e-4 are untuned first guesses (the study tunes them per task); "
    "levi's layers and width are this package's design choices (the paper leaves them open); wiseft reports the "
    "fine-tuned end point (alpha = 1) here, its alpha sweep is in each run's wise_ft.json")


def method_options_text(methods, evals: int) -> str:
    """Each method's own hyper-parameters as this grid runs them (its options from the demo configuration)."""
    from concept_kernels.train.methods import REGISTRY

    parts = []
    for m in methods:
        opts = REGISTRY[m].options_from(demo_config(m, 0, epochs=evals, shots=10, test_limit=0, out=Path(".")))
        shown = {k: v for k, v in opts.items() if v not in (None, ())}  # (None / (): the method's own default)
        if shown:
            parts.append(f"{m}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    return "; ".join(parts)


def write_report(results: dict, args, argv: list[str], planned: int, report: Path,
                 spec: ShiftSpec | None = None) -> None:
    from concept_kernels._compat import import_timm

    timm = import_timm()
    done = sum(len(v) for v in results.values())
    wall = sum(r["wall"] for v in results.values() for r in v.values())
    threads = sorted({r.get("threads") for v in results.values() for r in v.values()} - {None})
    run_args = [a for a in argv if a != "--report-only"]  # the command that trains this grid (resumable)
    lines = [
        "# Accuracy over seeds (generated by bench/accuracy.py)", "",
        f"Command: `python bench/accuracy.py {shlex.join(run_args)}` (`make accuracy ACCURACY_ARGS='...'`); it "
        "trains the runs of the grid that are missing and rewrites this report.", "",
        f"Machine: {machine()}; torch {torch.__version__}, timm {timm.__version__}, commit {commit()}, "
        f"{'/'.join(map(str, threads)) or '?'} torch thread(s) per run; {done} of {planned} runs of the grid "
        f"finished, {wall / 60:.0f} min of training and evaluation in all (s/run: wall time per run, on a "
        "machine shared with other jobs: not a speed measurement).", "",
        f"Setting: ImageNet-pretrained EfficientNet-Lite0 (offline weights), 96 px, batch 20, {args.steps} steps "
        f"in {args.evals} epochs, each followed by an evaluation on the full test split (digits: 899 images, "
        "animals: 2,000). Seeds pair the runs: seed s gives every method the same few-shot draw and "
        "augmentation stream.", "",
        "Hyper-parameters: every method runs the demo's configuration (`concept_kernels/train/demo.py`: lr 0.05 "
        "heads / 0.005 backbone, cosine, SGD-Nesterov 0.9, wd 5e-4, BN momentum 0.1; concept and bituning: "
        "key momentum auto, K = 10, T = 0.07; concept: N_conf = 9, 9 patches of 24 px, published Sinkhorn "
        "stopping; surgical: blocks.5, blocks.6, conv_head, bn2). Nothing was tuned per method or per task: "
        "the same values for all, chosen once for the demo.", "",
        f"Each method's own hyper-parameters: {DEFAULTS_SOURCE}. As run: "
        f"{method_options_text(sorted({m for _, _, m in results}, key=METHODS.index), args.evals)}.", "",
        "Columns: acc main / acc IB = last-epoch accuracy of each head; best = the published protocol (max "
        "over epochs of max(main, IB), optimistic); differences are paired by seed, with a 95% t interval.",
        "", ood_text(spec), "", *table_rows(results, spec), "",
        f"![accuracy]({report.with_suffix('.png').name.lower()})", ""]
    report.write_text("\n".join(lines))
    plot(results, report.with_name(report.with_suffix(".png").name.lower()))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _, _ in results})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in METHODS:
            keys = sorted((s, m) for t, s, m in results if t == task and m == method)
            if not keys:
                continue
            xs = [s if s > 0 else max(k for k, _ in keys) * 2 for s, _ in keys]
            ms = [stats([r["best"] for r in results[(task, s, method)].values()]) for s, _ in keys]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[sd for _, sd in ms], marker="o", capsize=3, label=method)
        ax.set(xscale="log", xlabel="training images per class", ylabel="test accuracy (best protocol)",
               title=f"{task}: mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(runs: Path) -> dict:
    """Every finished run under ``runs``: {(task, shots, method): {seed: record}}."""
    results: dict = {}
    for done in runs.glob("*/shots*/*/seed*/result.json"):
        seed_dir = done.parent
        key = (seed_dir.parents[2].name, int(seed_dir.parents[1].name[5:]), seed_dir.parent.name)
        results.setdefault(key, {})[int(seed_dir.name[4:])] = json.loads(done.read_text())
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python bench/accuracy.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default="digits,animals", help=f"comma-separated built-in tasks ({', '.join(BUILTIN)})")
    p.add_argument("--shots", default="10,25,0", help="comma-separated images per class (0: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per row")
    p.add_argument("--methods", default=",".join(m for m in METHODS), help="comma-separated trainer methods")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--evals", type=int, default=4, help="epochs (each ends with a full test evaluation)")
    p.add_argument("--runs", default=str(HERE / "results" / "accuracy"), help="run folders (resumable)")
    p.add_argument("--report", default=str(HERE / "ACCURACY.md"), help="the markdown report (its plot: same "
                                                                        "name, .png, lower case)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: the full "
                                                             "split; only for smoke runs)")
    p.add_argument("--ood-corruptions", default=Config.ood_corruptions, help="shifted test sets: corruptions "
                   "(comma-separated, 'all' or 'none'), see concept_kernels/train/corruptions.py")
    p.add_argument("--ood-severities", default=",".join(map(str, Config.ood_severities)),
                   help="their severities (1..5)")
    p.add_argument("--ood-limit", type=int, default=Config.ood_limit, help="test images per shifted set (0: all)")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs, train and "
                                                              "evaluate nothing")
    args = p.parse_args(argv)
    try:
        spec = ShiftSpec.parse(args.ood_corruptions, args.ood_severities, args.ood_limit)
    except ValueError as e:
        p.error(str(e))
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    if bad := [t for t in tasks if t not in BUILTIN] + [m for m in methods if m not in METHODS]:
        p.error(f"unknown task or method: {bad}")
    shots = [int(s) for s in args.shots.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    grid = [(t, s, m, seed) for t in tasks for s in shots for seed in range(args.seeds) for m in methods]
    if args.report_only:
        grid_keys = {(t, s, m) for t, s, m, _ in grid}
        write_report({k: v for k, v in collect(runs).items() if k in grid_keys}, args, argv, len(grid),
                     Path(args.report), spec)
        print(f"wrote {args.report} and its plot from the finished runs")
        return 0
    for i, (task, shot, method, seed) in enumerate(grid, 1):
        cfg = run_config(task, shot, method, seed, args.steps, args.evals, runs)
        cfg.progress, cfg.test_limit = False, args.test_limit
        cfg.ood_corruptions = ",".join(spec.corruptions) or "none"
        cfg.ood_severities, cfg.ood_limit = spec.severities, spec.limit
        label = f"[{i}/{len(grid)}] {task} shots={'all' if shot <= 0 else shot} {method} seed={seed}"
        print(f"{label}: running", flush=True)
        rec = run_once(cfg, spec)
        ib = f" IB {rec['ib']:.3f}" if "ib" in rec else ""
        ood = f" OOD main {ood_main(rec, spec):.3f}" if ood_main(rec, spec) is not None else ""
        print(f"{label}: main {rec['main']:.3f}{ib} best {rec['best']:.3f}{ood} ({rec['wall']:.0f} s)", flush=True)
        write_report({k: v for k, v in collect(runs).items() if k[0] in tasks and k[1] in shots and k[2] in methods},
                     args, argv, len(grid), Path(args.report), spec)
    print(f"wrote {args.report} and its plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
