"""Does KITE rank backbones as fine-tuning does? KITE of each candidate vs its vanilla fine-tuning accuracy
-> ``bench/TRANSFERABILITY.md``.

For each built-in task, seed and candidate (default: the three backbones with offline ImageNet weights,
EfficientNet-Lite0/1/2; a model without real weights is not a candidate): (a) KITE on the seed's few-shot
training draw at the harness's 96 px (``concept_kernels.transferability.score_model``; the random init
seeded with the seed), (b) vanilla fine-tuning with ``make accuracy``'s harness (``bench/accuracy.py``
run_config / run_once: the demo's hyper-parameters, ``--steps`` steps in ``--evals`` epochs, full test
split), the same seed (same few-shot draw and augmentation stream). The report ranks the candidates per
task by mean KITE and by mean accuracy and gives Spearman's rho between the two rankings per task and per
(task, seed), and whether the accuracy ranking itself is resolved (paired 95% intervals of adjacent
models).

Resumable: KITE records (``<runs>/kite/...json``) and fine-tuning runs (``<runs>/finetune/.../result.json``)
are not redone; the report is rewritten after each finished item.

    python bench/transferability.py                      # the full validation (3 seeds, 10 shots, both tasks)
    python bench/transferability.py --report-only        # the report from what has finished
    python bench/transferability.py --steps 4 --evals 1 --seeds 1 --test-limit 50 --runs /tmp/kite_smoke \\
        --report /tmp/kite_smoke/T.md                     # a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy import commit, machine, paired_ci, run_config, run_once, stats  # noqa: E402

from concept_kernels.train.data import BUILTIN, builtin  # noqa: E402
from concept_kernels.transferability import score_model  # noqa: E402

MODELS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
IMAGE_SIZE = 96  # the harness's (demo's) input side; KITE sees the same images as fine-tuning


def kite_path(runs: Path, task: str, shots: int, model: str, seed: int) -> Path:
    return runs / "kite" / task / f"shots{shots}" / model / f"seed{seed}.json"


def kite_once(runs: Path, task: str, shots: int, model: str, seed: int) -> dict:
    """KITE of ``model`` on the ``seed`` few-shot draw of ``task`` (computed once, then read back)."""
    path = kite_path(runs, task, shots, model, seed)
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("image_size") != IMAGE_SIZE or rec.get("model") != model:
            raise SystemExit(f"{path} holds {rec.get('model')} at {rec.get('image_size')} px, not {model} at "
                             f"{IMAGE_SIZE} px: pass another --runs")
        return rec
    cand = score_model(model, lambda backbone: builtin(task, IMAGE_SIZE, shots, seed)[0], seed=seed)
    if cand.weights != "pretrained":
        raise SystemExit(f"{model} has no pretrained weights: not a valid candidate")
    rec = dict(cand.record(), image_size=IMAGE_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)
    return rec


def finetune_config(task: str, shots: int, model: str, seed: int, args, runs: Path):
    """``make accuracy``'s vanilla run of ``model`` (its own run folder per model)."""
    cfg = run_config(task, shots, "vanilla", seed, args.steps, args.evals, runs)
    cfg.model = model
    cfg.out = str(runs / "finetune" / task / f"shots{shots}" / "vanilla" / model / f"seed{seed}")
    cfg.progress, cfg.test_limit = False, args.test_limit
    return cfg


def collect(runs: Path, tasks, shots: int, models, seeds: int) -> dict:
    """{(task, model): {seed: {"kite": record, "ft": record}}} of whatever has finished."""
    out: dict = {}
    for task in tasks:
        for model in models:
            for seed in range(seeds):
                entry = {}
                k = kite_path(runs, task, shots, model, seed)
                if k.exists():
                    entry["kite"] = json.loads(k.read_text())
                ft = runs / "finetune" / task / f"shots{shots}" / "vanilla" / model / f"seed{seed}" / "result.json"
                if ft.exists():
                    entry["ft"] = json.loads(ft.read_text())
                if entry:
                    out.setdefault((task, model), {})[seed] = entry
    return out


