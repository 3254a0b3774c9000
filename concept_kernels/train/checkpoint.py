"""A training run's output directory: its lock, its checkpoint and its metrics file.

* ``<out>/checkpoint.pt`` holds the payload (model, optimizer, scheduler, state, history, RNG states,
  config) plus ``sha256``, a digest of the payload's content (every tensor's bytes, every key and
  value), checked on load: flipped bytes that ``torch.load`` reads silently become a
  :class:`CheckpointError` naming the file. The file stays a plain ``torch.load``-able dict.
* Saves go to a unique temp file (``checkpoint.pt.<pid>.<random>.tmp``), are fsync'ed, then ``os.replace``'d;
  a failed save (disk full: "no space left on <dir>") removes its temp file and leaves the previous
  checkpoint as it was.
* ``<out>/metrics.jsonl`` (and the same rows as ``metrics.csv``) are rewritten from the checkpoint's
  history right after each checkpoint (and on resume), so they never hold an epoch the checkpoint does
  not: a resume never repeats rows, and a run stopped before its first save leaves the files it found
  (e.g. under ``--overwrite``).
* ``<out>/best.pt``: a byte copy of the checkpoint written at the epoch with the best test accuracy so
  far (the published protocol: max over epochs of max over heads), digest included.
* ``<out>/config.json``: the run's configuration (resolved defaults), written at start.
* Rank 0 holds ``fcntl.flock`` on ``<out>/.lock`` for the whole run: a second run into the same
  directory gets an :class:`OutputDirError`. The lock file stays (it does not count as content).
* Resuming restores the optimizer and the LR schedule from the checkpoint, so the settings that
  define them (:data:`OPTIMIZER_KEYS`, and ``epochs`` under the cosine schedule) must not change:
  a resume that changes them is refused with a diff (saved, given), like the model/data settings.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import random
import secrets
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_JSON = "config.json"
LOCK = ".lock"
REQUIRED = ("model", "optimizer", "scheduler", "state", "history", "rng", "config", "sha256")
# settings the optimizer / scheduler state carries: a resume keeps the saved ones, so they must match
OPTIMIZER_KEYS = ("lr", "backbone_lr_mult", "momentum", "weight_decay", "nesterov", "schedule", "milestones")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, or from a different configuration) or written."""


class OutputDirError(RuntimeError):
    """The output directory cannot be used: not writable, or in use by another run."""


# ---- content digest ---------------------------------------------------------------------------

def _feed(h, obj) -> None:
    """Feed ``obj`` to the hash in a form that fixes types, order and exact values."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{str(t.dtype)}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D%d;" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d;" % len(obj) if isinstance(obj, list) else b"U%d;" % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, bool) or obj is None:
        h.update(repr(obj).encode() + b";")
    elif isinstance(obj, int):
        h.update(b"I%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"F" + obj.hex().encode() + b";")
    elif isinstance(obj, str):
        b = obj.encode()
        h.update(b"S%d;" % len(b) + b)
    else:
        raise TypeError(f"checkpoint payload holds a {type(obj).__name__}, which the digest does not cover")


def payload_digest(payload: dict) -> str:
    """sha256 (hex) of the payload's content, the ``sha256`` entry excluded."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


# ---- atomic writes ----------------------------------------------------------------------------

