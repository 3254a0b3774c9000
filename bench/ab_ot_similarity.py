"""Interleaved A/B timing of ot_similarity on the CPU (cpu backend vs the reference), for noisy shared machines.

    PYTHONPATH=.:bench python bench/ab_ot_similarity.py --shape cpu --rounds 5 --threads 1

The problem is the one of bench_ot_similarity.py (shapes.OT_SHAPES, the concept negatives call
select="topk", k=10 with the method's Sinkhorn settings), forward + backward of (out * w).sum() by
default. Each round times the reference once and the cpu backend --calls times (its median: a call
is ~30x shorter), in alternating order, so that load from other processes hits both alike. The
report gives the medians over rounds of wall time and of process CPU time (time.process_time; with
--threads 1 it is the time the op ran on a core, much steadier than wall time on a loaded machine)
and the median of the per-round ratios reference / cpu. bench_ot_similarity.py (pytest-benchmark,
bench/RESULTS.md) remains the reference benchmark.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
from shapes import OT_K, OT_SELECT, OT_SHAPES, OT_SINKHORN

import concept_kernels as ck
from concept_kernels.ops.ot_similarity.reference import ot_similarity_ref
from concept_kernels.testing import ot_problem


def _timed(fn: Callable[[], None]) -> tuple:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="cpu", help="an id of shapes.OT_SHAPES with index='random'")
    ap.add_argument("--mode", choices=("fwd", "fwd_bwd"), default="fwd_bwd")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10, help="cpu backend calls per round (their median counts)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = next(s for s in OT_SHAPES if s.id == args.shape)
    if shape.index != "random":
        raise SystemExit(f"--shape {args.shape}: only shapes with a random index are supported here")
    query, bank, index = ot_problem(shape.B, shape.M, shape.bank_rows, shape.P, shape.D, seed=0)
    backward = args.mode == "fwd_bwd"
    query.requires_grad_(backward)
    w = torch.randn(shape.B, shape.M, OT_K, generator=torch.Generator().manual_seed(1))
    kw = dict(select=OT_SELECT, k=OT_K, stop=shape.stop, **OT_SINKHORN)
    ops: Dict[str, Callable] = {"cpu": lambda: ck.ot_similarity(query, bank, index, backend="cpu", **kw),
                                "reference": lambda: ot_similarity_ref(query, bank, index, **kw)}

    def call(name: str) -> None:
        query.grad = None
        out = ops[name]()
        if backward:
            (out * w).sum().backward()

    print(f"load {os.getloadavg()}  {shape.describe()}  mode={args.mode} threads={args.threads} "
          f"rounds={args.rounds} cpu calls/round={args.calls}", flush=True)
    for name in ops:
        call(name)  # warm-up
    wall: Dict[str, List[float]] = {n: [] for n in ops}
    cpu: Dict[str, List[float]] = {n: [] for n in ops}
    for r in range(args.rounds):
        for name in ("cpu", "reference") if r % 2 == 0 else ("reference", "cpu"):
            times = [_timed(lambda: call(name)) for _ in range(args.calls if name == "cpu" else 1)]
            wall[name].append(statistics.median(t[0] for t in times))
            cpu[name].append(statistics.median(t[1] for t in times))
    for label, t in (("wall", wall), ("cpu", cpu)):
        ratios = [a / b for a, b in zip(t["reference"], t["cpu"])]
        print(f"  {label:4s} time: reference {statistics.median(t['reference']) * 1e3:8.1f} ms   "
              f"cpu {statistics.median(t['cpu']) * 1e3:7.2f} ms   reference / cpu {statistics.median(ratios):5.1f}x "
              f"(per round {min(ratios):.1f}-{max(ratios):.1f}x)", flush=True)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
