"""Qwen2-VL vision tower and patch merger.

`VisionTower.forward(patches [L, C*T*P*P], grid_thw [N,3]) -> [L, width]`: the patches of all images of a
batch packed into one sequence (processor order, see rope.vision_positions), a linear patch embedding (the
Conv3d of the checkpoint with kernel = stride, applied as a matmul), 2D rotary attention within each image
only (cu_seqlens: flash-attn varlen on CUDA in half precision, else SDPA per image with equal-length images
batched together; never a dense [L,L] mask), pre-LN blocks with a QuickGELU MLP, no final norm.
`PatchMerger` (the model's `adapter`): LayerNorm, then each group of merge x merge consecutive patches
concatenated and sent through Linear-GELU-Linear to the LLM width.

Internal names follow the Qwen-VL tower where the roles match (`conv1`, `transformer.resblocks.N.{ln_1,ln_2,
attn,mlp}`) so stage freezing, ViT layer-wise LR decay and the FLOPs/optimizer code address both families alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import flash_attn_varlen_func
from ..llm import _rotate_half
from .config import Qwen2VisionConfig
from .rope import vision_cos_sin, vision_positions


class PatchEmbed(nn.Module):
    """weight [width, C, T, P, P] (the checkpoint's Conv3d layout); forward: patches [L, C*T*P*P] -> [L, width]."""

    def __init__(self, cfg: Qwen2VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.weight = nn.Parameter(torch.empty(cfg.width, cfg.in_channels, cfg.temporal_patch_size, p, p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight.reshape(self.weight.shape[0], -1))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        L = x.shape[0]
        q, k, v = self.qkv(x).view(L, 3, self.heads, self.head_dim).unbind(1)  # [L,heads,d]
        c, s = cos[:, None], sin[:, None]
        q = (q.float() * c + _rotate_half(q.float()) * s).to(v.dtype)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(v.dtype)
        out = plan.attend(q, k, v)
        return self.proj(out.reshape(L, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = VisionAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, plan):  # noqa: ANN001
        x = x + self.attn(self.ln_1(x), cos, sin, plan)
        return x + self.mlp(self.ln_2(x))


class _Blocks(nn.Module):
    """Holds `resblocks` so parameter names read `visual.transformer.resblocks.N.*` (as the Qwen-VL tower)."""

    def __init__(self, cfg: Qwen2VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))


class ImagePlan:
    """How attention stays inside each image of the packed patch sequence (built once per forward from the
    grids, which live on the host: no device sync)."""

    def __init__(self, lengths: list[int], device: torch.device, half_on_cuda: bool) -> None:
        self.lengths = lengths
        self.flash = half_on_cuda and flash_attn_varlen_func is not None
        if self.flash:
            cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self.cu, self.max_len = cu.to(device), max(lengths)
        # consecutive images of equal length attend in one batched call
        self.groups: list[tuple[int, int]] = []  # (n images, length)
        for n in lengths:
            if self.groups and self.groups[-1][1] == n:
                self.groups[-1] = (self.groups[-1][0] + 1, n)
            else:
                self.groups.append((1, n))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [L,heads,d] -> [L,heads,d], full (non-causal) attention within each image."""
        if self.flash:
            return flash_attn_varlen_func(q, k, v, self.cu, self.cu, self.max_len, self.max_len, causal=False)
        sizes = [n * length for n, length in self.groups]
        outs = []
        for (n, length), qs, ks, vs in zip(self.groups, q.split(sizes), k.split(sizes), v.split(sizes)):
            qb, kb, vb = (t.reshape(n, length, *t.shape[1:]).transpose(1, 2) for t in (qs, ks, vs))
            o = F.scaled_dot_product_attention(qb, kb, vb)
            outs.append(o.transpose(1, 2).reshape(n * length, *q.shape[1:]))
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class VisionTower(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv1 = PatchEmbed(cfg)
        self.transformer = _Blocks(cfg)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        def init(m: nn.Module) -> None:
            if isinstance(m, (nn.Linear, PatchEmbed)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(init)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid = grid_thw.detach().to("cpu", torch.long)
        lengths = grid.prod(-1).tolist()
        if patches.shape[0] != sum(lengths):
            raise ValueError(f"pixel_values has {patches.shape[0]} patches but image_grid_thw {grid.tolist()} "
                             f"gives {sum(lengths)}")
        x = self.conv1(patches)
        cos, sin = vision_cos_sin(vision_positions(grid, self.cfg.merge_size).to(x.device), self.cfg.head_dim,
                                  self.cfg.rope_theta)
        half = x.device.type == "cuda" and _compute_dtype(x) in (torch.float16, torch.bfloat16)
        plan = ImagePlan(lengths, x.device, half)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.transformer.resblocks:
            x = checkpoint(blk, x, cos, sin, plan, use_reentrant=False) if ckpt else blk(x, cos, sin, plan)
        return x


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class PatchMerger(nn.Module):
    """LayerNorm over patches, merge x merge consecutive patches concatenated, Linear-GELU-Linear to `dim`."""

    def __init__(self, cfg: Qwen2VisionConfig, dim: int) -> None:
        super().__init__()
        self.group = cfg.width * cfg.merge_size**2
        self.ln_q = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.c_fc = nn.Linear(self.group, self.group)
        self.c_proj = nn.Linear(self.group, dim)
        def init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

        # through Module.apply: under zero.Init the layers are already partitioned here, and zero.Init's apply
        # gathers each module's parameters around the call (a plain loop would initialise empty partitions)
        self.apply(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(self.ln_q(x).reshape(-1, self.group))))
