"""LEVI, Layer-wise Ensemble of different VIews (Roh et al., ICML 2024): the frozen pretrained backbone is
ensembled layer by layer with a small task-specific CNN trained from scratch; the intermediate outputs of
both are joined through small adapting layers and everything trains on one shared loss.

For images x (B, 3, H, W), with L chosen backbone layers and a small CNN of L stages:

    h_l    = average-pooled output of backbone layer l                     (B, C_l)   frozen, no gradient
    s_l    = average-pooled output of stage l of the small CNN            (B, c_l)   c_l = width * 2^(l-1)
    logits = head(mean_hw f0) + sum_l A_l([h_l ; s_l])                    (B, Cls)
    loss   = CE(logits, y)

f0 is the frozen backbone's final map (so ``head`` is a linear probe of it), A_l = Linear(C_l + c_l, Cls)
o LayerNorm(C_l + c_l) are the adapting layers, and stage l of the small CNN is conv 3x3 stride 2 (no
bias) + BatchNorm + ReLU (stage 1 reads x, the same normalised view as the backbone). These logits are the
CE's and ``predict``'s (the ``classify`` hook).

The paper leaves these choices open; ours:
* which layers: ``layers`` (module names of the backbone, shallow to deep, paired in order with the small
  CNN's stages); default the last three of timm's ``feature_info`` (EfficientNet-Lite0: blocks.2,
  blocks.4, blocks.6, strides 8/16/32). Their outputs may be NCHW maps, NHWC maps (Swin) or token
  sequences (ViT: averaged over all tokens);
* adapter form: each layer's two views are average-pooled, concatenated, layer-normalised (with affine
  parameters: the frozen layers' pooled outputs have scales far from the small CNN's) and mapped to class
  logits by one linear layer (N(0, 0.01) weights, zero bias, as the head);
* combining: the adapters' logits and the probe's are summed (an ensemble of per-layer classifiers);
* the pretrained backbone is frozen entirely (parameters and BN statistics: always in eval mode), not
  lightly adapted; the head, the small CNN and the adapters train at the full lr;
* the small CNN: L stages of width ``width`` doubling per stage (default 32: 32, 64, 128 channels).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..feature_maps import model_name
from .base import Method, register

DEFAULT_DEPTH = 3  # default: the last 3 of feature_info


class SmallCNN(nn.Module):
    """The task-specific model: ``len(channels)`` stages conv 3x3 stride 2 (no bias) + BN + ReLU;
    (B, 3, H, W) -> the list of the stages' maps, stage l (B, channels[l], ~H/2^(l+1), ~W/2^(l+1))."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        stages, c_in = [], 3
        for c in channels:
            stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()))
            c_in = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def pooled(backbone: nn.Module, name: str, out) -> torch.Tensor:
    """(B, C) average of a backbone layer's output: NCHW map, NHWC map (``output_fmt`` NHWC) or tokens."""
    if isinstance(out, torch.Tensor) and out.dim() == 4:
        return out.mean((1, 2) if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else (2, 3))
    if isinstance(out, torch.Tensor) and out.dim() == 3:
        return out.mean(1)  # (B, T, C) tokens
    what = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    raise ValueError(f"layers (levi_layers): {model_name(backbone)!r} layer {name!r} returns {what}; LEVI needs "
                     "a (B, C, h, w) / (B, h, w, C) map or (B, T, C) tokens")


def layer_outputs(tuner, x: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, object]]:
    """(the backbone's feature map (B, C, h, w) of x, {layer name: that layer's output}) in one forward
    (forward hooks, removed again)."""
    captured: dict[str, object] = {}
    handles = [tuner.backbone.get_submodule(n).register_forward_hook(
        lambda module, args, out, n=n: captured.__setitem__(n, out)) for n in names]
    try:
        f = tuner.features(tuner.backbone, x)
    finally:
        for h in handles:
            h.remove()
    return f, captured


@register
class Levi(Method):
    name = "levi"
    summary = ("frozen backbone + a small CNN from scratch, joined layer-wise by LayerNorm+linear adapters; "
               "one CE on the summed logits")
    options = dict(width=32, layers=())
    config_fields = dict(width="levi_width", layers="levi_layers")

    def check(self) -> None:
        layers = self.opts["layers"]
        if isinstance(layers, str) or not isinstance(layers, Sequence) or \
                not all(isinstance(n, str) and n for n in layers):
            raise ValueError(f"layers (levi_layers) must be a sequence of backbone module names (empty: the "
                             f"last {DEFAULT_DEPTH} of feature_info), got {layers!r}")
        w = self.opts["width"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"width (levi_width) must be an int >= 1, got {w!r}")

    def resolve_layers(self, backbone: nn.Module) -> tuple[str, ...]:
        """The backbone layers ensembled: ``layers``, else the last 3 of timm's ``feature_info``."""
        layers = tuple(self.opts["layers"])
        if not layers:
            info = getattr(backbone, "feature_info", None)
            try:
                layers = tuple(i["module"] for i in info)[-DEFAULT_DEPTH:]
            except (TypeError, KeyError):
                layers = ()
            if not layers:
                raise ValueError(f"layers (levi_layers): backbone {model_name(backbone)!r} has no timm "
                                 "feature_info to take default layers from; name its modules, e.g. blocks.2,blocks.4")
        modules = dict(backbone.named_modules())
        unknown = [n for n in layers if n not in modules]
        if unknown:
            top = sorted({n.split(".")[0] for n in modules if n})
            raise ValueError(f"layers (levi_layers): no module {unknown} in backbone {model_name(backbone)!r}; "
                             f"its top-level modules: {top}")
        return layers

    def build(self, tuner) -> None:
        self.layers = self.resolve_layers(tuner.backbone)
        tuner.backbone.requires_grad_(False).eval()  # frozen from the start (train_mode keeps it in eval mode)
        ref = tuner.head.weight
        with torch.no_grad():  # the layers' widths
            _, outs = layer_outputs(tuner, torch.zeros(1, 3, *tuner.image_size, device=ref.device, dtype=ref.dtype),
                                    self.layers)
        dims = [pooled(tuner.backbone, n, outs[n]).shape[1] for n in self.layers]
        small = [self.opts["width"] * 2 ** i for i in range(len(self.layers))]
        tuner.levi_cnn = SmallCNN(small).to(ref.device, ref.dtype)
        tuner.levi_adapters = nn.ModuleList(nn.Sequential(nn.LayerNorm(d + c), nn.Linear(d + c, tuner.num_classes))
                                            for d, c in zip(dims, small))
        for a in tuner.levi_adapters:
            nn.init.normal_(a[1].weight, 0.0, 0.01)
            nn.init.zeros_(a[1].bias)
        tuner.levi_adapters.to(ref.device, ref.dtype)

    def train_mode(self, tuner, mode: bool) -> None:
        tuner.backbone.eval()  # frozen: BN running statistics fixed too

    def heads(self, tuner) -> list[nn.Module]:
        return [tuner.head, tuner.levi_cnn, tuner.levi_adapters]

    def classify(self, tuner, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, outs = layer_outputs(tuner, x, self.layers)
        logits = tuner.head(f.mean((2, 3)))
        for name, s, adapter in zip(self.layers, tuner.levi_cnn(x), tuner.levi_adapters):
            logits = logits + adapter(torch.cat([pooled(tuner.backbone, name, outs[name]), s.mean((2, 3))], 1))
        return f, logits
