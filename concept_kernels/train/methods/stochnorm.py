"""StochNorm (Kou et al. 2020): every batch norm of the backbone, in training, normalises each channel with
its moving (running) statistics or with the batch's, chosen per channel and step by a Bernoulli switch:

    s_c ~ Bernoulli(p),  y_c = s_c * BN_batch(x)_c + (1 - s_c) * BN_moving(x)_c    (default p = 0.5)

where BN_moving uses the running statistics as they were before this step, and the running statistics
are updated from the batch as usual. In eval mode it is the plain batch norm. The loss is CE only.

The swap changes only the modules' classes (their parameters and buffers, hence the state_dict, stay):
``torch.nn.BatchNorm2d`` and timm's ``BatchNormAct2d`` (the norm then its dropout and activation); any
other batch-norm class is refused with a ValueError."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, check_number, register


def stochastic_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode StochNorm of x (B, C, H, W) with ``bn``'s parameters; updates its running statistics
    and ``num_batches_tracked`` as ``bn.forward`` would; draws the C switches from the global torch RNG."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    factor = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()  # before the batch's update
    moving = F.batch_norm(x, mean0, var0, bn.weight, bn.bias, False, 0.0, bn.eps)
    batch = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, factor, bn.eps)
    use_batch = torch.bernoulli(torch.full((x.shape[1],), float(p), device=x.device)).bool()
    return torch.where(use_batch.view(1, -1, 1, 1), batch, moving)


class StochNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training forward is :func:`stochastic_batch_norm` (``stoch_p`` = p)."""

    stoch_p: float = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return stochastic_batch_norm(self, x, self.stoch_p)


@functools.cache
def _stochnorm_act_class():
    from ..._compat import import_timm

    BatchNormAct2d = import_timm().layers.BatchNormAct2d

    class StochNormAct2d(BatchNormAct2d):
        """timm's ``BatchNormAct2d`` (norm, dropout, activation) with the StochNorm training norm."""

        stoch_p: float = 0.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return super().forward(x)
            return self.act(self.drop(stochastic_batch_norm(self, x, self.stoch_p)))

    return BatchNormAct2d, StochNormAct2d


def to_stochnorm_(module: nn.Module, p: float) -> int:
    """Turn every batch norm under ``module`` into its StochNorm class, in place; returns how many."""
    classes = {nn.BatchNorm2d: StochNorm2d}
    count = 0
    for name, m in module.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or hasattr(m, "stoch_p"):  # (done already)
            continue
        if type(m) not in classes and type(m).__name__ == "BatchNormAct2d":
            plain, stoch = _stochnorm_act_class()
            classes[plain] = stoch
        if type(m) not in classes:
            raise ValueError(f"stochnorm: the backbone's {name!r} is a {type(m).__name__}; StochNorm supports "
                             "torch.nn.BatchNorm2d and timm's BatchNormAct2d")
        if not m.track_running_stats or m.running_mean is None:
            raise ValueError(f"stochnorm: the backbone's {name!r} keeps no running statistics")
        m.__class__ = classes[type(m)]
        m.stoch_p = float(p)
        count += 1
    return count


@register
class StochNorm(Method):
    name = "stochnorm"
    summary = "CE; each backbone BN channel uses batch (prob. p) or moving statistics in training"
    options = dict(p=0.5)
    config_fields = dict(p="stochnorm_p")

    def check(self) -> None:
        check_number(self.opts, "p", 0.0, 1.0)

    def build(self, tuner) -> None:
        if to_stochnorm_(tuner.backbone, self.opts["p"]) == 0:
            raise ValueError("stochnorm: the backbone has no batch norm to make stochastic")
