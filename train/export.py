"""Final-export helpers for LoRA / Q-LoRA runs: the plain model's keys for `train.lora.merge_lora_state`
(which works on a ZeRO-3 consolidated state, where peft's layers hold only partitions), and the adapters
saved alone. Q-LoRA merges into the full-precision base weights re-read from the run's init checkpoint, never into
the 4-bit ones (the official repo's "Q-LoRA adapters cannot be merged" defect, SPEC §5)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from train.model.config import QwenVLConfig


def expected_keys(mcfg: QwenVLConfig) -> dict[str, torch.Size]:
    """key -> shape of the plain (un-adapted) model's state dict, built on the meta device."""
    from train.model.qwen_vl import QwenVL

    with torch.device("meta"):
        ref = QwenVL(mcfg)
    return {k: v.shape for k, v in ref.state_dict().items()}


def save_lora_adapters(state: Mapping[str, torch.Tensor], dest: Path, cfg: DictConfig) -> Path:
    """The trained adapters (and lora.train_modules) alone: adapter_model.safetensors + adapter_config.json
    (internal names), written into a temp dir and renamed."""
    import shutil

    from safetensors.torch import save_file

    lo = cfg.lora
    keep = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()
            if ".lora_" in k or k.split(".", 1)[0] in lo.train_modules}
    tmp = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(keep, str(tmp / "adapter_model.safetensors"))
    meta = {"r": lo.r, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout, "target_modules": list(lo.targets),
            "train_modules": list(lo.train_modules), "qlora": lo.qlora,
            "base_model": cfg.init.from_stage_dir or cfg.init.official,
            "config": OmegaConf.to_container(cfg.lora, resolve=True)}
    (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def lora_base_weights(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Full-precision weights the run started from (init.from_stage_dir or init.official), internal names."""
    from train.config import model_cfg
    from train.model.official import load_official
    from train.model.qwen_vl import QwenVL

    path = cfg.init.from_stage_dir or cfg.init.official
    if not path:
        raise ValueError("Q-LoRA export needs init.from_stage_dir or init.official (the full-precision base)")
    with torch.device("meta"):
        model = QwenVL(model_cfg(cfg))
    model.to_empty(device="cpu")
    load_official(model, path)
    return model.state_dict()
