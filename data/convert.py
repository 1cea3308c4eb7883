"""CLI: convert user datasets into shards.  ``python -m data.convert FORMAT INPUT --out DIR [options]``

Formats: ``pairs`` (image folder with same-stem .txt, .jsonl/.json or .csv of image+caption),
``coco`` (COCO captions json), ``refcoco`` (referring records), ``vqa``, ``ocr``, ``text`` (.jsonl or .txt),
``qwen-chat`` (the official Qwen-VL fine-tuning JSON). Writes ``DIR/{prefix}-NNNNNN.tar``, ``DIR/manifest.json``
and ``DIR/convert_report.json``; prints the report. Exit status 1 when nothing was written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def _run(args: argparse.Namespace, writer: ShardWriter) -> ConvertReport:
    common: dict[str, Any] = {"source": args.source or args.format, "strict": args.strict, "lang": args.lang}
    inp = Path(args.input)
    if args.format == "pairs":
        if inp.is_dir():
            return convert_caption_folder(inp, writer, **common)
        if inp.suffix.lower() == ".csv":
            return convert_caption_csv(inp, writer, image_root=args.image_root, image_col=args.image_col,
                                       caption_col=args.caption_col, **common)
        return convert_caption_jsonl(inp, writer, image_root=args.image_root, **common)
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
    ap = argparse.ArgumentParser(prog="python -m data.convert", description="Convert datasets into shards.")
    sub = ap.add_subparsers(dest="format", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
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

    p = add("pairs", "image-caption pairs: folder (img + same-stem .txt), .jsonl/.json or .csv")
    p.add_argument("--image-col", default="image")
    p.add_argument("--caption-col", default="caption")
    add("coco", "COCO captions json").add_argument("--per-image", action="store_true",
                                                   help="one sample per image (all captions) instead of per caption")
    p = add("refcoco", "referring expressions / detection records -> ref_grounding (+ variants)")
    p.add_argument("--box-format", choices=("xywh", "xyxy"), default="xywh")
    p.add_argument("--tasks", nargs="+", choices=REF_TASKS, default=["ref_grounding"])
    add("vqa", "visual question answering records")
    add("ocr", "OCR records (lines with text and pixel box or quad)").add_argument(
        "--box-format", choices=("xywh", "xyxy"), default="xyxy")
    add("text", "plain text: .jsonl of {text} or .txt paragraphs")
    add("qwen-chat", "official Qwen-VL fine-tuning JSON (list of {id, conversations})")
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
