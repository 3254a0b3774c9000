"""Auto-RGN (Lee et al., ICLR 2023, surgical fine-tuning): per-tensor lrs from relative gradient norms.

At the start of every epoch, on the epoch's first ``batches`` training batches (at most its steps; augmented
as in training, model in train mode; BN statistics and the run's RNG streams left as they were):

    g_i = the mean over those batches of d loss / d theta_i   (for each trainable backbone tensor theta_i)
    r_i = ||g_i|| / ||theta_i||,      lr_i = lr * backbone_mult * r_i / max_j r_j   (x the schedule)

(float64 norms). The new head is not a pretrained layer: it keeps lr (x the schedule); a backbone tensor
with ||theta_i|| = 0 (e.g. a freshly initialised bias) has no relative norm: it keeps the full backbone
lr and takes no part in the max; if every r_i is 0, every such lr is 0. A NaN/inf gradient makes every
backbone lr NaN (it shows in the weights). Each backbone tensor is its own optimizer group; the scaling
is set for one epoch on top of the scheduler's lrs (``base.scale_lrs``), so the schedule applies as usual
and a resumed run (the scaling is in the checkpointed optimizer) is bit-exact. Under DDP the gradients are
averaged over the ranks, so every rank sets the same lrs."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .base import Method, lrs_scaled_for, register, restore_scheduled_lrs, scale_lrs

GROUP_PREFIX = "backbone:"


def mean_gradients(tuner, batches: list[tuple[torch.Tensor, torch.Tensor]],
                   params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over ``batches`` of d tuner.step(views, labels)["loss"] / d p for each of ``params``, averaged
    over DDP ranks; the model's buffers (BN statistics) and ``.grad`` are left as they were."""
    saved = [b.detach().clone() for b in tuner.buffers()]
    total = [torch.zeros_like(p) for p in params]
    for views, labels in batches:
        grads = torch.autograd.grad(tuner.step(views, labels)["loss"], params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g)
    with torch.no_grad():
        for b, s in zip(tuner.buffers(), saved):
            b.copy_(s)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for t in total:
        if world > 1:
            dist.all_reduce(t)
        t.div_(len(batches) * world)
    return total


def rgn_scales(grads: list[torch.Tensor], params: list[torch.Tensor]) -> list[float]:
    """r_i / max_j r_j with r_i = ||g_i|| / ||theta_i|| in float64 (1 where ||theta_i|| = 0; module docstring)."""
    g_norm = torch.stack([g.detach().double().norm() for g in grads])
    p_norm = torch.stack([p.detach().double().norm() for p in params])
    has_norm = p_norm > 0
    if not bool(torch.isfinite(g_norm).all()):
        return [float("nan")] * len(params)
    if not bool(has_norm.any()):
        return [1.0] * len(params)
    ratio = g_norm / torch.where(has_norm, p_norm, 1.0)
    top = ratio[has_norm].max()
    scaled = ratio / top if top != 0 else torch.zeros_like(ratio)
    return torch.where(has_norm, scaled, 1.0).tolist()


@register
class AutoRGN(Method):
    name = "autorgn"
    summary = "each epoch, backbone tensor lrs proportional to ||grad|| / ||weight|| (max 1x), on --rgn-batches"
    options = dict(batches=2)
    config_fields = dict(batches="rgn_batches")

    def check(self) -> None:
        n = self.opts["batches"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"rgn_batches must be an integer >= 1, got {n!r}")

    def param_groups(self, tuner, lr: float, backbone_mult: float) -> list[dict]:
        """One group per trainable backbone tensor (named ``backbone:<name>``) at lr*backbone_mult; heads at lr."""
        heads = [p for m in self.heads(tuner) for p in m.parameters()]
        return [dict(params=[p], lr=lr * backbone_mult, name=GROUP_PREFIX + n)
                for n, p in tuner.backbone.named_parameters() if p.requires_grad] + \
            [dict(params=heads, lr=lr, name="heads")]

    def on_epoch_start(self, tuner, epoch, optimizer, sample) -> None:
        if lrs_scaled_for(optimizer, epoch):
            return  # resumed mid-epoch: this epoch's lrs are in the checkpointed optimizer
        groups = [g for g in optimizer.param_groups if g.get("name", "").startswith(GROUP_PREFIX)]
        params = [g["params"][0] for g in groups]
        scales = dict(zip(map(id, groups), rgn_scales(mean_gradients(tuner, sample(self.opts["batches"]), params),
                                                      params)))
        scale_lrs(optimizer, epoch, [scales.get(id(g), 1.0) for g in optimizer.param_groups])

    def on_epoch_end(self, tuner, epoch, optimizer) -> None:
        restore_scheduled_lrs(optimizer)
