"""Per task: the official evaluation prompt for a shard sample (SPEC §6), the reference it is scored against, how a
reply becomes a prediction, and the task's metrics over (prediction, reference) pairs.

Samples are the shard metadata of docs/DESIGN.md "Shard sample layout" (`data.loader.RawSample`); the image is
the sample's first member, written into the prompt as `<img>member</img>`.

| task | prompt (English; zh in brackets) | prediction | metrics |
|---|---|---|---|
| ref_grounding | `<img>P</img><ref>{expression}</ref><box>` | first `(x1,y1),(x2,y2)`, /999 to pixels | acc@0.5 |
| vqa | `<img>P</img>{question} Answer:` | the reply, stripped | vqa_score, exact_match |
| caption | `<img>P</img>Describe the image in English:` (in Chinese:) | the reply | CIDEr, BLEU-4 |
| ocr | `<img>P</img>OCR with grounding:` | the `<ref>` texts, one per line | exact_match, edit_accuracy |

`caption_prompt="train"` uses the stage-2 training instruction ("Generate the caption in English:") instead of
the official evaluation one, for models (like the demo's) that never saw the latter.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from data.boxes import denormalize_box, parse_first_box, parse_refs
from data.images import load_image
from data.loader import RawSample
from train.evaluation import metrics as M

log = logging.getLogger(__name__)

EVAL_TASKS = ("ref_grounding", "vqa", "caption", "ocr")
MAX_NEW_TOKENS = {"ref_grounding": 28, "vqa": 10, "caption": 40, "ocr": 256}  # official: 28 / 10 / 30


@dataclass
class EvalItem:
    task: str
    key: str
    prompt: str  # raw prompt with <img>member</img>
    image_name: str
    image_size: tuple[int, int]  # (width, height) of the image, for de-normalising boxes
    reference: Any  # per task: pixel box, answers, captions, OCR text


class BadEvalSample(ValueError):
    pass


def _field(raw: RawSample, name: str) -> Any:
    if name not in raw.meta:
        raise BadEvalSample(f"sample {raw.key!r} ({raw.url}): task {raw.meta.get('task')!r} needs {name!r}")
    return raw.meta[name]


def image_of(raw: RawSample):  # noqa: ANN201 - PIL image
    images = _field(raw, "images")
    if not images or images[0] not in raw.files:
        raise BadEvalSample(f"sample {raw.key!r} ({raw.url}): no image member (images={images!r})")
    return load_image(raw.files[images[0]], name=f"{raw.key}.{images[0]}")


def make_item(raw: RawSample, task: str, caption_prompt: str = "official") -> EvalItem:
    """The evaluation item for one shard sample of `task`."""
    if raw.meta.get("task") != task:
        raise BadEvalSample(f"sample {raw.key!r} ({raw.url}) is task {raw.meta.get('task')!r}, not {task!r}")
    member = _field(raw, "images")[0]
    img = image_of(raw)
    head = f"<img>{member}</img>"
    zh = raw.meta.get("lang") == "zh"
    if task == "ref_grounding":
        box = _field(raw, "box")
        prompt = f"{head}<ref>{_field(raw, 'expression')}</ref><box>"
        ref: Any = denormalize_box(box, *img.size)
    elif task == "vqa":
        prompt = f"{head}{_field(raw, 'question')} Answer:"
        ref = [str(a) for a in _field(raw, "answers")]
    elif task == "caption":
        lang = "Chinese" if zh else "English"
        instr = f"Describe the image in {lang}:" if caption_prompt == "official" else f"Generate the caption in {lang}:"
        prompt = f"{head}{instr}"
        cap = _field(raw, "caption")
        ref = [cap] if isinstance(cap, str) else list(cap)
    elif task == "ocr":
        prompt = f"{head}OCR with grounding:"
        ref = "\n".join(ln["text"] for ln in _field(raw, "lines"))
    else:
        raise BadEvalSample(f"no evaluation protocol for task {task!r} (have {EVAL_TASKS})")
    return EvalItem(task, raw.key, prompt, member, img.size, ref)


def prediction(item: EvalItem, reply: str) -> Any:
    """What a reply predicts for the item's task."""
    if item.task == "ref_grounding":
        box = parse_first_box(reply)  # the prompt ends in <box>: the reply usually starts at "(x1,y1)"
        if box is None:
            return None
        box = [min(max(v, 0), 999) for v in box]
        return denormalize_box(box, *item.image_size)
    if item.task == "ocr":
        refs = parse_refs(reply)
        return "\n".join(p.strip() for p, _ in refs) if refs else reply.strip()
    return reply.strip()


def sample_score(item: EvalItem, pred: Any) -> float:
    """The per-sample score shown next to an example (acc / vqa_score / edit accuracy; captions: none)."""
    if item.task == "ref_grounding":
        return float(M.grounding_hits([pred], [item.reference])[0])
    if item.task == "vqa":
        return M.vqa_score(pred, item.reference)
    if item.task == "ocr":
        return M.edit_accuracy(pred.strip(), item.reference.strip())
    return float("nan")


def task_metrics(task: str, items: Sequence[EvalItem], preds: Sequence[Any]) -> dict[str, float]:
    """The task's metrics over all samples (see the module table); `n` is the sample count."""
    out: dict[str, float] = {"n": float(len(items))}
    if not items:
        return out
    if task == "ref_grounding":
        out["acc@0.5"] = M.grounding_accuracy(preds, [it.reference for it in items])
        ious = [M.iou(p, it.reference) if p is not None else 0.0 for p, it in zip(preds, items)]
        out["mean_iou"] = sum(ious) / len(ious)
    elif task == "vqa":
        out["vqa_score"] = sum(M.vqa_score(p, it.reference) for p, it in zip(preds, items)) / len(items)
        out["exact_match"] = sum(M.exact_match(p, it.reference) for p, it in zip(preds, items)) / len(items)
    elif task == "caption":
        try:
            out.update(M.caption_scores({str(i): p for i, p in enumerate(preds)},
                                        {str(i): it.reference for i, it in enumerate(items)}))
        except M.CaptionMetricsUnavailable as e:
            log.warning("caption metrics skipped: %s", e)
    elif task == "ocr":
        out.update(M.ocr_scores(list(preds), [it.reference for it in items]))
    return out


def baseline_predictions(task: str, items: Sequence[EvalItem], fit: Sequence[EvalItem] | None = None) -> list[Any]:
    """Trivial baselines: grounding predicts the mean ground-truth box (in grid units, de-normalised to each image),
    VQA / captioning / OCR the most frequent reference. `fit`: the samples the constant is estimated on (default:
    the evaluated samples themselves, which flatters the baseline slightly)."""
    fit = list(fit) if fit is not None else list(items)
    if not items:
        return []
    if task == "ref_grounding":
        grid = [[v / s * 999 for v, s in zip(it.reference, it.image_size * 2)] for it in fit]
        mean = [sum(c) / len(grid) for c in zip(*grid)] if grid else [0.0, 0.0, 999.0, 999.0]
        return [denormalize_box(mean, *it.image_size) for it in items]
    if task == "vqa":
        common = Counter(it.reference[0] for it in fit if it.reference).most_common(1)
    elif task == "caption":
        common = Counter(c for it in fit for c in it.reference).most_common(1)
    else:
        common = Counter(it.reference for it in fit).most_common(1)
    const = common[0][0] if common else ""
    return [const for _ in items]
