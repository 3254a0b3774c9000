"""Fused position_attention ("cpu": one concatenated GEMM + SDPA over positions + fused epilogue)
against the float64 reference: values, gradients to x / weights / biases / gamma, gradcheck,
compile, layouts, low precision."""
import pytest
import torch

import concept_kernels as ck
from concept_kernels import _backends
from concept_kernels.ops.position_attention.reference import position_attention_ref
from concept_kernels.testing import assert_close, assert_within_2x, feature_map

NAMES = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "gamma")


def _case(B, C, c_qk, H, W, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(dtype)  # noqa: E731
    x = feature_map(B, C, H, W, seed=seed, dtype=dtype)
    args = [x, mk(c_qk, C), mk(c_qk), mk(c_qk, C), mk(c_qk), mk(C, C), mk(C), torch.tensor([0.6], dtype=dtype)]
    dout = torch.randn(B, C, H, W, generator=g).to(dtype)
    return args, dout


def _run(f, args, dout):
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    out = f(*leaves)
    out.backward(dout)
    return [out.detach()] + [a.grad for a in leaves]


@pytest.mark.parametrize("shape", [(2, 32, 4, 7, 7), (1, 24, 3, 2, 2), (3, 16, 16, 3, 5)],
                         ids=["B2-C32-Cq4-N49", "B1-C24-Cq3-N4", "B3-C16-Cq16-N15"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fused_vs_float64_reference_all_gradients(shape, dtype):
    args, dout = _case(*shape, dtype=dtype)
    got = _run(lambda *a: ck.position_attention(*a, backend="cpu"), args, dout)
    exact = _run(position_attention_ref, [a.double() for a in args], dout.double())
    for name, a, e in zip(("out",) + NAMES, got, exact):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_close(a, e, name=f"pam {name}")


def test_gradcheck_float64():
    args, _ = _case(2, 8, 2, 2, 3, dtype=torch.float64)
    args = [a.requires_grad_(True) for a in args]
    assert torch.autograd.gradcheck(lambda *a: ck.position_attention(*a, backend="cpu"), tuple(args))


@pytest.mark.parametrize("layout", ["channels_last", "transposed_hw", "gamma_scalar"])
def test_layouts(layout):
    args, dout = _case(2, 16, 2, 4, 3)
    exact = _run(position_attention_ref, [a.double() for a in args], dout.double())
    if layout == "channels_last":
        args[0] = args[0].to(memory_format=torch.channels_last)
    elif layout == "transposed_hw":
        args[0] = args[0].transpose(2, 3).contiguous().transpose(2, 3)
    else:
        args[-1] = args[-1].reshape(())
        exact[-1] = exact[-1].reshape(())
    got = _run(lambda *a: ck.position_attention(*a, backend="cpu"), args, dout)
    for name, a, e in zip(("out",) + NAMES, got, exact):
        assert_close(a, e, name=f"pam {layout} {name}")


def test_compile_fullgraph():
    torch._dynamo.reset()
    args, dout = _case(2, 16, 2, 3, 3)

    def f(*a):
        return ck.position_attention(*a, backend="cpu") + 1.0

    got = _run(torch.compile(f, fullgraph=True), args, dout)
    eager = _run(f, args, dout)
    for name, a, e in zip(("out",) + NAMES, got, eager):
        assert_close(a, e, name=f"compiled pam {name}")


def test_bf16_within_2x_rule():
    args, dout = _case(2, 64, 8, 7, 7, dtype=torch.float64)
    exact = _run(position_attention_ref, args, dout)
    lowp = [a.bfloat16() for a in args]

    def naive_bf16(x, wq, bq, wk, bk, wv, bv, gamma):  # the published module, every op in bf16
        B, C, H, W = x.shape
        X = x.reshape(B, C, H * W)
        Q, K, V = (torch.matmul(w, X) + b[:, None] for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        A = torch.softmax(Q.transpose(1, 2) @ K, -1)
        return gamma * (V @ A.transpose(1, 2)).reshape_as(x) + x

    base = _run(naive_bf16, lowp, dout.bfloat16())
    got = _run(lambda *a: ck.position_attention(*a, backend="cpu"), lowp, dout.bfloat16())
    assert got[0].dtype == torch.bfloat16
    for name, a, b, e in zip(("out",) + NAMES, got, base, exact):
        assert_within_2x(a, b, e, name=f"pam bf16 {name}")


def test_auto_selection_and_empty_batch():
    assert [b.name for b in _backends.backends_of("position_attention")] == ["cuda", "cpu", "reference"]
    assert _backends.select("position_attention", torch.device("cpu")).name == "cpu"
    args, _ = _case(1, 8, 2, 2, 2)
    with pytest.raises(ck.BackendUnavailableError, match="the cuda backend takes CUDA tensors"):
        ck.position_attention(*args, backend="cuda")
    args[0] = torch.zeros(0, 8, 2, 2)
    assert ck.position_attention(*args, backend="cpu").shape == (0, 8, 2, 2)
    with pytest.raises(_backends.BackendUnavailableError, match="no 'triton' backend"):
        ck.position_attention(*_case(1, 8, 2, 2, 2)[0], backend="triton")
