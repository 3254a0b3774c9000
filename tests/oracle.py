"""Independent loop-by-loop oracle of the published Concept-Tuning algorithm.

Written only from the prose specification ``/work/shared/docs/method_spec.md`` (sections 3.2,
5.1-5.8 and 9).  It deliberately does NOT import anything from ``concept_kernels`` and it copies no
code from any repository.  Everything here uses plain PyTorch, per-sample Python loops and one
blocking ``.item()`` per Sinkhorn iteration, i.e. the published *call pattern*; it is slow on
purpose and works in float32 or float64 (use float64 for comparisons).

All functions use the PUBLISHED tensor layouts.  The mapping onto the layouts of the vectorised
reference (the public functions of ``concept_kernels``) is documented in each docstring, and small converter helpers
are provided at the bottom of this module:

=====================  ==========================  ============================================
object                 published (this module)     API contract
=====================  ==========================  ============================================
image queue            queue_z (D, Cls, K)         queue_z (Cls, K, D)  -> queue_z_to_api
concept queue          queue_h (Cls, K, P, D)      queue_h (Cls, K, P, D)  (identical)
queue pointers         ptr_z (Cls,), ptr_h (Cls,)  ptr (Cls,)  (published pointers always equal)
Sinkhorn output        C = 1 - cos (cost)          1 - C (similarity)
POS random pick        r (P,) of one call          choice (B, M)  -> picks_to_api
patch boxes            (B*9, 5) sample-major       (B*P, 5) sample-major (identical)
confusing classes      (B, Nconf) int64            (B, num_confusing) int64 (identical)
=====================  ==========================  ============================================
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal, kl_divergence

__all__ = [
    "sinkhorn_plan_published",
    "sinkhorn_distance_published",
    "search_patches_published",
    "QueuesPublished",
    "contrastive_losses_published",
    "cam_published",
    "pam_published",
    "danet_published",
    "ib_kl_published",
    "momentum_update_published",
    "queue_z_to_api",
    "queue_z_from_api",
    "picks_to_api",
    "picks_from_api",
    "sinkhorn_call_to_api",
    "kl_batchmean_to_uniform_positives",
]


# ---------------------------------------------------------------------------------------------
# 5.6  "SinkhornDistance"  (OTsel)
# ---------------------------------------------------------------------------------------------
def sinkhorn_plan_published(C: torch.Tensor, eps: float = 0.01, max_iter: int = 200,
                            thresh: float = 1e-3):
    """Log-domain Sinkhorn exactly as written in the published routine (spec 5.6).

    C: (P, n, m) cost (any grad state; the caller passes a detached C).
    Returns ``(f, g, pi, n_iter, errs)``: duals f (P, n) and g (P, m) after the last update,
    plan pi = exp(M(C, f, g)) (P, n, m), the number of iterations actually run and the list of
    per-iteration errors (python floats).

    Published form, per iteration (M_ij = (-C_ij + f_i + g_j) / eps):
        f <- eps * (log(a + 1e-8) - LSE_j M_ij(f, g)) + f
        g <- eps * (log(b + 1e-8) - LSE_i M_ij(f_new, g)) + g
        err = mean over problems of sum_i |f - f_old|
        if err.item() < thresh: break           (batch-mean stop, one host sync per iteration)
    """
    P, n, m = C.shape
    # uniform marginals (built in C's dtype so a float64 run stays float64)
    a = torch.full((P, n), 1.0 / n, dtype=C.dtype, device=C.device)
    b = torch.full((P, m), 1.0 / m, dtype=C.dtype, device=C.device)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)

    def M(f_, g_):
        return (-C + f_.unsqueeze(-1) + g_.unsqueeze(-2)) / eps

    n_iter = 0
    errs: List[float] = []
    for _ in range(max_iter):
        f_old = f
        f = eps * (torch.log(a + 1e-8) - torch.logsumexp(M(f, g), dim=-1)) + f
        g = eps * (torch.log(b + 1e-8) - torch.logsumexp(M(f, g).transpose(-2, -1), dim=-1)) + g
        err = (f - f_old).abs().sum(-1).mean()
        n_iter += 1
        e = err.item()  # the published blocking sync
        errs.append(e)
        if e < thresh:
            break
    pi = torch.exp(M(f, g))
    return f, g, pi, n_iter, errs


def sinkhorn_distance_published(x: torch.Tensor, y: torch.Tensor, pos: bool,
                                r: Optional[torch.Tensor] = None, eps: float = 0.01,
                                max_iter: int = 200, thresh: float = 1e-3,
                                return_info: bool = False):
    """Published ``SinkhornDistance`` / OTsel(X, Y, mode) (spec 5.6).

    x: (Px, n, d) with Px in {1, P}; repeated P times along dim 0 when Px == 1 and P != 1.
    y: (P, m, d).  C = 1 - x @ y^T  (P, n, m), the cosine distance for unit rows.
    Iterations run on ``C.detach()`` (spec: bit-identical); the returned values are gathered from
    the grad-carrying C so gradients flow to x (and y if it requires grad).

    pos=True  (POS): indices of the 3 largest plan entries of each problem's flattened plan
              (descending), pick the r[p]-th one; r (P,) int64 in {0,1,2}, drawn with
              ``torch.randint(3, (P,))`` (CPU RNG) when None.  Returns C at that entry, (P,).
    pos=False (NEG): C at the 10 largest plan entries in descending plan order, flattened
              problem-major, (10*P,).

    return_info=True additionally returns a dict with n_iter, errs, f, g, pi, C, r, idx.

    API mapping (``ck.ot_similarity`` returns 1 - C):
      * one published per-sample call ``OTsel(q (1,n,d), bank (P,m,d))`` ==
        ``1 - ck.ot_similarity(q, bank, arange(P)[None], select=..., stop="row")[0]``
        with POS ``choice = r[None]`` (k=3) / NEG ``k=10`` (output (1,P,10).reshape(-1)).
      * the batched "current key" call ``OTsel(Zq (B,n,d), Zk (B,m,d), POS)`` ==
        ``1 - ck.ot_similarity(Zq, Zk, arange(B)[:, None], choice=r[:, None], stop="all")[:, 0]``.
      See ``sinkhorn_call_to_api``.
    """
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(f"x and y must be 3-D, got {tuple(x.shape)} and {tuple(y.shape)}")
    P = y.shape[0]
    if x.shape[0] == 1 and P != 1:
        x = x.repeat(P, 1, 1)
    if x.shape[0] != P:
        raise ValueError(f"x has {x.shape[0]} problems, y has {P}")
    C = 1 - torch.matmul(x, y.transpose(-2, -1))  # (P, n, m), grad-carrying
    with torch.no_grad():
        f, g, pi, n_iter, errs = sinkhorn_plan_published(C.detach(), eps, max_iter, thresh)
    Cf = C.reshape(P, -1)
    pif = pi.reshape(P, -1)
    rows = torch.arange(P, device=C.device)
    if pos:
        idx = torch.topk(pif, 3, dim=-1).indices  # (P, 3) descending plan order
        if r is None:
            r = torch.randint(3, (P,))  # CPU RNG, one draw per problem
        r = r.to(device=C.device, dtype=torch.long).reshape(P)
        sel = idx[rows, r]
        out = Cf[rows, sel]  # (P,)
    else:
        idx = torch.topk(pif, 10, dim=-1).indices  # (P, 10) descending plan order
        out = torch.gather(Cf, 1, idx).reshape(-1)  # (10P,) problem-major
    if return_info:
        return out, dict(n_iter=n_iter, errs=errs, f=f, g=g, pi=pi, C=C, r=r, idx=idx)
    return out


# ---------------------------------------------------------------------------------------------
# 5.1  Concept-patch search (original geometry: 7x7 map, stride 32, input 224)
# ---------------------------------------------------------------------------------------------
def search_patches_published(Fmap: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                             W: torch.Tensor, n_conf: int, patch_num: int = 9,
                             channel_num: int = 30, patch_size: int = 64,
                             return_lowest_group: bool = False):
    """Published ``_search_patches`` (spec 5.1), per-sample Python loop.

    Fmap (B, C, 7, 7) layer4 map (detached clone is used); logits (B, Cls); y (B,) int64;
    W (Cls, C) head weight; n_conf in [3, Cls-1].
    Group offsets are ``arange(0, C, 250)[:patch_num]`` (hard-coded stride 250 as published), so
    C must give at least ``patch_num`` offsets (C > 2000 for 9 patches).  Input 224, stride 32
    and the 7x7 map are hard-coded as published.

    Returns ``(boxes, conf)``: boxes (B*patch_num, 5) in Fmap's float dtype, rows
    (i, x1, y1, x2, y2), sample-major; conf (B, n_conf) int64, most confusing first.
    With return_lowest_group=True also returns the discarded 10th maps (B, 7, 7) of the 30
    lowest-ranked channels (computed by the published code and dropped).

    API mapping: identical layouts to
    ``ck.search_concept_patches(Fmap, logits, y, W, (224, 224), num_confusing=n_conf)``; for
    C == 2048 the API defaults give group_stride=250, channels_per_group=30, patch_size=64; for
    any other C pass ``group_stride=250, channels_per_group=channel_num, patch_size=patch_size``
    explicitly.
    """
    B, Cch, h, w = Fmap.shape
    if (h, w) != (7, 7):
        raise ValueError(f"published geometry needs a 7x7 map, got {h}x{w}")
    offsets = torch.arange(0, Cch, 250)
    assert len(offsets) >= patch_num, (
        f"C={Cch} gives only {len(offsets)} offsets arange(0, C, 250); need {patch_num}")
    offsets = offsets[:patch_num]
    Cls = logits.shape[1]
    assert 3 <= n_conf <= Cls - 1, f"n_conf={n_conf} must be in [3, {Cls - 1}]"
    feat = Fmap.detach().clone()
    Wd = W.detach()
    logits_np = logits.detach().cpu()
    half = patch_size // 2
    stride, img = 32, 224

    boxes: List[torch.Tensor] = []
    confs: List[torch.Tensor] = []
    lowest: List[torch.Tensor] = []
    for i in range(B):
        yi = int(y[i])
        # 1. confusing classes: sort descending, first n_conf+1, drop the true class, keep n_conf
        order = torch.sort(logits_np[i], descending=True, stable=True).indices
        cand = order[: n_conf + 1]
        cand = cand[cand != yi]
        conf_i = cand[:n_conf]
        confs.append(conf_i)
        # 2. channel score
        s = 3 * Wd[yi] - Wd[conf_i[0]] - Wd[conf_i[1]] - Wd[conf_i[2]]
        # 3. full descending ranking (top-k with k = C)
        ranked = torch.topk(s, Cch).indices
        # 4./5. groups and attentive maps (plain sums); the 10th group is computed and dropped
        maps = [feat[i, ranked[o: o + channel_num]].sum(dim=0) for o in offsets.tolist()]
        low_map = feat[i, ranked[-channel_num:]].sum(dim=0)
        lowest.append(low_map)
        maps = maps[:patch_num]
        # 6. peak -> box
        for A in maps:
            p = int(torch.argmax(A.reshape(-1)))  # first max, row-major
            r_, q_ = p // 7, p % 7
            x, yy = stride * q_, stride * r_  # top-left corner of the cell
            boxes.append(torch.tensor([i, max(0, x - half), max(0, yy - half),
                                       min(img, x + half), min(img, yy + half)],
                                      dtype=Fmap.dtype if Fmap.is_floating_point()
                                      else torch.float32))
    boxes_t = torch.stack(boxes).to(Fmap.device)
    conf_t = torch.stack(confs).to(torch.long)
    if return_lowest_group:
        return boxes_t, conf_t, torch.stack(lowest)
    return boxes_t, conf_t


# ---------------------------------------------------------------------------------------------
# 5.3  Queues and momentum
# ---------------------------------------------------------------------------------------------
class QueuesPublished:
    """Published class-wise queues (spec 5.3).

    queue_z (D, Cls, K): randn normalised along dim 0 (feature dim first!).
    queue_h (Cls, K, P, D): randn normalised along the last dim.
    ptr_z, ptr_h (Cls,) int64: two separate per-class pointers starting at 0 (they always advance
    together, so they are equal; the API keeps a single ``ptr``).

    API mapping (``ck.ClassQueues``): ``queue_z_api = queue_z.permute(1, 2, 0)`` (Cls, K, D),
    ``queue_h_api = queue_h`` (same layout), ``ptr_api = ptr_z``.  Use ``to_api()`` /
    ``from_api()``.
    """

    def __init__(self, num_classes: int, K: int, D: int, P: int,
                 dtype=torch.float64, generator: Optional[torch.Generator] = None):
        self.queue_z = F.normalize(torch.randn(D, num_classes, K, dtype=dtype,
                                               generator=generator), dim=0)
        self.queue_h = F.normalize(torch.randn(num_classes, K, P, D, dtype=dtype,
                                               generator=generator), dim=-1)
        self.ptr_z = torch.zeros(num_classes, dtype=torch.long)
        self.ptr_h = torch.zeros(num_classes, dtype=torch.long)

    @property
    def K(self) -> int:
        return self.queue_z.shape[2]

    def snapshot(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.queue_z.clone().detach(), self.queue_h.clone().detach()

    def enqueue_one(self, z: torch.Tensor, h: torch.Tensor, c: int) -> None:
        """One sample: queue_z[:, c, ptr_z[c]] = z ; queue_h[c, ptr_h[c]] = h ; advance both."""
        _enqueue_one(self.queue_z, self.queue_h, self.ptr_z, self.ptr_h, z, h, int(c))

    def to_api(self):
        """-> (queue_z (Cls,K,D), queue_h (Cls,K,P,D), ptr (Cls,)) as the API's ClassQueues."""
        assert torch.equal(self.ptr_z, self.ptr_h)
        return queue_z_to_api(self.queue_z), self.queue_h.clone(), self.ptr_z.clone()

    @classmethod
    def from_api(cls, queue_z_api: torch.Tensor, queue_h_api: torch.Tensor,
                 ptr: Optional[torch.Tensor] = None) -> "QueuesPublished":
        Cls, K, D = queue_z_api.shape
        obj = cls.__new__(cls)
        obj.queue_z = queue_z_from_api(queue_z_api)
        obj.queue_h = queue_h_api.detach().clone()
        p = torch.zeros(Cls, dtype=torch.long) if ptr is None else ptr.detach().clone().long()
        obj.ptr_z = p.clone()
        obj.ptr_h = p.clone()
        return obj


