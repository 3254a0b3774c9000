"""One full published Concept-Tuning training iteration, loop by loop (oracle for whole-step tests).

Written only from the prose specification ``/work/shared/docs/method_spec.md`` §3-§6 (mostly §4
"Training step" and §5). It imports NOTHING from ``concept_kernels``; it reuses the independent
component oracles of ``oracle.py`` (Sinkhorn selection, patch search, queues, losses, DANet, IB KL,
EMA). It is slow on purpose (per-sample / per-patch Python loops, one forward per patch position)
and is meant for float64 comparisons.

The published geometry is hard-coded, as in the published code: 224 px inputs, a 7x7 feature map
(stride 32), 2048 channels (group offsets ``arange(0, 2048, 250)``), P = 9 patches of 64 px.

What the published code does and this oracle deliberately leaves out (no effect on any value
compared; spec §8.7):

* the IB/DANet branch inside the 9 query patch passes and inside every key-encoder pass: its outputs
  are discarded (it only consumes random numbers), so the query patch passes and the key encoder run
  backbone + GAP + head only. The key encoder's IB copy would be EMA'd but is never read;
* augmentation: the four views are given tensors;
* the shuffle/un-shuffle of the patch passes is kept (a seeded local permutation): per-batch BN
  statistics do not depend on it, which this oracle thereby also exercises.

Randomness is passed in: the IB noise ``xi`` (B, d_IB) of the view-0 pass and the POS picks
``r_cur`` (B,) / ``r_pos`` (B, K) in {0, 1, 2} (spec §5.6).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from oracle import (
    QueuesPublished,
    contrastive_losses_published,
    danet_published,
    ib_kl_published,
    momentum_update_published,
    search_patches_published,
)

IMG, STRIDE, CELLS, PATCH, P = 224, 32, 7, 64, 9

__all__ = ["PublishedClassifier", "PublishedConceptTuning", "roi_align_published",
           "classifier_param_order_ok"]


# ---------------------------------------------------------------------------------------------
# 5.2 step 1: RoIAlign(aligned=True, sampling_ratio adaptive), transcribed per axis
# ---------------------------------------------------------------------------------------------
def _roi_axis_weights(start: float, end: float, out: int, size: int, dtype) -> torch.Tensor:
    """(out, size) matrix A with A[o, k] = the RoIAlign weight of input pixel k in output bin o
    along one axis. RoIAlign's bilinear sample weight is a product of a row and a column factor and
    its validity test is per axis, so a crop is ``A_y @ I @ A_x^T`` per channel.

    Per bin o: ``grid = ceil(roi / out)`` samples at ``start + o * bin + (s + 0.5) * bin / grid``
    (start already shifted by -0.5: aligned=True); a sample outside [-1, size] contributes 0; one
    at <= 0 is moved to 0; low = floor(pos), high = low + 1 (both the last pixel, and pos = low,
    when low >= size - 1); weights (1 - frac, frac); the bin averages its grid samples.
    """
    roi = end - start
    bin_sz = roi / out
    grid = max(int(math.ceil(roi / out)), 1)
    A = torch.zeros(out, size, dtype=dtype)
    for o in range(out):
        for s in range(grid):
            pos = start + o * bin_sz + (s + 0.5) * bin_sz / grid
            if pos < -1.0 or pos > size:
                continue
            pos = max(pos, 0.0)
            low = int(math.floor(pos))
            if low >= size - 1:
                low = high = size - 1
                pos = float(low)
            else:
                high = low + 1
            frac = pos - low
            A[o, low] += (1.0 - frac) / grid
            A[o, high] += frac / grid
    return A


def roi_align_published(img: torch.Tensor, box: Sequence[float], out: int = PATCH) -> torch.Tensor:
    """img (3, H, W), box (x1, y1, x2, y2) in pixels -> (3, out, out) RoIAlign crop (aligned=True,
    spatial_scale 1, adaptive sampling). A 64-px box at integer coordinates is an exact crop
    (asserted here); a clipped 32-px box is bilinearly upsampled x2."""
    x1, y1, x2, y2 = (float(v) for v in box)
    _, H, W = img.shape
    Ay = _roi_axis_weights(y1 - 0.5, y2 - 0.5, out, H, img.dtype)
    Ax = _roi_axis_weights(x1 - 0.5, x2 - 0.5, out, W, img.dtype)
    rows = Ay.any(0).nonzero().squeeze(1)  # the window the weights touch (speed only)
    cols = Ax.any(0).nonzero().squeeze(1)
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = torch.einsum("oh,chw,pw->cop", Ay[:, r0:r1], img[:, r0:r1, c0:c1], Ax[:, c0:c1])
    if x2 - x1 == out and y2 - y1 == out and x1 == int(x1) and y1 == int(y1):
        exact = img[:, int(y1): int(y2), int(x1): int(x2)]
        assert torch.equal(crop, exact), "a full-size integer box must be an exact pixel crop"
        crop = exact.clone()
    return crop


# ---------------------------------------------------------------------------------------------
# 3.1 the classifier (query: with the IB branch; key: backbone + head)
# ---------------------------------------------------------------------------------------------
class _PAMWeights(nn.Module):
    def __init__(self, C: int, inner: int):
        super().__init__()
        self.query_conv = nn.Conv2d(C, inner, 1)
        self.key_conv = nn.Conv2d(C, inner, 1)
        self.value_conv = nn.Conv2d(C, C, 1)
        self.gamma = nn.Parameter(torch.zeros(1))


class _CAMWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))


class _DANet(nn.Module):
    """Holds the published DANet parameters (state-dict names sa.* / sc.*); the forward is the
    component oracle ``danet_published`` (CAM + PAM, a sum)."""

    def __init__(self, C: int, inner: int):
        super().__init__()
        self.sa, self.sc = _PAMWeights(C, inner), _CAMWeights()

    def forward(self, x):
        sa = self.sa
        return danet_published(x, self.sc.gamma, sa.gamma, sa.query_conv.weight, sa.query_conv.bias,
                               sa.key_conv.weight, sa.key_conv.bias, sa.value_conv.weight,
                               sa.value_conv.bias)


class PublishedClassifier(nn.Module):
    """backbone (B,3,224,224) -> f (B,2048,7,7); h = GAP(f); y = head(h); with ``ib``:
    IB_encoder = [DANet, GAP, Flatten, Linear(C, 2L)], IB_decoder = Linear(L, Cls)."""

    def __init__(self, backbone: nn.Module, C: int, num_classes: int, latent: Optional[int]):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(C, num_classes)
        self.latent = latent
        if latent is not None:
            self.IB_encoder = nn.Sequential(_DANet(C, C // 8), nn.AdaptiveAvgPool2d(1),
                                            nn.Flatten(), nn.Linear(C, 2 * latent))
            self.IB_decoder = nn.Linear(latent, num_classes)

    def set_bn_momentum(self, m: float) -> None:
        """The published recover_bn (0.1) / fix_bn (0.0)."""
        for mod in self.backbone.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.momentum = m

    def features(self, x):
        f = self.backbone(x)
        return f, f.mean(dim=(2, 3))

    def forward(self, x, xi: Optional[torch.Tensor] = None):
        """-> y, h, f, and with the IB branch (xi (B, L) given): ib_logits, mu, sigma."""
        f, h = self.features(x)
        y = self.head(h)
        if xi is None:
            return y, h, f
        s = self.IB_encoder(f)
        mu = s[:, : self.latent]
        sigma = F.softplus(s[:, self.latent:] - 5.0, beta=1)
        z = mu + xi * sigma  # z = mu + xi (.) sigma, xi ~ N(0, I) given
        return y, h, f, self.IB_decoder(z), mu, sigma


# ---------------------------------------------------------------------------------------------
# §4 + §5: one training iteration
# ---------------------------------------------------------------------------------------------
class PublishedConceptTuning:
    """The published training state and ``step``: encoder_q (with IB), encoder_k (EMA copy),
    class queues in the published layouts, and SGD (Nesterov 0.9, wd 5e-4, backbone lr x0.1).

    Args:
        q: PublishedClassifier with the IB branch (trained).
        k: PublishedClassifier without it (key encoder; parameters follow q's order).
        queues: QueuesPublished (queue_z (D, Cls, K), queue_h (Cls, K, P, D)).
        n_conf, m, T, lr: N_conf, key momentum, temperature, base lr.
        weights: (img, con, ce_ib, kl) loss weights (published 1, 1, 1, 0.005).
    """

    def __init__(self, q: PublishedClassifier, k: PublishedClassifier, queues: QueuesPublished, *,
                 n_conf: int, m: float = 0.999, T: float = 0.07, lr: float = 0.01,
                 backbone_mult: float = 0.1, weights=(1.0, 1.0, 1.0, 5e-3), perm_seed: int = 0):
        self.q, self.k, self.queues = q, k, queues
        self.n_conf, self.m, self.T = n_conf, m, T
        self.weights = weights
        for p in self.k.parameters():
            p.requires_grad_(False)
        heads = [*q.head.parameters(), *q.IB_encoder.parameters(), *q.IB_decoder.parameters()]
        groups = [dict(params=list(q.backbone.parameters()), lr=lr * backbone_mult),
                  dict(params=heads, lr=lr)]  # the published (empty) bottleneck group is left out
        self.opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.perm_gen = torch.Generator().manual_seed(perm_seed)

    # -- §5.2 -------------------------------------------------------------------------------
    def encode_patches(self, enc: PublishedClassifier, I: torch.Tensor,
                       boxes: torch.Tensor) -> torch.Tensor:
        """I (B, 3, 224, 224), boxes (B*9, 5) sample-major -> Z_p (B, 9, Cls) unit rows.
        Nine SEPARATE passes (one per patch position, BN batch statistics of those B patches)
        through the full backbone in its current BN mode, GAP, a detached copy of the head."""
        B = I.shape[0]
        rows = [boxes[i * P + p] for i in range(B) for p in range(P)]  # sample-major
        crops = torch.stack([roi_align_published(I[int(r[0])], r[1:].tolist()) for r in rows])
        crops = crops.view(B, P, *crops.shape[1:])  # (B, 9, 3, 64, 64)
        head_copy_w = enc.head.weight.detach().clone()  # head' = deepcopy(head): no grad to head
        head_copy_b = enc.head.bias.detach().clone()
        outs: List[torch.Tensor] = []
        for p in range(P):
            perm = torch.randperm(B, generator=self.perm_gen)
            inv = torch.argsort(perm)
            _, h = enc.features(crops[perm, p])  # layer4 map 2x2, h = GAP
            z = F.normalize(F.linear(h, head_copy_w, head_copy_b), dim=1)
            outs.append(z[inv])
        return torch.stack(outs, dim=1)

    def step(self, views: Sequence[torch.Tensor], y: torch.Tensor, xi: torch.Tensor,
             r_cur: torch.Tensor, r_pos: torch.Tensor) -> Dict[str, object]:
        """One iteration: forward (§4 steps 1-8), backward, SGD step (step 9).

        views: 4 tensors (B, 3, 224, 224); y (B,) int64; xi (B, L); r_cur (B,); r_pos (B, K).
        Returns dict with the loss parts ("loss", "ce", "img", "con", "ce_ib", "kl"; detached),
        "grads" {q parameter name: grad before the SGD step}, "conf", "boxes_q", "boxes_k",
        "Zq_p", "Zk_p" (detached) and "sinkhorn" (iteration counts per call). BN buffers are those of
        real train-mode nn.BatchNorm* passes: every pass counts num_batches_tracked (the query's 9
        patch passes too, at momentum 0), the key's 9 patch passes move its running stats 9 times.
        """
        q, k = self.q, self.k
        q.train()
        k.train()
        # 1.-2. query view 0, BN momentum 0.1
        q.set_bn_momentum(0.1)
        y_q, _, _, ib_logits, mu, sigma = q(views[0], xi)
        z_q = F.normalize(y_q, dim=1)
        # 3. BN momentum 0 for the query patch passes (still batch statistics: train mode)
        q.set_bn_momentum(0.0)
        # 4. key encoder (PRE-EMA weights) on view 2 -> search -> 9 query patch passes (grad)
        with torch.no_grad():
            y_q2, _, f_q2 = k(views[2])
            W_k = k.head.weight.detach().clone()  # deepcopy of the key head
            boxes_q, conf = search_patches_published(f_q2.clone(), y_q2, y, W_k, self.n_conf)
        Zq_p = self.encode_patches(q, views[2], boxes_q)
        # 5. EMA (parameters only), key passes on views 1 and 3, key search, 9 key patch passes
        with torch.no_grad():
            k_params = list(k.parameters())  # (backbone, head): q's leading parameters
            momentum_update_published(k_params, list(q.parameters())[: len(k_params)], self.m)
            z_k = F.normalize(k(views[1])[0], dim=1)
            y_k2, _, f_k2 = k(views[3])
            W_k = k.head.weight.detach().clone()
            boxes_k, _ = search_patches_published(f_k2.clone(), y_k2, y, W_k, self.n_conf)
            # key BN: train mode at its own momentum (0.1): the 9 passes move the running stats
            Zk_p = self.encode_patches(k, views[3], boxes_k)
        # 6.-7. logits on the pre-step queue snapshot, enqueue per sample inside the loop
        L_img, L_con, _, _, info = contrastive_losses_published(
            z_q, z_k, Zq_p, Zk_p, y, conf, self.queues, T=self.T, r_cur=r_cur, r_pos=r_pos,
            return_info=True)
        L_kl = ib_kl_published(mu, sigma)
        ce = F.cross_entropy(y_q, y)
        ce_ib = F.cross_entropy(ib_logits, y)
        w_img, w_con, w_ce_ib, w_kl = self.weights
        loss = ce + w_img * L_img + w_con * L_con + w_ce_ib * ce_ib + w_kl * L_kl
        # 9. zero_grad; backward; SGD
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in q.named_parameters() if p.grad is not None}
        self.opt.step()
        parts = dict(loss=loss, ce=ce, img=L_img, con=L_con, ce_ib=ce_ib, kl=L_kl)
        out: Dict[str, object] = {n: v.detach() for n, v in parts.items()}
        out.update(grads=grads, conf=conf, boxes_q=boxes_q, boxes_k=boxes_k, Zq_p=Zq_p.detach(),
                   Zk_p=Zk_p.detach(), sinkhorn=dict(cur=info["n_iter_cur"], pos=info["n_iter_pos"],
                                                     neg=info["n_iter_neg"]))
        return out


def classifier_param_order_ok(q: PublishedClassifier, k: PublishedClassifier) -> Tuple[bool, str]:
    """The EMA zips k's parameters with q's leading ones: check names align (backbone, head)."""
    kn = [n for n, _ in k.named_parameters()]
    qn = [n for n, _ in q.named_parameters()][: len(kn)]
    return kn == qn, f"{kn} vs {qn}"
