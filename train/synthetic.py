"""Deterministic synthetic batches (data.kind=synthetic): engine tests and throughput benchmarks.

Row j of the global sample order is generated from (seed, j) alone, and rank r's micro-batch m of
optimizer step s takes rows s*G + (m*world + r)*micro ... (+micro), G = micro*accum*world. So a step
sees the same rows whatever the (world size, grad accumulation) split: 1-process and N-process runs
are comparable. Text is a short learnable pattern (loss falls) followed by padding; every 4th row has no image.

With `merge_size` set the rows are Qwen2-VL's: an image is a random (1, h, w) patch grid (h, w multiples of
merge_size) given as uint8 patches [h*w, patch_dim] with its `image_grid_thw` row, and takes h*w/merge^2 slot
tokens (so images of one batch differ in size); `for_model` picks the layout from the run's model config.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

TEXT_BASE, TEXT_SPAN = 1000, 48  # text ids live in [TEXT_BASE, TEXT_BASE + TEXT_SPAN)
N_TASKS = 8


class SyntheticBatches:
    def __init__(self, *, seed: int, seq_len: int, micro_batch: int, grad_accum: int, rank: int, world_size: int,
                 image_size: int, n_queries: int, img_start: int, img_end: int, img_pad: int,
                 eod: int = 151643, merge_size: int | None = None, patch_dim: int = 3 * 14 * 14) -> None:
        self.merge, self.patch_dim = merge_size, patch_dim  # merge_size set: Qwen2-VL rows (module doc)
        self.seed, self.seq_len, self.micro, self.accum = seed, seq_len, micro_batch, grad_accum
        self.rank, self.world, self.image_size, self.q = rank, world_size, image_size, n_queries
        self.img_start, self.img_end, self.img_pad, self.eod = img_start, img_end, img_pad, eod
        self.pos = 0  # micro-batches handed out by this rank
        self.skipped: dict[str, int] = {}

    def rows_for(self, k: int) -> range:
        step, m = divmod(k, self.accum)
        g = self.micro * self.accum * self.world
        start = step * g + (m * self.world + self.rank) * self.micro
        return range(start, start + self.micro)

    def row(self, j: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        T = self.seq_len
        has_image = j % 4 != 3
        grid = None
        if has_image and self.merge:  # 1..3 merged tokens per side
            gh, gw = (self.merge * (1 + int(torch.randint(0, 3, (1,), generator=gen))) for _ in range(2))
            grid = (1, gh, gw)
        n_slots = self.q if grid is None else grid[1] * grid[2] // self.merge**2
        span = 2 + n_slots if has_image else 0
        # a short learnable text after the (optional) image, then padding: few loss tokens keep CPU runs fast
        n_text = min(T - span, 16 + int(torch.randint(0, 33, (1,), generator=gen)))
        stride = 1 + int(torch.randint(0, 3, (1,), generator=gen))
        start = int(torch.randint(0, TEXT_SPAN, (1,), generator=gen))
        ids = torch.full((T,), self.eod, dtype=torch.long)
        ids[span:span + n_text] = TEXT_BASE + (start + stride * torch.arange(n_text)) % TEXT_SPAN
        labels = torch.full((T,), -100, dtype=torch.long)
        labels[span:span + n_text] = ids[span:span + n_text]
        pixels = None
        if has_image:
            ids[:span] = self.img_pad
            ids[0], ids[span - 1] = self.img_start, self.img_end
            if grid is None:
                pixels = torch.randn(1, 3, self.image_size, self.image_size, generator=gen)
            else:
                pixels = torch.randint(0, 256, (grid[1] * grid[2], self.patch_dim), generator=gen, dtype=torch.uint8)
        seg = torch.zeros(T, dtype=torch.int32)
        seg[:span + n_text] = 1
        pos = torch.arange(T)
        return {"input_ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos, "pixels": pixels,
                "grid": grid, "task_id": j % N_TASKS}

    def make(self, k: int) -> dict[str, Any]:
        rows = [self.row(j) for j in self.rows_for(k)]
        pix = [r["pixels"] for r in rows if r["pixels"] is not None]
        s = self.image_size
        if self.merge:
            grids = [r["grid"] for r in rows if r["grid"] is not None]
            images = {"pixel_values": torch.cat(pix) if pix else torch.zeros(0, self.patch_dim, dtype=torch.uint8),
                      "image_grid_thw": torch.tensor(grids, dtype=torch.long).view(-1, 3)}
        else:
            images = {"pixel_values": torch.cat(pix) if pix else torch.zeros(0, 3, s, s)}
        return {
            "input_ids": torch.stack([r["input_ids"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
            "segment_ids": torch.stack([r["segment_ids"] for r in rows]),
            "position_ids": torch.stack([r["position_ids"] for r in rows]),
            **images,
            "task_ids": torch.tensor([r["task_id"] for r in rows]),
            "n_samples": torch.ones(len(rows), dtype=torch.long),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            batch = self.make(self.pos)
            self.pos += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])

    def stats(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped)}


def for_model(m: Any, **kw: Any) -> SyntheticBatches:
    """SyntheticBatches for the run's model config node (`cfg.model`): Qwen-VL's fixed `n_queries` image span,
    or (a config with `preprocess`, Qwen2-VL) grids of merged patch tokens; `kw`: the order arguments."""
    if "adapter" in m:
        return SyntheticBatches(image_size=m.vision.image_size, n_queries=m.adapter.n_queries,
                                img_start=m.ids.img_start, img_end=m.ids.img_end, img_pad=m.ids.img_pad,
                                eod=m.ids.eod, **kw)
    p = m.preprocess
    return SyntheticBatches(image_size=0, n_queries=0, img_start=m.ids.vision_start, img_end=m.ids.vision_end,
                            img_pad=m.ids.image_pad, eod=m.ids.eod, merge_size=p.merge_size,
                            patch_dim=m.vision.in_channels * p.patch_size**2, **kw)
