"""Shared by the multi-process tests: start a run (launcher + workers) in its own process group and kill
the whole group on timeout, so a hung collective fails the test instead of hanging the suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This environment minus any inherited distributed settings (and `drop`), CPU DeepSpeed, `extra` on top."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHON=sys.executable)
    for k in (*DIST_VARS, *drop):
        env.pop(k, None)
    env.update(extra)
    return env


# The per-test timeouts guard against hangs (a collective that never completes), not against slowness: on a
# loaded machine a 2-process run can take several times its idle time, so no run is cut before this.
HANG_TIMEOUT = float(os.environ.get("QWENVL_TEST_HANG_TIMEOUT", "900"))


def finish_group(p: subprocess.Popen, timeout: float, what: str) -> str:
    """The output of `p` (started with start_new_session=True); on timeout its whole group is killed and the
    test fails naming `what`."""
    timeout = max(timeout, HANG_TIMEOUT)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{what} timed out after {timeout}s (a collective hang?)\n{out[-4000:]}")
    return out


def run_group(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    out = finish_group(p, timeout, str(cmd[:4]))
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")
