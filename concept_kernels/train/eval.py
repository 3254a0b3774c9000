"""``python -m concept_kernels.train.eval --run DIR``: test accuracy per head of a trained run.

Writes the confusion matrices (``confusion_<best|last>.png``) and a JSON of the results
(``eval_<best|last>.json``: accuracy, per-class accuracy and confusion matrix per head).

The model is rebuilt from the checkpoint's own configuration (:func:`load_tuner`; no pretrained weights
are fetched, the checkpoint's replace them) and evaluated on the test split (ID) of the run's data
(``--data`` when it moved): an ImageFolder's ``val/``, a built-in task's test half. The IB head samples
its latent in eval mode as published, so ``--seed`` fixes its draws. The JSON's "ood" holds the accuracy
on the shifted test sets (:mod:`.ood`; ``--ood-corruptions``, ``--ood-severities``, ``--ood-limit``,
by default the run's own settings; ``--ood-corruptions none`` skips them).

In Python::

    from concept_kernels.train.eval import load_tuner
    model, cfg = load_tuner("runs/mine/best.pt")   # eval mode, on the CPU
    logits = model.predict(x)                      # x: (B, 3, cfg.image_size, cfg.image_size), normalised
    labels = logits["main"].argmax(1)              # as in training; "ib": the IB head (concept only)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from .backbones import create_backbone
from .checkpoint import BEST, CHECKPOINT, CheckpointError, load_checkpoint, write_json
from .model import ConceptTuner
from .runtime import HelpFormatter, resolve_threads, resolve_workers, run_cli
from .ood import ShiftSpec, summary_line
from .trainer import Config, batches, build_data, build_model, builtin_task, shifted_evaluator

WHICH = {"best": BEST, "last": CHECKPOINT}


def config_from_dict(saved: dict) -> Config:
    """The :class:`Config` a checkpoint's ``config`` entry describes (lists back to tuples; fields it
    lacks, from older versions, take their defaults). Keys Config does not know are refused."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise CheckpointError(f"the checkpoint's config has settings this version does not know: {unknown} "
                              "(written by a newer concept_kernels?)")
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def load_run(path: str | Path, device: torch.device | str = "cpu",
             require_digest: bool = True) -> tuple[ConceptTuner, Config, dict]:
    """(model, config, the checkpoint's dict) as :func:`load_tuner`; ``require_digest``: see
    :func:`.checkpoint.load_checkpoint`."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    ckpt = load_checkpoint(path, require_digest)
    cfg = config_from_dict(ckpt["config"])
    if "head.weight" not in ckpt["model"]:
        raise CheckpointError(f"{path}: the model has no 'head.weight', so its class count is unknown")
    num_classes = ckpt["model"]["head.weight"].shape[0]
    backbone = create_backbone(cfg.model, pretrained=False, cache_dir=cfg.cache_dir)
    if "source_head.weight" in ckpt["model"]:  # a kept source classifier (cotuning): its weights are in the checkpoint
        backbone.source_classifier = {k: ckpt["model"][f"source_head.{k}"] for k in ("weight", "bias")}
    model = build_model(cfg, backbone, num_classes, torch.device(device))
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt


def load_tuner(path: str | Path, device: torch.device | str = "cpu") -> tuple[ConceptTuner, Config]:
    """(model, config) of a training checkpoint (``best.pt``, ``checkpoint.pt``, or a run directory: its
    ``checkpoint.pt``): the :class:`ConceptTuner` rebuilt from the checkpoint's config, its weights
    (digest-checked) loaded, in eval mode on ``device``. ``model.predict(x)`` with x (B, 3, S, S),
    S = ``config.image_size``, normalised as the training data, gives {"main": (B, Cls) logits, "ib":
    (B, Cls) logits (concept only)}."""
    model, cfg, _ = load_run(path, device)
    return model, cfg


def shifted_accuracy(path: str | Path, spec: ShiftSpec, device: torch.device | str = "cpu",
                     require_digest: bool = True) -> tuple[dict | None, dict]:
    """(accuracy on the shifted test sets of ``spec`` (:func:`.ood.evaluate_shifted`; None when ``spec``
    has none), the checkpoint's dict) of a run's checkpoint, on the test split of the run's own data
    (its ``test_limit`` applied, as in training), so a finished run gets its OOD accuracy post hoc."""
    model, cfg, ckpt = load_run(path, device, require_digest)
    _, test_set, names = build_data(cfg, model.backbone)
    evaluate_ood = shifted_evaluator(cfg, model.backbone, names, torch.device(device), spec)
    return (None if evaluate_ood is None else evaluate_ood(model, test_set)), ckpt


@torch.no_grad()
def confusion_matrices(model: ConceptTuner, ds, device: torch.device, num_classes: int, batch_size: int = 100,
                       workers: int = 0) -> dict[str, torch.Tensor]:
    """{head: (Cls, Cls) int64 counts, [true class, predicted class]} of ``model.predict`` on ``ds``."""
    model.eval()
    counts: dict[str, torch.Tensor] = {}
    chunks = [list(range(s, min(len(ds), s + batch_size))) for s in range(0, len(ds), batch_size)]
    for x, y in batches(ds, chunks, workers):
        for head, logits in model.predict(x.to(device)).items():
            pairs = y.cpu() * num_classes + logits.argmax(1).cpu()
            add = torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)
            counts[head] = counts.get(head, 0) + add
    return counts


def summarize(counts: dict[str, torch.Tensor]) -> dict:
    """Per head: top-1 accuracy, per-class accuracy (recall; None for a class without test images) and
    the matrix as lists; "acc": the max over heads (the published protocol's per-epoch number)."""
    heads = {}
    for head, cm in counts.items():
        per_class = cm.diag().double() / cm.sum(1).double()
        heads[head] = dict(acc=float(cm.diag().sum()) / max(int(cm.sum()), 1),
                           per_class_acc=[None if v != v else float(v) for v in per_class.tolist()],
                           confusion=cm.tolist())
    return dict(heads=heads, acc=max(h["acc"] for h in heads.values()))


def plot_confusion(counts: dict[str, torch.Tensor], names: list[str], path: Path, title: str) -> None:
    """One panel per head: counts as colour (and as numbers up to 20 classes), true classes as rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    side = min(max(3.0, 0.35 * n + 2.0), 16.0)
    fig, axes = plt.subplots(1, len(counts), figsize=(side * len(counts), side), squeeze=False)
    for ax, (head, cm) in zip(axes[0], counts.items()):
        im = ax.imshow(cm.numpy(), cmap="Blues")
        acc = float(cm.diag().sum()) / max(int(cm.sum()), 1)
        ax.set(title=f"{head} head: acc {acc:.3f}", xlabel="predicted", ylabel="true")
        if n <= 50:
            ax.set_xticks(range(n), names, rotation=90, fontsize=7)
            ax.set_yticks(range(n), names, fontsize=7)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if cm[i, j] > cm.max() / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m concept_kernels.train.eval", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="example: python -m concept_kernels.train.eval --run runs/mine --checkpoint last")
    p.add_argument("--run", required=True, help="the training run's output directory (its --out)")
    p.add_argument("--checkpoint", choices=tuple(WHICH), default="best",
                   help="best: best.pt (the epoch with the best test accuracy); last: checkpoint.pt")
    p.add_argument("--data", default=None, help="the data, when not where the run found it (default: the run's)")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate the first N test images (0: all)")
    p.add_argument("--batch-size", type=int, default=100, help="evaluation batch size")
    p.add_argument("--seed", type=int, default=0, help="torch seed (the IB head samples its latent)")
    p.add_argument("--ood-corruptions", default=None, help="shifted test sets: corruptions (comma-separated, "
                   "'all' or 'none'; default: the run's --ood-corruptions)")
    p.add_argument("--ood-severities", default=None, help="their severities 1..5, comma-separated (default: the run's)")
    p.add_argument("--ood-limit", type=int, default=None, help="images per shifted set (0: all; default: the run's)")
    p.add_argument("--out", default=None, help="where the JSON and the PNG go (default: --run)")
    p.add_argument("--no-plot", action="store_true", help="skip the confusion-matrix PNG (needs matplotlib)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: auto, as the trainer)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers for an ImageFolder (default: auto, as the trainer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p


def evaluate_run(args: argparse.Namespace) -> dict:
    """Load, evaluate, write the JSON (and the PNG unless ``--no-plot``); returns the results."""
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir}: no such directory (give a training run's --out)")
    path = run_dir / WHICH[args.checkpoint]
    if not path.exists():
        hint = " (no epoch finished yet?); --checkpoint last reads checkpoint.pt" if args.checkpoint == "best" else ""
        raise CheckpointError(f"--checkpoint {args.checkpoint}: {path} does not exist{hint}")
    torch.set_num_threads(resolve_threads(args.threads)[0])
    device = torch.device(args.device)
    model, cfg, ckpt = load_run(path, device)
    cfg = dataclasses.replace(cfg, data=args.data or cfg.data, test_limit=args.test_limit)
    workers = resolve_workers(args.workers, builtin_task(cfg) is None)[0]
    _, test_set, names = build_data(cfg, model.backbone)
    if len(names) != model.num_classes:
        raise ValueError(f"--data {cfg.data}: {len(names)} classes, the checkpoint's model has {model.num_classes}")
    torch.manual_seed(args.seed)
    counts = confusion_matrices(model, test_set, device, len(names), args.batch_size, workers)
    spec = ShiftSpec.parse(*(cfg_value if arg is None else arg for arg, cfg_value in (
        (args.ood_corruptions, cfg.ood_corruptions), (args.ood_severities, cfg.ood_severities),
        (args.ood_limit, cfg.ood_limit))))
    evaluate_ood = shifted_evaluator(cfg, model.backbone, names, device, spec, workers)
    ood = evaluate_ood(model, test_set) if evaluate_ood is not None else None
    state = ckpt["state"]
    logged = next((r for r in ckpt["history"] if r["epoch"] == state["epoch"]), None)
    result = dict(run=str(run_dir), checkpoint=str(path), epoch=state["epoch"], step_in_epoch=state["step_in_epoch"],
                  global_step=state["global_step"], data=cfg.data or "builtin:digits", split="test",
                  n_test=len(test_set), seed=args.seed, classes=names, **summarize(counts),
                  logged_at_training=logged, ood=ood)
    out = Path(args.out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"eval_{args.checkpoint}.json", result)
    heads = ", ".join(f"{h} {r['acc']:.4f}" for h, r in result["heads"].items())
    print(f"{path} (epoch {state['epoch']}, step {state['global_step']}) on {result['data']} test split, "
          f"{len(test_set)} images: accuracy {heads}; max over heads {result['acc']:.4f}")
    if ood is not None:
        print(summary_line(ood, {h: r["acc"] for h, r in result["heads"].items()}))
    print(f"wrote {out / f'eval_{args.checkpoint}.json'}", flush=True)
    if not args.no_plot:
        png = out / f"confusion_{args.checkpoint}.png"
        plot_confusion(counts, names, png, f"{cfg.model} {cfg.method}, {path.name} (epoch {state['epoch']}), "
                                           f"{result['data']} test ({len(test_set)} images)")
        print(f"wrote {png}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads_before = torch.get_num_threads()
    try:
        status = run_cli(lambda: evaluate_run(args), import_hint=lambda e: (
            "; or pass --no-plot" if (e.name or "").startswith("matplotlib") else ""))[1]
    finally:
        torch.set_num_threads(threads_before)
    if status is not None:
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
