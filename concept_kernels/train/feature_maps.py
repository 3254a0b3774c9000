"""Feature maps (B, C, h, w) from any timm backbone: CNNs, plain ViT/DeiT token outputs and NHWC models (Swin).

The method works on a spatial map: the DANet branch attends over its C channels and N = h*w positions, and
the patch search puts one box per channel group at the peak of that group's map. CNNs return the map; a
transformer returns tokens, which are the same thing once laid out on the patch grid:

* plain ViT / DeiT / EVA-style models return (B, T + h*w, C): the first ``num_prefix_tokens`` T tokens (class,
  distillation, register tokens) carry no position and are dropped, the rest are the patch grid in row-major
  order, whose size the model's ``patch_embed`` gives for the input size;
* Swin-style models (``output_fmt == "NHWC"``) return (B, h, w, C): permuted.

Anything else (a pooled vector, a sequence without a patch grid) is refused with an error naming the model.
"""
from __future__ import annotations

import torch
from torch import nn


def model_name(backbone: nn.Module) -> str:
    """timm's architecture name of ``backbone`` if it has one, else its class name."""
    cfg = getattr(backbone, "pretrained_cfg", None) or getattr(backbone, "default_cfg", None) or {}
    return cfg.get("architecture") or type(backbone).__name__


def patch_grid(backbone: nn.Module, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) token grid of a patch-embedding model for an input of ``image_hw`` pixels."""
    embed = getattr(backbone, "patch_embed", None)
    if embed is None:
        raise ValueError(f"backbone {model_name(backbone)!r} returns tokens but has no patch_embed to place them "
                         "on a grid; supported: CNNs, ViT/DeiT-style and Swin-style timm models")
    if hasattr(embed, "dynamic_feat_size"):
        return tuple(embed.dynamic_feat_size(image_hw))
    ph, pw = embed.patch_size
    return image_hw[0] // ph, image_hw[1] // pw


def to_feature_map(backbone: nn.Module, out: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """A backbone's ``forward_features`` output for (B, 3, H, W) inputs -> (B, C, h, w).

    out: (B, C, h, w) (CNNs: returned as is), (B, h, w, C) when ``backbone.output_fmt == "NHWC"`` (Swin),
    or (B, T + h*w, C) tokens with T = ``backbone.num_prefix_tokens`` (ViT/DeiT: prefix tokens dropped,
    the rest reshaped onto the (h, w) patch grid of ``image_hw``).
    """
    if out.dim() == 4:
        return out.permute(0, 3, 1, 2) if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else out
    if out.dim() == 3:
        prefix = getattr(backbone, "num_prefix_tokens", None)
        if prefix is None:
            raise ValueError(f"backbone {model_name(backbone)!r} returns a token sequence {tuple(out.shape)} without "
                             "num_prefix_tokens: cannot tell its class/register tokens from its patch grid")
        h, w = patch_grid(backbone, image_hw)
        B, T, C = out.shape
        if T - prefix != h * w:
            raise ValueError(f"backbone {model_name(backbone)!r}: {T} tokens for a {image_hw} input, expected "
                             f"{prefix} prefix + {h}x{w} patch tokens")
        return out[:, prefix:].transpose(1, 2).reshape(B, C, h, w)
    raise ValueError(f"backbone {model_name(backbone)!r} returns features of shape {tuple(out.shape)}; "
                     "Concept-Tuning needs a spatial map: (B, C, h, w) from CNNs, tokens on a patch grid from "
                     "ViT/DeiT-style models, or (B, h, w, C) from Swin-style models")
