"""Document-causal attention for packed rows without a dense [T,T] mask.

A packed row holds several samples; `segment_ids` [B,T] numbers them (1..k, 0 = padding) in contiguous
runs (data/packing.py). Every token attends causally to the earlier tokens of its own run. The paths:

- ``sdpa_causal``: no segments, or every row is one run: SDPA ``is_causal=True`` (flash/efficient kernels).
- ``flash_varlen``: CUDA, flash-attn installed and the *compute* dtype (autocast's, not the residual's) is
  fp16/bf16: the runs become separate sequences through ``cu_seqlens``.
- ``flex``: FlexAttention with a BlockMask built from run boundaries at block granularity (never [T,T]),
  through ``torch.compile(flex_attention)`` compiled once per process (eager flex materialises the scores).
  Default on CUDA. torch has no flex backward on the CPU, so there it serves only no-grad forwards.
- ``sdpa_docs``: SDPA ``is_causal`` over each run (memory-linear flash kernel on the CPU too, with
  backward); consecutive short runs are grouped into chunks of at most ``DOC_CHUNK`` tokens with a small
  [c,c] mask so a row of many tiny samples is not hundreds of calls. Default on the CPU.
- ``sdpa_dense``: the dense [B,1,T,T] reference mask (and the KV-cache decoding path).

The path is chosen once per forward (`plan_attention`), logged once per process per path on the
``train.attention`` logger, and counted in `path_counts` / `last_path` for tests.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

try:  # optional fast path for packed training on GPU (extra `[flash]`)
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure (missing, CUDA mismatch) just disables it
    flash_attn_varlen_func = None

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch: flex is simply unavailable
    BlockMask, flex_attention = None, None

IMPLS = ("auto", "flex", "flash", "sdpa_docs", "sdpa_dense")
DOC_CHUNK = 256  # runs shorter than this are grouped into chunks of at most this many tokens (sdpa_docs)
FLEX_BLOCK = 128  # FlexAttention's default block size

log = logging.getLogger("train.attention")
path_counts: Counter[str] = Counter()  # forwards planned per path (one count per model forward)
last_path: str | None = None
_logged: set[str] = set()
_compiled_flex: Any = None


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"model.llm.attn_impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls actually run in: autocast's for x's device when autocast is on, else x's own."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError):  # torch < 2.4: CUDA-only autocast queries
        if dev == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


def flex_available() -> bool:
    return flex_attention is not None


def flash_available() -> bool:
    return flash_attn_varlen_func is not None


def select_path(
    impl: str, device_type: str, dtype: torch.dtype, flash_ok: bool = True, flex_ok: bool = True
) -> str:
    """The packed-row path for `impl` on a device and compute dtype (pure; `plan_attention` applies it).

    auto: flash_varlen where it runs (CUDA + installed + half compute dtype), else flex on CUDA, else
    sdpa_docs. An explicit choice that cannot run is an error, not a silent fallback."""
    check_impl(impl)
    half = dtype in (torch.float16, torch.bfloat16)
    if impl == "auto":
        if device_type == "cuda" and flash_ok and half:
            return "flash_varlen"
        if device_type == "cuda" and flex_ok:
            return "flex"
        return "sdpa_docs"
    if impl == "flash":
        if not (device_type == "cuda" and flash_ok and half):
            raise ValueError(
                "model.llm.attn_impl=flash needs CUDA, the flash-attn package (extra [flash]) and an fp16/bf16 "
                f"compute dtype; got device {device_type}, dtype {dtype}, flash-attn "
                f"{'installed' if flash_ok else 'missing'}"
            )
        return "flash_varlen"
    if impl == "flex" and not flex_ok:
        raise ValueError("model.llm.attn_impl=flex needs torch.nn.attention.flex_attention (torch >= 2.5)")
    return impl


def build_attention_mask(
    q_seg: torch.Tensor | None, k_seg: torch.Tensor | None, tq: int, tk: int, device: torch.device
) -> torch.Tensor:
    """Boolean mask [B or 1,1,tq,tk]: causal (queries are the last tq of tk keys) AND same segment.

    The reference (and KV-cache) path only: O(tq*tk). The diagonal is always allowed so that no row is
    fully masked (padding queries with segment 0 would otherwise give NaN softmax).
    """
    offset = tk - tq
    qi = torch.arange(tq, device=device)[:, None] + offset
    kj = torch.arange(tk, device=device)[None, :]
    causal = kj <= qi
    if q_seg is None or k_seg is None:
        return causal[None, None]
    same = q_seg[:, :, None] == k_seg[:, None, :]
    return ((same & causal) | (kj == qi))[:, None]


def run_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B,T] bool: True where a contiguous run of equal segment id starts (always at t = 0)."""
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return start


