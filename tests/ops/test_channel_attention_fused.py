"""Fused channel_attention backends ("cpu": PyTorch CPU flash kernel; "triton": under TRITON_INTERPRET=1)
against the float64 reference: values, gradients, gradcheck, opcheck, compile, low precision, errors.

Triton runs in the interpreter on tiny shapes (~0.5 ms per tl op per program): C <= 64, blocks 16-32.
"""
import pytest
import torch

import concept_kernels as ck
from concept_kernels import _backends
from concept_kernels.ops.channel_attention import function as fn
from concept_kernels.ops.channel_attention.reference import channel_attention_ref
from concept_kernels.testing import assert_close, assert_within_2x, feature_map, run_with_grads

BACKENDS = ["cpu", "triton"]
# (B, C, H, W): N = 49 with a ragged channel block, N = 4 (patch maps) with two full blocks,
# N = 9 with C = 33 (one ragged column), a single sample.
SHAPES = [
    pytest.param((2, 40, 7, 7), id="B2-C40-N49"),
    pytest.param((1, 64, 2, 2), id="B1-C64-N4"),
    pytest.param((2, 33, 3, 3), id="B2-C33-N9"),
]


def _case(shape, dtype, seed=0):
    x = feature_map(*shape, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(*shape, generator=g).to(dtype)
    gamma = torch.tensor([0.7], dtype=dtype)
    return x, gamma, dout


def _run(f, x, gamma, dout):
    return run_with_grads(f, dout, x, gamma)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_forward_backward_vs_float64_reference(backend, shape, dtype):
    x, gamma, dout = _case(shape, dtype)
    got = _run(lambda a, b: ck.channel_attention(a, b, backend=backend), x, gamma, dout)
    exact = _run(channel_attention_ref, x.double(), gamma.double(), dout.double())
    for name, a, e in zip(("out", "dx", "dgamma"), got, exact):
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e, name=f"{backend} {name}")


def test_triton_asymmetric_blocks_and_tf32x3():
    from concept_kernels.ops.channel_attention.triton_impl import (channel_attention_bwd_triton,
                                                                  channel_attention_fwd_triton)
    x, gamma, dout = _case((2, 48, 5, 5), torch.float64)
    x3, d3 = x.reshape(2, 48, 25), dout.reshape(2, 48, 25)
    ref = _run(channel_attention_ref, x, gamma, dout)
    for bm, bn in [(16, 32), (32, 16)]:
        out, att, lse = channel_attention_fwd_triton(x3, gamma, block_m=bm, block_n=bn)
        dx, dgamma = channel_attention_bwd_triton(d3, x3, gamma, att, lse, block_m=bm, block_n=bn)
        E = -(x3 @ x3.transpose(1, 2))
        torch.testing.assert_close(lse, torch.logsumexp(E, -1))
        torch.testing.assert_close(out.reshape_as(x), ref[0])
        torch.testing.assert_close(dx.reshape_as(x), ref[1])
        torch.testing.assert_close(dgamma.reshape(1), ref[2])
    out, _, _ = channel_attention_fwd_triton(x3.float(), gamma.float(), "tf32x3")
    assert_close(out.reshape_as(x), ref[0], name="triton tf32x3 out", dtype=torch.float32)


