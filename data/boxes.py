"""Box / quad normalisation to the [0,1000) integer grid, their text forms, and parsing them back.

The rule (one place, used by every converter and the demo corpus):

    n = floor(v / size * 999 + 0.5)      then clamped to [0, 999]

i.e. round-half-up of v*999/size. The official evaluation de-normalises with ``n / 999 * size``
(SPEC §6), so this rule is its exact inverse up to rounding: |denormalize(normalize(v)) - v| <= 0.5 * size / 999.
Pixel coordinates slightly outside the image (common in detection data) are clamped to the image.
A box is rejected (``InvalidBox``) when a coordinate is not a finite number, the image size is not
positive, x2 < x1 or y2 < y1 in the input, or the normalised box has zero width or height (e.g. a box
entirely outside the image, or thinner than one grid cell). Quads are rejected when the normalised
polygon has zero area.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

Box = tuple[int, int, int, int]
Quad = tuple[int, int, int, int, int, int, int, int]

GRID = 1000  # normalised coordinates are ints in [0, GRID)
_SCALE = GRID - 1  # official eval de-normalises with /999

_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")


class InvalidBox(ValueError):
    """A box or quad that cannot be normalised (bad numbers, inverted, or degenerate)."""


def _finite(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)  # numpy scalars, numeric strings from CSV
        except (TypeError, ValueError):
            raise InvalidBox(f"{what} is not a number: {v!r}") from None
    f = float(v)
    if not math.isfinite(f):
        raise InvalidBox(f"{what} is not finite: {v!r}")
    return f


def _size(width: object, height: object) -> tuple[float, float]:
    w, h = _finite(width, "image width"), _finite(height, "image height")
    if w <= 0 or h <= 0:
        raise InvalidBox(f"image size must be positive, got {width}x{height}")
    return w, h


def normalize_coord(v: float, size: float) -> int:
    """One pixel coordinate -> grid int in [0, 999] (clamped), per the module rule."""
    n = math.floor(v / size * _SCALE + 0.5)
    return min(max(n, 0), _SCALE)


def denormalize_coord(n: float, size: float) -> float:
    """Grid value -> pixels, exactly as the official evaluation does (n / 999 * size)."""
    return n / _SCALE * size


def normalize_box(*args: object) -> Box:
    """``normalize_box(x1, y1, x2, y2, width, height)`` or ``normalize_box((x1, y1, x2, y2), width, height)``.

    Pixel corners (x1,y1) top-left, (x2,y2) bottom-right -> ints in [0,1000). Raises InvalidBox.
    """
    if len(args) == 3:
        box, width, height = args
        if not isinstance(box, Sequence) or isinstance(box, (str, bytes)) or len(box) != 4:
            raise InvalidBox(f"box must be 4 numbers [x1,y1,x2,y2], got {box!r}")
        coords = list(box)
    elif len(args) == 6:
        *coords, width, height = args
    else:
        raise TypeError("normalize_box(x1, y1, x2, y2, width, height) or normalize_box(box, width, height)")
    w, h = _size(width, height)
    x1, y1, x2, y2 = (_finite(c, n) for c, n in zip(coords, ("x1", "y1", "x2", "y2")))
    if x2 < x1 or y2 < y1:
        raise InvalidBox(f"inverted box ({x1},{y1}),({x2},{y2}): need x1<=x2 and y1<=y2")
    out = (normalize_coord(x1, w), normalize_coord(y1, h), normalize_coord(x2, w), normalize_coord(y2, h))
    if out[2] <= out[0] or out[3] <= out[1]:
        raise InvalidBox(f"degenerate box ({x1},{y1}),({x2},{y2}) in a {w:g}x{h:g} image -> {out}")
    return out


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO/RefCOCO [x, y, w, h] -> [x1, y1, x2, y2] (pixels). Negative w/h raise InvalidBox."""
    if len(box) != 4:
        raise InvalidBox(f"box must be 4 numbers [x,y,w,h], got {box!r}")
    x, y, bw, bh = (_finite(c, n) for c, n in zip(box, ("x", "y", "w", "h")))
    if bw < 0 or bh < 0:
        raise InvalidBox(f"negative box size in [x,y,w,h]={list(box)}")
    return x, y, x + bw, y + bh


def _points(points: Sequence) -> list[tuple[float, float]]:
    """Accept 4 (x,y) pairs or 8 flat numbers."""
    flat: list = []
    for p in points:
        if isinstance(p, Sequence) and not isinstance(p, (str, bytes)):
            flat.extend(p)
        else:
            flat.append(p)
    if len(flat) != 8:
        raise InvalidBox(f"quad must be 4 points (8 numbers), got {points!r}")
    vals = [_finite(v, f"quad[{i}]") for i, v in enumerate(flat)]
    return [(vals[i], vals[i + 1]) for i in range(0, 8, 2)]


def normalize_quad(points: Sequence, width: float, height: float) -> Quad:
    """4 pixel corners (pairs or flat) -> flat 8 ints in [0,1000), clamped. Zero-area result -> InvalidBox."""
    w, h = _size(width, height)
    pts = [(normalize_coord(x, w), normalize_coord(y, h)) for x, y in _points(points)]
    # shoelace: twice the signed area; 0 means all points collinear / collapsed after clamping
    area2 = sum(pts[i][0] * pts[(i + 1) % 4][1] - pts[(i + 1) % 4][0] * pts[i][1] for i in range(4))
    if area2 == 0:
        raise InvalidBox(f"degenerate quad {list(points)} in a {w:g}x{h:g} image -> {pts}")
    return tuple(v for p in pts for v in p)  # type: ignore[return-value]


