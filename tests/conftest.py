"""Test-suite set-up: runs on a CPU-only machine with no network.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported (it is read
at decoration time), so it is set here, before the package is imported by any test module.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # `import oracle` from any test folder

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    """Every test starts from seed 0 and with no forced backend."""
    torch.manual_seed(0)
    monkeypatch.delenv("CONCEPT_KERNELS_BACKEND", raising=False)
    yield
