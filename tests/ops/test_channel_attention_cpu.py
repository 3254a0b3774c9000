"""The cpu backend of channel_attention: the C++ symmetric tile-pair kernel (csrc/channel_attention/)
and the explicit PyTorch flash fallback (CONCEPT_KERNELS_CAM_CPU=aten), against the float64 reference.

Shapes cover the kernel's edges: C not a multiple of the 32-channel tile (padded keys masked), a
single tile, N = 1 / 49 / 196 (position padding to the SIMD lanes), B = 1 (the tile pairs of one
sample split into parts with their own accumulators, merged at the end), B = 3 (uneven batches).
"""
import pytest
import torch

import concept_kernels as ck
from concept_kernels import _backends, _ext
from concept_kernels.ops.channel_attention import cpu_impl
from concept_kernels.ops.channel_attention.reference import channel_attention_ref
from concept_kernels.testing import assert_close, assert_within_2x, feature_map, run_with_grads, tolerance

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="needs the compiled extension concept_kernels._C")

SHAPES = [
    pytest.param((2, 70, 7, 7), id="B2-C70-N49"),  # ragged last tile
    pytest.param((1, 300, 7, 7), id="B1-C300-N49"),  # 10 tiles, several parts
    pytest.param((3, 64, 14, 14), id="B3-C64-N196"),
    pytest.param((2, 33, 1, 1), id="B2-C33-N1"),
    pytest.param((1, 5, 2, 3), id="B1-C5-N6"),
]


def _case(shape, dtype, seed=0, scale=1.0):
    x = feature_map(*shape, seed=seed, dtype=dtype) * scale
    g = torch.Generator().manual_seed(seed + 1)
    return x, torch.tensor([0.7], dtype=dtype), torch.randn(*shape, generator=g).to(dtype)


def _run(f, x, gamma, dout):
    return run_with_grads(f, dout, x, gamma)


def _cpu(x, gamma):
    return ck.channel_attention(x, gamma, backend="cpu")


