"""``python -m concept_kernels.train.demo`` (``make demo``): vanilla fine-tuning vs Concept-Tuning.

ImageNet-pretrained EfficientNet-Lite0 (offline weights) on few-shot sklearn digits (10 per class, 8x8
grey upsampled to RGB: a real shift from ImageNet), both heads evaluated on the first 400 test images
after every epoch; prints a table and saves ``accuracy.png`` under ``--out``. Why this configuration
(<= 10 min on a 2-core CPU):

* 96 px: lite0's stride-32 map is 3x3, the smallest on which the 9 patches land in different cells.
* 9 patches of 64 px resampled to 24-px crops (``patch_pixels``): a box holds at most 6x6 of the 8x8
  source pixels, so 24 px still oversamples it 4x, at 1/4.6 the FLOPs of 64 px.
* batch 20, 8 epochs of 5 steps; N_conf = 9 = Cls - 1 (as the published CUB command, 199 = Cls - 1);
  K = 10 (a class is seen ~10 times per epoch, so the random initial keys leave after one epoch).
* lr 0.05 for the heads, 0.005 for the backbone (x0.1 as published), cosine schedule.
* backbone BN momentum 0.1 (with timm's 0.01 the running stats were still mostly ImageNet's after 15
  steps: test accuracy 0.15; 0.59 after re-estimating them on the training images).
* one torch thread when the machine is busy (load >= cores): 2 threads per process were ~10x slower.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .. import _backends
from .model import METHODS
from .trainer import Config, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m concept_kernels.train.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="demo output dir (a previous demo's output there is replaced)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--test-limit", type=int, default=400, help="test images evaluated per epoch (0: all 899)")
    p.add_argument("--shots-per-class", type=int, default=10)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: 1 if the machine is busy, else torch's default)")
    p.add_argument("--methods", default="vanilla,concept", help="comma-separated, e.g. vanilla,concept,bituning")
    args = p.parse_args(argv)
    threads = args.threads or (1 if os.getloadavg()[0] >= (os.cpu_count() or 1) else torch.get_num_threads())
    torch.set_num_threads(threads)
    out = Path(args.out)
    if out.exists():  # replace only a previous demo's output: method folders and the plot
        if not {p.name for p in out.iterdir()} <= set(METHODS) | {"accuracy.png"}:
            print(f"error: {out} holds files the demo did not write; pick another --out", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    print(f"demo: lite0 (ImageNet, offline) on digits, {args.shots_per_class} shots/class, 96 px, "
          f"{args.epochs} epochs, {threads} torch thread(s), output in {out}/", flush=True)
    t_all, results = time.perf_counter(), {}
    for method in args.methods.split(","):
        cfg = Config(method=method, image_size=96, batch_size=20, shots_per_class=args.shots_per_class,
                     epochs=args.epochs, lr=0.05, schedule="cos", num_patches=9, num_confusing=9, queue_len=10,
                     patch_pixels=24, train_blocks=("blocks.5", "blocks.6", "conv_head", "bn2"),
                     test_limit=args.test_limit, progress=False, out=str(out / method))
        print(f"\n== {method} ==", flush=True)
        t0 = time.perf_counter()
        results[method] = dict(hist=run(cfg), wall=time.perf_counter() - t0)
    ops = ", ".join(f"{op}={_backends.select(op, torch.device('cpu')).name}" for op in _backends.ops())
    print(f"\n{'method':<9} {'acc main':>8} {'acc IB':>7} {'best':>6} {'s/step':>7} {'wall s':>7}  backends")
    for method, r in results.items():
        last, steps = r["hist"][-1], sorted(x["sec_per_step"] for x in r["hist"])
        ib = f"{last['acc_ib']:.3f}" if "acc_ib" in last else "-"
        print(f"{method:<9} {last['acc_main']:>8.3f} {ib:>7} {max(x['acc'] for x in r['hist']):>6.3f} "
              f"{steps[len(steps) // 2]:>7.2f} {r['wall']:>7.0f}  "
              f"{ops if method == 'concept' else '- (no concept_kernels ops)'}")
    print("(acc main / IB: last epoch, per head; best: max over epochs of max(main, IB), the published protocol; "
          "s/step: median over epochs)")
    _plot(results, out / "accuracy.png")
    print(f"\nplot: {out / 'accuracy.png'}; total {time.perf_counter() - t_all:.0f} s")
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results.items():
        ep = [x["epoch"] for x in r["hist"]]
        line, = ax.plot(ep, [x["acc_main"] for x in r["hist"]], marker="o", label=f"{method} (main head)")
        if "acc_ib" in r["hist"][0]:
            ax.plot(ep, [x["acc_ib"] for x in r["hist"]], ls="--", color=line.get_color(), label=f"{method} (IB head)")
    ax.set(xlabel="epoch", ylabel="test accuracy", title="few-shot digits, EfficientNet-Lite0 (ImageNet)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
