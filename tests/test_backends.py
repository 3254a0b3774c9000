"""Backend selection: auto order, the environment override, explicit requests and info."""
import subprocess
import sys

import pytest
import torch

import concept_kernels as ck
from concept_kernels import _backends


def test_auto_picks_reference_on_cpu_today():
    for op in ("ot_similarity", "channel_attention", "position_attention"):
        assert _backends.select(op, torch.device("cpu")).name in ("cpu", "reference")


def test_env_var_is_read_at_call_time(monkeypatch):
    x = torch.randn(1, 4, 2, 2)
    monkeypatch.setenv("CONCEPT_KERNELS_BACKEND", "reference")
    ck.channel_attention(x, torch.zeros(1))
    monkeypatch.setenv("CONCEPT_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="CONCEPT_KERNELS_BACKEND must be one of"):
        ck.channel_attention(x, torch.zeros(1))


def test_explicit_request_for_missing_backend_raises_with_reason(monkeypatch):
    _backends.register("_demo_op", _backends.Backend("reference"))
    _backends.register("_demo_op", _backends.Backend("cuda", unsupported=_backends.cuda_only))
    assert [b.name for b in _backends.backends_of("_demo_op")] == ["cuda", "reference"]  # reference last
    assert _backends.select("_demo_op", torch.device("cpu")).name == "reference"  # auto degrades
    with pytest.raises(ck.BackendUnavailableError, match="'cuda' was requested but cannot run here: the cuda backend takes CUDA tensors"):
        _backends.select("_demo_op", torch.device("cpu"), "cuda")
    monkeypatch.setenv("CONCEPT_KERNELS_BACKEND", "triton")
    with pytest.raises(ck.BackendUnavailableError, match="_demo_op has no 'triton' backend"):
        _backends.select("_demo_op", torch.device("cpu"))
    assert _backends.select("_demo_op", torch.device("cpu"), "reference").name == "reference"  # argument wins


def test_triton_on_cpu_only_when_interpreting_and_explicit(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backends.triton_unsupported(cpu, explicit=True) == []
    assert _backends.triton_unsupported(cpu, explicit=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _backends.triton_unsupported(cpu, explicit=True)[0]


def test_info_lists_every_op_and_backend():
    out = subprocess.run([sys.executable, "-m", "concept_kernels.info"], capture_output=True, text=True, check=True).stdout
    for op in ("ot_similarity", "channel_attention", "position_attention"):
        assert f"{op}:" in out
    assert "torch " in out and "extension concept_kernels._C" in out
    assert "* cpu  " in out  # the auto choice is marked
