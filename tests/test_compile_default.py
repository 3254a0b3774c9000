"""torch.compile(fullgraph=True) with the DEFAULT backend selection (no ``backend=``, no environment variable)
and the default inductor backend, for every fused op: backend selection must be traceable by dynamo."""
import pytest
import torch

import concept_kernels as ck
from concept_kernels import _backends
from concept_kernels.testing import ot_problem


@pytest.fixture(autouse=True)
def _default_selection(monkeypatch):
    monkeypatch.delenv(_backends.ENV_VAR, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check(f, *inputs):
    """compiled f == eager f, values and gradients of every input that requires grad."""
    compiled = torch.compile(f, fullgraph=True)  # inductor
    results = []
    for fn in (compiled, f):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        y = fn(*xs)
        y.backward()
        results.append((y.detach(), [x.grad for x in xs if x.requires_grad]))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return compiled


def test_ot_similarity():
    q, b, i = ot_problem(2, 5, 7, dim=16, seed=8)
    choice = torch.randint(3, (2, 5))

    def f(x):
        return (ck.ot_similarity(x, b, i, select="sample", k=3, choice=choice).sum()
                + ck.ot_similarity(x, b, i, select="topk", k=4).sum())

    _check(f, q.requires_grad_())


def test_channel_attention():
    x, gamma = torch.randn(2, 16, 3, 3, requires_grad=True), torch.tensor([0.5], requires_grad=True)
    _check(lambda a, g: (ck.channel_attention(a, g) * 2.0).sum(), x, gamma)


def test_position_attention():
    m = ck.nn.PositionAttention(16)
    with torch.no_grad():
        m.gamma.fill_(0.3)
    _check(lambda a: m(a).square().sum(), torch.randn(2, 16, 3, 3, requires_grad=True))


def test_concept_contrastive_loss():
    B, P, D, n_cls, K = 3, 4, 8, 5, 2
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    qp, kp, queue = unit(B, P, D), unit(B, P, D), unit(n_cls, K, P, D)
    labels, conf = torch.tensor([0, 1, 2]), torch.tensor([[1, 2, 3], [0, 2, 4], [0, 1, 3]])
    picks = dict(choice_cur=torch.zeros(B, 1, dtype=torch.long), choice_pos=torch.ones(B, K, dtype=torch.long))
    f = lambda x, y: ck.concept_contrastive_loss(x, kp, queue, y, conf, stop="published", **picks)  # noqa: E731
    compiled = _check(f, qp.requires_grad_(), labels)
    # index checks stay inside the compiled graph (an assert op, no host read): a bad label still fails clearly
    with pytest.raises(RuntimeError, match=r"labels values must lie in \[0, 5\)"):
        compiled(qp, torch.tensor([0, 1, 7]))
