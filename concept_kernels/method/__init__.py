"""The non-kernel parts of Concept-Tuning, vectorized: patch search, patch encoding (crops, per-position
batch norm), losses, queues, EMA."""
from .contrastive import concept_contrastive_loss, image_contrastive_loss, uniform_positive_kl
from .patch_encoding import fixed_batch_norm, grouped_batch_norm, roi_align
from .patch_search import search_concept_patches
from .queues import ClassQueues, momentum_update_

__all__ = [
    "ClassQueues",
    "concept_contrastive_loss",
    "fixed_batch_norm",
    "grouped_batch_norm",
    "image_contrastive_loss",
    "momentum_update_",
    "roi_align",
    "search_concept_patches",
    "uniform_positive_kl",
]