def ranks(values: list[float]) -> list[float]:
    """1 = largest; ties get their mean rank."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (Pearson correlation of the ranks; NaN when a ranking is constant)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else math.nan


def _rank(r: float | None) -> str:
    return "—" if r is None else f"{r:g}"


def task_section(task: str, results: dict, models, seeds: int, metric: str) -> tuple[list[str], list[float]]:
    """Markdown lines for one task and its per-seed rhos."""
    fmt = lambda xs: f"{stats(xs)[0]:.3f} ± {stats(xs)[1]:.3f}" if xs else "—"  # noqa: E731
    done = [m for m in models if len([s for s, e in results.get((task, m), {}).items() if "kite" in e and "ft" in e])
            == seeds]
    lines = [f"### {task}", "",
             "| model | KITE (mean ± std over seeds) | CKA(pre, labels) | CKA(pre, random) | acc main (last epoch) | "
             "best (published protocol) | KITE rank | accuracy rank |", "|---|---|---|---|---|---|---|---|"]
    kite_mean = {m: stats([e["kite"]["kite"] for e in results[(task, m)].values() if "kite" in e])[0]
                 for m in models if any("kite" in e for e in results.get((task, m), {}).values())}
    acc_mean = {m: stats([e["ft"][metric] for e in results[(task, m)].values() if "ft" in e])[0]
                for m in models if any("ft" in e for e in results.get((task, m), {}).values())}
    k_rank = dict(zip(done, ranks([kite_mean[m] for m in done]))) if len(done) == len(models) else {}
    a_rank = dict(zip(done, ranks([acc_mean[m] for m in done]))) if len(done) == len(models) else {}
    for m in models:
        by_seed = results.get((task, m), {})
        col = lambda key, part: [e[part][key] for e in by_seed.values() if part in e]  # noqa: E731
        lines.append(f"| {m} | {fmt(col('kite', 'kite'))} | {fmt(col('target_alignment', 'kite'))} | "
                     f"{fmt(col('random_alignment', 'kite'))} | {fmt(col('main', 'ft'))} | {fmt(col('best', 'ft'))} | "
                     f"{_rank(k_rank.get(m))} | {_rank(a_rank.get(m))} |")
    rhos = []
    if len(done) < len(models):
        lines += ["", f"Spearman: not yet ({len(done)} of {len(models)} models have KITE and fine-tuning for all "
                  f"{seeds} seeds)."]
        return lines + [""], rhos
    rho = spearman([kite_mean[m] for m in models], [acc_mean[m] for m in models])
    for s in range(seeds):
        rhos.append(spearman([results[(task, m)][s]["kite"]["kite"] for m in models],
                             [results[(task, m)][s]["ft"][metric] for m in models]))
    by_acc = sorted(models, key=lambda m: -acc_mean[m])
    resolved = []
    for hi, lo in zip(by_acc, by_acc[1:]):
        mean, a, b = paired_ci([results[(task, hi)][s]["ft"][metric] for s in range(seeds)],
                               [results[(task, lo)][s]["ft"][metric] for s in range(seeds)])
        verdict = ("no interval: 1 seed" if math.isnan(a) else "resolved" if a > 0 or b < 0
                   else "NOT resolved: the interval holds 0")
        ci = "" if math.isnan(a) else f" [{a:+.3f}, {b:+.3f}]"
        resolved.append(f"{hi} - {lo}: {mean:+.3f}{ci} ({verdict})")
    top_kite, top_acc = max(models, key=lambda m: kite_mean[m]), by_acc[0]
    same = "same" if top_kite == top_acc else "different"
    lines += ["", f"- Spearman rho (mean KITE vs mean `{metric}` accuracy over the {len(models)} models): "
              f"**{rho:+.2f}**; per seed: {', '.join(f'{r:+.2f}' for r in rhos)}.",
              f"- KITE's top model: {top_kite}; best fine-tuned: {top_acc} ({same}).",
              f"- Accuracy ranking, adjacent models, paired difference [95% t interval over {seeds} seeds]: "
              + "; ".join(resolved) + "."]
    return lines + [""], rhos


def write_report(results: dict, args, argv: list[str], models, tasks, report: Path) -> None:
    from concept_kernels._compat import import_timm

    planned = len(tasks) * len(models) * args.seeds
    n_kite = sum("kite" in e for v in results.values() for e in v.values())
    n_ft = sum("ft" in e for v in results.values() for e in v.values())
    wall = sum(e["ft"]["wall"] for v in results.values() for e in v.values() if "ft" in e)
    run_args = [a for a in argv if a != "--report-only"]
    lines = ["# KITE vs fine-tuning accuracy (generated by bench/transferability.py)", "",
             f"Command: `HF_HUB_OFFLINE=1 python bench/transferability.py {shlex.join(run_args)}` (resumable; "
             "`--report-only` rewrites this file from the finished items).", "",
             f"Machine: {machine()}; torch {torch.__version__}, timm {import_timm().__version__}, commit {commit()}; "
             f"{n_kite} of {planned} KITE scores and {n_ft} of {planned} fine-tuning runs finished "
             f"({wall / 60:.0f} min of fine-tuning).", "",
             f"Setting: {args.shots} training images per class (seed s = few-shot draw s, as in `make accuracy`), "
             f"{IMAGE_SIZE} px for KITE and fine-tuning. KITE = CKA(pretrained, one-hot labels) / CKA(pretrained, "
             "random init of the same architecture seeded with s), linear CKA of the globally pooled final feature "
             f"map of the training images (higher: expected to transfer better). Fine-tuning: vanilla, the `make "
             f"accuracy` harness (demo hyper-parameters, {args.steps} steps in {args.evals} epochs, "
             + (f"the first {args.test_limit} test images (a smoke run)" if args.test_limit else "full test split")
             + "); "
             f"the ranking uses `{args.metric}` (last-epoch accuracy of the head; `best` = the published protocol's "
             "max over epochs).", "",
             f"With {len(models)} candidates a random ranking matches the accuracy ranking exactly (rho = +1) with "
             f"probability 1/{math.factorial(len(models))}"
             + (" (rho takes only the values -1, -0.5, +0.5, +1)" if len(models) == 3 else "")
             + ": one task cannot show that KITE works in general, only whether it agrees here.", ""]
    all_rhos = []
    for task in tasks:
        sec, rhos = task_section(task, results, models, args.seeds, args.metric)
        lines += sec
        all_rhos += rhos
    if all_rhos:
        finite = [r for r in all_rhos if not math.isnan(r)]
        lines += [f"Over all (task, seed) pairs: mean rho {sum(finite) / max(len(finite), 1):+.2f} "
                  f"({len(finite)} pairs; {sum(r > 0 for r in finite)} positive, {sum(r < 0 for r in finite)} "
                  "negative).", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python bench/transferability.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default="digits,animals", help=f"comma-separated built-in tasks ({', '.join(BUILTIN)})")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated candidates (with offline weights)")
    p.add_argument("--shots", type=int, default=10, help="training images per class")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning optimizer steps per run")
    p.add_argument("--evals", type=int, default=4, help="fine-tuning epochs (each ends with a test evaluation)")
    p.add_argument("--metric", default="main", choices=("main", "best"), help="the accuracy that ranks the models")
    p.add_argument("--runs", default=str(HERE / "results" / "transferability"), help="KITE records and run folders")
    p.add_argument("--report", default=str(HERE / "TRANSFERABILITY.md"), help="the markdown report")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0: all; smoke "
                                                             "runs only)")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished items, run nothing")
    args = p.parse_args(argv)
    tasks, models = args.tasks.split(","), args.models.split(",")
    if bad := [t for t in tasks if t not in BUILTIN]:
        p.error(f"unknown task: {bad}")
    if args.shots < 1 or args.seeds < 1:
        p.error("--shots and --seeds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs, report = Path(args.runs), Path(args.report)
    refresh = lambda: write_report(collect(runs, tasks, args.shots, models, args.seeds), args, argv,  # noqa: E731
                                   models, tasks, report)
    if args.report_only:
        refresh()
        print(f"wrote {report} from the finished items")
        return 0
    kite_grid = [(t, m, s) for t in tasks for s in range(args.seeds) for m in models]
    for i, (task, model, seed) in enumerate(kite_grid, 1):  # all KITE scores first: minutes, not hours
        t0 = time.perf_counter()
        rec = kite_once(runs, task, args.shots, model, seed)
        print(f"[KITE {i}/{len(kite_grid)}] {task} {model} seed={seed}: {rec['kite']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        refresh()
    for i, (task, model, seed) in enumerate(kite_grid, 1):
        label = f"[fine-tune {i}/{len(kite_grid)}] {task} {model} seed={seed}"
        print(f"{label}: running", flush=True)
        rec = run_once(finetune_config(task, args.shots, model, seed, args, runs))
        print(f"{label}: main {rec['main']:.3f} best {rec['best']:.3f} ({rec['wall']:.0f} s)", flush=True)
        refresh()
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
