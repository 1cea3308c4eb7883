"""Training engines: one interface over a plain single-process torch engine and DeepSpeed ZeRO-1/2/3.

The loop calls, per micro-batch, `forward(batch)` then `backward(loss)`, and after `grad_accum`
micro-batches `step()` (clip, optimizer, our LR scheduler; returns the global grad norm).
The DeepSpeed config is generated from the Hydra config (`deepspeed_config`); it never has a
"scheduler" key: DeepSpeed steps the LambdaLR we hand it.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from train.config import resolve_grad_accum, warmup_steps
from train.distributed import DistInfo
from train.model.families import FAMILIES
from train.optim import build_optimizer, build_scheduler

# the forward's batch keys: the shared ones, then every family's extras (train/model/families.py; a batch holds
# only its own family's)
MODEL_INPUTS = ("input_ids", "labels", "pixel_values", "segment_ids", "position_ids",
                *dict.fromkeys(k for f in FAMILIES.values() for k in f.batch_keys))
# batch keys that stay on the host: the model reads them there (Qwen2-VL's image grids: no device sync)
HOST_INPUTS = ("image_grid_thw",)


def resolve_precision(cfg: DictConfig, device: torch.device) -> str:
    p = cfg.engine.precision
    return ("bf16" if device.type == "cuda" else "fp32") if p == "auto" else p


def deepspeed_config(cfg: DictConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run, derived from the Hydra config (no scheduler key)."""
    e, t = cfg.engine, cfg.train
    accum = resolve_grad_accum(cfg, world_size)
    zero: dict[str, Any] = {"stage": e.zero_stage}
    # DeepSpeed allocates its buckets at the configured size whatever the model (500M elements = 2 GB fp32
    # per rank by default): a bucket larger than the whole model only wastes memory, so cap them at its size
    n = model_numel(cfg)
    buckets = {"reduce_bucket_size": min(int(e.reduce_bucket_size), n),
               "allgather_bucket_size": min(int(e.reduce_bucket_size), n),
               "stage3_prefetch_bucket_size": min(int(e.stage3_prefetch_bucket_size), n)}
    if e.zero_stage >= 1:
        zero.update(overlap_comm=e.overlap_comm, contiguous_gradients=True,
                    reduce_bucket_size=buckets["reduce_bucket_size"])
        if e.zero_stage <= 2:
            zero["allgather_bucket_size"] = buckets["allgather_bucket_size"]
    if e.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=buckets["stage3_prefetch_bucket_size"],
                    stage3_param_persistence_threshold=e.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=True)
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if e.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        # check_grad_overflow: a non-finite grad norm skips the step under bf16 too (fp32 always checks)
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def model_numel(cfg: DictConfig) -> int:
    """Parameter elements of the run's model, counted on the meta device (no memory, no init)."""
    from train.config import model_cfg
    from train.model.families import get_family

    with torch.device("meta"):
        return sum(p.numel() for p in get_family(str(cfg.model.family)).build_model(model_cfg(cfg)).parameters())


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_INPUTS else v)
            for k, v in batch.items()}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    out = {k: batch[k] for k in MODEL_INPUTS if k in batch and batch[k] is not None}
    if "pixel_values" in out and out["pixel_values"].shape[0] == 0:
        out.pop("pixel_values")
        out.pop("image_grid_thw", None)  # no image: neither patches nor grids
    return out


