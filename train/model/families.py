"""Model families: family name -> config class, model class, checkpoint adapter, prompt format.

Build code picks everything family-specific from here (`get_family(name)` or `family_for_model_dict(d)`), so
the loop, engines, freezing, LoRA, evaluation and chat take either family without `if family == ...`
branches. Classes are named as "module:attr" and imported on first use (building a Qwen2-VL config must not
import open_clip, and the reverse).

Every model of a family has the same top-level modules (`visual`, `adapter`, `llm`) and the same
`forward(input_ids, labels, pixel_values, ..., segment_ids, position_ids) -> ModelOutput` contract; the
family's extra batch keys (Qwen2-VL: `image_grid_thw`) are listed in `batch_keys`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


def _resolve(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


@dataclass(frozen=True)
class PromptFormat:
    """How a sample is written for a family (the data side renders it; data/ has its own copy of these strings
    per family and tests keep them equal)."""

    image_start: str  # text before an image's slot tokens
    image_pad: str  # one slot token (repeated `tokens_per_image` times)
    image_end: str
    fixed_image_tokens: int | None  # slots per image when fixed (Qwen-VL: 256); None = from the image's grid
    ref_start: str
    ref_end: str
    box_start: str
    box_end: str
    coord_scale: int  # boxes as integer corners in [0, coord_scale)
    chat_eos: str  # what ends an assistant turn in ChatML

    def box(self, x1: int, y1: int, x2: int, y2: int) -> str:
        return f"{self.box_start}({x1},{y1}),({x2},{y2}){self.box_end}"

    def image(self, n_tokens: int | None = None) -> str:
        n = self.fixed_image_tokens if self.fixed_image_tokens is not None else n_tokens
        if n is None:
            raise ValueError("this family's images have a variable token count: pass n_tokens")
        return self.image_start + self.image_pad * n + self.image_end


@dataclass(frozen=True)
class CheckpointAdapter:
    """The family's checkpoint edge, as "module:function" references."""

    load: str  # (model, path, strict=True) -> LoadReport
    build: str  # (path, device, dtype, config_overrides) -> model
    export: str  # (model_or_state, out_dir, cfg=None, ...) -> Path
    config_from: str  # (config.json dict / path) -> family config
    config_to: str  # (family config) -> config.json dict; raises ValueError if not representable

    def fn(self, which: str) -> Callable[..., Any]:
        return _resolve(getattr(self, which))


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: str  # "module:Class" with from_dict(d) -> validated config
    model_cls: str  # "module:Class" taking the config
    named_configs: str  # "module:get_config"
    checkpoint: CheckpointAdapter
    prompt: PromptFormat
    batch_keys: tuple[str, ...] = ()  # batch keys the forward takes beyond the shared ones

    def config_from_dict(self, d: Mapping[str, Any]) -> Any:
        return _resolve(self.config_cls).from_dict(dict(d))

    def build_model(self, cfg: Any) -> Any:
        return _resolve(self.model_cls)(cfg)

    def get_config(self, name: str, **overrides: Any) -> Any:
        return _resolve(self.named_configs)(name, **overrides)


QWEN_VL = Family(
    name="qwen_vl",
    config_cls="train.model.config:QwenVLConfig",
    model_cls="train.model.qwen_vl:QwenVL",
    named_configs="train.model.config:get_config",
    checkpoint=CheckpointAdapter(load="train.model.official:load_official",
                                 build="train.model.official:build_from_official",
                                 export="train.model.official:export_official",
                                 config_from="train.model.official:config_from_official",
                                 config_to="train.model.official:config_to_official"),
    prompt=PromptFormat(image_start="<img>", image_pad="<imgpad>", image_end="</img>", fixed_image_tokens=256,
                        ref_start="<ref>", ref_end="</ref>", box_start="<box>", box_end="</box>", coord_scale=1000,
                        chat_eos="<|im_end|>"),
)

QWEN2_VL = Family(
    name="qwen2_vl",
    config_cls="train.model.qwen2_vl.config:Qwen2VLConfig",
    model_cls="train.model.qwen2_vl.model:Qwen2VL",
    named_configs="train.model.qwen2_vl.config:get_config",
    checkpoint=CheckpointAdapter(load="train.model.qwen2_vl.hf:load_hf", build="train.model.qwen2_vl.hf:build_from_hf",
                                 export="train.model.qwen2_vl.hf:export_hf",
                                 config_from="train.model.qwen2_vl.hf:config_from_hf",
                                 config_to="train.model.qwen2_vl.hf:config_to_hf"),
    prompt=PromptFormat(image_start="<|vision_start|>", image_pad="<|image_pad|>", image_end="<|vision_end|>",
                        fixed_image_tokens=None, ref_start="<|object_ref_start|>", ref_end="<|object_ref_end|>",
                        box_start="<|box_start|>", box_end="<|box_end|>", coord_scale=1000, chat_eos="<|im_end|>"),
    batch_keys=("image_grid_thw",),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN_VL, QWEN2_VL)}
DEFAULT_FAMILY = "qwen_vl"


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_for_model_dict(d: Mapping[str, Any]) -> tuple[Family, dict[str, Any]]:
    """A model config node (conf/model/*.yaml as a dict) -> (its family, the dict without `family`/`name`, ready
    for `family.config_from_dict`). `family` defaults to qwen_vl (the group files written before families)."""
    rest = {k: v for k, v in d.items() if k not in ("family", "name")}
    return get_family(str(d.get("family", DEFAULT_FAMILY))), rest


def family_of_model(model: Any) -> Family:
    """The family of a built model (its config's `family`, Qwen-VL when the config has none)."""
    inner = getattr(model, "base_model", model)  # peft wrappers
    inner = getattr(inner, "model", inner) if not hasattr(inner, "cfg") else inner
    return get_family(getattr(getattr(inner, "cfg", None), "family", DEFAULT_FAMILY))
