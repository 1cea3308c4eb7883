"""Resume under another world size: 1 -> 2 and 2 -> 1 processes.

Data: the stage streams of every old rank are checkpointed mid-epoch (samples sitting in shuffle buffers,
prefetch and packers), re-split over the new ranks, and run on; over the epoch every sample is trained on
exactly once (tiny shards written here; a builder that writes the sample id and its epoch into the tokens).
Training: an uninterrupted 1-process run, a 2-process ZeRO-2 run resumed from its step-4 checkpoint and
killed after step 9, and a 1-process run resumed from that 2-process step-8 checkpoint follow the
uninterrupted loss curve (synthetic data: the same rows per step whatever the split)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from launching import clean_env, run_group

from data.loader import ResumableLoader, ShardStream, build_stream
from data.pipeline import SampleMapper, StageStream, build_stage_stream
from train.loop import KILL_ENV

SEQ = 16
EPOCH_TOKEN = 2000  # token 1 of every sample: EPOCH_TOKEN + the epoch it was read in


class IdSample:
    def __init__(self, sid: int, epoch: int, n: int, ref: list[Any]) -> None:
        self.input_ids = [sid, EPOCH_TOKEN + epoch] + [7] * (n - 2)
        self.labels = list(self.input_ids)
        self.images: list[torch.Tensor] = []
        self.task = "caption"
        self.ref = ref


class IdBuilder:
    """RawSample -> a sample whose first token is its id and second the epoch its stream was in."""

    def __call__(self, raw: Any) -> IdSample:
        return IdSample(int(raw.meta["id"]), int(getattr(raw, "epoch", -1)), int(raw.meta["n"]), raw.ref())


def _write_source(d: Path, base: int, n_shards: int, per_shard: int) -> list[int]:
    d.mkdir(parents=True)
    ids = []
    for s in range(n_shards):
        with tarfile.open(d / f"part-{s:03d}.tar", "w") as tf:
            for i in range(per_shard):
                sid = base + s * 100 + i
                ids.append(sid)
                data = json.dumps({"id": sid, "n": 3 + (sid * 7) % 6}).encode()
                ti = tarfile.TarInfo(f"s{sid:06d}.json")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return ids


def _tag_epochs(stream: Any) -> None:
    """Test spy: every raw sample a ShardStream hands out carries the stream's epoch at that moment."""
    for s in getattr(stream, "streams", [stream]):
        def out(raw: Any, s: ShardStream = s) -> Any:
            raw.epoch = s.epoch
            return ShardStream._out(s, raw)
        s._out = out


def _finite_stream(spec: str, rank: int, world: int) -> StageStream:
    stream = build_stream(spec, seed=3, epochs=1, buffer_size=4, rank=rank, world_size=world)
    _tag_epochs(stream)
    mapper = SampleMapper(IdBuilder())
    return StageStream(ResumableLoader(stream, mapper, prefetch=2), mapper, seq_len=SEQ, batch_size=2, pack_buffer=5)


def _mixed_stream(sources: list[dict[str, Any]], rank: int, world: int) -> StageStream:
    st = build_stage_stream(2, sources, image_size=56, seq_len=SEQ, batch_size=2, seed=5, rank=rank, world_size=world,
                            buffer_size=4, pack_buffer=3, same_task=False, prefetch=2, builder=IdBuilder())
    _tag_epochs(st.loader.stream)
    return st


def _seen(batch: dict[str, Any]) -> list[tuple[int, int]]:
    """(sample id, epoch) of every packed sample of a batch."""
    out = []
    ids, seg = batch["input_ids"], batch["segment_ids"]
    for row in range(ids.shape[0]):
        for v in seg[row].unique().tolist():
            if v:
                pos = (seg[row] == v).nonzero()[0, 0]
                out.append((int(ids[row, pos]), int(ids[row, pos + 1]) - EPOCH_TOKEN))
    return out


