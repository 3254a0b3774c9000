"""Training-free transferability ranking of candidate backbones with KITE (Guo 2024).

``python -m concept_kernels.transferability --data builtin:digits --models tf_efficientnet_lite0,...`` ranks
timm models for a target training set by KITE = CKA(K_pretrained, K_labels) / CKA(K_pretrained, K_random)
(linear CKA on globally pooled features; K_random from a random initialisation of the same architecture).
Library use: ``kite_score(features, labels, random_features)`` (:mod:`.cka`, no timm needed) and
``score_model(name, make_dataset)`` / ``pooled_features(backbone, dataset)`` (:mod:`.features`).
"""
from .cka import KiteScore, kite_score, linear_cka, one_hot
from .features import Candidate, pooled_features, score_model

__all__ = ["Candidate", "KiteScore", "kite_score", "linear_cka", "one_hot", "pooled_features", "score_model"]
