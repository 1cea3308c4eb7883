"""Checkpoint faults (issue 11 point 4): a truncated or garbage checkpoint file is an error naming the file and
the cause, resume=auto falls back past it to the newest readable checkpoint (and training continues from there
exactly), disk full during a save says 'no space left' with the path and leaves the previous checkpoint and
`latest` as they were, files and pointer are fsynced before their rename, a killed run's temp dirs are removed
at the next start. Single process, micro model: one 2-step run is shared, copied per test."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_safetensors_file,
    load_torch_file,
    write_error,
    writing,
)
from train.config import load_config
from train.distributed import DistInfo
from train.loop import train

SMALL = ["recipe=demo_stage2", "data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56",
         "data.seq_len=300", "train.micro_batch_size=2", "train.global_batch_size=2", "logging=quiet",
         "logging.every=1", "logging.jsonl=false", "init.from_stage_dir=null", "train.export_final=false",
         "eval.at_start=false", "eval.at_end=false", "optim.warmup_steps=1", "optim.lr=2e-3"]
INFO = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
S1, S2 = "step_00000001", "step_00000002"


def _run(out: Path, *extra: str) -> dict:
    return train(load_config([*SMALL, f"output_dir={out}", *extra]))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-step run checkpointed after each step, with every os.fsync / os.replace it made, in order."""
    out = tmp_path_factory.mktemp("base") / "run"
    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):  # noqa: ANN001, ANN202
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        return real_fsync(fd)

    def replace(src, dst, **kw):  # noqa: ANN001, ANN202
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        mp.setattr(os, "replace", replace)
        summary = _run(out, "train.steps=2", "train.save_every=1", "train.keep_last=3")
    assert summary["start_step"] == 0 and len(summary["losses"]) == 2
    return out, summary["losses"], events


@pytest.fixture
def run_copy(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base[0], out)
    return out


