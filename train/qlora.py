"""Q-LoRA's 4-bit base: the LLM's block linears replaced by bitsandbytes NF4 layers, on the CPU or CUDA, and
under every engine (single, ZeRO-2, ZeRO-3).

The packed 4-bit weight of each layer is held as a non-persistent BUFFER, not a parameter. That one choice
makes the frozen base invisible to everything that handles parameters:
- ZeRO-3 never partitions it (it partitions parameters only): every rank holds the whole 4-bit base, about
  0.52 byte per weight (3.3 GB for the 6.5B block weights of Qwen-VL's LLM), while the adapters, the biases
  and any fully trained module are partitioned as usual. Under `zero.Init` the full-precision linear is
  gathered one layer at a time to be quantised, so no rank ever holds a full-precision copy of the LLM.
- optimizers, DeepSpeed's bf16 cast and its parameter broadcast skip it (uint8, not a parameter);
- state dicts (checkpoints, ZeRO-3's consolidated export) never hold the 4-bit base (non-persistent): it is
  rebuilt at resume from the same init weights, and NF4 quantisation is deterministic, so its bytes match.
bitsandbytes' CPU fast path re-packs the weight in place on the first no-grad eval forward; it is switched
off so the base bytes never change during a run.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4")
# the LLM's block linears (never the ViT's or the adapter's: they stay unquantised)
_BLOCK = re.compile(r"llm\.h\.\d+\.(?:attn|mlp)")


class QLoraError(ValueError):
    """A Q-LoRA setting that cannot work here; the message names the setting."""


def bnb_module() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - a regular dependency on Linux
        raise QLoraError("lora.qlora=true needs bitsandbytes (pip install 'bitsandbytes>=0.45')") from err
    return bnb


_LINEAR4BIT: type | None = None


def linear4bit_class() -> type:
    """bitsandbytes' Linear4bit (so peft still dispatches its bnb LoRA layer) whose state dict holds the bias
    only: its own `_save_to_state_dict` would add the quant-state tensors of the unsaved 4-bit base."""
    global _LINEAR4BIT
    if _LINEAR4BIT is None:
        bnb = bnb_module()

        class FrozenLinear4bit(bnb.nn.Linear4bit):
            def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
                nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

        _LINEAR4BIT = FrozenLinear4bit
    return _LINEAR4BIT


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full values of ZeRO-3 partitioned parameters inside the block (a no-op for ordinary ones)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None)
    return contextlib.nullcontext()


def quantize_linear(lin: nn.Linear, *, compute_dtype: torch.dtype, device: torch.device | str,
                    quant_type: str = "nf4", double_quant: bool = True) -> nn.Module:
    """A frozen bitsandbytes Linear4bit with `lin`'s weights quantised on `device` (packed weight as a
    non-persistent buffer, bias a frozen parameter in compute_dtype)."""
    bnb = bnb_module()
    if quant_type not in QUANT_TYPES:
        raise QLoraError(f"lora.quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    q = linear4bit_class()(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                          compress_statistics=double_quant, quant_type=quant_type, device="meta")
    with _gathered([p for p in (lin.weight, lin.bias) if p is not None]), torch.no_grad():
        w = lin.weight.detach().to("cpu", torch.float32, copy=True)
        b = None if lin.bias is None else lin.bias.detach().to("cpu", compute_dtype, copy=True)
    packed = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
                               module=q).to(device)  # quantisation happens here, on the target device
    del q._parameters["weight"]
    q.register_buffer("weight", packed, persistent=False)
    q.bias = None if b is None else nn.Parameter(b.to(device), requires_grad=False)
    q.support_avx512bf16_for_cpu = False  # no in-place re-packing of the base on CPU eval forwards
    return q


def quantize_llm_4bit(model: nn.Module, *, compute_dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", quant_type: str = "nf4", double_quant: bool = True) -> int:
    """Replace every `llm.h.N.{attn,mlp}` nn.Linear with a 4-bit layer (QLoRA: embeddings, lm_head, norms,
    the ViT and the adapter stay full precision); returns how many. Call before `apply_lora`, which then
    puts its adapters on top of the 4-bit layers (peft's bnb.Linear4bit LoRA layer)."""
    n = 0
    for name, parent in list(model.named_modules()):
        if not _BLOCK.fullmatch(name):
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, child_name, quantize_linear(child, compute_dtype=compute_dtype, device=device,
                                                            quant_type=quant_type, double_quant=double_quant))
                n += 1
    model.is_loaded_in_4bit = True  # peft dispatches its bitsandbytes-aware LoRA layer on this flag
    return n


def base_4bit_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> packed 4-bit weight of every quantised layer (what a step must leave bitwise unchanged)."""
    bnb = bnb_module()
    return {f"{name}.weight": m.weight.data for name, m in model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)}


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight a 4-bit layer computes with (for NF4 error bounds in tests and reports)."""
    bnb = bnb_module()
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
