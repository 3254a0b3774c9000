"""Checkpoint integrity and the output directory under failure (issue #19): flipped bytes, changed
optimizer settings on resume, a full disk during a save, a read-only directory, an --overwrite run
killed before its first save, two runs into one directory, temp-file names."""
import errno
import json
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from concept_kernels.train import CheckpointError, run
from concept_kernels.train import checkpoint as ckpt_mod
from concept_kernels.train.__main__ import main
from concept_kernels.train.checkpoint import CHECKPOINT, METRICS, OutputDirError, load_checkpoint

# the CLI twin of tiny_config (same values, so a CLI --resume of a run() checkpoint matches)
CLI = ["--no-pretrained", "--image-size", "32", "--batch-size", "4", "--shots-per-class", "2", "--epochs", "1",
       "--iters-per-epoch", "2", "--num-patches", "4", "--num-confusing", "3", "--queue-len", "4",
       "--patch-pixels", "16", "--lr", "0.001", "--test-limit", "40", "--no-progress"]


def _metric_epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / METRICS).read_text().splitlines()]


def _tensor_data_offset(path: Path) -> tuple[int, int]:
    """(offset, size) of the largest tensor record's bytes in a torch zip checkpoint (stored, not deflated)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_flipped_tensor_bytes_are_refused_on_resume(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    run(cfg)
    path = Path(cfg.out) / CHECKPOINT
    offset, size = _tensor_data_offset(path)
    raw = bytearray(path.read_bytes())
    for i in range(offset + size // 2, offset + size // 2 + 4):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    torch.load(path, map_location="cpu", weights_only=True)  # torch itself reads it without complaint
    with pytest.raises(CheckpointError, match="corrupt: its content digest") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="corrupt: its content digest"):  # a digest present is checked
        load_checkpoint(path, require_digest=False)
    capsys.readouterr()
    assert main(CLI + ["--out", cfg.out, "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "digest" in err


def test_checkpoint_without_digest_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    run(cfg)
    path = Path(cfg.out) / CHECKPOINT
    payload = torch.load(path, map_location="cpu", weights_only=True)
    del payload["sha256"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="no content digest"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, require_digest=False)  # opt-in, for runs checked otherwise (bench/accuracy.py)
    assert "sha256" not in loaded and torch.equal(loaded["model"]["head.weight"], payload["model"]["head.weight"])


@pytest.mark.parametrize("change", [dict(lr=0.01), dict(weight_decay=0.0), dict(milestones=(1,)),
                                    dict(schedule="cos"), dict(momentum=0.5), dict(nesterov=False)],
                         ids=lambda d: next(iter(d)))
def test_resume_refuses_changed_optimizer_settings(tmp_path, change):
    cfg = tiny_config(tmp_path)
    run(cfg)
    before = (Path(cfg.out) / CHECKPOINT).read_bytes()
    key, given = next(iter(change.items()))
    saved = getattr(cfg, key)
    with pytest.raises(CheckpointError, match="optimizer / LR-schedule settings") as e:
        run(tiny_config(tmp_path, resume=True, epochs=2, **change))
    as_saved = list(saved) if isinstance(saved, tuple) else saved
    as_given = list(given) if isinstance(given, tuple) else given
    assert f"'{key}': ({as_saved!r}, {as_given!r})" in str(e.value)
    assert (Path(cfg.out) / CHECKPOINT).read_bytes() == before and _metric_epochs(Path(cfg.out)) == [1]


def test_resume_under_cosine_refuses_new_epochs_and_continues_with_the_same(tmp_path):
    cfg = tiny_config(tmp_path, schedule="cos", epochs=2, backbone_lr_mult=0.1)  # random init: 1x diverges

    def stop_after_first_epoch(step, model):
        if step == 2:
            import signal
            signal.raise_signal(signal.SIGINT)

    run(cfg, on_step=stop_after_first_epoch)
    with pytest.raises(CheckpointError, match=r"'epochs': \(2, 3\)"):
        run(tiny_config(tmp_path, schedule="cos", epochs=3, resume=True, backbone_lr_mult=0.1))
    hist = run(tiny_config(tmp_path, schedule="cos", epochs=2, resume=True, backbone_lr_mult=0.1))
    assert [r["epoch"] for r in hist] == [1, 2] and _metric_epochs(Path(cfg.out)) == [1, 2]
    assert hist[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine reached its end at epoch 2 of 2


def _small_disk(monkeypatch, out: Path, *, only: str = "", fail_at: int = 2, room: int = 1_000_003) -> list[str]:
    """Emulate a disk that fills up, as the kernel reports it: writes into files under ``out`` whose
    names start with ``only`` succeed until the ``fail_at``-th such file, which gets ``room`` bytes
    (the last write short) and then OSError(ENOSPC). Returns the names of the files written.

    A failure in the middle of a torch zip file is what a real full disk gives: torch.save's
    end-of-file handler then raises "unexpected pos" with the ENOSPC as its context."""
    real_write, files = os.write, []

    def write(fd, data):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return real_write(fd, data)
        if Path(name).parent != out or not Path(name).name.startswith(only):
            return real_write(fd, data)
        if not files or files[-1] != name:
            files.append(name)
        if len(files) < fail_at:
            return real_write(fd, data)
        free = room - os.fstat(fd).st_size
        if free > 0:
            return real_write(fd, memoryview(data)[:free])  # short when data is longer
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    return files


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_disk_full_while_saving_the_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=2)
    out = Path(cfg.out)
    files = _small_disk(monkeypatch, out, only=CHECKPOINT + ".")  # epoch 2's save fails
    with pytest.raises(CheckpointError, match=re.escape(f"no space left on {out}")):
        run(cfg)
    assert len(files) == 2 and files[0] != files[1] and not list(out.glob("*.tmp"))
    ck = load_checkpoint(out / CHECKPOINT)
    assert ck["state"]["epoch"] == 1 and [r["epoch"] for r in ck["history"]] == [1] == _metric_epochs(out)
    monkeypatch.undo()
    hist = run(tiny_config(tmp_path, epochs=3, resume=True))
    assert [r["epoch"] for r in hist] == [1, 2, 3] == _metric_epochs(out)


def test_disk_full_via_torch_save_oserror(tmp_path, monkeypatch):
    """torch.save raising OSError(ENOSPC) mid-write (the issue's simulation)."""
    cfg = tiny_config(tmp_path, epochs=2)
    out = Path(cfg.out)
    real_save, calls = torch.save, []

    def save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as fh:
                    fh.write(b"PK\x03\x04 partial")
            else:
                f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match=re.escape(f"no space left on {out}")):
        run(cfg)
    assert not list(out.glob("*.tmp")) and load_checkpoint(out / CHECKPOINT)["state"]["epoch"] == 1
    assert _metric_epochs(out) == [1]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_disk_full_while_writing_metrics_is_repaired_on_resume(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=2)
    out = Path(cfg.out)
    _small_disk(monkeypatch, out, only=METRICS + ".", room=100)
    with pytest.raises(CheckpointError, match=re.escape(f"no space left on {out}")):
        run(cfg)
    assert not list(out.glob("*.tmp")) and _metric_epochs(out) == [1]  # the checkpoint already holds epoch 2
    assert load_checkpoint(out / CHECKPOINT)["state"]["epoch"] == 2
    monkeypatch.undo()
    hist = run(tiny_config(tmp_path, epochs=2, resume=True))
    assert [r["epoch"] for r in hist] == [1, 2] == _metric_epochs(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize("where", ["dir", "parent"])
def test_read_only_output_dir_chmod(tmp_path, where):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro if where == "dir" else ro / "run"
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match=f"output dir {out} .*writ"):
            run(tiny_config(tmp_path, out=str(out)))
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("fail", ["mkdir", "lock", "probe"])
def test_read_only_output_dir(tmp_path, monkeypatch, fail):
    """EROFS at each first write into the directory (simulated: the tests may run as root)."""
    out = tmp_path / "ro"
    if fail != "mkdir":
        out.mkdir()
    real_mkdir, real_open, real_mkstemp = Path.mkdir, open, ckpt_mod.tempfile.mkstemp

    def erofs(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out))

    if fail == "mkdir":
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **kw: erofs() if self == out
                            else real_mkdir(self, *a, **kw))
    elif fail == "lock":
        monkeypatch.setattr(ckpt_mod, "open", lambda f, *a, **kw: erofs() if Path(f).parent == out
                            else real_open(f, *a, **kw), raising=False)
    else:
        monkeypatch.setattr(ckpt_mod.tempfile, "mkstemp", lambda *a, **kw: erofs() if kw.get("dir") == out
                            else real_mkstemp(*a, **kw))
    with pytest.raises(OutputDirError, match=f"output dir {out} .*Read-only file system"):
        run(tiny_config(tmp_path, out=str(out)))


