"""Task family names and languages shared by shards, samples, loader and the model's task ids."""

from __future__ import annotations

# Order matters: the index is the `task_ids` value in a batch (DESIGN.md "Batches").
TASKS: tuple[str, ...] = (
    "caption",
    "vqa",
    "grounded_caption",
    "ref_grounding",
    "region_caption",
    "ocr",
    "text",
    "chat",
)
TASK_ID: dict[str, int] = {name: i for i, name in enumerate(TASKS)}
# Stage-2 multitask mixture: every family except ChatML SFT dialogue.
STAGE2_TASKS: tuple[str, ...] = TASKS[:7]
LANGS: tuple[str, ...] = ("en", "zh")
