"""channel_attention / position_attention references and the DANet modules: math, gradients, bad input.

Comparison with the published module transcription lives in tests/test_reference_vs_oracle.py.
"""
import pytest
import torch

import concept_kernels as ck
from concept_kernels.testing import feature_map


def _pam_weights(C, c_qk, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(dtype)  # noqa: E731
    return mk(c_qk, C), mk(c_qk), mk(c_qk, C), mk(c_qk), mk(C, C), mk(C)


def test_channel_attention_equals_softmax_of_negative_energy_in_float64():
    x = feature_map(2, 24, 3, 5, dtype=torch.float64)  # N = 15, not a power of two
    gamma = torch.tensor([0.7], dtype=torch.float64)
    X = x.reshape(2, 24, 15)
    expected = 0.7 * torch.softmax(-(X @ X.transpose(1, 2)), -1) @ X  # shift invariance
    torch.testing.assert_close(ck.channel_attention(x, gamma), expected.reshape_as(x) + x)


def test_position_attention_matches_einsum_spec():
    x = feature_map(2, 16, 4, 3, dtype=torch.float64)
    wq, bq, wk, bk, wv, bv = _pam_weights(16, 2)
    gamma = torch.tensor(0.3, dtype=torch.float64)  # shape () accepted too
    X = x.reshape(2, 16, 12)
    Q = torch.einsum("oc,bcn->bon", wq, X) + bq[:, None]
    K = torch.einsum("oc,bcn->bon", wk, X) + bk[:, None]
    V = torch.einsum("oc,bcn->bon", wv, X) + bv[:, None]
    A = torch.softmax(torch.einsum("bcn,bcm->bnm", Q, K), dim=-1)
    expected = 0.3 * torch.einsum("bcm,bnm->bcn", V, A).reshape_as(x) + x
    torch.testing.assert_close(ck.position_attention(x, wq, bq, wk, bk, wv, bv, gamma), expected)


def test_gradcheck_channel_attention():
    x = feature_map(2, 6, 2, 3, dtype=torch.float64).requires_grad_(True)
    gamma = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ck.channel_attention, (x, gamma))


def test_gradcheck_position_attention():
    x = feature_map(2, 8, 2, 2, dtype=torch.float64).requires_grad_(True)
    params = [p.requires_grad_(True) for p in _pam_weights(8, 2)]
    gamma = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ck.position_attention, (x, *params, gamma))


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_non_contiguous_inputs(layout):
    x = feature_map(2, 16, 4, 4)
    xs = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x.transpose(2, 3).contiguous().transpose(2, 3)
    g = torch.tensor([0.5])
    torch.testing.assert_close(ck.channel_attention(xs, g), ck.channel_attention(x, g))
    w = [t.float() for t in _pam_weights(16, 2)]
    torch.testing.assert_close(ck.position_attention(xs, *w, g), ck.position_attention(x, *w, g))


def test_low_precision_within_2x_rule():
    from concept_kernels.testing import assert_within_2x
    x = feature_map(2, 64, 7, 7, dtype=torch.float64)
    g = torch.tensor([1.0], dtype=torch.float64)
    exact = ck.channel_attention(x, g)
    X = x.reshape(2, 64, 49).bfloat16()  # the same math, all in bf16
    E = (X @ X.transpose(1, 2)).float()
    naive = (torch.softmax(E.amax(-1, keepdim=True) - E, -1).bfloat16() @ X).float().reshape_as(x) + x.bfloat16().float()
    assert_within_2x(ck.channel_attention(x.bfloat16(), g.bfloat16()), naive, exact, name="cam bf16")


def test_dual_attention_starts_as_2x_and_has_published_keys():
    m = ck.nn.DualAttention(32)
    x = torch.randn(2, 32, 3, 3)
    torch.testing.assert_close(m(x), 2 * x)
    assert set(m.state_dict()) == {
        "sa.query_conv.weight", "sa.query_conv.bias", "sa.key_conv.weight", "sa.key_conv.bias",
        "sa.value_conv.weight", "sa.value_conv.bias", "sa.gamma", "sc.gamma",
    }
    assert m.sa.query_conv.weight.shape == (4, 32, 1, 1) and m.sa.gamma.shape == (1,)


