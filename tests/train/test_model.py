"""ConceptTuner.step / predict: shapes, finiteness, which parameters train, bad inputs, and the
Liger-style convergence check: a few steps with the auto-selected (fused) ops == reference ops."""
import pytest
import torch

from concept_kernels import _backends
from concept_kernels.train import ConceptTuner

PARTS = ("loss", "ce", "img", "con", "ce_ib", "kl")


def _tuner(tiny_net, method="concept", **kw):
    kw = dict(num_patches=4, num_confusing=3, queue_len=4, patch_pixels=16) | kw
    return ConceptTuner(tiny_net(), 5, (32, 32), method=method, **kw)


@pytest.mark.parametrize("method,mode", [("concept", "image"), ("concept", "roi"), ("vanilla", "image"),
                                         ("linear", "image"), ("bituning", "image"), ("surgical", "image")])
def test_step_outputs(tiny_net, method, mode):
    net = _tuner(tiny_net, method, patch_mode=mode, train_blocks=("blocks.6",) if method == "surgical" else ())
    views, labels = torch.randn(4, 6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    out = net.step(views, labels)
    assert set(out) == set(PARTS) | {"logits"}
    assert out["logits"].shape == (6, 5)
    for k in PARTS:
        assert out[k].shape == () and torch.isfinite(out[k]), k
    used = {"concept": PARTS, "bituning": ("loss", "ce", "img")}.get(method, ("loss", "ce"))
    for k in PARTS:
        assert (out[k] != 0) == (k in used), k
    out["loss"].backward()
    grads = {n: p.grad is not None for n, p in net.named_parameters()}
    assert grads["head.weight"] and not any(v for n, v in grads.items() if n.startswith("key_"))
    if method == "linear":
        assert not any(v for n, v in grads.items() if n.startswith("backbone."))
    if method == "surgical":
        assert {n for n, v in grads.items() if v and n.startswith("backbone.")} == {"backbone.blocks.6.weight"}
    if method in ("concept", "bituning"):
        assert net.queues.ptr.tolist() == [2, 1, 1, 1, 1]  # class 0 twice
    pred = net.eval().predict(torch.randn(3, 3, 32, 32))
    assert pred["main"].shape == (3, 5)
    assert ("ib" in pred) == (method == "concept") and (method != "concept" or pred["ib"].shape == (3, 5))


def test_con_gives_head_no_gradient(tiny_net):
    net = _tuner(tiny_net, w_img=0.0, w_ce_ib=0.0, w_kl=0.0)
    out = net.step(torch.randn(4, 6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0]))
    (out["con"]).backward()
    assert net.head.weight.grad is None or not net.head.weight.grad.any()
    assert any(p.grad is not None and p.grad.any() for p in net.backbone.parameters())


def test_bad_inputs(tiny_net):
    class Tokens(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 17, 64)

    with pytest.raises(ValueError, match="num_prefix_tokens"):  # tokens without a patch grid
        ConceptTuner(Tokens(), 5, (32, 32))
    with pytest.raises(ValueError, match="num_confusing"):
        ConceptTuner(tiny_net(), 3, (32, 32))  # Cls=3 < N_conf(3) + 1
    with pytest.raises(ValueError, match="num_confusing"):
        ConceptTuner(tiny_net(), 10, (32, 32), num_confusing=10)
    with pytest.raises(ValueError, match="train_blocks"):
        ConceptTuner(tiny_net(), 10, (32, 32), method="surgical", train_blocks=("nope",))
    with pytest.raises(ValueError, match="method"):
        ConceptTuner(tiny_net(), 10, (32, 32), method="nope")
    with pytest.raises(ValueError, match="needs 4 views"):
        _tuner(tiny_net).step(torch.randn(2, 4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    from concept_kernels.train import create_backbone

    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("resnet_does_not_exist", pretrained=False)


@pytest.mark.parametrize("mode", ["image", "roi"])
def test_fused_ops_match_reference(tiny_net, monkeypatch, mode):
    """3 SGD steps with whatever backends auto picks; before each, a twin takes the same parameters,
    queues, key encoder and RNG state and runs the same step with CONCEPT_KERNELS_BACKEND=reference.

    The test compares whatever auto selects (today: the cpu backends of all three ops), so it bites
    whenever a backend lands or changes. Tolerances, per step:

    * every part except L_con (and the total): 1e-4 (same parameters, same inputs; fp32 reorderings);
    * L_con and the total: rtol 0.15. ot_similarity's top-k selection is discontinuous, and patches
      that land in the same feature cell give exactly tied plan entries whose order the backends
      break differently (measured: L_con off by up to 3% on seeds 0-4 per problem; with the published
      group stopping, the default since it landed, roi step 0 is 11% off: against the float64 reference
      the fused cpu path and the float32 reference flip about as many near-tied picks, 3 vs 1 of the
      positives and 36 vs 34 of 720 negatives; the old lockstep group solver was 8.5% off). Comparing free-running
      trajectories instead amplifies one such flip chaotically (up to 30% after 3 steps at this lr).
      A wrong backend is far outside this (the losses are O(1-10)).
    """
    auto = {op: _backends.select(op, torch.device("cpu")).name for op in _backends.ops()}
    torch.manual_seed(0)
    net, twin = _tuner(tiny_net, patch_mode=mode), _tuner(tiny_net, patch_mode=mode)
    with torch.no_grad():  # make the attention branch contribute, and spread the patch embeddings
        net.ib.encoder[0].sa.gamma.fill_(0.5)   # (a near-constant cost matrix makes near-ties in the
        net.ib.encoder[0].sc.gamma.fill_(0.5)   # plan's top-k, whose order backends may break differently)
        net.head.weight.normal_(0.0, 1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    for step in range(3):
        views, labels = torch.randn(4, 6, 3, 32, 32, generator=data), torch.randint(5, (6,), generator=data)
        twin.load_state_dict(net.state_dict())
        rng = torch.get_rng_state()
        monkeypatch.setenv("CONCEPT_KERNELS_BACKEND", "reference")
        ref = twin.step(views, labels)
        monkeypatch.delenv("CONCEPT_KERNELS_BACKEND")
        torch.set_rng_state(rng)
        out = net.step(views, labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        a, r = (torch.stack([o[k].detach() for k in PARTS]) for o in (out, ref))
        exact = [i for i, k in enumerate(PARTS) if k not in ("loss", "con")]
        msg = lambda m: f"step {step}, backends {auto}: {m}"  # noqa: E731
        torch.testing.assert_close(a[exact], r[exact], atol=1e-4, rtol=1e-4, msg=msg)
        torch.testing.assert_close(a, r, atol=1e-3, rtol=0.15, msg=msg)