@pytest.mark.parametrize("old,new", [(1, 2), (2, 1)])
@pytest.mark.parametrize("n_shards", [5, 1])  # 1 shard: sample-level striding over the consumers
def test_finite_epoch_resplit_sees_every_sample_once(old, new, n_shards, tmp_path):
    ids = _write_source(tmp_path / "src", 1000, n_shards, 60 // n_shards)
    spec = str(tmp_path / "src")
    before = []
    states = []
    for r in range(old):
        st = _finite_stream(spec, r, old)
        for _ in range(3):
            before += _seen(next(st))
        states.append(st.state_dict())
    states = [json.loads(json.dumps(s)) for s in states]  # what a checkpoint round trip leaves
    held = [len(s["pending"]) + len(s["loader"]["stream"]["buffer"]) for s in states]
    assert min(held) > 0  # every old rank holds samples read but not trained on (packer, shuffle buffer)
    after = []
    for r in range(new):
        st = _finite_stream(spec, r, new)
        report = st.load_resplit(states)
        after += [x for b in st for x in _seen(b)]
    got = Counter(i for i, _ in before + after)
    assert sorted(got) == sorted(ids) and set(got.values()) == {1}, got.most_common(3)
    assert report["from_ranks"] == old and report["packer"] + report["prefetch"] + report["shuffle_buffer"] > 0


@pytest.mark.parametrize("old,new", [(1, 2), (2, 1)])
def test_mixed_stream_resplit_first_epoch_exactly_once(old, new, tmp_path):
    """The training case: a weighted mixture of infinite sources (one of them smaller than the world, so
    striding), checkpointed mid-epoch and re-split; per source, epoch 0 holds every sample once, like an
    uninterrupted run's epoch 0, and the stream goes on into epoch 1 without repeats."""
    specs = {"a": (5, 7), "b": (3, 6), "c": (1, 9)}
    sources, all_ids = [], {}
    for k, (name, (n, per)) in enumerate(specs.items()):
        all_ids[name] = sorted(_write_source(tmp_path / name, 10000 * (k + 1), n, per))
        sources.append({"name": name, "shards": str(tmp_path / name), "weight": 1.0})
    source_of = {i: n for n, ids in all_ids.items() for i in ids}

    def epoch0(seen: list[tuple[int, int]]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {n: [] for n in all_ids}
        for i, e in seen:
            if e == 0:
                out[source_of[i]].append(i)
        return {n: sorted(v) for n, v in out.items()}

    # uninterrupted: one rank, long enough for every source to finish epoch 0
    ref = _mixed_stream(sources, 0, 1)
    ref_seen = [x for _ in range(60) for x in _seen(next(ref))]
    assert epoch0(ref_seen) == all_ids
    before, states = [], []
    for r in range(old):
        st = _mixed_stream(sources, r, old)
        for _ in range(4):
            before += _seen(next(st))
        states.append(json.loads(json.dumps(st.state_dict())))
    after = []
    for r in range(new):
        st = _mixed_stream(sources, r, new)
        st.load_resplit(states)
        after += [x for _ in range(60 // new) for x in _seen(next(st))]
    got = epoch0(before + after)
    assert got == all_ids  # every sample of epoch 0 once: nothing repeated, nothing skipped
    for n in all_ids:
        e1 = Counter(i for i, e in after if e == 1 and source_of[i] == n)
        assert e1 and max(e1.values()) == 1, (n, e1.most_common(2))


def test_a_consumer_an_epoch_ahead_is_caught_up_by_the_new_world(tmp_path):
    """Old rank 0 has moved on to epoch 1 while rank 1 is still in epoch 0: the single new rank first reads
    what rank 1 still owes to epoch 0 and to epoch 1, then both epochs hold every sample exactly once each."""
    ids = _write_source(tmp_path / "src", 500, 4, 5)
    old = [ShardStream(str(tmp_path / "src"), seed=1, epochs=None, buffer_size=3, rank=r, world_size=2) for r in (0, 1)]
    seen = Counter()
    for r, n in ((0, 14), (1, 3)):  # 10 samples per consumer and epoch
        for _ in range(n):
            seen[next(old[r]).meta["id"]] += 1
    assert (old[0].epoch, old[1].epoch) == (1, 0)
    new = ShardStream(str(tmp_path / "src"), seed=1, epochs=None, buffer_size=3, rank=0, world_size=1)
    new.load_portable(new.portable_state([json.loads(json.dumps(o.state_dict())) for o in old]))
    assert new.epoch == 1
    while True:
        s = next(new)
        if new.epoch == 2:
            break
        seen[s.meta["id"]] += 1
    assert sorted(seen) == sorted(ids) and set(seen.values()) == {2}, seen.most_common(3)


# ------------------------------------------------------------------------------------------- training
COMMON = ["recipe=demo_stage2", "data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56",
          "data.seq_len=300", "train.steps=12", "train.save_every=4", "train.keep_last=5", "logging=quiet",
          "logging.every=1", "train.micro_batch_size=1", "train.global_batch_size=4", "train.export_final=false",
          "init.from_stage_dir=null", "eval.at_start=false", "eval.at_end=false", "optim.warmup_steps=2",
          "optim.lr=2e-3"]
TIMEOUT = 300


def _run(engine: str, nproc: int, out: Path, *extra: str, **env: str) -> Any:
    args = [*COMMON, f"engine={engine}", f"output_dir={out}", *extra]
    cmd = [sys.executable, "-m", "train", *args] if nproc == 1 else ["bash", "launch/single_node.sh", str(nproc), *args]
    return run_group(cmd, clean_env(drop=() if env else (KILL_ENV,), **env), TIMEOUT)


def _curve(out: Path) -> dict[int, tuple[float, float, float]]:
    curve = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            curve[r["step"]] = (r["loss"], r["lr"], r["grad_norm"])
    return curve


@pytest.mark.slow
def test_resume_1_to_2_to_1_processes_continues_the_loss_curve(tmp_path):
    ref_dir, two, one = tmp_path / "ref", tmp_path / "two", tmp_path / "one"
    p = _run("single", 1, ref_dir)
    assert p.returncode == 0, p.stdout[-4000:]
    ref = _curve(ref_dir)
    assert sorted(ref) == list(range(1, 13)) and ref[12][0] < ref[1][0]
    # 1 -> 2: the single engine's step-4 checkpoint into 2 processes of ZeRO-2; killed after step 9
    p = _run("zero2", 2, two, f"train.resume={ref_dir / 'checkpoints' / 'step_00000004'}", **{KILL_ENV: "9"})
    assert p.returncode != 0
    assert "saved with world size 1 (engine single), resumed with 2 (DeepSpeed ZeRO-2)" in p.stdout, p.stdout[-4000:]
    assert (two / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    # 2 -> 1: the 2-process ZeRO-2 checkpoint of step 8 into 1 process of the single engine
    p = _run("single", 1, one, f"train.resume={two / 'checkpoints'}")
    assert p.returncode == 0, p.stdout[-4000:]
    assert "saved with world size 2 (DeepSpeed ZeRO-2), resumed with 1 (engine single)" in p.stdout, p.stdout[-4000:]
    got = {**{s: v for s, v in _curve(two).items() if s <= 8}, **_curve(one)}
    assert sorted(got) == list(range(5, 13))
    for s in got:  # the curve continues where it was: same loss, LR and grad norm as the uninterrupted run
        assert got[s][0] == pytest.approx(ref[s][0], rel=1e-5, abs=1e-5), (s, got[s], ref[s])
        assert got[s][1] == pytest.approx(ref[s][1], rel=1e-9), (s, got[s], ref[s])
        assert got[s][2] == pytest.approx(ref[s][2], rel=1e-3), (s, got[s], ref[s])
    assert max(got[s][0] for s in got) < ref[1][0]  # not back to the start
