"""``python -m concept_kernels.train``: fine-tune a timm model with Concept-Tuning or a baseline.

Examples::

    python -m concept_kernels.train --method concept --epochs 10 --out runs/ct          # digits, lite0
    python -m concept_kernels.train --data /path/imagefolder --image-size 224 --shots-per-class 0 \\
        --method vanilla --out runs/van
    torchrun --nproc-per-node 2 -m concept_kernels.train ...                          # DDP
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .model import METHODS, PATCH_MODES
from .trainer import CheckpointError, Config, run


def parse_args(argv: Optional[List[str]] = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m concept_kernels.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=d.model, help="timm model name (needs a 4-D feature map)")
    a("--pretrained", action=argparse.BooleanOptionalAction, default=d.pretrained,
      help="ImageNet weights (offline for tf_efficientnet_lite0 / efficientnet_lite0)")
    a("--data", default=None, help="ImageFolder root with train/ and val/ (default: built-in sklearn digits)")
    a("--shots-per-class", type=int, default=d.shots_per_class, help="training images per class (<=0: all)")
    a("--image-size", type=int, default=d.image_size)
    a("--method", choices=METHODS, default=d.method)
    a("--patch-mode", choices=PATCH_MODES, default=d.patch_mode)
    a("--epochs", type=int, default=d.epochs)
    a("--batch-size", type=int, default=d.batch_size)
    a("--iters-per-epoch", type=int, default=d.iters_per_epoch, help="0: one pass over the training set")
    a("--lr", type=float, default=d.lr)
    a("--backbone-lr-mult", type=float, default=d.backbone_lr_mult)
    a("--schedule", choices=("multistep", "cos"), default=d.schedule)
    a("--milestones", type=int, nargs="*", default=list(d.milestones), help="multistep epochs (x0.1 each)")
    a("--momentum", type=float, default=d.momentum)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--seed", type=int, default=d.seed)
    a("--amp", action="store_true", help="bfloat16 autocast (GPU only)")
    a("--out", default=d.out, help="output dir (metrics.jsonl, checkpoint.pt)")
    a("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    a("--overwrite", action="store_true", help="allow a non-empty output dir without --resume")
    a("--num-patches", type=int, default=d.num_patches)
    a("--num-confusing", type=int, default=None, help="N_conf (default min(100, classes-1))")
    a("--queue-len", type=int, default=d.queue_len)
    a("--patch-pixels", type=int, default=None, help="image-mode crop side (default 2x stride: exact crops)")
    a("--train-blocks", default="", help="surgical: comma-separated backbone prefixes, e.g. blocks.0,blocks.1")
    a("--min-crop", type=float, default=None, help="min crop area of views 0/1 (default 0.2; digits 0.6)")
    a("--hflip", action=argparse.BooleanOptionalAction, default=None, help="default: off for digits, on otherwise")
    a("--bn-momentum", type=float, default=d.bn_momentum, help="backbone BN momentum (<0: keep the model's)")
    a("--test-limit", type=int, default=d.test_limit, help="evaluate on the first N test images (0: all)")
    a("--no-progress", action="store_true")
    for w in ("img", "con", "ce-ib", "kl"):
        a(f"--w-{w}", type=float, default=getattr(d, "w_" + w.replace("-", "_")))
    ns = p.parse_args(argv)
    kw = {k: v for k, v in vars(ns).items() if k not in ("no_progress", "milestones", "train_blocks")}
    if kw["bn_momentum"] is not None and kw["bn_momentum"] < 0:
        kw["bn_momentum"] = None
    return Config(**kw, milestones=tuple(ns.milestones), progress=not ns.no_progress,
                  train_blocks=tuple(t for t in ns.train_blocks.split(",") if t))


def main(argv: Optional[List[str]] = None) -> int:
    cfg = parse_args(argv)
    try:
        history = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if history and "acc" in history[-1]:
        best = max(r["acc"] for r in history)
        print(f"done: last epoch acc_main={history[-1]['acc_main']:.4f} acc={history[-1]['acc']:.4f}, best acc={best:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
