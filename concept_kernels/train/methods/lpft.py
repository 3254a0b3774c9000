"""LP-FT (Kumar et al., ICLR 2022): linear probing, then full fine-tuning from the probed head, in one run.

    probe (before the first step, ``probe="lbfgs"``, the default, as published: an L2-regularised logistic
        regression on the frozen pretrained features): the head = argmin mean CE(head(f), y) + probe_l2/2 ||W||^2
        over the training images' pooled features f (eval mode), full batch, L-BFGS (WiSE-FT's probe);
    stage 1, epochs 0 .. probe_epochs-1 (default 0 with "lbfgs"; >= 1 with ``probe="sgd"``, which skips the
        L-BFGS fit and probes with the trainer's SGD instead):  the backbone is frozen (parameters, and BN running statistics:
        it stays in eval mode); only the new head trains, at lr (x the schedule);
    stage 2, epochs probe_epochs .. end: everything trains from the probed head, every group at
        ft_lr_mult x its usual lr: the head at lr * ft_lr_mult, the backbone at lr * backbone_mult * ft_lr_mult
        (x the schedule, which runs over the whole run's epochs, not restarted at the boundary).

Batch norm: with ``ft_bn="frozen"`` (default) the backbone's BN layers stay in eval mode in stage 2 too
(running statistics fixed; their affine weights train), so fine-tuning starts from exactly the features the
probe was trained on. ``ft_bn="train"`` switches them to batch statistics at the boundary, as plain
fine-tuning does: then the probed head suddenly sees other features (tested: the first fine-tuning
forward differs from the probe's logits; with "frozen" it equals them bit for bit), which defeats LP-FT's
purpose of not distorting the pretrained features early. The paper's models
(CLIP/MoCo ResNets and ViTs fine-tuned with large batches) do not settle this; README "Where this departs"
names the choice.

Why L-BFGS by default: an SGD probe at the fine-tuning lr on unnormalised 1280-d features grows a head with
large weights (the loss reached 23 within 15 steps on digits, in one debug run), and its large logits send
large gradients into the backbone at the boundary: even at lr x 0.1 fine-tuning then collapsed to chance on
few-shot digits (`make accuracy`, seeds 0-1, either BN setting: test accuracy 0.75 after the probe,
0.13-0.35 at the end). The regularised, converged probe is what the paper fits.

Defaults: probe_l2 = 1e-3 (as WiSE-FT's), ft_lr_mult = 0.1: the paper fine-tunes
after the probe at a smaller lr than plain fine-tuning (its sweeps usually pick one ~10x smaller), so that
the good head is not destroyed by large early updates. The stage follows from the epoch number and the
stage-2 scaling lives in the optimizer's groups (``base.scale_lrs``), so a run resumed anywhere, across the
boundary too, is bit-exact. SGD skips the frozen backbone in stage 1 (no gradient: no step, no weight
decay, no momentum), so stage 2 starts with fresh momentum buffers for it. Not under DDP (the gradient
all-reduce is set up once, for the parameters trainable at the start)."""
from __future__ import annotations

import torch

from .base import Method, check_number, lrs_scaled_for, register, restore_scheduled_lrs, scale_lrs
from .wiseft import fit_linear_probe, pooled_features


FT_BN = ("frozen", "train")
PROBES = ("lbfgs", "sgd")


@register
class LPFT(Method):
    name = "lpft"
    summary = "linear probe for --lpft-probe-epochs, then fine-tune everything at lr x --lpft-ft-lr-mult"
    options = dict(probe="lbfgs", probe_epochs=0, probe_l2=1e-3, ft_lr_mult=0.1, ft_bn="frozen")
    config_fields = dict(probe="lpft_probe", probe_epochs="lpft_probe_epochs", probe_l2="lpft_probe_l2",
                         ft_lr_mult="lpft_ft_lr_mult", ft_bn="lpft_ft_bn")

    def check(self) -> None:
        if self.opts["probe"] not in PROBES:
            raise ValueError(f"probe (lpft_probe) must be one of {PROBES}, got {self.opts['probe']!r}")
        n, low = self.opts["probe_epochs"], int(self.opts["probe"] == "sgd")
        if isinstance(n, bool) or not isinstance(n, int) or n < low:
            raise ValueError(f"probe_epochs must be an integer >= {low} with probe={self.opts['probe']!r}, got {n!r}")
        check_number(self.opts, "probe_l2", 0.0)
        check_number(self.opts, "ft_lr_mult", 0.0, low_open=True)
        if self.opts["ft_bn"] not in FT_BN:
            raise ValueError(f"ft_bn (lpft_ft_bn) must be one of {FT_BN}, got {self.opts['ft_bn']!r}")

    def build(self, tuner) -> None:
        self.set_stage(tuner, probing=self.opts["probe_epochs"] > 0)

    def set_stage(self, tuner, probing: bool) -> None:
        """Stage 1 (``probing``): backbone frozen and in eval mode; stage 2: backbone trainable."""
        self.probing = probing
        tuner.backbone.requires_grad_(not probing)
        if probing:
            tuner.backbone.eval()
        else:
            tuner.backbone.train(tuner.training)
            self.freeze_bn_statistics(tuner)

    def freeze_bn_statistics(self, tuner) -> None:
        """Stage 2 with ft_bn="frozen": every backbone batch norm in eval mode (running statistics fixed)."""
        if self.opts["ft_bn"] == "frozen":
            for m in tuner.backbone.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train_mode(self, tuner, mode: bool) -> None:
        if self.probing:
            tuner.backbone.eval()
        else:
            self.freeze_bn_statistics(tuner)

    def param_groups(self, tuner, lr: float, backbone_mult: float) -> list[dict]:
        """Every backbone parameter (frozen in stage 1, trained in stage 2) at lr*backbone_mult, heads at lr."""
        heads = [p for m in self.heads(tuner) for p in m.parameters()]
        return [dict(params=list(tuner.backbone.parameters()), lr=lr * backbone_mult, name="backbone"),
                dict(params=heads, lr=lr, name="heads")]

    def prepare(self, tuner, train_set, out_dir) -> None:
        if self.opts["probe_epochs"] > 0 and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError("method lpft with --lpft-probe-epochs > 0 does not run under DDP (the backbone "
                             "becomes trainable after the gradient all-reduce is set up): run it in one process")
        if self.opts["probe"] == "lbfgs":  # (a resumed run refits, then loads the checkpoint's head)
            feats, labels = pooled_features(tuner, tuner.backbone, train_set)
            fit_linear_probe(tuner.head, feats, labels, self.opts["probe_l2"])

    def on_epoch_start(self, tuner, epoch, optimizer, sample) -> None:
        self.set_stage(tuner, probing=epoch < self.opts["probe_epochs"])
        if not self.probing and not lrs_scaled_for(optimizer, epoch):
            scale_lrs(optimizer, epoch, [self.opts["ft_lr_mult"]] * len(optimizer.param_groups))

    def on_epoch_end(self, tuner, epoch, optimizer) -> None:
        restore_scheduled_lrs(optimizer)
