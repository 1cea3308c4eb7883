"""Convert user datasets into shards (DESIGN.md sample layout) through a `data.shards.ShardWriter`.

Every converter takes the input, a writer and keyword options, and returns a `ConvertReport`: how many
samples were written and, per skip reason, how many inputs were skipped with a few examples
("file:line: detail"). Nothing is dropped silently; with ``strict=True`` the first skip raises
`ConvertError` naming the file/line instead.

Images are read from disk, fully decoded once with PIL (corrupt or truncated files are skipped as
``corrupt_image``), embedded unchanged when JPEG/PNG/WebP (other formats are re-encoded as PNG), and their
sizes recorded as ``meta["sizes"] = [[w, h], ...]``. Sample keys are ``{source}-{n:09d}`` with n the input
record index, so keys are stable for a given input; each meta also carries ``origin`` ("file:line").
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from data.boxes import (
    InvalidBox,
    box_to_quad,
    format_box,
    format_ref,
    normalize_box,
    normalize_quad,
    xywh_to_xyxy,
)
from data.shards import ShardError, ShardWriter
from data.tasks import LANGS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_MAX_EXAMPLES = 5
_IMG_TAG = re.compile(r"<img>(.*?)</img>", re.S)
_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class ConvertError(ValueError):
    """Raised in strict mode (or for unusable input files) naming the file/line and the problem."""


class _Skip(Exception):
    """Internal: this record is skipped for `reason`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class ConvertReport:
    """Outcome of one conversion: written samples (per task / language) and skips by reason."""

    source: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    tasks: Counter = field(default_factory=Counter)
    langs: Counter = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, reason: str, where: str, detail: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _MAX_EXAMPLES:
            ex.append(f"{where}: {detail}")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "written": self.written, "skipped_total": self.n_skipped,
                "skipped": dict(sorted(self.skipped.items())), "examples": self.examples,
                "tasks": dict(sorted(self.tasks.items())), "langs": dict(sorted(self.langs.items()))}


# ------------------------------------------------------------------------------------------ helpers

def _is_cjk(c: str) -> bool:
    o = ord(c)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x2A6DF)


def detect_lang(text: str, zh_ratio: float = 0.2) -> str:
    """``"zh"`` when CJK ideographs are at least `zh_ratio` of the CJK + Latin letters in `text`, else ``"en"``.

    One ideograph carries about a word, a Latin word about five letters: 0.2 makes mostly-Chinese text
    with a few English words "zh" and English text with a stray Chinese name "en".
    """
    cjk = sum(1 for c in text if _is_cjk(c))
    latin = sum(1 for c in text if c.isascii() and c.isalpha())
    if cjk == 0:
        return "en"
    return "zh" if cjk / (cjk + latin) >= zh_ratio else "en"


def _norm_lang(value: Any, text: str, forced: str | None) -> str:
    if forced is not None:
        return forced
    if value is None or value == "":
        return detect_lang(text)
    v = str(value).strip().lower()
    for lang in LANGS:  # accept "zh-cn", "en_US", ...
        if v == lang or v.startswith(lang + "-") or v.startswith(lang + "_"):
            return lang
    raise _Skip("bad_lang", f"language {value!r} is not one of {LANGS}")


def _safe_source(source: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_\-]+", "_", source).strip("_-") or "data"
    return s[:60]


@dataclass
class LoadedImage:
    ext: str
    data: bytes
    size: tuple[int, int]


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Read and fully decode an image file; JPEG/PNG/WebP bytes are kept, other formats re-encoded to PNG.

    Raises FileNotFoundError when missing and ValueError when the bytes are not a decodable image.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: image file not found")
    data = p.read_bytes()
    return decode_image_bytes(data, str(p))


