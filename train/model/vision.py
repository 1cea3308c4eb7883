"""Vision encoder: OpenCLIP ViT-bigG/14 geometry, with open_clip's block layout and parameter names.

Differences from open_clip's `VisionTransformer` (all required by Qwen-VL, SPEC §1): no class token,
the positional table is stored for `pos_grid` (16x16, 224 px) and bicubically resized to the actual
patch grid at run time, and the output is every patch token after the last block (no pooling, no
`ln_post`: that LayerNorm belongs to the adapter). Extras for training: stochastic depth, optional
window attention, activation checkpointing.

The blocks are written here rather than imported from open_clip: importing open_clip pulls in transformers,
timm, torchvision and torch._dynamo (~7 s per process start), which every training process would pay for four
small classes. tests/test_vision.py checks them against open_clip's own VisionTransformer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.model.config import VisionConfig


def resize_pos_table(table: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize a flattened square position table [g*g, D] to [new_grid**2, D].

    Bicubic in fp32 with align_corners=False, cast back to the table's dtype (the official Qwen-VL
    `get_abs_pos`). Returns `table` itself when the grids already match.
    """
    if table.dim() != 2:
        raise ValueError(f"position table must be [g*g, D], got shape {tuple(table.shape)}")
    g = int(round(table.shape[0] ** 0.5))
    if g * g != table.shape[0]:
        raise ValueError(f"position table has {table.shape[0]} rows, not a square grid")
    if new_grid <= 0:
        raise ValueError(f"new_grid must be positive, got {new_grid}")
    if new_grid == g:
        return table
    grid = table.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(table.dtype)


# Alias under the name DeiT/MAE-style code uses for the same operation.
interpolate_pos_embed = resize_pos_table


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale survivors by 1/(1-rate)."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: the result cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class VisionBlock(nn.Module):
    """open_clip's pre-LN `ResidualAttentionBlock` (same parameters and names: ln_1, attn, ln_2, mlp.c_fc,
    mlp.c_proj; no layer scale, as in ViT-bigG) plus stochastic depth and window attention."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_width: int,
        ln_eps: float,
        drop_path_rate: float = 0.0,
        window_size: int = 0,
    ):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=ln_eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", nn.GELU()),  # exact (erf) GELU
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))
        self.drop_path_rate = float(drop_path_rate)
        self.window_size = int(window_size)

    def attention(self, q_x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, q_x, q_x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        grid: int | None = None,
    ) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise ValueError("VisionBlock is self-attention only (k_x/v_x must be None)")
        h = self.ln_1(q_x)
        if self.window_size > 0:
            if grid is None:
                raise ValueError("window attention needs the patch grid size (grid=...)")
            a = self._window_attention(h, grid)
        else:
            a = self.attention(q_x=h, attn_mask=attn_mask)
        x = q_x + drop_path(a, self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.ln_2(x)), self.drop_path_rate, self.training)

    def _window_attention(self, h: torch.Tensor, grid: int) -> torch.Tensor:
        """Attention inside non-overlapping ws x ws windows; the grid is zero-padded to a multiple of
        ws and padded keys are masked (every window holds at least one real token, so no empty rows)."""
        n, length, d = h.shape
        if length != grid * grid:
            raise ValueError(f"{length} tokens do not form a {grid}x{grid} grid")
        ws = self.window_size
        pad = (-grid) % ws
        big = grid + pad
        nw = big // ws
        x = F.pad(h.reshape(n, grid, grid, d), (0, 0, 0, pad, 0, pad))
        x = x.reshape(n, nw, ws, nw, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(n * nw * nw, ws * ws, d)
        kpm = None
        if pad:
            valid = torch.zeros(big, big, dtype=torch.bool, device=h.device)
            valid[:grid, :grid] = True
            valid = valid.reshape(nw, ws, nw, ws).permute(0, 2, 1, 3).reshape(nw * nw, ws * ws)
            kpm = torch.zeros(valid.shape, dtype=h.dtype, device=h.device).masked_fill(~valid, float("-inf"))
            kpm = kpm.repeat(n, 1)
        out = self.attn(x, x, x, need_weights=False, key_padding_mask=kpm)[0]
        out = out.reshape(n, nw, nw, ws, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(n, big, big, d)
        return out[:, :grid, :grid].reshape(n, length, d)


class BlockStack(nn.Module):
    """open_clip's `Transformer` container as far as the state dict and callers see it: `resblocks`, `layers`,
    `grad_checkpointing` (the tower runs the loop itself)."""

    def __init__(self, blocks):
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)
        self.layers = len(self.resblocks)
        self.grad_checkpointing = False


class VisionTower(nn.Module):
    """ViT-bigG/14 without class token; `forward(pixels [N,3,S,S]) -> [N, (S/patch)**2, width]`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"vision width {cfg.width} not divisible by heads {cfg.heads}")
        if cfg.window_size < 0:
            raise ValueError(f"vision window_size must be >= 0, got {cfg.window_size}")
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = cfg.width**-0.5  # open_clip's init for the positional table
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.pos_grid**2, cfg.width))
        self.ln_pre = LayerNorm(cfg.width, eps=cfg.ln_eps)
        # linearly increasing stochastic depth, 0 for the first block (pure Python: meta-device safe)
        rates = [cfg.drop_path * i / max(cfg.layers - 1, 1) for i in range(cfg.layers)]
        self.transformer = BlockStack(
            VisionBlock(cfg.width, cfg.heads, cfg.mlp_width, cfg.ln_eps, rates[i], cfg.window_size)
            for i in range(cfg.layers)
        )
        self.transformer.grad_checkpointing = bool(cfg.grad_checkpointing)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"}

    def lr_layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise LR decay: 0 = embeddings, i+1 = block i."""
        if name.startswith("transformer.resblocks."):
            return int(name.split(".")[2]) + 1
        if name.startswith(("conv1", "positional_embedding", "ln_pre")):
            return 0
        raise ValueError(f"unknown vision parameter name: {name}")

    @property
    def num_layers(self) -> int:
        return len(self.transformer.resblocks)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3]:
            raise ValueError(f"pixels must be [N,3,S,S] (square), got shape {tuple(pixels.shape)}")
        if pixels.shape[-1] % self.cfg.patch_size:
            raise ValueError(f"image size {pixels.shape[-1]} is not a multiple of patch {self.cfg.patch_size}")
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # [N, width, g, g]
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, width], row-major patches
        x = x + resize_pos_table(self.positional_embedding, grid).to(x.dtype)
        x = self.ln_pre(x)
        ckpt = self.transformer.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.transformer.resblocks:
            if ckpt:
                # non-reentrant: works when inputs need no grad (frozen tower / frozen earlier parts)
                x = checkpoint(blk, x, None, None, None, grid, use_reentrant=False)
            else:
                x = blk(x, grid=grid)
        return x
