"""A real multi-node start (not DRY_RUN): two torchrun "nodes" on localhost (--nnodes 2, --node_rank 0/1,
one process each, gloo on CPU) started through launch/multi_node.sh run ZeRO-2 on the demo recipe, and a
second 2-node invocation resumes from the first one's step-2 checkpoint: its steps 3-4 follow the
uninterrupted run's loss, LR and grad-norm curve.

The first invocation uses static rendezvous (--master_addr/--master_port, node 0 hosts the store, NODE_RANK
fixes the global ranks), the resume the script's default c10d rendezvous, so both are exercised."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from launching import ROOT, clean_env

ARGS = ["recipe=demo_stage2", "data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56",
        "data.seq_len=300", "train.steps=4", "train.save_every=2", "train.keep_last=5", "logging=quiet",
        "logging.every=1", "train.micro_batch_size=1", "train.global_batch_size=4", "train.export_final=false",
        "init.from_stage_dir=null", "eval.at_start=false", "eval.at_end=false", "optim.warmup_steps=2",
        "optim.lr=2e-3", "engine=zero2", "engine.device=cpu"]  # gloo: the same test on a GPU machine
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(out: Path, backend: str, *extra: str) -> list[str]:
    """Start node 0 and node 1 (each its own process group) and wait for both; returns their logs."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = clean_env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        NPROC_PER_NODE="1", RDZV_BACKEND=backend)
        procs.append(subprocess.Popen(["bash", "launch/multi_node.sh", *ARGS, f"output_dir={out}", *extra],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        tails = "\n".join((p.communicate()[0] or "")[-3000:] for p in procs)
        pytest.fail(f"2-node run ({backend}) timed out after {TIMEOUT}s (rendezvous or collective hang?)\n{tails}")
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank} ({backend}) exited {p.returncode}:\n{log[-6000:]}"
    return logs


def _curve(out: Path) -> dict[int, tuple[float, float, float]]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["lr"], r["grad_norm"]) for r in recs if "loss" in r}


@pytest.mark.slow
@pytest.mark.extended
def test_two_node_zero2_run_and_resume(tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    logs = _two_nodes(first, "static")
    # static rendezvous: node 0 holds global rank 0, which prints the run line and writes the metrics
    assert "world size 2, engine deepspeed ZeRO-2" in logs[0], logs[0][-4000:]
    assert "rank 1:" in logs[1] and "world size 2" not in logs[1]
    ckpts = first / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert (ckpts / "step_00000002").is_dir()
    ref = _curve(first)
    assert sorted(ref) == [1, 2, 3, 4] and ref[4][0] < ref[1][0]  # it trained

    logs = _two_nodes(resumed, "c10d", f"train.resume={ckpts / 'step_00000002'}")
    both = "\n".join(logs)
    assert "world size 2, engine deepspeed ZeRO-2" in both
    assert f"resumed from {ckpts / 'step_00000002'}" in both and "at step 2" in both, both[-4000:]
    got = _curve(resumed)
    assert sorted(got) == [3, 4]  # steps 1-2 came from the checkpoint, not re-run
    for s in got:  # the curve continues exactly where the uninterrupted 2-node run went
        assert got[s][0] == pytest.approx(ref[s][0], rel=1e-5, abs=1e-5), (s, got[s], ref[s])
        assert got[s][1] == pytest.approx(ref[s][1], rel=1e-9), (s, got[s], ref[s])
        assert got[s][2] == pytest.approx(ref[s][2], rel=1e-3), (s, got[s], ref[s])
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000004"
