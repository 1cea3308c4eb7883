"""Remote shard I/O: open a shard url as a readable binary stream, with a timeout and retries.

Schemes (``open_url``):

* ``http://`` / ``https://``: urllib. A transient error (connection reset or refused, timeout, HTTP 5xx /
  408 / 429, a body shorter than its Content-Length) while opening OR mid-read is retried with exponential
  backoff by re-requesting ``Range: bytes=N-`` from the N bytes already delivered, so the tar stream goes on
  with nothing skipped and nothing repeated. After ``retries`` failed attempts in a row (an attempt that
  delivers bytes resets the count) it raises ``RemoteError`` naming the url and the cause.
* ``file://``: the local file (``local_path`` lets the loader open it seekable).
* any other ``scheme://`` (``s3://``, ``gs://``, ``az://``, ``hf://``, ``memory://``...): fsspec and the
  store's own client (s3fs, gcsfs, ...), with the same retry loop (re-open, seek to N). The timeout of an
  object store is its client's own (fsspec/boto/gcsfs configuration), not ``timeout_s``.
* ``pipe:CMD``: the stdout of a shell command, only when the url was declared trusted with
  ``trust_pipe`` (the loader does that for pipe: urls written in the user's own config / command line, never
  for ones read from a manifest or a checkpoint). Not retried (re-running a command may not be safe); a
  non-zero exit status is an error.

The settings are per process (``configure``): the training entry point sets them from its config, so this
module needs no config object (``data/`` does not import ``train/``).
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import posixpath
import re
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import IO, Any, NoReturn, Protocol

logger = logging.getLogger(__name__)

PIPE = "pipe:"
_HTTP = ("http", "https")
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_BACKOFF_CAP_S = 30.0


class RemoteError(OSError):
    """A remote shard could not be read: a permanent error (404, 403, the object changed), or a transient
    one that persisted through every retry. An ``OSError`` so the loader's skip-and-count applies."""


class UntrustedPipeError(RuntimeError):
    """A ``pipe:`` url that did not come from the user's own config or command line. Deliberately not an
    OSError/ValueError: the loader must stop here, not skip the shard as unreadable."""


@dataclass(frozen=True)
class RemoteSettings:
    timeout_s: float = 60.0  # HTTP connect and per-read socket timeout
    retries: int = 5  # attempts after the first, per failure streak
    backoff_s: float = 0.5  # first wait before a retry; doubled per attempt, capped at 30 s


_settings = RemoteSettings()
_trusted_pipes: set[str] = set()


def configure(*, timeout_s: float | None = None, retries: int | None = None,
              backoff_s: float | None = None) -> RemoteSettings:
    """Set this process's remote I/O settings (None keeps a value); returns the previous settings."""
    global _settings
    prev = _settings
    new = replace(prev, **{k: v for k, v in (("timeout_s", timeout_s), ("retries", retries),
                                             ("backoff_s", backoff_s)) if v is not None})
    if not new.timeout_s > 0 or new.retries < 0 or new.backoff_s < 0:
        raise ValueError(f"remote I/O: need timeout_s > 0, retries >= 0, backoff_s >= 0; got {new}")
    _settings = new
    return prev


def settings() -> RemoteSettings:
    return _settings


# ------------------------------------------------------------------------------------------- urls


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE)


def scheme(url: str) -> str | None:
    """The url's scheme (``"https"``, ``"s3"``, ``"file"``), ``"pipe"``, or None for a plain local path."""
    if is_pipe(url):
        return "pipe"
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", url)
    return m.group(1).lower() if m else None


def local_path(url: str) -> str | None:
    """The local file path of a plain path or a ``file://`` url; None for anything remote."""
    sc = scheme(url)
    if sc is None:
        return url
    if sc == "file":
        return urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
    return None


def trust_pipe(url: str) -> None:
    """Allow ``open_url`` to run this ``pipe:`` url (call it only for urls the user wrote themselves)."""
    if is_pipe(url):
        _trusted_pipes.add(url)


def check_url(url: str) -> None:
    """Fail early (no network) for a url that can never be opened: an unknown scheme, or a store whose
    fsspec implementation is not installed (the message names the package)."""
    sc = scheme(url)
    if sc in (None, "pipe", "file", *_HTTP):
        return
    _fsspec_class(url, sc)


def join(base_url: str, name: str) -> str:
    """`name` (an entry of a manifest at `base_url`) as a url: kept when it has a scheme, else resolved
    against the manifest's directory on the same server / bucket."""
    if scheme(name) not in (None, "pipe"):
        return name
    sc = scheme(base_url)
    if sc in _HTTP:
        return urllib.parse.urljoin(base_url, name)
    parts = urllib.parse.urlsplit(base_url)  # s3://bucket/dir/manifest.json: urljoin ignores such schemes
    path = posixpath.normpath(posixpath.join(posixpath.dirname(parts.path), name))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _fsspec_class(url: str, sc: str) -> Any:
    try:
        import fsspec
    except ImportError as e:
        raise ImportError(f"{url}: reading {sc}:// shards needs the 'fsspec' package and its {sc} "
                          "implementation (e.g. s3fs, gcsfs): pip install fsspec") from e
    try:
        return fsspec.get_filesystem_class(sc)
    except ImportError as e:  # fsspec's message names the package ("Install s3fs to access S3")
        raise ImportError(f"{url}: reading {sc}:// shards needs a package that is not installed: {e}") from e
    except ValueError as e:
        raise ValueError(f"{url}: unknown url scheme {sc!r} (fsspec: {e})") from e


