"""Inference on any checkpoint the framework reads: loading, batched KV-cache generation, ChatML prompts,
grounding parsing and drawing. `load(DIR).chat(...)` is the notebook entry point (api.py)."""

from train.infer.api import Reply, VLModel, load
from train.infer.draw import Grounding, draw_groundings, groundings
from train.infer.generation import GenerationConfig, GenerationOutput, generate
from train.infer.loading import load_model

__all__ = ["GenerationConfig", "GenerationOutput", "Grounding", "Reply", "VLModel", "draw_groundings", "generate",
           "groundings", "load", "load_model"]
