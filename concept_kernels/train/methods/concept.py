"""Concept-Tuning (ICCV 2023, method_spec §3-§6): CE + information-bottleneck head (CE + KL) + image-level
contrastive + concept (patch) contrastive with optimal-transport matching, against a momentum key encoder.

loss = CE + w_img L_img + w_con L_con + w_ce_ib CE_ib + w_kl KL (published weights 1, 1, 1, 0.005)."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

import concept_kernels as ck

from ...method import fixed_batch_norm, grouped_batch_norm, roi_align
from . import key_encoder
from .base import Method, register


def embed(h: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Patch embedding: unit-norm logits of a detached copy of the head (L_con gives the head no gradient)."""
    return F.normalize(F.linear(h, head.weight.detach(), head.bias.detach()), dim=1)


def patch_embeddings(tuner, backbone, head, x, boxes, B, fix_bn: bool = False) -> torch.Tensor:
    """(B, P, Cls) unit rows, the detached head on the patches' features. Image mode: crops
    (P*B, 3, S, S) of the view ``x``, position-major, through ``backbone`` in one pass with
    per-position BN statistics, GAP; the IB branch is skipped. The pass is the published P
    train-mode passes, BN buffers included: running stats move P times at the BN momentum, or stay
    put with ``fix_bn`` (the query encoder's published momentum 0), and ``num_batches_tracked``
    counts P. Transformers (ViT, Swin) normalise per token (LayerNorm): nothing couples the patches of
    a batch, so the one pass IS the P passes; their h is the mean of the patch tokens, as for every
    view. Roi mode (NOT equivalent, the features see the whole image): 2x2 RoIAlign of the
    view's feature map ``x``, averaged (as GAP over the 2x2 map of a 64-px crop)."""
    P = tuner.num_patches
    if tuner.patch_mode == "roi":
        h = roi_align(x, boxes, (2, 2), spatial_scale=1.0 / tuner.stride[0]).mean((2, 3))
        return embed(h, head).view(B, P, -1)
    crops = roi_align(x, boxes.view(B, P, 5).transpose(0, 1).reshape(P * B, 5), (tuner.patch_pixels,) * 2)
    momentum_0 = fixed_batch_norm(backbone) if fix_bn else nullcontext()
    with grouped_batch_norm(P, backbone), momentum_0:
        h = tuner.features(backbone, crops).mean((2, 3))
    return embed(h, head).view(P, B, -1).transpose(0, 1)


@register
class ConceptTuning(Method):
    name = "concept"
    summary = "Concept-Tuning"

    def num_views(self, tuner) -> int:
        """Image mode: views 0/1 "image", 2/3 "patch" augmentation (§7); roi mode: 0/1."""
        return 4 if tuner.patch_mode == "image" else 2

    def build(self, tuner) -> None:
        if not 3 <= tuner.num_confusing <= tuner.num_classes - 1:
            raise ValueError(f"Concept-Tuning needs 3 <= num_confusing <= num_classes - 1, got num_confusing="
                             f"{tuner.num_confusing} with {tuner.num_classes} classes (at least 4 classes are needed)")
        if tuner.num_patches < 4:
            raise ValueError("num_patches must be >= 4 (the 10 negatives per OT problem need P*P >= 10), "
                             f"got {tuner.num_patches}")
        tuner.ib = ck.nn.InformationBottleneckHead(tuner.head.in_features, tuner.num_classes, tuner.latent_dim)
        key_encoder.add_key_encoder(tuner, queue_patches=tuner.num_patches)

    def weights(self) -> dict[str, float]:
        return {}  # img, con, ce_ib, kl: the tuner's own w_* (they exist for every method)

    def heads(self, tuner) -> list[nn.Module]:
        return [tuner.head, tuner.ib]

    def predict_heads(self, tuner, f: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ib": tuner.ib(f.contiguous())[0]}  # the IB head samples its latent in eval mode too

    def loss_terms(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        ib_logits, mu, sigma = tuner.ib(f0.contiguous())  # the attention kernels take NCHW
        out = dict(ce_ib=F.cross_entropy(ib_logits, labels), kl=ck.information_bottleneck_kl(mu, sigma))
        out.update(self._contrastive(tuner, views, labels, f0, logits))
        return out

    @staticmethod
    def _search(tuner, f, logits, labels, weight):
        return ck.search_concept_patches(f, logits, labels, weight.detach(), tuner.image_size,
                                         num_confusing=tuner.num_confusing, num_patches=tuner.num_patches)

    def _contrastive(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        """method_spec §4 steps 3-7 (image mode): query patches, EMA update, keys, L_img, L_con, enqueue."""
        B, image_mode = labels.shape[0], tuner.patch_mode == "image"
        with torch.no_grad():  # query patches; image: key-encoder search on view 2, roi: on view 0's own map
            f, y = key_encoder.key_pass(tuner, views[2]) if image_mode else (f0.detach(), logits.detach())
            boxes, conf = self._search(tuner, f, y, labels, (tuner.key_head if image_mode else tuner.head).weight)
        zq_p = patch_embeddings(tuner, tuner.backbone, tuner.head, views[2] if image_mode else f0, boxes, B,
                                fix_bn=True)
        with torch.no_grad():
            key_encoder.momentum_update(tuner)
            f1, y1 = key_encoder.key_pass(tuner, views[1])  # views 1 and 3: separate passes, as published (and
            # faster on CPU than one pass with per-view BN statistics)
            f, y = key_encoder.key_pass(tuner, views[3]) if image_mode else (f1, y1)
            boxes, _ = self._search(tuner, f, y, labels, tuner.key_head.weight)
            zk_p = patch_embeddings(tuner, tuner.key_backbone, tuner.key_head, views[3] if image_mode else f1, boxes, B)
            z_k = F.normalize(y1, dim=1)
        queue_z, queue_h = tuner.queues.snapshot()
        out = dict(img=ck.image_contrastive_loss(F.normalize(logits, dim=1), z_k, queue_z, labels,
                                                 temperature=tuner.temperature))
        out["con"] = ck.concept_contrastive_loss(zq_p, zk_p, queue_h, labels, conf, temperature=tuner.temperature,
                                                stop=tuner.sinkhorn_stop)
        key_encoder.enqueue(tuner, z_k, zk_p, labels)
        return out
