"""The optional extension concept_kernels._C: it builds, loads, registers its ops, and fails helpfully.

A missing _C is a FAILURE here (CI must build it), unless CONCEPT_KERNELS_NO_EXT=1 says the
pure-Python install is intended. Also covers the torchvision/timm import shim in _compat.
"""

import os
import subprocess
import sys

import pytest
import torch

from concept_kernels import _compat, _ext

NO_EXT = os.environ.get("CONCEPT_KERNELS_NO_EXT", "") not in ("", "0")
# not importorskip: a missing _C must fail these tests unless the pure-Python install is intended
skip_if_no_ext = pytest.mark.skipif(NO_EXT, reason="CONCEPT_KERNELS_NO_EXT=1: pure-Python install")


@pytest.fixture
def fresh_ext():
    """Let a test re-run the loader (with monkeypatches), then restore the real state."""
    _ext._reset_for_tests()
    yield _ext
    _ext._reset_for_tests()


@pytest.mark.ext
@skip_if_no_ext
def test_ext_is_built_and_loads():
    assert _ext.HAS_EXT, _ext.EXT_ERROR  # fail (not skip) with the reason and the build hint
    assert _ext.EXT_ERROR is None
    _ext.require_ext("test")  # no raise
    assert hasattr(torch.ops.concept_kernels, "omp_max_threads")


@pytest.mark.ext
@skip_if_no_ext
def test_omp_max_threads_follows_torch():
    assert _ext.HAS_EXT, _ext.EXT_ERROR
    n = torch.ops.concept_kernels.omp_max_threads()
    assert isinstance(n, int) and n > 0
    assert n == _ext.omp_max_threads()
    # _C shares torch's libgomp (same soname), so torch.set_num_threads reaches our kernels
    assert n == torch.get_num_threads()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _ext.omp_max_threads() == 1
    finally:
        torch.set_num_threads(old)


@pytest.mark.ext
@skip_if_no_ext
def test_ext_has_cuda_matches_build():
    assert _ext.HAS_EXT, _ext.EXT_ERROR
    has_cuda = _ext.ext_has_cuda()
    assert isinstance(has_cuda, bool)
    info = _ext.build_info()
    assert info, "concept_kernels/_build_info.py missing: setup.py did not run"
    assert has_cuda == info["with_cuda"]
    if torch.version.cuda is None:
        assert not has_cuda  # a CPU torch can never build the CUDA sources
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0], "rebuild: torch changed"


def test_broken_ext_gives_helpful_error(fresh_ext, monkeypatch):
    def broken():
        raise ImportError("_C.abi3.so: undefined symbol: _ZN3c104impl3fooEv")

    monkeypatch.delenv("CONCEPT_KERNELS_NO_EXT", raising=False)
    monkeypatch.setattr(fresh_ext, "_import_ext", broken)
    assert fresh_ext.HAS_EXT is False
    err = fresh_ext.EXT_ERROR
    assert "undefined symbol" in err  # the original reason
    assert "pip install --no-build-isolation --no-deps -e ." in err  # the way out
    assert fresh_ext.ext_has_cuda() is False
    assert fresh_ext.omp_max_threads() is None
    with pytest.raises(RuntimeError, match="ot_similarity.*undefined symbol.*--no-build-isolation"):
        fresh_ext.require_ext("ot_similarity (cpu kernel)")


def test_no_ext_env_disables_loading(fresh_ext, monkeypatch):
    monkeypatch.setenv("CONCEPT_KERNELS_NO_EXT", "1")
    assert fresh_ext.HAS_EXT is False
    assert "CONCEPT_KERNELS_NO_EXT" in fresh_ext.EXT_ERROR


def test_package_imports_without_ext():
    """A fresh interpreter where `concept_kernels._C` cannot be found still imports the package,
    reports why, and has not initialised CUDA."""
    code = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "concept_kernels._C":
            raise ModuleNotFoundError("No module named 'concept_kernels._C'")
sys.meta_path.insert(0, Block())
import concept_kernels, torch
from concept_kernels import _ext
assert not torch.cuda.is_initialized(), "package import initialised CUDA"
assert _ext.HAS_EXT is False
assert "--no-build-isolation" in _ext.EXT_ERROR, _ext.EXT_ERROR
assert not torch.cuda.is_initialized(), "loading _ext initialised CUDA"
print("OK")
"""
    env = dict(os.environ, CONCEPT_KERNELS_NO_EXT="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def test_timm_imports_and_runs_after_torchvision_shim(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network, ever
    _compat.ensure_torchvision_importable()
    assert _compat.ensure_torchvision_importable() is False  # idempotent
    assert torch.ops.torchvision.nms is not None  # real or stand-in schema exists
    timm = _compat.import_timm()
    import torchvision  # noqa: F401  (must import too: timm needs it)

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