def test_overwrite_killed_before_first_save_keeps_old_run_consistent(tmp_path):
    cfg = tiny_config(tmp_path)
    old_rows = run(cfg)
    out = Path(cfg.out)
    before = (out / CHECKPOINT).read_bytes(), (out / METRICS).read_text()

    class Killed(Exception):
        pass

    def kill(step, model):
        raise Killed

    with pytest.raises(Killed):
        run(tiny_config(tmp_path, overwrite=True, seed=5), on_step=kill)
    assert ((out / CHECKPOINT).read_bytes(), (out / METRICS).read_text()) == before
    assert [r["epoch"] for r in load_checkpoint(out / CHECKPOINT)["history"]] == _metric_epochs(out) == [1]
    assert len(old_rows) == 1 and not list(out.glob("*.tmp"))


def test_second_run_into_the_same_dir_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    errors = []

    def second_run(step, model):
        if step == 1:
            for kw in (dict(overwrite=True), dict(resume=True)):
                with pytest.raises(OutputDirError, match=f"output dir {cfg.out} is in use by another run "
                                                         f"\\(pid {os.getpid()}\\)") as e:
                    run(tiny_config(tmp_path, **kw))
                errors.append(str(e.value))

    run(cfg, on_step=second_run)
    assert len(errors) == 2 and _metric_epochs(Path(cfg.out)) == [1]
    assert run(tiny_config(tmp_path, epochs=2, resume=True))[-1]["epoch"] == 2  # released after the run


def test_lock_held_by_another_process(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"fh = open({str(out / ckpt_mod.LOCK)!r}, 'a+'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
                               "fh.write('4242'); fh.flush(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=r"in use by another run \(pid 4242\)"):
            run(tiny_config(tmp_path, overwrite=True))
    finally:
        holder.kill()
        holder.wait()


def test_unique_temp_names_and_stale_temps_removed(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    run(cfg)
    out = Path(cfg.out)
    stale = [out / "checkpoint.pt.tmp", out / "checkpoint.pt.1.0a0b0c0d.tmp", out / "metrics.jsonl.1.0a0b0c0d.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    names, real_save = [], torch.save

    def save(obj, f, *a, **kw):
        names.extend(p.name for p in out.glob("checkpoint.pt*") if p.name != CHECKPOINT)  # the file it writes
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    run(tiny_config(tmp_path, epochs=3, resume=True))
    assert len(names) == 2 and len(set(names)) == 2, names
    assert all(n.startswith(f"{CHECKPOINT}.{os.getpid()}.") and n.endswith(".tmp") for n in names), names
    assert not list(out.glob("*.tmp")) and _metric_epochs(out) == [1, 2, 3]
