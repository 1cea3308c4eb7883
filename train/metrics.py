"""Rank-0 metric sinks: W&B (online/offline/disabled), metrics.jsonl, tqdm progress bar with ETA.

Every record is one dict of floats/ints keyed by metric name, logged at an optimizer step.
"""

from __future__ import annotations

import json
import math
import os
import resource
import uuid
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from data.tasks import TASKS

WANDB_ID_FILE = "wandb_run_id.txt"


def wandb_mode(mode: str) -> str:
    """`auto`: W&B's own WANDB_MODE when set (online | offline | disabled), else online with WANDB_API_KEY,
    else offline. An explicit mode in the config wins over the environment."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in ("online", "offline", "disabled"):
            raise ValueError(f"WANDB_MODE={env!r}: logging.wandb.mode=auto takes online, offline or disabled from it")
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


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


def _finite_or_null(record: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf -> null: metrics.jsonl stays strict JSON (json.loads elsewhere, jq, pandas all read it)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows of `path` up to `last_step` (a resumed run redoes the steps after its checkpoint) and drop
    a torn last line of a killed run; rewritten atomically. Returns the number of rows dropped."""
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{x}\n" for x in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


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
            path = output_dir / "metrics.jsonl"
            if start_step > 0 and path.is_file():
                truncate_jsonl(path, start_step)  # steps after the checkpoint are redone: log them once
            self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
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
            self.jsonl.write(json.dumps({"step": step, **_finite_or_null(record)}, allow_nan=False) + "\n")
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
            import wandb

            self.run.finish()
            # finish() can return before W&B's service has written the run's files; teardown waits for it, so
            # the offline run is complete (and `wandb sync`-able) when train() returns
            wandb.teardown()
            self.run = None
