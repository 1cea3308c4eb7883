"""Stage pipeline on real shards: bad samples skipped and counted by reason (or raised under strict),
one-pass evaluation streams, and exact resume of packed batches in a fresh process (0 and 2 workers)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.pipeline import SampleError, build_stage_stream
from data.shards import ShardWriter

REPO = Path(__file__).resolve().parents[1]
S = 56  # small images keep decode/resize cheap; the pipeline does not care about the size
WORDS = ("a red cat sits on the warm mat near an open window while two birds sing in the old tree "
         "under a grey sky and the river runs past the quiet town").split()


def _jpeg(seed: int) -> bytes:
    rng = random.Random(seed)
    w, h = rng.randint(24, 72), rng.randint(24, 72)
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


GOOD_IN_BAD_TAR = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pipeline")
    rng = random.Random(0)
    with ShardWriter(root / "cap", prefix="cap", max_samples=8) as w:  # 3 shards
        for i in range(24):
            w.write(f"cap-{i:03d}", {"task": "caption", "lang": "en", "source": "t", "caption": _words(rng, 3, 60)},
                    images=[("jpg", _jpeg(i))])
    with ShardWriter(root / "txt", prefix="txt", max_samples=10) as w:  # 2 shards
        for i in range(20):
            w.write(f"txt-{i:03d}", {"task": "text", "lang": "en", "source": "t", "text": _words(rng, 20, 300)})
    # hand-written tar (ShardWriter refuses bad samples): 5 good captions interleaved with a broken JPEG,
    # a truncated JPEG, a sample missing its 'caption' key and an image without any json
    bad = root / "bad.tar"
    good = iter(range(GOOD_IN_BAD_TAR))

    def cap(key: str, img: bytes, **meta) -> None:
        m = {"task": "caption", "lang": "en", "source": "t", "images": ["img0.jpg"], **meta}
        _add(tf, f"{key}.json", json.dumps(m).encode())
        _add(tf, f"{key}.img0.jpg", img)

    with tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as tf:
        def ok() -> None:
            i = next(good)
            cap(f"good-{i}", _jpeg(100 + i), caption=_words(rng, 3, 40))

        ok()
        cap("bad-broken", b"\xff\xd8\xff" + bytes(range(256)) * 4, caption="broken jpeg")
        ok()
        cap("bad-trunc", _jpeg(200)[:400], caption="truncated jpeg")
        ok()
        cap("bad-nokey", _jpeg(201))  # no 'caption'
        ok()
        _add(tf, "orphan.img0.jpg", _jpeg(202))  # no orphan.json
        ok()
    return {"cap": str(root / "cap"), "txt": str(root / "txt"), "bad": str(bad)}


EXPECTED_SKIPS = {"corrupt_image": 1, "truncated_image": 1, "missing_key": 1, "missing_json": 1}


@pytest.mark.parametrize("pack", [True, False])
def test_bad_samples_are_skipped_and_counted(corpus, pack):
    st = build_stage_stream(2, corpus["bad"], image_size=S, seq_len=1024, batch_size=2, train=False, pack=pack)
    batches = list(st)
    st.close()
    stats = st.stats()
    assert stats["skipped"] == EXPECTED_SKIPS
    assert stats["samples"] == GOOD_IN_BAD_TAR
    assert sum(int(b["n_samples"].sum()) for b in batches) == GOOD_IN_BAD_TAR
    assert sum(b["pixel_values"].shape[0] for b in batches) == GOOD_IN_BAD_TAR
    assert all(b["pixel_values"].shape[1:] == (3, S, S) for b in batches)
    assert stats["real_tokens"] == sum(int((b["segment_ids"] != 0).sum()) for b in batches)
    assert stats["slots"] == sum(b["segment_ids"].numel() for b in batches)
    if pack:
        assert len(batches) == 1 and batches[0]["input_ids"].shape[1] == 1024
        assert stats["rows"] < GOOD_IN_BAD_TAR  # several captions share a row
    else:  # one sample per row, padded to the batch's longest row; the last batch is short
        assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
        assert all(b["n_samples"].tolist() == [1] * b["n_samples"].numel() for b in batches)
        for b in batches:
            longest = int((b["segment_ids"] != 0).sum(1).max())
            assert b["input_ids"].shape[1] == longest


def test_strict_raises_naming_the_sample(corpus):
    st = build_stage_stream(2, corpus["bad"], image_size=S, seq_len=1024, batch_size=1, train=False, pack=False,
                            strict=True)
    with pytest.raises(RuntimeError, match="bad-broken") as ei:
        list(st)
    st.close()
    cause = ei.value.__cause__
    assert isinstance(cause, SampleError) and "corrupt_image" in str(cause) and "bad.tar" in str(cause)


_CHILD = r"""
import json, sys, torch
from data.pipeline import build_stage_stream
cases = json.load(open(sys.argv[1]))
# Run a multi-threaded (OpenMP) op before the worker pool forks, as a trainer does: forked workers must not
# deadlock in libgomp (regression: they hung in tensor pickling until workers were made single-threaded).
torch.set_num_threads(2)
torch.ones(1 << 22).add_(1).sum()
for c in cases:
    st = build_stage_stream(2, c["sources"], **c["kwargs"])
    st.load_state_dict(torch.load(c["state"], weights_only=True))
    batches = [next(st) for _ in range(c["m"])]
    torch.save({"batches": batches, "stats": st.stats()}, c["out"])
    st.close()
