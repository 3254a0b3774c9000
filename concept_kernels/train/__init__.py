"""Concept-Tuning fine-tuning of timm models: the method as a module, baselines, a small trainer.

``net = ConceptTuner(create_backbone("tf_efficientnet_lite0"), num_classes=10, image_size=(96, 96))``,
``net.step(views, labels)["loss"].backward()``, ``net.eval().predict(x)``; ``python -m concept_kernels.train
--help``; ``python -m concept_kernels.train.demo``.
"""
from .backbones import create_backbone, remap_lite, remap_lite0
from .model import METHODS, PATCH_MODES, SINKHORN_STOPS, ConceptTuner
from ..method import grouped_batch_norm, roi_align
from .trainer import CheckpointError, Config, evaluate, resolve_key_momentum, run

__all__ = ["METHODS", "PATCH_MODES", "SINKHORN_STOPS", "CheckpointError", "ConceptTuner", "Config", "create_backbone",
           "evaluate", "grouped_batch_norm", "remap_lite", "remap_lite0", "resolve_key_momentum", "roi_align", "run"]
