"""``python -m concept_kernels.train``: fine-tune a timm model with Concept-Tuning or a baseline.

Every :class:`~concept_kernels.train.trainer.Config` field is a flag (``--batch-size``; booleans also
``--no-...``; lists comma-separated, ``--train-blocks blocks.5,blocks.6``); examples: README
"Fine-tuning". DDP: ``torchrun --nproc-per-node 2 -m concept_kernels.train ...``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .model import METHODS, PATCH_MODES, SINKHORN_STOPS
from .trainer import CheckpointError, Config, run


def _float_or_auto(s: str) -> float | str:
    return s if s.strip().lower() == "auto" else float(s)


CHOICES = dict(method=METHODS, patch_mode=PATCH_MODES, schedule=("multistep", "cos"), sinkhorn_stop=SINKHORN_STOPS)
TYPES = {"int": int, "float": float, "str": str, "float | str": _float_or_auto}


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m concept_kernels.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.name == "cache_dir":
            continue
        kind = f.type.removesuffix(" | None")  # "int", "bool", "tuple[int, ...]", ...
        kw = dict(default=f.default, help=f.metadata.get("help", " "), choices=CHOICES.get(f.name))
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple"):
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


def main(argv: list[str] | None = None) -> int:
    try:
        history = run(parse_args(argv))
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if history and "acc" in history[-1]:
        last, best = history[-1], max(r["acc"] for r in history)
        print(f"done: last epoch acc_main={last['acc_main']:.4f} acc={last['acc']:.4f}, best acc={best:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
