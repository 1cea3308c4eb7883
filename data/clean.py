"""CLI: stage-1 cleaning of shards -> cleaned shards + cleaning_report.json.

  python -m data.clean INPUT [INPUT ...] --out DIR [--config cfg.json] [--set key=value ...]
                       [--clip-model NAME --clip-pretrained TAG_OR_PATH --clip-threshold X]
                       [--layout img2dataset [--caption-from txt|json:FIELD] [--task T] [--lang en|zh]]

INPUT is a shard directory (its manifest.json, else its *.tar files), a manifest.json, a brace pattern
("shards/pretrain-{000000..000009}.tar") or a single .tar. Kept samples are written with
data.shards.ShardWriter; every input sample is counted in the report as kept or removed by one rule.

Bad input is skipped and counted, as the training loader does (the same reader, ``data.loader``): a shard
that cannot be opened, invalid or missing ``KEY.json``, a truncated tar, an unreadable or duplicate member, a
listed image that is absent, plus ``data.sanity``'s unsafe keys and invalid Unicode. Those appear in the
report under ``skipped`` (by reason, with examples) and never reach the rules.

The output is built in a temporary directory next to ``--out`` and renamed onto it only when everything
(shards, manifest, report) is written: a run that fails or is interrupted leaves ``--out`` as it was (no
``manifest.json`` listing part of the data). ``--out`` must not exist, be empty, or hold a previous cleaning
output (shards, manifest, report only), which is then replaced.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.cleaning import Cleaner, CleaningConfig, CleaningReport
from data.layouts import LAYOUTS, Layout, make_layout
from data.loader import _READ_ERRORS, RawSample, _parse_group, _Shard  # the loader's reader: same skips
from data.sanity import sample_problem
from data.shards import MANIFEST, ShardError, ShardWriter


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


def iter_inputs(paths: list[str], report: CleaningReport, layout: Layout | None = None,
                source: str = "clean") -> Iterator[tuple[str, dict[str, Any], dict[str, bytes]]]:
    """(key, meta, {member_ext: bytes}) of every readable sample; the rest is counted in `report.skipped`.
    `layout`: the inputs' shard layout (data.layouts; None = the project's), read as training reads it;
    `source`: the dataset name img2dataset samples get as their ``source`` field."""
    for url in paths:
        try:
            shard = _Shard(url)
        except _READ_ERRORS as e:
            report.skip("unreadable_shard", url, "<shard>", f"{type(e).__name__}: {e}")
            continue
        try:
            for index, ev in enumerate(shard.events()):
                if ev[0] == "bad":  # ("bad", reason, member, detail)
                    report.skip(ev[1], url, ev[2], ev[3])
                    continue
                s = _parse_group(shard, ev[1], ev[2], source, index, layout)
                if not isinstance(s, RawSample):  # (reason, member, detail)
                    report.skip(s[0], url, s[1], s[2])
                    continue
                problem = sample_problem(s.key, s.meta)
                if problem:
                    report.skip(problem[0], url, f"{s.key}.json", problem[1])
                    continue
                yield s.key, s.meta, s.files
        finally:
            shard.close()


_OUTPUT_FILE = re.compile(rf"^({re.escape(MANIFEST)}(\.tmp)?|cleaning_report\.json(\.tmp\.\d+)?"
                          r"|[A-Za-z0-9][A-Za-z0-9_\-]*-\d{6}\.tar(\.tmp)?)$")


def check_destination(out_dir: str, inputs: list[str]) -> Path:
    """The destination may be absent, empty, or a previous cleaning output (replaced at the end); never a
    directory with other files in it, nor one that holds an input shard (it would be deleted)."""
    dest = Path(out_dir).resolve()
    inside = [p for p in inputs if Path(p).resolve().is_relative_to(dest)]
    if inside:
        raise ValueError(f"--out {out_dir}: holds input shard {inside[0]}; write the cleaned shards elsewhere")
    if dest.exists():
        if not dest.is_dir():
            raise FileExistsError(f"--out {out_dir}: exists and is not a directory")
        foreign = sorted(p.name for p in dest.iterdir() if not (p.is_file() and _OUTPUT_FILE.match(p.name)))
        if foreign:
            raise FileExistsError(f"--out {out_dir}: holds {foreign[:5]}, not a cleaning output; refusing to "
                                  "replace it (use a new or empty directory)")
    return dest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, dest: Path) -> None:
    """Rename the finished `tmp` directory onto `dest`. An absent or empty `dest` is replaced in one rename;
    a previous output is first renamed aside and deleted after (between the two renames `dest` is briefly
    absent, never partial)."""
    if dest.exists() and any(dest.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rename(dest, old / "out")
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)  # POSIX rename replaces an empty directory atomically
    _fsync_dir(dest.parent)


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
                 max_bytes: int = 1 << 30, max_samples: int = 10_000, batch_size: int = 64,
                 layout: Layout | None = None, source: str = "clean") -> dict[str, Any]:
    """Clean `inputs` into `out_dir`; returns the report dict (also written to out_dir/cleaning_report.json).
    `layout` / `source`: see ``iter_inputs`` (img2dataset shards come out in the project's layout).

    Everything is written to a temporary sibling of `out_dir` first and published by rename when complete;
    on any error the temporary directory is removed and `out_dir` is left untouched."""
    cfg = cfg or CleaningConfig()
    paths = resolve_inputs(inputs)
    dest = check_destination(out_dir, paths)
    dest.parent.mkdir(parents=True, exist_ok=True)
    cleaner = Cleaner(cfg)
    report = cleaner.report
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        writer = ShardWriter(tmp, prefix, max_bytes, max_samples)
        batch: list[tuple[str, dict[str, Any], dict[str, bytes]]] = []

        def flush() -> None:
            for (key, _, images), d in zip(batch, cleaner.process_batch(batch)):
                if d.keep:
                    members = d.meta.get("images") or []
                    try:
                        writer.write(key, d.meta, images=[(m, images[m]) for m in members])
                    except ShardError as e:  # e.g. a passthrough sample the writer's contract refuses
                        report.unwritable(d, str(e))
            batch.clear()

        with writer:  # an exception aborts the open shard and writes no manifest
            for item in iter_inputs(paths, report, layout, source):
                batch.append(item)
                if len(batch) >= batch_size:
                    flush()
            flush()
        report.write(str(tmp / "cleaning_report.json"),
                     extra={"inputs": paths, "config": cfg.to_dict(), "seconds": round(time.time() - t0, 3)})
        result = json.loads((tmp / "cleaning_report.json").read_text(encoding="utf-8"))
        check_destination(out_dir, paths)  # still ours to replace
        publish(tmp, dest)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written output behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


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
    ap.add_argument("--layout", choices=LAYOUTS, default="qwenvl",
                    help="input shard layout: qwenvl (KEY.json with task/lang) or img2dataset (KEY.jpg + KEY.txt + "
                         "KEY.json, as LAION/DataComp/COYO downloads are)")
    ap.add_argument("--caption-from", default="txt", help="img2dataset: caption from txt or json:FIELD")
    ap.add_argument("--task", default="caption", help="img2dataset: task of every sample")
    ap.add_argument("--lang", choices=("en", "zh"), help="img2dataset: language of every sample (default: detected)")
    ap.add_argument("--source", default="img2dataset", help="img2dataset: dataset name written as 'source'")
    args = ap.parse_args(argv)
    try:
        layout = make_layout(args.source, args.layout, args.caption_from, args.task, args.lang)
    except ValueError as e:
        ap.error(str(e))
    cfg = build_config(args.config, args.set, args.clip_model, args.clip_pretrained, args.clip_threshold)
    rep = clean_shards(args.inputs, args.out, cfg, args.prefix, args.max_bytes, args.max_samples, args.batch_size,
                       layout, args.source if layout is not None else "clean")
    removed = {k: v for k, v in rep["removed"].items() if v}
    print(f"input {rep['input']}  kept {rep['kept']}  removed {rep['removed_total']} {removed}  "
          f"skipped (unreadable) {rep['skipped_total']} {rep['skipped']}")
    print(f"report: {os.path.join(args.out, 'cleaning_report.json')}")


if __name__ == "__main__":
    main()
