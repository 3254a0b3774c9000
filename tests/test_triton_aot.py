"""Every Triton kernel of the package compiles for real GPUs (sm_80, sm_90) down to a cubin, on a
machine without one: the interpreter tests cannot catch what only the GPU compiler rejects (layouts,
dot shapes and dtypes, register allocation in ptxas).

tests/triton_aot.py does the work in a subprocess without TRITON_INTERPRET (this suite sets it to 1
in conftest.py, and interpreted kernels cannot be compiled). Compiled kernels land in Triton's cache
(~/.triton/cache or TRITON_CACHE_DIR), so a rerun with unchanged kernels only re-checks them.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.triton
def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_aot.py"), "--archs", "80,90"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = run.stdout[-12000:] + run.stderr[-4000:]
    assert run.returncode == 0, report
    assert "triton-aot: passed" in run.stdout, report
    for kernel in ("_channel_attention_fwd_kernel", "_channel_attention_bwd_kernel", "_ot_fwd_kernel",
                   "_ot_err_kernel", "_ot_bwd_kernel"):
        for arch in (80, 90):
            assert f"triton-aot: OK   sm_{arch} {kernel} " in run.stdout, f"{kernel} not compiled for sm_{arch}"
