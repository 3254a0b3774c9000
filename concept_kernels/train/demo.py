"""``python -m concept_kernels.train.demo`` (``make demo``): vanilla fine-tuning vs Bi-Tuning vs Concept-Tuning.

ImageNet-pretrained EfficientNet-Lite0 (offline weights) on few-shot sklearn digits (10 per class, 8x8
grey upsampled to RGB: a real shift from ImageNet), three seeds per method (seed = few-shot draw, head
init, augmentation stream), both heads evaluated on the first 400 test images after every epoch and the
final model on the shifted test sets (100 of those images corrupted by Gaussian noise, blur, contrast and an
affine warp at severity 3, the trainer's default corruptions; ``concept_kernels.train.ood``); prints a table
of mean +- std over seeds and the paired difference to vanilla, and saves ``accuracy.png`` (one band per
method) under ``--out``. Why this configuration (<= 10 min on a 2-core CPU):

* 96 px: lite0's stride-32 map is 3x3, the smallest on which the 9 patches land in different cells.
* 9 patches of 64 px resampled to 24-px crops (``patch_pixels``): a box holds at most 6x6 of the 8x8
  source pixels, so 24 px still oversamples it 4x, at 1/4.6 the FLOPs of 64 px.
* batch 20, 8 epochs of 5 steps; N_conf = 9 = Cls - 1 (as the published CUB command, 199 = Cls - 1);
  K = 10 (a class is seen ~10 times per epoch, so the random initial keys leave after one epoch).
* key encoder momentum ``auto`` (0.5 for 40 steps): the published 0.999 was made for 20,000 steps; over 40
  steps it leaves the key encoder 96% its initial model with a random head, so its patch search and keys
  stay random (``resolve_key_momentum`` keeps the published lag, 5% of the run).
* lr 0.05 for the heads, 0.005 for the backbone (x0.1, the published multistep groups) with a cosine
  schedule (the published cosine option trains the backbone at the full lr; at 0.05 that overshoots here).
* backbone BN momentum 0.1 (with timm's 0.01 the running stats were still mostly ImageNet's after 15
  steps: test accuracy 0.15; 0.59 after re-estimating them on the training images).
* shifted sets of 100 images (``ood_limit``; the trainer's default is 200): 400 extra forward passes per
  run, about one epoch's test evaluation, once at the end.
* one torch thread when the machine is busy (load >= cores; ``runtime.default_threads``): 2 threads per
  process were ~10x slower there.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from .. import _backends
from .model import METHODS
from .runtime import default_threads
from .trainer import Config, run


def demo_config(method: str, seed: int, epochs: int, shots: int, test_limit: int, out: Path) -> Config:
    """The demo's run of ``method`` with ``seed`` (see the module docstring for each choice)."""
    return Config(method=method, seed=seed, image_size=96, batch_size=20, shots_per_class=shots, epochs=epochs,
                  lr=0.05, backbone_lr_mult=0.1, schedule="cos", key_momentum="auto", num_patches=9,
                  num_confusing=9, queue_len=10, patch_pixels=24,
                  train_blocks=("blocks.5", "blocks.6", "conv_head", "bn2"), test_limit=test_limit, ood_limit=100,
                  progress=False, out=str(out / method / f"seed{seed}"))


def summarize(hists: list[list[dict]]) -> dict[str, list[float]]:
    """Per seed: last-epoch main / IB head accuracy, the published protocol (best over epochs of max(main,
    IB)) and the final model's main head on the shifted sets (mean over them); keys "main", "ib" (absent
    for single-head methods), "best", "ood" (absent without shifted sets)."""
    out = {"main": [h[-1]["acc_main"] for h in hists], "best": [max(r["acc"] for r in h) for h in hists]}
    if "acc_ib" in hists[0][-1]:
        out["ib"] = [h[-1]["acc_ib"] for h in hists]
    if all("ood_acc_main" in h[-1] for h in hists):
        out["ood"] = [h[-1]["ood_acc_main"] for h in hists]
    return out


def mean_std(xs: list[float]) -> str:
    t = torch.tensor(xs, dtype=torch.float64)
    return f"{t.mean():.3f} ± {t.std(unbiased=True) if len(xs) > 1 else 0.0:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m concept_kernels.train.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="demo output dir (a previous demo's output there is replaced)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (0, 1, ...)")
    p.add_argument("--test-limit", type=int, default=400, help="test images evaluated per epoch (0: all 899)")
    p.add_argument("--shots-per-class", type=int, default=10)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: 1 if the machine is busy, else the physical cores)")
    p.add_argument("--methods", default="vanilla,bituning,concept", help="comma-separated, from " + ",".join(METHODS))
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    threads = args.threads or default_threads()[0]
    torch.set_num_threads(threads)
    out = Path(args.out)
    if out.exists():  # replace only a previous demo's output: method folders and the plot
        if not {p.name for p in out.iterdir()} <= set(METHODS) | {"accuracy.png"}:
            print(f"error: {out} holds files the demo did not write; pick another --out", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    print(f"demo: lite0 (ImageNet, offline) on digits, {args.shots_per_class} shots/class, 96 px, "
          f"{args.epochs} epochs, seeds 0..{args.seeds - 1}, {threads} torch thread(s), output in {out}/", flush=True)
    t_all, results = time.perf_counter(), {}
    for method in methods:
        hists, walls = [], []
        for seed in range(args.seeds):
            print(f"\n== {method}, seed {seed} ==", flush=True)
            t0 = time.perf_counter()
            hists.append(run(demo_config(method, seed, args.epochs, args.shots_per_class, args.test_limit, out)))
            walls.append(time.perf_counter() - t0)
        steps = sorted(r["sec_per_step"] for h in hists for r in h)
        results[method] = dict(hists=hists, wall=sum(walls), sec_per_step=steps[len(steps) // 2], **summarize(hists))
    _print_table(results, args.seeds)
    _plot(results, out / "accuracy.png", args.shots_per_class)
    print(f"\nplot: {out / 'accuracy.png'}; total {time.perf_counter() - t_all:.0f} s")
    return 0


def _print_table(results: dict, seeds: int) -> None:
    ops = ", ".join(f"{op}={_backends.select(op, torch.device('cpu')).name}" for op in _backends.ops())
    print(f"\n{'method':<9} {'acc main':>13} {'acc IB':>13} {'best':>13} {'OOD main':>13} {'s/step':>7} {'wall s':>7}"
          "  backends")
    for method, r in results.items():
        ib, ood = (mean_std(r[k]) if k in r else "-" for k in ("ib", "ood"))
        backends = ops if method == "concept" else "- (no concept_kernels ops)"
        print(f"{method:<9} {mean_std(r['main']):>13} {ib:>13} {mean_std(r['best']):>13} {ood:>13} "
              f"{r['sec_per_step']:>7.2f} {r['wall']:>7.0f}  {backends}")
    print(f"(mean ± std over {seeds} seeds; acc main / IB: last epoch, per head; best: max over epochs of "
          "max(main, IB), the published protocol; OOD main: the final model's main head, mean over the shifted "
          "test sets; s/step: median over epochs and seeds)")
    if "vanilla" in results:
        base = results["vanilla"]
        for method, r in results.items():
            if method == "vanilla":
                continue
            diffs = {k: [a - b for a, b in zip(r[k], base[k])] for k in ("main", "best", "ood") if k in r and k in base}
            print(f"{method} - vanilla, paired by seed: main {mean_std(diffs['main'])}, "
                  f"best {mean_std(diffs['best'])}" + (f", OOD main {mean_std(diffs['ood'])}" if "ood" in diffs else "")
                  + (f", IB head - vanilla main {mean_std([a - b for a, b in zip(r['ib'], base['main'])])}"
                     if "ib" in r else ""))


def _plot(results: dict, path: Path, shots: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, r in results.items():
        ep = [x["epoch"] for x in r["hists"][0]]
        for key, style in (("acc_main", "-"), ("acc_ib", "--")):
            if key not in r["hists"][0][0]:
                continue
            acc = torch.tensor([[x[key] for x in h] for h in r["hists"]], dtype=torch.float64)
            mean, lo, hi = acc.mean(0), acc.min(0).values, acc.max(0).values
            label = f"{method} ({'main' if key == 'acc_main' else 'IB'} head)"
            line, = ax.plot(ep, mean, ls=style, marker="o", ms=3, label=label,
                            **({} if key == "acc_main" else dict(color=results[method]["color"])))
            r["color"] = line.get_color()
            ax.fill_between(ep, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch", ylabel="test accuracy",
           title=f"{shots}-shot digits, EfficientNet-Lite0 (ImageNet): mean, band = min..max over seeds")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
