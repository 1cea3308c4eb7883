"""Training FLOPs of a step, the device's peak FLOP/s, and MFU.

FLOP formula (`FlopsModel`), counting multiply-adds as 2 FLOPs and only matmul work (norms, softmax,
elementwise ops and the embedding lookup are left out; activation-checkpointing recompute is not charged,
as MFU conventionally does). Each weight matrix of N elements costs, per row it is applied to:

    2N forward  +  2N activation gradient (when any gradient has to cross it: its module, or one before it,
    trains)  +  2N weight gradient (when the parameter itself trains)

so 6N for a trained weight, 4N for a frozen one that gradients cross (a frozen base under LoRA, a frozen
LLM in stage 1), 2N for a frozen module nothing before trains (the frozen ViT runs under no_grad). The rows:

- LLM blocks: every real (non-padding) token. Output head (V x hidden): only tokens with a valid target
  (the loss sends no other row through it). Attention, per layer: 4 * hidden * P forward (QK^T and AV,
  2 * hidden each per query-key pair), with P = sum over packed documents of L_i (L_i + 1) / 2, the pairs a
  document-causal kernel computes; backward 2x forward when gradients cross the LLM.
- ViT, per image of L = (image_size / patch)^2 patches: every weight (the patch conv included) per patch;
  attention 4 * width * L^2 per layer forward (L * ws^2 with window attention of ws x ws patches,
  windows padded as the model pads them), backward 2x when the tower trains.
- Adapter, per image: `kv_proj` and the key/value in-projections per patch; the query in-projection,
  `out_proj` and `proj` per query (n_queries, 256); cross-attention 4 * dim * n_queries * L forward.

Qwen2-VL (a config without `adapter`): images come as patch rows, and the loop's `images` count is the
batch's patch rows (`pixel_values.shape[0]`), so the image term is per patch: every ViT weight per patch and
the 2x2 merger's weights per merged token (1 / merge^2 per patch); the ViT's per-image attention (quadratic in
each image's own patch count, which a patch total does not give) is left out.

Peak (`resolve_peak_flops`): an explicit `logging.peak_flops`, else a table of dense bf16/TF32/fp32 peaks
per GPU model, else a short matmul benchmark on the device itself (always on the CPU), measured once per
process and dtype and cached.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import nn

MODULE_ORDER = ("visual", "adapter", "llm")  # the order gradients cross: llm -> adapter -> visual


def _numel(p: torch.Tensor) -> int:
    """Logical element count: ZeRO-3 partitions keep it in ds_numel, 4-bit weights in quant_state.shape."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


def _is_matrix(p: torch.Tensor) -> bool:
    shape = getattr(p, "ds_shape", None) or getattr(getattr(p, "quant_state", None), "shape", None) or p.shape
    return len(shape) >= 2


def causal_pairs(segment_ids: torch.Tensor) -> torch.Tensor:
    """sum over documents of L_i (L_i + 1) / 2 for [B,T] segment ids (0 = padding), as a 0-d float64 tensor
    on the same device, without a host sync: each token contributes its position in its document + 1."""
    seg = segment_ids
    t = torch.arange(seg.shape[-1], device=seg.device).expand_as(seg)
    start = torch.ones_like(seg, dtype=torch.bool)
    start[..., 1:] = seg[..., 1:] != seg[..., :-1]
    first = torch.where(start, t, torch.zeros_like(t)).cummax(-1).values
    return ((t - first + 1) * (seg != 0)).sum().double()


