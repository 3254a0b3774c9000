"""``python -m concept_kernels.train.demo`` (``make demo``): vanilla fine-tuning vs Concept-Tuning.

Fine-tunes the ImageNet-pretrained EfficientNet-Lite0 (offline weights, through timm) on few-shot
sklearn digits (10 images per class, 8x8 grey upsampled to RGB: a real shift from ImageNet), once
with vanilla fine-tuning and once with Concept-Tuning (published "image" patch mode), evaluates
both heads on the first 400 images of the fixed 899-image test half after every epoch, prints a table and saves
``accuracy.png`` (plus each run's metrics.jsonl / checkpoint) under ``--out``.

Why this configuration (budget: <= 10 min, aim ~5, on a 2-core CPU):

* 96 px inputs: lite0's stride-32 map is 3x3, the smallest map on which the 9 concept patches can
  land in different cells (at 64 px it is 2x2 and boxes degenerate); 224 px would be ~5x slower.
* 9 patches per image as published, boxes 64 px (2x stride) resampled to 24 px crops
  (``patch_pixels``): the crop side barely changes the step time on CPU (measured 2.2 s at 16 px,
  2.6 s at 32 px, batch 16), the per-layer cost of 144 tiny images dominates.
* batch 20, 8 epochs of 5 steps: 100 training images; 400 test images per evaluation (evaluating
  all 899 each epoch took ~30 s per epoch on the busy machine, more than the training); N_conf = 9 = Cls - 1 (as the published
  CUB command, 199 = Cls - 1); queue K = 10 (a class is seen ~10 times per epoch, so the random
  initial keys are gone after one epoch; the published K = 40 would keep them for 4 of the 8 epochs).
* lr 0.05 for the heads, 0.005 for the backbone (x0.1 as published), cosine schedule: few steps.
* backbone BN momentum 0.1 (``Config.bn_momentum``): timm's tf_* port uses 0.01, and after 15
  steps the running stats were still mostly ImageNet's (test accuracy 0.15; 0.59 after
  re-estimating the stats on the training images).
* one torch thread when the machine is already busy (load average >= cores): on the shared
  2-core machine, 2 OpenMP threads per process were ~10x slower than 1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .model import METHODS
from .trainer import Config, backends_in_use, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m concept_kernels.train.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="demo output dir (a previous demo's output there is replaced)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--test-limit", type=int, default=400, help="test images evaluated per epoch (0: all 899)")
    p.add_argument("--shots-per-class", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: 1 if the machine is busy, else torch's default)")
    p.add_argument("--methods", default="vanilla,concept", help="comma-separated, e.g. vanilla,concept,bituning")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = args.threads or (1 if os.getloadavg()[0] >= cores else torch.get_num_threads())
    torch.set_num_threads(threads)
    out = Path(args.out)
    if out.exists():  # replace only a previous demo's output: method folders and the plot
        own = set(METHODS) | {"accuracy.png"}
        if not {p.name for p in out.iterdir()} <= own:
            print(f"error: {out} holds files the demo did not write; pick another --out", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    print(f"demo: lite0 (ImageNet, offline) on digits, {args.shots_per_class} shots/class, 96 px, "
          f"{args.epochs} epochs, {threads} torch thread(s), output in {out}/", flush=True)
    t_all = time.perf_counter()
    results = {}
    for method in args.methods.split(","):
        cfg = Config(method=method, image_size=96, batch_size=20, shots_per_class=args.shots_per_class,
                     epochs=args.epochs, lr=0.05, schedule="cos", num_patches=9, num_confusing=9, queue_len=10,
                     patch_pixels=24, train_blocks=("blocks.5", "blocks.6", "conv_head", "bn2"),
                     test_limit=args.test_limit, progress=False, out=str(out / method))
        t0 = time.perf_counter()
        print(f"\n== {method} ==", flush=True)
        hist = run(cfg)
        results[method] = dict(hist=hist, wall=time.perf_counter() - t0)
    ops = backends_in_use(torch.device("cpu"))
    uses = {"concept": ops, "bituning": {}}
    print(f"\n{'method':<9} {'acc main':>8} {'acc IB':>7} {'best':>6} {'s/step':>7} {'wall s':>7}  backends")
    for method, r in results.items():
        last = r["hist"][-1]
        steps = sorted(x["sec_per_step"] for x in r["hist"])
        ib = f"{last['acc_ib']:.3f}" if "acc_ib" in last else "-"
        be = ", ".join(f"{k}={v}" for k, v in uses.get(method, {}).items()) or "- (no concept_kernels ops)"
        print(f"{method:<9} {last['acc_main']:>8.3f} {ib:>7} {max(x['acc'] for x in r['hist']):>6.3f} "
              f"{steps[len(steps) // 2]:>7.2f} {r['wall']:>7.0f}  {be}")
    print("(acc main / IB: last epoch, per head; best: max over epochs of max(main, IB), the published protocol; "
          "s/step: median over epochs)")
    _plot(results, out / "accuracy.png")
    print(f"\nplot: {out / 'accuracy.png'}; total {time.perf_counter() - t_all:.0f} s")
    return 0


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results.items():
        ep = [x["epoch"] for x in r["hist"]]
        line, = ax.plot(ep, [x["acc_main"] for x in r["hist"]], marker="o", label=f"{method} (main head)")
        if "acc_ib" in r["hist"][0]:
            ax.plot(ep, [x["acc_ib"] for x in r["hist"]], ls="--", color=line.get_color(), label=f"{method} (IB head)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title("few-shot digits, EfficientNet-Lite0 (ImageNet)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
