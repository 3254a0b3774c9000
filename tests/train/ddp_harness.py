"""Run a test script under ``torchrun`` (2 gloo ranks on the CPU) and read back what rank 0 recorded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_two_ranks(script: str, tmp_path: Path, out_dir: Path) -> dict:
    """Write ``script`` to ``tmp_path``, run it as ``torchrun --nproc-per-node=2 script OUT_DIR RESULT_JSON``
    (one thread per rank, offline, no forced backend) and return the JSON rank 0 wrote to RESULT_JSON;
    a failing torchrun fails the test with the tail of its output."""
    path, result = tmp_path / "ddp_run.py", tmp_path / "result.json"
    path.write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("CONCEPT_KERNELS_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(path), str(out_dir), str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())