def _to_cpu(obj):
    """A copy of the containers with every tensor on the CPU (CPU tensors are not copied)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        new = obj.copy()  # keeps the type (e.g. the scheduler's Counter)
        for k, v in obj.items():
            new[k] = _to_cpu(v)
        return new
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if type(obj) is tuple:
        return tuple(_to_cpu(v) for v in obj)
    return obj


class _FdWriter:
    """A write-only, unbuffered file object over a raw descriptor: ``write`` writes everything or
    raises. A full disk first gives a short write, then ENOSPC: this loops until the kernel raises
    ``OSError(ENOSPC)``, and no buffered bytes are left to fail later at close."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data) -> int:
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            n = os.write(self.fd, view[done:])
            if n == 0:
                raise OSError(errno.EIO, "write() wrote 0 bytes")
            done += n
        return done

    def flush(self) -> None:
        pass


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, or in its context chain. A write that fails inside torch.save's
    zip writer surfaces as a RuntimeError ("unexpected pos") raised while closing the archive, with
    the OSError as its ``__context__``."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _write_atomic(path: Path, write) -> None:
    """``write(fh)`` into a unique temp file next to ``path``, fsync, ``os.replace``. On failure the
    temp file is removed, ``path`` is untouched, and an OSError becomes a :class:`CheckpointError`."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # unique per writer
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            write(_FdWriter(fd))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise
        if cause.errno == errno.ENOSPC:
            raise CheckpointError(f"no space left on {path.parent} while writing {path.name}; "
                                  f"{path} is unchanged (free some space, then --resume)") from e
        raise CheckpointError(f"cannot write {path}: {cause.strerror or cause}") from e
    finally:
        tmp.unlink(missing_ok=True)  # gone after a successful os.replace


def save_checkpoint(path: Path, payload: dict) -> None:
    """Save ``payload`` (its tensors moved to the CPU) with its ``sha256`` digest, atomically."""
    payload = _to_cpu({k: v for k, v in payload.items() if k != "sha256"})
    payload["sha256"] = payload_digest(payload)
    _write_atomic(Path(path), lambda fh: torch.save(payload, fh))


def load_checkpoint(path: Path, require_digest: bool = True) -> dict:
    """torch.load with ``weights_only=True`` and the digest check; any failure is a :class:`CheckpointError`.
    ``require_digest=False`` accepts a checkpoint written before digests existed (no "sha256"; one that has
    a digest is still checked): only for the caller's own runs whose integrity it checks otherwise."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): "
                              f"{type(e).__name__}: {e}") from e
    missing = set(REQUIRED).difference(ckpt if isinstance(ckpt, dict) else ())
    if missing == {"sha256"} and not require_digest:
        return ckpt
    if missing == {"sha256"}:
        raise CheckpointError(f"{path} has no content digest (written by an older concept_kernels), so its "
                              "integrity cannot be checked; start a new run")
    if missing:
        raise CheckpointError(f"{path} is not a concept_kernels checkpoint (missing {sorted(missing)})")
    try:
        digest = payload_digest(ckpt)
    except TypeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e
    if digest != ckpt["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its content digest is {digest}, the saved one "
                              f"{ckpt['sha256']} (flipped bytes?); it was not loaded")
    return ckpt


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy the checkpoint file ``src`` to ``dst`` atomically (bytes as they are: the digest travels)."""
    data = Path(src).read_bytes()
    _write_atomic(Path(dst), lambda fh: fh.write(data))


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    text = json.dumps(obj, indent=2) + "\n"
    _write_atomic(Path(path), lambda fh: fh.write(text.encode()))


def write_metrics(out: Path, history: Iterable[dict]) -> None:
    """Rewrite ``<out>/metrics.jsonl`` (one JSON row per finished epoch of ``history``) and
    ``<out>/metrics.csv`` (the same rows; columns: every key, in order of first appearance) atomically."""
    history = list(history)
    text = "".join(json.dumps(row) + "\n" for row in history)
    _write_atomic(Path(out) / METRICS, lambda fh: fh.write(text.encode()))
    columns = list(dict.fromkeys(k for row in history for k in row))
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    _write_atomic(Path(out) / METRICS_CSV, lambda fh: fh.write(table.getvalue().encode()))


# ---- resume ----------------------------------------------------------------------------------

def check_resume_config(path: Path, saved: dict, given: dict, keys: Iterable[str]) -> None:
    """Refuse a resume whose ``keys`` (model and data settings), optimizer settings or cosine period
    differ from the checkpoint's: :class:`CheckpointError` with {key: (saved, given)}."""
    diff = {k: (saved.get(k), given[k]) for k in keys if saved.get(k) != given[k]}
    if diff:
        raise CheckpointError(f"{path} was written with a different configuration: {diff} (saved, given)")
    opt_keys = OPTIMIZER_KEYS + (("epochs",) if saved.get("schedule") == "cos" else ())
    diff = {k: (saved.get(k), given[k]) for k in opt_keys if saved.get(k) != given[k]}
    if diff:
        raise CheckpointError(
            f"{path} was written with different optimizer / LR-schedule settings: {diff} (saved, given). "
            "--resume restores the optimizer and the schedule from the checkpoint (with --schedule cos, "
            "--epochs is the cosine period), so these cannot change on resume; give the saved values, "
            "or start a new run (another --out, or --overwrite)")


# ---- RNG states ------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's torch / numpy / python / CUDA RNG states, in checkpointable types."""
    name, keys, *rest = np.random.get_state()
    return dict(torch=torch.get_rng_state(), numpy=[name, torch.from_numpy(keys.astype(np.int64)), *rest],
                python=random.getstate(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(s["python"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---- the output directory --------------------------------------------------------------------

class OutputDir:
    """Rank 0's claim on a run's output directory (a context manager; other ranks pass ``enabled=False``).

    On enter: refuses a non-empty directory unless ``resume`` or ``overwrite`` (FileExistsError),
    creates it, takes the lock (OutputDirError when another run holds it, or when the directory is
    not writable) and removes temp files that a killed run left. On exit: releases the lock.
    """

    def __init__(self, out: Path, *, resume: bool, overwrite: bool, enabled: bool = True) -> None:
        self.out, self.resume, self.overwrite, self.enabled = Path(out), resume, overwrite, enabled
        self._fh = None

    def _content(self) -> list[Path]:
        return [p for p in self.out.iterdir() if p.name != LOCK] if self.out.is_dir() else []

    def __enter__(self) -> "OutputDir":
        if not self.enabled:
            return self
        out = self.out
        if not self.resume and not self.overwrite and self._content():
            raise FileExistsError(f"output dir {out} is not empty; pass --resume to continue it or --overwrite "
                                  "to replace it")
        try:
            out.mkdir(parents=True, exist_ok=True)
            fh = open(out / LOCK, "a+")
        except OSError as e:
            raise OutputDirError(f"output dir {out} cannot be created or written ({e.strerror or e}); "
                                 "choose a writable --out") from e
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "?"
            fh.close()
            raise OutputDirError(f"output dir {out} is in use by another run (pid {owner}); wait for it to "
                                 "finish or choose another --out") from None
        self._fh = fh
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test.")  # the lock file may predate a chmod
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            self._release()
            raise OutputDirError(f"output dir {out} is not writable ({e.strerror or e}); choose a writable "
                                 "--out") from e
        stale_names = (CHECKPOINT + ".tmp",) + tuple(  # (.tmp: older versions)
            name + ".*.tmp" for name in (CHECKPOINT, BEST, METRICS, METRICS_CSV, CONFIG_JSON))
        for stale in [p for pattern in stale_names for p in out.glob(pattern)]:
            stale.unlink(missing_ok=True)  # only ours: the lock is held
        return self

    def _release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __exit__(self, *exc) -> None:
        self._release()
