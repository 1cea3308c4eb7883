"""Qwen-VL model package: configs, vision tower, adapter, decoder, loss and the multimodal glue.

Submodules are imported lazily so that `from train.model.config import ...` stays cheap
(the model pulls in torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "QwenVLConfig": "config",
    "VisionConfig": "config",
    "AdapterConfig": "config",
    "LLMConfig": "config",
    "SpecialIds": "config",
    "get_config": "config",
    "QwenLM": "llm",
    "KVCache": "llm",
    "chunked_cross_entropy": "loss",
    "chunked_cross_entropy_per_token": "loss",
    "linear_cross_entropy": "loss",
    "HeadLoss": "loss",
    "QwenVL": "qwen_vl",
    "ModelOutput": "qwen_vl",
    "VisionTower": "vision",
    "Adapter": "adapter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'train.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
