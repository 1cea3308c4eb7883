"""A non-finite batch is skipped on every rank (no update, no LR-schedule advance, counted), and a run that
keeps producing them stops with exit 3, naming the steps, with its last good checkpoint kept.

The NaN comes from the loop's own test hook (QWENVL_DEBUG_NAN_AT_STEPS: rank 0's loss times NaN), so the
2-process runs also check that ranks agree: rank 1's own loss is finite, its gradients turn NaN only through
the all-reduce, and it must skip the same step."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from launching import clean_env, run_group
from safetensors.torch import load_file

from train.model.official import resolve_checkpoint

COMMON = ["recipe=demo_stage2", "data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56",
          "data.seq_len=300", "train.steps=5", "logging=quiet", "logging.every=1", "init.from_stage_dir=null",
          "eval.at_start=false", "eval.at_end=false", "train.micro_batch_size=1", "train.global_batch_size=2",
          "optim.warmup_steps=1", "optim.lr=2e-3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, *extra: str, nan: str = "", world: int = 1, engine: str = "single") -> tuple[int, str]:
    args = [*COMMON, f"engine={engine}", f"output_dir={out}", *extra]
    cmd = [sys.executable, "-m", "train", *args] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
         str(_free_port()), "-m", "train", *args]
    p = run_group(cmd, clean_env(QWENVL_DEBUG_NAN_AT_STEPS=nan), 300)
    return p.returncode, p.stdout


def _rows(out: Path) -> list[dict]:
    def no_nan(x: str) -> None:
        raise AssertionError(f"metrics.jsonl is not strict JSON: {x}")

    return [json.loads(x, parse_constant=no_nan) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _export(out: Path) -> dict[str, torch.Tensor]:
    files, _ = resolve_checkpoint(out / "final")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def test_one_nan_step_is_skipped_without_update_or_schedule_advance(tmp_path):
    rc, log = _run(tmp_path, "train.save_every=1", "train.keep_last=10", "train.export_final=false", nan="3")
    assert rc == 0, log[-4000:]
    rows = {r["step"]: r for r in _rows(tmp_path) if "lr" in r}
    assert rows[3]["loss"] is None and rows[3]["skipped/nonfinite_step"] == 1
    assert rows[2]["skipped/nonfinite_step"] == 0 and rows[5]["skipped/nonfinite_step"] == 1
    assert all(rows[s]["loss"] is not None for s in (1, 2, 4, 5))
    assert rows[3]["lr"] == rows[2]["lr"] and rows[4]["lr"] != rows[3]["lr"]  # the schedule waited one step
    ck = tmp_path / "checkpoints"
    assert not (ck / "step_00000003").exists()  # no periodic checkpoint inside a non-finite streak
    w2, w4 = (load_file(str(ck / f"step_0000000{s}" / "model.safetensors")) for s in (2, 4))
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)  # training went on after it
    # a run that ends at the NaN step: its final checkpoint holds step 2's weights (no update at step 3)
    rc, _ = _run(tmp_path / "short", "train.steps=3", "train.save_every=1", "train.keep_last=10",
                 "train.export_final=false", nan="3")
    assert rc == 0
    ck = tmp_path / "short" / "checkpoints"
    w2, w3 = (load_file(str(ck / f"step_0000000{s}" / "model.safetensors")) for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert "step 3: non-finite loss or gradient norm" in log


@pytest.mark.slow
def test_two_rank_zero2_skips_together_and_matches_one_process(tmp_path):
    rc, log = _run(tmp_path / "single", "train.save_every=0", "train.export_final=true", nan="3")
    assert rc == 0, log[-4000:]
    rc, log = _run(tmp_path / "zero2", "train.save_every=0", "train.export_final=true", nan="3", world=2,
                   engine="zero2")
    assert rc == 0, log[-4000:]
    clean_rc, clean_log = _run(tmp_path / "clean", "train.save_every=0", "train.export_final=true")
    assert clean_rc == 0, clean_log[-4000:]
    one, two, clean = (_export(tmp_path / d) for d in ("single", "zero2", "clean"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5  # both ranks skipped step 3
    assert max(float((one[k] - clean[k]).abs().max()) for k in one) > 1e-4  # ... and skipping mattered
    rows = [r for r in _rows(tmp_path / "zero2") if "lr" in r]
    assert [r["skipped/nonfinite_step"] for r in rows] == [0, 0, 1, 1, 1]


def test_a_run_of_nonfinite_steps_stops_keeping_the_last_good_checkpoint(tmp_path):
    rc, log = _run(tmp_path, "train.steps=12", "train.save_every=2", "train.keep_last=1",
                   "train.max_nonfinite_steps=5", "train.export_final=false", nan="3-20")
    assert rc == 3, log[-4000:]
    assert "stopped at step 7: 5 optimizer steps in a row (steps 3-7) had a non-finite loss" in log
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"  # keep_last=1 did not prune the good one
    assert sorted(d.name for d in ck.glob("step_*")) == ["step_00000002"]
    assert "last good checkpoint: " + str(ck / "step_00000002") in log
    _rows(tmp_path)  # strict JSON throughout
