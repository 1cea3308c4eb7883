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

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.distributed import DistInfo, barrier

LATEST = "latest"
# test hook: SIGKILL this process while checkpoint N is half written (after the files, before the rename)
KILL_IN_SAVE_ENV = "QWENVL_DEBUG_SIGKILL_IN_SAVE"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


class CheckpointManager:
    def __init__(self, output_dir: str | os.PathLike, keep_last: int, info: DistInfo) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last, self.info = keep_last, info
        if info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)

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
            return CheckpointManager(p.parent, self.keep_last, self.info).latest() if p.name == "checkpoints" \
                else p / (p / LATEST).read_text().strip()
        if (p / "checkpoints" / LATEST).is_file():
            return CheckpointManager(p, self.keep_last, self.info).latest()
        raise FileNotFoundError(f"train.resume={resume}: no checkpoint there (no trainer_state.json or latest)")

    # ---------------------------------------------------------------------------------------- save
    def save(self, step: int, engine: Any, data: Any, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Written into a temp dir, renamed when complete."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".{step_dir_name(step)}.tmp"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        if engine.kind == "deepspeed" or self.info.is_main:
            engine.save(tmp)
        torch.save({"rng": rng_state(), "data": data.state_dict() if data is not None else None},
                   tmp / f"rank{self.info.rank:05d}.pt")
        barrier()
        if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.info.is_main:
            meta = {"step": step, "world_size": self.info.world_size, "engine": engine.kind,
                    "zero_stage": int(getattr(engine, "zero_stage", 0)), **state}
            (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(self.root / LATEST, final.name + "\n")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        dirs = sorted(d for d in self.root.glob("step_*") if d.is_dir())
        for d in dirs[: max(0, len(dirs) - self.keep_last)]:
            shutil.rmtree(d, ignore_errors=True)
        for d in self.root.glob(".step_*.tmp"):  # leftovers of a run killed mid-save
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- load
    def load(self, ckpt: Path, engine: Any, data: Any) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, data stream and RNG; returns trainer_state.json (plus
        "resplit", a description of what changed, when the world size or engine differ)."""
        meta = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        stage = int(getattr(engine, "zero_stage", 0))
        if (meta["world_size"], meta["engine"], meta.get("zero_stage", stage)) != \
                (self.info.world_size, engine.kind, stage):
            return self._load_other_world(ckpt, meta, engine, data)
        engine.load(ckpt)
        per_rank = torch.load(ckpt / f"rank{self.info.rank:05d}.pt", weights_only=True)
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
        per_rank = [torch.load(f, weights_only=True) for f in files]
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
