"""Run the evaluation protocols on a model: greedy generation in batches, sharded over data-parallel ranks.

    from train.evaluation import evaluate_tasks, baseline_scores, read_eval_samples
    samples = read_eval_samples({"ref_grounding": ".cache/demo/heldout/ref_grounding", "vqa": ".cache/demo/heldout/vqa"})
    scores = evaluate_tasks(model, tokenizer, samples)          # {"ref_grounding": {"n":.., "acc@0.5":..}, ...}
    base = baseline_scores(samples)                             # same layout, trivial baselines

With torch.distributed initialised (and `shard=True`), rank r generates for samples r, r+W, r+2W, ...; the
predictions are gathered with `all_gather_object` and put back in sample order, and every rank computes the
metrics over all samples: the numbers are those of one rank (tests/test_eval_dist.py). Under ZeRO-3 (parameters
gathered collectively in every forward) the ranks must run the same forwards: pass `lockstep=True` (each rank's
share is padded to the same number of batches and every batch decodes the same number of tokens; the replies
are those of the default mode, tests/test_periodic_eval.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from data.images import to_tensor
from data.loader import RawSample, ShardStream
from data.tokenizer import QwenTokenizer
from train.evaluation.tasks import (
    EVAL_TASKS,
    MAX_NEW_TOKENS,
    EvalItem,
    baseline_predictions,
    image_of,
    make_item,
    prediction,
    sample_score,
    task_metrics,
)
from train.infer.generation import GenerationConfig, generate
from train.infer.prompts import encode_with_images

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One evaluated sample: what was asked, answered and expected (for tables of examples)."""

    index: int
    key: str
    prompt: str
    reply: str
    prediction: Any
    reference: Any
    score: float


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    records: dict[str, list[Record]] = field(default_factory=dict)


def read_eval_samples(sources: Mapping[str, Any], limit: int | None = None) -> dict[str, list[RawSample]]:
    """task -> samples of that task from its shards (a path, directory, brace pattern or list; data.loader), in
    shard order, at most `limit` per task. Samples of other tasks in the same shards are ignored."""
    out: dict[str, list[RawSample]] = {}
    for task, spec in sources.items():
        if task not in EVAL_TASKS:
            raise ValueError(f"no evaluation protocol for task {task!r} (have {', '.join(EVAL_TASKS)})")
        got: list[RawSample] = []
        for raw in ShardStream(spec, name=task, epochs=1, shuffle_shards=False, buffer_size=0):
            if raw.meta.get("task") == task:
                got.append(raw)
                if limit is not None and len(got) >= limit:
                    break
        if not got:
            raise ValueError(f"{spec}: no samples of task {task!r}")
        out[task] = got
    return out


def _rank_world(shard: bool) -> tuple[int, int]:
    if shard and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(local: list[tuple[int, str, Any]], world: int) -> list[tuple[int, str, Any]]:
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    return sorted((r for p in parts for r in p), key=lambda r: r[0])


def _replies(model: torch.nn.Module, tok: QwenTokenizer, items: Sequence[EvalItem], raws: Sequence[RawSample],
             batch_size: int, max_new_tokens: int, lockstep: bool = False) -> list[str]:
    """Greedy replies. lockstep: exactly max_new_tokens decoding steps per batch (no early stop; each reply is cut
    at its first stop token instead, which leaves it as the default mode makes it: rows decode independently)."""
    size = model.cfg.vision.image_size
    out: list[str] = []
    ids_cfg = model.cfg.ids
    stops = {ids_cfg.im_end, ids_cfg.eod, ids_cfg.im_start}  # generate's default stop tokens
    # greedy, stops at <|endoftext|> / <|im_end|>; lockstep: an id no token has, so nothing stops the loop
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=(-1,) if lockstep else None)
    for s in range(0, len(items), batch_size):
        chunk = list(zip(items[s:s + batch_size], raws[s:s + batch_size]))
        ids = [encode_with_images(tok, it.prompt)[0] for it, _ in chunk]
        px = [[to_tensor(image_of(raw), size)] for _, raw in chunk]
        for o in generate(model, ids, px, cfg):
            toks = o.tokens
            if lockstep:
                toks = next((toks[:j] for j, t in enumerate(toks) if t in stops), toks)
            out.append(tok.decode(toks, skip_special=False))
    return out


