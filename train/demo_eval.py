"""The demo's closing evaluation: the official evaluators (train.evaluation) on a held-out subset of the demo
corpus, for the model before multitask training and after each stage, next to the trivial baselines, plus a
few example predictions drawn as PNGs. `python -m train.demo` calls `run_demo_eval` after its stages.

Caption prompts use the stage-2 training instruction (`caption_prompt="train"`): the demo model never saw
the official evaluation wording. Greedy decoding, max_new_tokens bounded per task (DEMO_MAX_NEW_TOKENS): an
untrained model never emits a stop token, so its evaluation costs the full budget for every sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EVAL_TASKS = ("ref_grounding", "vqa", "caption", "ocr")
FIT_LIMIT = 500  # training samples per task the baselines' constants (mean box, most frequent answer) come from
DEMO_MAX_NEW_TOKENS = {"ref_grounding": 28, "vqa": 10, "caption": 30, "ocr": 48}
# (metric key, short name) shown per task; the first is the headline
METRICS = {"ref_grounding": [("acc@0.5", "Acc@0.5"), ("mean_iou", "mean IoU")],
           "vqa": [("vqa_score", "VQA score"), ("exact_match", "exact match")],
           "caption": [("CIDEr", "CIDEr"), ("BLEU-4", "BLEU-4")],
           "ocr": [("edit_accuracy", "edit acc"), ("exact_match", "exact match")]}
BASELINES = {"ref_grounding": "constant mean box", "vqa": "most frequent answer",
             "caption": "most frequent caption", "ocr": "most frequent text"}


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def format_table(baseline: dict[str, dict[str, float]], points: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per (task, metric): the baseline, then each evaluated model (column per label)."""
    labels = list(points)
    head = ["task", "metric", "baseline", *labels]
    rows = []
    for task, metrics in METRICS.items():
        if task not in baseline:
            continue
        for key, name in metrics:
            if key not in baseline[task] and not any(key in p.get(task, {}) for p in points.values()):
                continue  # e.g. CIDEr without Java: caption_scores logged why
            rows.append([task, name, _fmt(baseline[task].get(key)),
                         *[_fmt(points[lab].get(task, {}).get(key)) for lab in labels]])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), "-" * len(line(head)), *map(line, rows)])


def load_eval_sets(data_dir: str | Path, n: int) -> tuple[dict[str, list], dict[str, list]]:
    """(held-out samples, first n per task; training samples the baselines' constants are fitted on)."""
    from train.evaluation import read_eval_samples

    root = Path(data_dir)
    held = read_eval_samples({t: str(root / "heldout" / t) for t in EVAL_TASKS}, limit=n)
    fit = read_eval_samples({t: str(root / t) for t in EVAL_TASKS}, limit=FIT_LIMIT)
    return held, fit


def run_demo_eval(models: Sequence[tuple[str, str]], data_dir: str | Path, n: int, out_dir: str | Path,
                  n_examples: int = 3, batch_size: int = 16) -> dict[str, Any]:
    """Evaluate each (label, export dir) in `models` on n held-out samples per task; print the table; draw the
    last model's first `n_examples` grounding and OCR predictions into out_dir/examples. Returns the numbers."""
    import torch

    from train.evaluation import baseline_scores, evaluate
    from train.evaluation.examples import save_examples
    from train.infer.loading import load_model

    held, fit = load_eval_sets(data_dir, n)
    baseline = baseline_scores(held, fit_by_task=fit, caption_prompt="train")
    points: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    last = None
    for label, path in models:
        t0 = time.time()
        model, tok, _ = load_model(path, device="cpu", dtype=torch.float32)
        last = evaluate(model, tok, held, batch_size=batch_size, max_new_tokens=DEMO_MAX_NEW_TOKENS,
                        caption_prompt="train")
        points[label] = last.metrics
        seconds[label] = time.time() - t0
        print(f"[demo] evaluated {label} ({path}) in {seconds[label]:.0f} s", flush=True)
    table = format_table(baseline, points)
    out: dict[str, Any] = {"n_per_task": {t: len(v) for t, v in held.items()}, "baseline": baseline,
                           "points": points, "seconds": seconds, "table": table, "examples": []}
    if last is not None:
        ex_dir = Path(out_dir) / "examples"
        paths = save_examples(last, held, ex_dir, n=n_examples, tasks=("ref_grounding", "ocr"))
        out["examples"] = [str(p.resolve()) for p in paths]
        out["replies"] = {t: [{"key": r.key, "prompt": r.prompt, "reply": r.reply, "reference": r.reference,
                               "score": r.score} for r in recs[:n_examples]]
                          for t, recs in last.records.items()}
    return out


def print_report(ev: dict[str, Any]) -> None:
    n = ", ".join(f"{t} {k}" for t, k in ev["n_per_task"].items())
    print(f"\nheld-out evaluation, official protocols, greedy ({n} samples; baselines: "
          + "; ".join(f"{t}: {b}" for t, b in BASELINES.items()) + ")")
    print(ev["table"])
    if ev.get("replies"):
        label = list(ev["points"])[-1]
        print(f"\nexample predictions ({label}):")
        for task, recs in ev["replies"].items():
            for r in recs[:2]:
                ref = r["reference"] if task != "ocr" else r["reference"].replace("\n", " | ")
                print(f"  {task:13s} {r['prompt'].split('</img>', 1)[-1][:48]!r:50s} -> {r['reply'][:48]!r}"
                      f"  (expected {str(ref)[:40]!r})")
    if ev.get("examples"):
        print(f"example pictures (green: truth, red: prediction): {Path(ev['examples'][0]).parent}")
        for p in ev["examples"]:
            print(f"  {p}")
