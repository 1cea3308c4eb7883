"""Grounding made visible: parsed `<box>` / `<quad>` of a reply, de-normalised to the image's pixels with the
official rule (n / 999 * size, data.boxes.denormalize_coord), drawn with their `<ref>` phrase as a label.

Labels are written with WenQuanYi Micro Hei (CJK-capable; `make fonts` installs it) and fall back to PIL's
default font with a warning, which cannot render Chinese.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data.boxes import GRID, denormalize_box, denormalize_quad, parse_grounding

FONT_PATH = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
# distinct, saturated colours (RGB); box i gets PALETTE[i % len]
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
)


@dataclass
class Grounding:
    """One box or quad of a reply: `grid` as written (ints, [0,1000)), `pixels` in the image it refers to."""

    label: str | None
    kind: str  # "box" | "quad"
    grid: tuple[int, ...]
    pixels: tuple[float, ...] | None = None  # x1,y1,x2,y2 (box) or 4 corners flat (quad); None without an image
    image: str | None = None  # path / name of the image the pixels refer to


def _clamp_grid(v: Sequence[int]) -> list[int]:
    return [min(max(int(x), 0), GRID - 1) for x in v]


def groundings(text: str, size: tuple[int, int] | None = None, image: str | None = None) -> list[Grounding]:
    """Parse a reply (data.boxes.parse_grounding) and de-normalise to `size` = (width, height) when given.
    Out-of-grid values an undertrained model may write are clamped to [0, 999] before de-normalising."""
    out = []
    for label, kind, grid in parse_grounding(text):
        px = None
        if size is not None:
            w, h = size
            g = _clamp_grid(grid)
            px = denormalize_box(g, w, h) if kind == "box" else denormalize_quad(g, w, h)
        out.append(Grounding(label, kind, tuple(grid), px, image))
    return out


@lru_cache(maxsize=8)
def load_font(size: int, path: str = FONT_PATH) -> ImageFont.ImageFont:
    if os.path.isfile(path):
        return ImageFont.truetype(path, size)
    warnings.warn(f"{path} not found (run `make fonts`): labels use PIL's default font, which has no CJK glyphs",
                  stacklevel=2)
    return ImageFont.load_default(size)


def draw_groundings(image: Image.Image, items: Sequence[Grounding], out: str | os.PathLike | None = None,
                    font_path: str = FONT_PATH,
                    colors: Sequence[tuple[int, int, int]] | None = None) -> Image.Image:
    """A copy of `image` (RGB) with every item's box / quad outlined in its colour (`colors[i]`, default the
    palette) and its label on a filled tag above the top-left corner; saved to `out` (format from the suffix,
    e.g. .png) when given."""
    im = image.convert("RGB").copy()
    W, H = im.size
    d = ImageDraw.Draw(im)
    width = max(2, round(min(W, H) / 150))
    font = load_font(max(10, round(min(W, H) / 28)), font_path)
    for i, g in enumerate(items):
        if g.pixels is None:
            raise ValueError(f"grounding {i} ({g.kind} {g.grid}) has no pixel coordinates: parse it with the "
                             "image size (groundings(text, size=image.size))")
        color = colors[i] if colors is not None else PALETTE[i % len(PALETTE)]
        if g.kind == "box":
            x1, y1, x2, y2 = g.pixels
            d.rectangle([x1, y1, x2, y2], outline=color, width=width)
            anchor = (x1, y1)
        else:
            pts = [(g.pixels[j], g.pixels[j + 1]) for j in range(0, 8, 2)]
            d.line(pts + [pts[0]], fill=color, width=width, joint="curve")
            anchor = pts[0]  # quads start at the top-left corner (data.boxes.box_to_quad order)
        if g.label:
            left, t, r, b = d.textbbox((0, 0), g.label, font=font)
            tw, th = r - left, b - t
            x = min(max(anchor[0], 0), max(0, W - tw - 4))
            y = anchor[1] - th - 4 if anchor[1] - th - 4 >= 0 else anchor[1] + width
            d.rectangle([x, y, x + tw + 4, y + th + 4], fill=color)
            d.text((x + 2 - left, y + 2 - t), g.label, fill=(255, 255, 255), font=font)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        im.save(out)
    return im
