"""Rotary positions of Qwen2-VL: M-RoPE position ids of the decoder and the 2D rotary of the ViT.

`mrope_positions` is the reference `get_rope_index` (transformers' Qwen2VLModel) made packing-aware and
vectorised: positions are computed per sample (a contiguous run of equal segment id, or a restart of the
packer's 1-D positions) and concatenated, never across samples; no host sync and no Python loop over tokens.
Within a sample, text tokens take t = h = w = index; the tokens of an image (a contiguous run of
`<|image_pad|>`) share the temporal index and take their (h, w) cell of the merged grid, offset by the image's
start; the next text position continues at start + max(h, w) (merged grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sample_starts(B: int, T: int, device: torch.device, segment_ids: torch.Tensor | None,
                   position_ids: torch.Tensor | None) -> torch.Tensor:
    """[B,T] bool: where a sample starts (segment change; else a restart of 1-D positions; else t = 0)."""
    if segment_ids is not None:
        start = torch.ones(B, T, dtype=torch.bool, device=device)
        start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        return start
    if position_ids is not None:
        start = position_ids == 0
        start[:, 0] = True
        return start
    start = torch.zeros(B, T, dtype=torch.bool, device=device)
    start[:, 0] = True
    return start


def mrope_positions(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    merge_size: int,
    segment_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """input_ids [B,T], image_grid_thw [N,3] (patch grid of each image in order of appearance, rows scanned
    in order) -> Long [3,B,T] (temporal, height, width). Samples are delimited by `segment_ids` (1.. per packed
    sample, 0 = padding) or, without them, by restarts at 0 of the 1-D `position_ids` the packer made."""
    B, T = input_ids.shape
    dev = input_ids.device
    idx = torch.arange(T, device=dev).expand(B, T)
    starts = _sample_starts(B, T, dev, segment_ids, position_ids)
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    rel = idx - run_start
    if image_grid_thw is None or image_grid_thw.shape[0] == 0:
        return rel[None].expand(3, B, T).clone()

    grid = image_grid_thw.to(device=dev, dtype=torch.long)
    n = grid.shape[0]
    gt, gh, gw = grid[:, 0], grid[:, 1] // merge_size, grid[:, 2] // merge_size
    is_img = input_ids == image_token_id
    prev = F.pad(is_img[:, :-1], (1, 0), value=False) & ~starts
    first = is_img & ~prev  # first token of each image run (an image never spans two samples)
    k = (first.flatten().cumsum(0) - 1).view(B, T).clamp(0, n - 1)  # image index of every token
    first_pos = torch.where(first, idx, torch.zeros_like(idx)).cummax(1).values
    j = idx - first_pos  # offset inside the image run
    hk, wk = gh[k], gw[k]
    tt, hh, ww = j // (hk * wk), (j // wk) % hk, j % wk
    # After an image, text continues at start + max(h, w) instead of start + n_tokens: add the difference at
    # the token after the run's last token, accumulate along the row, and restart the sum per sample.
    nxt = F.pad(is_img[:, 1:] & ~starts[:, 1:], (0, 1), value=False)
    last = is_img & ~nxt
    delta = torch.where(last, torch.maximum(hk, wk) - gt[k] * hk * wk, torch.zeros_like(idx))
    shifted = F.pad(delta[:, :-1], (1, 0))
    csum = shifted.cumsum(1)
    corr = csum - csum.gather(1, run_start)
    base = torch.where(is_img, first_pos - run_start, rel) + corr
    zero = torch.zeros_like(idx)
    pos = torch.stack([base + torch.where(is_img, tt, zero), base + torch.where(is_img, hh, zero),
                       base + torch.where(is_img, ww, zero)])
    return pos


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float,
                  section: tuple[int, int, int] | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [3,B,T] -> cos/sin [B,T,head_dim] fp32: frequency pair i takes its angle from the
    temporal row for the first section[0] pairs, then height, then width (rotate-half layout, repeated)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
                               / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [3,B,T,hd/2]
    parts = freqs.split(list(section), dim=-1)
    f = torch.cat([p[i] for i, p in enumerate(parts)], dim=-1)  # [B,T,hd/2]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def vision_positions(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """[N,3] patch grids -> Long [L,2] (row, col) of every patch in the processor's order: merge x merge blocks
    row-major, patches row-major inside a block, frames repeated (the merger groups consecutive patches)."""
    out = []
    for t, h, w in grid_thw.tolist():
        hp, wp = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        hp = hp.reshape(shape).transpose(1, 2).flatten()
        wp = wp.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hp, wp], dim=-1).repeat(t, 1))
    return torch.cat(out, dim=0)


def vision_cos_sin(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [L,2] -> cos/sin [L,head_dim] fp32: head_dim/4 frequencies over rows, as many over columns,
    the pair repeated for the rotate-half layout (transformers' Qwen2VLVisionRotaryEmbedding)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=pos.device) / spatial))
    freqs = pos.float()[..., None] * inv_freq  # [L,2,hd/4]
    f = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()
