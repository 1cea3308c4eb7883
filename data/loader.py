"""Streaming shard loader: splitting, shuffling, weighted mixing and EXACT resume.

Design (the multi-worker story)
-------------------------------
The sample ORDER is produced by one deterministic state machine per consumer:

* A consumer is ``c = rank * num_workers + worker`` out of ``C = world_size * num_workers``.
* Every epoch the full shard list of a source is shuffled from ``(seed, source, epoch)`` (identical on
  all consumers) and consumer ``c`` takes shards ``order[c::C]``.  With fewer shards than consumers
  every consumer reads every shard and keeps the samples whose ``(shard_pos + sample_idx) % C == c``
  (sample-level striding: nobody is empty, nothing is duplicated).
* A shuffle buffer (reservoir style, flushed at the end of every epoch so epochs stay exact) draws
  from a ``random.Random`` seeded from ``(seed, source, epoch, rank, worker)``.
* ``MixedStream`` picks the source of every sample with its own seeded RNG; each source cycles
  through epochs forever so the ratios hold.

The exact-resume design is "stream in the main process, map in workers": each training rank runs
its stream (``worker=0, num_workers=1``) in its main process and ``ResumableLoader`` sends every raw
sample to a process pool for the expensive map stage (decode/tokenise), returning results in stream
order.  Its ``state_dict()`` is the stream state plus the references (shard url, sample index, key)
of the samples pulled from the stream but not yet handed to the trainer; on restore those are
re-read first.  The shuffle buffer is saved the same way (references, not bytes), and the current
shard is re-opened and its tar headers skipped up to the saved offset (data is not re-read), so
resume is exact without replaying the stream.  ``StreamDataset`` (an ``IterableDataset``) offers
the per-DataLoader-worker split for throughput-only uses (evaluation, throwaway runs); it is not
resumable because torch's prefetching hides which samples reached the trainer.

Resume under another world size (``portable_state`` / ``load_portable``): from the states of ALL old
consumers, per source, the newest epoch any of them reached and the work still owed to it (unread shards,
the unread part of each current shard, whole epochs of a consumer that lagged behind) plus the samples read
but never delivered (shuffle buffers, prefetch, packers: references). Each new consumer takes its share
(``split_work``: the references round robin; whole shard items round robin, or every item cut by sample
striding when there are fewer items than consumers), reads it as the rest of that epoch, then starts the
next epoch under its own split. Over the epoch no sample is delivered twice or missed; its order differs
from an uninterrupted run's.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import random
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.utils.data
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from data import remote
from data.layouts import Layout, convert_img2dataset, layout_from_dict, make_layout, parse_meta
from data.sanity import key_problem

logger = logging.getLogger(__name__)
_STRIDING_SAID: set[tuple[str, int, int]] = set()

STATE_VERSION = 1
REF_CHUNK = 64  # samples re-read by reference are read back this many at a time
# fingerprint fields that may differ when a state is re-split over another world: the consumer, and the
# shuffle buffer's size (its content goes back to the source as references either way)
CONSUMER_FIELDS = ("rank", "world_size", "worker", "num_workers", "buffer_size")


class LoaderError(ValueError):
    """A bad shard / sample in strict mode, or a state that does not fit this loader."""


@dataclass
class RawSample:
    """One undecoded WebDataset sample: ``KEY.json`` parsed into ``meta``; the other members in ``files``."""

    key: str
    meta: dict[str, Any]
    files: dict[str, bytes]  # member extension (e.g. "img0.jpg") -> raw bytes
    source: str  # name of the source (mixing) it came from
    url: str  # shard path / url
    index: int  # ordinal of the sample's group within the shard (its location for resume)
    layout: dict[str, Any] | None = None  # the source's non-default shard layout (data.layouts.Layout.to_dict)

    def ref(self) -> list[Any]:
        """JSON-able location used to re-read this sample after a restart (+ the layout to parse it with,
        only when the source declares one: references of default-layout sources keep their 4 fields)."""
        base: list[Any] = [self.source, self.url, self.index, self.key]
        return base if self.layout is None else [*base, dict(self.layout)]


# ----------------------------------------------------------------------------------------- sources


def expand_source(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard list from a brace pattern (``/d/cc-{000000..000123}.tar``, ``https://h/cc-{0..9}.tar``,
    ``pipe:CMD``, ``::``-joined lists), a directory (its ``manifest.json`` if present, else its ``*.tar``
    sorted), a manifest path or url, a single shard, or a list of any of these.

    The spec is the user's own (config / command line): ``pipe:`` urls expanded from it are trusted to run
    (``data.remote.trust_pipe``); ones read from a manifest are refused (``_manifest_shards``)."""
    if not isinstance(spec, (str, os.PathLike)):  # any sequence (list, tuple, OmegaConf ListConfig)
        return [u for s in spec for u in expand_source(s)]
    s = os.fspath(spec)
    if os.path.isdir(s) and not remote.is_pipe(s):  # "pipe:..." is a command, even where a directory is so named
        manifest = os.path.join(s, "manifest.json")
        if os.path.isfile(manifest):
            return _manifest_shards(manifest)
        # "./" keeps a file named "pipe:..." (or "x://...") in a relative directory a local path, not a url
        shards = sorted(p if remote.local_path(p) == p else os.path.join(".", p)
                        for p in map(str, Path(s).glob("*.tar")))
        if not shards:
            raise LoaderError(f"{s}: directory has no manifest.json and no *.tar shards")
        return shards
    if s.endswith(".json") and not remote.is_pipe(s):  # "pipe:cat x.json" is a command too
        return _manifest_shards(s)
    urls = list(expand_urls(s))
    for u in urls:
        if remote.is_pipe(u):
            remote.trust_pipe(u)  # written by the user (config / command line): allowed to run
            continue
        try:
            remote.check_url(u)  # an unknown scheme or a missing store package fails now, not per shard
        except (ImportError, ValueError) as e:
            raise LoaderError(f"shard spec {s!r}: {e}") from e
    return urls


