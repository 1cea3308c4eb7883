"""Batches made ahead on a background thread, with the exact-resume state of the batches actually handed out.

``BackgroundBatches(stream, depth)`` runs ``next(stream)`` (tar reading, waiting on the decode pool,
unpickling its results, packing, collation and pinning) on one thread while the training step runs on the
caller's, keeping up to ``depth`` batches ready. Those stages spend their time in I/O, in the pool, or in
torch ops that release the GIL, so they overlap the step instead of adding to it.

Exact resume: right after it makes batch k the producer takes ``stream.state_dict()`` (the state "batch k
delivered"; nothing else touches the stream meanwhile) and queues it with the batch; ``state_dict()`` returns
the snapshot of the last batch the caller received, never the producer's position ahead of it. Stopping
(``load_state_dict``, ``close``, or any other attribute of the wrapped stream, which is forwarded) first rewinds
the stream to that snapshot when batches made ahead were dropped, so the wrapped stream is always exactly
where the caller is.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator
from typing import Any

_END = object()


class BackgroundBatches:
    """Iterator over ``stream``'s batches, ``depth`` of them made ahead on a daemon thread (see module doc).

    ``stream`` needs ``__next__``, ``state_dict()``, ``load_state_dict()`` and ``stats()`` (``StageStream``)."""

    def __init__(self, stream: Any, depth: int = 2):
        if depth < 1:
            raise ValueError(f"BackgroundBatches depth must be >= 1, got {depth}")
        self.stream, self.depth = stream, int(depth)
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state: dict[str, Any] | None = None  # stream state after the last batch handed out
        self._stats: dict[str, Any] | None = None
        self._ahead = False  # the producer may have advanced the stream past the caller

    # ---- producer
    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        def put(item: tuple) -> bool:  # False once stopped (never blocks a join on a full queue)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while not stop.is_set():
                try:
                    batch = next(self.stream)
                except StopIteration:
                    put((_END, None, None))
                    return
                if not put((batch, copy.deepcopy(self.stream.state_dict()), copy.deepcopy(self.stream.stats()))):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
            put((_END, e, None))

    def _start(self) -> None:
        if self._state is None:  # before the first batch: the state to rewind to is the current one
            self._state, self._stats = self.stream.state_dict(), self.stream.stats()
        self._stop = threading.Event()
        self._q = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._run, args=(self._q, self._stop), name="batch-prefetch",
                                        daemon=True)
        self._ahead = True
        self._thread.start()

    def _halt(self, rewind: bool = True) -> None:
        """Stop the producer; with ``rewind``, put the stream back where the caller is."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._q = None, None
        if rewind and self._ahead and self._state is not None:
            self.stream.load_state_dict(self._state)
        self._ahead = False

    # ---- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._thread is None:
            self._start()
        assert self._q is not None
        batch, state, stats = self._q.get()
        if batch is _END:
            self._thread.join()
            self._thread, self._q, self._ahead = None, None, False  # the stream ended where the caller is
            if state is not None:
                raise state
            raise StopIteration
        self._state, self._stats = state, stats
        return batch

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state) if self._state is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._halt(rewind=False)
        self.stream.load_state_dict(state)
        self._state, self._stats = None, None

    def stats(self) -> dict[str, Any]:
        return dict(self._stats) if self._stats is not None else self.stream.stats()

    def close(self) -> None:
        self._halt(rewind=False)
        self.stream.close()

    def __getattr__(self, name: str) -> Any:
        # anything else (e.g. portable / resplit state) acts on the wrapped stream at the caller's position
        if name in ("stream", "_thread", "_state", "_ahead"):
            raise AttributeError(name)
        self._halt()
        return getattr(self.stream, name)

    def __enter__(self) -> BackgroundBatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["BackgroundBatches"]