def _lockstep_share(model: torch.nn.Module, tok: QwenTokenizer, items: Sequence[EvalItem], mine: list[int],
                    world: int, max_new_tokens: int) -> tuple[list[int], int]:
    """(this rank's indices padded with copies of sample 0 to ceil(n / world), the decoding budget every rank
    uses): generate caps its budget by the context left after the batch's longest prompt, so the cap is taken
    over the longest prompt of all samples (every rank builds every item: no communication needed)."""
    per_rank = -(-len(items) // world)
    longest = max(len(encode_with_images(tok, it.prompt)[0]) for it in items)
    budget = max(0, min(max_new_tokens, model.cfg.llm.max_position - longest))
    return mine + [0] * (per_rank - len(mine)), budget


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: QwenTokenizer, samples_by_task: Mapping[str, Sequence[RawSample]],
             batch_size: int = 8, max_new_tokens: Mapping[str, int] | None = None, caption_prompt: str = "official",
             shard: bool = True, lockstep: bool = False) -> EvalResult:
    """Metrics and per-sample records for every task (see the module doc for the multi-rank behaviour).
    lockstep: every rank runs the same forward calls (ZeRO-3), at the cost of decoding the full budget."""
    was_training = model.training
    model.eval()
    rank, world = _rank_world(shard)
    result = EvalResult()
    try:
        for task, raws in samples_by_task.items():
            items = [make_item(r, task, caption_prompt) for r in raws]
            mine = list(range(rank, len(items), world))
            n_new = (max_new_tokens or {}).get(task, MAX_NEW_TOKENS[task])
            if lockstep:
                run, n_new = _lockstep_share(model, tokenizer, items, mine, world, n_new)
                replies = _replies(model, tokenizer, [items[i] for i in run], [raws[i] for i in run], batch_size,
                                   n_new, lockstep=True)[:len(mine)]  # the padding's replies are dropped
            else:
                replies = _replies(model, tokenizer, [items[i] for i in mine], [raws[i] for i in mine], batch_size,
                                   n_new)
            gathered = _gather([(i, r, prediction(items[i], r)) for i, r in zip(mine, replies)], world)
            if [g[0] for g in gathered] != list(range(len(items))):
                raise RuntimeError(f"task {task}: gathered {len(gathered)} predictions for {len(items)} samples")
            preds = [g[2] for g in gathered]
            result.metrics[task] = task_metrics(task, items, preds)
            result.records[task] = [Record(i, it.key, it.prompt, g[1], g[2], it.reference, sample_score(it, g[2]))
                                    for i, (it, g) in enumerate(zip(items, gathered))]
    finally:
        model.train(was_training)
    return result


def evaluate_tasks(model: torch.nn.Module, tokenizer: QwenTokenizer,
                   samples_by_task: Mapping[str, Sequence[RawSample]], batch_size: int = 8,
                   max_new_tokens: Mapping[str, int] | None = None, caption_prompt: str = "official",
                   shard: bool = True) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} (each with `n`, the sample count); `evaluate` also returns the records."""
    return evaluate(model, tokenizer, samples_by_task, batch_size, max_new_tokens, caption_prompt, shard).metrics


def baseline_scores(samples_by_task: Mapping[str, Sequence[RawSample]],
                    fit_by_task: Mapping[str, Sequence[RawSample]] | None = None,
                    caption_prompt: str = "official") -> dict[str, dict[str, float]]:
    """The trivial baselines' metrics (tasks.baseline_predictions): constant mean box, most frequent answer ..."""
    out = {}
    for task, raws in samples_by_task.items():
        items = [make_item(r, task, caption_prompt) for r in raws]
        fit = [make_item(r, task, caption_prompt) for r in fit_by_task[task]] if fit_by_task and task in fit_by_task \
            else None
        out[task] = task_metrics(task, items, baseline_predictions(task, items, fit))
    return out
