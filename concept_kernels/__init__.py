"""concept_kernels: fast, fused building blocks for Concept-Tuning (Yang, Huang, Wei, ICCV 2023).

>>> import concept_kernels as ck
>>> ck.ot_similarity, ck.channel_attention, ck.position_attention, ck.nn.DualAttention  # doctest: +ELLIPSIS
(...)

``python -m concept_kernels.info`` lists what is built and which backend runs each op here.
"""
from . import nn
from ._backends import BackendUnavailableError
from .method import (
    ClassQueues,
    concept_contrastive_loss,
    image_contrastive_loss,
    momentum_update_,
    search_concept_patches,
)
from .nn import information_bottleneck_kl
from .ops import channel_attention, ot_similarity, position_attention

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ClassQueues",
    "channel_attention",
    "concept_contrastive_loss",
    "image_contrastive_loss",
    "information_bottleneck_kl",
    "momentum_update_",
    "nn",
    "ot_similarity",
    "position_attention",
    "search_concept_patches",
]
