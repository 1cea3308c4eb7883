"""Qwen-7B decoder: RMSNorm, rotary (NeoX rotate-half), fused-QKV attention, SwiGLU MLP.

Parameter names follow docs/DESIGN.md (`wte`, `h.N.*`, `ln_f`, `lm_head`) so the official
checkpoint maps onto it by a prefix change only. Packed rows are supported through
`segment_ids` (attention causal and within one segment) and per-sample `position_ids`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import LLMConfig
from .loss import chunked_cross_entropy_per_token

try:  # optional fast path for packed training on GPU
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure (missing, CUDA mismatch) just disables it
    flash_attn_varlen_func = None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype before the weight (as official Qwen)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B,T,head_dim] in fp32 for NeoX-style rotary over all head dims."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq  # [B,T,head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,heads,T,d]; cos/sin [B,T,d] fp32. Rotation done in fp32, result in x's dtype."""
    xf = x.float()
    cos, sin = cos[:, None], sin[:, None]
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 at the start of every contiguous run of equal segment id."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - run_start


def build_attention_mask(
    q_seg: torch.Tensor | None, k_seg: torch.Tensor | None, tq: int, tk: int, device: torch.device
) -> torch.Tensor:
    """Boolean mask [B or 1,1,tq,tk]: causal (queries are the last tq of tk keys) AND same segment.

    The diagonal is always allowed so that no row is fully masked (padding queries with segment 0
    would otherwise give NaN softmax); padding outputs are never used by the loss.
    """
    offset = tk - tq
    qi = torch.arange(tq, device=device)[:, None] + offset
    kj = torch.arange(tk, device=device)[None, :]
    causal = kj <= qi
    if q_seg is None or k_seg is None:
        return causal[None, None]
    same = q_seg[:, :, None] == k_seg[:, None, :]
    return ((same & causal) | (kj == qi))[:, None]


def _cu_seqlens(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths of contiguous equal-segment runs over the flattened [B*T] tokens."""
    B, T = segment_ids.shape
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = start.flatten().nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


class KVCache:
    """Per-layer keys/values [B,heads,L,d] accumulated during incremental decoding.

    `seg` keeps the segment id of every cached key (None = all keys belong to one sequence) so
    left-padded batches stay masked. `length` counts cached positions.
    """

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.seg: torch.Tensor | None = None
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=True)
        self.c_proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cu_seqlens: tuple[torch.Tensor, int] | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.c_attn(x).split(H, dim=-1)
        q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cu_seqlens is not None:  # flash-attn varlen: packed samples as separate sequences
            cu, max_len = cu_seqlens
            qf, kf, vf = (t.transpose(1, 2).reshape(B * T, self.heads, self.head_dim) for t in (q, k, v))
            out = flash_attn_varlen_func(qf, kf, vf, cu, cu, max_len, max_len, causal=True)
            return self.c_proj(out.reshape(B, T, H))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(out.transpose(1, 2).reshape(B, T, H))


class MLP(nn.Module):
    """SwiGLU: c_proj(w1(x) * silu(w2(x))); w2 is the gate, w1 the up projection (official naming)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.c_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cu_seqlens=None, kv_cache=None, layer=0):  # noqa: ANN001
        x = x + self.attn(self.ln_1(x), cos, sin, mask, cu_seqlens, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Linear):
    """Untied output projection. Called as a module (so ZeRO-3 gathers its weight) either for
    logits or, given targets, for per-token chunked cross-entropy without [N,V] fp32 logits."""

    def forward(  # type: ignore[override]
        self, hidden: torch.Tensor, targets: torch.Tensor | None = None, chunk_tokens: int = 1024
    ) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, self.weight)
        return chunked_cross_entropy_per_token(hidden, self.weight, targets, chunk_tokens)


class QwenLM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.lm_head = LMHead(cfg.hidden, cfg.vocab_size, bias=False)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.use_flash_attn = True  # used only when flash_attn is importable, on CUDA, in fp16/bf16
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for linears and embeddings, zero biases, ones for norms.

        Through `Module.apply` (leaves in the same order as `modules()`, so the same random draws): under
        DeepSpeed's zero.Init the children are already partitioned here, and zero.Init's `apply` gathers each
        module's parameters around the call (plain iteration would initialise empty partitions)."""

        def init(m: nn.Module) -> None:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

        self.apply(init)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def _flash_ok(self, x: torch.Tensor, segment_ids: torch.Tensor | None, kv_cache: KVCache | None) -> bool:
        return (
            self.use_flash_attn
            and flash_attn_varlen_func is not None
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
            and segment_ids is not None
            and kv_cache is None
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [B,T,H] -> hidden [B,T,H] after ln_f.

        segment_ids [B,T] (1.. per packed sample, 0 = pad): attention stays inside a segment and,
        if position_ids is None, positions restart per segment. With kv_cache the new tokens are
        appended after the cached ones (positions continue from the cache length by default).
        """
        x = inputs_embeds
        B, T, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        if segment_ids is not None and segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != inputs {(B, T)}")
        if position_ids is None:
            if segment_ids is not None and kv_cache is None:
                position_ids = positions_from_segments(segment_ids)
            else:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        elif position_ids.shape != (B, T):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != inputs {(B, T)}")
        cos, sin = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_base)

        mask, cu = None, None
        if self._flash_ok(x, segment_ids, kv_cache):
            cu = _cu_seqlens(segment_ids)
        elif kv_cache is not None:
            if past > 0 and (kv_cache.seg is None) != (segment_ids is None):
                raise ValueError("segment_ids must be given on every decoding step or on none (cache mismatch)")
            k_seg = segment_ids if past == 0 or segment_ids is None else torch.cat([kv_cache.seg, segment_ids], 1)
            if past > 0 or segment_ids is not None:
                mask = build_attention_mask(segment_ids, k_seg, T, past + T, x.device)
            kv_cache.seg = k_seg
        elif segment_ids is not None:
            mask = build_attention_mask(segment_ids, segment_ids, T, T, x.device)

        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.h):
            if ckpt:
                x = checkpoint(block, x, cos, sin, mask, cu, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cu, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)
