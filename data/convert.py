"""CLI: convert user datasets into shards.  ``python -m data.convert FORMAT INPUT --out DIR [options]``

Formats: ``pairs`` (image folder with same-stem .txt, .jsonl/.json or .csv of image+caption),
``coco`` (COCO captions json), ``refcoco`` (referring records), ``vqa``, ``ocr``, ``text`` (.jsonl or .txt),
``qwen-chat`` (the official Qwen-VL fine-tuning JSON). Writes ``DIR/{prefix}-NNNNNN.tar``, ``DIR/manifest.json``
and ``DIR/convert_report.json``; prints the report. Exit status 1 when nothing was written.
``python -m data.convert KIND --help`` lists the input fields KIND expects, with an example (`FORMATS`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.converters import (
    REF_TASKS,
    ConvertError,
    ConvertReport,
    convert_caption_csv,
    convert_caption_folder,
    convert_caption_jsonl,
    convert_coco_captions,
    convert_ocr,
    convert_qwen_chat,
    convert_referring,
    convert_text,
    convert_vqa,
)
from data.shards import ShardWriter
from data.tasks import LANGS


@dataclass(frozen=True)
class InputFormat:
    """What one KIND reads: shown by `python -m data.convert KIND --help`; tests convert every example."""

    summary: str
    fields: str  # the input layout, one field per line
    examples: tuple[tuple[str, str], ...]  # (file name, content); image paths are relative to --image-root
    usage: str


# lang: every record kind also accepts an optional "lang" (en | zh; default: detected from the text)
FORMATS: dict[str, InputFormat] = {
    "pairs": InputFormat(
        "image-caption pairs: folder (img + same-stem .txt), .jsonl/.json or .csv",
        """\
a folder:      every image (jpg, png, webp, ...) with a same-stem .txt caption beside it (a/b.jpg + a/b.txt)
.jsonl/.json:  one record per line (or a JSON list) with
  image        image path, relative to --image-root            (another field: --image-col)
  caption      the caption; "text" is accepted too             (another field: --caption-col)
  lang         optional: en | zh (default: detected)
.csv:          a header row naming the same columns (--image-col / --caption-col; optional lang)""",
        (("captions.jsonl", '{"image": "cat.jpg", "caption": "A cat asleep on a sofa."}\n'
                            '{"image": "dog.jpg", "caption": "一只狗在草地上奔跑。", "lang": "zh"}\n'),
         ("captions.csv", "image,caption\ncat.jpg,A cat asleep on a sofa.\n")),
        "python -m data.convert pairs captions.jsonl --out shards/cc --image-root images/"),
    "coco": InputFormat(
        "COCO captions json",
        """\
one JSON object (captions_train2017.json) with
  images       [{"id", "file_name"}]       file_name relative to --image-root
  annotations  [{"image_id", "caption"}]   one sample per annotation (--per-image: one per image)""",
        (("captions_train2017.json", '{"images": [{"id": 9, "file_name": "cat.jpg"}],\n'
                                     ' "annotations": [{"image_id": 9, "caption": "A cat on a sofa."}]}\n'),),
        "python -m data.convert coco captions_train2017.json --out shards/coco --image-root train2017/"),
    "refcoco": InputFormat(
        "referring expressions / detection records -> ref_grounding (+ variants)",
        """\
.jsonl (or a JSON list) of records with
  image        image path, relative to --image-root ("file_name" accepted)
  sentence     the referring expression; or "sentences": [...] (strings or RefCOCO {"sent"} dicts)
  bbox         pixel box [x, y, w, h] (--box-format xywh, the default) or [x1, y1, x2, y2] (xyxy)
  width,height optional: the pixel space of bbox (default: the image's size)""",
        (("refs.jsonl", '{"image": "cat.jpg", "sentence": "the cat on the left", "bbox": [10, 20, 100, 80]}\n'),),
        "python -m data.convert refcoco refs.jsonl --out shards/refcoco --image-root images/"),
    "vqa": InputFormat(
        "visual question answering records",
        """\
.jsonl (or a JSON list) of records with
  image        image path, relative to --image-root
  question     the question
  answers      annotator answers [...] (strings or VQAv2 {"answer"} dicts), and/or
  answer       the training answer (put first; "multiple_choice_answer" accepted)""",
        (("vqa.jsonl", '{"image": "cat.jpg", "question": "What animal is this?", "answers": ["cat", "cat", "kitten"]}\n'),),
        "python -m data.convert vqa vqa.jsonl --out shards/vqa --image-root images/"),
    "ocr": InputFormat(
        "OCR records (lines with text and pixel box or quad)",
        """\
.jsonl (or a JSON list) of records with
  image        image path, relative to --image-root
  lines        [{"text", "box": [x1, y1, x2, y2] (--box-format, default xyxy) or "quad": 8 numbers / 4 [x, y]}]
  width,height optional: the pixel space of the boxes (default: the image's size)""",
        (("ocr.jsonl", '{"image": "sign.jpg", "lines": [{"text": "OPEN", "box": [12, 30, 90, 60]}]}\n'),),
        "python -m data.convert ocr ocr.jsonl --out shards/ocr --image-root images/"),
    "text": InputFormat(
        "plain text: .jsonl of {text} or .txt paragraphs",
        """\
.jsonl (or a JSON list) of {"text"} records, or a .txt file: paragraphs separated by blank lines""",
        (("text.jsonl", '{"text": "A paragraph of plain text for the language model."}\n'),
         ("book.txt", "First paragraph.\nStill the first.\n\nSecond paragraph.\n")),
        "python -m data.convert text text.jsonl --out shards/text"),
    "qwen-chat": InputFormat(
        "official Qwen-VL fine-tuning JSON (list of {id, conversations})",
        """\
a JSON list (or .jsonl) of conversations, the official Qwen-VL fine-tuning format:
  id             optional record id (kept)
  conversations  [{"from": "user" | "assistant" ("human" / "gpt" accepted), "value": "..."}]
images: <img>path</img> inside a value, relative to --image-root (default: the file's directory)""",
        (("my_finetune.json", '[{"id": "1", "conversations": [\n'
                              '  {"from": "user", "value": "Picture 1: <img>cat.jpg</img>\\nWhat is it?"},\n'
                              '  {"from": "assistant", "value": "A cat asleep on a sofa."}]}]\n'),),
        "python -m data.convert qwen-chat my_finetune.json --out shards/chat --image-root images/"),
}


