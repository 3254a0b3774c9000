"""``python -m concept_kernels.train``: fine-tune a timm model with Concept-Tuning or a baseline.

Examples::

    python -m concept_kernels.train --method concept --epochs 10 --out runs/ct          # digits, lite0
    python -m concept_kernels.train --data /path/imagefolder --image-size 224 --shots-per-class 0 \\
        --method vanilla --out runs/van
    torchrun --nproc-per-node 2 -m concept_kernels.train ...                          # DDP

Every field of :class:`~concept_kernels.train.trainer.Config` is a flag (``--batch-size`` for
``batch_size``; booleans also as ``--no-...``); lists are comma-separated (``--train-blocks blocks.5,blocks.6``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

from .model import METHODS, PATCH_MODES
from .trainer import CheckpointError, Config, run

HELP = dict(model="timm model name (needs a 4-D feature map)", data="ImageFolder root with train/ and val/ "
            "(default: built-in sklearn digits)", pretrained="ImageNet weights (offline for tf_efficientnet_lite0 / "
            "efficientnet_lite0)", shots_per_class="training images per class (<=0: all)",
            iters_per_epoch="0: one pass over the training set", milestones="multistep epochs (x0.1 each)",
            amp="bfloat16 autocast (GPU only)", out="output dir (metrics.jsonl, checkpoint.pt)",
            resume="continue from <out>/checkpoint.pt", overwrite="allow a non-empty output dir without --resume",
            num_confusing="N_conf (default min(100, classes-1))", patch_pixels="image-mode crop side (default 2x "
            "stride: exact crops)", train_blocks="surgical: backbone prefixes, e.g. blocks.0,blocks.1",
            min_crop="min crop area of views 0/1 (default 0.2; digits 0.6)", hflip="default: off for digits, on "
            "otherwise", bn_momentum="backbone BN momentum (<0: keep the model's)", test_limit="evaluate on the "
            "first N test images (0: all)")
CHOICES = dict(method=METHODS, patch_mode=PATCH_MODES, schedule=("multistep", "cos"))
TYPES = {"int": int, "float": float, "str": str}
HIDDEN = ("cache_dir", "extra")


def parse_args(argv: Optional[List[str]] = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m concept_kernels.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.name in HIDDEN:
            continue
        kind = f.type.replace("Optional[", "").rstrip("]")  # "int", "bool", "Tuple[int, ...", ...
        kw = dict(default=f.default, help=HELP.get(f.name, " "), choices=CHOICES.get(f.name))
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("Tuple"):
            item = TYPES[kind[6:].split(",")[0]]
            kw.update(default=",".join(map(str, f.default)),
                      type=lambda s, item=item: tuple(item(v) for v in s.split(",") if v))
        else:
            kw["type"] = TYPES[kind]
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    cfg = Config(**vars(p.parse_args(argv)))  # (argparse runs ``type`` on string defaults too)
    if cfg.bn_momentum is not None and cfg.bn_momentum < 0:
        cfg.bn_momentum = None
    return cfg


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
