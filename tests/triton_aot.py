"""Compile every Triton kernel of the package ahead of time for real GPUs, without a GPU.

    env -u TRITON_INTERPRET python tests/triton_aot.py [--archs 80,90]

Run by tests/test_triton_aot.py in a subprocess: with TRITON_INTERPRET=1 (the test suite's setting)
``@triton.jit`` gives interpreter functions that cannot be compiled, so this must start without it.

How: the public launchers (``channel_attention_{fwd,bwd}_triton``, ``ot_similarity_{fwd,bwd}_triton``)
run on small CPU tensors with every kernel object of their module replaced by a recorder, so the
launch arguments, constexprs and num_warps are exactly what the launchers pass on a GPU (block
sizes included: without TRITON_INTERPRET they pick their GPU defaults). Each distinct launch is then
specialised as Triton's own launch path does (pointer alignment, integer divisibility) and compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` down to a cubin (ptxas
ships in the triton wheel). Exit status 1 when a kernel is never launched by the scenarios or any
compile fails; every failure is printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Tuple

import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot.py: run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from concept_kernels.ops.channel_attention import triton_impl as cam  # noqa: E402
from concept_kernels.ops.ot_similarity import triton_impl as ot  # noqa: E402

MODULES = (cam, ot)


class Recorder:
    """Stands in for a kernel object: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn: JITFunction, launches: List[Tuple[JITFunction, tuple, dict]]):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def kernels_of(module) -> Dict[str, JITFunction]:
    """The launchable kernels of a module: its @triton.jit functions named *_kernel."""
    return {n: f for n, f in vars(module).items() if isinstance(f, JITFunction) and n.endswith("_kernel")}


def _cam_scenarios() -> None:
    """fp32 one position tile (ieee) and several tiles (tf32x3), bf16 (dots in bf16), fp64 tiled."""
    for dtype, N, precision in [(torch.float32, 49, "ieee"), (torch.float32, 300, "tf32x3"),
                                (torch.bfloat16, 49, "ieee"), (torch.float64, 300, "ieee")]:
        x3 = torch.rand(2, 40, N).to(dtype)
        g = torch.ones(1, dtype=dtype)
        out, att, lse = cam.channel_attention_fwd_triton(x3, g, precision)
        cam.channel_attention_bwd_triton(torch.ones_like(x3), x3, g, att, lse, precision)


def _ot_scenarios() -> None:
    """fp32: every select with stop "problem" (one pass) and "row" (error pass + fixed pass) and its
    backward; fp64: select "cost" with stop "row" (the fp64 pointer types of all three kernels)."""
    cases = [(torch.float32, select, stop) for select in (ot.SELECT_SAMPLE, ot.SELECT_TOPK, ot.SELECT_COST)
             for stop in (ot.STOP_PROBLEM, ot.STOP_ROW)] + [(torch.float64, ot.SELECT_COST, ot.STOP_ROW)]
    for dtype, select, stop in cases:
        q, b = torch.rand(2, 9, 200, dtype=dtype), torch.rand(5, 9, 200, dtype=dtype)
        index = torch.randint(5, (2, 6))
        choice = torch.zeros(2, 6, dtype=torch.long)
        out, aux = ot.ot_similarity_fwd_triton(q, b, index, choice, select, 3, 0.05, 20, 1e-3, stop)
        ot.ot_similarity_bwd_triton(torch.ones_like(out), q, b, index, aux, select)


SCENARIOS: Tuple[Callable[[], None], ...] = (_cam_scenarios, _ot_scenarios)


def record_launches() -> List[Tuple[JITFunction, tuple, dict]]:
    launches: List[Tuple[JITFunction, tuple, dict]] = []
    originals = {(m, n): f for m in MODULES for n, f in kernels_of(m).items()}
    try:
        for (m, n), f in originals.items():
            setattr(m, n, Recorder(f, launches))
        for scenario in SCENARIOS:
            scenario()
    finally:
        for (m, n), f in originals.items():
            setattr(m, n, f)
    return launches


def specialise(fn: JITFunction, args: tuple, kwargs: dict, target: GPUTarget):
    """(signature, constexprs, attrs, options) as Triton's launch path computes them for target."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90", help="compute capabilities, comma separated")
    archs = [int(a) for a in ap.parse_args().archs.split(",")]
    start = time.time()
    launches = record_launches()
    every = {f.__name__ for m in MODULES for f in kernels_of(m).values()}
    launched = {f.__name__ for f, _, _ in launches}
    status = 0
    if every - launched:
        print(f"triton-aot: FAIL kernels no scenario launches: {sorted(every - launched)}")
        status = 1
    # One compile per variant (kernel, pointer types, constexprs, num_warps; integer arguments'
    # divisibility left as in the first launch seen): each kernel's first variant (the fp32 default)
    # for every arch, its other variants for one arch each, in turn (bounds the time, ~30 compiles).
    variants: Dict[tuple, Tuple[JITFunction, tuple, dict]] = {}
    for fn, args, kwargs in launches:
        signature, constexprs, _, options = specialise(fn, args, kwargs, GPUTarget("cuda", archs[0], 32))
        pointers = tuple(sorted((k, v) for k, v in signature.items() if v.startswith("*")))
        key = (fn.__name__, pointers, repr(sorted(constexprs.items())), options.num_warps)
        variants.setdefault(key, (fn, args, kwargs))
    jobs, seen = [], {}
    for fn, args, kwargs in variants.values():
        k = seen[fn.__name__] = seen.get(fn.__name__, -1) + 1  # the kernel's k-th variant
        for arch in archs if k == 0 else [archs[k % len(archs)]]:
            jobs.append((arch, fn, args, kwargs))
    for arch, fn, args, kwargs in jobs:
        target = GPUTarget("cuda", arch, 32)
        signature, constexprs, attrs, options = specialise(fn, args, kwargs, target)
        named = {fn.arg_names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
        ptr = sorted({v for v in signature.values() if v.startswith("*")})
        label = f"sm_{arch} {fn.__name__} num_warps={options.num_warps} {ptr} {named}"
        t0 = time.process_time()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            assert compiled.asm.get("cubin"), "no cubin produced"
            print(f"triton-aot: OK   {label} ({time.process_time() - t0:.1f} s cpu)", flush=True)
        except Exception:  # report every kernel, then fail
            print(f"triton-aot: FAIL {label}\n{traceback.format_exc()}", flush=True)
            status = 1
    print(f"triton-aot: {'passed' if status == 0 else 'FAILED'}: {len(jobs)} compiles of "
          f"{len(launched)} kernels for sm_{', sm_'.join(map(str, archs))} in {time.time() - start:.0f} s "
          f"({time.process_time():.0f} s cpu)")
    return status


if __name__ == "__main__":
    sys.exit(main())