def _check_vs_reference(shape, dtype, scale=1.0, label="symm"):
    x, gamma, dout = _case(shape, dtype, scale=scale)
    got = _run(_cpu, x, gamma, dout)
    exact = _run(channel_attention_ref, x.double(), gamma.double(), dout.double())
    # float32: the 2x rule against the published math in float32 (energies in the hundreds at N = 196
    # put both at ~2e-5 on dx), with the table's atol + rtol * max|exact| as a floor; float64: the table
    base = _run(channel_attention_ref, x, gamma, dout) if dtype == torch.float32 else None
    for k, (name, a, e) in enumerate(zip(("out", "dx", "dgamma"), got, exact)):
        assert a.dtype == dtype and a.shape == e.shape
        if base is None:
            assert_close(a, e, name=f"cpu {label} {name}")
        else:
            atol, rtol = tolerance(dtype)
            assert_within_2x(a, base[k], e, name=f"cpu {label} {name}", floor=atol + rtol * e.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kernel", cpu_impl.KERNELS)
def test_values_and_gradients_vs_float64_reference(monkeypatch, kernel, shape, dtype):
    monkeypatch.setenv(cpu_impl.ENV_VAR, kernel)
    _check_vs_reference(shape, dtype, label=kernel)


# Large maps: the sums over N = H * W run in chains of 64 positions added in double
# (channel_attention_tiles.h kNChain); one chain of N products broke the 2x rule from N = 196 (20x
# the float32 reference's error at N = 12,544). N = 3,136 = 49 whole chains, N = 10,000 ends with a
# partial one; C = 40 has a padded tile.
@pytest.mark.parametrize("shape", [
    pytest.param((1, 64, 56, 56), id="B1-C64-N3136"),
    pytest.param((1, 40, 100, 100), id="B1-C40-N10000"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_large_maps_keep_the_accuracy_rule(monkeypatch, shape, dtype):
    monkeypatch.setenv(cpu_impl.ENV_VAR, "symm")
    _check_vs_reference(shape, dtype, label="symm large N")


def test_large_energies_stay_finite_and_accurate():
    # energies in the thousands: the online max must move without overflow (exp of S - m <= 0)
    _check_vs_reference((1, 96, 7, 7), torch.float64, scale=6.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_and_thread_count_independent_up_to_rounding(threads):
    x, gamma, dout = _case((1, 200, 7, 7), torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        first, again = _run(_cpu, x, gamma, dout), _run(_cpu, x, gamma, dout)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    ref = _run(_cpu, x, gamma, dout)  # the default thread count (other parts)
    for name, a, b in zip(("out", "dx", "dgamma"), first, ref):
        assert_close(a, b, name=f"threads={threads} {name}")


def test_gradcheck_float64_across_tiles():
    x = feature_map(1, 40, 2, 2, dtype=torch.float64).requires_grad_(True)  # two tiles, one ragged
    gamma = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_cpu, (x, gamma), fast_mode=True)


def test_opcheck_cpp_ops():
    cpu_impl.register_cpp_fakes()
    fwd = torch.ops.concept_kernels.channel_attention_symm_fwd
    bwd = torch.ops.concept_kernels.channel_attention_symm_bwd
    x = feature_map(2, 40, 3, 3).reshape(2, 40, 9)
    g = torch.tensor([0.5])
    strided = feature_map(2, 40, 4, 4).to(memory_format=torch.channels_last).reshape(2, 40, 16)
    for xx in (x, x.double(), strided):
        torch.library.opcheck(fwd, (xx, g))
    out, att, lse = fwd(x, g)
    dout = torch.randn_like(x)
    torch.library.opcheck(bwd, (dout, x, g, att, lse))
    torch.library.opcheck(bwd, (dout.transpose(1, 2).contiguous().transpose(1, 2), x, g.reshape(()), att, lse))


def test_bad_inputs_name_the_argument():
    fwd = torch.ops.concept_kernels.channel_attention_symm_fwd
    bwd = torch.ops.concept_kernels.channel_attention_symm_bwd
    x, g = torch.rand(2, 8, 4), torch.zeros(1)
    with pytest.raises(RuntimeError, match="x3 must be 3-D"):
        fwd(x[0], g)
    with pytest.raises(RuntimeError, match="x3 must be Float or Double, got Int"):
        fwd(x.int(), g)
    with pytest.raises(RuntimeError, match="needs C >= 1 and N >= 1"):
        fwd(x[:, :, :0], g)
    with pytest.raises(RuntimeError, match="gamma must have one element"):
        fwd(x, torch.zeros(2))
    out, att, lse = fwd(x, g)
    with pytest.raises(RuntimeError, match="dout must have x3's shape"):
        bwd(out[:, :4], x, g, att, lse)
    with pytest.raises(RuntimeError, match=r"lse.size\(1\) must be 8"):
        bwd(out, x, g, att, lse[:, :4])


def test_kernel_choice_is_explicit(monkeypatch):
    monkeypatch.setenv(cpu_impl.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="CONCEPT_KERNELS_CAM_CPU must be one of"):
        cpu_impl.cpu_kernel()
    monkeypatch.setenv(cpu_impl.ENV_VAR, "aten")
    assert "CONCEPT_KERNELS_CAM_CPU=aten" in cpu_impl.describe()
    monkeypatch.delenv(cpu_impl.ENV_VAR)
    assert cpu_impl.cpu_kernel() == "symm" and "C++" in cpu_impl.describe()


def test_without_extension_cpu_is_unavailable_unless_aten_is_asked_for(monkeypatch):
    monkeypatch.setenv("CONCEPT_KERNELS_NO_EXT", "1")
    monkeypatch.delenv(cpu_impl.ENV_VAR, raising=False)
    _ext._reset_for_tests()
    try:
        x, g = feature_map(1, 8, 2, 2), torch.zeros(1)
        with pytest.raises(_backends.BackendUnavailableError, match="CONCEPT_KERNELS_CAM_CPU=aten"):
            ck.channel_attention(x, g, backend="cpu")
        assert _backends.select("channel_attention", torch.device("cpu")).name == "reference"
        monkeypatch.setenv(cpu_impl.ENV_VAR, "aten")
        assert _backends.select("channel_attention", torch.device("cpu")).name == "cpu"
        assert torch.equal(ck.channel_attention(x, g), x)
    finally:
        monkeypatch.delenv("CONCEPT_KERNELS_NO_EXT")
        _ext._reset_for_tests()