class FlopsModel:
    """`flops(tokens, images, target_tokens=None, attn_pairs=None)`: training FLOPs of one step (see the
    module docstring). `tokens` = real tokens, `images` = images, `target_tokens` = tokens with a valid
    target (default: all tokens), `attn_pairs` = `causal_pairs(segment_ids)` summed over the step (default:
    0, attention left out). Trainability is read from the model's parameters when this is built."""

    def __init__(self, model: nn.Module, cfg: Any) -> None:
        v, a, m = cfg.vision, getattr(cfg, "adapter", None), cfg.llm
        trains = {k: any(p.requires_grad for p in getattr(model, k).parameters()) for k in MODULE_ORDER}
        # gradients cross a module when it or any module before it trains
        crossed = {k: any(trains[j] for j in MODULE_ORDER[: i + 1]) for i, k in enumerate(MODULE_ORDER)}

        def cost(p: torch.Tensor, module: str) -> int:
            return (2 + 2 * crossed[module] + 2 * p.requires_grad) * _numel(p)

        # per-row weight FLOPs (already multiplied by the 2/4/6 factor)
        self.vit_per_patch = sum(cost(p, "visual") for n, p in model.visual.named_parameters()
                                 if _is_matrix(p) and not n.startswith("positional_embedding"))
        self.adapter_per_patch = self.adapter_per_query = 0
        self._llm_terms(model, m, crossed, cost)
        if a is None:  # Qwen2-VL: an "image" is one patch row (module doc)
            self.patches, self.n_queries = 1, 0
            self.adapter_per_patch = sum(cost(p, "adapter") for p in model.adapter.parameters()
                                         if _is_matrix(p)) // v.merge_size**2
            self.vit_attn = self.adapter_attn = 0
            return
        self.patches = (v.image_size // v.patch_size) ** 2
        self.n_queries = a.n_queries
        for n, p in model.adapter.named_parameters():
            if not _is_matrix(p) or n.startswith(("query", "pos_embed")):
                continue  # inputs, not matmul weights
            c = cost(p, "adapter")
            if n.startswith("attn.in_proj_weight"):  # [3*dim, dim]: q rows per query, k/v rows per patch
                self.adapter_per_query += c // 3
                self.adapter_per_patch += c - c // 3
            elif n.startswith(("attn.out_proj", "proj")):
                self.adapter_per_query += c
            else:  # kv_proj (and any other weight) sees the patches
                self.adapter_per_patch += c
        ws = v.window_size
        if ws > 0:
            nw = -(-v.grid // ws)
            vit_pairs = nw * nw * (ws * ws) ** 2
        else:
            vit_pairs = self.patches**2
        vit_attn_fwd = 4 * v.width * vit_pairs * v.layers
        self.vit_attn = vit_attn_fwd * (1 + 2 * crossed["visual"])
        self.adapter_attn = 4 * m.hidden * a.n_queries * self.patches * (1 + 2 * crossed["adapter"])

    def _llm_terms(self, model: nn.Module, m: Any, crossed: dict[str, bool], cost: Any) -> None:
        self.llm_per_token = self.head_per_target = 0
        for n, p in model.llm.named_parameters():
            if not _is_matrix(p) or n.startswith(("wte", "embed")):
                continue  # the embedding is a lookup
            if n.startswith("lm_head"):
                self.head_per_target += cost(p, "llm")
            else:
                self.llm_per_token += cost(p, "llm")
        # Q-LoRA: the frozen 4-bit base weights are buffers (never partitioned or optimised), not parameters
        self.llm_per_token += sum(cost(b, "llm") for _, b in model.llm.named_buffers() if hasattr(b, "quant_state"))
        self.llm_attn_per_pair = 4 * m.hidden * m.layers * (1 + 2 * crossed["llm"])

    def per_image(self) -> int:
        return (self.patches * (self.vit_per_patch + self.adapter_per_patch) + self.n_queries * self.adapter_per_query
                + self.vit_attn + self.adapter_attn)

    def __call__(self, tokens: float, images: float, target_tokens: float | None = None,
                 attn_pairs: float | None = None) -> float:
        target_tokens = tokens if target_tokens is None else target_tokens
        attn_pairs = 0.0 if attn_pairs is None else attn_pairs
        return (self.llm_per_token * tokens + self.head_per_target * target_tokens
                + self.llm_attn_per_pair * attn_pairs + self.per_image() * images)


def mfu(flops: float, seconds: float, peak_flops: float, world_size: int) -> float:
    """Model FLOPs utilisation estimate: FLOPs / (time x peak per device x devices)."""
    if seconds <= 0 or peak_flops <= 0:
        return 0.0
    return flops / (seconds * peak_flops * world_size)


# -------------------------------------------------------------------------------------------------- peak
# Dense (no sparsity) tensor-core peaks per GPU, FLOP/s: bf16, tf32, fp32 (vendor datasheets, SXM unless named).
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"peak FLOP/s: unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def gpu_table_peak(name: str, dtype: torch.dtype | str, tf32: bool = False) -> float | None:
    """The table's dense peak for a GPU model name (e.g. torch.cuda.get_device_name()), or None if unknown."""
    key = "bf16" if _dtype(dtype) in (torch.bfloat16, torch.float16) else ("tf32" if tf32 else "fp32")
    for model, peaks in GPU_PEAKS:  # most specific names first
        if model.lower() in name.lower():
            return peaks[key]
    return None


@functools.cache
def measure_matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` FLOP/s of an [n,n] x [n,n] matmul on `device` in `dtype` (cached per process)."""
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b  # warm-up: kernel selection, thread pool
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def resolve_peak_flops(device: torch.device | str, dtype: torch.dtype | str, override: float | None) -> float:
    """Peak FLOP/s per device for MFU: `override` (logging.peak_flops) when set, else the GPU table, else a
    matmul benchmark measured once on the device (the CPU always measures)."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"logging.peak_flops must be > 0 (FLOP/s per device) or null for auto; got {override}")
        return float(override)
    dev = torch.device(device)
    dt = _dtype(dtype)
    if dev.type == "cuda":
        peak = gpu_table_peak(torch.cuda.get_device_name(dev), dt, torch.backends.cuda.matmul.allow_tf32)
        if peak is not None:
            return peak
    return measure_matmul_peak(str(dev), dt)
