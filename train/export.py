"""Final-export helpers for LoRA / Q-LoRA runs: the plain model's keys for `train.lora.merge_lora_state`
(which works on a ZeRO-3 consolidated state, where peft's layers hold only partitions), and the adapters
saved alone. Q-LoRA merges into the full-precision base weights re-read from the run's init checkpoint, never into
the 4-bit ones (the official repo's "Q-LoRA adapters cannot be merged" defect, SPEC §5)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from train.lora import ADAPTER as ADAPTER_NAME
from train.model.config import QwenVLConfig


def expected_keys(mcfg: QwenVLConfig) -> dict[str, torch.Size]:
    """key -> shape of the plain (un-adapted) model's state dict, built on the meta device."""
    from train.model.families import DEFAULT_FAMILY, get_family

    with torch.device("meta"):  # the config's family (Qwen2-VL configs carry family = "qwen2_vl")
        ref = get_family(getattr(mcfg, "family", DEFAULT_FAMILY)).build_model(mcfg)
    return {k: v.shape for k, v in ref.state_dict().items()}


PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS, ADAPTER_CONFIG, RUN_META = "adapter_model.safetensors", "adapter_config.json", "qwenvl_lora.json"


def trained_modules(lo: DictConfig) -> list[str]:
    """Module paths trained fully besides the adapters (lora.train_modules + lora.modules_to_save)."""
    return [*lo.train_modules, *lo.get("modules_to_save", [])]


def peft_config(lo: DictConfig, base_model: str | None = None) -> Any:
    """The peft LoraConfig of a run's adapters (what `peft.PeftModel.from_pretrained` rebuilds)."""
    from peft import LoraConfig

    from train.lora import target_regex

    full = trained_modules(lo)
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=target_regex(list(lo.targets)),
                      bias="none", use_rslora=bool(lo.get("rslora", False)), use_dora=bool(lo.get("dora", False)),
                      modules_to_save=full or None, base_model_name_or_path=base_model)


def to_peft_layout(state: Mapping[str, torch.Tensor], lo: DictConfig) -> dict[str, torch.Tensor]:
    """Internal names -> peft's saved names (`base_model.model.<path>`, the adapter name dropped, as
    `peft.get_peft_model_state_dict` writes them): the adapters and the fully trained modules only."""
    full = tuple(f"{m}." for m in trained_modules(lo))
    out = {}
    for k, v in state.items():
        if ".lora_" in k:
            out[PEFT_PREFIX + k.replace(f".{ADAPTER_NAME}", "")] = v
        elif full and k.startswith(full):
            out[PEFT_PREFIX + k] = v
    return out


def save_lora_adapters(state: Mapping[str, torch.Tensor], dest: Path, cfg: DictConfig) -> Path:
    """The trained adapters (and the fully trained modules) alone, in peft's layout: adapter_model.safetensors
    + adapter_config.json, loadable by `peft.PeftModel.from_pretrained(QwenVL(...), dest)`; the run's LoRA
    settings in qwenvl_lora.json. Written into a temp dir and renamed."""
    import shutil

    from safetensors.torch import save_file

    lo = cfg.lora
    keep = {k: v.detach().contiguous().cpu().clone() for k, v in to_peft_layout(state, lo).items()}
    if not any(".lora_" in k for k in keep):
        raise ValueError(f"{dest}: the state holds no LoRA adapter tensor (an empty adapter export)")
    tmp = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(keep, str(tmp / ADAPTER_WEIGHTS))
    base = cfg.init.from_stage_dir or cfg.init.official
    peft_config(lo, base).save_pretrained(str(tmp))
    meta = {"r": lo.r, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout, "target_modules": list(lo.targets),
            "train_modules": list(lo.train_modules), "qlora": lo.qlora, "base_model": base,
            "config": OmegaConf.to_container(cfg.lora, resolve=True)}
    (tmp / RUN_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def load_lora_adapters(model: torch.nn.Module, src: Path) -> Any:
    """`peft.PeftModel` of `model` (a plain QwenVL holding the base weights) with the adapters of `src`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(src), is_trainable=False)


def lora_base_weights(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Full-precision weights the run started from (init.from_stage_dir or init.official), internal names."""
    from train.config import model_cfg
    from train.model.families import get_family

    family = get_family(str(cfg.model.family))
    path = cfg.init.from_stage_dir or cfg.init.official
    if not path:
        raise ValueError("Q-LoRA export needs init.from_stage_dir or init.official (the full-precision base)")
    with torch.device("meta"):
        model = family.build_model(model_cfg(cfg))
    model.to_empty(device="cpu")
    family.checkpoint.fn("load")(model, path)  # Qwen-VL: official.load_official; Qwen2-VL: hf.load_hf
    return model.state_dict()
