"""``python -m concept_kernels.train``: fine-tune a timm model with Concept-Tuning or a baseline.

Every :class:`~concept_kernels.train.trainer.Config` field is a flag (``--batch-size``; booleans also
``--no-...``; lists comma-separated, ``--train-blocks blocks.5,blocks.6``); examples: ``--help``, README
"Fine-tuning". DDP: ``torchrun --nproc-per-node 2 -m concept_kernels.train ...``. Exit status: 0 done,
2 bad input (one line on stderr), 130 after Ctrl-C (the checkpoint is saved first).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .methods import REGISTRY as METHOD_REGISTRY
from .methods.lpft import FT_BN, PROBES
from .methods.named_blocks import BLOCKS
from .model import METHODS, PATCH_MODES, SINKHORN_STOPS
from .runtime import EXIT_INTERRUPTED, HelpFormatter, run_cli
from .trainer import Config, run



def _float_or_auto(s: str) -> float | str:
    return s if s.strip().lower() == "auto" else float(s)


CHOICES = dict(method=METHODS, patch_mode=PATCH_MODES, schedule=("multistep", "cos"), sinkhorn_stop=SINKHORN_STOPS,
               surgical_block=BLOCKS)
TYPES = {"int": int, "float": float, "str": str, "float | str": _float_or_auto}
# help for the Config fields that carry none in their metadata
HELP = dict(
    image_size="input side in px (training views and the centre test crop)",
    method="; ".join(f"{name}: {cls.summary}" for name, cls in METHOD_REGISTRY.items()),
    patch_mode="image (published: crops through the network) or roi (fast RoIAlign of the map, NOT equivalent)",
    epochs="training epochs (each ends with a test evaluation and a checkpoint)",
    batch_size="images per step and rank",
    weight_decay="SGD weight decay",
    nesterov="Nesterov momentum",
    seed="seed of the few-shot draw, the head init and the augmentation stream",
    num_patches="P, concept patches per image (>= 4 for concept)",
    queue_len="K, keys per class in the contrastive queues",
    w_img="weight of the image-level contrastive loss",
    w_con="weight of the concept (patch) contrastive loss",
    w_ce_ib="weight of the information-bottleneck head's CE",
    w_kl="weight of the information-bottleneck KL term",
    progress="tqdm progress bar",
)
# the CLI's own defaults where they differ from the library's
CLI_DEFAULTS = dict(threads=(0, "torch threads per process (0: auto = the physical cores of this process's CPU "
                                "affinity per local rank, 1 when the machine is busy: 1-min load >= CPUs)"))
SKIPPED = ("cache_dir",)  # set by tests and library callers, not a flag
EPILOG = """examples:
  python -m concept_kernels.train                        # EfficientNet-Lite0 on 10-shot built-in digits
  python -m concept_kernels.train --data /path/to/imagefolder --image-size 224 --model resnet50 \\
      --epochs 40 --batch-size 48 --out runs/mine        # your data: all training images by default
  python -m concept_kernels.train --out runs/mine --resume  # continue after Ctrl-C (exit status 130)
  python -m concept_kernels.train.eval --run runs/mine   # per-head test accuracy + confusion matrix
  torchrun --nproc-per-node 2 -m concept_kernels.train ...  # DDP
outputs in --out: config.json, checkpoint.pt, best.pt, metrics.jsonl, metrics.csv, ood.json (accuracy on
the shifted test sets: --ood-corruptions, --ood-severities, --ood-limit) (+ TensorBoard scalars in
tensorboard/ when tensorboard is installed)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m concept_kernels.train", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter, epilog=EPILOG)
    for f in dataclasses.fields(Config):
        if f.name in SKIPPED:
            continue
        kind = f.type.removesuffix(" | None")  # "int", "bool", "tuple[int, ...]", ...
        default, text = CLI_DEFAULTS.get(f.name, (f.default, f.metadata.get("help") or HELP.get(f.name)))
        if not text:
            raise TypeError(f"Config.{f.name} has no help text: add it to its field or to __main__.HELP")
        kw = dict(default=default, help=text.replace("%", "%%"), choices=CHOICES.get(f.name))
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple"):
            item = TYPES[kind[6:].split(",")[0]]
            kw.update(default=",".join(map(str, f.default)),
                      type=lambda s, item=item: tuple(item(v) for v in s.split(",") if v))
        else:
            kw["type"] = TYPES[kind]
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p


def parse_args(argv: list[str] | None = None) -> Config:
    cfg = Config(**vars(build_parser().parse_args(argv)))  # (argparse runs ``type`` on string defaults too)
    if cfg.bn_momentum is not None and cfg.bn_momentum < 0:
        cfg.bn_momentum = None
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    history, status = run_cli(lambda: run(cfg), "interrupted: nothing saved since the last checkpoint")
    if status is not None:  # (Ctrl-C before training started or a second one; bad input)
        return status
    if getattr(history, "interrupted", False):
        return EXIT_INTERRUPTED
    if history and "acc" in history[-1]:
        last, best = history[-1], max(history, key=lambda r: r["acc"])
        print(f"done: last epoch acc_main={last['acc_main']:.4f} acc={last['acc']:.4f}; best acc={best['acc']:.4f} "
              f"(epoch {best['epoch']}, {cfg.out}/best.pt); evaluate: python -m concept_kernels.train.eval "
              f"--run {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
