"""Per-stage freezing: `train.freeze` names the top-level modules (visual, adapter, llm) that do not train.

Freezing only turns requires_grad off; it never turns it on, so parameters the model keeps frozen by
design (the adapter's stored sin-cos `pos_embed`) stay frozen. Frozen modules also run in eval mode
(no dropout / drop-path) and, because the model checks requires_grad, keep no autograd graph.
The frozen LLM of stage 1 is the exception to eval mode: gradients flow through it to the adapter, it has no
stochastic layers, and its `training` flag is what turns on activation checkpointing, which the frozen
LLM needs most (its activations are what dominate memory in stage 1).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

MODULES = ("visual", "adapter", "llm")


def apply_freeze(model: nn.Module, frozen: Sequence[str]) -> None:
    """Freeze the named top-level modules of `model` (error naming the module if it does not exist)."""
    for name in frozen:
        if name not in MODULES or not hasattr(model, name):
            raise ValueError(f"train.freeze: model has no module {name!r}; known: {list(MODULES)}")
        getattr(model, name).requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train.freeze={list(frozen)} leaves no trainable parameter")


# frozen but kept in train mode: no dropout / drop-path inside, and train mode enables activation checkpointing
TRAIN_MODE_WHEN_FROZEN = frozenset({"llm"})


def set_train_mode(model: nn.Module, frozen: Sequence[str]) -> None:
    """model.train() for the trained parts, eval() for the frozen modules (except TRAIN_MODE_WHEN_FROZEN)."""
    model.train()
    for name in frozen:
        if name not in TRAIN_MODE_WHEN_FROZEN:
            getattr(model, name).eval()


def param_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """module -> (trainable, total) parameter counts, plus 'total'."""
    out: dict[str, tuple[int, int]] = {}
    for name in MODULES:
        m = getattr(model, name, None)
        if m is None:
            continue
        ps = list(m.parameters())
        out[name] = (sum(_numel(p) for p in ps if p.requires_grad), sum(_numel(p) for p in ps))
    ps = list(model.parameters())
    out["total"] = (sum(_numel(p) for p in ps if p.requires_grad), sum(_numel(p) for p in ps))
    return out


def _numel(p: nn.Parameter) -> int:
    # ZeRO-3 partitions parameters in place; ds_numel keeps the full size
    return int(getattr(p, "ds_numel", p.numel()))


def freeze_table(model: nn.Module) -> str:
    """The start-of-run table: trainable / total per module."""
    rows = [("module", "trainable", "total", "status")]
    for name, (tr, tot) in param_counts(model).items():
        status = "" if name == "total" else ("trained" if tr == tot else "frozen" if tr == 0 else "partly")
        rows.append((name, f"{tr:,}", f"{tot:,}", status))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
