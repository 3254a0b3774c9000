"""Class-wise key queues and the momentum-encoder update (method_spec §5.3)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float, check_has_data, check_index, check_positive, check_tensor


class ClassQueues(nn.Module):
    """Per-class FIFO queues of key embeddings (image level) and key patch sets (concept level).

    Buffers (they move with ``.to(device)`` and live in ``state_dict``):

    * ``queue_z`` (Cls, K, D): image-level keys, random unit rows at init;
    * ``queue_h`` (Cls, K, P, D): concept-level key patch sets, random unit rows at init;
    * ``ptr`` (Cls,) int64: next slot of each class (one pointer serves both queues, which the
      published code advances in lockstep).

    Losses read a ``snapshot()`` taken before ``enqueue``, so a step's own keys never reach its
    logits. ``enqueue`` writes in batch order: same-class samples take consecutive slots, and with
    more than K of one class the last K win, exactly like the published per-sample loop, but with
    no loop and no host sync.
    """

    def __init__(self, num_classes: int, length: int, dim: int, num_patches: int) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("length", length), ("dim", dim), ("num_patches", num_patches)):
            check_positive(name, v, integer=True)
        self.num_classes, self.length = num_classes, length
        self.register_buffer("queue_z", F.normalize(torch.randn(num_classes, length, dim), dim=-1))
        self.register_buffer("queue_h", F.normalize(torch.randn(num_classes, length, num_patches, dim), dim=-1))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))

    def snapshot(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Copies (queue_z, queue_h) to compute this step's logits with."""
        return self.queue_z.clone(), self.queue_h.clone()

    @torch.no_grad()
    def enqueue(self, z_k: torch.Tensor, patches_k: torch.Tensor, labels: torch.Tensor) -> None:
        """Write sample i's keys into class labels[i]'s next slot, in batch order.

        z_k: (B, D); patches_k: (B, P, D); labels: (B,) int64 in [0, Cls).
        """
        _, K, P, D = self.queue_h.shape
        B = labels.shape[0] if isinstance(labels, torch.Tensor) else -1
        check_tensor("labels", labels, ndim=1, shape_doc="(B,)", allow_empty=True)
        check_float("z_k", z_k, shape=(B, D), shape_doc="(B, D)", allow_empty=True)
        check_float("patches_k", patches_k, shape=(B, P, D), shape_doc="(B, P, D)", allow_empty=True)
        check_index("labels", labels, self.num_classes, "classes")
        check_has_data(z_k=z_k, patches_k=patches_k)
        if self.ptr.device.type == "meta":
            raise ValueError("ClassQueues buffers are on meta (no data), so enqueue would write nothing: "
                             "materialize them first, e.g. queues.to_empty(device='cpu') and re-initialize")
        if B == 0:
            return
        dev = self.ptr.device
        labels, z_k, patches_k = labels.to(dev), z_k.to(dev, self.queue_z.dtype), patches_k.to(dev, self.queue_h.dtype)
        same = labels[:, None] == labels[None, :]  # (B, B)
        rank = torch.tril(same, diagonal=-1).sum(dim=1)  # earlier same-class samples
        count = torch.zeros_like(self.ptr).index_add_(0, labels, torch.ones_like(labels))
        flat_slot = labels * K + (self.ptr[labels] + rank) % K  # (B,) into the (Cls*K) slots
        # With more than K same-class samples several write one slot and the last must win.
        # index_put has no order guarantee, so every writer of a slot writes the last one's data.
        last = torch.full((self.num_classes * K,), -1, dtype=torch.long, device=dev)
        last.scatter_reduce_(0, flat_slot, torch.arange(B, device=dev), reduce="amax")
        src = last[flat_slot]
        self.queue_z.view(-1, D)[flat_slot] = z_k[src]
        self.queue_h.view(-1, P, D)[flat_slot] = patches_k[src]
        self.ptr.copy_((self.ptr + count) % K)


@torch.no_grad()
def momentum_update_(key_module: nn.Module, query_module: nn.Module, momentum: float = 0.999) -> None:
    """EMA of parameters: k <- m k + (1 - m) q, in place, for every parameter (not buffers).

    Both modules must have the same parameters in the same order (the key encoder is a copy of the
    query encoder). One fused multi-tensor update, no per-parameter Python loop over kernels.

    A parameter that is the query's own (e.g. ``momentum_update_(m, m, 0.9)``) is its own EMA and
    stays unchanged; a key parameter that otherwise overlaps a query parameter's memory is refused,
    as are parameters on the ``meta`` device (the update would silently do nothing).

    Args:
        key_module: nn.Module updated in place.
        query_module: nn.Module read.
        momentum: m in [0, 1] (a Python number).
    """
    for name, mod in (("key_module", key_module), ("query_module", query_module)):
        if not isinstance(mod, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(mod).__name__}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a number in [0, 1], got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    named_k, named_q = list(key_module.named_parameters()), list(query_module.named_parameters())
    if len(named_k) != len(named_q):
        raise ValueError(f"key_module has {len(named_k)} parameters but query_module has {len(named_q)}")
    keys, queries = [], []
    for i, ((name_k, k), (name_q, q)) in enumerate(zip(named_k, named_q)):
        if k.shape != q.shape:
            raise ValueError(f"parameter {i}: key_module's {name_k} has shape {tuple(k.shape)}, "
                             f"query_module's {name_q} has shape {tuple(q.shape)}")
        for arg, name, t in (("key_module", name_k, k), ("query_module", name_q, q)):
            if t.device.type == "meta":
                raise ValueError(f"{arg} parameter {i} ({name}) is on meta (no data): the update would do "
                                 "nothing; materialize the module first, e.g. .to_empty(device=...)")
        if k.device != q.device:
            raise ValueError(f"parameter {i}: key_module's {name_k} is on {k.device}, "
                             f"query_module's {name_q} on {q.device}")
        if k is q or (k.data_ptr() == q.data_ptr() and k.stride() == q.stride()):
            continue  # the same memory: m q + (1 - m) q = q
        keys.append(k)
        queries.append(q)
    query_memory = {q.untyped_storage().data_ptr() for q in queries if q.numel()}
    for i, k in enumerate(keys):
        if k.numel() and k.untyped_storage().data_ptr() in query_memory:
            raise ValueError("key_module and query_module parameters overlap in memory (one is a view of "
                             "another): the in-place update would read values it already changed")
    if keys:
        torch._foreach_mul_(keys, momentum)
        torch._foreach_add_(keys, [q.detach() for q in queries], alpha=1.0 - momentum)
