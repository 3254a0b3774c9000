"""The fine-tuning loop: ``run(Config(...))`` trains and returns the per-epoch metrics.

At start (rank 0) it prints a summary (data, model, parameters, method, device, threads, steps) and
writes ``<out>/config.json``; metrics go to ``metrics.jsonl``, ``metrics.csv`` and, when tensorboard is
installed, TensorBoard scalars; ``best.pt`` holds the best epoch's checkpoint (:mod:`.checkpoint`).
Checkpoints (``<out>/checkpoint.pt``, each epoch and on Ctrl-C, via a temp file + ``os.replace``) hold
the model (queues, key encoder), optimizer, scheduler, step counters and every rank's torch/numpy/python
RNG states: ``resume=True`` continues bit-exactly, also mid-epoch. A method's epoch hooks
(``methods/base.py``) run at each epoch's start (under a forked RNG, with the epoch's first batches at
hand) and end (before the scheduler steps). Under ``torchrun``: DDP. The output
directory, its lock, the checkpoint's digest and the metrics file: see :mod:`.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .backbones import create_backbone
from .checkpoint import (BEST, CHECKPOINT, CONFIG_JSON, CheckpointError, OutputDir,  # noqa: F401
                         check_resume_config, copy_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state, write_json, write_metrics)  # (CheckpointError: re-exported)
from .data import BUILTIN_MEAN, BUILTIN_STD, builtin, image_folder, make_views, ood_folder
from .methods import REGISTRY as METHOD_REGISTRY
from .model import ConceptTuner
from .ood import OOD_JSON, ShiftSpec, evaluate_shifted, metric_row, summary_line
from .report import TensorBoardScalars, startup_summary
from .runtime import resolve_threads, resolve_workers

# fields that must match when resuming (the rest, e.g. epochs or progress, may change)
_RESUME_KEYS = ("model", "data", "method", "patch_mode", "image_size", "batch_size", "seed", "shots_per_class",
                "num_patches", "num_confusing", "queue_len", "iters_per_epoch", "key_momentum", "temperature",
                "sinkhorn_stop")  # + the method's own options (Method.config_fields)
# the published recipe: m = 0.999 over 40 epochs x 500 steps, so the EMA's time constant 1/(1-m) is 5% of the run
PUBLISHED_KEY_LAG = (1 / (1 - 0.999)) / (40 * 500)
KEY_MOMENTUM_RANGE = (0.5, 0.9999)


def resolve_key_momentum(value: float | str, total_steps: int) -> float:
    """The key encoder's EMA momentum m for a run of ``total_steps`` optimizer steps.

    A number in [0, 1] is used as given. ``"auto"`` keeps the published lag as a fraction of training:
    the EMA's time constant 1/(1-m) steps is 5% of the run as in the published recipe (m = 0.999 over
    20,000 steps), i.e. m = 1 - 1 / (0.05 * total_steps) = 1 - 20 / total_steps, clamped to
    [0.5, 0.9999] (20,000 steps -> 0.999; 400 -> 0.95; 40 or fewer -> 0.5).
    """
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            m = 1.0 - 1.0 / (PUBLISHED_KEY_LAG * max(total_steps, 1))
            return min(max(m, KEY_MOMENTUM_RANGE[0]), KEY_MOMENTUM_RANGE[1])
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"key_momentum must be a number in [0, 1] or 'auto', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"key_momentum must be a number in [0, 1] or 'auto', got {value!r}")
    return float(value)


def backbone_lr_mult(cfg: Config) -> float:
    """The backbone's lr / lr: ``cfg.backbone_lr_mult``, else as published (0.1; 1.0 with the cosine option)."""
    if cfg.backbone_lr_mult is not None:
        return cfg.backbone_lr_mult
    return 1.0 if cfg.schedule == "cos" else 0.1


