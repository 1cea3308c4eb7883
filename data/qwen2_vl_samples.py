"""Qwen2-VL sample rendering: the same shards, templates and label rules as `data.samples.SampleBuilder`,
written in the Qwen2-VL prompt format.

The stage templates, ChatML turns, label masks, box normalisation ([0,1000) integer corners, the same in both
families) and skip reasons are the Qwen-VL builder's; only the assembly differs:
- an image is `<|vision_start|>` + n x `<|image_pad|>` + `<|vision_end|>` with n = (h/28)*(w/28) of the image
  after `smart_resize` (dynamic resolution), never in the loss; its pixels are uint8 one-frame patches
  [4n, 3*14*14] (data.qwen2_vl_images.to_patches_uint8) and its grid (1, h/14, w/14) is kept beside them;
- grounding markup becomes the Qwen2-VL tokens: `<ref>` -> `<|object_ref_start|>`, `</ref>` ->
  `<|object_ref_end|>`, `<box>` -> `<|box_start|>`, `</box>` -> `<|box_end|>`, `<quad>` -> `<|quad_start|>`,
  `</quad>` -> `<|quad_end|>`. Text ids need no translation: both tokenizers use the qwen.tiktoken ranks and
  share `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (151643-151645).

The ids are Qwen2-VL's tokenizer_config ids (train/model/qwen2_vl/config.py holds the model's copy; data/ does
not import train/, tests/test_qwen2_vl_data.py keeps the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from data.images import ImageError, load_image
from data.loader import RawSample
from data.qwen2_vl_images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, to_patches_uint8
from data.samples import IGNORE, Sample, SampleBuilder
from data.tokenizer import SPECIAL_IDS

# Qwen2-VL special ids (tokenizer_config.json added_tokens_decoder of Qwen/Qwen2-VL-*-Instruct)
EOD_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
OBJECT_REF_START_ID, OBJECT_REF_END_ID = 151646, 151647
BOX_START_ID, BOX_END_ID = 151648, 151649
QUAD_START_ID, QUAD_END_ID = 151650, 151651
VISION_START_ID, VISION_END_ID = 151652, 151653
IMAGE_PAD_ID = 151655

# Qwen-VL markup id (what the shared templates produce) -> Qwen2-VL id; every other text id is unchanged
_MARKUP_MAP: dict[int, int] = {
    SPECIAL_IDS["<ref>"]: OBJECT_REF_START_ID, SPECIAL_IDS["</ref>"]: OBJECT_REF_END_ID,
    SPECIAL_IDS["<box>"]: BOX_START_ID, SPECIAL_IDS["</box>"]: BOX_END_ID,
    SPECIAL_IDS["<quad>"]: QUAD_START_ID, SPECIAL_IDS["</quad>"]: QUAD_END_ID,
}
_QWEN_VL_ONLY = frozenset(SPECIAL_IDS[t] for t in ("<img>", "</img>", "<imgpad>"))


@dataclass
class Qwen2VLSample(Sample):
    """A Sample whose `images` are uint8 one-frame patches [L, 3*P*P], with `grids` (t, h, w) per image."""

    grids: list[tuple[int, int, int]] = field(default_factory=list)


class Qwen2VLSampleBuilder(SampleBuilder):
    """Callable raw sample -> Qwen2VLSample for one stage; raises SkipSample (reasons of data.samples)."""

    def __init__(self, stage: int, tokenizer_path: Any, max_len: int, *, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels_resize: int = DEFAULT_MAX_PIXELS, patch_size: int = 14, merge_size: int = 2,
                 **kwargs: Any) -> None:
        # image_size is the Qwen-VL square size and unused here (images keep their own resolution)
        super().__init__(stage, tokenizer_path, image_size=patch_size * merge_size, max_len=max_len, **kwargs)
        if not 0 < min_pixels <= max_pixels_resize:
            raise ValueError(f"need 0 < min_pixels ({min_pixels}) <= max_pixels_resize ({max_pixels_resize})")
        self.min_pixels, self.max_pixels_resize = int(min_pixels), int(max_pixels_resize)
        self.patch_size, self.merge_size = int(patch_size), int(merge_size)

    def _load(self, raw: RawSample, member: str, cache: dict) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if member not in cache:
            data = raw.files.get(member)
            if data is None:
                raise self._skip(raw, "missing_image", f"member {member!r} is not in the sample")
            try:
                img = load_image(data, name=f"{raw.key}.{member}", max_pixels=self.max_pixels)
                cache[member] = to_patches_uint8(img, self.min_pixels, self.max_pixels_resize, self.patch_size,
                                                 self.merge_size)
            except ImageError as e:
                raise self._skip(raw, e.reason, str(e)) from None
            except ValueError as e:  # smart_resize: aspect ratio beyond 200
                raise self._skip(raw, "corrupt_image", f"member {member!r}: {e}") from None
        return cache[member]

    def _assemble(self, raw: RawSample, task: str, pieces: list) -> Qwen2VLSample:
        ids: list[int] = []
        labels: list[int] = []
        images: list[torch.Tensor] = []
        grids: list[tuple[int, int, int]] = []
        spans: list[tuple[int, int]] = []  # (start, end) of each image's tokens, vision_start..vision_end
        cache: dict = {}
        for p in pieces:
            if p[0] == "image":
                patches, grid = self._load(raw, p[1], cache)
                n = patches.shape[0] // self.merge_size**2
                spans.append((len(ids), len(ids) + n + 2))
                ids += [VISION_START_ID] + [IMAGE_PAD_ID] * n + [VISION_END_ID]
                labels += [IGNORE] * (n + 2)
                images.append(patches)
                grids.append(grid)
            else:
                bad = _QWEN_VL_ONLY.intersection(p[1])
                if bad:  # templates never emit these in text; a change there must not slip through
                    raise self._skip(raw, "bad_value", f"text piece holds Qwen-VL image ids {sorted(bad)}")
                toks = [_MARKUP_MAP.get(t, t) for t in p[1]]
                ids += toks
                labels += list(toks) if p[2] else [IGNORE] * len(toks)
        if not any(lab != IGNORE for lab in labels[1:]):
            raise self._skip(raw, "empty_text", "no trained token")
        if len(ids) > self.max_len:
            if self.truncate == "drop":
                raise self._skip(raw, "too_long", f"{len(ids)} tokens > max_len {self.max_len}")
            cut = self.max_len
            for s, e in spans:  # never inside an image: move the cut back to its vision_start
                if s < cut < e:
                    cut = s
            if not any(lab != IGNORE for lab in labels[1:cut]):
                raise self._skip(raw, "image_span_cut" if cut < self.max_len else "too_long",
                                 f"{len(ids)} tokens > max_len {self.max_len}, no cut keeps a trained token")
            keep = sum(1 for _, e in spans if e <= cut)
            ids, labels, images, grids = ids[:cut], labels[:cut], images[:keep], grids[:keep]
        return Qwen2VLSample(input_ids=ids, labels=labels, images=images, task=task, ref=raw.ref(), grids=grids)


__all__ = ["IMAGE_PAD_ID", "Qwen2VLSample", "Qwen2VLSampleBuilder", "VISION_END_ID", "VISION_START_ID"]
