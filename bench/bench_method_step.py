"""Seconds per training step of every registered fine-tuning method against vanilla.

One timed call = ``model(views, labels)`` + ``zero_grad`` + ``backward`` + ``SGD.step`` of the
``ConceptTuner`` that the trainer builds for the method (``trainer.build_model`` from the demo's
``Config``, so each method runs with its CLI defaults, the demo's Concept-Tuning settings and its
surgical blocks; the optimizer groups are the method's own, as in training), on random views; data
loading, augmentation and the once-per-run ``prepare`` (DELTA's channel attention, Co-Tuning's
relationship, WiSE-FT's probe: run untimed before the first call, on the batch's images, with DELTA's
attention on 4 images) are excluded, as is WiSE-FT's end-of-run sweep.

Providers: the names of ``concept_kernels.train.METHODS`` (vanilla first, the baseline of the ratio), so a
method registered later appears here without an edit. Shapes: the demo configuration (pretrained lite0,
96 px, batch 20, 10 classes; ``train/demo.py`` explains each choice) and a tiny smoke shape.

extra_info: ``ratio_to_vanilla`` (median / vanilla's median in the same session), ``loss_terms_ms`` (the
median time of the method's ``loss_terms`` hook inside the step, forward only: what the method computes
on top of the shared backbone pass and CE, e.g. BSS's SVD, DELTA's pretrained-copy forward and feature-map
distance; its backward is in the rest of the step) and ``loss_parts`` (the weighted parts it adds to
CE). ``BENCH_THREADS=<n>`` sets torch's thread count (recorded as ``torch_threads``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List

import pytest
import torch
from shapes import rounds

from concept_kernels.train import METHODS

OP = "method_step"
MODE = "step"
PROVIDERS = ("vanilla", *(m for m in METHODS if m != "vanilla"))
_MEDIANS: Dict[str, float] = {}  # group -> vanilla median (s)


@dataclass(frozen=True)
class MethodShape:
    id: str
    image: int  # input side (px)
    B: int
    cls: int
    model: str = "tf_efficientnet_lite0"
    pretrained: bool = True  # Co-Tuning needs the pretrained source head
    gpu: bool = False
    smoke: bool = False
    rounds: int = 5

    def describe(self) -> str:
        return (f"{self.model}{' (pretrained)' if self.pretrained else ''}, {self.image}px, B={self.B}, "
                f"{self.cls} classes; each method with the demo's Config (its CLI defaults)")


SHAPES = [
    MethodShape("smoke", image=32, B=10, cls=5, smoke=True, rounds=2),
    MethodShape("demo", image=96, B=20, cls=10),  # the `make demo` configuration (train/demo.py)
]


pytestmark = pytest.mark.usefixtures("bench_threads")  # BENCH_THREADS=<n> (bench/conftest.py)


@functools.cache
def _backbone(model: str, pretrained: bool) -> torch.nn.Module:
    """The backbone, created once per session (each benchmark trains a copy)."""
    from concept_kernels.train import create_backbone

    return create_backbone(model, pretrained)


def _config(shape: MethodShape, method: str, out):
    from concept_kernels.train.demo import demo_config

    cfg = demo_config(method, seed=0, epochs=1, shots=10, test_limit=0, out=out)
    return dataclasses.replace(cfg, model=shape.model, pretrained=shape.pretrained, image_size=shape.image,
                               batch_size=shape.B, delta_attention_images=4,
                               **(dict(num_patches=4, num_confusing=3, queue_len=4, patch_pixels=16)
                                  if shape.smoke else {}))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_method_step(benchmark, bench, tmp_path, shape, provider):
    from concept_kernels.train.trainer import backbone_lr_mult, build_model

    benchmark.group = bench.group(OP, MODE, shape)
    device = bench.device(OP, MODE, shape, provider)
    cfg = _config(shape, provider, tmp_path)
    try:
        backbone = copy.deepcopy(_backbone(cfg.model, cfg.pretrained))
    except RuntimeError as e:  # offline weights not installed
        bench.skip(OP, MODE, shape, provider, f"no pretrained {cfg.model}: {e}")
    net = build_model(cfg, backbone, shape.cls, device)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(shape.B, 3, shape.image, shape.image, generator=g)
    labels = torch.arange(shape.B) % shape.cls
    net.prepare(torch.utils.data.TensorDataset(images, labels), None)
    net.train()
    opt = torch.optim.SGD(net.param_groups(cfg.lr, backbone_lr_mult(cfg)), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    views = torch.randn(net.num_views, shape.B, 3, shape.image, shape.image, generator=g).to(device)
    labels = labels.to(device)

    terms: List[float] = []
    inner = net.impl.loss_terms

    def timed_terms(*args, **kw):
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        terms.append(time.perf_counter() - t0)
        return out

    net.impl.loss_terms = timed_terms  # (an instance attribute over the class's hook)
    last: Dict[str, torch.Tensor] = {}

    def step():
        out = net(views, labels)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        last.update(out)

    bench.run(benchmark, step, op=OP, provider=provider, mode=MODE, shape=shape, device=device,
              dtype=torch.float32, rounds=rounds(shape))
    weights = net.weights  # the loss parts the method adds to CE (concept: img, con, ce_ib, kl)
    benchmark.extra_info["loss_parts"] = ",".join(k for k in weights if k in last and
                                                  (last[k].requires_grad or float(last[k]) != 0.0))
    if benchmark.disabled or benchmark.stats is None:
        return
    benchmark.extra_info["loss_terms_ms"] = round(statistics.median(terms) * 1e3, 2)
    median = benchmark.stats.stats.median
    if provider == "vanilla":
        _MEDIANS[benchmark.group] = median
    elif benchmark.group in _MEDIANS:
        benchmark.extra_info["ratio_to_vanilla"] = round(median / _MEDIANS[benchmark.group], 2)