def decode_image_bytes(data: bytes, where: str = "<bytes>") -> LoadedImage:
    """Validate image bytes (PIL verify + full decode) -> LoadedImage; ValueError naming `where` if corrupt."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure / checksums
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: catches truncated JPEGs that verify() lets through
            fmt, size = im.format, im.size
            if fmt in _KEEP_FORMATS:
                return LoadedImage(_KEEP_FORMATS[fmt], data, size)
            buf = io.BytesIO()
            im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB").save(buf, "PNG")
            return LoadedImage("png", buf.getvalue(), size)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: not a decodable image ({type(e).__name__}: {e})") from e


class _ImageCache:
    """Small LRU of loaded images (COCO / RefCOCO / VQA reference one image many times); failures cached too."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._d: OrderedDict[str, LoadedImage | _Skip] = OrderedDict()

    def get(self, path: Path) -> LoadedImage:
        k = str(path)
        if k in self._d:
            self._d.move_to_end(k)
            hit = self._d[k]
        else:
            try:
                hit = load_image(path)
            except FileNotFoundError as e:
                hit = _Skip("missing_image", str(e))
            except ValueError as e:
                hit = _Skip("corrupt_image", str(e))
            self._d[k] = hit
            if len(self._d) > self.size:
                self._d.popitem(last=False)
        if isinstance(hit, _Skip):
            raise _Skip(hit.reason, hit.detail)
        return hit


class _Run:
    """Shared state of one conversion: writer, report, keys, image cache, strictness."""

    def __init__(self, writer: ShardWriter, source: str, strict: bool, lang: str | None) -> None:
        if lang is not None and lang not in LANGS:
            raise ValueError(f"lang must be one of {LANGS} or None, got {lang!r}")
        self.writer, self.source, self.strict, self.lang = writer, source, strict, lang
        self.report = ConvertReport(source)
        self.key_prefix = _safe_source(source)
        self.images = _ImageCache()

    def resolve(self, root: Path, ref: Any) -> Path:
        if not isinstance(ref, str) or not ref.strip():
            raise _Skip("bad_record", f"image reference must be a non-empty string, got {ref!r}")
        if "://" in ref:
            raise _Skip("missing_image", f"remote image {ref!r} (download images first; no network access)")
        p = Path(ref)
        return p if p.is_absolute() else root / p

    def image(self, root: Path, ref: Any) -> LoadedImage:
        return self.images.get(self.resolve(root, ref))

    def skip(self, where: str, reason: str, detail: str) -> None:
        if self.strict:
            raise ConvertError(f"{where}: {reason}: {detail}")
        self.report.add_skip(reason, where, detail)

    def write(self, index: int, where: str, meta: dict[str, Any], images: Sequence[LoadedImage],
              suffix: str = "") -> None:
        key = f"{self.key_prefix}-{index:09d}{suffix}"
        meta = {**meta, "source": self.source, "origin": where}
        if images:
            meta["sizes"] = [list(im.size) for im in images]
        try:
            self.writer.write(key, meta, [(im.ext, im.data) for im in images])
        except ShardError as e:
            raise _Skip("invalid_sample", str(e)) from e
        self.report.written += 1
        self.report.tasks[meta["task"]] += 1
        self.report.langs[meta["lang"]] += 1


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) from a .jsonl (one JSON per line; a bad line yields a _Skip) or a .json list."""
    if not path.is_file():
        raise ConvertError(f"{path}: input file not found")
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{i}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{i}", _Skip("bad_record", f"invalid JSON: {e}")
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise ConvertError(f"{path}: expected a JSON list of records (or use .jsonl), got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"{path}[{i}]", rec


def _field(rec: Any, *names: str, required: bool = True) -> Any:
    if not isinstance(rec, dict):
        raise _Skip("bad_record", f"record must be a JSON object, got {type(rec).__name__}")
    for n in names:
        if n in rec and rec[n] is not None:
            return rec[n]
    if required:  # the fields it does have point at a wrong --image-col / --caption-col or format
        has = ", ".join(repr(k) for k in list(rec)[:8]) or "none"
        raise _Skip("bad_record", f"missing field {' / '.join(repr(n) for n in names)} (record has: {has})")
    return None


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise _Skip("bad_record", f"{what} must be a string, got {type(v).__name__}")
    t = v.strip()
    if not t:
        raise _Skip("empty_text", f"empty {what}")
    return t


def _drive(run: _Run, items: Iterable[tuple[str, Any]], handle: Any) -> ConvertReport:
    """Call handle(index, where, record) for each item, turning _Skip into counted skips (or errors)."""
    for index, (where, rec) in enumerate(items):
        try:
            if isinstance(rec, _Skip):
                raise rec
            handle(index, where, rec)
        except _Skip as s:
            run.skip(where, s.reason, s.detail)
    return run.report


def _size_of(rec: dict, img: LoadedImage) -> tuple[Any, Any]:
    """The pixel space of the annotation: the record's width/height when given, else the image's."""
    w, h = rec.get("width"), rec.get("height")
    return (w, h) if w is not None and h is not None else img.size


# ------------------------------------------------------------------------------- (a) caption pairs

def _caption_meta(run: _Run, caption: Any, lang: Any) -> dict[str, Any]:
    cap = _text(caption, "caption")
    return {"task": "caption", "lang": _norm_lang(lang, cap, run.lang), "caption": cap}


def convert_caption_folder(folder: str | os.PathLike, writer: ShardWriter, *, source: str = "pairs",
                           strict: bool = False, lang: str | None = None) -> ConvertReport:
    """Image files with a same-stem ``.txt`` caption beside them (searched recursively, sorted).

    An image without a .txt is skipped as ``missing_caption``; a .txt without an image as ``missing_image``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConvertError(f"{root}: not a directory")
    run = _Run(writer, source, strict, lang)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images: dict[Path, Path] = {}
    dup: dict[Path, Path] = {}  # a second image with the same stem: ambiguous pairing, skipped and counted
    for p in files:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            if p.with_suffix("") in images:
                dup[p] = images[p.with_suffix("")]
            else:
                images[p.with_suffix("")] = p
    texts = {p.with_suffix(""): p for p in files if p.suffix.lower() == ".txt"}

    def items() -> Iterator[tuple[str, Any]]:
        for stem in sorted(set(images) | set(texts)):
            yield str(images.get(stem) or texts[stem]), stem
        for p, first in sorted(dup.items()):
            yield str(p), _Skip("duplicate_stem", f"another image with this stem ({first.name}) was paired "
                                                  "with the caption")

    def handle(index: int, where: str, stem: Path) -> None:
        if stem not in texts:
            raise _Skip("missing_caption", f"no caption file {stem.name}.txt beside the image")
        if stem not in images:
            raise _Skip("missing_image", f"caption {texts[stem].name} has no image with the same stem")
        try:
            caption = texts[stem].read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise _Skip("bad_record", f"{texts[stem].name} is not UTF-8: {e}") from e
        meta = _caption_meta(run, caption, None)
        run.write(index, where, meta, [run.images.get(images[stem])])

    return _drive(run, items(), handle)


def convert_caption_jsonl(path: str | os.PathLike, writer: ShardWriter, *, image_root: str | None = None,
                          image_col: str = "image", caption_col: str = "caption", lang_col: str = "lang",
                          source: str = "pairs", strict: bool = False, lang: str | None = None) -> ConvertReport:
    """JSONL (or JSON list) of ``{"image": path, "caption": str[, "lang"]}``; paths relative to `image_root`
    (default: the file's directory). `image_col` / `caption_col` / `lang_col` name other fields; with the
    default caption field, ``text`` is accepted too."""
    p = Path(path)
    root = Path(image_root) if image_root else p.parent
    run = _Run(writer, source, strict, lang)
    caption_fields = (caption_col, "text") if caption_col == "caption" else (caption_col,)

    def handle(index: int, where: str, rec: Any) -> None:
        meta = _caption_meta(run, _field(rec, *caption_fields), rec.get(lang_col))
        run.write(index, where, meta, [run.image(root, _field(rec, image_col))])

    return _drive(run, _records(p), handle)


def convert_caption_csv(path: str | os.PathLike, writer: ShardWriter, *, image_root: str | None = None,
                        image_col: str = "image", caption_col: str = "caption", lang_col: str = "lang",
                        source: str = "pairs", strict: bool = False, lang: str | None = None) -> ConvertReport:
    """CSV with a header row holding `image_col` and `caption_col` (optional `lang_col`)."""
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"{p}: input file not found")
    root = Path(image_root) if image_root else p.parent
    run = _Run(writer, source, strict, lang)
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in (image_col, caption_col) if c not in cols]
        if missing:
            raise ConvertError(f"{p}: CSV header {cols} lacks column(s) {missing}")
        rows = [(f"{p}:{reader.line_num}", row) for row in reader]

    def handle(index: int, where: str, row: dict) -> None:
        meta = _caption_meta(run, row.get(caption_col) or "", row.get(lang_col))
        run.write(index, where, meta, [run.image(root, row.get(image_col) or "")])

    return _drive(run, rows, handle)


# -------------------------------------------------------------------------------- (b) COCO captions

