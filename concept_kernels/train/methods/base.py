"""The method interface: what a fine-tuning method adds to ``ConceptTuner``'s plain classifier.

A method is a small class registered by name (:func:`register`). ``ConceptTuner(backbone, ..., method=name,
method_options={...})`` builds its backbone and new linear head, then calls the method's hooks:

* ``num_views(tuner)``: augmented views per step (view 0 feeds the main head);
* ``classify(tuner, x)``: the feature map f0 and the main logits of images x, used by the training step
  (on view 0, for the CE) and by ``predict`` (default: ``head(backbone features(x).mean((2, 3)))``; a method
  that changes the classifier itself, e.g. LEVI's ensemble, overrides it);
* ``build(tuner)``: once, after the head exists: add modules to the tuner (a frozen teacher, a key encoder,
  another head; they become state_dict entries under their attribute names), freeze parameters, swap layers;
* ``loss_terms(tuner, views, labels, f0, logits)``: each step, after the main head's CE on view 0: the
  method's extra loss parts (unweighted), combined as ``loss = ce + sum(weights[k] * part[k])``;
* ``weights()``: the weights of those parts (in the order they are added);
* ``heads(tuner)``: the modules trained at the full lr (default: the new head);
* ``param_groups(tuner, lr, backbone_mult)``: the optimizer's groups (default: trainable backbone
  parameters at lr * backbone_mult, heads at lr);
* ``train_mode(tuner, mode)``: after ``tuner.train(mode)`` (e.g. keep a frozen backbone in eval mode);
* ``predict_heads(tuner, f)``: extra evaluation heads on the feature map f (B, C, h, w);
* ``prepare(tuner, train_set, out_dir)``: once per training run, before the first step (e.g. statistics
  of the training set, cached under ``out_dir``);
* ``finish(tuner, evaluate, out_dir)``: when the run has trained all its epochs (e.g. a sweep of
  interpolated models), returning what it measured;
* ``on_epoch_start(tuner, epoch, optimizer, sample)``: at the start of every epoch (0-based ``epoch``), after
  ``tuner.train()``, and again when a run resumes mid-epoch: it must derive what it sets from ``epoch`` and
  from the (checkpointed) optimizer, so that a resumed run stays bit-exact (``lrs_scaled_for`` tells whether
  this epoch's lrs are already set). ``sample(n)`` returns the epoch's first n training batches of this rank
  as ``(views (V, B, 3, H, W), labels (B,))``, augmented as training does. The trainer runs the hook under
  ``torch.random.fork_rng``: whatever it draws (augmentation, dropout) leaves the run's RNG streams as they
  were. A hook that runs forwards in train mode restores the buffers it changes (BN statistics);
* ``on_epoch_end(tuner, epoch, optimizer)``: after the epoch's last step, before the lr scheduler steps
  (e.g. ``restore_scheduled_lrs``).

Per-epoch lrs: a method that scales the scheduler's lrs for one epoch calls ``scale_lrs`` in
``on_epoch_start`` and ``restore_scheduled_lrs`` in ``on_epoch_end``: the scheduler only ever sees (and steps)
its own lrs, so the schedule applies as usual: lr_i(epoch) = schedule(epoch) * base_lr_i * scale_i(epoch).

Hyper-parameters: ``options`` (name -> default) and ``config_fields`` (name -> the trainer's Config field,
i.e. its CLI flag); ``check()`` validates them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method=cls.name`` (CLI ``--method``)."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def create_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """The registered method ``name`` with ``options`` (unknown names: TypeError; bad values: ValueError)."""
    if name not in REGISTRY:
        raise ValueError(f"method must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name](**(options or {}))


def under(name: str, prefixes: Sequence[str]) -> bool:
    """Whether the parameter ``name`` is one of ``prefixes`` or lies under one (``blocks.1`` -> ``blocks.1.x``)."""
    return any(name == t or name.startswith(t + ".") for t in prefixes)


class Method:
    """Plain fine-tuning (cross-entropy on the new head); subclasses override the hooks they need."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    config_fields: ClassVar[dict[str, str]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"method {self.name!r} has no option(s) {unknown}; its options: {sorted(self.options)}")
        self.opts = {**self.options, **options}
        self.check()

    @classmethod
    def options_from(cls, cfg: Any) -> dict[str, Any]:
        """This method's options from a trainer Config (its ``config_fields``)."""
        return {opt: getattr(cfg, field) for opt, field in cls.config_fields.items()}

    def num_views(self, tuner) -> int:
        """Augmented views of each batch a step uses (view 0 feeds the main head)."""
        return 1

    def check(self) -> None:
        """Validate ``self.opts`` (ValueError naming the option)."""

    def classify(self, tuner, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) -> (f0 (B, C, h, w) the backbone's feature map, logits (B, Cls) of the main
        classifier); default: the new linear head on the average-pooled map."""
        f = tuner.features(tuner.backbone, x)
        return f, tuner.head(f.mean((2, 3)))

    def build(self, tuner: nn.Module) -> None:
        """Add modules / freeze parameters of ``tuner`` (its backbone and head exist)."""

    def weights(self) -> dict[str, float]:
        return {}

    def loss_terms(self, tuner, views, labels: torch.Tensor, f0: torch.Tensor,
                   logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def heads(self, tuner) -> list[nn.Module]:
        return [tuner.head]

    def param_groups(self, tuner, lr: float, backbone_mult: float) -> list[dict]:
        bb = [p for p in tuner.backbone.parameters() if p.requires_grad]
        heads = [p for m in self.heads(tuner) for p in m.parameters()]
        groups = [dict(params=bb, lr=lr * backbone_mult, name="backbone")] if bb else []
        return groups + [dict(params=heads, lr=lr, name="heads")]

    def train_mode(self, tuner, mode: bool) -> None:
        """Called after ``tuner.train(mode)``."""

    def predict_heads(self, tuner, f: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def prepare(self, tuner, train_set, out_dir) -> None:
        """Once per training run, before the first step."""

    def finish(self, tuner, evaluate, out_dir) -> dict:
        """When a run has trained all its epochs: further evaluations (``evaluate(model)`` -> accuracies);
        returns them ({} : none)."""
        return {}

    def on_epoch_start(self, tuner, epoch: int, optimizer: torch.optim.Optimizer,
                       sample: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """At the start of every epoch, also on a mid-epoch resume (see the module docstring)."""

    def on_epoch_end(self, tuner, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """After the epoch's last step, before the scheduler steps."""


def scale_lrs(optimizer: torch.optim.Optimizer, epoch: int, scales: Sequence[float]) -> None:
    """For ``epoch``: each group's lr = its scheduled lr * ``scales[i]`` (the scheduled lr kept in the group
    as ``scheduled_lr``, the epoch as ``scaled_epoch``; both are in the optimizer's state_dict)."""
    groups = optimizer.param_groups
    if len(scales) != len(groups):
        raise ValueError(f"scales must have one entry per param group ({len(groups)}), got {len(scales)}")
    for group, scale in zip(groups, scales):
        group["scheduled_lr"] = group["lr"]
        group["lr"] = group["lr"] * scale
        group["scaled_epoch"] = epoch


def lrs_scaled_for(optimizer: torch.optim.Optimizer, epoch: int) -> bool:
    """Whether ``scale_lrs`` already set this epoch's lrs (a run resumed mid-epoch)."""
    return all(g.get("scaled_epoch") == epoch for g in optimizer.param_groups)


def restore_scheduled_lrs(optimizer: torch.optim.Optimizer) -> None:
    """Undo ``scale_lrs``: each group's lr is its scheduled lr again (exactly: no division)."""
    for group in optimizer.param_groups:
        if "scheduled_lr" in group:
            group["lr"] = group.pop("scheduled_lr")
            group.pop("scaled_epoch", None)


def check_number(opts: dict, name: str, low: float, high: float = float("inf"), *, low_open: bool = False) -> None:
    """ValueError naming option ``name`` unless it is a real number in [low, high] ((low, high] if ``low_open``)."""
    v = opts[name]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and (v > low if low_open else v >= low) \
        and v <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {v!r}")
