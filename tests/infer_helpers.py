"""Shared by the inference / chat / evaluation tests: a tiny random QwenVL (conf/model/tiny.yaml at 224 px, the real
vocabulary) exported in the official layout, and small PNG images."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw


def tiny_cfg(*extra: str):  # noqa: ANN201 - DictConfig
    from train.config import load_config

    return load_config(["recipe=demo_stage3", "init.from_stage_dir=null", "model.vision.image_size=224", *extra])


def tiny_model(seed: int = 0):  # noqa: ANN201 - QwenVL
    from train.build import build_model

    cfg = tiny_cfg(f"train.seed={seed}")
    return build_model(cfg).eval(), cfg


def export_tiny(out: Path, seed: int = 0) -> Path:
    """Write a tiny official-layout checkpoint to `out` (config.json + safetensors + index)."""
    from train.model.official import export_official

    model, _ = tiny_model(seed)
    return export_official(model, out)


def write_image(path: Path, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    im = Image.new("RGB", size, (250, 250, 250))
    w, h = size
    im.paste(color, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    im.save(path)
    return path


def box_png(size: tuple[int, int], box: tuple[int, int, int, int], color: str) -> bytes:
    """PNG bytes: a white image with one filled rectangle (a grounding / colour-question sample)."""
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).rectangle(box, fill=color)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()