def convert_coco_captions(path: str | os.PathLike, image_root: str | os.PathLike, writer: ShardWriter, *,
                          source: str = "coco", strict: bool = False, lang: str | None = None,
                          per_image: bool = False) -> ConvertReport:
    """COCO captions json (``images`` [{id, file_name}], ``annotations`` [{image_id, caption}]).

    One sample per annotation (default), or with `per_image` one per image (first caption as ``caption``,
    all in ``captions``). Annotations naming an unknown image id are skipped as ``bad_record``.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{p}: cannot read COCO json: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ConvertError(f"{p}: COCO captions json needs 'images' and 'annotations' lists")
    files = {im.get("id"): im.get("file_name") for im in data["images"] if isinstance(im, dict)}
    root = Path(image_root)
    run = _Run(writer, source, strict, lang)
    anns = [(f"{p}:annotations[{i}]", a) for i, a in enumerate(data["annotations"])]

    def image_of(rec: Any) -> LoadedImage:
        iid = _field(rec, "image_id")
        if iid not in files:
            raise _Skip("bad_record", f"image_id {iid!r} is not in 'images'")
        return run.image(root, files[iid])

    if not per_image:
        def handle(index: int, where: str, rec: Any) -> None:
            meta = _caption_meta(run, _field(rec, "caption"), rec.get("lang"))
            run.write(index, where, meta, [image_of(rec)])
        return _drive(run, anns, handle)

    grouped: OrderedDict[Any, list[tuple[str, Any]]] = OrderedDict()
    for where, a in anns:
        iid = a.get("image_id") if isinstance(a, dict) else None
        grouped.setdefault(iid, []).append((where, a))

    def handle_image(index: int, where: str, group: list[tuple[str, Any]]) -> None:
        first = group[0][1]
        if not isinstance(first, dict) or first.get("image_id") not in files:
            for w, a in group:  # count every annotation of an unusable group, not just the group
                detail = (f"image_id {a.get('image_id')!r} is not in 'images'" if isinstance(a, dict)
                          else f"annotation must be a JSON object, got {type(a).__name__}")
                run.skip(w, "bad_record", detail)
            return
        caps = []
        for w, a in group:
            try:
                caps.append(_text(_field(a, "caption"), "caption"))
            except _Skip as s:
                run.skip(w, s.reason, s.detail)
        if not caps:
            raise _Skip("empty_text", "no usable caption for this image")
        meta = {**_caption_meta(run, caps[0], group[0][1].get("lang")), "captions": caps}
        run.write(index, where, meta, [image_of(group[0][1])])

    return _drive(run, [(g[0][0], g) for g in grouped.values()], handle_image)


# ------------------------------------------------------------------------- (c) referring / detection

REF_TASKS = ("ref_grounding", "region_caption", "grounded_caption")


def convert_referring(path: str | os.PathLike, image_root: str | os.PathLike, writer: ShardWriter, *,
                      box_format: str = "xywh", tasks: Sequence[str] = ("ref_grounding",),
                      source: str = "refcoco", strict: bool = False, lang: str | None = None) -> ConvertReport:
    """RefCOCO-style records ``{"image", "sentence" | "sentences": [..], "bbox", ["width", "height"]}``.

    `box_format` is ``"xywh"`` (COCO pixels [x, y, w, h]) or ``"xyxy"`` (pixel corners). Boxes are
    normalised in the record's width/height (else the image's size), clamped to the image; invalid or
    degenerate boxes skip the record as ``invalid_box``. Each sentence yields one sample per task in `tasks`
    (``ref_grounding``: expression -> box; ``region_caption``: box -> description; ``grounded_caption``:
    ``<ref>sentence</ref><box>..</box>``).
    """
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    bad = [t for t in tasks if t not in REF_TASKS]
    if bad or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {REF_TASKS}, got {list(tasks)}")
    p = Path(path)
    root = Path(image_root)
    run = _Run(writer, source, strict, lang)

    def handle(index: int, where: str, rec: Any) -> None:
        sents = _field(rec, "sentences", "sentence", "expression", "refs")
        sents = [sents] if isinstance(sents, str) else sents
        if not isinstance(sents, list) or not sents:
            raise _Skip("bad_record", f"sentences must be a string or non-empty list, got {sents!r}")
        sents = [s.get("sent", s.get("raw")) if isinstance(s, dict) else s for s in sents]  # RefCOCO dicts
        texts = [_text(s, "sentence") for s in sents]
        bbox = _field(rec, "bbox", "box")
        img = run.image(root, _field(rec, "image", "file_name"))
        w, h = _size_of(rec, img)
        try:
            if not isinstance(bbox, (list, tuple)):
                raise InvalidBox(f"bbox must be a list of 4 numbers, got {bbox!r}")
            xyxy = xywh_to_xyxy(bbox) if box_format == "xywh" else bbox
            box = list(normalize_box(xyxy, w, h))
        except InvalidBox as e:
            raise _Skip("invalid_box", str(e)) from e
        for j, sent in enumerate(texts):
            lg = _norm_lang(rec.get("lang"), sent, run.lang)
            for t in tasks:
                if t == "ref_grounding":
                    meta = {"task": t, "lang": lg, "expression": sent, "box": box}
                elif t == "region_caption":
                    meta = {"task": t, "lang": lg, "box": box, "description": sent}
                else:
                    try:
                        cap = format_ref(sent) + format_box(box)
                    except ValueError as e:
                        raise _Skip("bad_record", str(e)) from e
                    meta = {"task": t, "lang": lg, "caption": cap}
                run.write(index, where, meta, [img], suffix=f"-{j}-{REF_TASKS.index(t)}")

    return _drive(run, _records(p), handle)


# ------------------------------------------------------------------------------------------- (d) VQA

def convert_vqa(path: str | os.PathLike, image_root: str | os.PathLike, writer: ShardWriter, *,
                source: str = "vqa", strict: bool = False, lang: str | None = None) -> ConvertReport:
    """``{"image", "question", "answers": [..] | "answer": str}``. A given ``answer`` (or VQAv2's
    ``multiple_choice_answer``) becomes ``answers[0]``, the training answer: one equal entry of ``answers`` is
    moved to the front (so the annotator answers used for VQA scoring stay the same multiset), else it is
    prepended."""
    p, root = Path(path), Path(image_root)
    run = _Run(writer, source, strict, lang)

    def handle(index: int, where: str, rec: Any) -> None:
        q = _text(_field(rec, "question"), "question")
        ans = _field(rec, "answers", required=False)
        one = _field(rec, "answer", "multiple_choice_answer", required=False)
        if ans is None and one is None:
            raise _Skip("bad_record", "missing field 'answers' / 'answer'")
        ans = [] if ans is None else ans
        if not isinstance(ans, list):
            raise _Skip("bad_record", f"'answers' must be a list, got {type(ans).__name__}")
        ans = [a.get("answer") if isinstance(a, dict) else a for a in ans]  # VQAv2 [{"answer": ..}]
        answers = [a.strip() for a in ans if isinstance(a, str) and a.strip()]
        if one is not None:  # the training answer goes first; the annotator multiset is kept for scoring
            first = _text(one, "answer")
            if first in answers:
                answers.remove(first)
            answers.insert(0, first)
        if not answers:
            raise _Skip("empty_text", "no non-empty answer")
        meta = {"task": "vqa", "lang": _norm_lang(rec.get("lang"), q + " " + answers[0], run.lang),
                "question": q, "answers": answers}
        run.write(index, where, meta, [run.image(root, _field(rec, "image"))])

    return _drive(run, _records(p), handle)


# ------------------------------------------------------------------------------------------- (e) OCR

def convert_ocr(path: str | os.PathLike, image_root: str | os.PathLike, writer: ShardWriter, *,
                box_format: str = "xyxy", source: str = "ocr", strict: bool = False,
                lang: str | None = None) -> ConvertReport:
    """``{"image", "lines": [{"text", "box": [..] | "quad": [8 numbers or 4 pairs]}], ["width","height"]}``.

    Pixel boxes (`box_format` xyxy or xywh) become 4-corner quads. One invalid/degenerate line skips the
    whole record (``invalid_box``): a partial transcription would teach the model to miss text.
    """
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}")
    p, root = Path(path), Path(image_root)
    run = _Run(writer, source, strict, lang)

    def handle(index: int, where: str, rec: Any) -> None:
        lines = _field(rec, "lines")
        if not isinstance(lines, list) or not lines:
            raise _Skip("bad_record", "'lines' must be a non-empty list")
        img = run.image(root, _field(rec, "image"))
        w, h = _size_of(rec, img)
        out = []
        for i, ln in enumerate(lines):
            text = _text(_field(ln, "text"), f"lines[{i}].text")
            try:
                if isinstance(ln.get("quad"), (list, tuple)):
                    quad = list(normalize_quad(ln["quad"], w, h))
                elif isinstance(ln.get("box"), (list, tuple)):
                    b = xywh_to_xyxy(ln["box"]) if box_format == "xywh" else ln["box"]
                    quad = list(box_to_quad(normalize_box(b, w, h)))
                else:
                    raise _Skip("bad_record", f"lines[{i}] has neither 'quad' nor 'box'")
            except InvalidBox as e:
                raise _Skip("invalid_box", f"lines[{i}]: {e}") from e
            out.append({"text": text, "quad": quad})
        meta = {"task": "ocr", "lang": _norm_lang(rec.get("lang"), " ".join(x["text"] for x in out), run.lang),
                "lines": out}
        run.write(index, where, meta, [img])

    return _drive(run, _records(p), handle)


# ------------------------------------------------------------------------------------------ (f) text

def convert_text(path: str | os.PathLike, writer: ShardWriter, *, source: str = "text", strict: bool = False,
                 lang: str | None = None) -> ConvertReport:
    """``.jsonl`` of ``{"text"[, "lang"]}`` or ``.txt`` split into paragraphs at blank lines -> ``text``."""
    p = Path(path)
    run = _Run(writer, source, strict, lang)
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise ConvertError(f"{p}: input file not found")
        items, para, start = [], [], 0
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    if not para:
                        start = i
                    para.append(line.rstrip("\n"))
                elif para:
                    items.append((f"{p}:{start}", {"text": "\n".join(para)}))
                    para = []
        if para:
            items.append((f"{p}:{start}", {"text": "\n".join(para)}))
        records: Iterable[tuple[str, Any]] = items
    else:
        records = _records(p)

    def handle(index: int, where: str, rec: Any) -> None:
        text = _text(_field(rec, "text"), "text")
        meta = {"task": "text", "lang": _norm_lang(rec.get("lang"), text, run.lang), "text": text}
        run.write(index, where, meta, [])

    return _drive(run, records, handle)


# ------------------------------------------------------------------------- (g) official fine-tune JSON

def convert_qwen_chat(path: str | os.PathLike, image_root: str | os.PathLike | None, writer: ShardWriter, *,
                      source: str = "sft", strict: bool = False, lang: str | None = None) -> ConvertReport:
    """The official Qwen-VL fine-tuning file: a JSON list (or JSONL) of ``{"id", "conversations": [{"from":
    "user"|"assistant", "value"}]}`` with ``<img>path</img>`` references (relative to `image_root`, default the
    file's directory). Images are embedded; references are rewritten to member names (``<img>img0.jpg</img>``;
    the same path twice shares one member). ``human``/``gpt`` roles are accepted as user/assistant.
    A missing or corrupt image skips the whole conversation.
    """
    p = Path(path)
    root = Path(image_root) if image_root else p.parent
    run = _Run(writer, source, strict, lang)

    def handle(index: int, where: str, rec: Any) -> None:
        conv = _field(rec, "conversations")
        if not isinstance(conv, list) or not conv:
            raise _Skip("bad_record", "'conversations' must be a non-empty list")
        members: dict[str, str] = {}  # original path -> member name
        loaded: list[LoadedImage] = []

        def member(m: re.Match) -> str:
            ref = m.group(1).strip()
            if ref not in members:
                img = run.image(root, ref)
                members[ref] = f"img{len(loaded)}.{img.ext}"
                loaded.append(img)
            return f"<img>{members[ref]}</img>"

        turns, all_text = [], []
        for i, t in enumerate(conv):
            role = _ROLE_ALIASES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise _Skip("bad_record", f"conversations[{i}] must be {{'from': user|assistant, 'value': str}}")
            value = _IMG_TAG.sub(member, t["value"])
            turns.append({"from": role, "value": value})
            all_text.append(_IMG_TAG.sub("", t["value"]))
        if not any(t["from"] == "assistant" and t["value"].strip() for t in turns):
            raise _Skip("empty_text", "no non-empty assistant turn (nothing to train on)")
        meta = {"task": "chat", "lang": _norm_lang(rec.get("lang"), "\n".join(all_text), run.lang),
                "conversations": turns}
        if rec.get("id") is not None:
            meta["id"] = str(rec["id"])
        run.write(index, where, meta, loaded)

    return _drive(run, _records(p), handle)
