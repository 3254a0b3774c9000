"""Seconds per training step: vanilla fine-tuning vs Concept-Tuning (issue 5 target: <= 3x vanilla on CPU).

One timed call = ``model(views, labels)`` + ``zero_grad`` + ``backward`` + ``SGD.step`` of
``concept_kernels.train.ConceptTuner`` on random views (data loading and augmentation excluded).

Providers (one table per ``train_step-step-<shape>`` group):

* ``vanilla``: CE on the main head, one backbone pass (the baseline of the ratio);
* ``concept_image`` / ``concept_roi``: Concept-Tuning with the published patch encoding (crops
  through the network, one pass with per-position BN statistics) / the fast RoIAlign-on-the-map
  mode; ops dispatched automatically (fused backends where they exist);
* ``concept_image_ref`` / ``concept_roi_ref``: the same with ``CONCEPT_KERNELS_BACKEND=reference``;
* ``concept_image_problem``: ``concept_image`` with ``sinkhorn_stop="problem"`` (per-problem Sinkhorn
  stopping, not the published rule that ``concept_image`` runs), so both rules' costs show side by side.

Shapes: the demo configuration (lite0), and ViT-Tiny next to ResNet-18 at the same 96-px scale (0.2 and
0.33 GMAC per image: the CNN of the zoo closest in cost), random init, for the transformer's overhead.

extra_info: ``ratio_to_vanilla`` (this provider's median / vanilla's median measured in the same
session; vanilla runs first in each group) and the backend of each op. ``BENCH_THREADS=<n>`` sets
torch's thread count (recorded as ``torch_threads``); on a busy 2-core machine 1 thread is far
less noisy than 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import pytest
import torch
from shapes import rounds

from concept_kernels import _backends

OP = "train_step"
MODE = "step"
PROVIDERS = ("vanilla", "concept_image", "concept_image_problem", "concept_image_ref", "concept_roi",
             "concept_roi_ref")
_MEDIANS: Dict[str, float] = {}  # group -> vanilla median (s)


@dataclass(frozen=True)
class StepShape:
    id: str
    model: str
    pretrained: bool
    image: int  # input side (px)
    B: int
    cls: int
    P: int = 9
    n_conf: int = 9
    K: int = 10
    patch_pixels: int = 24
    gpu: bool = False
    smoke: bool = False
    rounds: int = 5
    providers: tuple = PROVIDERS

    def describe(self) -> str:
        return (f"{self.model}, {self.image}px, B={self.B}, {self.cls} classes, P={self.P} crops of "
                f"{self.patch_pixels}px, N_conf={self.n_conf}, K={self.K}")


SHAPES = [
    StepShape("smoke", "tf_efficientnet_lite0", False, image=32, B=4, cls=5, P=4, n_conf=3, K=4, patch_pixels=16,
              smoke=True, rounds=2),
    # the `make demo` configuration (concept_kernels/train/demo.py explains the choices)
    StepShape("demo", "tf_efficientnet_lite0", True, image=96, B=20, cls=10, P=9, n_conf=9, K=10, patch_pixels=24),
    # a transformer and a CNN of similar cost at the demo scale (random init: no offline weights for either)
    StepShape("demo_vit_tiny", "vit_tiny_patch16_224", False, image=96, B=20, cls=10, P=9, n_conf=9, K=10,
              patch_pixels=32, providers=("vanilla", "concept_image", "concept_image_problem")),
    StepShape("demo_resnet18", "resnet18", False, image=96, B=20, cls=10, P=9, n_conf=9, K=10, patch_pixels=24,
              providers=("vanilla", "concept_image", "concept_image_problem")),
    # the published setting on a GPU: 224 px, B=48, CUB-200 classes, N_conf=199, K=40, 64-px exact crops
    StepShape("gpu_cub", "tf_efficientnet_lite0", True, image=224, B=48, cls=200, P=9, n_conf=199, K=40,
              patch_pixels=64, gpu=True, rounds=10),
]


pytestmark = pytest.mark.usefixtures("bench_threads")  # BENCH_THREADS=<n> (bench/conftest.py)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_train_step(benchmark, bench, monkeypatch, shape, provider):
    from concept_kernels.train import ConceptTuner, create_backbone

    if provider not in shape.providers:
        pytest.skip(f"{provider} is not run at the {shape.id} shape")
    benchmark.group = bench.group(OP, MODE, shape)
    device = bench.device(OP, MODE, shape, provider)
    if provider.endswith("_ref"):
        monkeypatch.setenv(_backends.ENV_VAR, "reference")
    method, mode = ("vanilla", "image") if provider == "vanilla" else ("concept", provider.split("_")[1])
    stop = "problem" if provider.endswith("_problem") else "published"
    net = ConceptTuner(create_backbone(shape.model, shape.pretrained), shape.cls, (shape.image, shape.image),
                       method=method, patch_mode=mode, num_patches=shape.P, num_confusing=shape.n_conf,
                       queue_len=shape.K, patch_pixels=shape.patch_pixels, sinkhorn_stop=stop).to(device)
    opt = torch.optim.SGD(net.param_groups(1e-3), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(4, shape.B, 3, shape.image, shape.image, generator=g).to(device)
    labels = (torch.arange(shape.B) % shape.cls).to(device)

    def step():
        out = net(views, labels)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    used = {op: _backends.select(op, device).name for op in _backends.ops()} if method == "concept" else {}
    bench.run(benchmark, step, op=OP, provider=provider, mode=MODE, shape=shape, device=device,
              dtype=torch.float32, rounds=rounds(shape), extra=dict(backends=used))
    if benchmark.disabled or benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    if provider == "vanilla":
        _MEDIANS[benchmark.group] = median
    elif benchmark.group in _MEDIANS:
        benchmark.extra_info["ratio_to_vanilla"] = round(median / _MEDIANS[benchmark.group], 2)
