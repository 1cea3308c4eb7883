"""A stream that yields nothing stops with an error naming its sources and skip counts within about one pass
(instead of spinning forever), and a stop signal during a data wait ends the run at once, checkpointing the
last completed step. The blocked data wait is real: a `pipe:cat FIFO` shard whose writer sends nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from launching import HANG_TIMEOUT, ROOT, clean_env, finish_group
from test_img2dataset import CAPTIONS, write_img2dataset_shard

from data.loader import LoaderError
from data.pipeline import build_stage_stream
from data.samples import SampleBuilder

RUN = ["recipe=demo_stage1", "model=micro", "model.vision.image_size=56", "data.seq_len=300",
       "data.demo.enabled=false", "data.buffer_size=0", "logging=quiet", "logging.every=1", "~data.heldout.caption",
       "eval.at_start=false", "eval.at_end=false", "train.export_final=false", "init.from_stage_dir=null",
       "train.micro_batch_size=1", "train.global_batch_size=1", "data.options.pack_buffer=1"]


class _Bounded:
    """The real builder, but a test failure (not a hang) after `limit` calls."""

    def __init__(self, limit: int):
        self.inner, self.calls, self.limit = SampleBuilder(1, None, 56, 300), 0, limit

    def __call__(self, raw):  # noqa: ANN001
        self.calls += 1
        assert self.calls <= self.limit, f"stream still cycling after {self.calls} samples"
        return self.inner(raw)


def test_all_skipped_stream_stops_within_a_pass(tmp_path):
    shard = tmp_path / "00000.tar"
    write_img2dataset_shard(shard, CAPTIONS)  # img2dataset layout, read as the default layout: all skipped
    n = len(CAPTIONS)
    b = _Bounded(5 * n)
    st = build_stage_stream(1, [{"name": "laion", "shards": str(shard)}], image_size=56, seq_len=300, batch_size=2,
                            builder=b, pack_buffer=2)
    with pytest.raises(LoaderError) as e:
        next(st)
    msg = str(e.value)
    assert "no usable sample for a whole pass" in msg and "['laion']" in msg
    assert f"'missing_key': {b.calls}" in msg and "layout" in msg
    assert n <= b.calls <= n + 2  # one pass (+ what was read ahead), not forever

    # one dead source among good ones: a warning, the run goes on
    good = tmp_path / "good.tar"
    write_img2dataset_shard(good, CAPTIONS, shard_id=1)
    b2 = _Bounded(10 * n)
    st = build_stage_stream(1, [{"name": "laion", "shards": str(shard)},
                                {"name": "ok", "shards": str(good), "layout": "img2dataset"}],
                            image_size=56, seq_len=300, batch_size=2, builder=b2, pack_buffer=2)
    batches = [next(st) for _ in range(3)]
    assert all(int(x["segment_ids"].ne(0).sum()) > 0 for x in batches)


def _run(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *RUN, *args], cwd=ROOT, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _finish(p: subprocess.Popen) -> str:
    return finish_group(p, HANG_TIMEOUT, "the run")


def test_cli_run_on_unusable_shards_exits_with_the_reason(tmp_path):
    """The issue's hang: `python -m train recipe=demo_stage1` on img2dataset shards without the layout."""
    d = tmp_path / "laion"
    d.mkdir()
    write_img2dataset_shard(d / "00000.tar", CAPTIONS)
    out = _finish(_run([f"data.sources=[{{name:laion,shards:'{d}'}}]", "train.steps=3",
                        f"output_dir={tmp_path / 'run'}"]))
    err = [ln for ln in out.splitlines() if ln.startswith("[train] error:")]
    assert err, out[-3000:]
    assert "no usable sample for a whole pass" in err[0] and "['laion']" in err[0] and "missing_key" in err[0]
    assert "Traceback" not in out


def test_sigterm_in_a_data_wait_stops_at_once_and_checkpoints_the_last_step(tmp_path):
    """Two `pipe:cat FIFO` shards: the first one read gets a real shard's bytes, the second blocks (its writer
    sends nothing), like a stalled remote read. SIGTERM then ends the run with a checkpoint of the last step."""
    from data.loader import ShardStream

    src = tmp_path / "src.tar"
    write_img2dataset_shard(src, CAPTIONS[:4])
    fifos = [tmp_path / "a.fifo", tmp_path / "b.fifo"]
    for f in fifos:
        os.mkfifo(f)
    specs = [f"pipe:cat {f}" for f in fifos]
    order = ShardStream(specs, name="web", seed=0).shard_order(0)  # the run's epoch-0 order (data.seed=0)
    first, second = (fifos[specs.index(u)] for u in order)
    p = _run([f"data.sources=[{{name:web,shards:'{'::'.join(specs)}',layout:img2dataset}}]", "data.seed=0",
              "train.steps=100000", "train.save_every=0", f"output_dir={tmp_path / 'run'}"])
    try:
        with open(first, "wb") as w:  # returns once the run's first `cat` has opened its FIFO
            w.write(src.read_bytes())
        w2 = open(second, "wb")  # returns once the second shard's `cat` opened it: the run now waits for data
        try:
            p.send_signal(signal.SIGTERM)
            out = _finish(p)
        finally:
            w2.close()  # lets that `cat` see end of file and exit
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out[-3000:]
    assert "received SIGTERM outside a step (waiting for data or evaluating): stopping now" in out, out[-3000:]
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps and steps == list(range(1, len(steps) + 1))
    ck = tmp_path / "run" / "checkpoints"
    latest = (ck / "latest").read_text().strip()
    assert json.loads((ck / latest / "trainer_state.json").read_text())["step"] == steps[-1]
    assert f"after step {steps[-1]}; checkpoint of step {steps[-1]} saved" in out
    done = [ln for ln in out.splitlines() if ln.startswith("[train] done:")]
    assert done and "skipped samples (occurrences, by reason) none" in done[0], out[-2000:]
    assert "Traceback" not in out


def test_stop_request_outside_a_step_raises_inside_one_waits():
    from train.loop import StopNow, StopRequest

    stop = StopRequest()
    try:
        stop.boundary(0, None, {}, [])
        stop.in_step = True
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to this (main) thread before kill() returns
        assert stop.signum == signal.SIGUSR1  # recorded, the step goes on
        stop.signum = None
        stop.in_step = False
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGUSR1)
        # once stopping, a second signal only records (the final checkpoint is not interrupted)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signum == signal.SIGUSR1 and not stop.interruptible
    finally:
        stop.restore()
