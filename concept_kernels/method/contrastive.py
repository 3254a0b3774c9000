"""Image-level and concept-level contrastive losses (method_spec §5.4, §5.5) in closed form.

The published code builds, per sample, a logit row [current key, K same-class queue entries,
negatives...], stacks the rows with ``torch.cat`` and takes ``KLDivLoss(batchmean)`` of its
log-softmax against a target that is uniform (1/(K+1)) on the first K+1 entries. That equals

    loss = mean_b [ -log(K+1) - mean_{j <= K} l_bj / T + LSE_j(l_bj / T) ]

so here the positives and the log-sum-exp over all entries are computed directly: no per-sample
loop, no column reordering, no concatenated 79,641-wide rows.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._checks import check_choice, check_float, check_index, check_positive, check_same_device, check_tensor
from ..ops import ot_similarity

STOP_RULES = ("problem", "published")


def uniform_positive_kl(positives: torch.Tensor, logsumexp_all: torch.Tensor) -> torch.Tensor:
    """KLDiv(batchmean) from log_softmax to the uniform target over the positive entries.

    positives: (B, K+1) scaled logits of the positives; logsumexp_all: (B,) LSE over every scaled
    logit of the row (positives included). Returns a scalar (>= 0 up to rounding).
    """
    return (-math.log(positives.shape[1]) - positives.mean(dim=1) + logsumexp_all).mean()


def _check_labels(labels: torch.Tensor, B: int, n_cls: int) -> None:
    check_tensor("labels", labels, shape=(B,), shape_doc="(B,)")
    check_index("labels", labels, n_cls, "classes in the queue")


def image_contrastive_loss(
    z_q: torch.Tensor,
    z_k: torch.Tensor,
    queue_z: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Bi-tuning-style supervised contrastive loss on normalised logits (method_spec §5.4).

    Row b: [<z_q, z_k>, <z_q, queue_z[y_b, k]> for k < K, <z_q, queue_z[c, k]> for c != y_b] / T,
    with the first K+1 entries positive. The keys (z_k, queue) are constants: gradient flows to z_q.

    Args:
        z_q: (B, D) float query embeddings (unit rows in the method).
        z_k: (B, D) key embeddings of the same images.
        queue_z: (Cls, K, D) class queue snapshot taken before this step's enqueue.
        labels: (B,) int64 in [0, Cls).
        temperature: T > 0.

    Returns:
        scalar loss (includes the -log(K+1) entropy constant, so its minimum is 0).
    """
    check_float("z_q", z_q, ndim=2, shape_doc="(B, D)")
    B, D = z_q.shape
    check_float("z_k", z_k, shape=(B, D), shape_doc="(B, D) like z_q")
    check_float("queue_z", queue_z, ndim=3, shape_doc="(Cls, K, D)")
    n_cls, K, Dq = queue_z.shape
    if Dq != D:
        raise ValueError(f"queue_z must have shape (Cls, K, {D}) to match z_q's D, got {tuple(queue_z.shape)}")
    _check_labels(labels, B, n_cls)
    check_same_device(z_q=z_q, z_k=z_k, queue_z=queue_z, labels=labels)
    check_positive("temperature", temperature)
    keys = queue_z.detach().to(z_q.dtype)
    s_cur = (z_q * z_k.detach().to(z_q.dtype)).sum(dim=1, keepdim=True) / temperature  # (B, 1)
    s_all = (z_q @ keys.reshape(n_cls * K, D).T) / temperature  # (B, Cls*K)
    s_pos = s_all.reshape(B, n_cls, K).gather(1, labels.view(B, 1, 1).expand(B, 1, K)).squeeze(1)
    lse = torch.logsumexp(torch.cat([s_cur, s_all], dim=1), dim=1)
    return uniform_positive_kl(torch.cat([s_cur, s_pos], dim=1), lse)


