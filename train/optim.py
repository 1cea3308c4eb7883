"""Optimizer and LR schedule: AdamW param groups (no decay on norms/biases/embeddings/adapter tables,
optional ViT layer-wise LR decay) and linear warmup + cosine decay to min LR as a torch LambdaLR.

The schedule is ours on purpose (never a DeepSpeed scheduler): SPEC §5 notes the official fine-tuning
config's `WarmupLR` silently overrode its cosine decay.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

# parameters that are embeddings / lookup tables: no weight decay (norm weights and biases are caught by ndim)
NO_DECAY = frozenset({"llm.wte.weight", "visual.positional_embedding", "adapter.query", "adapter.pos_embed"})
_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")


def uses_weight_decay(name: str, p: torch.Tensor) -> bool:
    # ZeRO-3 (zero.Init) partitions in place: the local stub is 1-D, ds_shape keeps the real shape
    ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
    return ndim >= 2 and name not in NO_DECAY and not name.endswith(".bias")


def vit_layer_id(name: str, n_blocks: int) -> int:
    """Depth of a visual parameter for LLRD: stem (conv1, positional embedding, ln_pre) 0, block N -> N+1,
    anything after the blocks n_blocks+1."""
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith(("visual.conv1", "visual.positional_embedding", "visual.ln_pre")):
        return 0
    return n_blocks + 1


def lr_scale(name: str, llrd: float, n_blocks: int) -> float:
    """llrd ** (n_blocks + 1 - depth) for the vision tower; 1 for the adapter and the LLM."""
    if llrd >= 1.0 or not name.startswith("visual."):
        return 1.0
    return llrd ** (n_blocks + 1 - vit_layer_id(name, n_blocks))


def param_groups(model: nn.Module, lr: float, weight_decay: float, llrd: float = 1.0,
                 n_vit_blocks: int | None = None) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (decay?, LR scale). Each group carries `lr` (= lr x scale),
    `lr_scale` and `group` (a readable name)."""
    if n_vit_blocks is None:
        n_vit_blocks = len(model.visual.transformer.resblocks) if hasattr(model, "visual") else 0
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = uses_weight_decay(name, p)
        scale = lr_scale(name, llrd, n_vit_blocks)
        g = groups.get((decay, scale))
        if g is None:
            g = groups[(decay, scale)] = {
                "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * scale, "lr_scale": scale, "group": f"{'decay' if decay else 'no_decay'}@{scale:.4g}",
            }
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise ValueError("no trainable parameters (check train.freeze)")
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], -k[1]))]


class WarmupCosine:
    """LR multiplier at optimizer step s: linear warmup (s+1)/warmup, then cosine from 1 to
    min_ratio over the remaining steps, then min_ratio. `constant` keeps 1 after warmup."""

    def __init__(self, warmup: int, total: int, min_ratio: float, schedule: str = "cosine") -> None:
        self.warmup, self.total, self.min_ratio, self.schedule = int(warmup), int(total), float(min_ratio), schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim_cfg: Any, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (DeepSpeedCPUAdam when the optimizer state is offloaded to CPU)."""
    groups = param_groups(model, optim_cfg.lr, optim_cfg.weight_decay, optim_cfg.llrd)
    for g in groups:
        g.pop("names")  # keep groups to plain values: optimizers / DeepSpeed copy them
    kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=bool(optim_cfg.get("fused", False)) or None, **kw)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, lr: float, min_lr: float,
                    schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR multiplying each group's own LR (so LLRD scales are kept)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_lr / lr, schedule))