def _doc(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Config:
    """A run's settings; each field is a flag of ``python -m concept_kernels.train``."""
    model: str = _doc("tf_efficientnet_lite0", "timm model name (needs a 4-D feature map)")
    pretrained: bool = _doc(True, "ImageNet weights (offline for (tf_)efficientnet_lite0/1/2)")
    data: str | None = _doc(None, "ImageFolder root with train/ and val/, or a built-in offline task: "
                                  "builtin:digits (sklearn digits, the default) or builtin:animals (animal-mnist)")
    shots_per_class: int | None = _doc(None, "training images per class (<=0: all; default: 10 for the built-in "
                                             "few-shot tasks, all for an ImageFolder)")
    image_size: int = 96
    method: str = "concept"
    patch_mode: str = "image"
    epochs: int = 10
    batch_size: int = 32
    iters_per_epoch: int = _doc(0, "0: one pass over the training set")  # (drop_last)
    lr: float = _doc(0.01, "learning rate of the heads (and the backbone x --backbone-lr-mult)")
    backbone_lr_mult: float | None = _doc(None, "backbone lr / lr (default as published, method_spec §6: 0.1 "
                                                "with --schedule multistep, 1.0 with cos)")
    schedule: str = _doc("multistep", "multistep (MultiStepLR at --milestones) or cos (CosineAnnealingLR over "
                                      "the epochs), stepped per epoch")
    milestones: tuple[int, ...] = _doc((12, 24), "multistep epochs (x0.1 each)")
    momentum: float = _doc(0.9, "SGD momentum (the key encoder's EMA momentum is --key-momentum)")
    weight_decay: float = 5e-4
    nesterov: bool = True
    seed: int = 0
    amp: bool = _doc(False, "bfloat16 autocast (GPU only)")
    out: str = _doc("runs/concept", "output dir (metrics.jsonl, checkpoint.pt)")
    resume: bool = _doc(False, "continue from <out>/checkpoint.pt")
    overwrite: bool = _doc(False, "allow a non-empty output dir without --resume")
    num_patches: int = 9
    num_confusing: int | None = _doc(None, "N_conf (default min(100, classes-1))")
    queue_len: int = 40
    key_momentum: float | str = _doc(0.999, "EMA momentum m of the key encoder (published 0.999, made for ~20,000 "
                                            "steps); 'auto': m from the run's length, see resolve_key_momentum")
    temperature: float = _doc(0.07, "contrastive temperature T (published 0.07)")
    sinkhorn_stop: str = _doc("published", "published: one mean Sinkhorn error per call, as published; problem: "
                                           "each OT problem stops on its own (faster, NOT equivalent)")
    patch_pixels: int | None = _doc(None, "image-mode crop side (default 2x stride: exact crops)")
    train_blocks: tuple[str, ...] = _doc((), "surgical: backbone prefixes, e.g. blocks.0,blocks.1")
    w_img: float = 1.0
    w_con: float = 1.0
    w_ce_ib: float = 1.0
    w_kl: float = 5e-3
    l2sp_alpha: float = _doc(0.01, "l2sp: weight a of a/2 ||w - w0||^2 over the backbone (w0: pretrained)")
    l2sp_beta: float = _doc(0.01, "l2sp: weight b of b/2 ||w_head||^2 (l2sp runs without weight decay)")
    bss_eta: float = _doc(1e-3, "bss: weight of the k smallest squared singular values of the batch features")
    bss_k: int = _doc(1, "bss: how many of the smallest singular values are shrunk")
    stochnorm_p: float = _doc(0.5, "stochnorm: probability that a BN channel uses batch (not moving) statistics")
    wise_alphas: tuple[float, ...] = _doc((0.0, 0.25, 0.5, 0.75, 1.0), "wiseft: interpolation weights evaluated "
                                          "at the end (<out>/wise_ft.json)")
    wise_probe_l2: float = _doc(1e-3, "wiseft: L2 weight of the linear probe that gives theta_0's head")
    # counterfactual
    cf_weight: float = _doc(30.0, "counterfactual: weight of the MSE of the features on the masked-and-refilled "
                                  "images to the frozen pretrained backbone's (published 30)")
    cf_threshold: float = _doc(0.3, "counterfactual: a patch is class-relevant when its CAM (max-normalised) >= this, "
                                    "in (0, 1]")
    cf_region: str = _doc("object", "counterfactual: patches to mask: object (CAM >= threshold), context (the "
                                    "others) or either (a coin per image)")
    cf_fill: str = _doc("single", "counterfactual: refill from one other image per image (single) or another "
                                  "image per patch (multi)")
    cf_grid: int = _doc(7, "counterfactual: patches per image side (published 7: ViT-B/32 at 224 px)")
    cf_teacher_bn: str = _doc("batch", "counterfactual: the frozen teacher's batch norms use the counterfactual "
                                       "batch's statistics (batch: equal to the student at the start) or its "
                                       "pretrained running ones (running)")
    # levi
    levi_layers: tuple[str, ...] = _doc((), "levi: backbone modules ensembled with the small CNN's stages, e.g. "
                                            "blocks.2,blocks.4,blocks.6 (default: the last 3 of timm's feature_info)")
    levi_width: int = _doc(32, "levi: channels of the small CNN's first stage (doubling per stage)")
    # feature_distill, l1sp, aft (the frozen pretrained backbone as anchor or teacher)
    feature_distill_weight: float = _doc(1.0, "feature_distill: weight of the MSE between the pooled features and "
                                              "those of the frozen pretrained backbone")
    l1sp_alpha: float = _doc(1e-4, "l1sp: weight a of a ||w - w0||_1 over the backbone (w0: pretrained)")
    l1sp_beta: float = _doc(0.01, "l1sp: weight b of b/2 ||w_head||^2 (l1sp runs without weight decay)")
    aft_beta: float = _doc(10.0, "aft: weight of the RMSE between the batch kernels of the features and of the "
                                 "frozen pretrained features x sigmoid(s) (s learned at --lr)")
    # surgical (by name)
    surgical_block: str | None = _doc(None, "surgical: first|middle|last (input-/feature-/output-level shifts) = "
                                            "the backbone's stem + first stage / middle stage / last stage "
                                            "(default: none, --train-blocks gives the prefixes)")
    # autorgn
    rgn_batches: int = _doc(2, "autorgn: training batches on which each epoch's gradient norms are measured")
    # lpft
    lpft_probe_epochs: int = _doc(5, "lpft: epochs of linear probing (frozen backbone) before fine-tuning all")
    lpft_ft_lr_mult: float = _doc(0.1, "lpft: after the probe, every group's lr x this (published style: "
                                       "fine-tune at a smaller lr)")
    # delta
    delta_alpha: float = _doc(0.01, "delta: weight a of the attention-weighted feature-map distance to the frozen "
                                    "pretrained backbone (delta runs without weight decay)")
    delta_beta: float = _doc(0.01, "delta: weight b of b/2 ||w_head||^2")
    delta_layers: tuple[str, ...] = _doc((), "delta: backbone modules whose outputs are regularised, e.g. "
                                             "layer1,layer2 (default: the timm model's feature_info stages)")
    delta_attention_images: int = _doc(128, "delta: training images on which each channel is zeroed to measure "
                                            "its attention, once before training (0: all; cached in --out)")
    # cotuning
    cotuning_lambda: float = _doc(2.3, "cotuning: weight of the soft CE of the kept source (ImageNet) head to "
                                       "p(y_s | y_t) (needs a pretrained backbone with its classifier)")
    bn_momentum: float | None = _doc(0.1, "backbone BN momentum (<0: keep the model's)")  # None: keep it
    test_limit: int = _doc(0, "evaluate on the first N test images (0: all)")
    ood_corruptions: str = _doc("all", "shifted (OOD) test sets: corruptions of the test images, comma-separated "
                                       "from gaussian_noise, blur, contrast, affine; 'all' or 'none'. Evaluated "
                                       "on the final model (<out>/ood.json, ood_* metrics); an ImageFolder's ood/ "
                                       "folder, when present, is one more shifted set")
    ood_severities: tuple[int, ...] = _doc((3,), "corruption severities, 1..5 (CIFAR-10-C's scale)")
    ood_limit: int = _doc(200, "test images per shifted set, evenly spaced over the test split (0: all)")
    ood_every_epoch: bool = _doc(False, "evaluate the shifted sets after every epoch, not only the last")
    min_crop: float | None = _doc(None, "min crop area of views 0/1 (default 0.2; built-in tasks 0.6)")
    hflip: bool | None = _doc(None, "default: off for digits, on otherwise")
    progress: bool = True
    cache_dir: str | None = None
    # how the process uses the machine (concept_kernels/train/runtime.py); not part of the run's identity
    threads: int | None = _doc(None, "torch threads per process; 0: auto (the physical cores of this process's "
                                     "CPU affinity per local rank, 1 when the machine is busy: 1-min load >= CPUs); "
                                     "None: leave as set (the library default; the CLI's is 0)")
    workers: int | None = _doc(None, "DataLoader workers decoding ImageFolder images (default: auto, 0 on a busy "
                                     "machine; built-in tasks are in-memory tensors and take none)")


DEFAULT_BUILTIN_SHOTS = 10


class History(list):
    """``run``'s per-epoch metric rows; ``interrupted`` is True when Ctrl-C stopped the run (after saving)."""

    interrupted: bool = False


def resolve_shots(cfg: Config) -> tuple[int, str]:
    """(training images per class, 0 = all; how that was chosen) for ``cfg``: ``cfg.shots_per_class`` when
    given, else 10 for a built-in task (few-shot benchmarks) and all images of an ImageFolder."""
    n = cfg.shots_per_class
    if n is not None:
        return n, (f"all: --shots-per-class {n}" if n <= 0 else f"{n} per class: --shots-per-class {n}")
    if builtin_task(cfg) is not None:
        return DEFAULT_BUILTIN_SHOTS, (f"{DEFAULT_BUILTIN_SHOTS} per class: the built-in tasks' few-shot default; "
                                       "--shots-per-class 0 for all")
    return 0, "all: the default for an ImageFolder; --shots-per-class N for N per class"


def _setup_distributed() -> tuple[int, int, torch.device]:
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def builtin_task(cfg: Config) -> str | None:
    """The built-in task ``cfg.data`` names ("digits" when None), or None for an ImageFolder path."""
    if cfg.data is None:
        return "digits"
    return cfg.data.removeprefix("builtin:") if cfg.data.startswith("builtin:") else None


def normalization(cfg: Config, backbone: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that map ``cfg``'s data pixels in [0, 1] to the model's input: 0.5/0.5 for
    a built-in task, ``backbone``'s pretrained mean/std (default ImageNet's) for an ImageFolder."""
    if builtin_task(cfg) is not None:
        return (BUILTIN_MEAN,) * 3, (BUILTIN_STD,) * 3
    dc = getattr(backbone, "pretrained_cfg", {}) or {}
    return tuple(dc.get("mean", (0.485, 0.456, 0.406))), tuple(dc.get("std", (0.229, 0.224, 0.225)))


def build_data(cfg: Config, backbone: torch.nn.Module):
    """(train_set, test_set, class names) for ``cfg`` (shots: :func:`resolve_shots`; ``test_limit`` applied);
    normalised per :func:`normalization`."""
    task, shots = builtin_task(cfg), resolve_shots(cfg)[0]
    if task is not None:
        train_set, test_set, names = builtin(task, cfg.image_size, shots, cfg.seed)
    else:
        train_set, test_set, names = image_folder(cfg.data, cfg.image_size, *normalization(cfg, backbone), shots,
                                                  cfg.seed)
    if 0 < cfg.test_limit < len(test_set):
        test_set = torch.utils.data.Subset(test_set, range(cfg.test_limit))
    return train_set, test_set, names


def shift_spec(cfg: Config) -> ShiftSpec:
    """The shifted test sets ``cfg`` asks for (ValueError for unknown corruptions or severities)."""
    return ShiftSpec.parse(cfg.ood_corruptions, cfg.ood_severities, cfg.ood_limit)


def shifted_evaluator(cfg: Config, backbone: torch.nn.Module, names: list[str], device: torch.device,
                      spec: ShiftSpec | None = None, workers: int = 0) -> Callable | None:
    """``f(model, test_set) -> ood result`` (:func:`.ood.evaluate_shifted`) for ``cfg``'s shifted sets, with
    its ImageFolder's ``ood/`` folder when present; None when ``cfg`` asks for no shifted set."""
    spec = spec or shift_spec(cfg)
    folder = None
    if builtin_task(cfg) is None and spec.folder:
        folder = ood_folder(cfg.data, cfg.image_size, *normalization(cfg, backbone), names)
    if not spec.corruptions and folder is None:
        return None
    mean, std = normalization(cfg, backbone)
    return lambda model, test_set: evaluate_shifted(model, test_set, spec, mean, std, device, folder=folder,
                                                    workers=workers)


def build_model(cfg: Config, backbone: torch.nn.Module, num_classes: int, device: torch.device) -> ConceptTuner:
    """The :class:`ConceptTuner` that ``cfg`` describes, on ``backbone``, with ``num_classes`` classes."""
    kw = {k: getattr(cfg, k) for k in ("method", "patch_mode", "num_patches", "num_confusing", "queue_len",
                                       "patch_pixels", "w_img", "w_con", "w_ce_ib", "w_kl", "train_blocks",
                                       "temperature", "sinkhorn_stop")}
    options = METHOD_REGISTRY[cfg.method].options_from(cfg) if cfg.method in METHOD_REGISTRY else {}
    return ConceptTuner(backbone, num_classes, (cfg.image_size,) * 2, bn_momentum=cfg.bn_momentum,
                        method_options=options, **kw).to(device)


def build(cfg: Config, device: torch.device):
    """(model, train_set, test_set, class names) for ``cfg``."""
    backbone = create_backbone(cfg.model, cfg.pretrained, cfg.cache_dir)
    train_set, test_set, names = build_data(cfg, backbone)
    return build_model(cfg, backbone, len(names), device), train_set, test_set, names


def batches(ds, index_lists: list[list[int]], workers: int = 0):
    """(x (B, 3, H, W), y (B,)) for each list of positions in ``ds``: in-memory tensors are indexed at
    once; other datasets (image files) load through a DataLoader with ``workers`` processes. The
    DataLoader gets its own generator, so the global torch RNG (augmentation) is not drawn from."""
    if isinstance(ds, torch.utils.data.TensorDataset):
        for idx in index_lists:
            yield ds[torch.tensor(idx, dtype=torch.long)]
        return
    yield from torch.utils.data.DataLoader(ds, batch_sampler=index_lists, num_workers=workers,
                                           generator=torch.Generator(), worker_init_fn=_ignore_sigint)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C (sent to the whole process group) to the main process, which
    finishes its step and saves; a worker that died of it would break that step's next batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@torch.no_grad()
def evaluate(model: ConceptTuner, ds, device: torch.device, batch_size: int = 100,
             workers: int = 0) -> dict[str, float]:
    """Top-1 of the main head and (concept) of the IB head on ``ds``; "acc" = max of the two (§6)."""
    model.eval()
    hits: dict[str, int] = {}
    chunks = [list(range(s, min(len(ds), s + batch_size))) for s in range(0, len(ds), batch_size)]
    for x, y in batches(ds, chunks, workers):
        for k, v in model.predict(x.to(device)).items():
            hits[k] = hits.get(k, 0) + int((v.argmax(1).cpu() == y).sum())
    model.train()
    acc = {f"acc_{k}": v / len(ds) for k, v in hits.items()}
    return {**acc, "acc": max(acc.values())}


def run(cfg: Config, on_step: Callable[[int, ConceptTuner], None] | None = None) -> list[dict]:
    """Train per ``cfg``; returns the per-epoch metric rows (also in <out>/metrics.jsonl, which is
    rewritten from the checkpoint's history at each save).

    ``on_step(global_step, model)`` is called after each completed step (tests use it). Ctrl-C (SIGINT)
    finishes the current step, saves a checkpoint and returns; a second Ctrl-C aborts at once. Rank 0
    locks the output directory for the whole run (:class:`.checkpoint.OutputDir`).
    """
    rank = _setup_distributed()[0]
    threads_before = torch.get_num_threads()
    try:
        with OutputDir(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite, enabled=rank == 0):
            return _run(cfg, on_step)
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _run(cfg: Config, on_step: Callable[[int, ConceptTuner], None] | None) -> History:
    rank, world, device = _setup_distributed()
    if cfg.amp and device.type != "cuda":
        raise ValueError("--amp uses CUDA autocast (bfloat16) and needs a GPU; this run is on the CPU")
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    threads = resolve_threads(cfg.threads, local_ranks)
    workers = resolve_workers(cfg.workers, builtin_task(cfg) is None, local_ranks)
    torch.set_num_threads(threads[0])
    shots, shots_note = resolve_shots(cfg)
    spec = shift_spec(cfg)  # (bad corruption names fail before anything is built)
    # the resolved values are the run's record (config.json, the checkpoint, resume checks)
    cfg = dataclasses.replace(cfg, shots_per_class=shots, threads=threads[0], workers=workers[0])
    out, ckpt_path = Path(cfg.out), Path(cfg.out) / CHECKPOINT
    conf = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    if cfg.resume and not ckpt_path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None:
        method_keys = tuple(getattr(METHOD_REGISTRY.get(cfg.method), "config_fields", {}).values())
        check_resume_config(ckpt_path, ckpt["config"], conf, _RESUME_KEYS + method_keys)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model, train_set, test_set, names = build(cfg, device)
    evaluate_ood = shifted_evaluator(cfg, model.backbone, names, device, spec, workers[0])
    task = builtin_task(cfg)
    hflip = task != "digits" if cfg.hflip is None else cfg.hflip  # flips change digits
    min_crop = cfg.min_crop or (0.2 if task is None else 0.6)  # 20% crops of a 8x8 / 28x28 image are strokes
    if cfg.schedule not in ("multistep", "cos"):
        raise ValueError(f"schedule must be 'multistep' or 'cos', got {cfg.schedule!r}")
    opt = torch.optim.SGD(model.param_groups(cfg.lr, backbone_lr_mult(cfg)), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs) if cfg.schedule == "cos"
             else torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), gamma=0.1))
    state, history = dict(epoch=0, step_in_epoch=0, global_step=0), History()
    model.prepare(train_set, out)  # the method's once-per-run preparation (e.g. cached statistics)
    torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank augmentation stream
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state, history = dict(ckpt["state"]), History(ckpt["history"])
        set_rng_state(ckpt["rng"][rank])
        if rank == 0:
            write_metrics(out, history)  # drops rows a failed save may have left after the checkpoint's
    # queues stay equal through the all-gather in step(); BN buffers stay per rank (rank 0's are saved)
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    per_step = cfg.batch_size * world
    steps = cfg.iters_per_epoch or len(train_set) // per_step
    if steps < 1:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch "
                         f"({cfg.batch_size} x {world} ranks)")
    model.momentum = resolve_key_momentum(cfg.key_momentum, steps * cfg.epochs)
    if rank == 0 and model.method in ("concept", "bituning"):
        lag = 1.0 / max(1.0 - model.momentum, 1e-12) / (steps * cfg.epochs)
        print(f"key encoder: EMA momentum {model.momentum:.4g} ({cfg.key_momentum} given; time constant "
              f"{lag:.0%} of the {steps * cfg.epochs} steps, published 5%)"
              + ("; --key-momentum auto keeps the published lag" if lag > 0.25 else ""), flush=True)
    interrupts = []

    def on_sigint(signum, frame):
        interrupts.append(signum)
        if len(interrupts) > 1:
            raise KeyboardInterrupt
        if rank == 0:
            print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)", flush=True)

    def save(best: bool = False) -> None:
        """The checkpoint (and, for a best epoch, best.pt first: a crash in between redoes the epoch
        bit-exactly on resume, which rewrites best.pt), then the metrics files."""
        rngs = [rng_state()] * world
        if world > 1:
            dist.all_gather_object(rngs, rngs[rank])
        if rank == 0:
            payload = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                           state=dict(state), history=list(history), rng=rngs, config=conf)
            if best:
                save_checkpoint(out / BEST, payload)
                copy_checkpoint(out / BEST, ckpt_path)
            else:
                save_checkpoint(ckpt_path, payload)
            write_metrics(out, history)  # after the checkpoint: never an epoch it does not hold

    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    tensorboard = TensorBoardScalars(out, enabled=rank == 0)
    try:
        from tqdm.auto import tqdm

        if rank == 0:  # (after the Ctrl-C handler: from here on Ctrl-C saves)
            print(startup_summary(cfg, data=cfg.data or "builtin:digits", shots_note=shots_note,
                                  n_train=len(train_set), n_test=len(test_set), classes=len(names), model=model,
                                  device=device, world=world, threads=threads, workers=workers, steps=steps,
                                  backbone_mult=backbone_lr_mult(cfg), tensorboard_note=tensorboard.note,
                                  optimizer=opt), flush=True)
            write_json(out / CONFIG_JSON, conf)
        best_acc = max((r["acc"] for r in history if "acc" in r), default=float("-inf"))

        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            reps = -(-steps * per_step // len(train_set))
            order = torch.cat([torch.randperm(len(train_set), generator=g) for _ in range(reps)])
            model.train()
            epoch_batches = [order[(s * world + rank) * cfg.batch_size:][:cfg.batch_size].tolist()
                             for s in range(steps)]  # this rank's

            def sample(n: int, index_lists=epoch_batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
                """The epoch's first n batches as training sees them (for a method's measurements)."""
                return [(make_views(x.to(device), cfg.image_size, model.num_views, hflip, min_crop), y.to(device))
                        for x, y in batches(train_set, index_lists[:n], workers[0])]

            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # RNG streams untouched
                model.on_epoch_start(epoch, opt, sample)
            sums: dict[str, float] = state.pop("sums", None) or {"n": 0.0}  # running means survive a resume
            t0, start = time.perf_counter(), state["step_in_epoch"]
            train_batches = batches(train_set, epoch_batches[start:], workers[0])
            bar = tqdm(total=steps, initial=state["step_in_epoch"], desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and rank == 0), leave=False)
            while state["step_in_epoch"] < steps and not interrupts:
                s = state["step_in_epoch"]
                x, y = (t.to(device) for t in next(train_batches))
                views = make_views(x, cfg.image_size, model.num_views, hflip, min_crop)
                with torch.autocast("cuda", torch.bfloat16, enabled=cfg.amp):
                    res = net(views, y)
                opt.zero_grad(set_to_none=True)
                res["loss"].backward()
                opt.step()
                state["step_in_epoch"] += 1
                state["global_step"] += 1
                sums["n"] += 1
                res["acc"] = (res["logits"].argmax(1) == y).float().mean()
                parts = dict.fromkeys(("loss", "ce", "img", "con", "ce_ib", "kl", "acc", *res))  # + the method's
                for k in (k for k in parts if k != "logits"):
                    sums[k] = sums.get(k, 0.0) + float(res[k].detach())
                bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}", acc=f"{sums['acc'] / sums['n']:.3f}",
                                img_s=f"{(s + 1 - start) * per_step / (time.perf_counter() - t0):.1f}")
                bar.update()
                if on_step is not None:
                    on_step(state["global_step"], model)
            bar.close()
            train_batches.close()  # (stops DataLoader workers)
            if interrupts:
                state["sums"] = sums
                save()
                if rank == 0:
                    print(f"saved {ckpt_path} at epoch {epoch + 1}, step {state['step_in_epoch']}/{steps}; "
                          "continue with --resume")
                history.interrupted = True
                return history
            secs, done = time.perf_counter() - t0, state["step_in_epoch"] - start
            model.on_epoch_end(epoch, opt)
            with warnings.catch_warnings():  # resumed right at an epoch end: no optimizer.step() yet here
                warnings.simplefilter("ignore", UserWarning)
                sched.step()
            row = dict(epoch=epoch + 1, step=state["global_step"],
                       **{f"train_{k}": v / sums["n"] for k, v in sums.items() if k != "n"},
                       sec_per_step=secs / max(done, 1), img_per_sec=done * per_step / secs,
                       lr=opt.param_groups[-1]["lr"])
            if rank == 0:
                row.update(evaluate(model, test_set, device, workers=workers[0]))
                ib = f" / IB {row['acc_ib']:.3f}" if "acc_ib" in row else ""
                print(f"[{cfg.method}] epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.3f}, train acc "
                      f"{row['train_acc']:.3f}, test acc main {row['acc_main']:.3f}{ib}, "
                      f"{row['sec_per_step']:.2f} s/step, {row['img_per_sec']:.1f} img/s", flush=True)
                if evaluate_ood is not None and (epoch + 1 == cfg.epochs or cfg.ood_every_epoch):
                    ood = evaluate_ood(model, test_set)
                    row.update(metric_row(ood))
                    if epoch + 1 == cfg.epochs:
                        id_acc = {k[4:]: v for k, v in row.items() if k.startswith("acc_")}
                        write_json(out / OOD_JSON, dict(epoch=epoch + 1, id=id_acc, **ood))
                        print(f"[{cfg.method}] final model: {summary_line(ood, id_acc)}; {out / OOD_JSON}", flush=True)
            history.append(row)
            state.update(epoch=epoch + 1, step_in_epoch=0)
            improved = rank == 0 and row["acc"] > best_acc
            best_acc = max(best_acc, row.get("acc", best_acc))
            save(best=improved)
            if rank == 0:
                tensorboard.log(row)
        if rank == 0 and (extra := model.finish(lambda m: evaluate(m, test_set, device, workers=workers[0]), out)):
            print(f"[{cfg.method}] end of run: {extra}", flush=True)
    finally:
        tensorboard.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    return history