@pytest.fixture
def keep_rng():
    """CheckpointManager.load restores the saved RNG states; put this process's back afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))


class FakeEngine:
    """Stands in for an engine where only the checkpoint bookkeeping is under test."""

    kind = "single"

    def __init__(self, fail_load: set[str] = frozenset()) -> None:
        self.loaded: list[str] = []
        self.fail_load = fail_load

    def save(self, d: Path) -> None:
        (d / "model.safetensors").write_bytes(b"x")

    def load(self, d: Path) -> None:
        self.loaded.append(d.name)
        if d.name in self.fail_load:
            raise CheckpointError(f"{d / 'model.safetensors'}: corrupt (injected)")


# ------------------------------------------------------------------------------------------------ fall back
def test_truncated_model_falls_back_to_previous_checkpoint(base, run_copy, capsys):
    """The latest checkpoint's model.safetensors is cut in half: resume=auto says so (file and cause), resumes
    from step 1 and trains step 2 exactly as the uninterrupted run did. keep_last=1 then prunes step 1 only
    because the newer good checkpoint (step 2, rewritten) exists."""
    _, ref_losses, _ = base
    ck = run_copy / "checkpoints"
    bad = ck / S2 / "model.safetensors"
    _truncate(bad)
    summary = _run(run_copy, "train.steps=2", "train.save_every=1", "train.keep_last=1")
    out = capsys.readouterr().out
    assert f"cannot resume from {S2}: {bad}: truncated" in out, out[-3000:]
    assert f"falling back to {ck / S1} (step 1)" in out and f"resumed from {ck / S1} at step 1" in out
    assert summary["start_step"] == 1 and summary["losses"] == [ref_losses[1]]  # bitwise the same step 2
    assert (ck / "latest").read_text().strip() == S2
    assert sorted(d.name for d in ck.glob("step_*")) == [S2]
    assert CheckpointManager(run_copy, 1, INFO).check(ck / S2) is None  # the rewritten step 2 is readable


@pytest.mark.parametrize(("name", "damage", "cause"), [
    ("model.safetensors", _truncate, "truncated"),
    ("model.safetensors", _garbage, "not a safetensors file"),
    ("optimizer.pt", _garbage, "not a torch checkpoint"),
    ("optimizer.pt", _truncate, "truncated"),
    ("rank00000.pt", _truncate, "truncated"),
    ("scheduler.pt", lambda p: p.write_bytes(b""), "empty file"),
    ("trainer_state.json", _truncate, "not valid JSON"),
    ("rank00000.pt", Path.unlink, "missing"),
])
def test_check_names_the_file_and_the_cause(run_copy, name, damage, cause):
    ck = run_copy / "checkpoints"
    mgr = CheckpointManager(run_copy, 3, INFO)
    assert mgr.check(ck / S2) is None and mgr.check(ck / S1) is None
    damage(ck / S2 / name)
    problem = mgr.check(ck / S2)
    assert problem is not None and problem.startswith(f"{ck / S2 / name}: {cause}"), problem
    assert mgr.check(ck / S1) is None


def test_garbage_optimizer_file_is_named(run_copy, capsys, keep_rng):
    """Reading the file itself, an explicit resume of that checkpoint, and resume=auto (falls back)."""
    ck = run_copy / "checkpoints"
    bad = ck / S2 / "optimizer.pt"
    _garbage(bad)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{bad}: not a torch checkpoint")):
        load_torch_file(bad)
    mgr = CheckpointManager(run_copy, 3, INFO)
    with pytest.raises(CheckpointError, match=re.escape(f"train.resume={ck / S2}: cannot resume: {bad}: not a torch")):
        mgr.resume(str(ck / S2), FakeEngine(), None)
    engine = FakeEngine()
    path, meta = mgr.resume("auto", engine, None)
    assert path == ck / S1 and meta["step"] == 1 and engine.loaded == [S1]
    assert (ck / "latest").read_text().strip() == S1  # a rerun goes straight to the readable one
    out = capsys.readouterr().out
    assert f"cannot resume from {S2}: {bad}: not a torch checkpoint" in out and "falling back to" in out


def test_load_error_after_the_checks_falls_back_too(run_copy, keep_rng, capsys):
    engine = FakeEngine(fail_load={S2})
    path, meta = CheckpointManager(run_copy, 3, INFO).resume("auto", engine, None)
    assert path.name == S1 and meta["step"] == 1 and engine.loaded == [S2, S1]
    assert "corrupt (injected)" in capsys.readouterr().out


def test_no_readable_checkpoint_lists_what_was_tried(run_copy):
    ck = run_copy / "checkpoints"
    _truncate(ck / S2 / "rank00000.pt")
    (ck / S1 / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="no readable checkpoint") as err:
        CheckpointManager(run_copy, 3, INFO).resume("auto", FakeEngine(), None)
    assert f"{S2}: {ck / S2 / 'rank00000.pt'}: truncated" in str(err.value)
    assert f"{S1}: {ck / S1}: incomplete" in str(err.value)


def test_pointer_to_a_missing_dir_falls_back(run_copy, keep_rng, capsys):
    ck = run_copy / "checkpoints"
    (ck / "latest").write_text("step_00000009\n")
    path, _ = CheckpointManager(run_copy, 3, INFO).resume("auto", FakeEngine(), None)
    assert path == ck / S2
    assert "names 'step_00000009', which is not a checkpoint directory" in capsys.readouterr().out


def test_prune_never_deletes_the_fallen_back_checkpoint_before_a_newer_good_one(tmp_path):
    """After falling back from an unreadable step 3 to step 1, saving step 2 with keep_last=1 keeps step 2
    (the newest good one) and deletes step 1; the abandoned step 3 is not counted (it would push out both)."""
    mgr = CheckpointManager(tmp_path, 1, INFO)
    for s in (1, 3):
        (mgr.root / f"step_{s:08d}").mkdir()
        (mgr.root / f"step_{s:08d}" / "trainer_state.json").write_text("{}")
    (mgr.root / "latest").write_text("step_00000001\n")
    mgr.save(2, FakeEngine(), None, {})
    assert (mgr.root / "latest").read_text().strip() == "step_00000002"
    assert sorted(d.name for d in mgr.root.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert json.loads((mgr.root / "step_00000002" / "trainer_state.json").read_text())["step"] == 2


# ------------------------------------------------------------------------------------------------ disk full
def test_disk_full_during_save_keeps_the_previous_checkpoint(run_copy, monkeypatch):
    """ENOSPC injected while optimizer.pt of step 3 is written (model.safetensors already is): the run stops
    with 'no space left on device writing <that path>', no temp dir is left, `latest` still names step 2 and
    step 2 still loads."""
    ck = run_copy / "checkpoints"
    real_save = torch.save

    def save(obj, f, *a, **kw):  # noqa: ANN001, ANN202
        if ".step_00000003.tmp" in str(f) and Path(f).name == "optimizer.pt":
            Path(f).write_bytes(b"PK\x03\x04 half written")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError) as err:
        _run(run_copy, "train.steps=3", "train.save_every=1", "train.keep_last=3")
    msg = str(err.value)
    assert f"no space left on device writing {ck / '.step_00000003.tmp' / 'optimizer.pt'} (free: " in msg, msg
    assert f"{ck / 'latest'} still names the previous checkpoint" in msg
    assert not list(ck.glob(".*tmp*")) and not (ck / "step_00000003").exists()
    assert (ck / "latest").read_text().strip() == S2
    mgr = CheckpointManager(run_copy, 3, INFO)
    assert mgr.check(ck / S2) is None
    assert load_safetensors_file(ck / S2 / "model.safetensors") and load_torch_file(ck / S2 / "optimizer.pt")["state"]


def test_torch_write_error_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch's zip writer loses the errno ('basic_ios::clear: iostream error'): the free space decides."""
    target = tmp_path / ".step_00000004.tmp" / "optimizer.pt"
    usage = shutil.disk_usage(tmp_path)
    torch_err = RuntimeError("basic_ios::clear: iostream error")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=3 * 2**20))
    assert str(write_error(target, torch_err)) == f"no space left on device writing {target} (free: 3.0 MiB)"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50 * 2**30))
    assert str(write_error(target, torch_err)) == \
        f"cannot write {target}: RuntimeError: basic_ios::clear: iostream error"
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(write_error(target, rust)).startswith(f"no space left on device writing {target} (free: 51200.0")
    with pytest.raises(CheckpointError, match="disk quota exceeded"), writing(target):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")