# -------------------------------------------------------------------------------------- opening


def open_url(url: str) -> IO[bytes]:
    """The shard at `url` as a readable (not seekable) binary stream; see the module docstring."""
    sc = scheme(url)
    if sc == "pipe":
        if url not in _trusted_pipes:
            raise UntrustedPipeError(
                f"{url!r}: refusing to run a pipe: command that did not come from the config or command line "
                "(it was read from a manifest, a shard list or a saved state); write it in data.sources "
                "yourself to run it")
        return _PipeReader(url)
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    if sc in _HTTP:
        return _RetryingReader(url, _HttpOpener(url, _settings.timeout_s), _settings)
    return _RetryingReader(url, _FsspecOpener(url, _fsspec_class(url, sc)), _settings)


def read_bytes(url: str) -> bytes:
    """The whole object at `url` (a remote manifest), through ``open_url``'s retries."""
    with open_url(url) as f:
        return f.read()


class _Transient(Exception):
    """Wraps an error worth retrying (the error is its ``__cause__``)."""


def _transient(cause: BaseException) -> _Transient:
    t = _Transient()
    t.__cause__ = cause
    return t


def _reraise(classify: Callable[[BaseException], BaseException], e: BaseException) -> NoReturn:
    """Raise the opener's transient / permanent wrapper of `e`, or `e` itself (a bug, Ctrl-C)."""
    c = e if isinstance(e, (_Transient, RemoteError)) else classify(e)
    if c is e:
        raise e
    raise c from e


class _Opener(Protocol):
    def __call__(self, offset: int) -> tuple[IO[bytes], int | None]:
        """The object from byte `offset` and its total size (None: unknown); raises _Transient or RemoteError."""

    def classify(self, e: BaseException) -> BaseException:
        """_Transient(e), a RemoteError, or `e` itself (not an I/O problem)."""


class _RetryingReader(io.RawIOBase):
    """A byte stream re-opened at the offset already delivered after a transient error."""

    def __init__(self, url: str, opener: _Opener, cfg: RemoteSettings):
        super().__init__()
        self.url, self._opener, self._cfg = url, opener, cfg
        self._pos = 0  # bytes handed to the reader so far
        self._total: int | None = None
        self._f: IO[bytes] | None = None
        self.retried = 0  # transient failures recovered from (for logs and tests)
        self._call(lambda: None)  # open now: a missing object fails at open time, like a local file

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        f, total = self._opener(self._pos)
        if total is not None and self._total is not None and total != self._total:
            f.close()
            raise RemoteError(f"{self.url}: the object changed while it was being read (size {self._total} "
                              f"-> {total})")
        self._f = f
        if total is not None:
            self._total = total

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is discarded anyway
                pass

    def _call(self, step: Callable[[], Any]) -> Any:
        failures = 0
        while True:
            try:
                if self._f is None:
                    self._open()
                return step()
            except _Transient as t:
                cause = t.__cause__ or t
                self._drop()
                failures += 1
                if failures > self._cfg.retries:
                    raise RemoteError(f"{self.url}: {type(cause).__name__}: {cause} (at byte {self._pos}; "
                                      f"gave up after {failures} attempts)") from cause
                wait = min(self._cfg.backoff_s * 2 ** (failures - 1), _BACKOFF_CAP_S)
                logger.warning("%s: %s: %s at byte %d; retry %d/%d in %.1f s", self.url, type(cause).__name__,
                               cause, self._pos, failures, self._cfg.retries, wait)
                self.retried += 1
                time.sleep(wait)

    def _read_some(self, n: int) -> bytes:
        assert self._f is not None
        try:
            data = self._f.read(n)
        except Exception as e:  # noqa: BLE001 - the opener tells transient from permanent
            _reraise(self._opener.classify, e)
        if not data and self._total is not None and self._pos < self._total:
            # http.client returns b"" when the server closes before Content-Length: a cut, not the end
            raise _transient(http.client.IncompleteRead(b"", self._total - self._pos))
        return data

    def readinto(self, b: Any) -> int:
        if self.closed:
            raise ValueError(f"{self.url}: read from a closed stream")
        if len(b) == 0 or (self._total is not None and self._pos >= self._total):
            return 0
        data = self._call(lambda: self._read_some(len(b)))
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


