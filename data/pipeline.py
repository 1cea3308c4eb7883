"""Stage data pipeline: shards -> raw samples -> Samples (decode/tokenise in a process pool) -> packed batches.

``build_stage_stream(stage, sources, ...)`` wires ``data.loader.build_stream`` -> ``ResumableLoader`` (which
runs the ``SampleBuilder`` on ``num_workers`` processes, keeping stream order) -> ``data.packing.Packer`` ->
``collate_rows``. The result, ``StageStream``, is what the training loop iterates.

Exact resume: between two batches the only state outside the loader is the packer's buffer of pending
samples. ``state_dict()`` stores the loader state (stream position, shuffle buffer and prefetched samples, as
references) plus the references of the pending samples in arrival order; ``load_state_dict()`` re-reads those
with ``read_refs`` and runs them through the same (deterministic) ``SampleBuilder`` again, so the packer
holds exactly what it held and the next batches equal the uninterrupted stream's. The state is plain
Python data (lists, dicts, ints, strs), so ``torch.load(weights_only=True)`` reads it back.

Bad samples: the loader skips and counts unreadable tar members etc.; the ``SampleBuilder`` raises
``SkipSample(reason)`` for bad images / missing fields, which is counted here under that reason (and logged,
rate-limited) or, with ``strict=True``, raised as a ``SampleError`` naming the sample.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data.loader import (
    LoaderError,
    MixedStream,
    RawSample,
    ResumableLoader,
    ShardStream,
    build_stream,
    read_refs,
)
from data.packing import EOD_ID, IMG_START_ID, Packer, collate_rows
from data.prefetch import BackgroundBatches

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class SampleError(ValueError):
    """A sample the SampleBuilder refused, in strict mode (message names the shard, sample and reason).

    A plain one-argument exception so that it pickles across the process pool unchanged."""


@dataclass
class SampleSkipped:
    """Returned by ``SampleMapper`` instead of a Sample when the builder refuses one (non-strict)."""

    reason: str
    key: str
    url: str
    index: int
    detail: str
    source: str = ""  # the source (data.loader.SourceSpec name) the sample came from


_worker_pid: int | None = None


def _init_worker() -> None:
    """Once per pool-worker process: one torch thread, as torch's DataLoader does. Besides avoiding oversubscription this
    is what keeps a forked worker alive: libgomp is not fork-safe, so the first multi-threaded op of a child
    forked from a parent that already ran OpenMP ops deadlocks (seen in tensor pickling's storage copy)."""
    global _worker_pid
    if _worker_pid != os.getpid():  # per process: a forked child inherits the parent's value
        _worker_pid = os.getpid()
        torch.set_num_threads(1)


class SampleMapper:
    """Picklable ``map_fn`` for ``ResumableLoader``: ``RawSample -> Sample | SampleSkipped``.

    Only ``SkipSample`` (bad input) becomes a counted skip; any other exception is a bug and propagates
    (``ResumableLoader`` re-raises it naming the sample)."""

    def __init__(self, builder: Any, strict: bool = False):
        self.builder, self.strict = builder, strict
        self._in_worker = False

    def __getstate__(self) -> dict[str, Any]:
        # only pool workers receive pickled copies; the main process (inline use, restore) keeps its threads
        return {**self.__dict__, "_in_worker": True}

    def __call__(self, raw: RawSample) -> Any:
        from data.samples import SkipSample

        if self._in_worker:
            _init_worker()
        try:
            s = self.builder(raw)
        except SkipSample as e:
            reason = str(getattr(e, "reason", None) or "skipped")
            if self.strict:
                raise SampleError(f"{raw.url}: sample {raw.key!r} (#{raw.index}, source {raw.source!r}): "
                                  f"{reason}: {e}") from None
            detail = str(getattr(e, "message", None) or e)
            return SampleSkipped(reason, raw.key, raw.url, raw.index, detail, raw.source)
        if not getattr(s, "ref", None):
            s.ref = raw.ref()
        return s


class _SkipLog:
    """Counts skips by reason; logs the first of every reason and then at most one summary per interval."""

    def __init__(self, interval_s: float = 60.0):
        self.counts: Counter[str] = Counter()
        self.interval_s = interval_s
        self._last = 0.0

    def __call__(self, sk: SampleSkipped) -> None:
        first = self.counts[sk.reason] == 0
        self.counts[sk.reason] += 1
        now = time.monotonic()
        if first:
            where = "" if sk.url in sk.detail else f" ({sk.url} #{sk.index})"
            logger.warning("skipping sample %r: %s: %s%s; further %r skips are counted", sk.key, sk.reason,
                           sk.detail, where, sk.reason)
        elif now - self._last >= self.interval_s:
            logger.warning("sample skips so far: %s (latest: %r in %s: %s)", dict(self.counts), sk.key, sk.url,
                           sk.reason)
        else:
            return
        self._last = now


class _DryWatch:
    """Stops an infinite stream that yields nothing: when every source has gone a whole pass (as many samples as
    its last complete epoch yielded) without one sample the builder accepts, it raises LoaderError naming the
    sources and the skip counts instead of cycling (and spinning) forever. The loader itself catches the
    same at its level (a whole epoch without a readable group); this catches samples that read fine but
    that the builder refuses, e.g. shards of another layout (``missing_key: metadata has no 'task'``)."""

    def __init__(self, stream: ShardStream | MixedStream, stats: Callable[[], dict[str, Any]]):
        self.streams = {s.name: s for s in (stream.streams if isinstance(stream, MixedStream) else [stream])}
        self.stats = stats
        self.since: Counter[str] = Counter()  # samples of each source since its last usable one
        self.warned: set[str] = set()

    def usable(self, sample: Any) -> None:
        ref = getattr(sample, "ref", None)
        if ref:
            self.since[ref[0]] = 0
            self.warned.discard(ref[0])

    def _dry(self, name: str) -> bool:
        st = self.streams.get(name)
        return st is not None and st.epochs is None and st.last_pass is not None and self.since[name] >= st.last_pass

    def skipped(self, name: str) -> None:
        self.since[name] += 1
        if not self._dry(name):
            return
        if all(self._dry(n) for n in self.streams):
            raise LoaderError(
                f"no usable sample for a whole pass over the data: source(s) {sorted(self.streams)} gave "
                f"{dict(self.since)} samples in a row that were all skipped (skipped by reason so far: "
                f"{self.stats()['skipped']}); check the shards' layout (data.sources[*].layout: qwenvl | "
                "img2dataset) and the first skip warning above")
        if name not in self.warned:
            self.warned.add(name)
            logger.warning("source %r: no usable sample in a whole pass (%d skipped in a row; skipped so far: %s); "
                           "its share of the mixture is wasted", name, self.since[name], self.stats()["skipped"])


class StageStream:
    """Iterator of collated batches (DESIGN.md "Batches") with exact ``state_dict``/``load_state_dict``.

    ``pack=False`` gives one sample per row, padded to the longest row of the batch (``pad_to_seq_len=True``:
    to ``seq_len``). A finite stream ends with a last, possibly smaller batch unless ``drop_last``."""

    def __init__(self, loader: ResumableLoader, mapper: SampleMapper, *, seq_len: int, batch_size: int,
                 pack: bool = True, same_task: bool = False, pack_buffer: int = 128, image_size: int | None = None,
                 pad_to_seq_len: bool = False, drop_last: bool = False, pad_id: int = EOD_ID,
                 img_start_id: int = IMG_START_ID, fingerprint: dict[str, Any] | None = None,
                 pin_memory: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.loader, self.mapper = loader, mapper
        self.seq_len, self.batch_size, self.pack = int(seq_len), int(batch_size), bool(pack)
        self.image_size, self.pad_to_seq_len, self.drop_last = image_size, pad_to_seq_len, drop_last
        self.pad_id, self.img_start_id = pad_id, img_start_id
        # page-locked batches (None: when CUDA is available) so the host-to-device copy can be asynchronous
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.packer = self._new_packer(pack_buffer if pack else 1, same_task)
        self._fingerprint = {"seq_len": self.seq_len, "batch_size": self.batch_size, "pack": self.pack,
                             "same_task": bool(same_task), "pack_buffer": int(pack_buffer), **(fingerprint or {})}
        self._skips = _SkipLog()
        self.counters: Counter[str] = Counter({"samples": 0, "rows": 0, "real_tokens": 0, "slots": 0,
                                               "batches": 0})
        self._gen: Iterator[dict[str, Any]] | None = None
        self._dry = _DryWatch(loader.stream, self.stats)

    # ---- the family's packing and batch layout (data/qwen2_vl_stream.py overrides these two) ----
    def _new_packer(self, buffer_size: int, same_task: bool) -> Packer:
        return Packer(self.seq_len, buffer_size=buffer_size, same_task=same_task, img_start_id=self.img_start_id)

    def _collate(self, rows: list[list[Any]], T: int | None) -> dict[str, Any]:
        return collate_rows(rows, T, pad_id=self.pad_id, image_size=self.image_size,
                            img_start_id=self.img_start_id, checked=True,  # Packer.add checked them
                            pin_memory=self.pin_memory)

    # ---- iteration ----
    def __iter__(self) -> StageStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._gen is None:
            self._gen = self._batches()
        return next(self._gen)

    def _next_sample(self, src: Iterator[Any]) -> Any:
        for item in src:
            if isinstance(item, SampleSkipped):
                self._skips(item)
                self._dry.skipped(item.source)
                continue
            self._dry.usable(item)
            return item
        return None

    def _batches(self) -> Iterator[dict[str, Any]]:
        src = iter(self.loader)
        exhausted = False
        while True:
            rows = []
            while len(rows) < self.batch_size:
                while not exhausted and not self.packer.ready():
                    s = self._next_sample(src)
                    if s is None:
                        exhausted = True
                    else:
                        self.packer.add(s)
                if not len(self.packer):
                    break
                rows.append(self.packer.pop_row())
            if not rows or (self.drop_last and len(rows) < self.batch_size):
                return
            T = self.seq_len if (self.pack or self.pad_to_seq_len) else None
            batch = self._collate(rows, T)
            c = self.counters
            c["batches"] += 1
            c["rows"] += len(rows)
            c["samples"] += sum(len(r) for r in rows)
            c["real_tokens"] += int((batch["segment_ids"] != 0).sum())
            c["slots"] += batch["segment_ids"].numel()
            yield batch

    # ---- bookkeeping ----
    def stats(self) -> dict[str, Any]:
        """Skips by reason (loader + sample level), samples/rows/batches delivered, real tokens and slots."""
        skipped = Counter(self.loader.skipped)
        skipped.update(self._skips.counts)
        c = self.counters
        return {"skipped": dict(skipped), **{k: int(v) for k, v in c.items()},
                "efficiency": c["real_tokens"] / c["slots"] if c["slots"] else 0.0, "pending": len(self.packer)}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": dict(self._fingerprint), "loader": self.loader.state_dict(),
                "pending": [list(s.ref) for s in self.packer.pending], "skipped": dict(self._skips.counts),
                "counters": {k: int(v) for k, v in self.counters.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"stage stream state version {state.get('version')} != {STATE_VERSION}")
        diff = {k: (state["config"].get(k), v) for k, v in self._fingerprint.items() if state["config"].get(k) != v}
        if diff:
            raise LoaderError(f"saved stage-stream state does not fit this pipeline (field: (saved, now)): {diff}")
        self._gen = None  # a fresh generator continues from the restored state
        self.loader.load_state_dict(state["loader"])
        self.packer = self._new_packer(self.packer.buffer_size, self.packer.same_task)
        for raw in read_refs(state["pending"]):
            s = self.mapper(raw)
            if isinstance(s, SampleSkipped):
                raise LoaderError(f"{raw.url}: pending sample {raw.key!r} was packable when saved but is now "
                                  f"skipped ({s.reason}: {s.detail}); did the data or the builder change?")
            self.packer.add(s)
        self._skips.counts = Counter({k: int(v) for k, v in state["skipped"].items()})
        self.counters = Counter({k: int(v) for k, v in state["counters"].items()})

    # ---- resume under another world size ----
    def portable_state(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """World-size-independent state from EVERY rank's ``state_dict()``: per source the epoch and what is
        left of it; the samples in the packers (and prefetched, and in shuffle buffers) were never trained on
        and go back to their sources as references. Counters are summed."""
        for st in states:
            if st.get("version") != STATE_VERSION:
                raise LoaderError(f"stage stream state version {st.get('version')} != {STATE_VERSION}")
            # rows per batch and packer size may change with the world (e.g. to keep the global batch): the
            # packers' samples go back to their sources either way
            diff = {k: (st["config"].get(k), v) for k, v in self._fingerprint.items()
                    if k not in ("batch_size", "pack_buffer") and st["config"].get(k) != v}
            if diff:
                raise LoaderError(f"saved stage-stream state does not fit this pipeline (field: (saved, now)): {diff}")
        packed = [list(r) for st in states for r in st["pending"]]
        skipped: Counter[str] = Counter()
        counters: Counter[str] = Counter()
        for st in states:
            skipped.update({k: int(v) for k, v in st["skipped"].items()})
            counters.update({k: int(v) for k, v in st["counters"].items()})
        return {"version": STATE_VERSION, "kind": "stage", "config": dict(self._fingerprint),
                "loader": self.loader.portable_state([st["loader"] for st in states], packed),
                "packer": len(packed), "skipped": dict(skipped), "counters": dict(counters)}

    def load_portable(self, portable: dict[str, Any]) -> None:
        """Continue from a ``portable_state`` as this rank of the new world (an empty packer; counters on rank 0)."""
        if portable.get("kind") != "stage":
            raise LoaderError(f"portable state kind {portable.get('kind')!r} is not a stage stream's")
        self._gen = None
        self.loader.load_portable(portable["loader"])
        self.packer = self._new_packer(self.packer.buffer_size, self.packer.same_task)
        first = getattr(self.loader.stream, "rank", 0) == 0
        self._skips.counts = Counter({k: int(v) for k, v in portable["skipped"].items()} if first else {})
        self.counters = Counter({k: int(v) if first else 0 for k, v in portable["counters"].items()})

    def load_resplit(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Resume from the saved states of ALL ranks of another world size (``portable_state`` then
        ``load_portable``); returns what was not carried over exactly (samples re-read, per kind)."""
        portable = self.portable_state(states)
        self.load_portable(portable)
        sources = _sources(portable["loader"]["stream"])
        return {"from_ranks": len(states), "packer": portable["packer"], "prefetch": portable["loader"]["prefetched"],
                "shuffle_buffer": sum(s["buffered"] for s in sources.values()),
                "epochs": {n: s["epoch"] for n, s in sources.items()}}

    def close(self) -> None:
        self._gen = None
        self.loader.close()

    def __enter__(self) -> StageStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _sources(stream_portable: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if stream_portable["kind"] == "mixed":
        return dict(stream_portable["sources"])
    return {stream_portable["name"]: stream_portable}


def _family_stream(family: str) -> tuple[Callable[..., Any], type[StageStream]]:
    """A model family's (sample builder factory (stage, tokenizer_path, image_size, seq_len, **kw), StageStream
    class). data/ keeps this table itself (it never imports train/, whose train/model/families.py names the
    same families)."""
    if family == "qwen_vl":
        from data.samples import SampleBuilder

        return SampleBuilder, StageStream
    if family == "qwen2_vl":
        from data.qwen2_vl_stream import Qwen2VLStageStream, make_qwen2_builder

        return make_qwen2_builder, Qwen2VLStageStream
    raise ValueError(f"unknown model family {family!r}; known: qwen_vl, qwen2_vl")


def build_stage_stream(stage: int, sources: str | os.PathLike | Sequence[Any], *,
                       tokenizer_path: str | os.PathLike | None = None, image_size: int | None, seq_len: int,
                       batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, train: bool = True,
                       buffer_size: int = 0, num_workers: int = 0, strict: bool = False, pack: bool = True,
                       same_task: bool | None = None, pack_buffer: int = 128, truncate: str | None = None,
                       max_pixels: int | None = None, pad_to_seq_len: bool = False, drop_last: bool = False,
                       prefetch: int | None = None, mp_context: Any = None, builder: Any = None,
                       pin_memory: bool | None = None, prefetch_batches: int = 0, family: str = "qwen_vl",
                       **builder_kwargs: Any) -> StageStream | BackgroundBatches:
    """The batch stream of one training stage for one rank (see the module docstring).

    ``sources``: a shard spec, a list of shard specs (one source), or a list of ``{"name", "shards",
    "weight"}`` (mixed by weight, infinite).
    ``train=False``: one pass in shard order without shuffling (held-out evaluation; a single source).
    ``same_task`` defaults to ``stage == 2`` (the paper packs stage-2 rows with one task each).
    ``truncate``, ``max_pixels`` and any extra keyword go to ``data.samples.SampleBuilder`` (None = its
    default); ``builder`` replaces the SampleBuilder altogether (any picklable RawSample -> Sample callable).
    ``pin_memory``: page-locked batches (None = when CUDA is available). ``prefetch_batches > 0``: that many
    batches are made ahead on a background thread (``data.prefetch.BackgroundBatches``: tar reading, packing
    and collation off the training thread; same batches, same exact-resume state).
    ``family``: the model family whose sample format and batch layout to produce (qwen_vl | qwen2_vl; the
    shards are the same); qwen2_vl takes ``min_pixels``, ``max_pixels_resize``, ``patch_size`` and
    ``merge_size`` (data.qwen2_vl_samples.Qwen2VLSampleBuilder) and no ``image_size``."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    same_task = (stage == 2) if same_task is None else bool(same_task)
    make_builder, stream_cls = _family_stream(family)
    fingerprint = {"stage": stage, "image_size": image_size}
    if family != "qwen_vl":  # Qwen-VL's saved states keep their fingerprint
        fingerprint |= {"family": family, **{k: builder_kwargs[k] for k in sorted(builder_kwargs)
                                             if k in ("min_pixels", "max_pixels_resize", "patch_size", "merge_size")}}
    if builder is None:
        opts = {k: v for k, v in (("truncate", truncate), ("max_pixels", max_pixels)) if v is not None}
        builder = make_builder(stage, tokenizer_path, image_size, seq_len, seed=seed, **opts, **builder_kwargs)
    elif builder_kwargs or truncate is not None or max_pixels is not None:
        raise ValueError(f"builder given: SampleBuilder options {sorted(builder_kwargs)} would be ignored")
    if not isinstance(sources, (str, os.PathLike)) and sources and all(isinstance(x, (str, os.PathLike))
                                                                        for x in sources):
        sources = [{"name": "default", "shards": [os.fspath(x) for x in sources]}]  # one source, many specs
    stream: ShardStream | MixedStream = build_stream(
        sources, seed=seed, epochs=None if train else 1, buffer_size=buffer_size if train else 0,
        shuffle_shards=train, rank=rank, world_size=world_size, strict=strict)
    if not train and isinstance(stream, MixedStream):
        raise ValueError(f"train=False reads one pass of ONE source, but {len(stream.streams)} weighted sources "
                         f"were given ({stream.names}); a mixture cycles forever. Pass one source (it may list "
                         "several shard specs) per evaluation stream")
    mapper = SampleMapper(builder, strict=strict)
    loader = ResumableLoader(stream, mapper, num_workers=num_workers, prefetch=prefetch, mp_context=mp_context)
    if prefetch_batches < 0:
        raise ValueError(f"prefetch_batches must be >= 0, got {prefetch_batches}")
    st = stream_cls(loader, mapper, seq_len=seq_len, batch_size=batch_size, pack=pack, same_task=same_task,
                    pack_buffer=pack_buffer, image_size=image_size, pad_to_seq_len=pad_to_seq_len,
                    drop_last=drop_last, fingerprint=fingerprint, pin_memory=pin_memory)
    return BackgroundBatches(st, prefetch_batches) if prefetch_batches else st


__all__ = ["SampleError", "SampleMapper", "SampleSkipped", "StageStream", "build_stage_stream"]
