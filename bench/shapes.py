"""Canonical benchmark shapes, each with its source (design.md §3, method_spec §3.2/§5).

A shape is CPU or GPU. CPU shapes run on the CPU even when a GPU is present (the CPU targets are
CPU targets); GPU shapes (``gpu=True``) run on CUDA and are skipped without a GPU. The ``smoke``
shapes are tiny, for ``pytest bench/ --benchmark-disable -k smoke`` (seconds, no GPU needed).

``rounds`` is the number of timed calls (pytest-benchmark ``pedantic`` rounds, one warm-up call
before them, untimed); ``BENCH_ROUNDS=<n>`` in the environment overrides every shape.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

# ---- ot_similarity: the concept-level negatives call (method_spec §5.5) -------------------------
# Per query b there are M = n_conf * K negative patch sets: K queue entries of each of the n_conf
# confusing classes, gathered from the concept queue viewed as a bank of cls * K rows. The call is
# the published NEG one: select="topk", k=10 (top-10 plan entries per problem).
OT_SELECT = "topk"
OT_K = 10
OT_SINKHORN = dict(eps=0.01, max_iter=200, tol=1e-3)  # method defaults (method_spec §5.6)


@dataclass(frozen=True)
class OTShape:
    id: str
    B: int  # queries (training batch)
    K: int  # queue entries per class
    n_conf: int  # confusing classes per query
    cls: int  # classes in the queue -> bank rows = cls * K
    P: int = 9  # patches per set
    D: int = 200  # patch embedding width (= number of classes of the logit-like rows)
    stop: str = "problem"  # ot_similarity stopping rule (see its docstring)
    gpu: bool = False
    smoke: bool = False
    rounds: int = 3
    # "random": each query's M bank rows drawn uniformly with replacement (testing.ot_problem);
    # "classes": the method's index (needs n_conf = cls - 1): query b, of class (b * cls) // B, is
    # paired with the K queue rows of every other class, in class order
    index: str = "random"

    @property
    def M(self) -> int:
        return self.n_conf * self.K

    @property
    def bank_rows(self) -> int:
        return self.cls * self.K

    @property
    def problems(self) -> int:
        return self.B * self.M

    def describe(self) -> str:
        return (f"B={self.B}, K={self.K}, {self.n_conf} confusing (M={self.M}, {self.problems:,} problems), "
                f"P={self.P}, D={self.D}, bank {self.bank_rows} rows, stop={self.stop!r}, index={self.index!r}")


OT_SHAPES = [
    OTShape("smoke", B=2, K=4, n_conf=3, cls=5, D=32, stop="row", smoke=True, rounds=3),
    # design §3 CPU target: B=8, K=40, 99 confusing classes of a 100-class task -> M = 99*40 = 3960
    # negative sets per query, 31,680 problems, P=9, D=200 as design §3 states (in the method D is
    # the class count of the logit rows; 200 is CUB-200's width). stop="problem" is the op's
    # default (each problem stops on its own; the batched reference loops until the slowest one).
    # 7 rounds: the target is a ratio to the reference (~0.5 s a call), whose median of 3 calls
    # moved by 457-568 ms between runs on the development machine.
    OTShape("cpu", B=8, K=40, n_conf=99, cls=100, rounds=7),
    # same problem with the published stopping rule (one batch-mean error per sample's call), the
    # semantics of the published per-sample loop, so the `loop` provider is comparable here.
    OTShape("cpu_rowstop", B=8, K=40, n_conf=99, cls=100, stop="row", rounds=3),
    # the CPU target shape with the method's index instead of a random one: every query indexes 99%
    # of the bank (no (row, query) pair to skip in the cost GEMM, no duplicate problems) and its
    # problems come in class order (the outputs are written in sequence). reference and cpu only.
    OTShape("cpu_classes", B=8, K=40, n_conf=99, cls=100, index="classes", rounds=7),
    # paper shape (GPU only): B=48, K=40, 199 confusing classes of CUB-200 -> M = 7960,
    # 382,080 problems, bank 200*40 rows, D=200.
    OTShape("paper", B=48, K=40, n_conf=199, cls=200, gpu=True, rounds=10),
    # ... and with the published stopping rule, where the published per-sample loop (48 calls with
    # a host sync per Sinkhorn iteration) is the call pattern to beat
    OTShape("paper_rowstop", B=48, K=40, n_conf=199, cls=200, stop="row", gpu=True, rounds=5),
]


# ---- channel_attention / position_attention: DANet on the ResNet-50 layer-4 map ---------------
@dataclass(frozen=True)
class AttnShape:
    id: str
    B: int
    C: int
    H: int
    W: int
    gpu: bool = False
    smoke: bool = False
    rounds: int = 10

    @property
    def N(self) -> int:
        return self.H * self.W

    @property
    def c_qk(self) -> int:  # position attention query/key width C' = C/8 (DANet reduction 8)
        return max(1, self.C // 8)

    def describe(self) -> str:
        return f"B={self.B}, C={self.C}, N={self.N} ({self.H}x{self.W}), C'={self.c_qk}"


ATTN_SHAPES = [
    AttnShape("smoke", B=2, C=64, H=4, W=4, smoke=True, rounds=3),
    # design §3 CPU target: B=8, ResNet-50 layer4 (C=2048) at 224 px input -> 7x7 map (N=49)
    AttnShape("cpu_n49", B=8, C=2048, H=7, W=7, rounds=5),
    # the same backbone at 448 px input -> 14x14 map (N=196)
    AttnShape("cpu_n196", B=8, C=2048, H=14, W=14, rounds=3),
    # paper training batch B=48 on a GPU (design §3 H100 target is N=49)
    AttnShape("gpu_n49", B=48, C=2048, H=7, W=7, gpu=True, rounds=20),
    AttnShape("gpu_n196", B=48, C=2048, H=14, W=14, gpu=True, rounds=20),
    # the patch passes: a 64x64 crop through ResNet-50 gives a 2x2 layer4 map (method_spec §5.2),
    # one pass of the B=48 patches at one position, as published (9 such passes per step)
    AttnShape("gpu_patch_n4", B=48, C=2048, H=2, W=2, gpu=True, rounds=20),
]


def rounds(shape) -> int:
    """Timed rounds for ``shape`` (``BENCH_ROUNDS`` overrides)."""
    env: Optional[str] = os.environ.get("BENCH_ROUNDS")
    return int(env) if env else shape.rounds
