"""Qwen2-VL family: configs, dynamic-resolution ViT + merger, Qwen2 decoder with M-RoPE, the HF checkpoint edge.

Submodules are imported lazily so `from train.model.qwen2_vl.config import ...` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Qwen2VLConfig": "config",
    "Qwen2VisionConfig": "config",
    "Qwen2LLMConfig": "config",
    "Qwen2SpecialIds": "config",
    "Qwen2PreprocessConfig": "config",
    "get_config": "config",
    "Qwen2VL": "model",
    "Qwen2LM": "llm",
    "VisionTower": "vision",
    "PatchMerger": "vision",
    "mrope_positions": "rope",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'train.model.qwen2_vl' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