def _epilog(fmt: InputFormat) -> str:
    parts = ["input:", textwrap.indent(fmt.fields, "  ")]
    for name, content in fmt.examples:
        parts += ["", f"example {name}:", textwrap.indent(content.rstrip("\n"), "  ")]
    return "\n".join(parts + ["", "convert it:", f"  {fmt.usage}"])


def _run(args: argparse.Namespace, writer: ShardWriter) -> ConvertReport:
    common: dict[str, Any] = {"source": args.source or args.format, "strict": args.strict, "lang": args.lang}
    inp = Path(args.input)
    if args.format == "pairs":
        cols = {k: v for k, v in (("image_col", args.image_col), ("caption_col", args.caption_col)) if v}
        if inp.is_dir():
            if cols:  # a folder pairs files by name: a column option would be silently meaningless
                raise ConvertError(f"{inp}: --image-col / --caption-col name fields of a .jsonl/.json/.csv "
                                   "input; a folder pairs each image with its same-stem .txt")
            return convert_caption_folder(inp, writer, **common)
        if inp.suffix.lower() == ".csv":
            return convert_caption_csv(inp, writer, image_root=args.image_root, **cols, **common)
        return convert_caption_jsonl(inp, writer, image_root=args.image_root, **cols, **common)
    root = args.image_root or str(inp.parent)
    if args.format == "coco":
        return convert_coco_captions(inp, root, writer, per_image=args.per_image, **common)
    if args.format == "refcoco":
        return convert_referring(inp, root, writer, box_format=args.box_format, tasks=args.tasks, **common)
    if args.format == "vqa":
        return convert_vqa(inp, root, writer, **common)
    if args.format == "ocr":
        return convert_ocr(inp, root, writer, box_format=args.box_format, **common)
    if args.format == "text":
        return convert_text(inp, writer, **common)
    return convert_qwen_chat(inp, root, writer, **common)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data.convert", description="Convert datasets into shards.",
                                 epilog="python -m data.convert KIND --help shows the input fields KIND expects, "
                                        "with an example.")
    sub = ap.add_subparsers(dest="format", required=True, metavar="KIND")

    def add(name: str) -> argparse.ArgumentParser:
        fmt = FORMATS[name]
        p = sub.add_parser(name, help=fmt.summary, description=f"{name}: {fmt.summary}", epilog=_epilog(fmt),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("input", help="input file (or folder for pairs)")
        p.add_argument("--out", required=True, help="output shard directory")
        p.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
        p.add_argument("--source", default=None, help="dataset name stored in each sample (default: format)")
        p.add_argument("--lang", choices=LANGS, default=None, help="force the language (default: detect)")
        p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping")
        p.add_argument("--max-bytes", type=int, default=1 << 30, help="max bytes per shard")
        p.add_argument("--max-samples", type=int, default=10_000, help="max samples per shard")
        if name != "text":
            p.add_argument("--image-root", default=None, help="base dir of relative image paths "
                                                              "(default: the input file's directory)")
        return p

    p = add("pairs")
    p.add_argument("--image-col", default=None, metavar="FIELD",
                   help="field (.jsonl/.json) or column (.csv) holding the image path (default: image)")
    p.add_argument("--caption-col", default=None, metavar="FIELD",
                   help="field or column holding the caption (default: caption; .jsonl also accepts text)")
    add("coco").add_argument("--per-image", action="store_true",
                             help="one sample per image (all captions) instead of per caption")
    p = add("refcoco")
    p.add_argument("--box-format", choices=("xywh", "xyxy"), default="xywh", help="bbox layout (default: xywh)")
    p.add_argument("--tasks", nargs="+", choices=REF_TASKS, default=["ref_grounding"],
                   help="samples made from each sentence (default: ref_grounding)")
    add("vqa")
    add("ocr").add_argument("--box-format", choices=("xywh", "xyxy"), default="xyxy",
                            help="layout of lines[].box (default: xyxy)")
    add("text")
    add("qwen-chat")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "image_root"):
        args.image_root = None
    try:
        with ShardWriter(args.out, args.prefix, args.max_bytes, args.max_samples) as writer:
            report = _run(args, writer)
    except (ConvertError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = report.to_dict() | {"input": str(args.input), "format": args.format,
                              "manifest": writer.manifest["totals"] if writer.manifest else None}
    tmp = os.path.join(args.out, "convert_report.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    os.replace(tmp, os.path.join(args.out, "convert_report.json"))
    print(json.dumps(out, ensure_ascii=False, indent=1))
    return 0 if report.written else 1


if __name__ == "__main__":
    sys.exit(main())
