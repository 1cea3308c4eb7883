"""Atomic, resumable checkpoints.

Layout under <output_dir>/checkpoints/:
  step_00000100/            one checkpoint (renamed into place only when complete)
    model.safetensors, optimizer.pt, scheduler.pt     (single engine)   | deepspeed/ (DeepSpeed's own
                                                                          save_checkpoint: model, ZeRO
                                                                          optimizer partitions, scheduler)
    rank00000.pt ...         per rank: RNG states (python, numpy, torch, cuda) + data-stream state
    trainer_state.json       step, world size, engine kind and ZeRO stage, counters, wandb run id
  latest                     text file naming the newest complete step dir (written atomically)
Keeps the newest `keep_last`. Files we read back use torch.load(weights_only=True) or safetensors.

Resume with the same world size, engine and ZeRO stage restores everything exactly (bitwise). Under another
world size or engine (1 -> 8 GPUs, a lost node, ZeRO-2 -> ZeRO-3, DeepSpeed -> single), the same files are
read through `train.portable` instead: weights, fp32 master weights, Adam moments and step, and the LR
schedule per parameter name, exactly; the data stream of all old ranks is re-split over the new ones (each
source's epoch position kept, no sample of the epoch repeated or skipped). Not carried over exactly, and said
in one line at resume: the samples read ahead but not yet trained on (shuffle buffers, prefetch, packer) are
re-read and re-shuffled, so the ORDER of the rest of the epoch differs; the shuffle and source-mixing RNGs
are reseeded; rank r continues old rank r's torch/numpy/python RNG (ranks beyond the old world take rank 0's).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.distributed import DistInfo, all_reduce_sum

LATEST = "latest"
# test hook: SIGKILL this process while checkpoint N is half written (after the files, before the rename)
KILL_IN_SAVE_ENV = "QWENVL_DEBUG_SIGKILL_IN_SAVE"
# torch's zip writer loses the errno of a failed write ("file write failed", "basic_ios::clear", "unexpected
# pos"): a write error with less than this free on the file system is reported as the disk being full
LOW_FREE_BYTES = 64 * 2**20
# left behind by a killed run: a half-written checkpoint, pointer or final export (train/model/official.py,
# train/model/qwen2_vl/hf.py write `.final.tmp-*`; train/export.py `.final_lora.tmp.PID`)
STALE_IN_CHECKPOINTS = (".step_*.tmp", f".{LATEST}.tmp.*")
STALE_IN_OUTPUT = (".final.tmp-*", ".final_lora.tmp.*")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or written; the message names the file and the cause."""


# ------------------------------------------------------------------------------------------ reading
def _first_line(err: BaseException, limit: int = 200) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _read_cause(path: Path, err: BaseException) -> str:
    """What is wrong with `path`, in words (the library's own message is appended by the caller)."""
    if isinstance(err, FileNotFoundError) or not path.exists():
        return "missing"
    if isinstance(err, PermissionError):
        return "permission denied"
    size = path.stat().st_size if path.is_file() else -1
    if size == 0:
        return "empty file (0 bytes)"
    msg = str(err)
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno} of {size} bytes: truncated?)"
    if isinstance(err, UnicodeDecodeError) and path.suffix == ".json":
        return "not UTF-8 text"
    if path.suffix == ".safetensors" or "safetensor" in type(err).__name__.lower():
        if "not fully covered" in msg or "incomplete" in msg.lower():
            return f"truncated ({size} bytes: its header describes more tensor data than the file holds)"
        return f"not a safetensors file, or truncated inside its header ({size} bytes)"
    if size > 0:
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if zip_start and ("central directory" in msg or isinstance(err, (EOFError, zipfile.BadZipFile))):
            return f"truncated ({size} bytes: a torch zip archive without its end)"
        if "CRC" in msg:
            return "corrupt (a record fails its CRC-32 check)"
        if not zip_start:
            return f"not a torch checkpoint ({size} bytes of garbage: not a zip archive, no pickle torch can read)"
        if "Weights only load failed" in msg:
            return "holds objects torch.load(weights_only=True) refuses (not a file this trainer wrote)"
        if isinstance(err, (EOFError, UnicodeDecodeError)) or "pickle" in type(err).__name__.lower():
            return "corrupt pickle inside the torch zip archive"
    return "cannot be read"


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Any error while reading checkpoint file `path` becomes a CheckpointError naming it and the cause."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - every reader's errors (safetensors, torch, zipfile, json)
        p = Path(path)
        raise CheckpointError(f"{p}: {_read_cause(p, err)} ({type(err).__name__}: {_first_line(err)})") from err


