"""Memory planner: bytes per rank for parameters, gradients, optimizer states and an activation estimate, for
a recipe under an engine and a world size, without building the model (counted on the meta device).

usage: python -m train.plan recipe=finetune_qlora engine=zero3 world_size=8 [hydra overrides...]

Model states (exact up to ZeRO's padding of each partition to a multiple of the world size):
- parameters: every full-precision parameter in the run's dtype (bf16 2 bytes, fp32 4); under ZeRO-3 split
  over the ranks. Q-LoRA's 4-bit base is replicated on every rank (train/qlora.py): 0.5 byte per weight plus
  the block scales (blocks of 64: an fp32 absmax each, or with double quant an 8-bit one plus an fp32 scale
  per 256 blocks).
- gradients: one per trained element in the run's dtype, split over the ranks from ZeRO-2 on; with bf16
  DeepSpeed also an fp32 partition of them (4 bytes per trained element / world), into which ZeRO-3
  reduce-scatters directly (its bf16 gradients live only in the reduce buckets). The single engine keeps
  fp32 weights and gradients under bf16 autocast.
- optimizer: AdamW's two fp32 moments per trained element, plus an fp32 master copy when the weights are
  bf16; split over the ranks from ZeRO-1 on (on the CPU with engine.offload_optimizer).
Activations: an ESTIMATE for one micro-batch of data.seq_len tokens through the LLM, in the run's dtype:
34 x seq x hidden values per block kept for the backward pass (Korthikanti et al. 2022, with a fused
attention kernel that keeps no seq^2 scores), or 2 x seq x hidden per block plus one block's 34 with
engine.grad_checkpointing; plus the loss's logits chunk (model.loss_chunk_tokens x vocab, fp32) twice.
The ViT and the adapter are left out of the activation estimate.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from omegaconf import DictConfig

NF4_BLOCK, NESTED_BLOCK = 64, 256


@dataclass
class Plan:
    world_size: int
    zero_stage: int
    dtype_bytes: int
    param_elements: int  # full-precision parameter elements (adapters included; the 4-bit base excluded)
    trained_elements: int
    base_4bit_elements: int
    params: int  # bytes per rank: full-precision parameters this rank holds
    params_4bit: int  # bytes per rank: Q-LoRA's replicated 4-bit base (0 without Q-LoRA)
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.params_4bit + self.grads + self.optimizer + self.activations


def bytes_4bit(n: int, double_quant: bool) -> int:
    """Bytes of one layer's n weights in NF4/FP4, bitsandbytes' layout: packed nibbles, the 16-value fp32 code
    and the per-block absmax scales (fp32; with double quant uint8, plus fp32 scales per 256 blocks, their
    256-value code and an fp32 offset)."""
    blocks = math.ceil(n / NF4_BLOCK)
    scales = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(n / 2) + 4 * 16 + scales


def _split(n: int, world: int) -> int:
    """Elements per rank of n split evenly, padded as ZeRO pads each partition."""
    return -(-n // world)


def _meta_model(cfg: DictConfig) -> torch.nn.Module:
    from train.config import model_cfg
    from train.lora import apply_lora

    with torch.device("meta"):
        try:  # the run's model family (Qwen-VL, Qwen2-VL) when the registry is there
            from train.model.families import get_family

            model = get_family(str(cfg.model.get("family", "qwen_vl"))).build_model(model_cfg(cfg))
        except ImportError:
            from train.model.qwen_vl import QwenVL

            model = QwenVL(model_cfg(cfg))
        lo = cfg.lora
        if lo.enabled:
            apply_lora(model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, targets=list(lo.targets),
                       train_modules=list(lo.train_modules), modules_to_save=list(lo.modules_to_save),
                       rslora=lo.rslora, dora=lo.dora)
        else:
            from train.freeze import apply_freeze

            apply_freeze(model, list(cfg.train.freeze))
    return model


def plan(cfg: DictConfig, world_size: int) -> Plan:
    """The per-rank byte counts of this run (see the module docstring)."""
    import re

    e, lo = cfg.engine, cfg.lora
    stage = int(e.zero_stage) if e.kind == "deepspeed" else 0
    device = "cuda" if e.device == "cuda" or (e.device == "auto" and torch.cuda.is_available()) else "cpu"
    precision = e.precision if e.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    # the single engine keeps fp32 weights under bf16 autocast; DeepSpeed's bf16 holds bf16 weights
    dt = 2 if precision == "bf16" and e.kind == "deepspeed" else 4
    model = _meta_model(cfg)
    quantised = re.compile(r"llm\.h\.\d+\.(?:attn|mlp)\.[^.]+(?:\.base_layer)?\.weight")
    full = trained = base4 = bytes4 = 0
    for name, p in model.named_parameters():
        if lo.enabled and lo.qlora and quantised.fullmatch(name):
            base4 += p.numel()
            bytes4 += bytes_4bit(p.numel(), bool(lo.double_quant))
            continue
        full += p.numel()
        trained += p.numel() if p.requires_grad else 0
    params = _split(full, world_size) if stage == 3 else full
    per_rank_trained = _split(trained, world_size)
    grads = (per_rank_trained if stage >= 2 else trained) * dt
    if dt == 2 and stage >= 1:  # bf16 ZeRO: the fp32 gradient partition the optimizer steps on
        # (ZeRO-3 reduce-scatters straight into it: its bf16 gradients only live in the reduce buckets)
        grads = (0 if stage == 3 else grads) + 4 * per_rank_trained
    opt_elems = per_rank_trained if stage >= 1 else trained
    optimizer = opt_elems * (8 + (4 if dt == 2 else 0))
    m = cfg.model
    seq, hidden, layers = int(cfg.data.seq_len), int(m.llm.hidden), int(m.llm.layers)
    tokens = seq * int(cfg.train.micro_batch_size)
    kept = (2 * layers + 34) if e.grad_checkpointing else 34 * layers
    logits = 2 * min(int(m.loss_chunk_tokens), tokens) * int(m.llm.vocab_size) * 4
    return Plan(world_size=world_size, zero_stage=stage, dtype_bytes=dt, param_elements=full,
                trained_elements=trained, base_4bit_elements=base4, params=params * dt,
                params_4bit=bytes4, grads=grads,
                optimizer=0 if e.offload_optimizer else optimizer, activations=kept * tokens * hidden * dt + logits)


def _gib(n: int) -> str:
    return f"{n / 2**30:10.3f} GiB" if n >= 2**27 else f"{n / 2**20:10.3f} MiB"


def render(p: Plan, recipe: str) -> str:
    rows = [("parameters (full precision)", p.params), ("parameters (4-bit base, replicated)", p.params_4bit),
            ("gradients", p.grads), ("optimizer states", p.optimizer), ("activations (estimate)", p.activations),
            ("total", p.total)]
    head = (f"{recipe}: ZeRO-{p.zero_stage}, world size {p.world_size}, {p.dtype_bytes}-byte weights; "
            f"{p.param_elements:,} full-precision parameter elements ({p.trained_elements:,} trained)"
            + (f", {p.base_4bit_elements:,} in 4-bit" if p.base_4bit_elements else ""))
    return "\n".join([head, "bytes per rank:"] + [f"  {k:<38}{_gib(v)}  ({v:,} B)" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    from train.config import ConfigError, load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    world = [a for a in argv if a.startswith("world_size=")]
    rest = [a for a in argv if not a.startswith("world_size=")]
    try:
        world_size = int(world[-1].split("=", 1)[1]) if world else 1
        if world_size < 1:
            raise ValueError
    except ValueError:
        print(f"train.plan: world_size must be a positive integer, got {world[-1]!r}", file=sys.stderr)
        return 2
    try:
        # keys checked, not cross-field validation: data roots and weights need not exist to plan
        cfg = load_config(rest, world_size=world_size, check=False)
    except ConfigError as err:
        print(f"train.plan: {err}", file=sys.stderr)
        return 2
    recipe = next((a.split("=", 1)[1] for a in rest if a.startswith("recipe=")), "?")
    p = plan(cfg, world_size)
    print(render(p, recipe))
    return 0


def as_dict(p: Plan) -> dict[str, Any]:
    return {**asdict(p), "total": p.total}


if __name__ == "__main__":
    raise SystemExit(main())
