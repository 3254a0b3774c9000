"""The momentum key encoder and class queues that Bi-Tuning and Concept-Tuning share (method_spec §4)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

import concept_kernels as ck


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order (identity outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def add_key_encoder(tuner, queue_patches: int) -> None:
    """tuner.key_backbone / key_head: frozen copies of the query's (EMA-updated each step), and
    tuner.queues: per-class queues of K image keys and of K x ``queue_patches`` patch keys."""
    tuner.key_backbone = copy.deepcopy(tuner.backbone).requires_grad_(False)
    tuner.key_head = copy.deepcopy(tuner.head).requires_grad_(False)
    tuner.queues = ck.ClassQueues(tuner.num_classes, tuner.queue_len, tuner.num_classes, queue_patches)


def key_pass(tuner, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature map (B, C, h, w), logits (B, Cls)) of the key encoder on x (B, 3, H, W)."""
    f = tuner.features(tuner.key_backbone, x)
    return f, tuner.key_head(f.mean((2, 3)))


@torch.no_grad()
def momentum_update(tuner) -> None:
    """key <- m key + (1 - m) query, m = ``tuner.momentum``."""
    ck.momentum_update_(nn.ModuleList([tuner.key_backbone, tuner.key_head]),
                        nn.ModuleList([tuner.backbone, tuner.head]), tuner.momentum)


def enqueue(tuner, z_k: torch.Tensor, zk_p: torch.Tensor, labels: torch.Tensor) -> None:
    """Push this step's image keys (B, Cls) and patch keys (B, P, Cls), all-gathered over ranks."""
    tuner.queues.enqueue(gather(z_k), gather(zk_p.contiguous()), gather(labels))
