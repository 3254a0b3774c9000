"""Issue #19 (method level): the true label never comes back as a confusing class, NaN never ranks,
the EMA is exact under aliasing and loud on meta modules, and errors name the caller's argument."""
import math

import pytest
import torch

import concept_kernels as ck

NEG_INF = float("-inf")


def _confusing_oracle(row: list[float], label: int, n: int) -> list[float]:
    """The logits the n most confusing classes must have: the n largest of the other classes' logits,
    from a plain Python sort (ties among equal logits may come in any class order)."""
    others = [v for c, v in enumerate(row) if c != label]
    return sorted(others, reverse=True)[:n]


def _search(logits, labels, num_confusing, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, n_cls = logits.shape
    feats = torch.rand(B, C, 4, 4, generator=g)
    W = torch.randn(n_cls, C, generator=g)
    return ck.search_concept_patches(feats, logits, labels, W, (32, 32), num_confusing=num_confusing,
                                     num_patches=2, channels_per_group=2, group_stride=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("label", [0, 2, 5])
def test_label_is_never_confusing_when_other_logits_are_minus_inf(label, dtype):
    n_cls = 6
    rows = [
        [NEG_INF] * n_cls,  # every logit -inf, the label's too
        [NEG_INF if c != label else 3.0 for c in range(n_cls)],  # only the label is finite
        [1.0 if c == (label + 1) % n_cls else (NEG_INF if c != label else 9.0) for c in range(n_cls)],
        [float(c) if c % 2 else NEG_INF for c in range(n_cls)],  # half finite
    ]
    logits = torch.tensor(rows, dtype=dtype)
    labels = torch.full((len(rows),), label)
    for n in (3, 4, n_cls - 1):
        _, conf = _search(logits, labels, n)
        assert conf.shape == (len(rows), n)
        for b, row in enumerate(rows):
            got = conf[b].tolist()
            assert label not in got, (b, n, got)
            assert len(set(got)) == n and all(0 <= c < n_cls for c in got), (b, got)
            assert [row[c] for c in got] == _confusing_oracle(row, label, n), (b, n, got)


def test_confusing_classes_still_follow_the_logits():
    """Random logits (no ties): the order is the oracle's, class by class."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 12, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 11, 4, 4, 7])
    _, conf = _search(logits, labels, 6)
    for b in range(5):
        row = logits[b].tolist()
        order = sorted((c for c in range(12) if c != labels[b]), key=lambda c: -row[c])
        assert conf[b].tolist() == order[:6]


@pytest.mark.parametrize("arg,fill", [("logits", math.nan), ("features", math.nan), ("features", math.inf),
                                      ("head_weight", math.nan), ("head_weight", -math.inf)])
def test_patch_search_refuses_nan(arg, fill):
    g = torch.Generator().manual_seed(0)
    args = dict(features=torch.rand(2, 8, 4, 4, generator=g), logits=torch.randn(2, 6, generator=g),
                labels=torch.tensor([1, 2]), head_weight=torch.randn(6, 8, generator=g))
    args[arg].view(-1)[5] = fill
    with pytest.raises(ValueError, match=rf"^{arg} must not contain .*1 of {args[arg].numel()} entries"):
        ck.search_concept_patches(args["features"], args["logits"], args["labels"], args["head_weight"], (32, 32),
                                  num_confusing=3, num_patches=2, channels_per_group=2, group_stride=2)


# ---- momentum_update_ ------------------------------------------------------------------------

def test_momentum_update_of_a_module_with_itself_changes_nothing():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in m.parameters()]
    for momentum in (0.9, 0.0, 1.0, 0.999):
        ck.momentum_update_(m, m, momentum)
    for b, p in zip(before, m.parameters()):
        assert torch.equal(b, p)


def test_momentum_update_with_one_shared_parameter_updates_the_others():
    """Key and query share their first layer (the same Parameter): it stays, the rest follows the EMA."""
    shared = torch.nn.Linear(3, 3)
    key, query = torch.nn.Sequential(shared, torch.nn.Linear(3, 2)), torch.nn.Sequential(shared, torch.nn.Linear(3, 2))
    k0 = [p.detach().clone() for p in key.parameters()]
    ck.momentum_update_(key, query, 0.75)
    for p0, pk, pq in zip(k0, key.parameters(), query.parameters()):
        expected = p0 if pk is pq else 0.75 * p0 + 0.25 * pq.detach()
        torch.testing.assert_close(pk, expected, rtol=0, atol=0)


def test_momentum_update_refuses_overlapping_memory():
    a, b, c = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    key, query = torch.nn.ModuleList([a, b]), torch.nn.ModuleList([c, a])  # a.weight: key 0, query 2
    before = [p.detach().clone() for p in key.parameters()]
    with pytest.raises(ValueError, match="key_module and query_module parameters overlap in memory"):
        ck.momentum_update_(key, query, 0.9)
    assert all(torch.equal(x, p) for x, p in zip(before, key.parameters()))  # refused before any write


@pytest.mark.parametrize("which", ["key_module", "query_module"])
def test_momentum_update_refuses_meta_modules(which):
    with torch.device("meta"):
        meta = torch.nn.Linear(3, 2)
    cpu = torch.nn.Linear(3, 2)
    key, query = (meta, cpu) if which == "key_module" else (cpu, meta)
    with pytest.raises(ValueError, match=rf"^{which} parameter 0 \(weight\) is on meta"):
        ck.momentum_update_(key, query, 0.9)


@pytest.mark.parametrize("key,query,momentum,arg", [
    (torch.zeros(3), torch.nn.Linear(3, 2), 0.9, "key_module"),
    (torch.nn.Linear(3, 2), [torch.zeros(3)], 0.9, "query_module"),
    (torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), "0.9", "momentum"),
    (torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), True, "momentum"),
    (torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.tensor(0.9), "momentum"),
], ids=["tensor-key", "list-query", "str-momentum", "bool-momentum", "tensor-momentum"])
def test_momentum_update_type_errors_name_the_argument(key, query, momentum, arg):
    with pytest.raises(TypeError, match=rf"^{arg} must be"):
        ck.momentum_update_(key, query, momentum)


def test_momentum_update_nan_momentum():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got nan"):
        ck.momentum_update_(torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), math.nan)


# ---- concept_contrastive_loss: its own argument names ---------------------------------------

def _concept_args(B=3, P=4, D=6, n_cls=6, K=2):
    g = torch.Generator().manual_seed(1)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return (unit(B, P, D), unit(B, P, D), unit(n_cls, K, P, D), torch.tensor([0, 1, 1]),
            torch.tensor([[1, 2, 3], [0, 2, 3], [2, 3, 4]]))


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(k_pos=0), ValueError, "k_pos must be > 0"),
    (dict(k_pos=17), ValueError, "k_pos must be <= P*P = 16"),
    (dict(k_pos=2.0), TypeError, "k_pos must be an int"),
    (dict(k_neg=17), ValueError, "k_neg must be <= P*P = 16"),
    (dict(k_neg=-1), ValueError, "k_neg must be > 0"),
    (dict(k_neg="10"), TypeError, "k_neg must be an int"),
    (dict(choice_cur=torch.zeros(3, 2, dtype=torch.long)), ValueError, "choice_cur must have shape (3, 1)"),
    (dict(choice_cur=torch.full((3, 1), 3)), ValueError, "choice_cur values must lie in [0, 3) (k_pos)"),
    (dict(choice_cur=torch.zeros(3, 1)), TypeError, "choice_cur must have dtype int64"),
    (dict(choice_cur=[[0], [0], [0]]), TypeError, "choice_cur must be a torch.Tensor"),
    (dict(choice_pos=torch.zeros(3, 1, dtype=torch.long)), ValueError, "choice_pos must have shape (3, 2)"),
    (dict(choice_pos=torch.full((3, 2), -1)), ValueError, "choice_pos values must lie in [0, 3) (k_pos)"),
    (dict(k_pos=2, choice_pos=torch.full((3, 2), 2)), ValueError, "choice_pos values must lie in [0, 2) (k_pos)"),
    (dict(choice_pos=torch.zeros(3, 2, dtype=torch.long, device="meta")), ValueError, "choice_pos on meta"),
])
def test_concept_loss_errors_name_its_own_arguments(kw, exc, msg):
    with pytest.raises(exc) as e:
        ck.concept_contrastive_loss(*_concept_args(), **kw)
    assert msg in str(e.value), str(e.value)


def test_concept_loss_valid_choices_still_work():
    q, k, qh, y, conf = _concept_args()
    a = ck.concept_contrastive_loss(q, k, qh, y, conf, choice_cur=torch.zeros(3, 1, dtype=torch.long),
                                    choice_pos=torch.full((3, 2), 2))
    assert torch.isfinite(a)


# ---- module constructors ----------------------------------------------------------------------

@pytest.mark.parametrize("make,exc,msg", [
    (lambda: ck.nn.DualAttention(16.0), TypeError, "channels must be an int, got float"),
    (lambda: ck.nn.DualAttention(-16), ValueError, "channels must be > 0"),
    (lambda: ck.nn.DualAttention(16, 2.0), TypeError, "reduction must be an int, got float"),
    (lambda: ck.nn.PositionAttention(16, 0), ValueError, "reduction must be > 0"),
    (lambda: ck.nn.InformationBottleneckHead(-8, 10), ValueError, "in_channels must be > 0"),
    (lambda: ck.nn.InformationBottleneckHead(16.0, 10), TypeError, "in_channels must be an int"),
    (lambda: ck.nn.InformationBottleneckHead(16, 0), ValueError, "num_classes must be > 0"),
    (lambda: ck.nn.InformationBottleneckHead(16, 10.5), TypeError, "num_classes must be an int"),
    (lambda: ck.nn.InformationBottleneckHead(16, 10, latent_dim=-1), ValueError, "latent_dim must be > 0"),
    (lambda: ck.nn.InformationBottleneckHead(16, 10, latent_dim=8.0), TypeError, "latent_dim must be an int"),
    (lambda: ck.nn.InformationBottleneckHead(16, 10, reduction=-2), ValueError, "reduction must be > 0"),
    (lambda: ck.nn.InformationBottleneckHead(16, 10, sample_in_eval="no"), TypeError, "sample_in_eval must be a bool"),
])
def test_module_sizes_are_validated(make, exc, msg):
    with pytest.raises(exc) as e:
        make()
    assert msg in str(e.value), str(e.value)


def test_dual_attention_names_x_on_a_channel_mismatch():
    with pytest.raises(ValueError, match=r"x must have 16 channels"):
        ck.nn.DualAttention(16)(torch.randn(2, 8, 3, 3))