class Engine:
    """Common interface; `module` is the unwrapped QwenVL."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    precision: str
    grad_accum: int
    kind: str = "base"

    world_size: int = 1

    def forward(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; the engine divides by grad_accum and averages over ranks."""
        raise NotImplementedError

    def token_weighted(self, loss_sum: torch.Tensor, window_tokens: float) -> torch.Tensor:
        """The loss to pass to `backward` so that, after the engine's 1/grad_accum and its mean over ranks,
        the step's gradient is that of the mean over ALL valid target tokens of the global batch
        (`window_tokens`: summed over every micro-batch of every rank), not a mean of per-micro-batch means."""
        return loss_sum * (self.grad_accum * self.world_size / max(float(window_tokens), 1.0))

    # False after a step whose gradient norm was not finite: no update, no scheduler advance (every rank agrees:
    # the norm is global)
    step_applied: bool = True

    def step(self) -> float | None:
        """Clip, update, advance the LR schedule; returns the global grad norm. A non-finite norm (NaN/inf loss
        or gradients on any rank) skips the update and the schedule and sets `step_applied` False."""
        raise NotImplementedError

    def lr(self) -> float:
        """Current LR of the unscaled (lr_scale 1) group: the schedule's value."""
        groups = self.scheduler.optimizer.param_groups
        g = next((g for g in groups if g.get("lr_scale", 1.0) == 1.0), groups[0])
        return float(g["lr"]) / float(g.get("lr_scale", 1.0))

    def save(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def load(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated model weights on rank 0 (None elsewhere). Collective under ZeRO-3."""
        raise NotImplementedError


class SingleEngine(Engine):
    """One process, plain torch; fp32, or bf16 autocast with fp32 weights."""

    kind = "single"

    def __init__(self, cfg: DictConfig, model: nn.Module, info: DistInfo) -> None:
        self.device, self.module = info.device, model.to(info.device)
        self.precision = resolve_precision(cfg, info.device)
        self.grad_accum = resolve_grad_accum(cfg, 1)
        self.clip = float(cfg.optim.grad_clip)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps(cfg), cfg.train.steps, cfg.optim.lr,
                                         cfg.optim.min_lr, cfg.optim.schedule)
        self._params = [p for p in model.parameters() if p.requires_grad]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch: dict[str, Any]) -> Any:
        with self._autocast():
            return self.module(**model_inputs(move_batch(batch, self.device)))

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> float | None:
        if self.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in self._params if p.grad is not None]))
        norm = float(norm)
        self.step_applied = math.isfinite(norm)
        if self.step_applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, ckpt_dir: Path) -> None:
        from safetensors.torch import save_file

        from train.checkpoint import writing  # errors name the file; disk full says so

        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        with writing(ckpt_dir / "model.safetensors"):
            save_file(state, str(ckpt_dir / "model.safetensors"))
        for name, obj in (("optimizer.pt", self.optimizer), ("scheduler.pt", self.scheduler)):
            with writing(ckpt_dir / name):
                torch.save(obj.state_dict(), ckpt_dir / name)
        # optimizer.pt indexes parameters by position: their names let another world size / engine resume it
        from train.portable import PARAM_NAMES, param_names

        with writing(ckpt_dir / PARAM_NAMES):
            (ckpt_dir / PARAM_NAMES).write_text(json.dumps(param_names(self.module, self.optimizer)), encoding="utf-8")

    def load(self, ckpt_dir: Path) -> None:
        from train.checkpoint import load_safetensors_file, load_torch_file  # errors name the file and cause

        self.module.load_state_dict(load_safetensors_file(ckpt_dir / "model.safetensors", device=str(self.device)))
        self.optimizer.load_state_dict(load_torch_file(ckpt_dir / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(load_torch_file(ckpt_dir / "scheduler.pt"))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.module.state_dict()


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-0/1/2/3 (+ CPU offload) around our AdamW (or DeepSpeedCPUAdam) and LambdaLR."""

    kind = "deepspeed"

    def __init__(self, cfg: DictConfig, model: nn.Module, info: DistInfo) -> None:
        import deepspeed

        self.device = info.device
        self.precision = resolve_precision(cfg, info.device)
        self.grad_accum = resolve_grad_accum(cfg, info.world_size)
        self.zero_stage = int(cfg.engine.zero_stage)
        self.world_size = info.world_size
        self.ds_config = deepspeed_config(cfg, info.world_size, self.precision)
        if self.zero_stage == 3 and hasattr(model, "always_run_image_path"):
            model.always_run_image_path = True  # frozen towers are sharded too: every rank must gather them
        optimizer = build_optimizer(model, cfg.optim, cpu_offload=bool(cfg.engine.offload_optimizer))
        scheduler = build_scheduler(optimizer, warmup_steps(cfg), cfg.train.steps, cfg.optim.lr,
                                    cfg.optim.min_lr, cfg.optim.schedule)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        if self.scheduler is not scheduler:
            raise RuntimeError("DeepSpeed replaced the LR scheduler; the config must not have a 'scheduler' key")
        self.module = self.ds.module
        self._last_global_steps = self.ds.global_steps

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.ds(**model_inputs(move_batch(batch, self.device)))

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed counts micro-batches itself: backward (scaled by 1/grad_accum) + step after EVERY
        # micro-batch; its step only updates (optimizer, clipping, our scheduler) at the accumulation boundary
        self.ds.backward(loss)
        self.ds.step()

    def step(self) -> float | None:
        if self.ds.global_steps != self._last_global_steps + 1:
            raise RuntimeError(f"DeepSpeed made {self.ds.global_steps - self._last_global_steps} optimizer steps "
                               f"over one accumulation window of {self.grad_accum} micro-batches (expected 1)")
        self._last_global_steps = self.ds.global_steps
        # ZeRO-1/2/3 skip the update and the scheduler themselves on a non-finite global norm (overflow check)
        self.step_applied = bool(self.ds.was_step_applied())
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return None
        norm = float(norm)
        return norm if math.isfinite(norm) else float("nan")

    def save(self, ckpt_dir: Path) -> None:
        from train.checkpoint import writing  # errors name the directory; disk full says so

        # collective: every rank writes its shards into the same (shared) directory
        with writing(ckpt_dir / "deepspeed"):
            self.ds.save_checkpoint(str(ckpt_dir), tag="deepspeed", save_latest=False)

    def load(self, ckpt_dir: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(ckpt_dir), tag="deepspeed", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{ckpt_dir}/deepspeed: no DeepSpeed checkpoint to resume from")
        self._last_global_steps = self.ds.global_steps

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        import torch.distributed as dist

        if self.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()  # gathers every partition on rank 0
            return dict(state) if dist.get_rank() == 0 else None
        return self.module.state_dict() if dist.get_rank() == 0 else None


def build_engine(cfg: DictConfig, model: nn.Module, info: DistInfo) -> Engine:
    if cfg.engine.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.engine.kind == "single":
        return SingleEngine(cfg, model, info)
    return DeepSpeedEngine(cfg, model, info)