# ------------------------------------------------------------------------------------------------ fsync
def test_files_dirs_and_pointer_are_fsynced_before_their_rename(base):
    """Of the real run's save of step 2: every file of the checkpoint was fsynced in the temp dir, then the
    temp dir, before the rename into place; then the checkpoints dir; the pointer file before its rename."""
    out, _, events = base
    ck = out.resolve() / "checkpoints"  # the paths /proc/self/fd shows
    tmp, final = str(ck / f".{S2}.tmp"), str(ck / S2)
    i_rename = events.index(("replace", tmp, final))
    synced = {p for kind, p, _ in events[:i_rename] if kind == "fsync"}
    files = sorted(f.name for f in (ck / S2).iterdir())
    assert {"model.safetensors", "optimizer.pt", "rank00000.pt", "trainer_state.json"} <= set(files)
    assert {f"{tmp}/{f}" for f in files} <= synced, sorted(synced)
    assert tmp in synced
    pointer = [(i, src) for i, (kind, src, dst) in enumerate(events)
               if kind == "replace" and dst == str(ck / "latest") and i > i_rename][0]
    assert ("fsync", pointer[1], "") in events[i_rename:pointer[0]]
    assert ("fsync", str(ck), "") in events[i_rename:pointer[0]]  # the rename itself is durable
    assert ("fsync", str(ck), "") in events[pointer[0]:]  # and the pointer's


# ------------------------------------------------------------------------------------------------ stale tmp
def test_stale_temp_dirs_are_removed_at_start(tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    stale = [ck / ".step_00000006.tmp", tmp_path / ".final.tmp-k2j4", tmp_path / ".final_lora.tmp.4242"]
    keep = [ck / S2, tmp_path / "final", tmp_path / "other.tmp"]
    for d in stale + keep:
        d.mkdir(parents=True)
        (d / "f").write_text("x")
    (ck / ".latest.tmp.4242").write_text("step_00000006\n")
    CheckpointManager(tmp_path, 3, DistInfo(1, 1, 2, torch.device("cpu")))  # not rank 0: leaves them
    assert all(d.exists() for d in stale)
    CheckpointManager(tmp_path, 3, INFO)
    assert not any(d.exists() for d in stale) and not (ck / ".latest.tmp.4242").exists()
    assert all((d / "f").exists() for d in keep)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "stale" in ln]
    assert len(lines) == 1 and "removed 4 stale" in lines[0] and "checkpoints/.step_00000006.tmp" in lines[0]