def _manifest_shards(path: str) -> list[str]:
    """Shard urls listed by a manifest (a local path, a ``file://`` or a remote url); relative entries are
    resolved against the manifest's directory (on the same server / bucket for a remote manifest)."""
    local = remote.local_path(path)
    try:
        if local is not None:
            with open(local, encoding="utf-8") as f:
                manifest = json.load(f)
        else:
            remote.check_url(path)
            manifest = json.loads(remote.read_bytes(path).decode("utf-8"))
    except (OSError, ImportError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LoaderError(f"{path}: cannot read shard manifest: {e}") from e
    entries = manifest.get("shards") if isinstance(manifest, dict) else manifest
    if not isinstance(entries, list) or not entries:
        raise LoaderError(f"{path}: manifest has no non-empty 'shards' list")
    base = os.path.dirname(os.path.abspath(local)) if local is not None else None
    out = []
    for i, e in enumerate(entries):
        name = e if isinstance(e, str) else next((e[k] for k in ("path", "name", "file", "url") if k in e), None)
        if not isinstance(name, str):
            raise LoaderError(f"{path}: shards[{i}] has no path/name/file/url string: {e!r}")
        if remote.is_pipe(name):
            # A manifest ships with the data, so whoever wrote the dataset would choose a shell command run
            # on this machine. Only pipe: is refused: other entries (absolute paths, urls) are only read.
            raise LoaderError(f"{path}: shards[{i}] is a pipe: command ({name!r}); pipe: shards are accepted "
                              "only from your own config or command line (data.sources.N.shards), never from "
                              "a manifest")
        if base is None:
            out.append(remote.join(path, name))
        else:  # urls stay urls; relative names become absolute paths (so none can read as a pipe:/url)
            out.append(name if os.path.isabs(name) or remote.scheme(name) is not None
                       else os.path.join(base, name))
    return out


# ------------------------------------------------------------------------------------- tar reading

_READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


class _Shard:
    """Iterates one shard as events: ("group", key, members) or ("bad", reason, member, detail).

    Local files (plain paths, ``file://``) are opened seekable, so skipping groups reads only tar headers;
    other urls go through ``data.remote.open_url`` (timeout, retries from the byte offset reached, pipe: only
    when trusted) as a stream: members are then read eagerly, and resuming mid-shard reads through the
    groups already consumed."""

    def __init__(self, url: str):
        self.url = url
        path = remote.local_path(url)
        self._local = path is not None
        self._fobj = open(path, "rb") if path is not None else remote.open_url(url)
        try:
            self._tf = tarfile.open(fileobj=self._fobj, mode="r:" if self._local else "r|")
        except BaseException:
            self._fobj.close()  # not a tar: do not leak the file / connection / child process
            raise

    def close(self) -> None:
        try:
            self._tf.close()
        finally:
            self._fobj.close()

    def read(self, member: tuple[str, str, Any]) -> bytes:
        _, name, payload = member
        if isinstance(payload, bytes):
            return payload
        f = self._tf.extractfile(payload)
        if f is None:
            raise LoaderError(f"{self.url}: member {name} is not a regular file")
        return f.read()

    def _truncated_at_end(self) -> bool:
        # tarfile treats a partial header at offset > 0 as end of archive; a complete tar ends with
        # two zero blocks at tf.offset, so anything else means the file was cut.
        if not self._local:
            # A stream cannot seek back: read it to its end instead. That also makes the reader check what
            # only the end tells (an HTTP body shorter than its Content-Length, a pipe: command's exit
            # status: RemoteError), and the archive must reach past both end blocks at tf.offset.
            s = self._tf.fileobj  # tarfile's stream wrapper: its tell() counts the bytes read
            while s.read(1 << 16):
                pass
            return s.tell() < self._tf.offset + 1024
        self._fobj.seek(self._tf.offset)
        tail = self._fobj.read(1024)
        return len(tail) < 1024 or tail.count(0) != 1024

    def events(self) -> Iterator[tuple]:
        key, members, last = None, [], None
        reason = "truncated_tar"
        try:
            for ti in self._tf:
                last = ti.name
                if not ti.isreg():
                    continue
                k, ext = base_plus_ext(ti.name)
                if k is None:
                    yield ("bad", "bad_member_name", ti.name, "no KEY.ext structure")
                    continue
                if k != key and members:
                    yield ("group", key, members)
                    members = []
                key = k
                payload = ti if self._local else self._tf.extractfile(ti).read()
                members.append((ext, ti.name, payload))
            error = "archive ends without end-of-archive blocks" if self._truncated_at_end() else None
        except _READ_ERRORS as e:
            error = f"{type(e).__name__}: {e}"
            # a remote read that failed through every retry: the shard is unreadable (from here on), not cut
            reason = "unreadable_shard" if isinstance(e, remote.RemoteError) else "truncated_tar"
        # On a cut the pending group is still offered: parsing re-validates it (a truncated member fails
        # to read, a lost json/image is missing), so only complete samples survive.
        if members:
            yield ("group", key, members)
        if error is not None:
            yield ("bad", reason, last or "<header>", error)


def _parse_group(shard: _Shard, key: str, members: list, source: str, index: int,
                 layout: Layout | None = None) -> RawSample | tuple:
    """A RawSample, or (reason, member_name, detail) when the group is unusable. `layout`: the source's
    declared shard layout (data.layouts; None = the project's own), converted to the project's here so
    everything downstream (training, cleaning, re-reading by reference) sees one layout."""
    bad_key = key_problem(key)  # "../x" or "/abs/x" would escape any directory a tool writes samples to
    if bad_key:
        return ("bad_member_name", f"{key}.*", bad_key)
    files: dict[str, bytes] = {}
    meta_raw = None
    for m in members:
        ext, name, _ = m
        if ext in files or (ext == "json" and meta_raw is not None):
            return ("duplicate_member", name, f"extension {ext!r} appears twice for key {key!r}")
        try:
            data = shard.read(m)
        except _READ_ERRORS as e:
            return ("unreadable_member", name, f"{type(e).__name__}: {e}")
        if ext == "json":
            meta_raw = data
        else:
            files[ext] = data
    if layout is not None:
        conv = convert_img2dataset(key, meta_raw, files, layout, source)
        if len(conv) == 3:
            return conv
        return RawSample(key=key, meta=conv[0], files=conv[1], source=source, url=shard.url, index=index,
                         layout=layout.to_dict())
    if meta_raw is None:
        return ("missing_json", f"{key}.json", f"sample {key!r} has members {[m[0] for m in members]} but no json")
    meta = parse_meta(key, meta_raw)
    if isinstance(meta, tuple):
        return meta
    listed = meta.get("images", [])
    missing = [e for e in listed if e not in files] if isinstance(listed, list) else ["<images not a list>"]
    if missing:
        return ("missing_image", f"{key}.json", f"metadata lists {missing} but the shard has {sorted(files)}")
    return RawSample(key=key, meta=meta, files=files, source=source, url=shard.url, index=index)


def read_refs(refs: Sequence[Sequence[Any]]) -> list[RawSample]:
    """Re-read samples from their saved references ``[source, url, index, key(, layout)]`` (in the given order);
    each shard is opened once and scanned only up to the largest index needed."""
    by_url: dict[str, dict[int, list[Any]]] = {}
    for r in refs:
        by_url.setdefault(r[1], {})[int(r[2])] = r
    found: dict[tuple[str, int], RawSample] = {}
    for url, wanted in by_url.items():
        shard = _Shard(url)
        try:
            last = max(wanted)
            for idx, ev in enumerate(shard.events()):
                if idx in wanted and ev[0] == "group":
                    r = wanted[idx]
                    src, key = r[0], r[3]
                    layout = layout_from_dict(r[4]) if len(r) > 4 else None  # see RawSample.ref
                    s = _parse_group(shard, ev[1], ev[2], src, idx, layout)
                    if not isinstance(s, RawSample) or s.key != key:
                        raise LoaderError(f"{url}: saved sample #{idx} {key!r} cannot be re-read "
                                          f"({s if not isinstance(s, RawSample) else 'key is now ' + s.key}); "
                                          "did the shard change since the checkpoint?")
                    found[(url, idx)] = s
                if idx >= last:
                    break
        finally:
            shard.close()
    out = []
    for r in refs:
        s = found.get((r[1], int(r[2])))
        if s is None:
            raise LoaderError(f"{r[1]}: saved sample #{r[2]} {r[3]!r} not found; did the shard change?")
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------ stream


def _item(url: str, *, start: int = 0, stride: int = 1, residue: int = 0, count_errors: bool = True) -> dict[str, Any]:
    return {"url": url, "start": start, "stride": stride, "residue": residue, "count_errors": count_errors}


def split_work(items: Sequence[dict[str, Any]], refs: Sequence[Sequence[Any]], consumer: int,
               n_consumers: int) -> list[dict[str, Any]]:
    """This consumer's share of re-split work: every `n_consumers`-th reference (first, they were next in
    line), then whole shard items round robin when there are enough to go round, else every shard item
    cut by sample striding (each consumer reads the shard, keeping its own residue class)."""
    c, n = consumer, n_consumers
    mine: list[dict[str, Any]] = []
    all_refs = [list(r) for r in refs] + [list(r) for it in items if "refs" in it for r in it["refs"]]
    if all_refs[c::n]:
        mine.append({"refs": all_refs[c::n]})
    shards = [it for it in items if "refs" not in it]
    if len(shards) >= n:
        mine += [dict(it) for it in shards[c::n]]
    else:
        for it in shards:
            stride, residue = int(it.get("stride", 1)), int(it.get("residue", 0))
            mine.append(_item(it["url"], start=int(it.get("start", 0)), stride=stride * n, residue=residue + c * stride,
                              count_errors=bool(it.get("count_errors", True)) and c == 0))
    return mine


def _rng_state(rng: random.Random) -> list[Any]:
    v, internal, gauss = rng.getstate()
    return [v, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: Sequence[Any]) -> None:
    rng.setstate((int(state[0]), tuple(int(x) for x in state[1]), state[2]))


class _SkipCounter:
    """Counts skips by reason and logs the first of every reason; strict mode raises instead."""

    def __init__(self, name: str, strict: bool):
        self.name, self.strict = name, strict
        self.counts: Counter[str] = Counter()

    def __call__(self, reason: str, url: str, member: str, detail: str) -> None:
        if self.strict:
            raise LoaderError(f"{url}: member {member}: {reason}: {detail}")
        if self.counts[reason] == 0:
            logger.warning("source %r: skipping %s in %s: %s (%s); further %r skips are only counted",
                           self.name, member, url, reason, detail, reason)
        self.counts[reason] += 1


class ShardStream:
    """Deterministic, resumable iterator of ``RawSample`` over one source's shards for one consumer.

    ``epochs=None`` cycles forever (reshuffling shards every epoch); ``epochs=N`` stops after N.
    ``buffer_size <= 1`` disables sample shuffling. Iterating continues from the current state."""

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *, name: str = "default",
                 seed: int = 0, epochs: int | None = 1, buffer_size: int = 0, shuffle_shards: bool = True,
                 rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1,
                 strict: bool = False, layout: Layout | None = None):
        self.layout = layout  # data.layouts: None = the project's own shard layout
        self.urls = expand_source(shards)
        if not self.urls:
            raise LoaderError(f"source {name!r}: empty shard list from {shards!r}")
        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise LoaderError(f"source {name!r}: bad consumer rank={rank}/{world_size} worker={worker}/{num_workers}")
        if epochs is not None and epochs < 1:
            raise LoaderError(f"source {name!r}: epochs must be >= 1 or None (infinite), got {epochs}")
        self.name, self.seed, self.epochs = name, int(seed), epochs
        self.buffer_size, self.shuffle_shards, self.strict = int(buffer_size), shuffle_shards, strict
        self.rank, self.world_size, self.worker, self.num_workers = rank, world_size, worker, num_workers
        self.n_consumers = world_size * num_workers
        self.consumer = rank * num_workers + worker
        if len(self.urls) < self.n_consumers and (name, len(self.urls), self.n_consumers) not in _STRIDING_SAID:
            # said once per source and split per process: streams are rebuilt (evaluation, resume, workers)
            _STRIDING_SAID.add((name, len(self.urls), self.n_consumers))
            logger.info("source %r: %d shards for %d consumers (world_size %d x workers %d): sample-level "
                        "striding (every consumer reads every shard, keeping every n-th sample)", name,
                        len(self.urls), self.n_consumers, world_size, num_workers)
        self._skip = _SkipCounter(name, strict)
        self._rng = random.Random()
        self._shard: _Shard | None = None
        self._events: Iterator[tuple] | None = None
        self._ref_cache: deque[RawSample] = deque()
        self._start_epoch(0)
        self.yielded = 0
        # samples yielded by the last complete (not re-split) epoch: the size of a pass, which a consumer
        # downstream (data.pipeline) uses to tell "no usable sample in a whole pass"; None until one ends
        self.last_pass: int | None = None

    # ---- order ----
    def shard_order(self, epoch: int) -> list[str]:
        """All shards in this epoch's order (identical on every consumer)."""
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"shards/{self.seed}/{self.name}/{epoch}").shuffle(order)
        return order

    def plan(self, epoch: int, consumer: int | None = None, n_consumers: int | None = None) -> list[dict[str, Any]]:
        """The work items of `consumer` (default: this one) out of `n_consumers` in `epoch`. An item is a shard
        ``{"url", "start", "stride", "residue", "count_errors"}`` (read groups ``i >= start`` with
        ``i % stride == residue``; `count_errors`: this consumer reports the shard unreadable) or, after a
        re-split, ``{"refs": [...]}`` (samples re-read by reference)."""
        c = self.consumer if consumer is None else consumer
        n = self.n_consumers if n_consumers is None else n_consumers
        order = self.shard_order(epoch)
        if len(order) >= n:
            return [_item(u) for u in order[c::n]]
        # fewer shards than consumers: everyone reads every shard, keeping (shard_pos + i) % n == c
        return [_item(u, stride=n, residue=(c - pos) % n, count_errors=pos % n == c) for pos, u in enumerate(order)]

    def _start_epoch(self, epoch: int, items: list[dict[str, Any]] | None = None) -> None:
        self._close_shard()
        self.epoch, self.shard_pos = epoch, 0
        self.draining, self.epoch_fed = False, 0
        self.buffer: list[RawSample] = []
        self._rng.seed(f"buffer/{self.seed}/{self.name}/{epoch}/{self.rank}/{self.worker}")
        self._resplit = items  # an explicit plan (the rest of an epoch re-split over a new world) or None
        self._items = self.plan(epoch) if items is None else items
        self.offset = self._item_start(0)

    def _item_start(self, pos: int) -> int:
        return int(self._items[pos].get("start", 0)) if pos < len(self._items) else 0

    def _next_item(self) -> None:
        self._close_shard()
        self.shard_pos += 1
        self.offset = self._item_start(self.shard_pos)

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._shard, self._events = None, None
        self._ref_cache.clear()

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._skip.counts)

    # ---- reading ----
    def _open_current(self) -> bool:
        item = self._items[self.shard_pos]
        url = item["url"]
        try:
            self._shard = _Shard(url)
        except _READ_ERRORS as e:
            if item.get("count_errors", True):  # striding: one consumer counts it
                self._skip("unreadable_shard", url, "<shard>", f"{type(e).__name__}: {e}")
            return False
        self._events = self._shard.events()
        for _ in range(self.offset):  # resume: skip headers of groups already consumed
            if next(self._events, None) is None:
                raise LoaderError(f"{url}: shard has fewer than {self.offset} samples saved as consumed; "
                                  "did it change since the checkpoint?")
        return True

    def _read_next(self) -> RawSample | None:
        """Next sample of this consumer in shard order, or None when the epoch's shards are done."""
        while self.shard_pos < len(self._items):
            item = self._items[self.shard_pos]
            if "refs" in item:  # re-split leftovers of another world: read back by reference, a chunk at a time
                refs = item["refs"]
                if self.offset >= len(refs):
                    self._next_item()
                    continue
                if not self._ref_cache:
                    self._ref_cache.extend(read_refs(refs[self.offset:self.offset + REF_CHUNK]))
                self.offset += 1
                return self._ref_cache.popleft()
            if self._events is None and not self._open_current():
                self._next_item()
                continue
            ev = next(self._events, None)
            if ev is None:
                self._next_item()
                continue
            idx = self.offset
            self.offset += 1
            stride = int(item.get("stride", 1))
            if stride > 1 and idx % stride != int(item.get("residue", 0)):
                continue
            url = self._shard.url
            if ev[0] == "bad":
                self._skip(ev[1], url, ev[2], ev[3])
                continue
            s = _parse_group(self._shard, ev[1], ev[2], self.name, idx, self.layout)
            if isinstance(s, RawSample):
                return s
            self._skip(s[0], url, s[1], s[2])
        return None

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> RawSample:
        while True:
            if not self.draining:
                s = self._read_next()
                if s is None:
                    self.draining = True
                    continue
                self.epoch_fed += 1
                if self.buffer_size <= 1:
                    return self._out(s)
                if len(self.buffer) < self.buffer_size:
                    self.buffer.append(s)
                    continue
                j = self._rng.randrange(self.buffer_size)
                out, self.buffer[j] = self.buffer[j], s
                return self._out(out)
            if self.buffer:
                j = self._rng.randrange(len(self.buffer))
                out = self.buffer[j]
                self.buffer[j] = self.buffer[-1]
                self.buffer.pop()
                return self._out(out)
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                self._close_shard()
                raise StopIteration
            if self.epochs is None and self.epoch_fed == 0:
                raise LoaderError(f"source {self.name!r}: consumer {self.consumer} got no usable sample in a "
                                  f"whole epoch (skipped: {self.skipped}); refusing to cycle forever")
            if self._resplit is None:
                self.last_pass = self.epoch_fed
            self._start_epoch(self.epoch + 1)

    def _out(self, s: RawSample) -> RawSample:
        self.yielded += 1
        return s

    # ---- state ----
    def _fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "shards_sha1": hashlib.sha1("\n".join(self.urls).encode()).hexdigest(),
                "n_shards": len(self.urls), "seed": self.seed, "epochs": self.epochs,
                "buffer_size": self.buffer_size, "shuffle_shards": self.shuffle_shards, "rank": self.rank,
                "world_size": self.world_size, "worker": self.worker, "num_workers": self.num_workers,
                # only when declared: states of default-layout sources keep their fingerprint
                **({"layout": self.layout.to_dict()} if self.layout is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: position + shuffle-buffer references + RNG state (+ the explicit plan of
        an epoch re-split over a new world size; ``"plan"`` is None otherwise)."""
        return {"version": STATE_VERSION, "config": self._fingerprint(), "epoch": self.epoch,
                "shard_pos": self.shard_pos, "offset": self.offset, "draining": self.draining,
                "epoch_fed": self.epoch_fed, "buffer": [s.ref() for s in self.buffer],
                "rng": _rng_state(self._rng), "skipped": dict(self._skip.counts), "yielded": self.yielded,
                "plan": self._resplit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"source {self.name!r}: state version {state.get('version')} != {STATE_VERSION}")
        mine = self._fingerprint()
        diff = {k: (state["config"].get(k), v) for k, v in mine.items() if state["config"].get(k) != v}
        if diff:
            raise LoaderError(f"source {self.name!r}: saved state does not fit this loader "
                              f"(field: (saved, now)): {diff}")
        self._start_epoch(int(state["epoch"]), state.get("plan"))
        self.shard_pos, self.offset = int(state["shard_pos"]), int(state["offset"])
        self.draining, self.epoch_fed = bool(state["draining"]), int(state["epoch_fed"])
        self.buffer = read_refs(state["buffer"])
        _set_rng_state(self._rng, state["rng"])
        self._skip.counts = Counter({k: int(v) for k, v in state["skipped"].items()})
        self.yielded = int(state["yielded"])

    # ---- re-split over another world size ----
    def _check_portable_source(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"source {self.name!r}: state version {state.get('version')} != {STATE_VERSION}")
        mine = self._fingerprint()
        diff = {k: (state["config"].get(k), v) for k, v in mine.items()
                if k not in CONSUMER_FIELDS and state["config"].get(k) != v}
        if diff:
            raise LoaderError(f"source {self.name!r}: saved state does not fit this loader even across world sizes "
                              f"(field: (saved, now)): {diff}")

    def _left_in_epoch(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """What one consumer's saved state has not read yet of its current epoch (not its shuffle buffer)."""
        cfg = state["config"]
        c, n = cfg["rank"] * cfg["num_workers"] + cfg["worker"], cfg["world_size"] * cfg["num_workers"]
        items = state.get("plan") or self.plan(int(state["epoch"]), c, n)
        pos, off = int(state["shard_pos"]), int(state["offset"])
        if state["draining"] or pos >= len(items):
            return []
        cur = dict(items[pos])
        if "refs" in cur:
            cur["refs"] = cur["refs"][off:]
        else:
            cur["start"] = off
        return [cur, *[dict(it) for it in items[pos + 1:]]]

    def portable_state(self, states: Sequence[dict[str, Any]], returned: Sequence[Sequence[Any]] = ()) -> dict[str, Any]:
        """The world-size-independent position of this source from EVERY consumer's saved state: the epoch
        (the newest any consumer reached) and the work that still belongs to it or to an older one (unread
        shard items, unread parts of the current shards; shuffle-buffer samples and `returned` ones, i.e.
        read ahead but never delivered, as references). ``load_portable`` takes one consumer's share."""
        if not states:
            raise LoaderError(f"source {self.name!r}: no saved consumer state to re-split")
        for st in states:
            self._check_portable_source(st)
        n = states[0]["config"]["world_size"] * states[0]["config"]["num_workers"]
        seen = sorted(st["config"]["rank"] * st["config"]["num_workers"] + st["config"]["worker"] for st in states)
        if seen != list(range(n)):
            raise LoaderError(f"source {self.name!r}: need the state of all {n} saved consumers, got {seen}")
        newest = max(int(st["epoch"]) for st in states)
        items: list[dict[str, Any]] = []
        refs: list[list[Any]] = [list(r) for r in returned]
        for st in sorted(states, key=lambda st: (st["config"]["rank"], st["config"]["worker"])):
            cfg = st["config"]
            c = cfg["rank"] * cfg["num_workers"] + cfg["worker"]
            items += self._left_in_epoch(st)
            for e in range(int(st["epoch"]) + 1, newest + 1):  # a consumer behind the others owes whole epochs
                items += self.plan(e, c, n)
            refs += [list(r) for r in st["buffer"]]
        skipped: Counter[str] = Counter()
        for st in states:
            skipped.update({k: int(v) for k, v in st["skipped"].items()})
        return {"version": STATE_VERSION, "kind": "shards", "name": self.name, "epoch": newest, "items": items,
                "refs": refs, "skipped": dict(skipped), "yielded": sum(int(st["yielded"]) for st in states),
                "from_consumers": n, "buffered": sum(len(st["buffer"]) for st in states)}

    def load_portable(self, portable: dict[str, Any]) -> None:
        """Continue from a ``portable_state``: this consumer's share of the epoch's remaining work first
        (``split_work``), then the following epochs under this stream's own split. Counters (skips,
        yielded) go to consumer 0."""
        if portable.get("kind") != "shards" or portable.get("name") != self.name:
            raise LoaderError(f"source {self.name!r}: portable state is for {portable.get('kind')} "
                              f"{portable.get('name')!r}")
        items = split_work(portable["items"], portable["refs"], self.consumer, self.n_consumers)
        self._start_epoch(int(portable["epoch"]), items)
        self._rng.seed(f"buffer/{self.seed}/{self.name}/{self.epoch}/{self.rank}/{self.worker}/resplit/"
                       f"{portable['from_consumers']}->{self.n_consumers}")
        self.epoch_fed = 1  # "no usable sample in a whole epoch" needs a whole epoch: not this partial one
        first = self.consumer == 0
        self._skip.counts = Counter({k: int(v) for k, v in portable["skipped"].items()} if first else {})
        self.yielded = int(portable["yielded"]) if first else 0


class MixedStream:
    """Weighted mixture of infinite ``ShardStream``s; the source of every sample is drawn from a seeded RNG."""

    def __init__(self, streams: Sequence[ShardStream], weights: Sequence[float], *, seed: int = 0,
                 rank: int = 0, worker: int = 0):
        if len(streams) != len(weights) or not streams:
            raise LoaderError(f"need one weight per source: {len(streams)} sources, {len(weights)} weights")
        names = [s.name for s in streams]
        if len(set(names)) != len(names):
            raise LoaderError(f"source names must be unique: {names}")
        bad = [(n, w) for n, w in zip(names, weights) if not w >= 0]
        if bad or sum(weights) <= 0:
            raise LoaderError(f"weights must be >= 0 with a positive sum: {dict(zip(names, weights))}")
        finite = [s.name for s in streams if s.epochs is not None]
        if finite:
            raise LoaderError(f"mixed sources must be infinite (epochs=None) so ratios hold: {finite}")
        self.streams = list(streams)
        self.names = names
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self._cum = []
        acc = 0.0
        for w in self.weights:
            acc += w
            self._cum.append(acc)
        self.seed, self.rank, self.worker = seed, rank, worker
        self._rng = random.Random(f"mix/{seed}/{rank}/{worker}")
        self.counts: Counter[str] = Counter({n: 0 for n in names})

    def __iter__(self) -> MixedStream:
        return self

    def __next__(self) -> RawSample:
        # bisect on cumulative weights (not rng.choices) so the float arithmetic is ours and fixed
        i = min(bisect.bisect_right(self._cum, self._rng.random() * self._cum[-1]), len(self._cum) - 1)
        s = next(self.streams[i])
        self.counts[self.names[i]] += 1
        return s

    @property
    def skipped(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.streams:
            total.update(s.skipped)
        return dict(total)

    def realised(self) -> dict[str, float]:
        """Fraction of samples drawn from each source so far."""
        n = sum(self.counts.values())
        return {k: (v / n if n else 0.0) for k, v in self.counts.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "mixed", "names": self.names, "weights": self.weights,
                "seed": self.seed, "rank": self.rank, "worker": self.worker, "rng": _rng_state(self._rng),
                "counts": dict(self.counts), "sources": {s.name: s.state_dict() for s in self.streams}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"names": self.names, "seed": self.seed, "rank": self.rank, "worker": self.worker}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if state.get("kind") != "mixed" or diff or not _close(state.get("weights"), self.weights):
            raise LoaderError(f"mixed state does not fit this loader (field: (saved, now)): {diff or 'weights/kind'}")
        _set_rng_state(self._rng, state["rng"])
        self.counts = Counter({k: int(v) for k, v in state["counts"].items()})
        for s in self.streams:
            s.load_state_dict(state["sources"][s.name])

    def portable_state(self, states: Sequence[dict[str, Any]],
                       returned: Sequence[Sequence[Any]] = ()) -> dict[str, Any]:
        """``ShardStream.portable_state`` per source (references in `returned` go to their source)."""
        for st in states:
            if st.get("kind") != "mixed" or st.get("names") != self.names or st.get("seed") != self.seed \
                    or not _close(st.get("weights"), self.weights):
                raise LoaderError(f"mixed state does not fit this loader (names/seed/weights): saved "
                                  f"{st.get('names')} seed {st.get('seed')}, now {self.names} seed {self.seed}")
        by_source: dict[str, list[Any]] = {n: [] for n in self.names}
        for r in returned:
            if r[0] not in by_source:
                raise LoaderError(f"saved sample reference {r!r} names source {r[0]!r}, not one of {self.names}")
            by_source[r[0]].append(r)
        counts: Counter[str] = Counter()
        for st in states:
            counts.update({k: int(v) for k, v in st["counts"].items()})
        return {"version": STATE_VERSION, "kind": "mixed", "names": self.names, "counts": dict(counts),
                "sources": {s.name: s.portable_state([st["sources"][s.name] for st in states], by_source[s.name])
                            for s in self.streams}}

    def load_portable(self, portable: dict[str, Any]) -> None:
        """Each source takes its share; the source-choice RNG restarts from (seed, rank, draws so far): the old
        ranks' choice sequences cannot be continued by a different number of ranks."""
        if portable.get("kind") != "mixed" or portable.get("names") != self.names:
            raise LoaderError(f"portable state is for {portable.get('kind')} {portable.get('names')}, "
                              f"this loader mixes {self.names}")
        drawn = sum(int(v) for v in portable["counts"].values())
        self._rng = random.Random(f"mix/{self.seed}/{self.rank}/{self.worker}/after/{drawn}")
        first = self.rank == 0 and self.worker == 0
        self.counts = Counter({n: int(portable["counts"].get(n, 0)) if first else 0 for n in self.names})
        for s in self.streams:
            s.load_portable(portable["sources"][s.name])


def _close(a: Any, b: Sequence[float]) -> bool:
    return isinstance(a, list) and len(a) == len(b) and all(abs(x - y) < 1e-12 for x, y in zip(a, b))


@dataclass
class SourceSpec:
    """One named shard set with its mixing weight and shard layout (data.layouts)."""

    name: str
    shards: str | list[str]
    weight: float = 1.0
    layout: str = "qwenvl"  # qwenvl | img2dataset
    caption_from: str = "txt"  # img2dataset: txt | json:FIELD
    task: str = "caption"  # img2dataset: the task of every sample
    lang: str | None = None  # img2dataset: en | zh | None (detected per sample)

    def shard_layout(self) -> Layout | None:
        try:
            return make_layout(self.name, self.layout, self.caption_from, self.task, self.lang)
        except ValueError as e:
            raise LoaderError(str(e)) from None


def build_stream(sources: str | Sequence[SourceSpec | dict[str, Any]], *, seed: int = 0,
                 epochs: int | None = 1, buffer_size: int = 0, shuffle_shards: bool = True, rank: int = 0,
                 world_size: int = 1, worker: int = 0, num_workers: int = 1,
                 strict: bool = False) -> ShardStream | MixedStream:
    """A single ``ShardStream`` for one source (a shard spec or one ``SourceSpec``), else a
    ``MixedStream`` whose sources are infinite (``epochs`` is ignored for mixtures)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [SourceSpec("default", os.fspath(sources))]
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in sources]
    common = dict(seed=seed, buffer_size=buffer_size, shuffle_shards=shuffle_shards, rank=rank,
                  world_size=world_size, worker=worker, num_workers=num_workers, strict=strict)
    if len(specs) == 1:
        return ShardStream(specs[0].shards, name=specs[0].name, epochs=epochs, layout=specs[0].shard_layout(),
                           **common)
    streams = [ShardStream(s.shards, name=s.name, epochs=None, layout=s.shard_layout(), **common) for s in specs]
    return MixedStream(streams, [s.weight for s in specs], seed=seed, rank=rank, worker=worker)


# ------------------------------------------------------------------------------ training-loop glue


class ResumableLoader:
    """What the training loop iterates: runs ``map_fn`` (decode/tokenise) on ``num_workers`` processes
    (0 = inline) while keeping stream order, and checkpoints exactly the samples handed out.

    ``map_fn`` must be picklable when ``num_workers > 0``; returning None drops the sample (counted in
    ``skipped['map_rejected']``). ``state_dict()`` = stream state + references of prefetched samples."""

    def __init__(self, stream: ShardStream | MixedStream, map_fn: Callable[[RawSample], Any] | None = None, *,
                 num_workers: int = 0, prefetch: int | None = None, mp_context: Any = None):
        self.stream, self.map_fn = stream, map_fn
        self.num_workers = num_workers
        self.prefetch = (prefetch if prefetch is not None else 4 * num_workers) if num_workers > 0 else 0
        self._pool = (ProcessPoolExecutor(num_workers, mp_context=mp_context)
                      if num_workers > 0 and map_fn is not None else None)
        self._pending: deque[tuple[RawSample, Future | None]] = deque()
        self._replay: deque[RawSample] = deque()
        self._exhausted = False
        self.delivered: Counter[str] = Counter()
        self.map_rejected = 0

    @property
    def skipped(self) -> dict[str, int]:
        out = Counter(self.stream.skipped)
        if self.map_rejected:
            out["map_rejected"] = self.map_rejected
        return dict(out)

    def _pull(self) -> RawSample | None:
        if self._replay:
            return self._replay.popleft()
        if self._exhausted:
            return None
        try:
            return next(self.stream)
        except StopIteration:
            self._exhausted = True
            return None

    def __iter__(self) -> Iterator[Any]:
        while True:
            while len(self._pending) <= self.prefetch:
                s = self._pull()
                if s is None:
                    break
                self._pending.append((s, self._pool.submit(self.map_fn, s) if self._pool else None))
            if not self._pending:
                return
            s, fut = self._pending.popleft()
            try:
                out = fut.result() if fut is not None else (self.map_fn(s) if self.map_fn else s)
            except Exception as e:
                raise RuntimeError(f"map_fn failed on sample {s.key!r} ({s.url} #{s.index})") from e
            if out is None:
                self.map_rejected += 1
                continue
            self.delivered[s.source] += 1
            yield out

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "stream": self.stream.state_dict(),
                "pending": [s.ref() for s, _ in self._pending] + [s.ref() for s in self._replay],
                "delivered": dict(self.delivered), "map_rejected": self.map_rejected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for _, fut in self._pending:
            if fut is not None:
                fut.cancel()
        self._pending.clear()
        self._exhausted = False
        self.stream.load_state_dict(state["stream"])
        self._replay = deque(read_refs(state["pending"]))
        self.delivered = Counter({k: int(v) for k, v in state["delivered"].items()})
        self.map_rejected = int(state["map_rejected"])

    def portable_state(self, states: Sequence[dict[str, Any]],
                       returned: Sequence[Sequence[Any]] = ()) -> dict[str, Any]:
        """World-size-independent state from every rank's ``state_dict()``: prefetched samples (and `returned`
        ones, e.g. a packer's) go back to their source as references (see ``ShardStream.portable_state``)."""
        pending = [list(r) for st in states for r in st["pending"]]
        back = [list(r) for r in returned] + pending
        stream_states = [st["stream"] for st in states]
        if isinstance(self.stream, MixedStream):
            sp = self.stream.portable_state(stream_states, back)
        else:
            wrong = [r for r in back if r[0] != self.stream.name]
            if wrong:
                raise LoaderError(f"saved sample reference {wrong[0]!r} is not from source {self.stream.name!r}")
            sp = self.stream.portable_state(stream_states, back)
        delivered: Counter[str] = Counter()
        for st in states:
            delivered.update({k: int(v) for k, v in st["delivered"].items()})
        return {"version": STATE_VERSION, "kind": "resumable", "stream": sp, "delivered": dict(delivered),
                "map_rejected": sum(int(st["map_rejected"]) for st in states), "prefetched": len(pending)}

    def load_portable(self, portable: dict[str, Any]) -> None:
        for _, fut in self._pending:
            if fut is not None:
                fut.cancel()
        self._pending.clear()
        self._replay.clear()
        self._exhausted = False
        self.stream.load_portable(portable["stream"])
        first = self.stream.rank == 0 and self.stream.worker == 0
        self.delivered = Counter({k: int(v) for k, v in portable["delivered"].items()} if first else {})
        self.map_rejected = int(portable["map_rejected"]) if first else 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ResumableLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class StreamDataset(torch.utils.data.IterableDataset):
    """Per-DataLoader-worker split (consumer = rank * num_workers + worker) for throughput-only uses;
    not resumable (use ``ResumableLoader`` for training). Arguments are those of ``build_stream``."""

    def __init__(self, sources: str | Sequence[SourceSpec | dict[str, Any]], **kwargs: Any):
        super().__init__()
        self.sources, self.kwargs = sources, kwargs

    def __iter__(self) -> Iterator[RawSample]:
        info = torch.utils.data.get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter(build_stream(self.sources, worker=worker, num_workers=n, **self.kwargs))


def raw_collate(batch: Iterable[RawSample]) -> list[RawSample]:
    """DataLoader collate_fn that keeps raw samples as a list."""
    return list(batch)


__all__ = ["LoaderError", "RawSample", "SourceSpec", "ShardStream", "MixedStream", "ResumableLoader",
           "StreamDataset", "build_stream", "expand_source", "read_refs", "raw_collate"]
