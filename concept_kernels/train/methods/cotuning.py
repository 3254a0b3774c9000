"""Co-Tuning (You et al. 2020): keep the pretrained model's source classifier (the 1000-way ImageNet head)
and train it too, on soft targets that translate each target label into source classes.

Before training (``prepare``), with the pretrained backbone in eval mode, the relationship

    R[y, :] = p(y_s | y_t = y) = mean over the training images x of class y of softmax(g(pool(x)))   (Cls, K_s)

where g is the source head and pool(x) the backbone's globally averaged feature map (the input of the
new head too; for the CNNs whose ImageNet head follows global average pooling, e.g. EfficientNet and
ResNet, exactly the source model's pipeline). It is cached in ``<out>/cotuning_relationship.pt`` (keyed
by the weights, images and labels) and kept as the buffer ``cotuning_relationship`` (in checkpoints).
Then each step

    loss = CE + lambda * cotuning,  cotuning = mean_b CE_soft(g(pool(x_b)), R[y_b])
                                             = -mean_b sum_s R[y_b, s] log softmax(g(pool(x_b)))_s,

with the source head at lr x0.1 (the new head at lr, the backbone at lr x backbone_mult). Default
lambda = 2.3. The source head comes from ``backbones.source_classifier(backbone)`` ({"weight" (K_s, C), "bias"
(K_s,)}), loaded for a backbone that ``create_backbone`` made with pretrained weights and a linear classifier;
a backbone without one (``--no-pretrained``, a model whose weights are not at hand) is refused with a
ValueError."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import source_classifier
from ..feature_maps import model_name
from .base import Method, check_number, register
from .prepared import cached, dataset_digest, training_images

CACHE_FILE = "cotuning_relationship.pt"
SOURCE_HEAD_LR_MULT = 0.1


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_b -sum_s target[b, s] log softmax(logits[b])_s; logits and target (B, K_s)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def class_relationship(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(Cls, K_s): row y = mean of ``probs`` (N, K_s) over the rows with ``labels`` (N,) == y; a class
    without images is a ValueError."""
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"cotuning: classes {missing} have no training images, so p(y_s | y_t) is undefined")
    sums = torch.zeros(num_classes, probs.shape[1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, labels, probs)
    return sums / counts.unsqueeze(1).to(probs.dtype)


@torch.no_grad()
def source_probabilities(tuner, train_set) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K_s) softmax of the source head on the pooled features of the backbone (eval mode) of every
    training image, and the (N,) labels."""
    was = tuner.backbone.training
    tuner.backbone.eval()
    probs, labels = [], []
    for x, y in training_images(tuner, train_set):
        probs.append(F.softmax(tuner.source_head(tuner.features(tuner.backbone, x).mean((2, 3))), dim=1))
        labels.append(y)
    tuner.backbone.train(was)
    return torch.cat(probs), torch.cat(labels)


@register
class CoTuning(Method):
    name = "cotuning"
    summary = "CE + lambda * soft CE of the kept source (ImageNet) head to p(y_s | y_t), source head at lr x0.1"
    options = dict(lam=2.3)
    config_fields = dict(lam="cotuning_lambda")

    def check(self) -> None:
        check_number(self.opts, "lam", 0.0)
        self.prepared = False

    def build(self, tuner) -> None:
        src = source_classifier(tuner.backbone)
        name = model_name(tuner.backbone)
        if src is None:
            raise ValueError(f"cotuning needs the source (ImageNet) classifier of the backbone {name!r}, and it has "
                             "none: it was built without pretrained weights (--no-pretrained), or its pretrained "
                             "classifier is not a linear layer. Offline, tf_efficientnet_lite0 / efficientnet_lite0 "
                             "with --pretrained have one")
        weight, bias = src["weight"], src["bias"]
        C = tuner.head.in_features
        if weight.dim() != 2 or weight.shape[1] != C or bias.shape != weight.shape[:1]:
            raise ValueError(f"cotuning: the source classifier of {name!r} is {tuple(weight.shape)} + "
                             f"{tuple(bias.shape)}, not (K_s, {C}) + (K_s,) on the {C}-channel pooled features")
        ref = tuner.head.weight
        tuner.source_head = nn.Linear(C, weight.shape[0]).to(ref.device, ref.dtype)
        with torch.no_grad():
            tuner.source_head.weight.copy_(weight)
            tuner.source_head.bias.copy_(bias)
        tuner.register_buffer("cotuning_relationship", torch.full((tuner.num_classes, weight.shape[0]), float("nan"),
                                                                  device=ref.device, dtype=ref.dtype))

    def prepare(self, tuner, train_set, out_dir) -> None:
        def compute():
            probs, labels = source_probabilities(tuner, train_set)
            return class_relationship(probs, labels, tuner.num_classes).cpu()

        key = dataset_digest(tuner, train_set, None, "cotuning", tuner.backbone.state_dict(),
                             tuner.source_head.state_dict())
        rel = cached(out_dir, CACHE_FILE, key, compute, "cotuning: relationship p(y_s | y_t)")
        tuner.cotuning_relationship.copy_(rel)
        self.prepared = True

    def weights(self) -> dict[str, float]:
        return dict(cotuning=self.opts["lam"])

    def loss_terms(self, tuner, views, labels, f0, logits) -> dict[str, torch.Tensor]:
        if not self.prepared:
            raise RuntimeError("cotuning: call model.prepare(train_set, out_dir) before training (it computes "
                               "the relationship p(y_s | y_t); the trainer does this)")
        source_logits = tuner.source_head(f0.mean((2, 3)))
        return dict(cotuning=soft_cross_entropy(source_logits, tuner.cotuning_relationship[labels]))

    def param_groups(self, tuner, lr: float, backbone_mult: float) -> list[dict]:
        return super().param_groups(tuner, lr, backbone_mult) + [
            dict(params=list(tuner.source_head.parameters()), lr=lr * SOURCE_HEAD_LR_MULT, name="source_head")]
