"""Evaluate a checkpoint with the official protocols (SPEC §6; train/evaluation/).

    python -m train.eval --model outputs/demo/demo_stage2/final --task ref_grounding --data .cache/demo/heldout/ref_grounding
    python -m train.eval --model DIR --demo .cache/demo --task ref_grounding --task vqa --baseline
    torchrun --nproc_per_node 2 -m train.eval --model DIR --demo .cache/demo    # sharded over ranks, same numbers

`--data` is given once per `--task` (in order) or once for all of them (samples of other tasks are skipped);
`--demo DIR` reads DIR/heldout/<task> for every task. Prints a table (rank 0); `--out FILE.json` also writes the
per-sample predictions; `--draw DIR` draws the first `--examples` grounding predictions (red, labelled hit / miss)
with their ground truth (green), and OCR predictions, as PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from train.evaluation.tasks import EVAL_TASKS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="official-layout dir, run checkpoint step dir, or run dir")
    ap.add_argument("--task", action="append", choices=EVAL_TASKS, help="repeatable (default with --demo: all)")
    ap.add_argument("--data", action="append", help="shards for the matching --task (or one for all)")
    ap.add_argument("--demo", help="demo corpus dir: DIR/heldout/<task>")
    ap.add_argument("--limit", type=int, help="at most this many samples per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, help="override the per-task default")
    ap.add_argument("--caption-prompt", choices=["official", "train"], default="official",
                    help="official: 'Describe the image in English:'; train: the stage-2 instruction")
    ap.add_argument("--baseline", action="store_true", help="also score the trivial baselines")
    ap.add_argument("--out", help="write metrics and per-sample records to this JSON file")
    ap.add_argument("--draw", help="directory for drawn grounding examples")
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    return ap


def _sources(a: argparse.Namespace) -> dict[str, Any]:
    tasks = a.task or (list(EVAL_TASKS) if a.demo else None)
    if not tasks:
        raise SystemExit("error: give --task (and --data), or --demo DIR")
    if a.demo:
        if a.data:
            raise SystemExit("error: --demo and --data are exclusive")
        return {t: str(Path(a.demo) / "heldout" / t) for t in tasks}
    data = a.data or []
    if len(data) == 1:
        return {t: data[0] for t in tasks}
    if len(data) != len(tasks):
        raise SystemExit(f"error: {len(tasks)} --task but {len(data)} --data (give one per task, or one for all)")
    return dict(zip(tasks, data))


def format_table(scores: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None = None) -> str:
    rows = [("task", "metric", "model", "baseline" if baseline else "")]
    for task, ms in scores.items():
        for m, v in ms.items():
            if m == "n":
                continue
            b = baseline.get(task, {}).get(m) if baseline else None
            rows.append((f"{task} (n={int(ms['n'])})", m, f"{v:.4f}", "" if b is None else f"{b:.4f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    sources = _sources(a)
    import torch
    import torch.distributed as dist

    from train.evaluation.runner import baseline_scores, evaluate, read_eval_samples
    from train.infer.loading import load_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = a.device
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and a.device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        samples = read_eval_samples(sources, a.limit)
        model, tok, src = load_model(a.model, device=device, dtype=a.dtype)
        mnt = {t: a.max_new_tokens for t in samples} if a.max_new_tokens else None
        result = evaluate(model, tok, samples, batch_size=a.batch_size, max_new_tokens=mnt,
                          caption_prompt=a.caption_prompt)
        base = baseline_scores(samples, caption_prompt=a.caption_prompt) if a.baseline else None
        if rank == 0:
            print(f"[eval] {src.path} ({src.kind}), {world} rank(s)")
            print(format_table(result.metrics, base))
            if a.out:
                rec = {t: [{k: _jsonable(v) for k, v in r.__dict__.items()} for r in rs]
                       for t, rs in result.records.items()}
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps({"model": str(src.path), "metrics": result.metrics,
                                                   "baseline": base, "records": rec}, ensure_ascii=False,
                                                  indent=1), encoding="utf-8")
                print(f"[eval] wrote {a.out}")
            if a.draw:
                from train.evaluation.examples import save_examples

                for p in save_examples(result, samples, a.draw, a.examples):
                    print(f"[eval] drew {p}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
