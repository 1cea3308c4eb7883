"""Qwen2-VL: dynamic-resolution ViT + patch merger + Qwen2 decoder with M-RoPE.

Each image is a run of `<|image_pad|>` tokens, one per merged patch group ((H/28)*(W/28) for an HxW image);
their embeddings are replaced by the merger output of that image (images ordered as their runs appear scanning
rows in order). The forward has the contract of `QwenVL.forward` (the same `ModelOutput`, the same shifted,
segment-aware, chunked loss head), plus `image_grid_thw` [N,3]: the patch grid (t, h, w) of every image.

Pixels: `pixel_values` [L, C*T*P*P] in the processor's patch order (data/qwen2_vl_images.py), either float
(already normalised: transformers' Qwen2VLImageProcessor output) or uint8 (normalised here on the device, what
crosses process boundaries), or uint8 [L, C*P*P] (one frame; the temporal copies are made on the device,
half the bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..llm import KVCache
from ..loss import IGNORE_INDEX
from ..qwen_vl import PIXEL_MEAN, PIXEL_STD, ModelOutput, _requires_grad, shift_targets
from .config import Qwen2VLConfig
from .llm import Qwen2LM
from .rope import mrope_positions
from .vision import PatchMerger, VisionTower

_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_patches(patches: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """uint8 [L, C*K] -> fp32 CLIP-normalised, channel-major patch vectors (the processor's layout). The same
    ops as transformers' fused rescale+normalize ((x - 255*mean) / (255*std)), so results match it bit for bit."""
    stats = _STATS.get(patches.device)
    if stats is None:
        mean = torch.tensor(PIXEL_MEAN) * (1.0 / (1 / 255))
        std = torch.tensor(PIXEL_STD) * (1.0 / (1 / 255))
        stats = (mean.view(channels, 1).to(patches.device), std.view(channels, 1).to(patches.device))
        _STATS[patches.device] = stats
    L = patches.shape[0]
    x = patches.to(torch.float32).view(L, channels, -1)
    return x.sub_(stats[0]).div_(stats[1]).view(L, -1)


class Qwen2VL(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.adapter = PatchMerger(cfg.vision, cfg.llm.hidden)
        self.llm = Qwen2LM(cfg.llm)
        # As QwenVL: run the image path on a zero-weighted dummy image in image-less training forwards, so
        # ZeRO-3 ranks without images still join the vision tower's parameter gathers.
        self.always_run_image_path = False

    # ---- helpers -------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> dict[str, int]:
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)

        out = {"visual": count(self.visual), "adapter": count(self.adapter), "llm": count(self.llm)}
        out["total"] = sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
        return out

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.llm.set_grad_checkpointing(enabled)
        self.visual.set_grad_checkpointing(enabled)

    def _float_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        v = self.cfg.vision
        p = next(self.visual.parameters())
        pv = pixel_values.to(p.device, non_blocking=True)
        one_frame = v.in_channels * v.patch_size**2
        if pv.dim() != 2 or pv.shape[1] not in (v.patch_dim, one_frame):
            raise ValueError(f"pixel_values must be [L, {v.patch_dim}] (or uint8 [L, {one_frame}], one frame), "
                             f"got {tuple(pv.shape)}")
        if pv.dtype == torch.uint8:
            if pv.shape[1] == one_frame:  # channel-major: [L,C,P*P] -> [L,C,T,P*P]
                L = pv.shape[0]
                pv = pv.view(L, v.in_channels, 1, -1).expand(L, v.in_channels, v.temporal_patch_size, -1)
                pv = pv.reshape(L, -1)
            pv = normalize_patches(pv, v.in_channels)
        elif pv.shape[1] != v.patch_dim:
            raise ValueError(f"float pixel_values must be [L, {v.patch_dim}] (all temporal copies)")
        return pv.to(p.dtype)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """patches [L, ...] + grids [N,3] -> merged image tokens [L / merge^2, hidden] in image order.
        A frozen tower runs without an autograd graph."""
        pv = self._float_patches(pixel_values)
        if _requires_grad(self.visual):
            feats = self.visual(pv, image_grid_thw)
        else:
            with torch.no_grad():
                feats = self.visual(pv, image_grid_thw)
        return self.adapter(feats)

    def check_images(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> None:
        """Every image run of `<|image_pad|>` has exactly its grid's token count (host syncs: debug / inference)."""
        ids, m = self.cfg.ids, self.cfg.vision.merge_size
        is_img = (input_ids == ids.image_pad).cpu()
        runs = []
        for row in is_img.tolist():
            n = 0
            for flag in row + [False]:
                if flag:
                    n += 1
                elif n:
                    runs.append(n)
                    n = 0
        want = [] if image_grid_thw is None else (image_grid_thw.cpu().prod(-1) // (m * m)).tolist()
        if runs != want:
            raise ValueError(f"image tokens (id {ids.image_pad}) form runs of {runs} tokens but image_grid_thw "
                             f"expects {want} (t*h*w / {m * m} per image, in order)")

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None, check: bool | None = None) -> torch.Tensor:
        """Token embeddings with the merger outputs written over the `<|image_pad|>` tokens (masked scatter, no
        host sync). `check` (default cfg.debug_checks) validates the runs against the grids first."""
        embeds = self.llm.embed(input_ids)
        n_images = 0 if image_grid_thw is None else image_grid_thw.shape[0]
        n_patches = 0 if pixel_values is None else pixel_values.shape[0]
        if (n_patches == 0) != (n_images == 0):
            raise ValueError(f"pixel_values ({n_patches} patches) and image_grid_thw ({n_images} images) must be "
                             "given together")
        if self.cfg.debug_checks if check is None else check:
            self.check_images(input_ids, image_grid_thw)
        if n_images > 0:
            feats = self.encode_images(pixel_values, image_grid_thw)
            mask = (input_ids == self.cfg.ids.image_pad)[..., None]
            embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        elif torch.is_grad_enabled() and (self.always_run_image_path or _requires_grad(self.visual)
                                          or _requires_grad(self.adapter)):
            # zero-weighted dummy image (one merged token): trainable / sharded vision params stay in step
            v = self.cfg.vision
            m = v.merge_size
            p = next(self.visual.parameters())
            dummy = self.encode_images(torch.zeros(m * m, v.patch_dim, device=p.device, dtype=p.dtype),
                                       torch.tensor([[1, m, m]]))
            embeds = embeds + 0.0 * dummy.sum().to(embeds.dtype)
        return embeds

    def positions(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                  segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """M-RoPE position ids [3,B,T]: given as such, or computed per sample (segment_ids, else restarts of the
        packer's 1-D position_ids) from the image runs and grids."""
        if position_ids is not None and position_ids.dim() == 3:
            return position_ids
        return mrope_positions(input_ids, image_grid_thw, self.cfg.ids.image_pad, self.cfg.vision.merge_size,
                               segment_ids=segment_ids, position_ids=position_ids)

    # ---- training / scoring ---------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> ModelOutput:
        """QwenVL.forward's arguments in QwenVL's order, plus `image_grid_thw` [N,3] (last, so positional
        callers of either family agree). 2-D `position_ids` only delimit samples (when no segment_ids); the
        M-RoPE positions are computed per sample from the image runs and grids."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B,T], got shape {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}")
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        pos = self.positions(input_ids, image_grid_thw, segment_ids, position_ids)
        hidden = self.llm(embeds, pos, segment_ids=segment_ids)
        if labels is None:
            return ModelOutput(logits=self.llm.logits(hidden))
        B, T, H = hidden.shape
        targets = shift_targets(labels, segment_ids)
        head = self.llm.lm_head(hidden.reshape(B * T, H), targets.reshape(-1), self.cfg.loss_chunk_tokens,
                                self.cfg.loss_impl)
        loss_sum = head.loss_sum
        row_loss_sum = None if head.per_token is None else head.per_token.view(B, T).sum(1)
        row_n = (targets != IGNORE_INDEX).sum(1)
        n = row_n.sum()
        return ModelOutput(loss=loss_sum / n.clamp(min=1), loss_sum=loss_sum, n_tokens=n,
                           row_loss_sum=row_loss_sum, row_n_tokens=row_n)

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, KVCache, torch.Tensor, torch.Tensor | None]:
        """Prompt forward into a fresh KV cache -> (hidden [B,T,H], cache, next position [B,1], segments or
        None). attention_mask [B,T] (1 = token, 0 = pad) allows left padding. The next position is one past the
        largest M-RoPE index of the prompt's real tokens (text continues there on all three rows)."""
        B, T = input_ids.shape
        seg = None
        if attention_mask is not None:
            if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                raise ValueError("generate: attention_mask must be left-padded (zeros before ones)")
            seg = attention_mask.long()
        self.check_images(input_ids, image_grid_thw)
        pos = self.positions(input_ids, image_grid_thw, segment_ids=seg)
        real = seg.bool() if seg is not None else torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        next_pos = pos.masked_fill(~real[None], -1).amax(dim=(0, 2))[:, None] + 1
        cache = KVCache(len(self.llm.h))
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw, check=False)
        hidden = self.llm(embeds, pos, segment_ids=seg, kv_cache=cache)
        return hidden, cache, next_pos, seg

    @torch.no_grad()
    def decode_step(self, tok: torch.Tensor, cache: KVCache, pos: torch.Tensor,
                    seg: torch.Tensor | None) -> torch.Tensor:
        """One new token per row [B] at positions pos [B,1] -> hidden [B,1,H] (the cache grows by one)."""
        step_seg = torch.ones_like(tok)[:, None] if seg is not None else None
        return self.llm(self.llm.embed(tok[:, None]), pos[None].expand(3, -1, -1), segment_ids=step_seg,
                        kv_cache=cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_id: int | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with a KV cache; [B, T + n_generated] (prompt included). Finished rows are filled
        with the first eos id (default `<|im_end|>`); stops when every row has produced one."""
        eos = self.cfg.ids.im_end if eos_id is None else eos_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        hidden, cache, next_pos, seg = self.prefill(input_ids, pixel_values, image_grid_thw, attention_mask)
        out, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            tok = self.llm.logits(hidden[:, -1]).argmax(-1)
            tok = torch.where(done, eos_ids[0], tok)
            out.append(tok)
            done |= torch.isin(tok, eos_ids)
            if bool(done.all()):
                break
            hidden = self.decode_step(tok, cache, next_pos, seg)
            next_pos = next_pos + 1
        if not out:
            return input_ids
        return torch.cat([input_ids, torch.stack(out, 1)], dim=1)
