"""In-training evaluation with the official protocols (SPEC §6; train/evaluation): at `eval.every` steps and
after the last step, the model being trained generates greedily for `eval.protocol_samples` held-out samples
of every task in `eval.protocols` (read from `data.heldout.<task>`), and the task metrics are logged as
`eval/<task>/<metric>` (metrics.jsonl and W&B, through the run's MetricsLogger); under W&B, a table
`eval_examples/<task>` of the first `eval.protocol_examples` predictions (image with the boxes drawn, prompt,
reply, prediction, reference, score) is logged at the same step.

The samples are sharded over the data-parallel ranks and the predictions gathered (`train.evaluation.evaluate`,
as `python -m train.eval`): every rank computes the same numbers and rank 0 logs them. Under ZeRO-3 every
forward gathers parameters collectively, so the ranks run in lockstep (same number of batches and decoding
steps; `evaluate(lockstep=True)`). Off (`eval.protocols: []`) it costs nothing: `run_protocols` returns at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from functools import lru_cache
from typing import Any

import torch
from omegaconf import DictConfig

from train import distributed

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["task", "image", "prompt", "reply", "prediction", "reference", "score"]


def wants_lockstep(engine: Any, world_size: int) -> bool:
    """ZeRO-3 with more than one rank: parameters are partitioned, every forward is a collective."""
    return world_size > 1 and int(getattr(engine, "zero_stage", 0)) == 3


def _autocast(engine: Any) -> contextlib.AbstractContextManager:
    # the single engine keeps fp32 weights and trains under bf16 autocast: evaluate the model it trains that way;
    # DeepSpeed bf16 already holds bf16 weights
    if getattr(engine, "kind", "") == "single" and getattr(engine, "precision", "fp32") == "bf16":
        return torch.autocast(engine.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@lru_cache(maxsize=2)
def _tokenizer(path: str | None) -> Any:
    from data.tokenizer import QwenTokenizer

    return QwenTokenizer(path)  # loading the BPE ranks takes ~0.5 s: once per process, not per evaluation


def max_new_tokens(cfg: DictConfig) -> dict[str, int] | None:
    n = int(cfg.eval.protocol_max_new_tokens)
    return {t: n for t in cfg.eval.protocols} if n else None


def protocol_scores(cfg: DictConfig, engine: Any, info: distributed.DistInfo) -> tuple[Any, dict[str, list]]:
    """(EvalResult, the samples scored) for the model the engine trains; every rank must call it (collective
    gather of the predictions; ZeRO-3 forwards)."""
    from train.evaluation import evaluate, read_eval_samples

    ev = cfg.eval
    # read afresh each time (a few dozen samples): nothing stale if the shards are rebuilt between runs
    samples = read_eval_samples({t: cfg.data.heldout[t] for t in ev.protocols}, limit=int(ev.protocol_samples))
    model = engine.module  # the unwrapped QwenVL (DeepSpeed's module; LoRA adapters in place); Qwen-VL family
    tok = _tokenizer(cfg.data.options.tokenizer_path)  # the run's tokenizer (config: Qwen-VL family only)
    with _autocast(engine):
        # evaluate() puts the model in eval mode under no_grad and restores its training mode
        result = evaluate(model, tok, samples, batch_size=int(ev.batch_size or cfg.train.micro_batch_size),
                          max_new_tokens=max_new_tokens(cfg), caption_prompt=str(ev.caption_prompt),
                          lockstep=wants_lockstep(engine, info.world_size))
    return result, samples


def flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} -> {"eval/<task>/<metric>": v} (the sample count as eval/<task>/n)."""
    return {f"eval/{task}/{m}": float(v) for task, ms in metrics.items() for m, v in ms.items()}


def _tables(result: Any, samples: dict[str, list], n: int) -> dict[str, Any]:
    import json

    import wandb

    from train.evaluation.examples import example_rows

    out: dict[str, Any] = {}
    rows = example_rows(result, samples, n=n)
    for task in result.records:
        data = [[r["task"], wandb.Image(r["image"]), r["prompt"], r["reply"], json.dumps(r["prediction"]),
                 json.dumps(r["reference"], ensure_ascii=False), float(r["score"])]
                for r in rows if r["task"] == task]
        if data:
            out[f"eval_examples/{task}"] = wandb.Table(columns=TABLE_COLUMNS, data=data)
    return out


def run_protocols(cfg: DictConfig, engine: Any, logger: Any, info: distributed.DistInfo,
                  step: int) -> dict[str, dict[str, float]] | None:
    """Score eval.protocols at `step`, log them (rank 0) and return {task: {metric: value}}; None when off."""
    if not cfg.eval.protocols:
        return None
    t0 = time.time()
    result, samples = protocol_scores(cfg, engine, info)
    seconds = time.time() - t0
    record = flat_metrics(result.metrics)
    record["eval_protocols_seconds"] = seconds  # not under eval/: train.report draws eval/<name> as a loss
    logger.log(step, record)
    run = getattr(logger, "run", None)  # the W&B run (rank 0, W&B on)
    if run is not None and int(cfg.eval.protocol_examples) > 0:
        tables = _tables(result, samples, int(cfg.eval.protocol_examples))
        if tables:
            run.log(tables, step=step)
    if info.is_main:
        head = "; ".join(f"{t} " + ", ".join(f"{m} {v:.3f}" for m, v in ms.items() if m != "n")
                         for t, ms in result.metrics.items())
        print(f"[train] step {step}: official protocols ({seconds:.0f} s): {head}", flush=True)
    return result.metrics
