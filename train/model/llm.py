"""Qwen-7B decoder: RMSNorm, rotary (NeoX rotate-half), fused-QKV attention, SwiGLU MLP.

Parameter names follow docs/DESIGN.md (`wte`, `h.N.*`, `ln_f`, `lm_head`) so the official
checkpoint maps onto it by a prefix change only. Packed rows are supported through
`segment_ids` (attention causal and within one segment) and per-sample `position_ids`; the attention
path for packed rows (never a dense [T,T] mask in training) is chosen in train/model/attention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import attention as attn_paths
from .attention import (  # noqa: F401 - build_attention_mask and flash_attn_varlen_func re-exported
    AttentionPlan,
    attend,
    build_attention_mask,
    flash_attn_varlen_func,
    plan_attention,
)
from .config import LLMConfig
from .loss import HeadLoss, linear_cross_entropy


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
        plan: AttentionPlan,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.c_attn(x).split(H, dim=-1)
        q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        out = attend(q, k, v, plan)
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

    def forward(self, x, cos, sin, plan, kv_cache=None, layer=0):  # noqa: ANN001
        x = x + self.attn(self.ln_1(x), cos, sin, plan, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Linear):
    """Untied output projection. Called as a module (so ZeRO-3 gathers its weight) either for logits or,
    given targets, for the cross-entropy without [N,V] logits: `HeadLoss(loss_sum, per_token)` (loss.py)."""

    def forward(  # type: ignore[override]
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor | None = None,
        chunk_tokens: int = 1024,
        impl: str = "fused_fwd_grad",
    ) -> torch.Tensor | HeadLoss:
        if targets is None:
            return F.linear(hidden, self.weight)
        return linear_cross_entropy(hidden, self.weight, targets, chunk_tokens, impl)


class QwenLM(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.lm_head = LMHead(cfg.hidden, cfg.vocab_size, bias=False)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.attn_impl = attn_paths.check_impl(cfg.attn_impl)
        self.use_flash_attn = True  # False keeps attn_impl=auto off flash-attn (which runs only on CUDA, fp16/bf16)
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

    @staticmethod
    def _decode_plan(
        segment_ids: torch.Tensor | None, kv_cache: KVCache, T: int, device: torch.device
    ) -> AttentionPlan:
        """Generation keeps a dense [B,1,T,past+T] mask when it needs one: inference only, T is the prompt
        once and 1 per step after, and left padding must stay masked against the cached keys."""
        past = kv_cache.length
        if past > 0 and (kv_cache.seg is None) != (segment_ids is None):
            raise ValueError("segment_ids must be given on every decoding step or on none (cache mismatch)")
        k_seg = segment_ids if past == 0 or segment_ids is None else torch.cat([kv_cache.seg, segment_ids], 1)
        kv_cache.seg = k_seg
        if past == 0 and segment_ids is None:
            return AttentionPlan("sdpa_causal")
        return AttentionPlan("sdpa_dense", mask=build_attention_mask(segment_ids, k_seg, T, past + T, device))

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

        if kv_cache is not None:
            plan = self._decode_plan(segment_ids, kv_cache, T, x.device)
        else:
            plan = plan_attention(segment_ids, self.attn_impl, x, allow_flash=self.use_flash_attn)

        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.h):
            if ckpt:
                x = checkpoint(block, x, cos, sin, plan, use_reentrant=False)
            else:
                x = block(x, cos, sin, plan, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)
