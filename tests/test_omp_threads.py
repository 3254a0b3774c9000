"""The C++ ops use torch's thread count in every Python thread.

OpenMP keeps its thread count per thread (the nthreads ICV). torch.set_num_threads sets it in the
calling thread and records it; other threads pick it up only when a torch op of theirs runs
at::parallel_for. Without help, an extension op called first thing in a new Python thread would run
OpenMP teams of the runtime's default size (OMP_NUM_THREADS or the core count), whatever
torch.set_num_threads said. Each op applies at::get_num_threads() to its thread at entry.

Checked by behaviour (channel_attention's result depends bitwise on the thread count through its
work split) and through the introspection op omp_thread_icv (the calling thread's raw OpenMP count,
not synced): after an op, it equals torch's count.
"""
import threading

import pytest
import torch

from concept_kernels import _ext
from concept_kernels.testing import feature_map, ot_problem

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="needs the compiled extension concept_kernels._C")

ops = torch.ops.concept_kernels


def _in_new_thread(fn):
    """fn() in a fresh Python thread that ran no torch op before; returns its result."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def torch_threads():
    """(set, default): set(k) = torch.set_num_threads(k), restored after the test; default = the
    OpenMP count a fresh thread starts with."""
    old = torch.get_num_threads()
    default = _in_new_thread(ops.omp_thread_icv)
    yield torch.set_num_threads, default
    torch.set_num_threads(old)


def _cam_fwd(x3, g):
    return ops.channel_attention_symm_fwd(x3, g)[0]


def test_channel_attention_team_follows_torch_in_a_new_thread(torch_threads):
    set_threads, _ = torch_threads
    x3 = feature_map(1, 400, 3, 3).reshape(1, 400, 9)  # B = 1: parts = 4 x threads (13 tiles)
    g = torch.tensor([0.5])
    by_threads = {}
    for k in (1, 2):
        set_threads(k)
        by_threads[k] = _cam_fwd(x3, g)
    # the work split (so the rounding) depends on the thread count: the result shows the team size
    assert not torch.equal(by_threads[1], by_threads[2])
    for k in (1, 2):
        set_threads(k)  # in the main thread; the new thread runs the op first thing
        assert torch.equal(_in_new_thread(lambda: _cam_fwd(x3, g)), by_threads[k]), f"threads={k}"
        # a new thread that sets its own count first
        other = 3 - k
        set_threads(other)
        got = _in_new_thread(lambda: (torch.set_num_threads(k), _cam_fwd(x3, g))[1])
        assert torch.equal(got, by_threads[k]), f"thread-local set_num_threads({k})"


def _cam_bwd():
    x3 = feature_map(1, 40, 2, 2).reshape(1, 40, 4)
    g = torch.tensor([0.5])
    _, att, lse = ops.channel_attention_symm_fwd(x3, g)
    return lambda: ops.channel_attention_symm_bwd(torch.ones_like(x3), x3, g, att, lse)


def _ot(select_bwd):
    q, b, i = ot_problem(2, 3, 5, patches=4, dim=8)
    choice = torch.zeros(2, 3, dtype=torch.long)
    out, aux = ops.ot_similarity_fwd(q, b, i, choice, 1, 2, 0.05, 20, 1e-3, 0)
    if select_bwd:
        return lambda: ops.ot_similarity_bwd(torch.ones_like(out), q, b, i, aux, 1)
    return lambda: ops.ot_similarity_fwd(q, b, i, choice, 1, 2, 0.05, 20, 1e-3, 0)


@pytest.mark.parametrize("op", ["channel_attention_symm_fwd", "channel_attention_symm_bwd",
                                "ot_similarity_fwd", "ot_similarity_bwd", "omp_max_threads"])
def test_every_op_applies_torch_threads_at_entry(torch_threads, op):
    set_threads, default = torch_threads
    call = {
        "channel_attention_symm_fwd": lambda: (lambda x, g: lambda: ops.channel_attention_symm_fwd(x, g))(
            feature_map(1, 40, 2, 2).reshape(1, 40, 4), torch.tensor([0.5])),
        "channel_attention_symm_bwd": _cam_bwd,
        "ot_similarity_fwd": lambda: _ot(False),
        "ot_similarity_bwd": lambda: _ot(True),
        "omp_max_threads": lambda: ops.omp_max_threads,
    }[op]()  # inputs made here, in the main thread
    k = 1 if default != 1 else 2  # differs from what a fresh thread starts with
    set_threads(k)

    def in_thread():
        before = ops.omp_thread_icv()
        call()
        return before, ops.omp_thread_icv()

    before, after = _in_new_thread(in_thread)
    assert before == default  # the thread starts with the runtime's default: the test can tell
    assert after == k, f"{op} left this thread's OpenMP count at {after}, torch's is {k}"