def cu_seqlens(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths of contiguous equal-segment runs over the flattened [B*T] tokens (one host sync)."""
    B, T = segment_ids.shape
    starts = run_starts(segment_ids).flatten().nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def doc_chunks(segment_ids: torch.Tensor, chunk: int = DOC_CHUNK) -> list[list[tuple[int, int, torch.Tensor | None]]]:
    """Per row, chunks (start, end, mask) covering [0,T): a run of >= `chunk` tokens is one chunk with mask
    None (is_causal); shorter consecutive runs are grouped up to `chunk` tokens with a [c,c] block-causal
    mask. Total mask size per row <= T*chunk, so memory stays linear in T."""
    B, T = segment_ids.shape
    starts = run_starts(segment_ids).cpu()
    out = []
    for b in range(B):
        s = starts[b].nonzero().flatten().tolist() + [T]
        runs = list(zip(s[:-1], s[1:]))
        groups: list[list[tuple[int, int]]] = []
        for r in runs:
            if groups and r[1] - groups[-1][0][0] <= chunk:
                groups[-1].append(r)
            else:
                groups.append([r])
        row = []
        for g in groups:
            a, e = g[0][0], g[-1][1]
            mask = None
            if len(g) > 1:
                doc = torch.repeat_interleave(torch.arange(len(g)), torch.tensor([r1 - r0 for r0, r1 in g]))
                mask = (doc[:, None] == doc[None, :]).tril().to(segment_ids.device)
            row.append((a, e, mask))
        out.append(row)
    return out


def flex_blocks(segment_ids: torch.Tensor, block: int = FLEX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-level masks [B,nb,nb] for document-causal attention over contiguous runs: `partial` (some
    pairs attend: flex calls mask_mod) and `full` (every pair attends: no mask_mod call).

    Run ids (cumulative run count) are non-decreasing along a row, so for key block j <= query block i
    some pair attends iff the last run of block j reaches the first run of block i, and the whole block
    attends iff j < i and both blocks lie in one run. O((T/block)^2), never [T,T]; no host sync."""
    T = segment_ids.shape[1]
    doc = run_starts(segment_ids).cumsum(1, dtype=torch.int32)
    nb = -(-T // block)
    idx = torch.arange(nb, device=doc.device)
    first = doc[:, idx * block]  # [B,nb]
    last = doc[:, ((idx + 1) * block - 1).clamp(max=T - 1)]
    qi, kj = idx[:, None], idx[None, :]
    some = (kj <= qi) & (last[:, None, :] >= first[:, :, None])
    full = (kj < qi) & (first[:, None, :] == last[:, :, None])
    return some & ~full, full


def flex_block_mask(segment_ids: torch.Tensor, block: int = FLEX_BLOCK) -> Any:
    """FlexAttention BlockMask (one head broadcast) for document-causal attention from `segment_ids`."""
    T = segment_ids.shape[1]
    partial, full = flex_blocks(segment_ids, block)
    nb = partial.shape[-1]
    # Run ids padded to whole blocks (id -1) so mask_mod may index past T in the last block.
    doc = F.pad(run_starts(segment_ids).cumsum(1, dtype=torch.int32), (0, nb * block - T), value=-1)

    def mask_mod(b, h, q, k):  # noqa: ANN001, ANN202 - flex's traced signature
        return (k <= q) & (doc[b, q] == doc[b, k])

    def lists(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = m.sum(-1, dtype=torch.int32)[:, None]  # [B,1,nb]
        ind = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)[:, None]
        return num, ind

    kv_num, kv_ind = lists(partial)
    full_num, full_ind = lists(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_ind, full_num, full_ind, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T)
    )


def _flex() -> Any:
    """torch.compile(flex_attention), built once per process (recompiles only on new shapes)."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


@dataclass
class AttentionPlan:
    """What every layer of one forward does; built once per forward and shared across layers."""

    path: str
    mask: torch.Tensor | None = None  # sdpa_dense
    cu: tuple[torch.Tensor, int] | None = None  # flash_varlen
    block_mask: Any = None  # flex
    chunks: list = field(default_factory=list)  # sdpa_docs
    compiled: bool = True  # flex: through torch.compile (eager only for small-shape tests)
    dtype: torch.dtype | None = None  # flash_varlen: the half compute dtype its kernel needs


def _record(path: str, why: str) -> None:
    global last_path
    path_counts[path] += 1
    last_path = path
    if path not in _logged:
        _logged.add(path)
        log.info("attention path %s (%s)", path, why)


def plan_attention(
    segment_ids: torch.Tensor | None,
    impl: str,
    x: torch.Tensor,
    allow_flash: bool = True,
) -> AttentionPlan:
    """Choose and prepare the attention path for a full-sequence forward (no KV cache) of x [B,T,H]."""
    dtype = compute_dtype(x)
    if segment_ids is None:
        _record("sdpa_causal", "no segment_ids")
        return AttentionPlan("sdpa_causal")
    on_host = segment_ids.device.type == "cpu"
    if on_host and impl != "sdpa_dense" and bool((segment_ids == segment_ids[:, :1]).all()):
        # Free to check on the CPU; on CUDA it would be a host sync per forward, and flex's block
        # sparsity already makes a one-run row causal-cost.
        _record("sdpa_causal", "every row is one segment")
        return AttentionPlan("sdpa_causal")
    path = select_path(impl, x.device.type, dtype, allow_flash and flash_available(), flex_available())
    why = f"attn_impl={impl}, {x.device.type}, compute dtype {dtype}"
    T = segment_ids.shape[1]
    if path == "sdpa_dense":
        plan = AttentionPlan(path, mask=build_attention_mask(segment_ids, segment_ids, T, T, x.device))
    elif path == "flash_varlen":
        cu = cu_seqlens(segment_ids)
        if cu[0].numel() - 1 == segment_ids.shape[0]:  # one run per row (known after nonzero's sync)
            _record("sdpa_causal", "every row is one segment")
            return AttentionPlan("sdpa_causal")
        plan = AttentionPlan(path, cu=cu, dtype=dtype)
    elif path == "flex":
        plan = AttentionPlan(path, block_mask=flex_block_mask(segment_ids))
    else:
        plan = AttentionPlan(path, chunks=doc_chunks(segment_ids))
    _record(path, why)
    return plan


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """q, k, v [B,heads,T,d] -> [B,heads,T,d] along `plan`."""
    if plan.path == "sdpa_causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if plan.path == "sdpa_dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask)
    if plan.path == "flash_varlen":
        B, nh, T, d = q.shape
        cu, max_len = plan.cu
        qf, kf, vf = (t.transpose(1, 2).reshape(B * T, nh, d).to(plan.dtype) for t in (q, k, v))
        out = flash_attn_varlen_func(qf, kf, vf, cu, cu, max_len, max_len, causal=True)
        return out.reshape(B, T, nh, d).transpose(1, 2).to(q.dtype)
    if plan.path == "flex":
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError(
                "model.llm.attn_impl=flex: torch has no FlexAttention backward on the CPU; "
                "use attn_impl=auto (sdpa_docs on the CPU) for training"
            )
        fn = _flex() if plan.compiled else flex_attention
        return fn(q, k, v, block_mask=plan.block_mask)
    if plan.path == "sdpa_docs":
        # split/unbind, not slicing: their backward is one cat/stack, while each slice's backward would
        # scatter into a zero tensor of the full size (quadratic in the number of documents).
        rows = []
        for b, (qb, kb, vb) in enumerate(zip(q.unbind(0), k.unbind(0), v.unbind(0))):
            chunks = plan.chunks[b]
            sizes = [e - s for s, e, _ in chunks]
            parts = []
            for (_, _, mask), qs, ks, vs in zip(chunks, qb.split(sizes, 1), kb.split(sizes, 1), vb.split(sizes, 1)):
                if mask is None:
                    parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
                else:
                    parts.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask))
            rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return torch.stack(rows, dim=0)
    raise ValueError(f"unknown attention path {plan.path!r}")
