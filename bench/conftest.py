"""pytest-benchmark set-up for ``bench/`` (conventions: style_anchors §5.7, design §3).

Run everything with ``make bench`` (-> bench/results/latest.json -> bench/RESULTS.md); smoke-run
the benchmark code (about 30 s) with ``pytest bench/ --benchmark-disable -q -k smoke``.

Shared pieces, exposed through the session fixture ``bench``:

* ``bench.device(op, mode, shape, provider)``: "cpu" for CPU shapes, "cuda" for GPU shapes
  (skipped without a GPU);
* ``bench.require(op, provider, mode, shape, device, benchmark)``: skips backend providers
  (``cpu``/``triton``/``cuda``) with the backend's own reason, or "not implemented yet" when the op
  has no such backend; every skip is recorded and lands in the JSON (``skipped``) so the report can
  list it;
* ``bench.run(benchmark, fn, ...)``: times ``fn`` with ``benchmark.pedantic`` (one untimed warm-up
  call, which also absorbs torch.compile), synchronising CUDA at the end of every timed call, and
  for ``fwd_bwd`` measures the peak memory of one extra call (see ``peak_mb``).
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Inductor compiles in-process: its default pool of compile workers keeps the (2) cores busy for
# seconds after a compile and slows the first timed calls (measured: 5 s -> 0.1 s over 8 calls).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# BENCH_THREADS=<n>: intra-op threads for the whole run (default: torch's default, one per core).
# On a shared machine 1 thread is far steadier: an OpenMP region waits for its slowest thread.
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
_LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]

import concept_kernels  # noqa: E402,F401  (registers every op's backends)
from concept_kernels import _backends  # noqa: E402

BACKEND_PROVIDERS = ("cpu", "triton", "cuda")  # call the public op with backend=<name>
_SKIPPED: List[Dict[str, str]] = []  # {"group", "provider", "reason"} of every recorded skip


def _cuda() -> bool:
    return torch.cuda.is_available()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
            return out.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except Exception:
        pass
    return "none (no commit yet)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(fn: Callable[[], object], device: torch.device, setup: Optional[Callable[[], object]] = None) -> Optional[float]:
    """Peak memory (MiB) that one call of ``fn`` allocates above what was allocated at its start.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (caching allocator).
    CPU: torch keeps no CPU allocator statistics, so the call runs once under
    ``torch.profiler.profile(profile_memory=True)``; every allocation and free of torch's CPU
    allocator is an event with a signed byte count, and the peak of their running sum (in time
    order) is the answer. It counts tensor storage only (autograd-saved tensors included), not
    Python objects or scratch that oneDNN/MKL keep outside torch's allocator.
    """
    if setup is not None:
        setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events) if e.name() == "[memory]")
    except AttributeError:  # profiler internals moved: report nothing rather than a wrong number
        return None
    level = peak = 0
    for _, _, nbytes in mem:
        level += nbytes
        peak = max(peak, level)
    return peak / 2**20


class BenchHelper:
    """Helpers shared by the bench files (one instance per session, fixture ``bench``)."""

    BACKEND_PROVIDERS = BACKEND_PROVIDERS

    @staticmethod
    def group(op: str, mode: str, shape) -> str:
        return f"{op}-{mode}-{shape.id}"

    def skip(self, op: str, mode: str, shape, provider: str, reason: str) -> None:
        _SKIPPED.append({"group": self.group(op, mode, shape), "provider": provider, "reason": reason})
        pytest.skip(reason)

    def device(self, op: str, mode: str, shape, provider: str) -> torch.device:
        if shape.gpu and not _cuda():
            self.skip(op, mode, shape, provider, "GPU shape: no CUDA device here")
        return torch.device("cuda" if shape.gpu else "cpu")

    def backend_reason(self, op: str, provider: str, device: torch.device, shape) -> Optional[str]:
        """Why the public op cannot run ``backend=provider`` here (None = it can)."""
        names = [b.name for b in _backends.backends_of(op)]
        if provider not in names:
            return f"{op} has no {provider!r} backend: not implemented yet"
        if provider == "triton" and device.type == "cpu" and not (shape.smoke and _backends.triton_interpreting()):
            return "Triton on CPU tensors runs only in the interpreter (TRITON_INTERPRET=1), which is for tests; not benchmarked"
        why = _backends.reasons(op, provider, device, explicit=True)
        return "; ".join(why) if why else None

    def require(self, op: str, provider: str, mode: str, shape, device: torch.device, benchmark=None) -> None:
        if benchmark is not None and benchmark.disabled and provider.startswith("compile"):
            # untimed smoke runs: compiling here again would double their time; the
            # test_*_providers_agree_smoke tests compile and check these providers
            pytest.skip("--benchmark-disable: compile providers run in test_*_providers_agree_smoke")
        if provider in BACKEND_PROVIDERS:
            why = self.backend_reason(op, provider, device, shape)
            if why:
                self.skip(op, mode, shape, provider, why)

    def run(self, benchmark, fn: Callable[[], object], *, op: str, provider: str, mode: str, shape,
            device: torch.device, dtype: torch.dtype, rounds: int, setup: Optional[Callable[[], object]] = None,
            extra: Optional[dict] = None, after_warmup: Optional[Callable[[], dict]] = None) -> None:
        """Time ``fn`` (already closed over its inputs) and fill ``benchmark.extra_info``.

        ``after_warmup`` (optional) is called after timing and returns more extra_info (e.g. the
        number of graphs torch.compile produced).
        """

        def timed():
            fn()
            _sync(device)  # pytest-benchmark times on the host: wait for the GPU (anti-pattern 11)

        shape_rounds = rounds
        if not os.environ.get("BENCH_ROUNDS") and not benchmark.disabled:
            rounds = _adaptive_rounds(timed, setup, rounds)
        info = benchmark.extra_info
        info.update(op=op, provider=provider, mode=mode, shape=shape.id, shape_desc=shape.describe(),
                    device=str(device), dtype=str(dtype).replace("torch.", ""), rounds=rounds,
                    shape_rounds=shape_rounds,
                    torch_threads=torch.get_num_threads(), loadavg_before=round(os.getloadavg()[0], 2))
        if extra:
            info.update(extra)
        benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.disabled:
            return
        info["loadavg_after"] = round(os.getloadavg()[0], 2)
        if after_warmup is not None:
            info.update(after_warmup())
        if mode == "fwd_bwd":
            peak = peak_mb(fn, device, setup)
            if peak is not None:
                info["peak_mb"] = round(peak, 1)



MIN_SECONDS, MAX_ROUNDS = 1.0, 50


def _adaptive_rounds(timed: Callable[[], None], setup: Optional[Callable[[], object]], rounds: int) -> int:
    """At least ``rounds``; a fast provider gets about MIN_SECONDS of calls (at most MAX_ROUNDS):
    the median of 3 calls of a 20 ms provider moved by 10% between runs. Costs one extra call
    (a second warm-up)."""
    if setup is not None:
        setup()
    t0 = time.perf_counter()
    timed()
    return max(rounds, min(MAX_ROUNDS, int(MIN_SECONDS / max(time.perf_counter() - t0, 1e-6))))

@pytest.fixture(scope="session")
def bench() -> BenchHelper:
    return BenchHelper()


@pytest.fixture
def bench_threads():
    """torch's thread count from ``BENCH_THREADS`` for one benchmark (restored after); unset: unchanged."""
    n = torch.get_num_threads()
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    """Every benchmark starts from seed 0 and with no forced backend."""
    torch.manual_seed(0)
    monkeypatch.delenv("CONCEPT_KERNELS_BACKEND", raising=False)
    yield


# ---- pytest-benchmark hooks ----------------------------------------------------------------------

def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # pragma: no cover - depends on the install
        triton_version = f"not importable ({type(e).__name__})"
    from concept_kernels import _ext

    machine_info.update(
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        triton=triton_version,
        cuda_device=torch.cuda.get_device_name(0) if _cuda() else None,
        cuda_version=torch.version.cuda,
        concept_kernels=concept_kernels.__version__,
        concept_kernels_ext=bool(getattr(_ext, "HAS_EXT", False)),
        commit=_git_commit(),
        bench_threads=os.environ.get("BENCH_THREADS"),
        loadavg_at_start=_LOAD_AT_START,
    )


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_SKIPPED)
    output_json["machine_info"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    threads = os.environ.get("BENCH_THREADS")
    default = f"make bench BENCH_THREADS={threads}" if threads else "make bench"
    output_json["command"] = os.environ.get("BENCH_COMMAND", default)
