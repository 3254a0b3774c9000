"""Interleaved A/B timing of the CPU channel_attention (CAM) providers, for noisy shared machines.

    PYTHONPATH=. python bench/ab_channel_attention.py --batch 8 --channels 2048 --positions 49 --rounds 12

Providers: ``sdpa`` (autograd through the SDPA composition of bench_attention.py), ``cpu`` (the
public op with backend="cpu": the C++ symmetric kernel), ``aten`` (the same op with
CONCEPT_KERNELS_CAM_CPU=aten: PyTorch's CPU flash kernel, the previous cpu backend), ``eager``
(the reference). Each round runs every provider once, in alternating order, so that load from other
processes hits all of them alike; the report gives medians of wall time and of process CPU time
(time.process_time) and their ratios to the first provider, plus the load average before and after.
fwd+bwd = forward and backward of the output with a fixed random upstream gradient (to x and gamma).
bench_attention.py (pytest-benchmark, bench/RESULTS.md) remains the reference benchmark.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict

import torch
from bench_attention import cam_sdpa

import concept_kernels as ck
from concept_kernels.ops.channel_attention import cpu_impl
from concept_kernels.ops.channel_attention.reference import channel_attention_ref
from concept_kernels.testing import feature_map


def _cpu_with(kernel: str) -> Callable:
    """The cpu backend running ``kernel``; the variable stays set for the backward that follows (the
    backend reads it at every call, forward and backward)."""
    def run(x, gamma):
        os.environ[cpu_impl.ENV_VAR] = kernel
        return ck.channel_attention(x, gamma, backend="cpu")
    return run


PROVIDERS: Dict[str, Callable] = {"sdpa": cam_sdpa, "cpu": _cpu_with("symm"), "aten": _cpu_with("aten"),
                                  "eager": channel_attention_ref}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--positions", type=int, default=49, help="N = H * W with H = W when N is a square")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--providers", default="sdpa,cpu,aten,eager")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    side = int(round(args.positions ** 0.5))
    h, w = (side, side) if side * side == args.positions else (args.positions, 1)
    x = feature_map(args.batch, args.channels, h, w)
    gamma = torch.tensor([0.5])
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    names = args.providers.split(",")

    def call(name: str, backward: bool) -> None:
        xx, gg = x.clone().requires_grad_(backward), gamma.clone().requires_grad_(backward)
        out = PROVIDERS[name](xx, gg)
        if backward:
            out.backward(dout)

    print(f"load {os.getloadavg()}  B={args.batch} C={args.channels} N={args.positions} "
          f"threads={args.threads} rounds={args.rounds}", flush=True)
    for backward in (False, True):
        for n in names:
            call(n, backward)  # warm-up
        wall = {n: [] for n in names}
        cpu = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names if r % 2 == 0 else names[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                call(n, backward)
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
        med = {n: (statistics.median(wall[n]) * 1e3, statistics.median(cpu[n]) * 1e3) for n in names}
        w0, c0 = med[names[0]]
        print("fwd+bwd" if backward else "fwd", flush=True)
        for n, (wm, cm) in med.items():
            print(f"  {n:6s} wall {wm:8.1f} ms ({w0 / wm:4.2f}x)   cpu {cm:8.1f} ms ({c0 / cm:4.2f}x)   "
                  f"ratios vs {names[0]}", flush=True)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