def load_torch_file(path: Path, **kw: Any) -> Any:
    """torch.load(weights_only=True) of a checkpoint file; errors name the file."""
    with reading(path):
        return torch.load(path, weights_only=True, **kw)


def load_safetensors_file(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    with reading(path):
        return load_file(str(path), device=device)


def load_json_file(path: Path) -> Any:
    with reading(path):
        return json.loads(path.read_text(encoding="utf-8"))


def check_torch_file(path: Path) -> None:
    """Structure of a torch.save zip archive without reading its tensor data: the central directory (at the
    end: a truncated file has none), every record inside the file, the pickle record's CRC-32."""
    with reading(path):
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            for info in infos:
                if info.header_offset + info.compress_size > size:
                    raise CheckpointError(f"{path}: truncated (record {info.filename} ends past the file's "
                                          f"{size} bytes)")
            pkl = [i.filename for i in infos if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
            if not pkl:
                raise CheckpointError(f"{path}: not a torch checkpoint (a zip archive without a data.pkl record)")
            z.read(pkl[0])  # checks its CRC-32


def check_safetensors_file(path: Path) -> None:
    """Header of a safetensors file (and that it covers the whole file) without reading the tensors."""
    from safetensors import safe_open

    with reading(path), safe_open(str(path), framework="pt") as f:
        f.keys()


# ------------------------------------------------------------------------------------------ writing
def _free_bytes(path: Path) -> int:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return -1


def _errnos(err: BaseException | None) -> set[int]:
    out: set[int] = set()
    seen = 0
    while err is not None and seen < 10:  # the causes chained by wrappers
        if isinstance(err, OSError) and err.errno is not None:
            out.add(err.errno)
        err, seen = err.__cause__ or err.__context__, seen + 1
    return out


def write_error(path: Path, err: BaseException) -> CheckpointError:
    """The CheckpointError for a failed write of `path`: disk full says so, with the free space left."""
    free = _free_bytes(path)
    codes, msg = _errnos(err), str(err)
    quota = errno.EDQUOT in codes or "quota exceeded" in msg.lower()
    full = (errno.ENOSPC in codes or quota or "no space left" in msg.lower() or "os error 28" in msg
            or 0 <= free < LOW_FREE_BYTES)
    if full:
        what = "no space left on device (disk quota exceeded)" if quota else "no space left on device"
        return CheckpointError(f"{what} writing {path} (free: {max(free, 0) / 2**20:.1f} MiB)")
    return CheckpointError(f"cannot write {path}: {type(err).__name__}: {_first_line(err)}")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Any error while writing checkpoint file (or directory) `path` becomes a CheckpointError naming it and
    the cause (disk full: 'no space left on device writing PATH (free: X MiB)')."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - every writer's errors (torch, safetensors, DeepSpeed, OSError)
        raise write_error(Path(path), err) from err


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Makes the directory's entries (creations, renames) durable; some file systems cannot fsync one."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory (deepest first, `root` last)."""
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(Path(d))
        for name in files:
            with writing(Path(d) / name):
                fsync_file(Path(d) / name)
    for d in reversed(dirs):
        with writing(d):
            fsync_dir(d)


def write_text_synced(path: Path, text: str) -> None:
    with writing(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`, fsync the directory: after a power loss `path` holds the old or the
    new text, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        write_text_synced(tmp, text)
        with writing(path):
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    n = st["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(d: Path) -> int | None:
    """The step of a `step_XXXXXXXX` directory name, None for anything else."""
    head, _, num = d.name.partition("_")
    return int(num) if head == "step" and num.isdigit() else None


class CheckpointManager:
    def __init__(self, output_dir: str | os.PathLike, keep_last: int, info: DistInfo,
                 clean_stale: bool = True) -> None:
        """`clean_stale`: rank 0 removes what killed runs left in this run's directories (half-written
        checkpoints, pointer and final-export temp dirs); False for a manager that only reads another run."""
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.keep_last, self.info = keep_last, info
        if info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if clean_stale:
                self.remove_stale()

    def remove_stale(self) -> list[Path]:
        """Delete `.step_*.tmp`, `.latest.tmp.*` (checkpoints/) and `.final.tmp-*`, `.final_lora.tmp.*`
        (output dir) left by a killed run; says in one line what was removed. Rank 0, at start."""
        found = sorted({*(p for pat in STALE_IN_CHECKPOINTS for p in self.root.glob(pat)),
                        *(p for pat in STALE_IN_OUTPUT for p in self.output_dir.glob(pat))})
        for p in found:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if found:
            print(f"[train] removed {len(found)} stale temporary file(s)/dir(s) of a killed run: "
                  + ", ".join(str(p.relative_to(self.output_dir)) for p in found), flush=True)
        return found

    # ---------------------------------------------------------------------------------------- find
    def latest(self) -> Path | None:
        p = self.root / LATEST
        if not p.is_file():
            return None
        d = self.root / p.read_text(encoding="utf-8").strip()
        if not (d / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{p} names {d.name}, which is not a complete checkpoint")
        return d

    def resolve(self, resume: str) -> Path | None:
        """train.resume -> checkpoint dir: auto = latest here (None if none), never = None, else a path
        (a step dir, or a checkpoints dir with a `latest` file)."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        p = Path(resume)
        if (p / "trainer_state.json").is_file():
            return p
        if (p / LATEST).is_file():
            return CheckpointManager(p.parent, self.keep_last, self.info, clean_stale=False).latest() \
                if p.name == "checkpoints" else p / (p / LATEST).read_text().strip()
        if (p / "checkpoints" / LATEST).is_file():
            return CheckpointManager(p, self.keep_last, self.info, clean_stale=False).latest()
        raise FileNotFoundError(f"train.resume={resume}: no checkpoint there (no trainer_state.json or latest)")

    def candidates(self) -> tuple[list[Path], list[str]]:
        """resume=auto's order: the step dir `latest` names, then the older step dirs, newest first (dirs newer
        than `latest` are ignored: `latest` moves only after a complete save). Also problems with the pointer."""
        notes: list[str] = []
        dirs = {s: d for d in self.root.glob("step_*") if d.is_dir() and (s := _step_of(d)) is not None}
        pointer, newest = self.root / LATEST, None
        if pointer.is_file():
            try:
                name = pointer.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                name = f"<unreadable: {err}>"
            step = _step_of(self.root / name) if name and "/" not in name else None
            if step is not None and (self.root / name).is_dir():
                newest = step
            else:
                notes.append(f"{pointer} names {name!r}, which is not a checkpoint directory here")
        elif dirs:
            notes.append(f"{pointer} is missing")
        order = sorted((s for s in dirs if newest is None or s <= newest), reverse=True)
        return [dirs[s] for s in order], notes

    def check(self, ckpt: Path) -> str | None:
        """Why checkpoint `ckpt` cannot be resumed (the message names the file and the cause), or None. Every
        file it consists of (of every rank) must be present and parse: JSON, safetensors headers, torch zip
        archives' structure and pickle records; tensor data is not read. Deterministic: the same answer on
        every rank (the files are shared)."""
        try:
            self._check(ckpt)
        except CheckpointError as err:
            return str(err)
        return None

    def _check(self, ckpt: Path) -> None:
        state = ckpt / "trainer_state.json"
        if not state.is_file():
            raise CheckpointError(f"{ckpt}: incomplete (no trainer_state.json: its save never finished)")
        meta = load_json_file(state)
        try:
            world, kind, stage = int(meta["world_size"]), str(meta["engine"]), int(meta.get("zero_stage", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{state}: not a trainer state (world_size/engine: {err!r})") from err
        torch_files = [ckpt / f"rank{r:05d}.pt" for r in range(world)]
        if kind == "deepspeed":
            d = ckpt / "deepspeed"

            def per_rank(suffix: str) -> list[Path]:  # DeepSpeed's bf16 optimizer adds a `bf16_` prefix
                return [next(iter(sorted(d.glob(f"*zero_pp_rank_{r}_mp_rank_00_{suffix}"))),
                             d / f"zero_pp_rank_{r}_mp_rank_00_{suffix}") for r in range(world)]  # absent: "missing"

            torch_files += [d / "mp_rank_00_model_states.pt"] if stage < 3 else per_rank("model_states.pt")
            torch_files += per_rank("optim_states.pt") if stage >= 1 else []
            torch_files += sorted(set(d.glob("*.pt")) - set(torch_files))  # whatever else DeepSpeed wrote
        else:
            check_safetensors_file(ckpt / "model.safetensors")
            torch_files += [ckpt / "optimizer.pt", ckpt / "scheduler.pt"]
            from train.portable import PARAM_NAMES

            if (ckpt / PARAM_NAMES).exists():
                load_json_file(ckpt / PARAM_NAMES)
        for f in torch_files:
            check_torch_file(f)

    def _agree(self, value: float) -> float:
        """Collective: the sum of `value` over ranks (identity for one process)."""
        return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=self.info.device))[0])

    def resume(self, resume: str, engine: Any, data: Any) -> tuple[Path | None, dict[str, Any] | None]:
        """Collective. train.resume -> (checkpoint loaded, its trainer_state) or (None, None) for a fresh start.
        An explicit path that is unreadable is an error naming the file. `auto`: the checkpoint `latest` names,
        or, when it is unreadable or incomplete, the newest older readable one (said in a warning); an error
        listing what was tried when none is. Rank 0 checks the files and broadcasts its choice."""
        if resume == "never":
            return None, None
        if resume != "auto":
            ckpt = self.resolve(resume)
            if ckpt is None:
                return None, None
            problem = self.check(ckpt) if self.info.is_main else None
            if self._agree(float(problem is not None)):
                raise CheckpointError(f"train.resume={resume}: cannot resume: {problem or 'see rank 0'}")
            return ckpt, self.load(ckpt, engine, data)
        tried: dict[str, str] = {}  # step dir name -> why it was skipped
        while True:
            chosen = self._choose_auto(tried) if self.info.is_main else 0
            step = int(self._agree(float(chosen)))  # rank 0's choice, on every rank
            if step == -1:
                return None, None
            if step == -2:
                lines = "; ".join(f"{k}: {v}" for k, v in tried.items())
                raise CheckpointError(f"train.resume=auto: no readable checkpoint in {self.root} (tried {lines}); "
                                      "delete the broken ones or set train.resume=never to start over")
            ckpt = self.root / step_dir_name(step)
            try:
                meta = self.load(ckpt, engine, data)
            except CheckpointError as err:
                if self.info.world_size > 1:  # other ranks may be inside a collective load: no retry
                    raise CheckpointError(f"train.resume=auto: {ckpt} passed the file checks but failed to load: "
                                          f"{err}; delete it to fall back to the previous checkpoint") from err
                tried[ckpt.name] = str(err)
                print(f"[train] warning: cannot resume from {ckpt.name}: {err}; trying the previous checkpoint",
                      flush=True)
                continue
            if tried and self.info.is_main:
                print(f"[train] train.resume=auto: falling back to {ckpt} (step {step}), the newest readable "
                      f"checkpoint; skipped: {', '.join(tried)}", flush=True)
                try:  # `latest` names a readable checkpoint again (a rerun does not retry the broken one)
                    if self.latest_name() != ckpt.name:
                        _atomic_write_text(self.root / LATEST, ckpt.name + "\n")
                except CheckpointError as err:
                    print(f"[train] warning: could not point {self.root / LATEST} at {ckpt.name}: {err}", flush=True)
            return ckpt, meta

    def latest_name(self) -> str | None:
        """What the `latest` pointer says (None: no pointer or unreadable)."""
        try:
            return (self.root / LATEST).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None

    def _choose_auto(self, tried: dict[str, str]) -> int:
        """Rank 0: the step of the checkpoint to resume; -1 none exists (fresh start), -2 none is readable."""
        order, notes = self.candidates()
        if not order and not notes:
            return -1
        for note in notes:
            if note not in tried.values():
                print(f"[train] warning: {note}; looking for the newest readable checkpoint", flush=True)
                tried[LATEST] = note
        for d in order:
            if d.name in tried:
                continue
            problem = self.check(d)
            if problem is None:
                return int(_step_of(d))  # type: ignore[arg-type]
            tried[d.name] = problem
            print(f"[train] warning: cannot resume from {d.name}: {problem}; trying the previous checkpoint",
                  flush=True)
        return -2

    # ---------------------------------------------------------------------------------------- save
    def _all_ok(self, err: CheckpointError | None, tmp: Path, step: int) -> None:
        """Collective (also the barrier between the save's phases): if writing failed on any rank, rank 0
        removes the partial checkpoint and every rank raises; `latest` and the older checkpoints are untouched."""
        failed = int(self._agree(float(err is not None)))
        if not failed:
            return
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        after = (f"checkpoint of step {step} not written: the partial {tmp.name} was removed, "
                 f"{self.root / LATEST} still names the previous checkpoint")
        if err is not None:
            raise CheckpointError(f"{err} ({after})") from err
        raise CheckpointError(f"{tmp}: writing failed on {failed} other rank(s), see their error ({after})")

    def save(self, step: int, engine: Any, data: Any, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Written into a temp dir, fsynced (files, then directories), renamed
        when complete; then the `latest` pointer (fsynced too). A failed write (disk full: 'no space left on
        device writing PATH (free: X MiB)') raises CheckpointError on every rank and leaves the previous
        checkpoint and `latest` as they were."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".{step_dir_name(step)}.tmp"
        err: CheckpointError | None = None
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with writing(tmp):
                    tmp.mkdir(parents=True)
            except CheckpointError as e:
                err = e
        self._all_ok(err, tmp, step)
        try:
            if engine.kind == "deepspeed" or self.info.is_main:
                engine.save(tmp)
            rank_file = tmp / f"rank{self.info.rank:05d}.pt"
            with writing(rank_file):
                torch.save({"rng": rng_state(), "data": data.state_dict() if data is not None else None}, rank_file)
        except CheckpointError as e:
            err = e
        self._all_ok(err, tmp, step)
        try:
            if self.info.local_rank == 0:  # one process per node flushes what every rank of the node wrote
                fsync_tree(tmp)
        except CheckpointError as e:
            err = e
        self._all_ok(err, tmp, step)
        if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.info.is_main:
            meta = {"step": step, "world_size": self.info.world_size, "engine": engine.kind,
                    "zero_stage": int(getattr(engine, "zero_stage", 0)), **state}
            try:
                write_text_synced(tmp / "trainer_state.json", json.dumps(meta, indent=2))  # marks it complete
                with writing(tmp):
                    fsync_dir(tmp)
                    if final.exists():
                        shutil.rmtree(final)
                    os.replace(tmp, final)
                    fsync_dir(self.root)
                _atomic_write_text(self.root / LATEST, final.name + "\n")
            except CheckpointError as e:
                err = e
            else:
                self._prune(step)
        self._all_ok(err, tmp, step)
        return final

    def _prune(self, step: int) -> None:
        """Keep the newest keep_last checkpoints up to `step` (the one just saved). Newer dirs are left: after
        a fall back (resume=auto past an unreadable checkpoint) they belong to the abandoned run and are
        replaced when the run gets there; counting them would delete the good ones."""
        dirs = sorted(d for d in self.root.glob("step_*") if d.is_dir() and (_step_of(d) or 0) <= step)
        for d in dirs[: max(0, len(dirs) - self.keep_last)]:
            shutil.rmtree(d, ignore_errors=True)
        for d in self.root.glob(".step_*.tmp"):  # leftovers of a run killed mid-save
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- load
    def load(self, ckpt: Path, engine: Any, data: Any) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, data stream and RNG; returns trainer_state.json (plus
        "resplit", a description of what changed, when the world size or engine differ). A file that
        cannot be read raises CheckpointError naming it."""
        meta = load_json_file(ckpt / "trainer_state.json")
        stage = int(getattr(engine, "zero_stage", 0))
        if (meta["world_size"], meta["engine"], meta.get("zero_stage", stage)) != \
                (self.info.world_size, engine.kind, stage):
            return self._load_other_world(ckpt, meta, engine, data)
        engine.load(ckpt)
        per_rank = load_torch_file(ckpt / f"rank{self.info.rank:05d}.pt")
        if data is not None and per_rank["data"] is not None:
            data.load_state_dict(per_rank["data"])
        set_rng_state(per_rank["rng"])
        return meta

    def _load_other_world(self, ckpt: Path, meta: dict[str, Any], engine: Any, data: Any) -> dict[str, Any]:
        from train.portable import PortableError, load_portable, read_portable, resplit_data

        old_world, step = int(meta["world_size"]), int(meta["step"])
        files = [ckpt / f"rank{r:05d}.pt" for r in range(old_world)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{ckpt}: saved with world_size {old_world} but {missing} are missing; the "
                                    "data stream of every old rank is needed to re-split it over the new ranks")
        try:
            load_portable(engine, read_portable(ckpt, meta))
        except PortableError as e:
            raise PortableError(f"cannot resume {ckpt} (saved with world size {old_world}, {_engine_name(meta)}) "
                                f"under world size {self.info.world_size}, {_engine_name(_now(engine))}: {e}") from e
        per_rank = [load_torch_file(f) for f in files]
        moved = resplit_data(data, [s["data"] for s in per_rank], step)
        rank = self.info.rank
        set_rng_state(per_rank[rank if rank < old_world else 0]["rng"])
        meta = dict(meta, resplit=_describe(meta, _now(engine), old_world, self.info.world_size, moved))
        if self.info.is_main:
            print(f"[train] {meta['resplit']}", flush=True)
        return meta


def _now(engine: Any) -> dict[str, Any]:
    return {"engine": engine.kind, "zero_stage": int(getattr(engine, "zero_stage", 0))}


def _engine_name(m: dict[str, Any]) -> str:
    if m["engine"] != "deepspeed":
        return f"engine {m['engine']}"
    return f"DeepSpeed ZeRO-{m['zero_stage']}" if "zero_stage" in m else "DeepSpeed"


def _describe(meta: dict[str, Any], now: dict[str, Any], old: int, new: int, moved: dict[str, Any] | None) -> str:
    """The one line a resume under another world prints: what changed, what is exact, what is not."""
    line = (f"checkpoint saved with world size {old} ({_engine_name(meta)}), resumed with {new} ({_engine_name(now)}): "
            "weights, fp32 master weights, Adam state and LR schedule carried over exactly")
    rng = "rank r continues old rank r's torch/numpy/python RNG"
    if new > old:
        rng += f" (ranks {old} and up take rank 0's)"
    if moved is None:
        return f"{line}; not exact: {rng}"
    if moved.get("exact"):
        return f"{line}; data continues at the same global sample index; not exact: {rng}"
    n = int(moved["packer"]) + int(moved["prefetch"]) + int(moved["shuffle_buffer"])
    return (line + f"; data stream of {old} rank(s) re-split over {new} (epoch positions kept, no sample repeated or "
            f"skipped); not exact: {n} samples read ahead but not yet trained on (shuffle buffers "
            f"{moved['shuffle_buffer']}, prefetch {moved['prefetch']}, packer {moved['packer']}) are re-read, so the "
            f"order of the rest of the epoch differs; shuffle and source-mixing RNGs are reseeded; {rng}")
