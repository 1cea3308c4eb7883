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
from webdataset import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

logger = logging.getLogger(__name__)

STATE_VERSION = 1


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

    def ref(self) -> list[Any]:
        """JSON-able location used to re-read this sample after a restart."""
        return [self.source, self.url, self.index, self.key]


# ----------------------------------------------------------------------------------------- sources


def expand_source(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard list from a brace pattern (``/d/cc-{000000..000123}.tar``, ``::``-joined lists),
    a directory (its ``manifest.json`` if present, else its ``*.tar`` sorted), a manifest path,
    a single shard, or a list of any of these."""
    if not isinstance(spec, (str, os.PathLike)):  # any sequence (list, tuple, OmegaConf ListConfig)
        return [u for s in spec for u in expand_source(s)]
    s = os.fspath(spec)
    if os.path.isdir(s):
        manifest = os.path.join(s, "manifest.json")
        if os.path.isfile(manifest):
            return _manifest_shards(manifest)
        shards = sorted(str(p) for p in Path(s).glob("*.tar"))
        if not shards:
            raise LoaderError(f"{s}: directory has no manifest.json and no *.tar shards")
        return shards
    if s.endswith(".json"):
        return _manifest_shards(s)
    return list(expand_urls(s))


def _manifest_shards(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LoaderError(f"{path}: cannot read shard manifest: {e}") from e
    entries = manifest.get("shards") if isinstance(manifest, dict) else manifest
    if not isinstance(entries, list) or not entries:
        raise LoaderError(f"{path}: manifest has no non-empty 'shards' list")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, e in enumerate(entries):
        name = e if isinstance(e, str) else next((e[k] for k in ("path", "name", "file", "url") if k in e), None)
        if not isinstance(name, str):
            raise LoaderError(f"{path}: shards[{i}] has no path/name/file/url string: {e!r}")
        out.append(name if os.path.isabs(name) or "://" in name or name.startswith("pipe:")
                   else os.path.join(base, name))
    return out


# ------------------------------------------------------------------------------------- tar reading

_READ_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)


class _Shard:
    """Iterates one shard as events: ("group", key, members) or ("bad", reason, member, detail).

    Local files are opened seekable, so skipping groups reads only tar headers; other urls go through
    webdataset's ``gopen`` as a stream (members are then read eagerly)."""

    def __init__(self, url: str):
        self.url = url
        self._local = "://" not in url and not url.startswith("pipe:")
        if self._local:
            self._fobj = open(url, "rb")
            self._tf = tarfile.open(fileobj=self._fobj, mode="r:")
        else:
            self._fobj = gopen.gopen(url, "rb")
            self._tf = tarfile.open(fileobj=self._fobj, mode="r|")

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
            return False
        self._fobj.seek(self._tf.offset)
        tail = self._fobj.read(1024)
        return len(tail) < 1024 or tail.count(0) != 1024

    def events(self) -> Iterator[tuple]:
        key, members, last = None, [], None
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
        # On a cut the pending group is still offered: parsing re-validates it (a truncated member fails
        # to read, a lost json/image is missing), so only complete samples survive.
        if members:
            yield ("group", key, members)
        if error is not None:
            yield ("bad", "truncated_tar", last or "<header>", error)


def _parse_group(shard: _Shard, key: str, members: list, source: str, index: int) -> RawSample | tuple:
    """A RawSample, or (reason, member_name, detail) when the group is unusable."""
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
    if meta_raw is None:
        return ("missing_json", f"{key}.json", f"sample {key!r} has members {[m[0] for m in members]} but no json")
    try:
        meta = json.loads(meta_raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return ("bad_json", f"{key}.json", str(e))
    if not isinstance(meta, dict):
        return ("bad_json", f"{key}.json", f"metadata is {type(meta).__name__}, not an object")
    listed = meta.get("images", [])
    missing = [e for e in listed if e not in files] if isinstance(listed, list) else ["<images not a list>"]
    if missing:
        return ("missing_image", f"{key}.json", f"metadata lists {missing} but the shard has {sorted(files)}")
    return RawSample(key=key, meta=meta, files=files, source=source, url=shard.url, index=index)


def read_refs(refs: Sequence[Sequence[Any]]) -> list[RawSample]:
    """Re-read samples from their saved references ``[source, url, index, key]`` (in the given order);
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
                    src, _, _, key = wanted[idx]
                    s = _parse_group(shard, ev[1], ev[2], src, idx)
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
                 strict: bool = False):
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
        if len(self.urls) < self.n_consumers:
            logger.warning("source %r: %d shards for %d consumers (world_size %d x workers %d); falling back "
                           "to sample-level striding: every consumer reads every shard", name, len(self.urls),
                           self.n_consumers, world_size, num_workers)
        self._skip = _SkipCounter(name, strict)
        self._rng = random.Random()
        self._shard: _Shard | None = None
        self._events: Iterator[tuple] | None = None
        self._start_epoch(0)
        self.yielded = 0

    # ---- order ----
    def shard_order(self, epoch: int) -> list[str]:
        """All shards in this epoch's order (identical on every consumer)."""
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"shards/{self.seed}/{self.name}/{epoch}").shuffle(order)
        return order

    def _plan(self, epoch: int) -> tuple[list[str], bool]:
        order = self.shard_order(epoch)
        if len(order) >= self.n_consumers:
            return order[self.consumer::self.n_consumers], False
        return order, True

    def _start_epoch(self, epoch: int) -> None:
        self._close_shard()
        self.epoch, self.shard_pos, self.offset = epoch, 0, 0
        self.draining, self.epoch_fed = False, 0
        self.buffer: list[RawSample] = []
        self._rng.seed(f"buffer/{self.seed}/{self.name}/{epoch}/{self.rank}/{self.worker}")
        self._shards, self._striding = self._plan(epoch)

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._shard, self._events = None, None

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._skip.counts)

    # ---- reading ----
    def _open_current(self) -> bool:
        url = self._shards[self.shard_pos]
        try:
            self._shard = _Shard(url)
        except _READ_ERRORS as e:
            if not self._striding or self.shard_pos % self.n_consumers == self.consumer:  # count once
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
        while self.shard_pos < len(self._shards):
            if self._events is None and not self._open_current():
                self.shard_pos, self.offset = self.shard_pos + 1, 0
                continue
            ev = next(self._events, None)
            if ev is None:
                self._close_shard()
                self.shard_pos, self.offset = self.shard_pos + 1, 0
                continue
            idx = self.offset
            self.offset += 1
            if self._striding and (self.shard_pos + idx) % self.n_consumers != self.consumer:
                continue
            url = self._shard.url
            if ev[0] == "bad":
                self._skip(ev[1], url, ev[2], ev[3])
                continue
            s = _parse_group(self._shard, ev[1], ev[2], self.name, idx)
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
            self._start_epoch(self.epoch + 1)

    def _out(self, s: RawSample) -> RawSample:
        self.yielded += 1
        return s

    # ---- state ----
    def _fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "shards_sha1": hashlib.sha1("\n".join(self.urls).encode()).hexdigest(),
                "n_shards": len(self.urls), "seed": self.seed, "epochs": self.epochs,
                "buffer_size": self.buffer_size, "shuffle_shards": self.shuffle_shards, "rank": self.rank,
                "world_size": self.world_size, "worker": self.worker, "num_workers": self.num_workers}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: position + shuffle-buffer references + RNG state."""
        return {"version": STATE_VERSION, "config": self._fingerprint(), "epoch": self.epoch,
                "shard_pos": self.shard_pos, "offset": self.offset, "draining": self.draining,
                "epoch_fed": self.epoch_fed, "buffer": [s.ref() for s in self.buffer],
                "rng": _rng_state(self._rng), "skipped": dict(self._skip.counts), "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"source {self.name!r}: state version {state.get('version')} != {STATE_VERSION}")
        mine = self._fingerprint()
        diff = {k: (state["config"].get(k), v) for k, v in mine.items() if state["config"].get(k) != v}
        if diff:
            raise LoaderError(f"source {self.name!r}: saved state does not fit this loader "
                              f"(field: (saved, now)): {diff}")
        self._start_epoch(int(state["epoch"]))
        self.shard_pos, self.offset = int(state["shard_pos"]), int(state["offset"])
        self.draining, self.epoch_fed = bool(state["draining"]), int(state["epoch_fed"])
        self.buffer = read_refs(state["buffer"])
        _set_rng_state(self._rng, state["rng"])
        self._skip.counts = Counter({k: int(v) for k, v in state["skipped"].items()})
        self.yielded = int(state["yielded"])


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


def _close(a: Any, b: Sequence[float]) -> bool:
    return isinstance(a, list) and len(a) == len(b) and all(abs(x - y) < 1e-12 for x, y in zip(a, b))


@dataclass
class SourceSpec:
    """One named shard set with its mixing weight."""

    name: str
    shards: str | list[str]
    weight: float = 1.0


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
        return ShardStream(specs[0].shards, name=specs[0].name, epochs=epochs, **common)
    streams = [ShardStream(s.shards, name=s.name, epochs=None, **common) for s in specs]
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
