"""Qwen2-VL's stage stream: `data.pipeline.StageStream` (same loader, mixing, packing policy and exact-resume
state) with the Qwen2-VL packer and batch layout (`data.qwen2_vl_packing`); `build_stage_stream(...,
family="qwen2_vl")` builds it from the same, family-neutral shards."""

from __future__ import annotations

from typing import Any

from data.pipeline import StageStream
from data.qwen2_vl_packing import Qwen2VLPacker, collate_qwen2_rows
from data.qwen2_vl_samples import EOD_ID, Qwen2VLSampleBuilder


def make_qwen2_builder(stage: int, tokenizer_path: Any, image_size: int | None, seq_len: int,
                       **kwargs: Any) -> Qwen2VLSampleBuilder:
    """build_stage_stream's builder factory; `image_size` (Qwen-VL's square size) must be unset: Qwen2-VL
    images keep their own resolution within min_pixels / max_pixels_resize."""
    if image_size is not None:
        raise ValueError(f"image_size={image_size}: Qwen2-VL resizes by min_pixels / max_pixels_resize, not to a "
                         "square; pass image_size=None")
    return Qwen2VLSampleBuilder(stage, tokenizer_path, seq_len, **kwargs)


class Qwen2VLStageStream(StageStream):
    """StageStream packing Qwen2-VL samples (variable image token counts) into `collate_qwen2_rows` batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("pad_id", EOD_ID)
        super().__init__(*args, **kwargs)

    @property
    def merge_size(self) -> int:
        return int(getattr(self.mapper.builder, "merge_size", 2))

    @property
    def patch_size(self) -> int:
        return int(getattr(self.mapper.builder, "patch_size", 14))

    def _new_packer(self, buffer_size: int, same_task: bool) -> Qwen2VLPacker:
        return Qwen2VLPacker(self.seq_len, buffer_size=buffer_size, same_task=same_task, merge_size=self.merge_size)

    def _collate(self, rows: list[list[Any]], T: int | None) -> dict[str, Any]:
        return collate_qwen2_rows(rows, T, pad_id=self.pad_id, checked=True,  # Qwen2VLPacker.add checked them
                                  merge_size=self.merge_size, patch_dim=3 * self.patch_size**2,
                                  pin_memory=self.pin_memory)