"""


def _take(st, n):
    return [next(st) for _ in range(n)]


def test_exact_resume_in_fresh_process(corpus, tmp_path):
    sources = [{"name": "cap", "shards": corpus["cap"], "weight": 2.0},
               {"name": "txt", "shards": corpus["txt"], "weight": 1.0},
               {"name": "bad", "shards": corpus["bad"], "weight": 1.0}]
    cases, expected = [], []
    for workers, n, m in ((0, 3, 4), (2, 5, 3)):
        kwargs = dict(image_size=S, seq_len=1024, batch_size=2, seed=3, buffer_size=6, num_workers=workers,
                      pack_buffer=8)
        with build_stage_stream(2, sources, **kwargs) as st:
            first = _take(st, n)
            state = st.state_dict()
            rest = _take(st, m)
            stats = st.stats()
        assert state["pending"], "the packer buffer must hold samples at the cut (the hard case)"
        if workers:
            assert state["loader"]["pending"], "prefetched samples must be part of the state"
        assert stats["skipped"], "the bad source was read: its skips are counted"
        assert any(int(b["n_samples"].max()) > 1 for b in first + rest)  # rows really are packed
        path = tmp_path / f"state{workers}.pt"
        torch.save(state, path)
        cases.append({"sources": sources, "kwargs": kwargs, "state": str(path), "m": m,
                      "out": str(tmp_path / f"out{workers}.pt")})
        expected.append((rest, stats))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # own session, so a hung child's pool workers can be killed with it instead of lingering
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "cases.json")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("resume child timed out (hung data workers?)")
    assert proc.returncode == 0, err[-3000:]
    for c, (rest, stats) in zip(cases, expected):
        got = torch.load(c["out"], weights_only=True)
        assert len(got["batches"]) == len(rest)
        for g, e in zip(got["batches"], rest):
            assert g.keys() == e.keys()
            for k in e:
                assert g[k].dtype == e[k].dtype and torch.equal(g[k], e[k]), (c["kwargs"]["num_workers"], k)
        assert got["stats"] == stats  # skip counts and token counters continue exactly too


def test_eval_stream_is_one_pass_over_one_source(corpus):
    both = [corpus["cap"], corpus["txt"]]  # a list of shard specs = one source
    with build_stage_stream(2, both, image_size=S, seq_len=2048, batch_size=4, train=False) as st:
        n = sum(int(b["n_samples"].sum()) for b in st)
    assert n == 24 + 20
    mixed = [{"name": "cap", "shards": corpus["cap"]}, {"name": "txt", "shards": corpus["txt"]}]
    with pytest.raises(ValueError, match="one pass of ONE source"):
        build_stage_stream(2, mixed, image_size=S, seq_len=2048, batch_size=4, train=False)


def test_resume_refuses_a_different_pipeline(corpus):
    kwargs = dict(image_size=S, seq_len=1024, batch_size=2, train=False)
    with build_stage_stream(2, corpus["txt"], **kwargs) as st:
        next(st)
        state = st.state_dict()
    with build_stage_stream(2, corpus["txt"], **{**kwargs, "seq_len": 2048}) as other:
        with pytest.raises(ValueError, match="seq_len"):
            other.load_state_dict(state)


def test_batches_hold_uint8_pixels(corpus):
    with build_stage_stream(1, corpus["cap"], image_size=S, seq_len=1024, batch_size=2, train=False) as st:
        b = next(st)
    assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape[1:] == (3, S, S)
    assert b["pixel_values"].shape[0] == int((b["input_ids"] == 151857).sum()) > 0


def test_background_batches_are_the_same_batches_with_exact_state(corpus):
    """prefetch_batches: batches made ahead on a thread are the inline stream's, and state_dict() is that of the
    batches handed out (not of the producer ahead of them): resuming from it continues exactly."""
    sources = [{"name": "cap", "shards": corpus["cap"], "weight": 2.0},
               {"name": "txt", "shards": corpus["txt"], "weight": 1.0}]
    kw = dict(image_size=S, seq_len=1024, batch_size=2, seed=5, buffer_size=4, pack_buffer=6)
    with build_stage_stream(2, sources, **kw) as st:
        ref = _take(st, 6)
    with build_stage_stream(2, sources, **kw) as st:
        _take(st, 3)
        ref_state3 = st.state_dict()
    with build_stage_stream(2, sources, prefetch_batches=3, **kw) as bg:
        got = _take(bg, 3)
        state = bg.state_dict()  # the producer is already ahead (depth 3)
        got += _take(bg, 3)
        assert bg.stats()["batches"] == 6
    assert state == ref_state3
    for g, e in zip(got, ref):
        assert all(torch.equal(g[k], e[k]) for k in e)
    with build_stage_stream(2, sources, prefetch_batches=2, **kw) as bg:
        bg.load_state_dict(state)
        rest = _take(bg, 1)
        # any other attribute acts on the wrapped stream rewound to the caller's position (producer stopped)
        assert bg.counters["batches"] == 4 and bg.state_dict() == bg.stream.state_dict()
        rest += _take(bg, 2)
    for g, e in zip(rest, ref[3:]):
        assert all(torch.equal(g[k], e[k]) for k in e)


class _Counting:
    """A stand-in stream: batches 0, 1, 2, ... (raising at `fail_at`), state = the next index."""

    def __init__(self, n: int, fail_at: int = -1):
        self.i, self.n, self.fail_at, self.closed = 0, n, fail_at, False

    def __next__(self) -> dict:
        if self.i == self.fail_at:
            raise OSError(f"shard read failed at {self.i}")
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"x": torch.tensor(self.i - 1)}

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, st: dict) -> None:
        self.i = st["i"]

    def stats(self) -> dict:
        return {"batches": self.i}

    def close(self) -> None:
        self.closed = True


def test_background_batches_end_errors_and_close():
    from data.prefetch import BackgroundBatches

    bg = BackgroundBatches(_Counting(5), depth=2)
    assert [int(b["x"]) for b in bg] == [0, 1, 2, 3, 4] and bg.state_dict() == {"i": 5}
    bad = BackgroundBatches(_Counting(10, fail_at=3), depth=2)
    assert int(next(bad)["x"]) == 0
    with pytest.raises(OSError, match="failed at 3"):
        list(bad)
    inner = _Counting(1000)
    full = BackgroundBatches(inner, depth=2)
    next(full)  # the producer then fills its queue and waits
    full.close()  # must not hang on the full queue
    assert inner.closed and full.state_dict() == {"i": 1}
