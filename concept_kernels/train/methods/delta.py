"""DELTA (Li et al. 2019): keep the fine-tuned network's intermediate feature maps near the pretrained
network's, weighting each channel by how much the target task needs it.

    loss = CE + a * delta + b * l2_head,   l2_head = 1/2 sum ||p||^2 over the new head (no weight decay),

    delta = 1/(2B) sum_l sum_b sum_c  C_l W_{l,c} / |P_l| * sum_{p in P_l} (FM_l(w, x_b)[c, p] - FM_l(w0, x_b)[c, p])^2

over the layers l (``layers``), the batch b (view 0) and the C_l channels c of each layer's output FM_l
(P_l: its positions, h*w for a CNN, the tokens for a ViT, class token included); w0 is a frozen copy of the
pretrained backbone (``tuner.source_backbone``), run in eval mode except its batch norms, which normalise
with the batch's statistics as the fine-tuned network's do in training (as in TLlib, whose copy runs in
training mode; here with momentum 0, so its running statistics stay the pretrained ones, and dropout /
drop-path off), so the two maps agree at the first step. The normalisation (C_l W_{l,c}: weights
averaging 1 per channel, a mean over positions, half the squared distance, a mean over the batch) is
TLlib's (``delta.py``, the reference implementation of the baselines' table). Defaults a = b = 0.01.

Layers: by default the stage outputs that the timm model lists in its ``feature_info`` (the modules its
``features_only`` mode returns: lite0 ``blocks.0, 1, 2, 4, 6``; ResNet ``act1, layer1..4``; ViT
``blocks.*``), read with forward hooks during the step's own forward, so the fine-tuned maps cost
nothing extra; the pretrained copy runs one more (no-grad) forward per step. ``--delta-layers`` names
other modules (of any backbone: one without ``feature_info`` must name them).

Channel attention W_l (computed once, in ``prepare``, before the first step): a linear head is fitted on the
frozen pretrained backbone's pooled features of every training image (full-batch L-BFGS on CE +
1e-3/2 ||W||^2, as WiSE-FT's probe); then on ``attention_images`` training images (a fixed random subset;
0: all) each channel c of each layer l in turn is zeroed and the mean CE increase measured,

    d_{l,c} = mean_x CE(head(backbone with FM_l[c] = 0)(x)) - mean_x CE(head(backbone)(x)),
    W_l = softmax(z_l / 5),  z_l = (d_l - mean(d_l)) / std(d_l)   (unbiased std; a layer with one channel
                                                                   or all d equal: z = 0, uniform W)

The ablations are batched: a forward hook on layer l repeats its output once per channel of a chunk
(channel j zeroed in copy j), so one forward of m images measures k channels (k * m <= ``batch_images``,
256; few images and many channels, so the layers before l run about n * ceil(C_l / 256) times). Cost:
sum_l C_l * n image forwards of the network after layer l (lite0: 512 channels). The result
is cached in ``<out>/delta_attention.pt`` keyed by the weights, layers, images and labels (a resumed run
reuses it; another model, data set or seed recomputes it) and kept as buffers ``delta_attention.w<l>``
(in checkpoints)."""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..feature_maps import model_name
from .base import Method, check_number, register
from .l2sp import add_source_backbone, head_l2, without_weight_decay
from .prepared import cached, dataset_digest, training_images
from .wiseft import fit_linear_probe

CACHE_FILE = "delta_attention.pt"
PROBE_L2 = 1e-3
ATTENTION_TEMPERATURE = 5.0


def default_layers(backbone: nn.Module) -> tuple[str, ...]:
    """The module names of a timm model's ``feature_info`` (its stage outputs)."""
    info = getattr(backbone, "feature_info", None)
    names = [f.get("module") for f in info] if isinstance(info, list) else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"delta: the backbone {model_name(backbone)!r} lists no timm feature_info stages; name the "
                         "layers to regularise with --delta-layers (module names, e.g. layer1,layer2)")
    return tuple(names)


