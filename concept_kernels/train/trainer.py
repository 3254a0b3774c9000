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
from .config import (KEY_MOMENTUM_RANGE, PUBLISHED_KEY_LAG, Config, backbone_lr_mult,  # noqa: F401
                     resolve_key_momentum)  # (re-exported: trainer.Config etc.)
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
