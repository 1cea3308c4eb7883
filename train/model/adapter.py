"""Position-aware vision-language adapter: the official Qwen-VL `Resampler` + `ln_post` + `proj`.

256 learnable queries cross-attend (one multi-head attention, no residual, no MLP) to the projected
ViT patch tokens. A fixed 2D sin-cos table for the 16x16 query grid is added to the queries and,
bicubically resized to the patch grid, to the keys; values carry no position (SPEC §1).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from train.model.config import AdapterConfig
from train.model.vision import resize_pos_table


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """2D sin-cos table [grid*grid, dim] (fp32), rows in row-major (h, w) order.

    Mirrors the official Qwen-VL / MAE `get_2d_sincos_pos_embed` in float32 numpy, so values match
    bit-for-bit: dims [0, dim/2) encode the column (w) index, dims [dim/2, dim) the row (h) index;
    each half is [sin(p * w_k), cos(p * w_k)] with w_k = 10000 ** (-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos table dim must be divisible by 4, got {dim}")
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    ww, hh = np.meshgrid(gw, gh)  # ww[i, j] = j (column), hh[i, j] = i (row)
    emb = np.concatenate([_sincos_1d(dim // 2, ww), _sincos_1d(dim // 2, hh)], axis=1)
    return torch.from_numpy(emb).float()


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Under DeepSpeed's zero.Init the submodules are partitioned by the time `reset_parameters` runs in
    `__init__`: gather them (every rank draws the same values; rank 0's are kept). A no-op otherwise."""
    zero = [p for p in params if hasattr(p, "ds_id")]
    if not zero:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=0)


class Adapter(nn.Module):
    """`forward(x [N, L, kv_dim]) -> [N, n_queries, dim]`; L must be a square patch grid."""

    def __init__(self, cfg: AdapterConfig, kv_dim: int, dim: int):
        super().__init__()
        if dim % cfg.head_dim:
            raise ValueError(f"adapter dim {dim} not divisible by head_dim {cfg.head_dim}")
        if cfg.n_queries != cfg.pos_grid**2:
            raise ValueError(f"adapter n_queries {cfg.n_queries} != pos_grid**2 ({cfg.pos_grid**2})")
        self.cfg = cfg
        self.dim = dim
        self.query = nn.Parameter(torch.empty(cfg.n_queries, dim))
        # Frozen but a Parameter (not a buffer) so checkpoints carry the stored (bf16) values.
        self.pos_embed = nn.Parameter(sincos_2d(dim, cfg.pos_grid), requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False)
        self.attn = nn.MultiheadAttention(dim, dim // cfg.head_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.ln_kv = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.ln_post = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.proj = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: queries and Linear weights trunc-normal(0.02), Linear biases 0, LayerNorm 1/0,
        proj dim**-0.5 * randn, MHA in_proj torch default (xavier)."""
        with _gathered(list(self.parameters())):
            nn.init.trunc_normal_(self.query, std=0.02)
            for m in (self.kv_proj, self.attn.out_proj):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            for ln in (self.ln_q, self.ln_kv, self.ln_post):
                nn.init.ones_(ln.weight)
                nn.init.zeros_(ln.bias)
            with torch.no_grad():
                self.proj.normal_(0.0, self.dim**-0.5)
                self.pos_embed.copy_(sincos_2d(self.dim, self.cfg.pos_grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.kv_proj.in_features:
            raise ValueError(f"adapter input must be [N, L, {self.kv_proj.in_features}], got {tuple(x.shape)}")
        n, length = x.shape[:2]
        grid = int(round(length**0.5))
        if grid * grid != length:
            raise ValueError(f"adapter input has {length} tokens, not a square patch grid")
        pos_k = resize_pos_table(self.pos_embed, grid)
        x = self.ln_kv(self.kv_proj(x.to(self.kv_proj.weight.dtype)))
        q = self.ln_q(self.query) + self.pos_embed
        out = self.attn(q.unsqueeze(0).expand(n, -1, -1), x + pos_k, x, need_weights=False)[0]
        return self.ln_post(out) @ self.proj