def _enqueue_one(queue_z, queue_h, ptr_z, ptr_h, z, h, c: int) -> None:
    K = queue_z.shape[2]
    with torch.no_grad():
        pz = int(ptr_z[c])
        queue_z[:, c, pz] = z.detach().to(queue_z.dtype)
        ptr_z[c] = (pz + 1) % K
        ph = int(ptr_h[c])
        queue_h[c, ph] = h.detach().to(queue_h.dtype)
        ptr_h[c] = (ph + 1) % K


def momentum_update_published(params_k, params_q, m: float = 0.999) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q, parameters only (BN buffers untouched).

    params_k / params_q: iterables of tensors (e.g. ``module.parameters()``) or nn.Modules.
    API mapping: ``ck.momentum_update_(key_module, query_module, momentum=m)``.
    """
    if isinstance(params_k, torch.nn.Module):
        params_k = params_k.parameters()
    if isinstance(params_q, torch.nn.Module):
        params_q = params_q.parameters()
    with torch.no_grad():
        for pk, pq in zip(list(params_k), list(params_q)):
            pk.data = pk.data * m + pq.data * (1.0 - m)


# ---------------------------------------------------------------------------------------------
# 5.4 + 5.5 + step 6: image- and concept-level contrastive losses
# ---------------------------------------------------------------------------------------------
def kl_batchmean_to_uniform_positives(logits: torch.Tensor, K: int, T: float) -> torch.Tensor:
    """KLDivLoss(reduction='batchmean')(log_softmax(logits / T), t), t = 1/(K+1) on the first
    K+1 columns, 0 elsewhere (the exact published form)."""
    targets = torch.zeros_like(logits)
    targets[:, : K + 1] = 1.0 / (K + 1)
    logp = F.log_softmax(logits / T, dim=1)
    return torch.nn.KLDivLoss(reduction="batchmean")(logp, targets)


def contrastive_losses_published(zq: torch.Tensor, zk: torch.Tensor, Zq_p: torch.Tensor,
                                 Zk_p: torch.Tensor, y: torch.Tensor,
                                 conf: Union[torch.Tensor, Sequence],
                                 queue_z, queue_h: Optional[torch.Tensor] = None,
                                 T: float = 0.07, r_cur: Optional[torch.Tensor] = None,
                                 r_pos: Optional[torch.Tensor] = None,
                                 K: Optional[int] = None, enqueue: bool = True,
                                 ptr_z: Optional[torch.Tensor] = None,
                                 ptr_h: Optional[torch.Tensor] = None,
                                 eps: float = 0.01, max_iter: int = 200, thresh: float = 1e-3,
                                 return_info: bool = False):
    """Image-level (5.4) and concept-level (5.5) losses with the step-6 per-sample loop.

    zq, zk (B, D) unit rows (zq grad); Zq_p, Zk_p (B, P, D) unit rows (Zq_p grad);
    y (B,) int64; conf (B, Nconf) int64 or list of B index sequences (conf order);
    queue_z (D, Cls, K) and queue_h (Cls, K, P, D) in the PUBLISHED layouts, or pass a
    ``QueuesPublished`` as ``queue_z`` (then queue_h must be None).
    With raw tensors and enqueue=True the writes go in place into queue_z / queue_h using
    ptr_z / ptr_h (modified in place; fresh zero pointers when None).
    K: queue length; inferred from queue_z when None (if given it must match).

    Algorithm (published order):
      * snapshot clones of both queues before the loop;
      * s_cur_img = <zq_i, zk_i> for all B; s_cur_con = 1 - OTsel(Zq_p, Zk_p, POS, r=r_cur),
        ONE Sinkhorn call with B problems;
      * for i in batch order: image logits [s_cur, pos (K), neg over c' != y_i class-major
        ((Cls-1)K)]; concept logits [s_cur_con[i], 1 - OTsel(Zq_p[i:i+1], Qh[y_i], POS,
        r=r_pos[i]) (K, one call with K problems), 1 - OTsel(Zq_p[i:i+1],
        Qh[conf_i].reshape(Nconf*K, P, D), NEG) (10*Nconf*K, one call)], each built with
        torch.cat; then enqueue (zk[i], Zk_p[i]) into class y_i (writes the live queues, while
        the logits read the snapshot);
      * stack logits, KLDivLoss(batchmean) of log_softmax(logits/T) vs 1/(K+1) on the first K+1.

    Returns ``(L_img, L_con, img_logits (B, 1+Cls*K), con_logits (B, 1+K+10*Nconf*K))`` (logits
    are the raw similarities, before /T), plus an info dict (iteration counts per call, the picks
    used) when return_info=True.

    API mapping:
      * ``ck.image_contrastive_loss(zq, zk, queue_z_to_api(Qz_snapshot), y, temperature=T)``
        == L_img.
      * ``ck.concept_contrastive_loss(Zq_p, Zk_p, Qh_snapshot, y, conf, temperature=T,
        choice_cur=r_cur[:, None], choice_pos=r_pos, stop="published", ...)`` == L_con, i.e.
        r_cur[b] <-> choice_cur[b, 0] and r_pos[b, k] <-> choice_pos[b, k] (see picks_to_api).
        The published per-call batch-mean stop is stop="all" for the cur call and stop="row"
        for the per-sample POS / NEG calls.
      * the API losses do not enqueue; enqueue separately with
        ``ClassQueues.enqueue(zk, Zk_p, y)`` (same batch-order semantics).
    """
    if isinstance(queue_z, QueuesPublished):
        if queue_h is not None:
            raise ValueError("pass either a QueuesPublished or two tensors")
        qobj = queue_z
        live_z, live_h, ptr_z, ptr_h = qobj.queue_z, qobj.queue_h, qobj.ptr_z, qobj.ptr_h
    else:
        if queue_h is None:
            raise ValueError("queue_h is required with a tensor queue_z")
        live_z, live_h = queue_z, queue_h
        Cls_ = live_z.shape[1]
        if ptr_z is None:
            ptr_z = torch.zeros(Cls_, dtype=torch.long)
        if ptr_h is None:
            ptr_h = torch.zeros(Cls_, dtype=torch.long)
    D, Cls, Kq = live_z.shape
    if K is None:
        K = Kq
    if K != Kq or live_h.shape[:2] != (Cls, K):
        raise ValueError(f"K={K} does not match queue_z {tuple(live_z.shape)} / queue_h "
                         f"{tuple(live_h.shape)}")
    B = zq.shape[0]
    if isinstance(conf, torch.Tensor):
        conf_list = [conf[i].to(torch.long).reshape(-1) for i in range(B)]
    else:
        conf_list = [torch.as_tensor(c, dtype=torch.long).reshape(-1) for c in conf]

    # snapshot clones before the loop
    Qz = live_z.clone().detach().to(zq.device)
    Qh = live_h.clone().detach().to(zq.device)

    # current key, image level: one value per sample
    s_cur_img = torch.einsum("nc,nc->n", zq, zk).unsqueeze(-1)  # (B, 1)
    # current key, concept level: ONE call with B problems
    if r_cur is None:
        r_cur = torch.randint(3, (B,))
    cur_cost, cur_info = sinkhorn_distance_published(Zq_p, Zk_p, True, r=r_cur, eps=eps,
                                                     max_iter=max_iter, thresh=thresh,
                                                     return_info=True)
    s_cur_con = 1 - cur_cost  # (B,)

    if r_pos is None:
        r_pos = torch.stack([torch.randint(3, (K,)) for _ in range(B)]) if B else \
            torch.zeros(0, K, dtype=torch.long)

    img_rows: List[torch.Tensor] = []
    con_rows: List[torch.Tensor] = []
    n_iter_pos: List[int] = []
    n_iter_neg: List[int] = []
    for i in range(B):
        c = int(y[i])
        # ---- image level ----
        pos_samples = Qz[:, c, :]  # (D, K)
        neg_samples = torch.cat([Qz[:, :c, :], Qz[:, c + 1:, :]], dim=1).reshape(D, -1)
        ith_pos = torch.einsum("nc,ck->nk", zq[i: i + 1], pos_samples)  # (1, K)
        ith_neg = torch.einsum("nc,ck->nk", zq[i: i + 1], neg_samples)  # (1, (Cls-1)K)
        img_rows.append(torch.cat([s_cur_img[i: i + 1], ith_pos, ith_neg], dim=1))
        # ---- concept level ----
        q_i = Zq_p[i: i + 1]  # (1, P, D)
        pos_cost, pinfo = sinkhorn_distance_published(q_i, Qh[c], True, r=r_pos[i], eps=eps,
                                                      max_iter=max_iter, thresh=thresh,
                                                      return_info=True)
        negs = Qh[conf_list[i].to(Qh.device)]  # (Nconf, K, P, D)
        negs = negs.reshape(-1, negs.shape[-2], negs.shape[-1])  # (Nconf*K, P, D) conf-major
        neg_cost, ninfo = sinkhorn_distance_published(q_i, negs, False, eps=eps,
                                                      max_iter=max_iter, thresh=thresh,
                                                      return_info=True)
        n_iter_pos.append(pinfo["n_iter"])
        n_iter_neg.append(ninfo["n_iter"])
        con_row = torch.cat([s_cur_con[i: i + 1], 1 - pos_cost, 1 - neg_cost], dim=0)
        con_rows.append(con_row.unsqueeze(0))
        # ---- enqueue into the LIVE queues (logits keep using the snapshot) ----
        if enqueue:
            _enqueue_one(live_z, live_h, ptr_z, ptr_h, zk[i], Zk_p[i], c)

    img_logits = torch.cat(img_rows, dim=0)
    con_logits = torch.cat(con_rows, dim=0)
    L_img = kl_batchmean_to_uniform_positives(img_logits, K, T)
    L_con = kl_batchmean_to_uniform_positives(con_logits, K, T)
    if return_info:
        info = dict(n_iter_cur=cur_info["n_iter"], n_iter_pos=n_iter_pos,
                    n_iter_neg=n_iter_neg, r_cur=r_cur, r_pos=r_pos)
        return L_img, L_con, img_logits, con_logits, info
    return L_img, L_con, img_logits, con_logits


# ---------------------------------------------------------------------------------------------
# 3.2  DANet (CAM + PAM)
# ---------------------------------------------------------------------------------------------
def cam_published(x: torch.Tensor, gamma) -> torch.Tensor:
    """Channel attention, published max-minus-energy form with torch.bmm.

    X = x.view(B, C, N); E = X X^T; E' = rowmax(E) - E; A = softmax(E', -1);
    out = gamma * (A X).view(B, C, H, W) + x.   API: ``ck.channel_attention(x, gamma)``.
    """
    B, C, H, W = x.shape
    proj_query = x.view(B, C, -1)
    proj_key = x.view(B, C, -1).permute(0, 2, 1)
    energy = torch.bmm(proj_query, proj_key)
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = F.softmax(energy_new, dim=-1)
    proj_value = x.view(B, C, -1)
    out = torch.bmm(attention, proj_value).view(B, C, H, W)
    return gamma * out + x


def _conv1x1(x, w, b):
    if w.dim() == 2:
        w = w.view(w.shape[0], w.shape[1], 1, 1)
    return F.conv2d(x, w, b)


def pam_published(x: torch.Tensor, gamma, wq, bq, wk, bk, wv, bv) -> torch.Tensor:
    """Position attention with 1x1-conv projections (published form).

    wq, wk (C', C) or (C', C, 1, 1); bq, bk (C',); wv (C, C) or (C, C, 1, 1); bv (C,).
    Q = conv(x).view(B, C', N).permute -> (B, N, C'); K = conv(x).view(B, C', N);
    E = bmm(Q, K) (B, N, N); A = softmax(E, -1) (no 1/sqrt(d)); V = conv(x).view(B, C, N);
    out = gamma * bmm(V, A^T).view(B, C, H, W) + x.
    API: ``ck.position_attention(x, wq, bq, wk, bk, wv, bv, gamma)`` with (C', C) weights; the
    module ``PositionAttention`` stores conv weights (C', C, 1, 1).
    """
    B, C, H, W = x.shape
    N = H * W
    proj_query = _conv1x1(x, wq, bq).view(B, -1, N).permute(0, 2, 1)
    proj_key = _conv1x1(x, wk, bk).view(B, -1, N)
    energy = torch.bmm(proj_query, proj_key)
    attention = F.softmax(energy, dim=-1)
    proj_value = _conv1x1(x, wv, bv).view(B, -1, N)
    out = torch.bmm(proj_value, attention.permute(0, 2, 1)).view(B, C, H, W)
    return gamma * out + x


def danet_published(x, gamma_c, gamma_p, wq, bq, wk, bk, wv, bv) -> torch.Tensor:
    """DANet(x) = CAM(x) + PAM(x)  (a sum; = 2x at gamma_c = gamma_p = 0).
    API: ``ck.nn.DualAttention`` forward (sa = PAM, sc = CAM)."""
    return cam_published(x, gamma_c) + pam_published(x, gamma_p, wq, bq, wk, bk, wv, bv)


# ---------------------------------------------------------------------------------------------
# 5.7  IB KL
# ---------------------------------------------------------------------------------------------
def ib_kl_published(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL( Independent(Normal(mu, exp(sigma)), 1) || Independent(Normal(0, 1), 1) ), mean over
    the batch.  mu, sigma (B, L).  API: ``ck.information_bottleneck_kl(mu, sigma)``."""
    post = Independent(Normal(mu, torch.exp(sigma)), 1)
    prior = Independent(Normal(torch.zeros_like(mu), torch.ones_like(sigma)), 1)
    return kl_divergence(post, prior).mean()


# ---------------------------------------------------------------------------------------------
# Converters published <-> API contract
# ---------------------------------------------------------------------------------------------
def queue_z_to_api(queue_z: torch.Tensor) -> torch.Tensor:
    """(D, Cls, K) published -> (Cls, K, D) API."""
    return queue_z.permute(1, 2, 0).contiguous()


def queue_z_from_api(queue_z_api: torch.Tensor) -> torch.Tensor:
    """(Cls, K, D) API -> (D, Cls, K) published."""
    return queue_z_api.detach().permute(2, 0, 1).contiguous()


def picks_to_api(r_cur: torch.Tensor, r_pos: torch.Tensor):
    """Published POS picks -> API choices: r_cur (B,) -> choice_cur (B, 1) with
    choice_cur[b, 0] = r_cur[b]; r_pos (B, K) -> choice_pos (B, K) with
    choice_pos[b, k] = r_pos[b, k] (the pick of the k-th problem of sample b's POS call)."""
    return r_cur.reshape(-1, 1).long().clone(), r_pos.long().clone()


def picks_from_api(choice_cur: torch.Tensor, choice_pos: torch.Tensor):
    """Inverse of picks_to_api."""
    return choice_cur.reshape(-1).long().clone(), choice_pos.long().clone()


def sinkhorn_call_to_api(x: torch.Tensor, y: torch.Tensor):
    """Arguments of ``ck.ot_similarity`` reproducing one published call.

    Returns ``(query, bank, index, stop)``:
      * Px == 1 (per-sample call, P problems): query = x (1, n, d), bank = y (P, m, d),
        index = arange(P)[None] (1, P), stop = "row";
      * Px == P (batched current-key call): query = x (P, n, d), bank = y,
        index = arange(P)[:, None] (P, 1), stop = "all".
    The published output is ``1 - api_output`` flattened in row-major order (for NEG
    (1, P, 10) -> (10P,); for the current-key POS call (P, 1) -> (P,)).
    """
    P = y.shape[0]
    if x.shape[0] == 1:
        return x, y, torch.arange(P).unsqueeze(0), "row"
    return x, y, torch.arange(P).unsqueeze(1), "all"
