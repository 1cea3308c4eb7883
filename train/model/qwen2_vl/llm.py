"""Qwen2 decoder with M-RoPE: GQA with q/k/v bias, RMSNorm, SwiGLU, optional tied embeddings.

Names follow the Qwen-VL decoder (`wte`, `h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.w1,mlp.w2,mlp.c_proj}`,
`ln_f`, `lm_head`) so LoRA targets, freezing and the loss head address both families alike; q/k/v live fused
in `c_attn` as [Q | K | V] rows (heads*d, kv_heads*d, kv_heads*d), split and joined only at the checkpoint edge
(hf.py). Packed rows use the same document-causal attention paths as Qwen-VL (train/model/attention.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import attention as attn_paths
from ..attention import AttentionPlan, attend, plan_attention
from ..llm import MLP, KVCache, LMHead, QwenLM, RMSNorm, apply_rotary
from .config import Qwen2LLMConfig
from .rope import mrope_cos_sin


class GQAttention(nn.Module):
    def __init__(self, cfg: Qwen2LLMConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.split = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
        self.c_attn = nn.Linear(cfg.hidden, sum(self.split), bias=True)
        self.c_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, plan: AttentionPlan, kv_cache: KVCache | None = None, layer: int = 0):  # noqa: ANN001
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=-1)
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # the cache keeps the kv_heads, not the repeated ones
        rep = self.heads // self.kv_heads
        if rep > 1:  # query head i reads kv head i // rep (transformers' repeat_kv)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = attend(q, k, v, plan)
        return self.c_proj(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: Qwen2LLMConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.attn = GQAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)  # reads cfg.hidden / cfg.intermediate: w1 up, w2 gate, c_proj down

    def forward(self, x, cos, sin, plan, kv_cache=None, layer=0):  # noqa: ANN001
        x = x + self.attn(self.ln_1(x), cos, sin, plan, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class Qwen2LM(nn.Module):
    def __init__(self, cfg: Qwen2LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.lm_head = LMHead(cfg.hidden, cfg.vocab_size, bias=False)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.attn_impl = attn_paths.check_impl(cfg.attn_impl)
        self.use_flash_attn = True
        QwenLM.init_weights(self)  # same draws and rules as the Qwen-VL decoder
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tied models share one Parameter (the 2B); call again after `to_empty`, which re-creates tensors."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [B,T,H], position_ids [3,B,T] (M-RoPE; see rope.mrope_positions) -> hidden after ln_f.
        segment_ids [B,T] keeps attention causal within each packed sample."""
        x = inputs_embeds
        B, T, _ = x.shape
        if position_ids.shape != (3, B, T):
            raise ValueError(f"position_ids must be [3,B,T] = {(3, B, T)} (M-RoPE), got {tuple(position_ids.shape)}")
        if segment_ids is not None and segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != inputs {(B, T)}")
        cos, sin = mrope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_base, self.cfg.mrope_section)
        if kv_cache is not None:
            plan = QwenLM._decode_plan(segment_ids, kv_cache, T, x.device)
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
