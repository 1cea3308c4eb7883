"""Evaluation with the official protocols (SPEC §6): metrics (pure functions), per-task prompts and scoring,
the sharded runner. `python -m train.eval` is the command line."""

from train.evaluation.runner import (
           EvalResult,
           Record,
           baseline_scores,
           evaluate,
           evaluate_tasks,
           read_eval_samples,
)
from train.evaluation.tasks import EVAL_TASKS

__all__ = ["EVAL_TASKS", "EvalResult", "Record", "baseline_scores", "evaluate", "evaluate_tasks",
           "read_eval_samples"]
