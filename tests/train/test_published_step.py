"""Whole-step test: ``ConceptTuner.step`` + SGD against the loop-by-loop published iteration
(``tests/oracle_step.py``, written from method_spec §3-§6 without concept_kernels), in float64.

Both sides start from the same weights (query, key encoder, BN buffers, DANet/IB), queues and
pointers, see the same four views and labels, the same IB noise and the same POS picks (the only
randomness of a step). After every iteration the test compares, to 1e-10 relative: every loss part,
the gradient of every trainable parameter, the parameters after SGD, the key encoder's parameters,
every BN buffer of both backbones (running stats, num_batches_tracked), the queues, and (exactly) the pointers. It also checks that sinkhorn_stop="problem" changes
L_con on the same inputs.

BN buffers: ConceptTuner runs the 9 patch positions as one grouped pass; the published code runs 9
train-mode passes, the query encoder's at BN momentum 0 (running stats unchanged), the key encoder's at
its momentum 0.1 (running stats move 9 times), and every pass counts num_batches_tracked. Every buffer of
both encoders (running stats and counters) is compared after every iteration, with no syncing.

The backbone has the published geometry (224 px -> 7x7 map of 2048 channels, 64-px crops -> 2x2) so
the oracle's hard-coded constants apply: a 32-px patchify conv + BN + ReLU, a 1x1 conv to 2048 + BN +
ReLU. About 20 s of CPU on one core.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import QueuesPublished, picks_to_api, search_patches_published
from oracle_step import PublishedClassifier, PublishedConceptTuning, classifier_param_order_ok
from torch import nn

import concept_kernels
import concept_kernels.nn.information_bottleneck as ib_module
from concept_kernels.train import ConceptTuner

PARTS = ("loss", "ce", "img", "con", "ce_ib", "kl")
CLS, B, K, N_CONF, LATENT = 6, 4, 3, 4, 16
LABELS = ([0, 1, 0, 3], [4, 0, 5, 0], [2, 2, 2, 5])  # repeated labels; K=3 wraps pointers
RTOL = 1e-10
LR = 0.01  # published base lr (backbone 0.1x)


class Patchify(nn.Module):
    """(B, 3, 224, 224) -> (B, 2048, 7, 7): conv 32x32/32 to 16 + BN + ReLU, 1x1 to 2048 + BN + ReLU."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 32, 32, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 2048, 1, bias=False), nn.BatchNorm2d(2048), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def _randomize_(module: nn.Module, gen: torch.Generator, scale: float) -> None:
    """Non-trivial BN affine parameters and running stats (so their updates show)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + scale * torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
                m.bias.copy_(scale * torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64))


def _build(momentum: float, seed: int):
    """The ConceptTuner and the oracle, with identical state."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ConceptTuner(Patchify(), CLS, (224, 224), num_patches=9, num_confusing=N_CONF, queue_len=K,
                       momentum=momentum, latent_dim=LATENT, channels_last=False)
    net.double().train()  # built in float32 (the constructor probes the backbone with a float32 input)
    assert net.sinkhorn_stop == "published"  # the default is what this test checks
    with torch.no_grad():
        _randomize_(net.backbone, gen, 0.2)
        net.head.weight.copy_(0.05 * torch.randn(net.head.weight.shape, generator=gen, dtype=torch.float64))
        net.ib.encoder[0].sa.gamma.fill_(0.3)  # the attention branch contributes (0 at init)
        net.ib.encoder[0].sc.gamma.fill_(0.2)
        # a key encoder that differs from the query (as after some training): pre- vs post-EMA shows
        net.key_backbone.load_state_dict(net.backbone.state_dict())
        net.key_head.load_state_dict(net.head.state_dict())
        for p in [*net.key_backbone.parameters(), *net.key_head.parameters()]:
            p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        _randomize_(net.key_backbone, gen, 0.2)
        qz = F.normalize(torch.randn(CLS, K, CLS, generator=gen, dtype=torch.float64), dim=-1)
        qh = F.normalize(torch.randn(CLS, K, 9, CLS, generator=gen, dtype=torch.float64), dim=-1)
        net.queues.queue_z.copy_(qz)
        net.queues.queue_h.copy_(qh)
        net.queues.ptr.copy_(torch.randint(K, (CLS,), generator=gen))

    q = PublishedClassifier(copy.deepcopy(net.backbone), 2048, CLS, LATENT).double()
    q.head.load_state_dict(net.head.state_dict())
    q.IB_encoder.load_state_dict(net.ib.encoder.state_dict())
    q.IB_decoder.load_state_dict(net.ib.decoder.state_dict())
    k = PublishedClassifier(copy.deepcopy(net.key_backbone), 2048, CLS, None).double()
    k.head.load_state_dict(net.key_head.state_dict())
    k.requires_grad_(False)
    assert classifier_param_order_ok(q, k)[0]
    queues = QueuesPublished.from_api(net.queues.queue_z, net.queues.queue_h, net.queues.ptr)
    oracle = PublishedConceptTuning(q, k, queues, n_conf=N_CONF, m=momentum, T=0.07, lr=LR)
    opt = torch.optim.SGD(net.param_groups(LR), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return net, opt, oracle


def _oracle_name(name: str) -> str:
    return name.replace("ib.encoder.", "IB_encoder.").replace("ib.decoder.", "IB_decoder.")


def _close(actual, expected, what: str, rtol: float = RTOL, atol: float = 1e-15) -> None:
    """|a - e| <= rtol * max(|e|, 1e-3 max|e|) + atol elementwise: relative, with a floor for entries tiny
    next to the tensor's scale, and an absolute 1e-15 for quantities that are 0 in exact arithmetic (e.g.
    the PAM key-conv bias gradient: the softmax over keys ignores it; float64 leaves ~1e-19). Same dtype
    and shape; integer tensors exactly equal."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    bound = rtol * torch.maximum(expected.abs(), 1e-3 * expected.abs().max()) + atol
    excess = ((actual - expected).abs() / bound).max().item()
    assert excess <= 1, f"{what}: max |a - e| / (rtol |e| + atol) = {excess:.3g} > 1 (rtol {rtol:g})"


class _FixedNoiseTorch:
    """Stands in for ``torch`` inside concept_kernels.nn.information_bottleneck: ``randn_like`` returns the
    given noise (once per step), everything else is torch."""

    def __init__(self):
        self.noise, self.calls = None, 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, t):
        assert self.noise is not None and t.shape == self.noise.shape and t.dtype == self.noise.dtype
        self.calls += 1
        return self.noise.clone()


@pytest.fixture
def fixed_randomness(monkeypatch):
    """Sets the IB noise and the POS picks every step of the tuner uses: returns set(xi, r_cur, r_pos)."""
    noise = _FixedNoiseTorch()
    monkeypatch.setattr(ib_module, "torch", noise)
    picks = {}
    real = concept_kernels.concept_contrastive_loss

    def with_fixed_picks(*args, **kwargs):
        assert kwargs.get("choice_cur") is None and kwargs.get("choice_pos") is None
        kwargs["choice_cur"], kwargs["choice_pos"] = picks_to_api(picks["cur"], picks["pos"])
        picks["calls"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(concept_kernels, "concept_contrastive_loss", with_fixed_picks)

    def set_(xi, r_cur, r_pos):
        noise.noise, noise.calls = xi, 0
        picks.update(cur=r_cur, pos=r_pos, calls=0)
        return lambda: (noise.calls, picks["calls"])

    return set_


def _inputs(gen: torch.Generator, it: int):
    views = [torch.randn(B, 3, 224, 224, generator=gen, dtype=torch.float64) for _ in range(4)]
    labels = torch.tensor(LABELS[it % len(LABELS)])
    xi = torch.randn(B, LATENT, generator=gen, dtype=torch.float64)
    return views, labels, xi, torch.randint(3, (B,), generator=gen), torch.randint(3, (B, K), generator=gen)


def _compare_buffers(mine: nn.Module, theirs: nn.Module, what: str) -> None:
    """Every buffer: running stats to RTOL, num_batches_tracked exactly."""
    expected = dict(theirs.named_buffers())
    assert {n for n, _ in mine.named_buffers()} == set(expected), what
    for n, b in mine.named_buffers():
        _close(b, expected[n], f"{what} {n}")


def _compare_state(net, oracle, it: int) -> None:
    """Parameters after SGD (query and key), every BN buffer of both backbones, queues and pointers."""
    tag = f"iteration {it}: "
    q_params, k_params = dict(oracle.q.named_parameters()), dict(oracle.k.named_parameters())
    for n, p in net.named_parameters():
        if not n.startswith("key_"):
            _close(p.detach(), q_params[_oracle_name(n)].detach(), tag + "param " + n)
    for n, p in [*net.key_backbone.named_parameters("backbone"), *net.key_head.named_parameters("head")]:
        _close(p, k_params[n], tag + "key param " + n)
    _compare_buffers(net.backbone, oracle.q.backbone, tag + "query BN")
    _compare_buffers(net.key_backbone, oracle.k.backbone, tag + "key BN")
    qz, qh, ptr = oracle.queues.to_api()
    _close(net.queues.queue_z, qz, tag + "queue_z")
    _close(net.queues.queue_h, qh, tag + "queue_h")
    assert torch.equal(net.queues.ptr, ptr), tag + f"ptr {net.queues.ptr} != {ptr}"


@pytest.mark.parametrize("momentum,iterations,check_problem_stop", [(0.5, 3, True), (0.999, 2, False)])
def test_step_matches_published_iteration(fixed_randomness, momentum, iterations, check_problem_stop):
    """ConceptTuner.step + SGD == the published iteration, iteration after iteration (nothing is synced
    between the two after construction)."""
    net, opt, oracle = _build(momentum, seed=1)
    gen = torch.Generator().manual_seed(2)
    for it in range(iterations):
        views, labels, xi, r_cur, r_pos = _inputs(gen, it)
        if check_problem_stop and it == 0:
            twin = copy.deepcopy(net)
            twin.sinkhorn_stop = "problem"
            fixed_randomness(xi, r_cur, r_pos)
            problem = twin.step(views, labels)
        calls = fixed_randomness(xi, r_cur, r_pos)
        out = net.step(views, labels)
        assert calls() == (1, 1), "the IB noise and the POS picks must be drawn once per step"
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        grads = {_oracle_name(n): p.grad for n, p in net.named_parameters() if p.grad is not None}
        opt.step()
        ref = oracle.step(views, labels, xi, r_cur, r_pos)
        # precondition for exact gradients: no two query patch embeddings of a sample coincide (tied
        # plan entries of identical rows could send the same gradient to either row)
        zq = ref["Zq_p"]
        assert (torch.cdist(zq, zq) + torch.eye(9, dtype=zq.dtype)).min() > 1e-6
        for k in PARTS:
            _close(out[k].detach(), ref[k], f"iteration {it}: loss part {k}")
        assert set(grads) == set(ref["grads"]), set(grads) ^ set(ref["grads"])
        for n, g in grads.items():
            _close(g, ref["grads"][n], f"iteration {it}: grad {n}")
        _compare_state(net, oracle, it)
        if check_problem_stop and it == 0:  # the test can tell the stop rules apart
            for k in ("ce", "img", "ce_ib", "kl"):
                _close(problem[k].detach(), ref[k], "sinkhorn_stop='problem': " + k)
            rel = abs(problem["con"].item() - ref["con"].item()) / ref["con"].item()
            assert rel > 1e-4, f"sinkhorn_stop='problem' should change L_con; relative change {rel:.2g}"


def test_patch_passes_bn_buffers_as_published():
    """One patch encoding per encoder on the same boxes, the query with the published BN momentum 0
    (``fix_bn``), the key at its 0.1: embeddings and every BN buffer equal the published 9 passes', and
    the key's running stats moved (so the comparison could fail)."""
    net, _, oracle = _build(0.5, seed=3)
    gen = torch.Generator().manual_seed(4)
    view = torch.randn(B, 3, 224, 224, generator=gen, dtype=torch.float64)
    labels = torch.tensor(LABELS[0])
    with torch.no_grad():
        f = copy.deepcopy(net.key_backbone)(view)  # a copy: this pass must not move the compared buffers
        y = net.key_head(f.mean((2, 3)))
        boxes, _ = search_patches_published(f, y, labels, net.key_head.weight, N_CONF)
    oracle.q.set_bn_momentum(0.0)  # the published fix_bn
    for name, enc, bb, head in (("query", oracle.q, net.backbone, net.head),
                                ("key", oracle.k, net.key_backbone, net.key_head)):
        before = copy.deepcopy(bb)
        with torch.no_grad():
            mine = net._patches(bb, head, view, boxes, B, fix_bn=name == "query")
            ref = oracle.encode_patches(enc, view, boxes)
        _close(mine, ref, f"{name} patch embeddings")
        _compare_buffers(bb, enc.backbone, f"{name} BN")
        moved = [not torch.equal(b, b0) for (n, b), b0 in zip(bb.named_buffers(), before.buffers()) if "running" in n]
        assert all(moved) if name == "key" else not any(moved), f"{name}: running stats moved {moved}"
    assert {m.momentum for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}  # restored