def channel_dim(backbone: nn.Module, out: torch.Tensor) -> int:
    """The channel dimension of a layer's output: 1 for (B, C, h, w) maps, the last one for tokens (B, T, C)
    and for NHWC models (Swin, ``output_fmt == "NHWC"``)."""
    if out.dim() == 4 and getattr(backbone, "output_fmt", "NCHW") != "NHWC":
        return 1
    if out.dim() in (3, 4):
        return out.dim() - 1
    raise ValueError(f"delta: a layer of {model_name(backbone)!r} returned shape {tuple(out.shape)}; expected a "
                     "(B, C, h, w) map, (B, h, w, C) or (B, T, C) tokens")


def as_channels_positions(fm: torch.Tensor, cdim: int) -> torch.Tensor:
    """(B, ..., C, ...) -> (B, C, positions)."""
    return fm.movedim(cdim, 1).flatten(2)


class FeatureTap:
    """A forward hook keeping its module's last output (only in training mode unless ``always``);
    ``pop()`` returns it and forgets it."""

    def __init__(self, always: bool) -> None:
        self.always, self.out = always, None

    def __call__(self, module: nn.Module, inputs, out) -> None:
        if self.always or module.training:
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"delta: layer {type(module).__name__} returns a {type(out).__name__}, not a tensor")
            self.out = out

    def pop(self) -> torch.Tensor | None:
        out, self.out = self.out, None
        return out


def feature_map_distance(maps: list[torch.Tensor], source_maps: list[torch.Tensor], attention: list[torch.Tensor],
                         cdims: list[int]) -> torch.Tensor:
    """DELTA's regularizer (module docstring): maps / source_maps per layer (B, ... C_l ...) with channels on
    ``cdims[l]``, attention per layer (C_l,) summing to 1."""
    total = maps[0].new_zeros(())
    for fm, fm0, w, cdim in zip(maps, source_maps, attention, cdims):
        sq = as_channels_positions(fm - fm0, cdim).pow(2).mean(2)  # (B, C_l)
        total = total + (sq * (w * w.numel())).sum() / (2 * fm.shape[0])
    return total


def zscore_softmax(increase: torch.Tensor, temperature: float = ATTENTION_TEMPERATURE) -> torch.Tensor:
    """softmax(z / temperature), z = (x - mean) / std (unbiased); z = 0 for one channel or a zero std."""
    if increase.numel() < 2:
        return torch.ones_like(increase)
    std = increase.std()
    z = torch.zeros_like(increase) if std == 0 else (increase - increase.mean()) / std
    return F.softmax(z / temperature, dim=0)


def _ablate_hook(c0: int, k: int, cdim: int):
    """Forward hook: output (n, ...) -> (k * n, ...), copy j with channel c0 + j (on dim ``cdim``) zeroed."""

    def hook(module, inputs, out):
        C = out.shape[cdim]
        keep = torch.ones(k, C, dtype=torch.bool, device=out.device)
        keep[torch.arange(k), c0 + torch.arange(k)] = False
        shape = [k] + [1] * out.dim()
        shape[1 + cdim % out.dim()] = C
        rep = torch.where(keep.view(shape), out.unsqueeze(0), out.new_zeros(()))
        return rep.reshape(k * out.shape[0], *out.shape[1:])

    return hook


def layer_channels(tuner, backbone: nn.Module, layer: str, x: torch.Tensor) -> tuple[int, int]:
    """(channel count, channel dim) of ``layer``'s output for the input x (1, 3, H, W)."""
    tap = FeatureTap(always=True)
    handle = backbone.get_submodule(layer).register_forward_hook(tap)
    try:
        with torch.no_grad():
            tuner.features(backbone, x)
    finally:
        handle.remove()
    out = tap.pop()
    cdim = channel_dim(backbone, out)
    return out.shape[cdim], cdim


