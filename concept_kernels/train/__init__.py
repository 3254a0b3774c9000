"""Concept-Tuning fine-tuning on timm models: the method as a module, baselines, a small trainer.

>>> from concept_kernels.train import ConceptTuner, create_backbone   # doctest: +SKIP
>>> net = ConceptTuner(create_backbone("tf_efficientnet_lite0"), num_classes=10, image_size=(96, 96))
>>> out = net.step(views, labels)      # views (4, B, 3, 96, 96): {"loss", "logits", "ce", "img", ...}
>>> out["loss"].backward(); optimizer.step()
>>> net.eval(); net.predict(x)         # {"main": (B, 10) logits, "ib": (B, 10) logits}

CLI: ``python -m concept_kernels.train --help``; demo: ``python -m concept_kernels.train.demo``.
"""
from .backbones import create_backbone, remap_lite0
from .model import METHODS, PATCH_MODES, ConceptTuner
from .patches import grouped_batch_norm, roi_align
from .trainer import CheckpointError, Config, evaluate, run

__all__ = ["METHODS", "PATCH_MODES", "CheckpointError", "ConceptTuner", "Config", "create_backbone", "evaluate",
           "grouped_batch_norm", "remap_lite0", "roi_align", "run"]
