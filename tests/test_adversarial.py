"""Adversarial inputs for every public callable of ``concept_kernels.__all__`` (and ``concept_kernels.nn``).

Each case makes one argument bad (wrong type, dtype, shape, range, a NaN scalar, a ``meta`` tensor, ...)
and asserts a ValueError/TypeError whose message names that argument (for ``meta`` tensors:
"<argument> ... on meta"). Cases whose inputs would reach a compiled kernel if validation missed them run
in ONE child process, so that a crash (a segfault in a kernel) fails those cases instead of killing
the test session. Run this file directly with case ids to execute them: ``python test_adversarial.py ID...``.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

import concept_kernels as ck

META = "meta"


class Case(NamedTuple):
    id: str
    target: str  # the public name under test
    call: Callable[[], Any]
    exc: type
    arg: str  # the argument the message must name
    meta: bool = False  # message must say "<arg> on meta"


# Inputs that reach compiled kernels (ot_similarity's and channel_attention's cpu backends) when
# validation lets them through: these run in the child process.
ISOLATED = {"ot_similarity", "channel_attention", "concept_contrastive_loss", "nn.ChannelAttention",
            "nn.DualAttention", "nn.InformationBottleneckHead.forward"}


def _g():
    return torch.Generator().manual_seed(0)


def _unit(*shape, device="cpu", dtype=torch.float32):
    return F.normalize(torch.randn(*shape, generator=_g(), dtype=dtype), dim=-1).to(device)


CASES: list[Case] = []


def _cases(target: str, base: Callable[[], dict], call: Callable[[dict], Any], rows) -> None:
    """rows: (id, overrides (dict or callable(args) -> None), exc, arg[, meta])."""
    for row in rows:
        cid, over, exc, arg, *meta = row

        def run(over=over):
            args = base()
            if callable(over):
                over(args)
            else:
                args.update(over)
            return call(args)

        CASES.append(Case(f"{target}:{cid}", target, run, exc, arg, bool(meta and meta[0])))


def _set(name, fn):
    """An override that replaces args[name] by fn(args[name])."""
    def over(args):
        args[name] = fn(args[name])
    return over


def _pop(args: dict, names) -> list:
    """The positional arguments, removed from ``args`` (what is left are the keyword arguments)."""
    return [args.pop(k) for k in names]


def _all_meta(args):
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            args[k] = v.to(META)


def _nan(name, i=0):
    def over(args):
        args[name] = args[name].clone()
        args[name].view(-1)[i] = math.nan
    return over


# ---- ot_similarity ---------------------------------------------------------------------------

def _ot_base():
    return dict(query=_unit(2, 4, 8), bank=_unit(5, 4, 8), index=torch.tensor([[0, 1, 2], [2, 3, 4]]))


_cases("ot_similarity", _ot_base,
       lambda a: ck.ot_similarity(a.pop("query"), a.pop("bank"), a.pop("index"), **a), [
           ("all-meta", _all_meta, ValueError, "query", True),
           ("bank-meta", _set("bank", lambda t: t.to(META)), ValueError, "bank", True),
           ("index-meta", _set("index", lambda t: t.to(META)), ValueError, "index", True),
           ("choice-meta", dict(choice=torch.zeros(2, 3, dtype=torch.long, device=META)), ValueError, "choice", True),
           ("query-list", _set("query", lambda t: t.tolist()), TypeError, "query"),
           ("query-int", _set("query", lambda t: t.long()), TypeError, "query"),
           ("query-2d", _set("query", lambda t: t[0]), ValueError, "query"),
           ("query-P0", _set("query", lambda t: t[:, :0]), ValueError, "query"),
           ("bank-shape", _set("bank", lambda t: t[:, :3]), ValueError, "bank"),
           ("index-high", dict(index=torch.tensor([[0, 1, 5], [0, 0, 0]])), ValueError, "index"),
           ("index-negative", dict(index=torch.tensor([[0, -1, 2], [0, 0, 0]])), ValueError, "index"),
           ("index-int32", _set("index", lambda t: t.int()), TypeError, "index"),
           ("index-rows", _set("index", lambda t: t[:1]), ValueError, "index"),
           ("k-zero", dict(k=0), ValueError, "k"),
           ("k-above-P2", dict(k=17), ValueError, "k"),
           ("k-huge", dict(k=2**62), ValueError, "k"),
           ("k-str", dict(k="3"), TypeError, "k"),
           ("k-float", dict(k=2.0), TypeError, "k"),
           ("choice-high", dict(choice=torch.full((2, 3), 3)), ValueError, "choice"),
           ("choice-shape", dict(choice=torch.zeros(2, 2, dtype=torch.long)), ValueError, "choice"),
           ("choice-float", dict(choice=torch.zeros(2, 3)), TypeError, "choice"),
           ("choice-topk", dict(select="topk", choice=torch.zeros(2, 3, dtype=torch.long)), ValueError, "choice"),
           ("eps-zero", dict(eps=0.0), ValueError, "eps"),
           ("eps-nan", dict(eps=math.nan), ValueError, "eps"),
           ("eps-inf", dict(eps=math.inf), ValueError, "eps"),
           ("max_iter-zero", dict(max_iter=0), ValueError, "max_iter"),
           ("max_iter-float", dict(max_iter=10.5), TypeError, "max_iter"),
           ("max_iter-huge-negative", dict(max_iter=-2**40), ValueError, "max_iter"),
           ("tol-negative", dict(tol=-1e-3), ValueError, "tol"),
           ("select-bad", dict(select="median"), ValueError, "select"),
           ("stop-bad", dict(stop="never"), ValueError, "stop"),
           ("backend-bad", dict(backend="metal"), ValueError, "backend"),
       ])


# ---- channel_attention / position_attention -------------------------------------------------

def _cam_base():
    return dict(x=torch.randn(2, 4, 3, 3, generator=_g()), gamma=torch.full((1,), 0.5))


_cases("channel_attention", _cam_base, lambda a: ck.channel_attention(a.pop("x"), a.pop("gamma"), **a), [
    ("all-meta", _all_meta, ValueError, "x", True),
    ("gamma-meta", _set("gamma", lambda t: t.to(META)), ValueError, "gamma", True),
    ("x-3d", _set("x", lambda t: t[0]), ValueError, "x"),
    ("x-int", _set("x", lambda t: t.int()), TypeError, "x"),
    ("x-C0", _set("x", lambda t: t[:, :0]), ValueError, "x"),
    ("x-HW0", _set("x", lambda t: t[:, :, :0]), ValueError, "x"),
    ("x-numpy", _set("x", lambda t: t.numpy()), TypeError, "x"),
    ("gamma-shape", dict(gamma=torch.zeros(2)), ValueError, "gamma"),
    ("gamma-float", dict(gamma=0.5), TypeError, "gamma"),
    ("gamma-int", dict(gamma=torch.zeros(1, dtype=torch.long)), TypeError, "gamma"),
    ("input_precision-tf32", dict(input_precision="tf32"), ValueError, "input_precision"),
    ("backend-bad", dict(backend="gpu"), ValueError, "backend"),
])


def _pam_base():
    g = _g()
    return dict(x=torch.randn(2, 16, 3, 3, generator=g), wq=torch.randn(2, 16, generator=g), bq=torch.zeros(2),
                wk=torch.randn(2, 16, generator=g), bk=torch.zeros(2), wv=torch.randn(16, 16, generator=g),
                bv=torch.zeros(16), gamma=torch.full((1,), 0.5))


PAM_ORDER = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "gamma")
_cases("position_attention", _pam_base,
       lambda a: ck.position_attention(*_pop(a, PAM_ORDER), **a), [
           ("all-meta", _all_meta, ValueError, "x", True),
           ("bq-meta", _set("bq", lambda t: t.to(META)), ValueError, "bq", True),
           ("x-list", _set("x", lambda t: t.tolist()), TypeError, "x"),
           ("x-bool", _set("x", lambda t: t > 0), TypeError, "x"),
           ("wq-int", _set("wq", lambda t: t.long()), TypeError, "wq"),
           ("wq-C", _set("wq", lambda t: t[:, :8]), ValueError, "wq"),
           ("wk-rows", dict(wk=torch.randn(3, 16)), ValueError, "wk"),
           ("bk-shape", dict(bk=torch.zeros(3)), ValueError, "bk"),
           ("wv-shape", dict(wv=torch.randn(16, 8)), ValueError, "wv"),
           ("bv-int", dict(bv=torch.zeros(16, dtype=torch.long)), TypeError, "bv"),
           ("gamma-shape", dict(gamma=torch.zeros(1, 1)), ValueError, "gamma"),
           ("backend-bad", dict(backend="tpu"), ValueError, "backend"),
       ])


# ---- search_concept_patches ------------------------------------------------------------------

def _search_base():
    g = _g()
    return dict(features=torch.rand(3, 64, 5, 6, generator=g), logits=torch.randn(3, 10, generator=g),
                labels=torch.tensor([0, 4, 9]), head_weight=torch.randn(10, 64, generator=g), image_size=(160, 192),
                num_confusing=3)


SEARCH_ORDER = ("features", "logits", "labels", "head_weight", "image_size")
_cases("search_concept_patches", _search_base,
       lambda a: ck.search_concept_patches(*_pop(a, SEARCH_ORDER), **a), [
           ("all-meta", _all_meta, ValueError, "labels", True),
           ("features-meta", _set("features", lambda t: t.to(META)), ValueError, "features", True),
           ("logits-meta", _set("logits", lambda t: t.to(META)), ValueError, "logits", True),
           ("head_weight-meta", _set("head_weight", lambda t: t.to(META)), ValueError, "head_weight", True),
           ("logits-nan", _nan("logits", 3), ValueError, "logits"),
           ("features-nan", _nan("features", 7), ValueError, "features"),
           ("head_weight-nan", _nan("head_weight"), ValueError, "head_weight"),
           ("features-3d", _set("features", lambda t: t[0]), ValueError, "features"),
           ("features-int", _set("features", lambda t: t.long()), TypeError, "features"),
           ("logits-rows", _set("logits", lambda t: t[:2]), ValueError, "logits"),
           ("labels-float", _set("labels", lambda t: t.float()), TypeError, "labels"),
           ("labels-high", dict(labels=torch.tensor([0, 4, 10])), ValueError, "labels"),
           ("labels-negative", dict(labels=torch.tensor([0, -4, 1])), ValueError, "labels"),
           ("head_weight-C", _set("head_weight", lambda t: t[:, :32]), ValueError, "head_weight"),
           ("image_size-str", dict(image_size="160x192"), ValueError, "image_size"),
           ("image_size-float", dict(image_size=(160.0, 192)), ValueError, "image_size"),
           ("image_size-small", dict(image_size=(4, 4)), ValueError, "image_size"),
           ("num_confusing-low", dict(num_confusing=2), ValueError, "num_confusing"),
           ("num_confusing-str", dict(num_confusing="3"), TypeError, "num_confusing"),
           ("num_patches-zero", dict(num_patches=0), ValueError, "num_patches"),
           ("channels_per_group-negative", dict(channels_per_group=-1), ValueError, "channels_per_group"),
           ("group_stride-float", dict(group_stride=1.5), TypeError, "group_stride"),
           ("patch_size-zero", dict(patch_size=0), ValueError, "patch_size"),
           ("patch_size-nan", dict(patch_size=math.nan), ValueError, "patch_size"),
       ])


# ---- losses ----------------------------------------------------------------------------------

def _image_base():
    return dict(z_q=_unit(4, 8), z_k=_unit(4, 8), queue_z=_unit(5, 3, 8), labels=torch.tensor([0, 2, 2, 4]))


IMAGE_ORDER = ("z_q", "z_k", "queue_z", "labels")
_cases("image_contrastive_loss", _image_base,
       lambda a: ck.image_contrastive_loss(*_pop(a, IMAGE_ORDER), **a), [
           ("all-meta", _all_meta, ValueError, "labels", True),
           ("z_k-meta", _set("z_k", lambda t: t.to(META)), ValueError, "z_k", True),
           ("queue_z-meta", _set("queue_z", lambda t: t.to(META)), ValueError, "queue_z", True),
           ("z_q-int", _set("z_q", lambda t: t.long()), TypeError, "z_q"),
           ("z_q-1d", _set("z_q", lambda t: t[0]), ValueError, "z_q"),
           ("z_k-shape", _set("z_k", lambda t: t[:3]), ValueError, "z_k"),
           ("queue_z-D", _set("queue_z", lambda t: t[..., :4]), ValueError, "queue_z"),
           ("labels-high", dict(labels=torch.tensor([0, 2, 2, 5])), ValueError, "labels"),
           ("labels-int32", _set("labels", lambda t: t.int()), TypeError, "labels"),
           ("temperature-zero", dict(temperature=0.0), ValueError, "temperature"),
           ("temperature-str", dict(temperature="0.07"), TypeError, "temperature"),
           ("temperature-nan", dict(temperature=math.nan), ValueError, "temperature"),
       ])


def _concept_base():
    return dict(q_patches=_unit(3, 4, 6), k_patches=_unit(3, 4, 6), queue_h=_unit(6, 2, 4, 6),
                labels=torch.tensor([0, 1, 1]), confusing=torch.tensor([[1, 2, 3], [0, 2, 3], [2, 3, 4]]))


CONCEPT_ORDER = ("q_patches", "k_patches", "queue_h", "labels", "confusing")
_cases("concept_contrastive_loss", _concept_base,
       lambda a: ck.concept_contrastive_loss(*_pop(a, CONCEPT_ORDER), **a), [
           ("all-meta", _all_meta, ValueError, "labels", True),
           ("q_patches-meta", _set("q_patches", lambda t: t.to(META)), ValueError, "q_patches", True),
           ("queue_h-meta", _set("queue_h", lambda t: t.to(META)), ValueError, "queue_h", True),
           ("confusing-meta", _set("confusing", lambda t: t.to(META)), ValueError, "confusing", True),
           ("choice_cur-meta", dict(choice_cur=torch.zeros(3, 1, dtype=torch.long, device=META)), ValueError,
            "choice_cur", True),
           ("q_patches-int", _set("q_patches", lambda t: t.long()), TypeError, "q_patches"),
           ("k_patches-shape", _set("k_patches", lambda t: t[:, :3]), ValueError, "k_patches"),
           ("queue_h-P", _set("queue_h", lambda t: t[:, :, :3]), ValueError, "queue_h"),
           ("labels-high", dict(labels=torch.tensor([0, 1, 6])), ValueError, "labels"),
           ("confusing-high", dict(confusing=torch.tensor([[1, 2, 6], [0, 2, 3], [2, 3, 4]])), ValueError,
            "confusing"),
           ("confusing-1d", dict(confusing=torch.tensor([1, 2, 3])), ValueError, "confusing"),
           ("confusing-rows", dict(confusing=torch.tensor([[1, 2, 3]])), ValueError, "confusing"),
           ("k_pos-zero", dict(k_pos=0), ValueError, "k_pos"),
           ("k_pos-above-P2", dict(k_pos=17), ValueError, "k_pos"),
           ("k_pos-huge", dict(k_pos=2**62), ValueError, "k_pos"),
           ("k_neg-above-P2", dict(k_neg=17), ValueError, "k_neg"),
           ("k_neg-float", dict(k_neg=10.0), TypeError, "k_neg"),
           ("choice_cur-high", dict(choice_cur=torch.full((3, 1), 3)), ValueError, "choice_cur"),
           ("choice_cur-shape", dict(choice_cur=torch.zeros(3, dtype=torch.long)), ValueError, "choice_cur"),
           ("choice_pos-negative", dict(choice_pos=torch.full((3, 2), -1)), ValueError, "choice_pos"),
           ("choice_pos-float", dict(choice_pos=torch.zeros(3, 2)), TypeError, "choice_pos"),
           ("temperature-negative", dict(temperature=-0.07), ValueError, "temperature"),
           ("stop-bad", dict(stop="row"), ValueError, "stop"),
           ("eps-zero", dict(eps=0.0), ValueError, "eps"),
           ("max_iter-zero", dict(max_iter=0), ValueError, "max_iter"),
           ("tol-nan", dict(tol=math.nan), ValueError, "tol"),
       ])


def _kl_base():
    return dict(mu=torch.randn(4, 8, generator=_g()), sigma=torch.randn(4, 8, generator=_g()) * 0.1)


for _name in ("information_bottleneck_kl", "nn.information_bottleneck_kl"):
    _cases(_name, _kl_base, lambda a: ck.information_bottleneck_kl(a["mu"], a["sigma"]), [
        ("all-meta", _all_meta, ValueError, "mu", True),
        ("sigma-meta", _set("sigma", lambda t: t.to(META)), ValueError, "sigma", True),
        ("mu-int", _set("mu", lambda t: t.long()), TypeError, "mu"),
        ("mu-1d", _set("mu", lambda t: t[0]), ValueError, "mu"),
        ("sigma-shape", _set("sigma", lambda t: t[:, :4]), ValueError, "sigma"),
        ("sigma-list", _set("sigma", lambda t: t.tolist()), TypeError, "sigma"),
    ])


# ---- queues and EMA --------------------------------------------------------------------------

def _linear(device="cpu"):
    with torch.device(device):
        return torch.nn.Linear(3, 2)


def _ema_base():
    return dict(key_module=_linear(), query_module=_linear(), momentum=0.9)


_cases("momentum_update_", _ema_base, lambda a: ck.momentum_update_(**a), [
    ("key-meta", dict(key_module=_linear(META)), ValueError, "key_module", True),
    ("query-meta", dict(query_module=_linear(META)), ValueError, "query_module", True),
    ("key-tensor", dict(key_module=torch.zeros(3)), TypeError, "key_module"),
    ("query-params-list", lambda a: a.update(query_module=list(a["query_module"].parameters())), TypeError,
     "query_module"),
    ("momentum-str", dict(momentum="0.9"), TypeError, "momentum"),
    ("momentum-none", dict(momentum=None), TypeError, "momentum"),
    ("momentum-nan", dict(momentum=math.nan), ValueError, "momentum"),
    ("momentum-above-1", dict(momentum=1.5), ValueError, "momentum"),
    ("shape-mismatch", dict(query_module=torch.nn.Linear(4, 2)), ValueError, "query_module"),
    ("count-mismatch", dict(query_module=torch.nn.Linear(3, 2, bias=False)), ValueError, "query_module"),
])


def _queues(device="cpu", **kw):
    args = dict(num_classes=3, length=2, dim=4, num_patches=2)
    args.update(kw)
    q = ck.ClassQueues(**args)
    return q.to(device) if device != "cpu" else q


_cases("ClassQueues", dict, lambda a: _queues(**a), [
    ("num_classes-zero", dict(num_classes=0), ValueError, "num_classes"),
    ("length-float", dict(length=2.0), TypeError, "length"),
    ("dim-negative", dict(dim=-4), ValueError, "dim"),
    ("num_patches-str", dict(num_patches="2"), TypeError, "num_patches"),
])


def _enqueue_base():
    return dict(z_k=_unit(2, 4), patches_k=_unit(2, 2, 4), labels=torch.tensor([0, 2]))


_cases("ClassQueues.enqueue", _enqueue_base, lambda a: _queues().enqueue(a["z_k"], a["patches_k"], a["labels"]), [
    ("labels-meta", _set("labels", lambda t: t.to(META)), ValueError, "labels", True),
    ("z_k-meta", _set("z_k", lambda t: t.to(META)), ValueError, "z_k", True),
    ("patches_k-meta", _set("patches_k", lambda t: t.to(META)), ValueError, "patches_k", True),
    ("labels-high", dict(labels=torch.tensor([0, 3])), ValueError, "labels"),
    ("labels-float", _set("labels", lambda t: t.float()), TypeError, "labels"),
    ("z_k-shape", _set("z_k", lambda t: t[:, :3]), ValueError, "z_k"),
    ("patches_k-int", _set("patches_k", lambda t: t.long()), TypeError, "patches_k"),
])
CASES.append(Case("ClassQueues.enqueue:queues-on-meta", "ClassQueues.enqueue",
                  lambda: _queues(META).enqueue(_unit(2, 4), _unit(2, 2, 4), torch.tensor([0, 2])),
                  ValueError, "ClassQueues"))


# ---- nn modules ------------------------------------------------------------------------------

def _x(C=16):
    return dict(x=torch.randn(2, C, 3, 3, generator=_g()))


_cases("nn.ChannelAttention", _x, lambda a: ck.nn.ChannelAttention()(a["x"]), [
    ("x-meta", _set("x", lambda t: t.to(META)), ValueError, "x", True),
    ("x-3d", _set("x", lambda t: t[0]), ValueError, "x"),
    ("x-int", _set("x", lambda t: t.int()), TypeError, "x"),
])
_cases("nn.PositionAttention", dict, lambda a: ck.nn.PositionAttention(**a), [
    ("channels-float", dict(channels=16.0), TypeError, "channels"),
    ("channels-zero", dict(channels=0), ValueError, "channels"),
    ("reduction-zero", dict(channels=16, reduction=0), ValueError, "reduction"),
    ("reduction-above-channels", dict(channels=4, reduction=8), ValueError, "reduction"),
])
_cases("nn.PositionAttention.forward", _x, lambda a: ck.nn.PositionAttention(16)(a["x"]), [
    ("x-meta", _set("x", lambda t: t.to(META)), ValueError, "x", True),
    ("x-channels", dict(x=torch.randn(2, 8, 3, 3)), ValueError, "x"),
])
_cases("nn.DualAttention", _x, lambda a: ck.nn.DualAttention(**a)(torch.randn(2, 16, 3, 3)) if "x" not in a
       else ck.nn.DualAttention(16)(a["x"]), [
    ("channels-float", lambda a: a.clear() or a.update(channels=16.0), TypeError, "channels"),
    ("channels-negative", lambda a: a.clear() or a.update(channels=-16), ValueError, "channels"),
    ("reduction-float", lambda a: a.clear() or a.update(channels=16, reduction=2.0), TypeError, "reduction"),
    ("x-meta", _set("x", lambda t: t.to(META)), ValueError, "x", True),
    ("x-channels", dict(x=torch.randn(2, 8, 3, 3)), ValueError, "x"),
    ("x-int", _set("x", lambda t: t.long()), TypeError, "x"),
])
_cases("nn.InformationBottleneckHead", dict, lambda a: ck.nn.InformationBottleneckHead(**a), [
    ("in_channels-negative", dict(in_channels=-16, num_classes=10), ValueError, "in_channels"),
    ("in_channels-float", dict(in_channels=16.0, num_classes=10), TypeError, "in_channels"),
    ("num_classes-zero", dict(in_channels=16, num_classes=0), ValueError, "num_classes"),
    ("latent_dim-float", dict(in_channels=16, num_classes=10, latent_dim=8.5), TypeError, "latent_dim"),
    ("reduction-negative", dict(in_channels=16, num_classes=10, reduction=-8), ValueError, "reduction"),
    ("sample_in_eval-int", dict(in_channels=16, num_classes=10, sample_in_eval=1), TypeError, "sample_in_eval"),
])
_cases("nn.InformationBottleneckHead.forward", _x,
       lambda a: ck.nn.InformationBottleneckHead(16, 10, latent_dim=8)(a["x"]), [
           ("x-meta", _set("x", lambda t: t.to(META)), ValueError, "x", True),
           ("x-channels", dict(x=torch.randn(2, 8, 3, 3)), ValueError, "x"),
       ])

BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "duplicate case ids"
NOT_CALLABLE_API = {"BackendUnavailableError", "nn"}  # an exception class; a namespace (its members are cases)


# ---- running and judging ---------------------------------------------------------------------

def _outcome(case: Case) -> dict:
    try:
        case.call()
    except Exception as e:  # noqa: BLE001  (the type is judged below)
        return dict(exc=type(e).__name__, mro=[k.__name__ for k in type(e).__mro__], msg=str(e))
    return dict(exc=None, mro=[], msg="")


def _judge(case: Case, out: dict) -> None:
    assert out["exc"] is not None, f"{case.id}: no error raised"
    assert case.exc.__name__ in out["mro"], f"{case.id}: expected {case.exc.__name__}, got {out['exc']}: {out['msg']}"
    msg = out["msg"]
    if case.meta:
        assert re.search(rf"(?<![\w.]){re.escape(case.arg)}\b[^:]* on meta", msg), \
            f"{case.id}: message does not say '{case.arg} ... on meta': {msg}"
    else:
        assert re.search(rf"(?<![\w.]){re.escape(case.arg)}(?![\w])", msg), \
            f"{case.id}: message does not name {case.arg!r}: {msg}"


def _child(ids: list[str]) -> None:
    torch.set_num_threads(1)
    for cid in ids:
        print(json.dumps(dict(id=cid, **_outcome(BY_ID[cid]))), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1:])
else:
    import pytest

    @pytest.fixture(scope="module")
    def isolated_outcomes() -> dict:
        """{case id: outcome} from child processes; a case that kills its child maps to the reason, and
        a fresh child runs the cases after it."""
        todo = [c.id for c in CASES if c.target in ISOLATED]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        root = str(Path(ck.__file__).resolve().parents[1])  # the package the parent imported
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        env.pop("CONCEPT_KERNELS_BACKEND", None)
        got: dict = {}
        while todo:
            proc = subprocess.run([sys.executable, __file__, *todo], env=env, capture_output=True, text=True,
                                  timeout=600)
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    got[row.pop("id")] = row
            todo = [i for i in todo if i not in got]
            if todo:
                got[todo.pop(0)] = f"the child process died (exit code {proc.returncode}) running this case; " \
                                   f"stderr:\n{proc.stderr[-3000:]}"
        return got

    @pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
    def test_bad_input_names_the_argument(case, request):
        if case.target in ISOLATED:
            out = request.getfixturevalue("isolated_outcomes")[case.id]
            if isinstance(out, str):
                pytest.fail(f"{case.id}: {out}")
        else:
            out = _outcome(case)
        _judge(case, out)

    def test_every_public_callable_has_cases():
        targets = {c.target for c in CASES}
        names = [n for n in ck.__all__ if n not in NOT_CALLABLE_API] + [f"nn.{n}" for n in ck.nn.__all__]
        for name in names:
            assert any(t == name or t.startswith(name + ".") for t in targets), f"no adversarial case for {name}"
