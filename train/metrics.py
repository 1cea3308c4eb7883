"""Rank-0 metric sinks: W&B (online/offline/disabled), metrics.jsonl, tqdm progress bar with ETA.

Every record is one dict of floats/ints keyed by metric name, logged at an optimizer step.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import uuid
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data.tasks import TASKS

WANDB_ID_FILE = "wandb_run_id.txt"


def wandb_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def memory_stats(device: torch.device) -> dict[str, float]:
    out = {"mem/rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB -> GiB (Linux)
    if device.type == "cuda":
        out["mem/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def per_task_losses(task_sums: torch.Tensor) -> dict[str, float]:
    """task_sums [n_tasks, 2] = (loss sum, token count) -> {'loss/<task>': mean} for tasks seen."""
    out = {}
    for i, (s, n) in enumerate(task_sums.tolist()):
        if n > 0:
            name = TASKS[i] if i < len(TASKS) else f"task{i}"
            out[f"loss/{name}"] = s / n
    return out


class FlopsModel:
    """Training FLOPs of one step, from parameter counts (the 2N-per-token-per-pass rule; attention's
    quadratic term and activation-checkpointing recompute are left out, as MFU conventionally does).

    Per pass and module: forward 2N per token; backward 2N for activation gradients when anything before
    the module trains (gradients must cross it) plus 2N for weight gradients when it trains itself. The LLM
    sees the real (non-padding) tokens, the vision tower the patches of every image, the adapter the
    patches (its kv projection dominates). Embedding tables do no matmul work and are not counted."""

    def __init__(self, model: nn.Module, cfg: Any) -> None:
        def n(m: nn.Module, trainable: bool | None = None) -> int:
            return sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters()
                       if trainable is None or p.requires_grad == trainable)

        def trains(m: nn.Module) -> bool:
            return any(p.requires_grad for p in m.parameters())

        self.patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
        v_tr, a_tr, l_tr = trains(model.visual), trains(model.adapter), trains(model.llm)
        self.n_vit, self.n_adapter = n(model.visual), n(model.adapter)
        self.n_llm = n(model.llm) - cfg.llm.vocab_size * cfg.llm.hidden  # wte is a lookup
        self.f_vit = 2 + 4 * v_tr  # frozen tower: forward only, under no_grad
        self.f_adapter = 2 + 2 * v_tr + 2 * a_tr
        self.f_llm = 2 + 2 * (v_tr or a_tr or l_tr) + 2 * l_tr

    def __call__(self, tokens: float, images: float) -> float:
        per_image = self.patches * (self.f_vit * self.n_vit + self.f_adapter * self.n_adapter)
        return self.f_llm * self.n_llm * tokens + per_image * images


def mfu(flops: float, seconds: float, peak_flops: float, world_size: int) -> float:
    """Model FLOPs utilisation estimate: FLOPs / (time x peak per device x devices)."""
    if seconds <= 0 or peak_flops <= 0:
        return 0.0
    return flops / (seconds * peak_flops * world_size)


class MetricsLogger:
    """No-op on ranks other than 0."""

    def __init__(self, cfg: DictConfig, output_dir: Path, is_main: bool, total_steps: int, start_step: int) -> None:
        self.enabled = is_main
        self.jsonl = None
        self.run = None
        self.bar = None
        if not is_main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        lg = cfg.logging
        if lg.jsonl:
            self.jsonl = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        mode = wandb_mode(lg.wandb.mode)
        if mode != "disabled":
            import wandb

            id_file = output_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.run = wandb.init(
                project=lg.wandb.project, entity=lg.wandb.entity, name=lg.wandb.name or cfg.run_name,
                tags=list(lg.wandb.tags), config=OmegaConf.to_container(cfg, resolve=True), dir=str(output_dir),
                mode=mode, id=run_id, resume="allow", settings=wandb.Settings(console="off", silent=True),
            )
        if lg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=cfg.run_name, dynamic_ncols=True)

    @property
    def wandb_dir(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self.jsonl.flush()
        if self.run is not None:
            self.run.log(record, step=step)
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('lr', 0):.2e}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.run is not None:
            self.run.finish()


def read_wandb_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """History rows of an offline W&B run file (`run-<id>.wandb`) without syncing it.

    The file is in LevelDB log format (7-byte W&B header, then 32 KiB blocks of records
    [crc u32][length u16][type u8][data] with FULL=1 FIRST=2 MIDDLE=3 LAST=4); each assembled record is a
    protobuf `wandb.proto.wandb_internal_pb2.Record`. Rows map metric name -> value, plus `_step`."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block = Path(path).read_bytes(), 32768
    if raw[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (header {raw[:4]!r})")
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, typ = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if typ == 0 and n == 0:
            break
        buf = data if typ in (1, 2) else buf + data
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows
