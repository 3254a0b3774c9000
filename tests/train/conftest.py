"""Shared pieces of the training tests: one torch thread (the 2-core CI machine runs 2 xdist
workers; 2 OpenMP threads per worker were 10x slower there), a tiny CNN backbone, tiny configs."""
import pytest
import torch
from torch import nn

from concept_kernels.train import Config


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyNet(nn.Module):
    """(B, 3, H, W) -> (B, 64, H/8, W/8) with batch norms (stride 8)."""

    def __init__(self, channels: int = 64):
        super().__init__()
        layers, c_in = [], 3
        for c in (16, 32, channels):
            layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.blocks = nn.Sequential(*layers)

    def forward(self, x):
        return self.blocks(x)


@pytest.fixture
def tiny_net():
    return TinyNet


def tiny_config(tmp_path, **kw) -> Config:
    """lite0 (random init) at 32 px, 4 images per step, P=4 patches of 16 px, K=4, N_conf=3."""
    base = dict(model="tf_efficientnet_lite0", pretrained=False, image_size=32, batch_size=4, shots_per_class=2,
                epochs=1, iters_per_epoch=2, num_patches=4, num_confusing=3, queue_len=4, patch_pixels=16,
                lr=1e-3, test_limit=40, progress=False, out=str(tmp_path / "run"))
    base.update(kw)
    return Config(**base)