def test_dual_attention_trains_its_gammas():
    m = ck.nn.DualAttention(16, reduction=4)
    with torch.no_grad():
        m.sa.gamma.fill_(0.1)
        m.sc.gamma.fill_(0.1)
    m(torch.randn(2, 16, 3, 3)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_information_bottleneck_head_shapes_sampling_and_kl():
    head = ck.nn.InformationBottleneckHead(32, num_classes=5, latent_dim=8, reduction=8)
    f = torch.randn(3, 32, 2, 2)
    logits, mu, sigma = head(f)
    assert logits.shape == (3, 5) and mu.shape == sigma.shape == (3, 8)
    assert (sigma > 0).all() and sigma.max() < 0.1  # softplus(s - 5) ~ e^(s-5), s = O(1) at init
    head.eval()
    a, b = head(f)[0], head(f)[0]
    assert not torch.equal(a, b)  # published: samples in eval mode too
    head.sample_in_eval = False
    torch.testing.assert_close(head(f)[0], head(f)[0])
    mu, sigma = torch.randn(4, 6, dtype=torch.float64), torch.rand(4, 6, dtype=torch.float64)
    dist = torch.distributions
    kl = dist.kl_divergence(dist.Independent(dist.Normal(mu, sigma.exp()), 1),
                            dist.Independent(dist.Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)).mean()
    torch.testing.assert_close(ck.information_bottleneck_kl(mu, sigma), kl)


def test_empty_batch():
    x = torch.zeros(0, 8, 2, 2)
    assert ck.channel_attention(x, torch.ones(1)).shape == x.shape
    assert ck.position_attention(x, *[t.float() for t in _pam_weights(8, 2)], torch.ones(1)).shape == x.shape


def _pam_args(**over):
    w = dict(zip(["wq", "bq", "wk", "bk", "wv", "bv"], [t.float() for t in _pam_weights(16, 2)]))
    args = dict(x=torch.randn(2, 16, 3, 3), **w, gamma=torch.zeros(1))
    args.update(over)
    return args


BAD_PAM = [
    (dict(x=torch.randn(2, 16, 9)), ValueError, "x must have 4 dimensions"),
    (dict(x=torch.randn(2, 16, 3, 3).long()), TypeError, "x must have dtype"),
    (dict(x=torch.randn(2, 0, 3, 3)), ValueError, "x must have C >= 1"),
    (dict(wq=torch.randn(2, 15)), ValueError, "wq must have shape (2, 16)"),
    (dict(wk=torch.randn(3, 16)), ValueError, "wk must have shape (2, 16)"),
    (dict(bq=torch.randn(3)), ValueError, "bq must have shape (2,)"),
    (dict(wv=torch.randn(16, 8)), ValueError, "wv must have shape (16, 16)"),
    (dict(bv=torch.randn(15)), ValueError, "bv must have shape (16,)"),
    (dict(gamma=torch.zeros(2)), ValueError, "gamma must have shape () or (1,)"),
    (dict(gamma=0.5), TypeError, "gamma must be a torch.Tensor"),
    (dict(wv=torch.randn(16, 16, device="meta")), ValueError, "wv on meta"),
]


@pytest.mark.parametrize("over,exc,msg", BAD_PAM, ids=[b[2][:25] for b in BAD_PAM])
def test_position_attention_bad_input(over, exc, msg):
    a = _pam_args(**over)
    with pytest.raises(exc) as e:
        ck.position_attention(a["x"], a["wq"], a["bq"], a["wk"], a["bk"], a["wv"], a["bv"], a["gamma"])
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("x,gamma,exc,msg", [
    (torch.randn(2, 4, 4), torch.zeros(1), ValueError, "x must have 4 dimensions"),
    (torch.randn(2, 4, 4, 4).int(), torch.zeros(1), TypeError, "x must have dtype"),
    (torch.randn(2, 4, 0, 4), torch.zeros(1), ValueError, "H*W >= 1"),
    (torch.randn(2, 4, 4, 4), torch.zeros(1, 1), ValueError, "gamma must have shape"),
    (torch.randn(2, 4, 4, 4), torch.zeros(1, dtype=torch.long), TypeError, "gamma must have dtype"),
])
def test_channel_attention_bad_input(x, gamma, exc, msg):
    with pytest.raises(exc, match=None) as e:
        ck.channel_attention(x, gamma)
    assert msg in str(e.value)


def test_modules_reject_bad_sizes():
    with pytest.raises(ValueError, match="channels // reduction"):
        ck.nn.DualAttention(4, reduction=8)
    with pytest.raises(ValueError, match="sigma must have shape"):
        ck.information_bottleneck_kl(torch.zeros(2, 3), torch.zeros(2, 4))
