"""Remote shards (issue 11 point 3): streaming from a local HTTP server the test starts equals reading the
same shards locally; a connection dropped mid-shard is resumed with a Range request (nothing skipped or
repeated); a transient error that persists is counted as unreadable_shard; exact resume from the HTTP source;
the pipe: rule (only from the user's own spec, never from a manifest, a directory listing or a saved state)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data import remote
from data.loader import LoaderError, ShardStream, build_stream, expand_source, read_refs
from data.shards import ShardWriter

N_SHARDS, PER_SHARD = 3, 6


@pytest.fixture(autouse=True)
def fast_retries():
    """No real waiting between retries (the backoff arithmetic is not what these tests check)."""
    prev = remote.configure(timeout_s=10.0, retries=3, backoff_s=0.0)
    yield
    remote.configure(timeout_s=prev.timeout_s, retries=prev.retries, backoff_s=prev.backoff_s)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """3 shards x 6 caption samples written by the project's ShardWriter (with manifest.json); the image
    bytes are a few KiB so that a connection cut at half a shard falls inside a member."""
    d = tmp_path_factory.mktemp("shards")
    with ShardWriter(d, prefix="r", max_samples=PER_SHARD) as w:
        for i in range(N_SHARDS * PER_SHARD):
            img = b"\xff\xd8\xff" + hashlib.sha256(str(i).encode()).digest() * 128  # ~4 KiB "jpg", distinct
            w.write(f"s{i:03d}", {"task": "caption", "lang": "en", "source": "t", "caption": f"cap {i}"},
                    [("jpg", img)])
    return d


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, ranges: bool = True):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.ranges = root, ranges
        self.drop_once: set[str] = set()  # paths whose next GET sends half the body, then closes
        self.status_once: dict[str, int] = {}  # path -> an error status answered once
        self.status_always: dict[str, int] = {}
        self.stall_once: set[str] = set()  # paths whose next GET sends half the body, then hangs
        self.release = threading.Event()  # ends the hangs (teardown)
        self.log: list[tuple[str, str | None]] = []  # (path, Range header) of every GET
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv, path = self.server, self.path
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((path, rng))
            status = srv.status_always.get(path) or srv.status_once.pop(path, None)
            drop = path in srv.drop_once
            srv.drop_once.discard(path)
            stall = path in srv.stall_once
            srv.stall_once.discard(path)
        file = srv.root / path.lstrip("/")
        if status or not file.is_file():
            self.send_error(status or 404)
            return
        data = file.read_bytes()
        start = 0
        if rng and srv.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
        self.end_headers()
        if drop or stall:  # the connection dies / hangs mid-body: fewer bytes than Content-Length arrive
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            if stall:
                srv.release.wait(60)  # until the client gave up on this connection (its timeout) and the test ended
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(shard_dir) -> Iterator[_Server]:
    srv = _Server(shard_dir)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _pattern(base: str) -> str:
    return f"{base}/r-{{000000..{N_SHARDS - 1:06d}}}.tar"


def _samples(stream) -> list[tuple[str, dict, dict]]:
    return [(s.key, s.meta, s.files) for s in stream]


def _local(shard_dir: Path, **kw) -> list[tuple[str, dict, dict]]:
    return _samples(build_stream(str(shard_dir), **kw))


# ----------------------------------------------------------------------------------------- streaming


def test_http_stream_equals_local(server, shard_dir):
    want = _local(shard_dir, shuffle_shards=False)
    assert len(want) == N_SHARDS * PER_SHARD
    got = _samples(build_stream(_pattern(server.base), shuffle_shards=False))
    assert got == want
    # a manifest served next to the shards: its relative entries resolve on the same server
    assert expand_source(f"{server.base}/manifest.json") == [f"{server.base}/r-{i:06d}.tar" for i in range(N_SHARDS)]
    st = build_stream(f"{server.base}/manifest.json", shuffle_shards=False)
    assert _samples(st) == want and st.skipped == {}


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "server-ignores-range"])
def test_connection_dropped_mid_shard_is_resumed(shard_dir, ranges):
    srv = _Server(shard_dir, ranges=ranges)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        srv.drop_once = {"/r-000001.tar"}
        srv.status_once = {"/r-000002.tar": 503}  # and a transient error status when opening another
        stream = build_stream(_pattern(srv.base), shuffle_shards=False)
        got = _samples(stream)
        assert got == _local(shard_dir, shuffle_shards=False)  # same samples: none skipped, none repeated
        assert stream.skipped == {}
        gets = [r for p, r in srv.log if p == "/r-000001.tar"]
        size = (shard_dir / "r-000001.tar").stat().st_size
        assert gets == [None, f"bytes={size // 2}-"]  # re-requested from the byte offset delivered
        assert [r for p, r in srv.log if p == "/r-000002.tar"] == [None, None]
    finally:
        srv.shutdown()
        srv.server_close()


def test_stalled_connection_times_out_and_is_resumed(server, shard_dir):
    remote.configure(timeout_s=1.0, retries=5)
    server.stall_once = {"/r-000000.tar"}
    stream = build_stream(_pattern(server.base), shuffle_shards=False)
    assert _samples(stream) == _local(shard_dir, shuffle_shards=False) and stream.skipped == {}
    size = (shard_dir / "r-000000.tar").stat().st_size
    assert ("/r-000000.tar", f"bytes={size // 2}-") in server.log  # after the timeout: from the byte reached


def test_persistent_error_skips_the_shard_counted(server, shard_dir):
    server.status_always = {"/r-000001.tar": 503}
    stream = build_stream(_pattern(server.base), shuffle_shards=False)
    got = [k for k, _, _ in _samples(stream)]
    want = [k for k, _, _ in _local(shard_dir, shuffle_shards=False)]
    assert got == want[:PER_SHARD] + want[2 * PER_SHARD:]
    assert stream.skipped == {"unreadable_shard": 1}
    assert sum(p == "/r-000001.tar" for p, _ in server.log) == 1 + remote.settings().retries
    # a permanent error is not retried, and the message names the url and the cause
    server.status_always = {}
    with pytest.raises(remote.RemoteError, match=r"/nope\.tar: HTTP 404"):
        remote.open_url(f"{server.base}/nope.tar")
    assert sum(p == "/nope.tar" for p, _ in server.log) == 1
    # strict mode stops on it
    server.status_always = {"/r-000000.tar": 500}
    with pytest.raises(LoaderError, match=r"r-000000\.tar.*unreadable_shard.*HTTPError.*gave up after 4"):
        next(build_stream(_pattern(server.base), shuffle_shards=False, strict=True))


def test_resume_from_http_source_equals_uninterrupted(server):
    """Shuffled shards, a shuffle buffer, two epochs: stop after k samples (mid-shard), restore the
    JSON-round-tripped state in a fresh stream; the rest equals the uninterrupted run's."""
    spec = f"{server.base}/manifest.json"
    kw = dict(seed=3, epochs=2, buffer_size=4, shuffle_shards=True)
    full = [s.key for s in build_stream(spec, **kw)]
    assert len(full) == 2 * N_SHARDS * PER_SHARD
    for k in (1, 9, 23):
        a = build_stream(spec, **kw)
        head = [next(a).key for _ in range(k)]
        state = json.loads(json.dumps(a.state_dict()))
        assert 0 < state["offset"] or state["shard_pos"] > 0
        b = build_stream(spec, **kw)
        b.load_state_dict(state)
        assert head + [s.key for s in b] == full, k


