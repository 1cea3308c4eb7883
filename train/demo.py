"""CPU demo (`make demo` = `python -m train.demo`): build the embedded demo corpus, then train the tiny
model through stage 1 (LLM frozen) -> stage 2 (multitask, everything) -> stage 3 (ChatML SFT, ViT frozen), all
at 224 px, each stage initialised from the previous stage's official-layout export, and print
where the checkpoints and logs are and the held-out loss per task before and after each stage. It ends with
the official evaluators (train.demo_eval) on held-out samples: referring grounding Acc@0.5, VQA score,
caption CIDEr, OCR accuracy for the model before multitask training and after each stage, next to trivial
baselines, and example predictions drawn as PNGs under <out>/examples.

Options: --steps N (every stage; the CI smoke test uses a few), --long (the longer schedule of LONG_STEPS:
about 15 minutes on 2 cores, a stronger model), --out DIR, --data-dir DIR, --stages 1,2,3, --eval-n N (held-out
samples per task for the closing evaluation; 0 = none), --wandb MODE, --resume, --lora (a LoRA fine-tune after
stage 3); anything of the form key=value is a Hydra override applied to every stage.
Without --resume each stage's previous demo output (<out>/demo_stageN) is replaced.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

STAGE_RECIPES = {1: "demo_stage1", 2: "demo_stage2", 3: "demo_stage3", 4: "demo_lora"}  # 4: --lora
LONG_STEPS = {1: 20, 2: 140, 3: 20}  # --long: stage 2 (the multitask stage the evaluation scores) runs longest


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/demo", help="run directories go under here (default outputs/demo)")
    ap.add_argument("--data-dir", default=".cache/demo", help="demo corpus directory (default .cache/demo)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per stage (default: the recipes')")
    ap.add_argument("--long", action="store_true",
                    help=f"longer schedule, steps per stage {LONG_STEPS} (about 15 minutes on 2 cores)")
    ap.add_argument("--eval-batches", type=int, default=None, help="held-out batches per task (default: recipes')")
    ap.add_argument("--eval-n", type=int, default=None,
                    help="held-out samples per task for the closing evaluation with the official evaluators "
                         "(default 16, 32 with --long; 0 = skip it)")
    ap.add_argument("--stages", default="1,2,3", help="comma-separated subset of 1,2,3 (default all)")
    ap.add_argument("--lora", action="store_true", help="then a LoRA fine-tune (recipe demo_lora) from stage 3")
    ap.add_argument("--wandb", default="offline", choices=["auto", "online", "offline", "disabled"],
                    help="W&B mode (default offline: files under each run's wandb/ directory)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (CI logs)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted demo from its checkpoints (default: start each stage afresh, "
                         "replacing that stage's previous demo output)")
    args, rest = ap.parse_known_args(argv)
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        ap.error(f"unrecognised arguments: {' '.join(bad)} (Hydra overrides are key=value)")
    try:
        stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--stages: expected e.g. 1,2,3, got {args.stages!r}")
    if not stages or any(s not in (1, 2, 3) for s in stages):
        ap.error(f"--stages: expected a subset of 1,2,3, got {args.stages!r}")
    if args.long and args.steps is not None:
        ap.error("--long and --steps both set the steps: give one")
    if args.eval_n is None:
        args.eval_n = 32 if args.long else 16
    if args.eval_n < 0:
        ap.error(f"--eval-n: expected >= 0, got {args.eval_n}")
    args.stage_list = stages + [4] * args.lora
    return args, rest


def stage_overrides(args: argparse.Namespace, stage: int, prev_export: str | None) -> list[str]:
    out = Path(args.out)
    ov = [f"recipe={STAGE_RECIPES[stage]}", f"output_dir={out / STAGE_RECIPES[stage]}",
          f"data.demo.dir={args.data_dir}", f"logging.wandb.mode={args.wandb}",
          "logging.wandb.tags=[demo]"]
    if stage > 1:
        # the previous stage of this demo (also when it was run earlier: its export is on disk)
        ov.append(f"init.from_stage_dir={prev_export or out / STAGE_RECIPES[stage - 1] / 'final'}")
    steps = LONG_STEPS.get(stage) if args.long else args.steps
    if steps is not None:
        ov += [f"train.steps={steps}", f"train.save_every={max(1, steps // 2)}",
               f"optim.warmup_steps={max(1, min(5 if not args.long else 20, steps // 4))}"]
    if args.eval_batches is not None:
        ov.append(f"eval.max_batches={args.eval_batches}")
    if args.no_progress:
        ov.append("logging.progress=false")
    ov.append(f"train.resume={'auto' if args.resume else 'never'}")
    return ov


def _num(x: float | None) -> str:
    return f"{x:8.4f}" if x is not None else f"{'-':>8}"


def _fmt_table(res: dict[str, Any]) -> list[str]:
    before, after = res.get("eval_before") or {}, res.get("eval_after") or {}
    lines = []
    for task in after or before:
        b = before.get(task, {}).get("loss")
        a = after.get(task, {}).get("loss")
        delta = f"{a - b:+.3f}" if a is not None and b is not None else ""
        lines.append(f"    {task:18s} {_num(b)}  ->  {_num(a)}  {delta}")
    return lines


def eval_points(stage_list: list[int], results: dict[int, dict[str, Any]],
                inits: dict[int, str | None]) -> list[tuple[str, str]]:
    """(label, export dir) of the models the closing evaluation scores: the start of the first multitask-or-later
    stage run (the previous stage's export), then the export after each stage from 2 on (after stage 1 alone
    when only stage 1 ran)."""
    later = [s for s in stage_list if s >= 2 and results.get(s, {}).get("export")]
    pts: list[tuple[str, str]] = []
    if later and inits.get(later[0]):
        pts.append((f"before stage {later[0]}", str(inits[later[0]])))
    elif 1 in results and results[1].get("export"):
        pts.append(("after stage 1", results[1]["export"]))
    for s in later:
        pts.append((f"after stage {s}" if s < 4 else "after LoRA", results[s]["export"]))
    return pts


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    from train.distributed import prepare_env

    prepare_env(None)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from train.config import ConfigError, load_config
    from train.loop import train

    # validate every stage's config before any work (a typo in an override fails here, naming the key)
    try:
        cfgs = {s: load_config([*stage_overrides(args, s, None), *extra], world_size=1) for s in args.stage_list}
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    t0 = time.time()
    results: dict[int, dict[str, Any]] = {}
    inits: dict[int, str | None] = {}
    prev_export = None
    for s in args.stage_list:
        cfg = cfgs[s]
        if prev_export is not None:
            cfg = load_config([*stage_overrides(args, s, prev_export), *extra], world_size=1)
        init = cfg.init.from_stage_dir
        inits[s] = init
        if s > 1 and init and not Path(init).is_dir():
            print(f"error: {STAGE_RECIPES[s]} starts from {init}, which does not exist: run "
                  f"{STAGE_RECIPES[s - 1]} first", file=sys.stderr)
            return 2
        run_dir = Path(cfg.output_dir)
        own = run_dir.resolve() == (Path(args.out) / STAGE_RECIPES[s]).resolve()
        if not args.resume and own and run_dir.exists():
            shutil.rmtree(run_dir)  # the demo's own previous output of this stage: a rerun starts clean
        print(f"\n=== demo stage {s}: {STAGE_RECIPES[s]} ({cfg.train.steps} steps) ===", flush=True)
        ts = time.time()
        res = train(cfg)
        res["seconds"] = time.time() - ts
        results[s] = res
        prev_export = res.get("export")
    train_seconds = time.time() - t0
    ev = None
    points = eval_points(args.stage_list, results, inits) if args.eval_n else []
    if points:
        from train.demo_eval import run_demo_eval

        print(f"\n=== closing evaluation: {len(points)} models x {args.eval_n} held-out samples per task ===",
              flush=True)
        ev = run_demo_eval(points, args.data_dir, args.eval_n, args.out)
    total = time.time() - t0

    print("\n" + "=" * 78)
    print(f"demo finished in {total:.0f} s: training {train_seconds:.0f} s, evaluation {total - train_seconds:.0f} s "
          f"(corpus: {Path(args.data_dir).resolve()})")
    for s, res in results.items():
        print(f"\nstage {s} ({STAGE_RECIPES[s]}): {res['steps_run']} steps in {res['seconds']:.0f} s")
        print(f"  checkpoints : {Path(res['output_dir']) / 'checkpoints'}")
        print(f"  export      : {res.get('export')}")
        print(f"  metrics     : {res.get('metrics_jsonl')}")
        print(f"  wandb       : {res.get('wandb_dir')}")
        losses = res.get("losses") or []
        if losses:
            print(f"  train loss  : {losses[0]:.4f} (first step) -> {losses[-1]:.4f} (last step)")
        print("  held-out loss per task (before -> after):")
        print("\n".join(_fmt_table(res)) or "    (no held-out evaluation)")
        if res.get("curves"):
            print(f"  curves      : {res['curves']}")
    if ev is not None:
        from train.demo_eval import print_report

        print_report(ev)
    if args.wandb == "offline":
        print("\nW&B runs are offline; upload with `wandb sync <wandb dir>`.")
    summary = {"seconds": total, "train_seconds": train_seconds, "data_dir": str(Path(args.data_dir).resolve()),
               "stages": {str(s): res for s, res in results.items()}, "eval": ev}
    path = Path(args.out) / "demo_summary.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)
    print(f"summary: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
