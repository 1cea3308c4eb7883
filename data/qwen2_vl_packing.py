"""Packing and collation for Qwen2-VL samples (variable image token counts).

The packing policy and its exact-resume state are `data.packing.Packer`'s (a sample's length already counts its
image tokens, so rows hold real text + image tokens up to `seq_len`); only the per-sample validation and the
batch layout differ:
- `check_qwen2_sample`: every image is `<|vision_start|>` + a run of `<|image_pad|>` of exactly t*h*w/merge^2
  tokens + `<|vision_end|>`, one image tensor and grid per run (in order), patches [t*h*w, 3*P*P] (one frame)
  or [t*h*w, 3*T*P*P], no target on a vision token, labels -100 or token ids, known task.
- `collate_qwen2_rows`: the batch dict of docs/DESIGN.md with `pixel_values` = every image's patches
  concatenated (uint8 [sum L, 3*P*P]; [0, 3*P*P] without images) and `image_grid_thw` Long [N,3] in the order
  the images appear scanning rows in order; `position_ids` restart per sample (the model derives the 3-row
  M-RoPE positions per sample from segment_ids and the grids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from data.packing import IGNORE_INDEX, Packer, PackingError, _name
from data.qwen2_vl_samples import EOD_ID, IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID
from data.tasks import TASK_ID

PATCH_DIM_ONE_FRAME = 3 * 14 * 14


def check_qwen2_sample(s: Any, seq_len: int | None = None, *, merge_size: int = 2,
                       vocab_size: int | None = None) -> int:
    """Validate one Qwen2-VL sample for packing and for the model; returns its length (PackingError if bad)."""
    ids, labels = s.input_ids, s.labels
    n = len(ids)
    if n == 0:
        raise PackingError(f"{_name(s)}: has no tokens")
    if len(labels) != n:
        raise PackingError(f"{_name(s)}: {len(labels)} labels for {n} input ids")
    if seq_len is not None and n > seq_len:
        raise PackingError(f"{_name(s)}: {n} tokens do not fit a row of seq_len {seq_len}")
    grids = list(getattr(s, "grids", []))
    if len(grids) != len(s.images):
        raise PackingError(f"{_name(s)}: {len(s.images)} images but {len(grids)} grids")
    k, i = 0, 0
    while i < n:
        t = ids[i]
        if t == VISION_START_ID:
            j = i + 1
            while j < n and ids[j] == IMAGE_PAD_ID:
                j += 1
            if j >= n or ids[j] != VISION_END_ID:
                raise PackingError(f"{_name(s)}: image at position {i}: <|vision_start|> + <|image_pad|> run must "
                                   "end with <|vision_end|> inside the sample")
            if k >= len(grids):
                raise PackingError(f"{_name(s)}: more image spans than images ({len(grids)})")
            gt, gh, gw = grids[k]
            want = gt * gh * gw // merge_size**2
            if j - i - 1 != want:
                raise PackingError(f"{_name(s)}: image {k} at position {i} has {j - i - 1} <|image_pad|> tokens, its "
                                   f"grid {tuple(grids[k])} needs {want}")
            im = s.images[k]
            if im.dim() != 2 or im.shape[0] != gt * gh * gw:
                raise PackingError(f"{_name(s)}: image {k} patches {tuple(im.shape)} do not match grid "
                                   f"{tuple(grids[k])} ({gt * gh * gw} patches)")
            if any(lab != IGNORE_INDEX for lab in labels[i:j + 1]):
                raise PackingError(f"{_name(s)}: image {k} at position {i} has trained labels")
            k, i = k + 1, j + 1
            continue
        if t in (IMAGE_PAD_ID, VISION_END_ID):
            raise PackingError(f"{_name(s)}: token {t} at position {i} outside an image span")
        i += 1
    if k != len(grids):
        raise PackingError(f"{_name(s)}: {k} image spans but {len(grids)} images")
    targets = [t for t in labels if t != IGNORE_INDEX]
    if targets and (min(targets) < 0 or (vocab_size is not None and max(targets) >= vocab_size)):
        raise PackingError(f"{_name(s)}: labels must be {IGNORE_INDEX} or token ids, got {min(targets)}..{max(targets)}")
    if s.task not in TASK_ID:
        raise PackingError(f"{_name(s)}: unknown task {s.task!r} (known: {sorted(TASK_ID)})")
    return n


class Qwen2VLPacker(Packer):
    """`Packer` (same policy, same exact-resume state: `pending`) with the Qwen2-VL sample check."""

    def __init__(self, seq_len: int, *, buffer_size: int = 128, same_task: bool = False, merge_size: int = 2,
                 vocab_size: int | None = None) -> None:
        super().__init__(seq_len, buffer_size=buffer_size, same_task=same_task)
        self.merge_size, self.vocab_size = merge_size, vocab_size

    def add(self, s: Any) -> None:
        self._lengths.append(check_qwen2_sample(s, self.seq_len, merge_size=self.merge_size,
                                                vocab_size=self.vocab_size))
        self.pending.append(s)


def collate_qwen2_rows(rows: Sequence[Sequence[Any]], seq_len: int | None = None, *, pad_id: int = EOD_ID,
                       checked: bool = False, merge_size: int = 2, patch_dim: int = PATCH_DIM_ONE_FRAME,
                       pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Rows of Qwen2-VL samples -> the batch dict (module doc). `seq_len=None` pads to the longest row."""
    if not rows or any(len(r) == 0 for r in rows):
        raise PackingError("collate_qwen2_rows: need at least one row and no empty rows")
    lens = [[len(s.input_ids) if checked else check_qwen2_sample(s, None, merge_size=merge_size) for s in r]
            for r in rows]
    longest = max(sum(ls) for ls in lens)
    T = longest if seq_len is None else int(seq_len)
    if longest > T:
        raise PackingError(f"a row holds {longest} tokens > seq_len {T}")
    B, pin = len(rows), bool(pin_memory)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long, pin_memory=pin)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, pin_memory=pin)
    segment_ids = torch.zeros((B, T), dtype=torch.int32, pin_memory=pin)
    position_ids = torch.zeros((B, T), dtype=torch.long, pin_memory=pin)
    images: list[torch.Tensor] = []
    grids: list[tuple[int, int, int]] = []
    for b, (row, ls) in enumerate(zip(rows, lens)):
        t = 0
        for k, (s, n) in enumerate(zip(row, ls)):
            input_ids[b, t:t + n] = torch.as_tensor(s.input_ids, dtype=torch.long)
            labels[b, t:t + n] = torch.as_tensor(s.labels, dtype=torch.long)
            segment_ids[b, t:t + n] = k + 1
            position_ids[b, t:t + n] = torch.arange(n)
            images.extend(s.images)
            grids.extend(tuple(g) for g in s.grids)
            t += n
        position_ids[b, t:] = torch.arange(T - t)
    if images:
        dims = {(im.shape[1], im.dtype) for im in images}
        if len(dims) != 1:
            raise PackingError(f"image patches of one batch must share patch size and dtype, got {sorted(map(str, dims))}")
        (dim, dtype), = dims
        pixel_values = torch.empty((sum(im.shape[0] for im in images), dim), dtype=dtype, pin_memory=pin)
        torch.cat(images, out=pixel_values)
    else:
        pixel_values = torch.zeros((0, patch_dim), dtype=torch.uint8, pin_memory=pin)
    grid = torch.tensor(grids, dtype=torch.long).view(-1, 3)
    return {
        "input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "position_ids": position_ids,
        "pixel_values": pixel_values, "image_grid_thw": grid,
        "task_ids": torch.tensor([TASK_ID[r[0].task] for r in rows], dtype=torch.long, pin_memory=pin),
        "n_samples": torch.tensor([len(r) for r in rows], dtype=torch.long, pin_memory=pin),
    }


__all__ = ["Qwen2VLPacker", "check_qwen2_sample", "collate_qwen2_rows"]