def test_fsspec_store(shard_dir):
    """Other schemes go through fsspec (its in-memory store stands in for s3/gs here)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for i in range(N_SHARDS):
        fs.pipe(f"/remote-test/r-{i:06d}.tar", (shard_dir / f"r-{i:06d}.tar").read_bytes())
    try:
        got = _samples(build_stream(f"memory://remote-test/r-{{000000..{N_SHARDS - 1:06d}}}.tar",
                                    shuffle_shards=False))
        assert got == _local(shard_dir, shuffle_shards=False)
    finally:
        fs.rm("/remote-test", recursive=True)
    with pytest.raises(LoaderError, match="unknown url scheme 'nosuchstore'"):
        expand_source("nosuchstore://bucket/x.tar")
    if importlib.util.find_spec("s3fs") is None:  # a store whose package is missing: named, at expansion time
        with pytest.raises(LoaderError, match="s3fs"):
            expand_source("s3://bucket/x-{0..1}.tar")


# ------------------------------------------------------------------------------------------ pipe: rule


def test_pipe_spec_from_the_user_works(shard_dir):
    spec = f"pipe:cat {shard_dir}/r-{{000000..{N_SHARDS - 1:06d}}}.tar"
    stream = build_stream(spec, shuffle_shards=False)
    assert _samples(stream) == _local(shard_dir, shuffle_shards=False) and stream.skipped == {}
    # a failing command is an error naming it (counted unreadable), not a silently short shard
    bad = build_stream(f"pipe:cat {shard_dir}/r-000000.tar; echo boom >&2; exit 3", shuffle_shards=False)
    assert len(list(bad)) == PER_SHARD
    assert bad.skipped == {"unreadable_shard": 1}


def test_pipe_entry_in_manifest_is_refused(tmp_path, server, shard_dir):
    marker = tmp_path / "ran"
    d = tmp_path / "evil"
    d.mkdir()
    (d / "r-000000.tar").write_bytes((shard_dir / "r-000000.tar").read_bytes())
    manifest = d / "manifest.json"
    entry = f"pipe:touch {marker}; cat {d}/r-000000.tar"
    manifest.write_text(json.dumps({"shards": [{"name": "r-000000.tar"}, {"name": entry}]}))
    for spec in (d, manifest):
        with pytest.raises(LoaderError) as e:
            ShardStream(spec)
        assert str(manifest) in str(e.value) and entry in str(e.value) and "shards[1]" in str(e.value)
    # a manifest fetched over HTTP: the message names its url
    (shard_dir / "evil.json").write_text(json.dumps({"shards": ["r-000000.tar", entry]}))
    try:
        with pytest.raises(LoaderError, match=re.escape(f"{server.base}/evil.json: shards[1]")):
            expand_source(f"{server.base}/evil.json")
    finally:
        (shard_dir / "evil.json").unlink()
    assert not marker.exists()


def test_pipe_from_saved_state_or_directory_listing_is_refused(tmp_path, shard_dir, monkeypatch):
    marker = tmp_path / "ran"
    # a saved state (checkpoint) naming a pipe: url the config never had: refused, nothing runs
    ref = ["default", f"pipe:touch {marker}; cat {shard_dir}/r-000000.tar", 0, "s000"]
    with pytest.raises(remote.UntrustedPipeError, match="refusing to run"):
        read_refs([ref])
    # a shard FILE named "pipe:..." found by listing a relative directory is a local file, not a command
    d = tmp_path / "listing"
    d.mkdir()
    (d / "pipe:touch ran;.tar").write_bytes(b"not a tar")  # run from `d`, it would create d/ran
    monkeypatch.chdir(d)
    assert expand_source(".") == ["./pipe:touch ran;.tar"]
    stream = build_stream(".")
    assert list(stream) == [] and stream.skipped == {"unreadable_shard": 1}
    assert not marker.exists() and not (d / "ran").exists()


def test_configure_checks_values():
    with pytest.raises(ValueError, match="timeout_s > 0"):
        remote.configure(timeout_s=0)
    assert remote.join("s3://b/d/manifest.json", "x.tar") == "s3://b/d/x.tar"
    assert remote.join("https://h/d/manifest.json", "../e/x.tar") == "https://h/e/x.tar"
    assert remote.local_path("file:///tmp/a%20b.tar") == "/tmp/a b.tar"


# ------------------------------------------------------------------------------------------ end to end

DEMO_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "test-demo-s0.1"  # shared with test_resume.py


@pytest.mark.extended  # ~30 s of CPU (two micro-model runs): over the default suite's budget; make test-extended
def test_train_streams_demo_shards_over_http_and_resumes_exactly(tmp_path):
    """The train loop (micro model, stage 1) reads the demo's pretrain shards from the HTTP server; a run
    resumed from its step-2 checkpoint (fresh stream, the shard re-opened over HTTP and read through to the
    saved position) continues with the uninterrupted run's losses."""
    from data.demo import build_demo
    from train.config import load_config
    from train.loop import train

    build_demo(DEMO_CACHE, seed=0, scale=0.1)  # idempotent; shared with the other demo tests
    srv = _Server(DEMO_CACHE)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        base = ["recipe=demo_stage1", "model=micro", "model.vision.image_size=56", "data.demo.enabled=false",
                f"data.sources.0.shards={srv.base}/pretrain/manifest.json", "data.seq_len=300",
                f"data.heldout.caption={srv.base}/heldout/caption/manifest.json",
                "data.buffer_size=8", "train.steps=4", "train.save_every=2", "train.keep_last=2",
                "train.micro_batch_size=2", "train.global_batch_size=2", "logging=quiet", "eval.at_start=false",
                "eval.at_end=false", "train.export_final=false", "init.from_stage_dir=null"]
        first = train(load_config([*base, f"output_dir={tmp_path / 'a'}"]))
        ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
        second = train(load_config([*base, f"output_dir={tmp_path / 'b'}", f"train.resume={ckpt}"]))
    finally:
        srv.shutdown()
        srv.server_close()
    assert any(p == "/pretrain/pretrain-000000.tar" for p, _ in srv.log)
    assert second["start_step"] == 2 and len(second["losses"]) == 2
    assert second["losses"] == pytest.approx(first["losses"][2:], rel=1e-6)
