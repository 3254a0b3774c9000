"""What a training run tells its user: the start-up summary (printed once, rank 0) and the optional
TensorBoard scalars (``<out>/tensorboard``, when the ``tensorboard`` package is importable)."""
from __future__ import annotations

from pathlib import Path

import torch


def method_settings(cfg, model) -> str:
    """The method and the settings that define it, e.g. ``concept (P=9 patches, N_conf=9, ...)``."""
    parts = []
    if model.method == "concept":
        w = model.weights
        parts += [f"P={model.num_patches} patches ({cfg.patch_mode} mode, {model.patch_pixels} px crops)",
                  f"N_conf={model.num_confusing}", f"sinkhorn stop {model.sinkhorn_stop}",
                  f"loss weights img {w['img']:g} con {w['con']:g} ce_ib {w['ce_ib']:g} kl {w['kl']:g}"]
    if model.method in ("concept", "bituning"):
        parts += [f"K={cfg.queue_len} queue", f"key momentum {model.momentum:.4g} ({cfg.key_momentum} given)",
                  f"T={model.temperature:g}"]
    if model.method == "surgical":
        named = f"{cfg.surgical_block} block = " if cfg.surgical_block else ""
        parts.append(f"train {named}{','.join(model.train_blocks)}")
    if model.method == "lpft":
        probe = (f"L-BFGS probe (l2 {cfg.lpft_probe_l2:g})" if cfg.lpft_probe == "lbfgs" else "")
        probe += (" + " if probe and cfg.lpft_probe_epochs else "") + (
            f"SGD probe for {cfg.lpft_probe_epochs} epochs" if cfg.lpft_probe_epochs else "")
        parts.append(f"{probe}, then all at lr x{cfg.lpft_ft_lr_mult:g} "
                     f"(batch norms {cfg.lpft_ft_bn})"
                     + (f"; this run's {cfg.epochs} epochs all probe" if cfg.epochs <= cfg.lpft_probe_epochs else ""))
    if model.method == "autorgn":
        parts.append(f"backbone tensor lrs by relative gradient norm, measured on {cfg.rgn_batches} batches/epoch")
    if model.method == "linear":
        parts.append("frozen backbone")
    return f"{model.method} ({', '.join(parts)})" if parts else model.method


def weight_decay_note(cfg, optimizer: torch.optim.Optimizer | None) -> str:
    """``weight decay 0.0005``, or per group where the method's groups differ from ``cfg.weight_decay``
    (e.g. ``weight decay 0 (backbone), 0 (heads): set by the method; --weight-decay 0.0005 unused``)."""
    groups = optimizer.param_groups if optimizer is not None else []
    used = [(g.get("name", f"group {i}"), g["weight_decay"]) for i, g in enumerate(groups)]
    if all(wd == cfg.weight_decay for _, wd in used):
        return f"weight decay {cfg.weight_decay:g}"
    per_group = ", ".join(f"{wd:g} ({name})" for name, wd in used)
    return f"weight decay {per_group}: set by the method (--weight-decay {cfg.weight_decay:g})"


def ood_settings(cfg) -> str:
    """The shifted (OOD) test sets of ``cfg`` in words."""
    from .corruptions import parse_corruptions

    names = parse_corruptions(cfg.ood_corruptions)
    when = "after every epoch" if cfg.ood_every_epoch else "on the final model"
    sets = (f"{', '.join(names)} at severity {','.join(map(str, cfg.ood_severities))}" if names
            else "no corruptions (--ood-corruptions none)")
    folder = "" if cfg.data is None or cfg.data.startswith("builtin:") else ", and the ImageFolder's ood/ if present"
    limit = f"up to {cfg.ood_limit}" if cfg.ood_limit > 0 else "all"
    return f"{sets}{folder}; {limit} test images each, {when}"


def startup_summary(cfg, *, data: str, shots_note: str, n_train: int, n_test: int, classes: int, model,
                    device: torch.device, world: int, threads: tuple[int, str], workers: tuple[int, str],
                    steps: int, backbone_mult: float, tensorboard_note: str,
                    optimizer: torch.optim.Optimizer | None = None) -> str:
    """The lines printed once at start-up: data, model, parameters, method, optimizer, device, threads,
    steps and outputs. The weight decay shown is the one ``optimizer``'s groups use (a method may override
    ``cfg.weight_decay``, e.g. L2-SP runs without it)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    limit = f" (the first {n_test}: --test-limit)" if cfg.test_limit > 0 else ""
    sched = (f"multistep x0.1 at epochs {','.join(map(str, cfg.milestones))}" if cfg.schedule == "multistep"
             else "cosine over the epochs")
    lines = [
        f"data: {data}: {n_train} training images ({shots_note}), {n_test} test images{limit}, {classes} classes",
        f"model: {cfg.model} ({'pretrained' if cfg.pretrained else 'random init'}), {cfg.image_size} px inputs, "
        f"feature map {model.feature_size[0]}x{model.feature_size[1]}",
        f"parameters: {total:,} total, {trainable:,} trainable",
        f"method: {method_settings(cfg, model)}",
        f"optimizer: SGD lr {cfg.lr:g} (backbone x{backbone_mult:g}), momentum {cfg.momentum:g}"
        f"{' nesterov' if cfg.nesterov else ''}, {weight_decay_note(cfg, optimizer)}, {sched}",
        f"device: {device}{f' x {world} ranks' if world > 1 else ''}; torch threads: {threads[0]} ({threads[1]}); "
        f"data workers: {workers[0]} ({workers[1]})",
        f"steps: {steps} per epoch x {cfg.epochs} epochs = {steps * cfg.epochs} (batch {cfg.batch_size}"
        f"{f' x {world} ranks' if world > 1 else ''})",
        f"shifted test sets: {ood_settings(cfg)}",
        f"output: {cfg.out}/ (config.json, checkpoint.pt, best.pt, metrics.jsonl, metrics.csv, ood.json); "
        f"{tensorboard_note}",
    ]
    return "\n".join(lines)


class TensorBoardScalars:
    """Per-epoch metric rows as TensorBoard scalars under ``<out>/tensorboard`` (step = epoch), when
    ``torch.utils.tensorboard`` imports (it needs the ``tensorboard`` package); otherwise off, and
    ``note`` says so."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.writer, self.log_dir = None, Path(out) / "tensorboard"
        if not enabled:
            self.note = "TensorBoard: off on this rank"
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.note = "TensorBoard scalars: off (tensorboard is not installed: pip install tensorboard)"
            return
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.note = f"TensorBoard scalars in {self.log_dir}"

    def log(self, row: dict) -> None:
        """Every numeric entry of ``row`` but ``epoch``, at step ``row["epoch"]``."""
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