class _HttpOpener:
    """GET `url` from byte `offset` (``Range``); checks the server resumed at that offset and that the object
    did not change between attempts (ETag / Last-Modified)."""

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        self._validator: tuple[str | None, str | None] | None = None

    def classify(self, e: BaseException) -> BaseException:
        if isinstance(e, urllib.error.HTTPError):
            if e.code in _TRANSIENT_STATUS:
                return _transient(e)
            return RemoteError(f"{self.url}: HTTP {e.code} {e.reason}")
        if isinstance(e, urllib.error.URLError) and isinstance(e.reason, ssl.SSLCertVerificationError):
            return RemoteError(f"{self.url}: {e.reason}")  # a bad certificate does not heal by retrying
        if isinstance(e, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)):
            return _transient(e)
        return e

    def __call__(self, offset: int) -> tuple[IO[bytes], int | None]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        req = urllib.request.Request(self.url, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout_s)  # noqa: S310 - http(s) only, checked
        except Exception as e:  # noqa: BLE001
            _reraise(self.classify, e)
        try:
            validator = (resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
            if self._validator is None:
                self._validator = validator
            elif validator != self._validator and any(validator) and any(self._validator):
                raise RemoteError(f"{self.url}: the object changed while it was being read "
                                  f"(ETag/Last-Modified {self._validator} -> {validator})")
            length = resp.headers.get("Content-Length")
            if offset and resp.status == 206:
                m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != offset:
                    raise RemoteError(f"{self.url}: asked for bytes {offset}- and got Content-Range "
                                      f"{resp.headers.get('Content-Range')!r}")
                return resp, int(m.group(2)) if m.group(2) != "*" else None
            total = int(length) if length is not None else None
            if offset:  # the server ignored Range (200): read through the part already delivered
                logger.info("%s: server ignored the Range request; re-reading %d bytes to resume", self.url, offset)
                left = offset
                while left:
                    chunk = resp.read(min(left, 1 << 20))
                    if not chunk:
                        raise _transient(http.client.IncompleteRead(b"", left))
                    left -= len(chunk)
            return resp, total
        except Exception as e:  # noqa: BLE001
            resp.close()
            _reraise(self.classify, e)


_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class _FsspecOpener:
    """Open an object store url with fsspec and seek to `offset`; OSErrors other than not-found /
    permission are taken as transient (the stores' clients map network faults to OSError)."""

    def __init__(self, url: str, fs_class: Any):
        import fsspec.core

        self.url, self._fs_class = url, fs_class
        self._fs, self._path = fsspec.core.url_to_fs(url)

    def classify(self, e: BaseException) -> BaseException:
        if isinstance(e, _PERMANENT_OS):
            return RemoteError(f"{self.url}: {type(e).__name__}: {e}")
        if isinstance(e, OSError):
            return _transient(e)
        return e

    def __call__(self, offset: int) -> tuple[IO[bytes], int | None]:
        try:
            f = self._fs.open(self._path, "rb")
            if offset:
                f.seek(offset)
        except Exception as e:  # noqa: BLE001
            _reraise(self.classify, e)
        size = getattr(f, "size", None)
        return f, int(size) if isinstance(size, int) else None


class _PipeReader(io.RawIOBase):
    """stdout of ``pipe:CMD`` (run by the shell, as webdataset does); a non-zero exit status at the end
    of the output is an error naming the command and the tail of its stderr."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self._err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty stderr cannot block the command
        # its own process group: closing early can stop the whole pipeline (`curl ... | zstd -d`), not just the shell
        self._p = subprocess.Popen(url[len(PIPE):], shell=True, stdout=subprocess.PIPE,  # noqa: S602 - trusted
                                   stderr=self._err, stdin=subprocess.DEVNULL, start_new_session=True)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        assert self._p.stdout is not None
        n = self._p.stdout.readinto(b)
        if n == 0 and len(b):
            rc = self._p.wait()
            if rc != 0:
                self._err.seek(0, os.SEEK_END)
                self._err.seek(max(0, self._err.tell() - 2000))
                tail = self._err.read().decode("utf-8", "replace").strip()
                raise RemoteError(f"{self.url}: command exited with status {rc}" + (f": {tail}" if tail else ""))
        return n

    def close(self) -> None:
        if not self.closed:
            if self._p.stdout is not None:
                self._p.stdout.close()  # a command still writing gets SIGPIPE: closing early is not an error
            try:
                self._p.wait(timeout=1)
            except subprocess.TimeoutExpired:  # not writing (still fetching?): its output is no longer wanted
                self._signal(signal.SIGTERM)
                try:
                    self._p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self._p.wait()
            self._err.close()
        super().close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self._p.pid, sig)  # the group of the command started above (start_new_session)
        except ProcessLookupError:
            pass


__all__ = ["RemoteError", "RemoteSettings", "UntrustedPipeError", "check_url", "configure", "is_pipe", "join",
           "local_path", "open_url", "read_bytes", "scheme", "settings", "trust_pipe"]