@pytest.mark.parametrize("shape,block_d", [
    pytest.param((2, 40, 7, 7), 16, id="N49-tiles-of-16"),  # 4 tiles, the last one 1 position
    pytest.param((1, 20, 16, 2), 16, id="N32-tiles-of-16"),  # whole tiles only
    pytest.param((1, 8, 20, 15), None, id="N300-default"),  # above MAX_BLOCK_D: 2 tiles of 256
])
def test_triton_tiles_positions(shape, block_d):
    """N above one tile (MAX_BLOCK_D, or a forced small block_d): each program owns one tile of output
    positions and sums S and dO x over every tile; float64 against the reference, lse too."""
    from concept_kernels.ops.channel_attention import triton_impl
    x, gamma, dout = _case(shape, torch.float64)
    B, C, H, W = shape
    x3, d3 = x.reshape(B, C, H * W), dout.reshape(B, C, H * W)
    assert triton_impl._block_d(H * W, block_d)[1] > 1  # really tiled
    out, att, lse = triton_impl.channel_attention_fwd_triton(x3, gamma, block_m=16, block_n=16, block_d=block_d)
    dx, dgamma = triton_impl.channel_attention_bwd_triton(d3, x3, gamma, att, lse, block_m=16, block_n=16,
                                                          block_d=block_d)
    exact = _run(channel_attention_ref, x, gamma, dout)
    assert_close(lse, torch.logsumexp(-(x3 @ x3.transpose(1, 2)), -1), name="tiled lse")
    for name, a, e in zip(("out", "dx", "dgamma"), (out, dx, dgamma.reshape(1)), exact):
        assert_close(a.reshape(e.shape), e, name=f"tiled triton {name}")