def concept_contrastive_loss(
    q_patches: torch.Tensor,
    k_patches: torch.Tensor,
    queue_h: torch.Tensor,
    labels: torch.Tensor,
    confusing: torch.Tensor,
    *,
    temperature: float = 0.07,
    k_pos: int = 3,
    k_neg: int = 10,
    choice_cur: Optional[torch.Tensor] = None,
    choice_pos: Optional[torch.Tensor] = None,
    stop: str = "problem",
    eps: float = 0.01,
    max_iter: int = 200,
    tol: float = 1e-3,
) -> torch.Tensor:
    """Concept-level contrastive loss over Sinkhorn-matched patch sets (method_spec §5.5).

    Row b: [s_cur, s_pos (K), s_neg (N_conf*K*k_neg)] / T with the first K+1 entries positive:

    * s_cur = ``ot_similarity(q_patches[b], k_patches[b], select="sample", k=k_pos)``;
    * s_pos[k] = the same against ``queue_h[y_b, k]`` for k < K;
    * s_neg = ``ot_similarity(..., select="topk", k=k_neg)`` against ``queue_h[c, k]`` for every
      confusing class c of b (in order) and k < K.

    Args:
        q_patches: (B, P, D) query patch embeddings (unit rows; carries the gradient).
        k_patches: (B, P, D) key patch embeddings of the same images (constants).
        queue_h: (Cls, K, P, D) concept queue snapshot taken before this step's enqueue.
        labels: (B,) int64 in [0, Cls).
        confusing: (B, N_conf) int64 classes from ``search_concept_patches``.
        temperature: T > 0.
        k_pos / k_neg: top-k of the positive pick / of the negatives (3 and 10 as published).
        choice_cur: (B, 1) int64 in [0, k_pos) picks for s_cur; choice_pos: (B, K) for s_pos;
            drawn with ``torch.randint`` when None.
        stop: "problem" (each Sinkhorn problem stops on its own) or "published" (the published
            group rule: one mean error for the B current-key problems, one per sample for its K
            positives and one per sample for its negatives).
        eps, max_iter, tol: Sinkhorn settings (see ``ot_similarity``).

    Returns:
        scalar loss.
    """
    check_float("q_patches", q_patches, ndim=3, shape_doc="(B, P, D)")
    B, P, D = q_patches.shape
    check_float("k_patches", k_patches, shape=(B, P, D), shape_doc="(B, P, D) like q_patches")
    check_float("queue_h", queue_h, ndim=4, shape_doc="(Cls, K, P, D)")
    n_cls, K = queue_h.shape[:2]
    if queue_h.shape[2:] != (P, D):
        raise ValueError(f"queue_h must have shape (Cls, K, {P}, {D}) to match q_patches, got {tuple(queue_h.shape)}")
    _check_labels(labels, B, n_cls)
    check_tensor("confusing", confusing, ndim=2, shape_doc="(B, N_conf)")
    if confusing.shape[0] != B:
        raise ValueError(f"confusing must have shape ({B}, N_conf), got {tuple(confusing.shape)}")
    check_index("confusing", confusing, n_cls, "classes in the queue")
    # checked here so that errors name this function's arguments (ot_similarity calls them k, choice)
    for name, k in (("k_pos", k_pos), ("k_neg", k_neg)):
        check_positive(name, k, integer=True)
        if k > P * P:
            raise ValueError(f"{name} must be <= P*P = {P * P} (entries of a {P}x{P} transport plan), got {k}")
    for name, choice, M in (("choice_cur", choice_cur, 1), ("choice_pos", choice_pos, K)):
        if choice is not None:
            check_tensor(name, choice, shape=(B, M), shape_doc=f"(B, {'1' if M == 1 else 'K'})")
            check_index(name, choice, k_pos, "k_pos")
    check_same_device(q_patches=q_patches, k_patches=k_patches, queue_h=queue_h, labels=labels, confusing=confusing,
                      choice_cur=choice_cur, choice_pos=choice_pos)
    check_positive("temperature", temperature)
    check_choice("stop", stop, STOP_RULES)
    n_conf = confusing.shape[1]
    published = stop == "published"
    sinkhorn = dict(eps=eps, max_iter=max_iter, tol=tol)
    bank = queue_h.reshape(n_cls * K, P, D)  # a view: the queue is never copied
    slots = torch.arange(K, device=labels.device)
    own = torch.arange(B, device=labels.device)[:, None]
    s_cur = ot_similarity(q_patches, k_patches, own, select="sample", k=k_pos, choice=choice_cur,
                          stop="all" if published else "problem", **sinkhorn)  # (B, 1)
    s_pos = ot_similarity(q_patches, bank, labels[:, None] * K + slots, select="sample", k=k_pos,
                          choice=choice_pos, stop="row" if published else "problem", **sinkhorn)  # (B, K)
    neg_index = (confusing[:, :, None] * K + slots).reshape(B, n_conf * K)
    s_neg = ot_similarity(q_patches, bank, neg_index, select="topk", k=k_neg,
                          stop="row" if published else "problem", **sinkhorn)  # (B, Nc*K, k_neg)
    positives = torch.cat([s_cur, s_pos], dim=1) / temperature
    lse = torch.logsumexp(torch.cat([positives, s_neg.reshape(B, -1) / temperature], dim=1), dim=1)
    return uniform_positive_kl(positives, lse)
