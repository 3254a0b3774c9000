"""``python -m concept_kernels.demo`` (``make demo``): the ops at realistic Concept-Tuning shapes.

Runs one Concept-Tuning "step" worth of the method's heavy pieces on a CPU-sized batch with random
but training-like inputs: patch search, DANet attention + information bottleneck, the image- and
concept-level contrastive losses (Sinkhorn-matched patch sets against class queues), backward, and
the queue update. Prints shapes, timings, Sinkhorn iteration counts and which backend ran each op.
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import concept_kernels as ck
from concept_kernels import _backends
from concept_kernels.info import report
from concept_kernels.ops.ot_similarity.reference import sinkhorn_log
from concept_kernels.testing import feature_map, logit_like_rows


@contextmanager
def timed(label: str, rows: list):
    t0 = time.perf_counter()
    yield
    rows.append((label, time.perf_counter() - t0))


def run(batch: int, channels: int, classes: int, queue: int, confusing: int, patches: int, seed: int) -> None:
    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    print(f"Concept-Tuning pieces, batch {batch}, {channels}-channel 7x7 maps (224 px), {classes} classes, "
          f"queue {queue}/class, {confusing} confusing classes, {patches} patches per image\n")
    rows: list = []
    feats = feature_map(batch, channels, 7, 7, seed=seed).requires_grad_(True)
    head = torch.nn.Linear(channels, classes)
    labels = torch.randint(classes, (batch,))
    ib = ck.nn.InformationBottleneckHead(channels, classes, latent_dim=512)
    with torch.no_grad():  # non-zero gammas so the attention actually contributes
        ib.encoder[0].sa.gamma.fill_(0.1)
        ib.encoder[0].sc.gamma.fill_(0.1)
    queues = ck.ClassQueues(classes, queue, classes, patches)
    with timed("patch search (boxes + confusing classes)", rows):
        logits = head(feats.detach().mean((2, 3)))
        boxes, conf = ck.search_concept_patches(feats.detach(), logits, labels, head.weight, (224, 224),
                                                num_confusing=confusing, num_patches=patches)
    with timed("DANet + information bottleneck (fwd)", rows):
        ib_logits, mu, sigma = ib(feats)
        loss_ib = F.cross_entropy(ib_logits, labels) + 5e-3 * ck.information_bottleneck_kl(mu, sigma)
    z_q = F.normalize(torch.randn(batch, classes), dim=1).requires_grad_(True)
    z_k = F.normalize(torch.randn(batch, classes), dim=1)
    q_patches = logit_like_rows(batch, patches, classes=classes).requires_grad_(True)
    k_patches = logit_like_rows(batch, patches, classes=classes)
    snap_z, snap_h = queues.snapshot()
    with timed("image-level contrastive loss", rows):
        loss_img = ck.image_contrastive_loss(z_q, z_k, snap_z, labels)
    with timed("concept-level contrastive loss (Sinkhorn)", rows):
        loss_con = ck.concept_contrastive_loss(q_patches, k_patches, snap_h, labels, conf)
    with timed("backward of all losses", rows):
        (loss_ib + loss_img + loss_con).backward()
    with timed("queue enqueue", rows):
        queues.enqueue(z_k, k_patches, labels)

    n_problems = batch * (1 + queue + confusing * queue)
    idx = (conf[:, :, None] * queue + torch.arange(queue)).reshape(batch, -1)[:, :64]
    keys = snap_h.reshape(-1, patches, classes)[idx]
    cost = 1 - torch.einsum("bpd,bmqd->bmpq", q_patches.detach(), keys).reshape(-1, patches, patches)
    _, _, iters = sinkhorn_log(cost, eps=0.01, max_iter=200, tol=1e-3)
    for label, secs in rows:
        print(f"  {label:45s} {secs * 1e3:9.1f} ms")
    print(f"\n  losses: image {loss_img.item():.4f}  concept {loss_con.item():.4f}  IB {loss_ib.item():.4f}")
    print(f"  boxes {tuple(boxes.shape)}, first: {boxes[0].tolist()}")
    print(f"  {n_problems:,} Sinkhorn problems of {patches}x{patches} this step; "
          f"iterations per problem (sample of 64 x {batch}): mean {iters.float().mean():.1f}, max {int(iters.max())}")
    print("\n  backend that ran each op here:")
    for op in ("ot_similarity", "channel_attention", "position_attention"):
        print(f"    {op:20s} {_backends.select(op, cpu).name}")
    print("\n" + report())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--queue", type=int, default=40)
    p.add_argument("--confusing", type=int, default=99)
    p.add_argument("--patches", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run(a.batch, a.channels, a.classes, a.queue, a.confusing, a.patches, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