def box_to_quad(box: Sequence[int]) -> Quad:
    """Axis-aligned box -> 4 corners clockwise from top-left: (x1,y1),(x2,y1),(x2,y2),(x1,y2)."""
    x1, y1, x2, y2 = box
    return (x1, y1, x2, y1, x2, y2, x1, y2)


def _check_grid(vals: Sequence, n: int, what: str) -> list[int]:
    if len(vals) != n:
        raise InvalidBox(f"{what} needs {n} ints, got {vals!r}")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < GRID:
            raise InvalidBox(f"{what} values must be ints in [0,{GRID}), got {vals!r}")
        out.append(v)
    return out


def format_box(box: Sequence[int]) -> str:
    """Normalised [x1,y1,x2,y2] -> ``<box>(x1,y1),(x2,y2)</box>``."""
    x1, y1, x2, y2 = _check_grid(list(box), 4, "box")
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def format_quad(quad: Sequence[int]) -> str:
    """Normalised flat 8-int quad -> ``<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>``."""
    v = _check_grid(list(quad), 8, "quad")
    return "<quad>" + ",".join(f"({v[i]},{v[i + 1]})" for i in range(0, 8, 2)) + "</quad>"


def format_ref(phrase: str) -> str:
    """``<ref>phrase</ref>``; the phrase may not be empty nor contain the special markup tags."""
    p = phrase.strip()
    if not p:
        raise ValueError("empty <ref> phrase")
    for t in _TAGS:
        if t in p:
            raise ValueError(f"<ref> phrase contains markup {t!r}: {phrase!r}")
    return f"<ref>{p}</ref>"


_PAIR = r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)"
_BOX_RE = re.compile(r"<box>\s*" + _PAIR + r"\s*,\s*" + _PAIR + r"\s*</box>")
_LOOSE_RE = re.compile(_PAIR + r"\s*,\s*" + _PAIR)
_QUAD_RE = re.compile(r"<quad>\s*" + r"\s*,\s*".join([_PAIR] * 4) + r"\s*</quad>")
_REF_RE = re.compile(r"<ref>(.*?)</ref>((?:\s*<box>.*?</box>)*)", re.S)


def parse_boxes(text: str) -> list[Box]:
    """All well-formed ``<box>(x1,y1),(x2,y2)</box>`` in `text`, in order (grid ints, not range-checked)."""
    return [tuple(int(g) for g in m.groups()) for m in _BOX_RE.finditer(text)]  # type: ignore[misc]


def parse_first_box(text: str) -> Box | None:
    """The official RefCOCO eval parse: the first ``(x1,y1),(x2,y2)`` anywhere (the prompt already ends in
    ``<box>``, so the generation usually lacks the opening tag). None if there is none."""
    m = _LOOSE_RE.search(text)
    return tuple(int(g) for g in m.groups()) if m else None  # type: ignore[return-value]


def parse_quads(text: str) -> list[Quad]:
    """All well-formed ``<quad>..</quad>`` in `text`, in order."""
    return [tuple(int(g) for g in m.groups()) for m in _QUAD_RE.finditer(text)]  # type: ignore[misc]


def parse_refs(text: str) -> list[tuple[str, list[Box]]]:
    """``<ref>phrase</ref><box>..</box>[<box>..</box>..]`` -> [(phrase, [boxes])], in order."""
    return [(m.group(1), parse_boxes(m.group(2))) for m in _REF_RE.finditer(text)]


def denormalize_box(box: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """Grid box -> pixel box, as the official evaluation does (/999 * size)."""
    x1, y1, x2, y2 = box
    return (denormalize_coord(x1, width), denormalize_coord(y1, height),
            denormalize_coord(x2, width), denormalize_coord(y2, height))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1,y1,x2,y2] boxes (any consistent units); 0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------- grounded replies (inference side)
_GROUNDING_RE = re.compile(
    r"(?:<ref>(?P<ref>(?:(?!</ref>).)*?)</ref>)?\s*(?P<tag><box>|<quad>)(?P<body>[^<]*)(?:</box>|</quad>)", re.S)
_PAIRS_RE = re.compile(_PAIR)


def denormalize_quad(quad: Sequence[float], width: float, height: float) -> tuple[float, ...]:
    """Grid quad (flat 8 values) -> pixel quad, with the official /999 rule."""
    if len(quad) != 8:
        raise InvalidBox(f"quad must be 8 numbers, got {quad!r}")
    return tuple(denormalize_coord(v, width if i % 2 == 0 else height) for i, v in enumerate(quad))


def parse_grounding(text: str) -> list[tuple[str | None, str, tuple[int, ...]]]:
    """Every ``<box>``/``<quad>`` in a model reply, in order, with the phrase of the ``<ref>`` that precedes it:
    ``[(phrase or None, "box" | "quad", grid ints)]``. Several boxes after one ``<ref>`` all get its phrase
    (SPEC §3). A box needs 2 points and a quad 4; malformed ones (what an undertrained model writes) are left
    out. Values are not range-checked: a model may write 1000+, the caller clamps when drawing."""
    out: list[tuple[str | None, str, tuple[int, ...]]] = []
    phrase: str | None = None
    last_end = 0
    for m in _GROUNDING_RE.finditer(text):
        if m.group("ref") is not None:
            phrase = m.group("ref").strip()
        elif text[last_end:m.start()].strip():  # other text between: the box is not the previous ref's
            phrase = None
        last_end = m.end()
        kind = "box" if m.group("tag") == "<box>" else "quad"
        pts = [int(v) for p in _PAIRS_RE.findall(m.group("body")) for v in p]
        if len(pts) != (4 if kind == "box" else 8):
            continue
        out.append((phrase, kind, tuple(pts)))
    return out
