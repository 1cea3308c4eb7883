"""Size-bounded, atomic, reproducible WebDataset tar shards plus a manifest.

Sample layout (DESIGN.md "Shard sample layout"): ``KEY.json`` then ``KEY.img0.jpg``, ``KEY.img1.png``, ...
Each shard is written to ``NAME.tmp`` and ``os.replace``d to ``{prefix}-{i:06d}.tar`` when full, so a reader
never sees a half-written shard. Tar headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644, USTAR)
so the same samples give byte-identical shards. ``manifest.json`` is written (atomically) by ``close()``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data.boxes import GRID
from data.tasks import LANGS, TASKS

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "qwenvl-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Keys become tar member names "KEY.img0.jpg": keep them plain ASCII, dot-free and short (USTAR 100-char names).
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,79}$")
_MEMBER_RE = re.compile(r"^img(\d+)\.([a-z]+)$")
_IMG_REF_RE = re.compile(r"<img>(.*?)</img>", re.S)
_BLOCK, _RECORD = 512, 20 * 512  # tar block; tarfile pads the archive to a 10240-byte record


class ShardError(ValueError):
    """A sample the writer refuses (bad key, metadata or image), naming the key and the problem."""


def _magic_ok(ext: str, data: bytes) -> bool:
    if ext in ("jpg", "jpeg"):
        return data[:3] == b"\xff\xd8\xff"
    if ext == "png":
        return data[:8] == b"\x89PNG\r\n\x1a\n"
    if ext == "webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return False


def _grid_ints(v: Any, n: int) -> bool:
    return (isinstance(v, list) and len(v) == n
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < GRID for x in v))


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def validate_meta(key: str, meta: dict[str, Any]) -> None:
    """Check `meta` against the shard contract (common and per-task fields); raises ShardError naming `key`."""
    def bad(msg: str) -> ShardError:
        return ShardError(f"sample {key!r}: {msg}")

    if not isinstance(meta, dict):
        raise bad(f"metadata must be a dict, got {type(meta).__name__}")
    task, lang = meta.get("task"), meta.get("lang")
    if task not in TASKS:
        raise bad(f"task {task!r} is not one of {TASKS}")
    if lang not in LANGS:
        raise bad(f"lang {lang!r} is not one of {LANGS}")
    if not _nonempty_str(meta.get("source")):
        raise bad("'source' (dataset name) must be a non-empty string")
    images = meta.get("images")
    n_img = len(images) if isinstance(images, list) else -1
    if task == "text":
        if n_img != 0:
            raise bad(f"task 'text' takes no images, got {images!r}")
    elif task != "chat" and n_img != 1:
        raise bad(f"task {task!r} needs exactly one image, got {images!r}")
    if task in ("caption", "grounded_caption"):
        if not _nonempty_str(meta.get("caption")):
            raise bad("'caption' must be a non-empty string")
    elif task == "vqa":
        ans = meta.get("answers")
        if not _nonempty_str(meta.get("question")):
            raise bad("'question' must be a non-empty string")
        if not (isinstance(ans, list) and ans and all(isinstance(a, str) for a in ans) and ans[0].strip()):
            raise bad(f"'answers' must be a non-empty list of strings (first non-empty), got {ans!r}")
    elif task == "ref_grounding":
        if not _nonempty_str(meta.get("expression")):
            raise bad("'expression' must be a non-empty string")
        if not _grid_ints(meta.get("box"), 4):
            raise bad(f"'box' must be [x1,y1,x2,y2] ints in [0,{GRID}), got {meta.get('box')!r}")
    elif task == "region_caption":
        if not _nonempty_str(meta.get("description")):
            raise bad("'description' must be a non-empty string")
        if not _grid_ints(meta.get("box"), 4):
            raise bad(f"'box' must be [x1,y1,x2,y2] ints in [0,{GRID}), got {meta.get('box')!r}")
    elif task == "ocr":
        lines = meta.get("lines")
        if not isinstance(lines, list) or not lines:
            raise bad("'lines' must be a non-empty list")
        for i, ln in enumerate(lines):
            if not (isinstance(ln, dict) and _nonempty_str(ln.get("text")) and _grid_ints(ln.get("quad"), 8)):
                raise bad(f"lines[{i}] must be {{'text': str, 'quad': 8 ints in [0,{GRID})}}, got {ln!r}")
    elif task == "text":
        if not _nonempty_str(meta.get("text")):
            raise bad("'text' must be a non-empty string")
    elif task == "chat":
        conv = meta.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise bad("'conversations' must be a non-empty list")
        for i, turn in enumerate(conv):
            if not (isinstance(turn, dict) and turn.get("from") in ("user", "assistant")
                    and isinstance(turn.get("value"), str)):
                raise bad(f"conversations[{i}] must be {{'from': 'user'|'assistant', 'value': str}}, got {turn!r}")
            for ref in _IMG_REF_RE.findall(turn["value"]):
                if ref not in (images or []):
                    raise bad(f"conversations[{i}] references <img>{ref}</img> but the sample's images are "
                              f"{images!r}")


def _member_names(key: str, images: Sequence[tuple[str, bytes]]) -> list[str]:
    """Image i is stored as 'img{i}.{ext}'; callers may pass either the bare ext or that member name."""
    names = []
    for i, item in enumerate(images):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ShardError(f"sample {key!r}: images[{i}] must be (ext, bytes), got {type(item).__name__}")
        ext, data = item
        if not isinstance(ext, str):
            raise ShardError(f"sample {key!r}: images[{i}] extension must be a str, got {ext!r}")
        e = ext.lower().lstrip(".")
        m = _MEMBER_RE.match(e)
        if m:
            if int(m.group(1)) != i:
                raise ShardError(f"sample {key!r}: images[{i}] is named {ext!r}; image i must be 'img{i}.EXT'")
            e = m.group(2)
        if e not in IMAGE_EXTS:
            raise ShardError(f"sample {key!r}: images[{i}] extension {ext!r} not in {IMAGE_EXTS}")
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ShardError(f"sample {key!r}: images[{i}] has no bytes")
        if not _magic_ok(e, bytes(data)):
            raise ShardError(f"sample {key!r}: images[{i}] bytes are not a {e} file (bad magic number)")
        names.append(f"img{i}.{e}")
    return names


def _tar_size(sizes: Sequence[int]) -> int:
    return sum(_BLOCK + -(-s // _BLOCK) * _BLOCK for s in sizes)


def _final_size(data_bytes: int) -> int:
    """File size once closed: data + two zero blocks, padded to the 10240-byte record."""
    return -(-(data_bytes + 2 * _BLOCK) // _RECORD) * _RECORD


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Write samples into ``out_dir/{prefix}-{i:06d}.tar`` shards of at most `max_bytes` bytes and
    `max_samples` samples (a single sample bigger than `max_bytes` gets a shard of its own), then
    ``out_dir/manifest.json`` on ``close()``.

    Use as a context manager; if the block raises, the unfinished shard is deleted and no manifest is
    written (finished shards stay, but without a manifest the directory is visibly incomplete).
    `overwrite=False` refuses a directory that already holds this prefix's shards or a manifest; with the
    default `overwrite=True` a rerun replaces this prefix's shards (extra old ones are deleted on close).
    One writer per (directory, prefix) at a time; different prefixes in one directory share manifest.json
    (the last to close wins), so give each writer its own directory when several write there.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", max_bytes: int = 1 << 30,
                 max_samples: int = 10_000, overwrite: bool = True) -> None:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$", prefix):
            raise ValueError(f"shard prefix {prefix!r} must be [A-Za-z0-9_-] (no dots or slashes)")
        if max_bytes <= _RECORD or max_samples < 1:
            raise ValueError(f"max_bytes must exceed {_RECORD} and max_samples be >= 1, got {max_bytes}, "
                             f"{max_samples}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_bytes, self.max_samples = prefix, int(max_bytes), int(max_samples)
        own = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?$")
        previous = sorted(p for p in self.out_dir.iterdir() if own.match(p.name))
        if not overwrite and (previous or (self.out_dir / MANIFEST).exists()):
            raise FileExistsError(f"{self.out_dir}: already holds {[p.name for p in previous] or [MANIFEST]} "
                                  "(overwrite=False)")
        # A rerun replaces this prefix's shard set: shards of an earlier (larger) run that this run does not
        # rewrite are deleted on close(), so globbing readers never mix runs; stale .tmp files go now.
        for p in previous:
            if p.name.endswith(".tmp"):
                p.unlink()
        self._previous = [p for p in previous if not p.name.endswith(".tmp")]
        self.shards: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._file: Any = None
        self._cur: dict[str, Any] = {}
        self._closed = False
        self.manifest: dict[str, Any] | None = None

    # -- shard lifecycle
    def _shard_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        name = self._shard_name()
        self._file = open(self.out_dir / (name + ".tmp"), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._cur = {"name": name, "n_samples": 0, "data": 0, "tasks": Counter(), "langs": Counter()}

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._cur["name"]
        tmp, final = self.out_dir / (name + ".tmp"), self.out_dir / name
        os.replace(tmp, final)
        h = hashlib.sha256()
        with open(final, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self.shards.append({"name": name, "n_samples": self._cur["n_samples"], "bytes": final.stat().st_size,
                            "sha256": h.hexdigest(), "tasks": dict(sorted(self._cur["tasks"].items())),
                            "langs": dict(sorted(self._cur["langs"].items()))})
        self._tar = self._file = None

    # -- public
    def write(self, key: str, meta: dict[str, Any], images: Sequence[tuple[str, bytes]] = ()) -> None:
        """Add one sample: ``KEY.json`` (meta with ``images`` set to the member names) + ``KEY.imgN.EXT``.

        `images` items are (ext, bytes) with ext ``"jpg"`` or the member name ``"img0.jpg"``.
        Raises ShardError (naming the key) for a bad key, duplicate key, invalid metadata or image bytes.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ShardError(f"sample key {key!r} must match {_KEY_RE.pattern} (no '.', '/', spaces)")
        if key in self._keys:
            raise ShardError(f"sample key {key!r} written twice")
        names = _member_names(key, images)
        if not isinstance(meta, dict):
            raise ShardError(f"sample {key!r}: metadata must be a dict, got {type(meta).__name__}")
        given = meta.get("images")
        if given is not None and list(given) != names:
            raise ShardError(f"sample {key!r}: meta['images']={given!r} disagrees with the images given {names}")
        meta = {**meta, "images": names}
        validate_meta(key, meta)
        try:
            body = json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise ShardError(f"sample {key!r}: metadata is not JSON-serialisable: {e}") from e
        members = [(f"{key}.json", body)] + [(f"{key}.{n}", bytes(d)) for n, (_, d) in zip(names, images)]
        size = _tar_size([len(b) for _, b in members])
        if self._tar is not None and (self._cur["n_samples"] >= self.max_samples
                                      or _final_size(self._cur["data"] + size) > self.max_bytes):
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self._keys.add(key)
        self._cur["n_samples"] += 1
        self._cur["data"] += size
        self._cur["tasks"][meta["task"]] += 1
        self._cur["langs"][meta["lang"]] += 1

    def close(self) -> dict[str, Any]:
        """Finish the open shard and write ``manifest.json`` atomically; returns the manifest. Idempotent."""
        if self._closed:
            return self.manifest or {}
        if self._tar is not None:
            self._finish()
        self._closed = True
        written = {s["name"] for s in self.shards}
        for p in self._previous:
            if p.name not in written:
                p.unlink(missing_ok=True)
        tasks: Counter = Counter()
        langs: Counter = Counter()
        for s in self.shards:
            tasks.update(s["tasks"])
            langs.update(s["langs"])
        self.manifest = {
            "format": MANIFEST_FORMAT, "prefix": self.prefix, "shards": self.shards,
            "totals": {"n_shards": len(self.shards), "n_samples": sum(s["n_samples"] for s in self.shards),
                       "bytes": sum(s["bytes"] for s in self.shards),
                       "tasks": dict(sorted(tasks.items())), "langs": dict(sorted(langs.items()))},
        }
        _atomic_write(self.out_dir / MANIFEST,
                      json.dumps(self.manifest, ensure_ascii=False, indent=1).encode("utf-8"))
        return self.manifest

    def abort(self) -> None:
        """Drop the unfinished shard (its .tmp file) and write no manifest."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                (self.out_dir / (self._cur["name"] + ".tmp")).unlink(missing_ok=True)
                self._tar = self._file = None
        self._closed = True

    @property
    def n_written(self) -> int:
        return len(self._keys)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Load ``out_dir/manifest.json`` (or a manifest path); clear error when missing or malformed."""
    p = Path(out_dir)
    if p.is_dir():
        p = p / MANIFEST
    try:
        man = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read shard manifest: {e}") from e
    if not isinstance(man, dict) or not isinstance(man.get("shards"), list):
        raise ValueError(f"{p}: not a shard manifest (no 'shards' list)")
    return man


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any], dict[str, bytes]]]:
    """Plain reader for tests and tools: yields (key, meta, {member_ext: bytes}) per sample, in order.

    Member ext is the part after the key, e.g. ``"img0.jpg"``. Raises ValueError naming the shard and
    member on a malformed shard (member without KEY.ext, missing or bad json, listed image missing).
    """
    def flush(key: str, files: dict[str, bytes]) -> tuple[str, dict[str, Any], dict[str, bytes]]:
        if "json" not in files:
            raise ValueError(f"{path}: sample {key!r} has no {key}.json")
        try:
            meta = json.loads(files.pop("json").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: {key}.json is not valid JSON: {e}") from e
        missing = [m for m in meta.get("images", []) if m not in files]
        if missing:
            raise ValueError(f"{path}: sample {key!r} lists images {missing} that are not in the shard")
        return key, meta, files

    with tarfile.open(path, "r") as tar:
        key: str | None = None
        files: dict[str, bytes] = {}
        for ti in tar:
            if not ti.isfile():
                continue
            base = ti.name.rsplit("/", 1)[-1]
            if "." not in base:
                raise ValueError(f"{path}: member {ti.name!r} has no KEY.ext structure")
            k, ext = base.split(".", 1)
            if k != key:
                if key is not None:
                    yield flush(key, files)
                key, files = k, {}
            if ext in files:
                raise ValueError(f"{path}: member {ti.name!r} appears twice")
            f = tar.extractfile(ti)
            assert f is not None
            files[ext] = f.read()
        if key is not None:
            yield flush(key, files)
