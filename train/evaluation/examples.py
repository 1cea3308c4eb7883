"""Sample predictions made visible: per task, the first records with their image (grounding: ground truth in
green, the predicted box in red labelled hit / miss; OCR: the predicted quads), ready for a W&B table or PNGs.

    rows = example_rows(result, samples, n=3)     # [{"task", "key", "prompt", "reply", "prediction", "reference",
                                                  #   "score", "image": PIL.Image}, ...]
    wandb.Table(columns=[...], data=[[r["task"], wandb.Image(r["image"]), r["reply"], ...] for r in rows])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from data.loader import RawSample
from train.evaluation.runner import EvalResult, Record
from train.evaluation.tasks import image_of
from train.infer.draw import Grounding, draw_groundings, groundings

GT_COLOR, PRED_COLOR = (60, 180, 75), (230, 25, 75)


def draw_record(task: str, raw: RawSample, rec: Record) -> Image.Image:
    """The sample's image with what the task's prediction says drawn on it."""
    img = image_of(raw)
    if task == "ref_grounding":
        items, colors = [Grounding("gt", "box", (), tuple(rec.reference))], [GT_COLOR]
        if rec.prediction is not None:
            items.append(Grounding("hit" if rec.score else "miss", "box", (), tuple(rec.prediction)))
            colors.append(PRED_COLOR)
        return draw_groundings(img, items, colors=colors)
    if task == "ocr":
        return draw_groundings(img, groundings(rec.reply, img.size))
    return img


def example_rows(result: EvalResult, samples: Mapping[str, Sequence[RawSample]], n: int = 3) -> list[dict[str, Any]]:
    rows = []
    for task, recs in result.records.items():
        for rec in recs[:n]:
            rows.append({"task": task, "key": rec.key, "prompt": rec.prompt, "reply": rec.reply,
                         "prediction": rec.prediction, "reference": rec.reference, "score": rec.score,
                         "image": draw_record(task, samples[task][rec.index], rec)})
    return rows


def save_examples(result: EvalResult, samples: Mapping[str, Sequence[RawSample]], out_dir: str | Path,
                  n: int = 3, tasks: Sequence[str] = ("ref_grounding", "ocr")) -> list[Path]:
    """PNGs `<task>_<index>.png` of the first n records of `tasks` in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for row, rec in _rows_with_records(result, samples, n, tasks):
        p = out / f"{row['task']}_{rec.index:03d}.png"
        row["image"].save(p)
        paths.append(p)
    return paths


def _rows_with_records(result: EvalResult, samples: Mapping[str, Sequence[RawSample]], n: int,
                       tasks: Sequence[str]) -> list[tuple[dict[str, Any], Record]]:
    out = []
    for task in tasks:
        for rec in result.records.get(task, [])[:n]:
            out.append(({"task": task, "image": draw_record(task, samples[task][rec.index], rec)}, rec))
    return out
