"""Shard layouts a source can declare: the project's own, or the one img2dataset writes.

* ``qwenvl`` (default): ``KEY.json`` holds the sample's metadata (``task``, ``lang``, ``images`` ...) and
  ``KEY.img0.jpg`` ... its images (data/shards.py's contract).
* ``img2dataset``: what img2dataset writes for LAION, DataComp, COYO downloads (``--output_format
  webdataset``): ``KEY.jpg`` (or .png / .webp), ``KEY.txt`` (the caption) and ``KEY.json`` (``url``,
  ``caption``, ``key``, ``status``, ``width``, ``height``, ``original_width`` ...). There is no task and no
  language in it: the source declares the task (default ``caption``), and the language is declared or
  detected per sample from the caption (``data.converters.detect_lang``, the same detector the converters
  use). The caption comes from ``KEY.txt`` (``caption_from: txt``) or a JSON field (``json:FIELD``).

``convert_img2dataset`` turns such a sample into the project's layout (image renamed ``img0.EXT``, the
original JSON fields kept), so training (``data.samples``) and cleaning (``data.clean``) read it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from data.converters import detect_lang
from data.tasks import LANGS

LAYOUTS = ("qwenvl", "img2dataset")
IMG2DATASET_TASKS = ("caption", "grounded_caption")  # the tasks whose only text is a caption
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format values


@dataclass(frozen=True)
class Layout:
    """How one source's shards are laid out (see the module doc)."""

    kind: str = "qwenvl"
    caption_from: str = "txt"  # txt | json:FIELD
    task: str = "caption"
    lang: str | None = None  # None: detected per sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_layout(source: str, layout: str = "qwenvl", caption_from: str = "txt", task: str = "caption",
                lang: str | None = None) -> Layout | None:
    """The checked Layout of `source` (None for the default ``qwenvl`` layout); ValueError names the bad key."""
    if layout not in LAYOUTS:
        raise ValueError(f"source {source!r}: layout {layout!r} is not one of {LAYOUTS}")
    if layout == "qwenvl":
        return None
    if caption_from != "txt" and not (caption_from.startswith("json:") and len(caption_from) > 5):
        raise ValueError(f"source {source!r}: caption_from {caption_from!r} must be 'txt' or 'json:FIELD'")
    if task not in IMG2DATASET_TASKS:
        raise ValueError(f"source {source!r}: task {task!r} for an img2dataset layout must be one of "
                         f"{IMG2DATASET_TASKS} (its only text is a caption)")
    if lang is not None and lang not in LANGS:
        raise ValueError(f"source {source!r}: lang {lang!r} must be one of {LANGS} or null (detected)")
    return Layout(layout, caption_from, task, lang)


def layout_from_dict(d: dict[str, Any] | None) -> Layout | None:
    return None if d is None else Layout(**d)


def parse_meta(key: str, raw: bytes) -> dict[str, Any] | tuple[str, str, str]:
    """A sample's ``KEY.json`` as a dict, or the (reason, member, detail) that skips it (either layout)."""
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return ("bad_json", f"{key}.json", str(e))
    if not isinstance(meta, dict):
        return ("bad_json", f"{key}.json", f"metadata is {type(meta).__name__}, not an object")
    return meta


def convert_img2dataset(key: str, meta_raw: bytes | None, files: dict[str, bytes], layout: Layout,
                        source: str) -> tuple[dict[str, Any], dict[str, bytes]] | tuple[str, str, str]:
    """(meta, files) in the project's layout, or (reason, member, detail) when the sample is unusable."""
    meta: dict[str, Any] = {}
    if meta_raw is not None:
        parsed = parse_meta(key, meta_raw)
        if isinstance(parsed, tuple):
            return parsed
        meta = parsed
    images = [e for e in IMAGE_EXTS if e in files]
    if len(images) != 1:
        return ("missing_image", f"{key}.*", f"img2dataset sample {key!r} needs one image member of {IMAGE_EXTS}, "
                                             f"has {sorted(files)}")
    if layout.caption_from == "txt":
        if "txt" not in files:
            return ("missing_key", f"{key}.txt", f"img2dataset sample {key!r} has no .txt caption "
                                                 f"(members {sorted(files)}); caption_from=json:FIELD reads the json")
        try:
            caption = files["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            # counted, never replaced: the text is not valid Unicode (an encoded lone surrogate fails here too)
            return ("invalid_unicode", f"{key}.txt", f"caption is not valid UTF-8: {e}")
    else:
        field = layout.caption_from[5:]
        if meta_raw is None:
            return ("missing_json", f"{key}.json", f"caption_from={layout.caption_from} but sample {key!r} has no json")
        caption = meta.get(field)
        if not isinstance(caption, str):
            return ("missing_key", f"{key}.json", f"caption field {field!r} is {type(caption).__name__}, not a string")
    ext = images[0]
    out = dict(meta)
    # the project's fields win over same-named img2dataset ones ("caption" is the same text anyway)
    out.update(task=layout.task, caption=caption, images=[f"img0.{ext}"],
               lang=layout.lang or detect_lang(caption), source=str(meta.get("source") or source))
    return out, {f"img0.{ext}": files[ext]}


__all__ = ["IMG2DATASET_TASKS", "LAYOUTS", "Layout", "convert_img2dataset", "layout_from_dict", "make_layout",
           "parse_meta"]
