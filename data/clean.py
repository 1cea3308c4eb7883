"""CLI: stage-1 cleaning of shards -> cleaned shards + cleaning_report.json.

  python -m data.clean INPUT [INPUT ...] --out DIR [--config cfg.json] [--set key=value ...]
                       [--clip-model NAME --clip-pretrained TAG_OR_PATH --clip-threshold X]

INPUT is a shard directory (its manifest.json, else its *.tar files), a manifest.json, a brace pattern
("shards/pretrain-{000000..000009}.tar") or a single .tar. Kept samples are written with
data.shards.ShardWriter; every input sample is counted in the report as kept or removed by one rule.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.cleaning import Cleaner, CleaningConfig
from data.shards import ShardWriter, iter_shard


def resolve_inputs(specs: list[str]) -> list[str]:
    """Expand directories, manifests, brace patterns and globs into an ordered list of shard paths."""
    from braceexpand import braceexpand

    out: list[str] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            man = p / "manifest.json"
            out += _from_manifest(man) if man.exists() else sorted(str(x) for x in p.glob("*.tar"))
            if not man.exists() and not any(p.glob("*.tar")):
                raise FileNotFoundError(f"{spec}: directory has neither manifest.json nor *.tar shards")
        elif p.suffix == ".json":
            out += _from_manifest(p)
        else:
            for s in braceexpand(spec):
                hits = sorted(glob.glob(s)) if any(c in s for c in "*?[") else [s]
                for h in hits:
                    if not os.path.isfile(h):
                        raise FileNotFoundError(f"shard {h} (from {spec!r}) does not exist")
                out += hits
    if not out:
        raise FileNotFoundError(f"no shards found in {specs}")
    return out


def _from_manifest(path: Path) -> list[str]:
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read manifest: {e}") from e
    shards = man.get("shards") if isinstance(man, dict) else man
    if not isinstance(shards, list):
        raise ValueError(f"{path}: manifest has no 'shards' list")
    names = [s if isinstance(s, str) else s.get("path") or s.get("name") or s.get("file") for s in shards]
    if any(not isinstance(n, str) for n in names):
        raise ValueError(f"{path}: manifest 'shards' entries need a path/name")
    return [n if os.path.isabs(n) else str(path.parent / n) for n in names]


def iter_inputs(paths: list[str]) -> Iterator[tuple[str, dict[str, Any], dict[str, bytes]]]:
    for p in paths:
        yield from iter_shard(p)


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)  # numbers, booleans, tuples; literal_eval never executes code
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def build_config(config_path: str | None, sets: list[str], clip_model: str | None, clip_pretrained: str | None,
                 clip_threshold: float | None) -> CleaningConfig:
    d: dict[str, Any] = {}
    if config_path:
        try:
            d = json.loads(Path(config_path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_path}: cannot read cleaning config: {e}") from e
    d.update(_parse_set(sets))
    if clip_model:
        d["clip_model"] = clip_model
    if clip_pretrained:
        d["clip_pretrained"] = clip_pretrained
    if clip_threshold is not None:
        d["clip_threshold"] = clip_threshold
    return CleaningConfig.from_dict(d)


def clean_shards(inputs: list[str], out_dir: str, cfg: CleaningConfig | None = None, prefix: str = "clean",
                 max_bytes: int = 1 << 30, max_samples: int = 10_000, batch_size: int = 64) -> dict[str, Any]:
    """Clean `inputs` into `out_dir`; returns the report dict (also written to out_dir/cleaning_report.json)."""
    cfg = cfg or CleaningConfig()
    paths = resolve_inputs(inputs)
    os.makedirs(out_dir, exist_ok=True)
    cleaner = Cleaner(cfg)
    t0 = time.time()
    writer = ShardWriter(out_dir, prefix, max_bytes, max_samples)
    batch: list[tuple[str, dict[str, Any], dict[str, bytes]]] = []

    def flush() -> None:
        for (key, _, images), d in zip(batch, cleaner.process_batch(batch)):
            if d.keep:
                members = d.meta.get("images") or []
                writer.write(key, d.meta, images=[(m, images[m]) for m in members])
        batch.clear()

    try:
        for item in iter_inputs(paths):
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        flush()
    finally:
        writer.close()
    report_path = os.path.join(out_dir, "cleaning_report.json")
    cleaner.report.write(report_path, extra={"inputs": paths, "config": cfg.to_dict(),
                                             "seconds": round(time.time() - t0, 3)})
    return json.loads(Path(report_path).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Stage-1 cleaning of image-text shards.")
    ap.add_argument("inputs", nargs="+", help="shard dir / manifest.json / brace pattern / .tar")
    ap.add_argument("--out", required=True, help="output shard directory")
    ap.add_argument("--prefix", default="clean")
    ap.add_argument("--max-bytes", type=int, default=1 << 30)
    ap.add_argument("--max-samples", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--config", help="JSON file with CleaningConfig fields")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--clip-model", help="OpenCLIP architecture name, enables the CLIP-score filter")
    ap.add_argument("--clip-pretrained", help="OpenCLIP pretrained tag or local checkpoint path")
    ap.add_argument("--clip-threshold", type=float)
    args = ap.parse_args(argv)
    cfg = build_config(args.config, args.set, args.clip_model, args.clip_pretrained, args.clip_threshold)
    rep = clean_shards(args.inputs, args.out, cfg, args.prefix, args.max_bytes, args.max_samples, args.batch_size)
    removed = {k: v for k, v in rep["removed"].items() if v}
    print(f"input {rep['input']}  kept {rep['kept']}  removed {rep['removed_total']} {removed}")
    print(f"report: {os.path.join(args.out, 'cleaning_report.json')}")


if __name__ == "__main__":
    main()
