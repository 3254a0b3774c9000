"""How a training process uses the machine: torch threads, DataLoader workers; and what its CLIs share:
the one-line message for a missing optional dependency (the ``train`` extra), the help formatter.

The thread rule (shared by the trainer CLI and, later, the demo): one torch thread per physical core of
this process's CPU affinity, split between the ranks on this node, and ONE thread when the machine is
busy (1-min load average >= its CPU count): oversubscribed OpenMP threads were ~10x slower on a shared
2-core machine than a single thread.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

SYSFS_CPU = "/sys/devices/system/cpu"
MAX_AUTO_WORKERS = 4
# top-level modules of the ``train`` extra (pyproject.toml) that the training code imports
TRAIN_EXTRA_MODULES = ("timm", "torchvision", "sklearn", "matplotlib", "tqdm", "PIL", "safetensors")


def affinity_cpus() -> list[int]:
    """The logical CPUs this process may run on (all CPUs where the OS has no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: Iterable[int] | None = None, sysfs: str | Path = SYSFS_CPU) -> int:
    """Distinct physical cores among the logical ``cpus`` (default: this process's affinity), from
    ``<sysfs>/cpu<N>/topology/{physical_package_id,core_id}``; SMT siblings count once. A CPU whose
    topology cannot be read counts as its own core. At least 1."""
    cores = set()
    for cpu in affinity_cpus() if cpus is None else cpus:
        topo = Path(sysfs) / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("unknown", str(cpu)))
    return max(len(cores), 1)


def machine_busy() -> tuple[bool, float, int]:
    """(busy, 1-min load average, CPU count): busy when the load average >= the machine's CPU count."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cpus = os.cpu_count() or 1
    return load >= cpus, load, cpus


def default_threads(local_ranks: int = 1) -> tuple[int, str]:
    """(torch threads, why): 1 when :func:`machine_busy`, else the physical cores of this process's
    affinity divided between the ``local_ranks`` processes on this node (at least 1)."""
    busy, load, cpus = machine_busy()
    if busy:
        return 1, f"the machine is busy (1-min load {load:.1f} >= {cpus} CPUs)"
    cores = physical_cores()
    n = max(cores // max(local_ranks, 1), 1)
    per = f" / {local_ranks} ranks on this node" if local_ranks > 1 else ""
    return n, f"{cores} physical cores in this process's CPU affinity{per}"


def default_workers(decodes_files: bool, local_ranks: int = 1) -> tuple[int, str]:
    """(DataLoader workers, why): 0 for in-memory tensor data (built-in tasks: nothing to decode) and
    on a busy machine; for image files min(4, physical cores per rank // 2)."""
    if not decodes_files:
        return 0, "built-in tensor data is indexed in memory"
    busy, load, cpus = machine_busy()
    if busy:
        return 0, f"the machine is busy (1-min load {load:.1f} >= {cpus} CPUs): decoding in the main process"
    n = min(MAX_AUTO_WORKERS, physical_cores() // max(local_ranks, 1) // 2)
    return n, f"half the physical cores per rank, at most {MAX_AUTO_WORKERS}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The train CLIs' help: ``(default: X)`` appended, except for a None default, whose help text says
    what it means; the epilog's examples keep their lines."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def missing_extra_message(error: ImportError) -> str | None:
    """The one-line fix for an ImportError of a module from the ``train`` extra, else None."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    if name not in TRAIN_EXTRA_MODULES:
        return None
    import torch

    pin = torch.__version__.split("+")[0]
    return (f"the training module needs {name!r}, which is not installed: pip install 'concept_kernels[train]' "
            f"torch=={pin} (pin torch in the same command or timm's torchvision replaces it; for a CPU-only "
            "torch add --extra-index-url https://download.pytorch.org/whl/cpu)")


EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130  # bad input (one line on stderr); Ctrl-C (128 + SIGINT)
# the errors a CLI reports as one line (CheckpointError is a RuntimeError); anything else is a bug: traceback
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def run_cli(call: Callable[[], object], interrupted: str = "interrupted",
            import_hint: Callable[[ImportError], str] = lambda e: "",
            errors: tuple[type[Exception], ...] = USER_ERRORS) -> tuple[object, int | None]:
    """``(call(), None)``, or ``(None, exit status)`` after one line on stderr: :data:`EXIT_INTERRUPTED`
    on Ctrl-C (``interrupted``), :data:`EXIT_USER_ERROR` for a missing ``train`` extra (its pip command,
    + ``import_hint(error)``) or one of ``errors`` (its message). Other errors propagate."""
    try:
        return call(), None
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return None, EXIT_INTERRUPTED
    except ImportError as e:
        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"error: {message}{import_hint(e)}", file=sys.stderr)
        return None, EXIT_USER_ERROR
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return None, EXIT_USER_ERROR


def resolve_threads(value: int | None, local_ranks: int = 1) -> tuple[int, str]:
    """(torch threads, why) for the ``threads`` setting: None keeps this process's setting (the library
    default), 0 is :func:`default_threads` (the CLI default), N > 0 is N."""
    import torch

    if value is None:
        return torch.get_num_threads(), "as already set in this process"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"threads must be an int >= 0 (0: auto) or None, got {value!r}")
    if value == 0:
        n, why = default_threads(local_ranks)
        return n, f"auto: {why}"
    return value, "given"


def resolve_workers(value: int | None, decodes_files: bool, local_ranks: int = 1) -> tuple[int, str]:
    """(DataLoader workers, why) for the ``workers`` setting: None is :func:`default_workers`; N >= 0
    is N for image files. In-memory tensor data has nothing to decode: N > 0 is refused there."""
    if value is None:
        n, why = default_workers(decodes_files, local_ranks)
        return n, f"auto: {why}"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"workers must be an int >= 0 or None (auto), got {value!r}")
    if value > 0 and not decodes_files:
        raise ValueError(f"workers={value}: the built-in tasks are in-memory tensors with nothing to decode; "
                         "DataLoader workers are for an ImageFolder (--data PATH); leave --workers unset")
    return value, "given"