@torch.no_grad()
def channel_loss_increase(tuner, backbone: nn.Module, head: nn.Linear, x: torch.Tensor, y: torch.Tensor, layer: str,
                          batch_images: int = 256) -> torch.Tensor:
    """(C,) mean CE increase over the images x (n, 3, H, W) (labels y (n,)) of ``head`` on the pooled
    features of ``backbone`` (in its current mode) when channel c of ``layer``'s output is zeroed; forwards
    of at most ``batch_images`` copies (k channels x the images of a chunk; at least one of each)."""
    module = backbone.get_submodule(layer)

    def ce_sums(xs, ys, reps):  # (reps,) summed CE of the images xs, once per copy
        logits = head(tuner.features(backbone, xs).mean((2, 3)))
        return F.cross_entropy(logits, ys.repeat(reps), reduction="none").view(reps, -1).sum(1)

    n = x.shape[0]
    base = sum(ce_sums(x[s:s + batch_images], y[s:s + batch_images], 1) for s in range(0, n, batch_images)) / n
    C, cdim = layer_channels(tuner, backbone, layer, x[:1])
    # few images x many channels per forward: the layers before ``layer`` run once per chunk of channels
    step = max(1, min(n, batch_images // C))
    increase = []
    for c0 in range(0, C, max(1, batch_images // step)):
        k = min(C - c0, max(1, batch_images // step))
        total = x.new_zeros(k)
        for s in range(0, n, step):
            handle = module.register_forward_hook(_ablate_hook(c0, k, cdim))
            try:
                total = total + ce_sums(x[s:s + step], y[s:s + step], k)
            except RuntimeError as e:
                raise ValueError(f"delta: {model_name(backbone)!r} cannot run with layer {layer!r}'s output repeated "
                                 f"per ablated channel ({e}); does a connection bypass that layer?") from e
            finally:
                handle.remove()
        increase.append(total / n - base)
    return torch.cat(increase)


def channel_attention(tuner, backbone: nn.Module, head: nn.Linear, x: torch.Tensor, y: torch.Tensor,
                      layers: tuple[str, ...], batch_images: int = 256) -> list[torch.Tensor]:
    """Per layer, W_l (C_l,) = softmax(z-score(channel_loss_increase) / 5) on images x (n, 3, H, W), labels
    y (n,); prints one line per layer."""
    was = backbone.training
    backbone.eval()
    out = []
    try:
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            inc = channel_loss_increase(tuner, backbone, head, x, y, layer, batch_images)
            out.append(zscore_softmax(inc))
            print(f"delta: channel attention {i + 1}/{len(layers)}, layer {layer!r}: {inc.numel()} channels x "
                  f"{x.shape[0]} images, {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        backbone.train(was)
    return out


@contextlib.contextmanager
def batch_statistics(backbone: nn.Module):
    """Within: ``backbone``'s batch norms in training mode (batch statistics; with momentum 0 their running
    statistics stay as they are), the rest as it was; after: the batch norms back in their mode."""
    norms = [(m, m.training) for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in norms:
        m.train()
    try:
        yield
    finally:
        for m, was in norms:
            m.train(was)


class ChannelWeights(nn.Module):
    """Buffers ``w0``, ``w1``, ...: one (C_l,) attention vector per regularised layer (NaN until prepared)."""

    def __init__(self, channels: list[int], like: torch.Tensor) -> None:
        super().__init__()
        for i, c in enumerate(channels):
            self.register_buffer(f"w{i}", torch.full((c,), float("nan"), dtype=like.dtype, device=like.device))

    def vectors(self) -> list[torch.Tensor]:
        return [getattr(self, f"w{i}") for i in range(len(self._buffers))]


@register
class DELTA(Method):
    name = "delta"
    summary = ("CE + a * attention-weighted distance of intermediate feature maps to the pretrained backbone's "
               "+ b/2 ||w_head||^2, no weight decay")
    options = dict(alpha=0.01, beta=0.01, layers=(), attention_images=128)
    config_fields = dict(alpha="delta_alpha", beta="delta_beta", layers="delta_layers",
                         attention_images="delta_attention_images")

    def check(self) -> None:
        check_number(self.opts, "alpha", 0.0)
        check_number(self.opts, "beta", 0.0)
        layers = self.opts["layers"]
        if isinstance(layers, str) or not all(isinstance(n, str) and n for n in layers):
            raise ValueError(f"layers must be a sequence of module names, got {layers!r}")
        self.opts["layers"] = tuple(layers)
        n = self.opts["attention_images"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"attention_images must be an int >= 0 (0: all training images), got {n!r}")
        self.prepared = False

    def build(self, tuner) -> None:
        add_source_backbone(tuner)  # (before the taps: the copy carries none)
        for m in tuner.source_backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0  # batch statistics in the step's forward, running statistics kept as pretrained
        names = self.opts["layers"] or default_layers(tuner.backbone)
        modules = dict(tuner.backbone.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"delta: the backbone {model_name(tuner.backbone)!r} has no module(s) {missing} "
                             f"(layers {list(names)})")
        self.layer_names = tuple(names)
        self.taps = [FeatureTap(always=False) for _ in names]
        self.source_taps = [FeatureTap(always=True) for _ in names]
        for name, tap, src in zip(names, self.taps, self.source_taps):
            tuner.backbone.get_submodule(name).register_forward_hook(tap)
            tuner.source_backbone.get_submodule(name).register_forward_hook(src)
        ref = tuner.head.weight
        with torch.no_grad():
            tuner.features(tuner.source_backbone, torch.zeros(1, 3, *tuner.image_size, device=ref.device,
                                                              dtype=ref.dtype))
        outs = [t.pop() for t in self.source_taps]
        self.cdims = [channel_dim(tuner.backbone, o) for o in outs]
        tuner.delta_attention = ChannelWeights([o.shape[d] for o, d in zip(outs, self.cdims)], ref)

    def train_mode(self, tuner, mode: bool) -> None:
        tuner.source_backbone.eval()

    def prepare(self, tuner, train_set, out_dir) -> None:
        n = self.opts["attention_images"]
        g = torch.Generator().manual_seed(0)
        subset = sorted(torch.randperm(len(train_set), generator=g)[:n].tolist()) if 0 < n < len(train_set) \
            else list(range(len(train_set)))
        key = dataset_digest(tuner, train_set, None, "delta", tuner.source_backbone.state_dict(),
                             list(self.layer_names), subset, PROBE_L2)

        def compute() -> list[torch.Tensor]:
            src = tuner.source_backbone
            print(f"delta: channel attention of {len(self.layer_names)} layers on {len(subset)} of {len(train_set)} "
                  f"training images ({sum(w.numel() for w in tuner.delta_attention.vectors())} channels, each zeroed "
                  "on each image); --delta-attention-images bounds the images", flush=True)
            with torch.no_grad():
                feats, labels = zip(*((tuner.features(src, x).mean((2, 3)), y)
                                      for x, y in training_images(tuner, train_set)))
            head = nn.Linear(tuner.head.in_features, tuner.num_classes).to(tuner.head.weight)
            fit_linear_probe(head, torch.cat(feats), torch.cat(labels), PROBE_L2)
            x, y = (torch.cat(t) for t in zip(*training_images(tuner, train_set, subset)))
            return [w.cpu() for w in channel_attention(tuner, src, head, x, y, self.layer_names)]

        weights = cached(out_dir, CACHE_FILE, key, compute, "delta: channel attention")
        for buf, w in zip(tuner.delta_attention.vectors(), weights):
            buf.copy_(w)
        for tap in self.source_taps:  # (the forwards above left outputs there)
            tap.pop()
        self.prepared = True

    def weights(self) -> dict[str, float]:
        return dict(delta=self.opts["alpha"], l2_head=self.opts["beta"])

    def loss_terms(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        if not self.prepared:
            raise RuntimeError("delta: call model.prepare(train_set, out_dir) before training (it computes the "
                               "channel attention; the trainer does this)")
        maps = [t.pop() for t in self.taps]  # from the step's forward of view 0
        if any(m is None or m.shape[0] != views[0].shape[0] for m in maps):
            raise RuntimeError("delta: the backbone's forward of view 0 in training mode was not captured")
        with torch.no_grad(), batch_statistics(tuner.source_backbone):
            tuner.features(tuner.source_backbone, views[0])
        source = [t.pop() for t in self.source_taps]
        return dict(delta=feature_map_distance(maps, source, tuner.delta_attention.vectors(), self.cdims),
                    l2_head=head_l2(tuner))

    def param_groups(self, tuner, lr: float, backbone_mult: float) -> list[dict]:
        return without_weight_decay(super().param_groups(tuner, lr, backbone_mult))