def test_triton_block_d_must_be_a_power_of_two():
    from concept_kernels.ops.channel_attention import triton_impl
    x3, g = torch.rand(1, 4, 40), torch.zeros(1)
    for bad in (8, 24, 0):
        with pytest.raises(ValueError, match=f"block_d must be a power of two >= 16, got {bad}"):
            triton_impl.channel_attention_fwd_triton(x3, g, block_d=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    # small because every gradcheck probe is an interpreted launch under triton; fast_mode probes
    # random directions (one launch each) instead of every input element
    x = feature_map(2, 5, 2, 3, dtype=torch.float64).requires_grad_(True)
    gamma = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ck.channel_attention(a, b, backend=backend), (x, gamma),
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed_hw", "gamma_scalar"])
def test_non_contiguous_inputs_and_gamma_shapes(backend, layout):
    x, gamma, dout = _case((2, 32, 4, 3), torch.float32)
    if layout == "channels_last":
        xs = x.to(memory_format=torch.channels_last)
    elif layout == "transposed_hw":
        xs = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        xs, gamma = x, gamma.reshape(())
    got = _run(lambda a, b: ck.channel_attention(a, b, backend=backend), xs, gamma, dout)
    exact = _run(channel_attention_ref, x.double(), gamma.double(), dout.double())
    assert got[2].shape == gamma.shape
    for name, a, e in zip(("out", "dx", "dgamma"), got, exact):
        assert_close(a, e, name=f"{backend} {layout} {name}")


def _opcheck_samples(backend):
    x = feature_map(2, 32, 3, 3).reshape(2, 32, 9)
    g = torch.tensor([0.5])
    samples = [
        (x, g),  # contiguous, no grad
        (x.clone().requires_grad_(True), g.clone().requires_grad_(True)),
        (x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True), g.reshape(()).requires_grad_(True)),
        (feature_map(2, 32, 4, 4).to(memory_format=torch.channels_last).reshape(2, 32, 16), g),  # strided view
    ]
    return [(xx, gg, backend, "ieee") for xx, gg in samples]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_custom_ops(backend):
    for args in _opcheck_samples(backend):
        torch.library.opcheck(fn.channel_attention_fwd, args)
    x, g, _, _ = _opcheck_samples(backend)[0]
    out, att, lse = fn.channel_attention_fwd(x, g, backend, "ieee")
    dout = torch.randn_like(x)
    torch.library.opcheck(fn.channel_attention_bwd, (dout, x, g, att, lse, backend, "ieee"))
    torch.library.opcheck(fn.channel_attention_bwd, (dout.transpose(1, 2).contiguous().transpose(1, 2), x, g,
                                                     att, lse, backend, "ieee"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, gamma, dout = _case((2, 32, 3, 3), torch.float32)

    def f(a, b):
        return ck.channel_attention(a, b, backend=backend) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    got = _run(compiled, x, gamma, dout)
    eager = _run(f, x, gamma, dout)
    for name, a, e in zip(("out", "dx", "dgamma"), got, eager):
        assert_close(a, e, name=f"compiled {backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_2x_rule(backend):
    """bf16 is opt-in; held to 2x the error of the same math done naively in bf16 (vs float64)."""
    x64 = feature_map(2, 64, 7, 7, dtype=torch.float64)
    g64 = torch.tensor([1.0], dtype=torch.float64)
    dout64 = torch.randn(x64.shape, dtype=torch.float64)
    exact = _run(channel_attention_ref, x64, g64, dout64)

    def naive_bf16(x, gamma):  # the published math, every op in bf16
        B, C, H, W = x.shape
        X = x.reshape(B, C, H * W)
        E = X @ X.transpose(1, 2)
        att = torch.softmax(E.amax(-1, keepdim=True) - E, -1)
        return gamma * (att @ X).reshape_as(x) + x

    base = _run(naive_bf16, x64.bfloat16(), g64.bfloat16(), dout64.bfloat16())
    got = _run(lambda a, b: ck.channel_attention(a, b, backend=backend), x64.bfloat16(), g64.bfloat16(),
               dout64.bfloat16())
    assert got[0].dtype == torch.bfloat16
    for name, a, b, e in zip(("out", "dx", "dgamma"), got, base, exact):
        assert_within_2x(a, b, e, name=f"{backend} bf16 {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.zeros(0, 8, 2, 2, requires_grad=True)
    g = torch.ones(1, requires_grad=True)
    out = ck.channel_attention(x, g, backend=backend)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape and g.grad.shape == (1,)


def test_auto_selection_order():
    names = [b.name for b in _backends.backends_of("channel_attention")]
    assert names == ["triton", "cpu", "reference"]
    # CPU tensors: triton only when explicitly requested (interpreter), so auto is the cpu composition
    assert _backends.select("channel_attention", torch.device("cpu")).name == "cpu"
    assert _backends.select("channel_attention", torch.device("cuda")).name == "triton"


def test_bad_requests_raise_clearly(monkeypatch):
    x, g = torch.rand(1, 4, 2, 2), torch.zeros(1)
    with pytest.raises(ValueError, match="input_precision must be 'ieee' or 'tf32x3'"):
        ck.channel_attention(x, g, input_precision="tf32")
    with pytest.raises(_backends.BackendUnavailableError, match="has no 'cuda' backend"):
        ck.channel_attention(x, g, backend="cuda")
    xm, gm = torch.empty(1, 4, 2, 2, device="meta"), torch.zeros(1, device="meta")
    with pytest.raises(ValueError, match="x on meta holds no data"):  # refused before a backend is picked
        ck.channel_attention(xm, gm, backend="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(_backends.BackendUnavailableError, match="Triton needs CUDA tensors"):
        ck.channel_attention(x, g, backend="triton")
    monkeypatch.setenv("CONCEPT_KERNELS_BACKEND", "triton")
    with pytest.raises(_backends.BackendUnavailableError, match="Triton needs CUDA tensors"):
        ck.channel_attention(x, g)
    with pytest.raises(ValueError, match="gamma must have shape"):
        ck.channel_attention(x, torch.zeros(2), backend="cpu")
    with pytest.raises(ValueError, match="all tensors must be on the same device"):
        ck.channel_attention(x, gm, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_input_shows_in_the_output(backend, value):
    """One inf/NaN in image 1 makes image 1's output NaN, as the eager form does (inf - inf in the
    energies), and leaves image 0's output and gradients as without it; no kernel ranks it away."""
    x, gamma, _ = _case((2, 16, 3, 3), torch.float32)
    clean = ck.channel_attention(x, gamma, backend=backend)
    bad = x.detach().clone()
    bad[1, 3, 1, 2] = value
    eager = ck.channel_attention(bad, gamma, backend="reference")
    bad.requires_grad_(True)
    out = ck.channel_attention(bad, gamma, backend=backend)
    assert torch.isnan(eager[1]).all() and torch.isnan(out[1]).all()
    assert_close(out[0], clean[0], name=f"{backend} image 0 next to a non-finite image")
    out[0].sum().backward()
    assert torch.isfinite(bad.grad[0]).all()
