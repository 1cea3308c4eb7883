"""Deterministic synthetic batches (data.kind=synthetic): engine tests and throughput benchmarks.

Row j of the global sample order is generated from (seed, j) alone, and rank r's micro-batch m of
optimizer step s takes rows s*G + (m*world + r)*micro ... (+micro), G = micro*accum*world. So a step
sees the same rows whatever the (world size, grad accumulation) split: 1-process and N-process runs
are comparable. Text is a short learnable pattern (loss falls) followed by padding; every 4th row has no image.
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
                 eod: int = 151643) -> None:
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
        span = 2 + self.q if has_image else 0
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
            pixels = torch.randn(1, 3, self.image_size, self.image_size, generator=gen)
        seg = torch.zeros(T, dtype=torch.int32)
        seg[:span + n_text] = 1
        pos = torch.arange(T)
        return {"input_ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos, "pixels": pixels,
                "task_id": j % N_TASKS}

    def make(self, k: int) -> dict[str, Any]:
        rows = [self.row(j) for j in self.rows_for(k)]
        pix = [r["pixels"] for r in rows if r["pixels"] is not None]
        s = self.image_size
        return {
            "input_ids": torch.stack([r["input_ids"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
            "segment_ids": torch.stack([r["segment_ids"] for r in rows]),
            "position_ids": torch.stack([r["position_ids"] for r in rows]),
            "pixel_values": torch.cat(pix) if pix else torch.zeros(0, 3, s, s),
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
