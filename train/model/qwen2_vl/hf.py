"""The edge to the Hugging Face Qwen2-VL layout (what transformers' Qwen2VLForConditionalGeneration reads and
writes). The ONLY module of the family that knows HF key names, the split q/k/v projections and the JSON files.

Both key-naming generations load: the Hub's / transformers < 4.52 (`model.layers.N...`, `model.embed_tokens`,
`model.norm`, `visual.*`, `lm_head`) and transformers >= 4.52 (`model.language_model.*`, `model.visual.*`,
`lm_head`). Export writes either (`key_layout="hub"`, default: readable by every transformers version, newer
ones convert on load; or `"transformers5"`), plus a flat Hub-style config.json and preprocessor_config.json
(min/max pixels, patch / merge / temporal patch sizes) that `read_preprocess` reads back.

Loads stream one shard at a time; q/k/v of a layer are joined into our fused `c_attn` once all three arrived
(then copied like any tensor, so ZeRO-3 partitions work as in train/model/official.py). Every mismatch is
collected and raised as one `CheckpointMismatchError` before any parameter is touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..official import (
    CheckpointMismatchError,
    LoadReport,
    _copy_into,
    _fmt_shape,
    _full_shape,
    _open_safetensors,
    _params,
    _read_json,
    _scan_safetensors,
    resolve_checkpoint,
)
from .config import Qwen2LLMConfig, Qwen2PreprocessConfig, Qwen2SpecialIds, Qwen2VisionConfig, Qwen2VLConfig

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
INDEX_NAME = "model.safetensors.index.json"
MODEL_TYPE = "qwen2_vl"
KEY_LAYOUTS = ("hub", "transformers5")

# (our suffix, hf suffix) inside one decoder layer / one vision block / the merger
_LLM_LAYER = [("ln_1.weight", "input_layernorm.weight"), ("ln_2.weight", "post_attention_layernorm.weight"),
              ("attn.c_proj.weight", "self_attn.o_proj.weight"), ("mlp.w1.weight", "mlp.up_proj.weight"),
              ("mlp.w2.weight", "mlp.gate_proj.weight"), ("mlp.c_proj.weight", "mlp.down_proj.weight")]
_QKV = ("q_proj", "k_proj", "v_proj")
_VIT_BLOCK = [("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
              ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
_MERGER = [("ln_q", "ln_q"), ("c_fc", "mlp.0"), ("c_proj", "mlp.2")]


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------
def _canonical(key: str) -> str | None:
    """HF key of either generation -> the transformers-5 name (`model.language_model.*`, `model.visual.*`,
    `lm_head.weight`); None if it is not a Qwen2-VL key."""
    if key.startswith(("model.language_model.", "model.visual.")) or key == "lm_head.weight":
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return None


def _to_layout(canonical: str, layout: str) -> str:
    if layout == "transformers5" or canonical == "lm_head.weight":
        return canonical
    if canonical.startswith("model.visual."):
        return canonical[len("model."):]
    return "model." + canonical[len("model.language_model."):]


_RE_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")
_RE_BLOCK = re.compile(r"^model\.visual\.blocks\.(\d+)\.(.+)$")


def hf_key_to_internal(key: str) -> tuple[str, int | None] | None:
    """HF key (either generation) -> (our parameter name, q/k/v part index or None); None if unknown."""
    c = _canonical(key)
    if c is None:
        return None
    if c == "lm_head.weight":
        return "llm.lm_head.weight", None
    if c == "model.language_model.embed_tokens.weight":
        return "llm.wte.weight", None
    if c == "model.language_model.norm.weight":
        return "llm.ln_f.weight", None
    if c == "model.visual.patch_embed.proj.weight":
        return "visual.conv1.weight", None
    m = _RE_LAYER.match(c)
    if m:
        n, rest = m.groups()
        for ours, theirs in _LLM_LAYER:
            if rest == theirs:
                return f"llm.h.{n}.{ours}", None
        for i, proj in enumerate(_QKV):
            for kind in ("weight", "bias"):
                if rest == f"self_attn.{proj}.{kind}":
                    return f"llm.h.{n}.attn.c_attn.{kind}", i
        return None
    m = _RE_BLOCK.match(c)
    if m:
        n, rest = m.groups()
        for ours, theirs in _VIT_BLOCK:
            for kind in ("weight", "bias"):
                if rest == f"{theirs}.{kind}":
                    return f"visual.transformer.resblocks.{n}.{ours}.{kind}", None
        return None
    if c.startswith("model.visual.merger."):
        rest = c[len("model.visual.merger."):]
        for ours, theirs in _MERGER:
            for kind in ("weight", "bias"):
                if rest == f"{theirs}.{kind}":
                    return f"adapter.{ours}.{kind}", None
    return None


def internal_to_hf(state: Mapping[str, torch.Tensor], cfg: Qwen2VLConfig,
                   layout: str = "hub") -> dict[str, torch.Tensor]:
    """Our state dict -> HF keys (fused c_attn split into q/k/v; lm_head left out when tied)."""
    if layout not in KEY_LAYOUTS:
        raise ValueError(f"key_layout must be one of {KEY_LAYOUTS}, got {layout!r}")
    m = cfg.llm
    split = [m.heads * m.head_dim, m.kv_heads * m.head_dim, m.kv_heads * m.head_dim]
    rev: dict[str, str] = {"llm.wte.weight": "model.language_model.embed_tokens.weight",
                           "llm.ln_f.weight": "model.language_model.norm.weight",
                           "llm.lm_head.weight": "lm_head.weight",
                           "visual.conv1.weight": "model.visual.patch_embed.proj.weight"}
    for i in range(m.layers):
        for ours, theirs in _LLM_LAYER:
            rev[f"llm.h.{i}.{ours}"] = f"model.language_model.layers.{i}.{theirs}"
    for i in range(cfg.vision.layers):
        for ours, theirs in _VIT_BLOCK:
            for kind in ("weight", "bias"):
                rev[f"visual.transformer.resblocks.{i}.{ours}.{kind}"] = f"model.visual.blocks.{i}.{theirs}.{kind}"
    for ours, theirs in _MERGER:
        for kind in ("weight", "bias"):
            rev[f"adapter.{ours}.{kind}"] = f"model.visual.merger.{theirs}.{kind}"
    out: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        if k == "llm.lm_head.weight" and m.tie_embeddings:
            continue
        mm = re.match(r"^llm\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$", k)
        if mm:
            n, kind = mm.groups()
            for proj, part in zip(_QKV, t.split(split, dim=0)):
                out[_to_layout(f"model.language_model.layers.{n}.self_attn.{proj}.{kind}", layout)] = part
            continue
        if k not in rev:
            raise CheckpointMismatchError(f"internal_to_hf: no HF name for parameter {k}")
        out[_to_layout(rev[k], layout)] = t
    return out


# ---------------------------------------------------------------------------------------------
# config.json / preprocessor_config.json
# ---------------------------------------------------------------------------------------------
def _load_json_arg(config_json: dict | str | os.PathLike, name: str) -> tuple[dict, str]:
    if isinstance(config_json, dict):
        return config_json, name
    p = Path(config_json)
    p = p / name if p.is_dir() else p
    return _read_json(p), str(p)


def config_from_hf(config_json: dict | str | os.PathLike, preprocess: Qwen2PreprocessConfig | None = None
                   ) -> Qwen2VLConfig:
    """HF config.json (dict, file, or checkpoint dir; flat Hub layout or transformers-5 `text_config`) ->
    `Qwen2VLConfig`. A directory's preprocessor_config.json, when present, sets `preprocess`."""
    d, where = _load_json_arg(config_json, CONFIG_NAME)
    if d.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{where}: model_type is {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
    text = dict(d.get("text_config") or {})
    for k, val in d.items():  # flat Hub layout: the text keys live at the top level
        if k not in ("text_config", "vision_config"):
            text.setdefault(k, val)
    vis = d.get("vision_config")
    if not isinstance(vis, dict):
        raise ValueError(f"{where}: missing 'vision_config'")

    def need(dct: dict, key: str, ctx: str) -> Any:
        if key not in dct:
            raise ValueError(f"{where}: missing key {ctx}{key}")
        return dct[key]

    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    if section is None:
        raise ValueError(f"{where}: no mrope_section in rope_parameters / rope_scaling")
    theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    hidden, heads = need(text, "hidden_size", ""), need(text, "num_attention_heads", "")
    if text.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"{where}: head_dim {text['head_dim']} != hidden_size / num_attention_heads")
    if text.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    llm = Qwen2LLMConfig(
        vocab_size=need(text, "vocab_size", ""), hidden=hidden, layers=need(text, "num_hidden_layers", ""),
        heads=heads, kv_heads=text.get("num_key_value_heads") or heads,
        intermediate=need(text, "intermediate_size", ""), rms_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_base=float(theta), mrope_section=tuple(int(x) for x in section), tie_embeddings=tie,
        max_position=int(text.get("max_position_embeddings", 32768)))
    vrope = vis.get("rope_parameters") or {}
    merge = int(vis.get("spatial_merge_size", 2))
    vision = Qwen2VisionConfig(
        patch_size=int(vis.get("patch_size", 14)), temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
        in_channels=int(vis.get("in_channels", 3)), width=int(need(vis, "embed_dim", "vision_config.")),
        layers=int(need(vis, "depth", "vision_config.")), heads=int(need(vis, "num_heads", "vision_config.")),
        mlp_ratio=int(vis.get("mlp_ratio", 4)), merge_size=merge,
        rope_theta=float(vrope.get("rope_theta", 10000.0)))
    if vis.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"{where}: vision_config.hidden_act {vis['hidden_act']!r} is not supported (quick_gelu)")
    if int(vis.get("hidden_size", hidden)) != hidden:
        raise ValueError(f"{where}: vision_config.hidden_size {vis['hidden_size']} != text hidden_size {hidden}")
    ids = Qwen2SpecialIds()
    ids = replace(ids, image_pad=int(d.get("image_token_id", ids.image_pad)),
                  video_pad=int(d.get("video_token_id", ids.video_pad)),
                  vision_start=int(d.get("vision_start_token_id", ids.vision_start)),
                  vision_end=int(d.get("vision_end_token_id", ids.vision_end)))
    if preprocess is None:
        preprocess = Qwen2PreprocessConfig(patch_size=vision.patch_size, merge_size=merge,
                                           temporal_patch_size=vision.temporal_patch_size)
        if not isinstance(config_json, dict):
            p = Path(config_json)
            folder = p if p.is_dir() else p.parent
            if (folder / PREPROCESSOR_NAME).is_file():
                preprocess = read_preprocess(folder)
    return Qwen2VLConfig(vision=vision, llm=llm, ids=ids, preprocess=preprocess).validate()


def config_to_hf(cfg: Qwen2VLConfig, torch_dtype: str = "bfloat16") -> dict:
    """`Qwen2VLConfig` -> a flat Hub-style config.json (what the published checkpoints carry; transformers 5
    moves the text keys into text_config itself)."""
    v, m, ids = cfg.vision, cfg.llm, cfg.ids
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size, "hidden_size": m.hidden, "intermediate_size": m.intermediate,
        "num_hidden_layers": m.layers, "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads,
        "hidden_act": "silu", "max_position_embeddings": m.max_position, "rms_norm_eps": m.rms_eps,
        "rope_theta": m.rope_base, "rope_scaling": {"type": "mrope", "mrope_section": list(m.mrope_section)},
        "tie_word_embeddings": m.tie_embeddings, "use_sliding_window": False, "sliding_window": 32768,
        "max_window_layers": m.layers, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": ids.eod, "eos_token_id": ids.im_end, "use_cache": True,
        "vision_start_token_id": ids.vision_start, "vision_end_token_id": ids.vision_end,
        "vision_token_id": ids.vision_pad, "image_token_id": ids.image_pad, "video_token_id": ids.video_pad,
        "vision_config": {"depth": v.layers, "embed_dim": v.width, "mlp_ratio": v.mlp_ratio, "num_heads": v.heads,
                          "in_chans": v.in_channels, "in_channels": v.in_channels, "hidden_size": m.hidden,
                          "hidden_act": "quick_gelu", "patch_size": v.patch_size,
                          "spatial_merge_size": v.merge_size, "spatial_patch_size": v.patch_size,
                          "temporal_patch_size": v.temporal_patch_size},
        "torch_dtype": torch_dtype,
    }


def preprocess_to_hf(p: Qwen2PreprocessConfig) -> dict:
    """preprocessor_config.json as Qwen2VLImageProcessor writes and reads it (both min/max_pixels and size)."""
    from ..qwen_vl import PIXEL_MEAN, PIXEL_STD

    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "resample": 3, "image_mean": list(PIXEL_MEAN), "image_std": list(PIXEL_STD),
            "min_pixels": p.min_pixels, "max_pixels": p.max_pixels,
            "size": {"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels},
            "patch_size": p.patch_size, "merge_size": p.merge_size, "temporal_patch_size": p.temporal_patch_size}


def read_preprocess(path: str | os.PathLike | dict) -> Qwen2PreprocessConfig:
    """preprocessor_config.json (dict, file or checkpoint dir) -> Qwen2PreprocessConfig. `size`
    {shortest_edge, longest_edge} (transformers >= 4.5x) wins over the older top-level min/max_pixels."""
    d, where = _load_json_arg(path, PREPROCESSOR_NAME)
    size = d.get("size") or {}
    dflt = Qwen2PreprocessConfig()
    mn = size.get("shortest_edge", d.get("min_pixels", dflt.min_pixels))
    mx = size.get("longest_edge", d.get("max_pixels", dflt.max_pixels))
    try:
        out = Qwen2PreprocessConfig(min_pixels=int(mn), max_pixels=int(mx),
                                    patch_size=int(d.get("patch_size", dflt.patch_size)),
                                    merge_size=int(d.get("merge_size", dflt.merge_size)),
                                    temporal_patch_size=int(d.get("temporal_patch_size", dflt.temporal_patch_size)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad pixel setting ({e})") from None
    if not 0 < out.min_pixels <= out.max_pixels:
        raise ValueError(f"{where}: need 0 < min_pixels ({out.min_pixels}) <= max_pixels ({out.max_pixels})")
    return out


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def load_hf(model: nn.Module, path_or_dir: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Stream an HF Qwen2-VL checkpoint (either key generation) into a `Qwen2VL`. strict: every parameter
    filled and every checkpoint key used. A tied model takes `lm_head` from the embedding (a stored
    lm_head.weight is then ignored)."""
    cfg = model.cfg
    m = cfg.llm
    part_rows = [m.heads * m.head_dim, m.kv_heads * m.head_dim, m.kv_heads * m.head_dim]
    targets = _params(model, "")
    tied = m.tie_embeddings
    if tied:
        targets.pop("llm.lm_head.weight", None)
    files, wm = resolve_checkpoint(path_or_dir)
    entries, problems = _scan_safetensors(files, wm)
    report = LoadReport()
    plan: dict[str, list] = {}  # file -> [(entry, name, part)]
    parts_seen: dict[str, dict[int, str]] = {}
    filled: dict[str, str] = {}
    unexpected, misshaped = [], []
    for e in entries:
        tr = hf_key_to_internal(e.key)
        if tr is not None and tied and tr[0] == "llm.lm_head.weight":
            report.ignored.append(e.key)
            continue
        if tr is None or tr[0] not in targets:
            unexpected.append(f"{e.key} {_fmt_shape(e.shape)} in {Path(e.file).name}")
            report.unexpected.append(e.key)
            continue
        name, part = tr
        want = _full_shape(targets[name])
        if part is not None:
            want = (part_rows[part],) + tuple(want[1:])
            seen = parts_seen.setdefault(name, {})
            if part in seen:
                problems.append(f"{name} part {part} given twice: {seen[part]} and {e.key}")
                continue
            seen[part] = e.key
        elif name in filled:
            problems.append(f"{name} filled twice: by {filled[name]} and {e.key}")
            continue
        if tuple(e.shape) != tuple(want):
            misshaped.append(f"{e.key} {_fmt_shape(e.shape)} -> {name} expects {_fmt_shape(want)}")
            continue
        if part is None or len(parts_seen[name]) == 3:
            filled[name] = e.key
        plan.setdefault(e.file, []).append((e, name, part))
    meta = [n for n in targets if targets[n].is_meta]
    if meta:
        raise ValueError(f"{path_or_dir}: {len(meta)} model parameters (e.g. {meta[0]}) are on the meta device; "
                         "call model.to_empty(device=...) before loading")
    missing = [n for n in targets if n not in filled]
    for n, seen in parts_seen.items():
        if len(seen) != 3:
            missing.append(f"{n} (q/k/v parts {sorted(set(range(3)) - set(seen))} of {list(_QKV)})")
    report.missing = [x for x in missing if x in targets]
    lines = []
    if strict and missing:
        lines.append(f"missing ({len(missing)}; model parameters the checkpoint does not provide):")
        lines += [f"  {n}" for n in missing]
    if strict and unexpected:
        lines.append(f"unexpected ({len(unexpected)}; checkpoint tensors with no model parameter):")
        lines += [f"  {u}" for u in unexpected]
    if misshaped:
        lines.append(f"mis-shaped ({len(misshaped)}):")
        lines += [f"  {x}" for x in misshaped]
    if problems:
        lines.append(f"other ({len(problems)}):")
        lines += [f"  {x}" for x in problems]
    if lines:
        raise CheckpointMismatchError(f"{path_or_dir}: checkpoint does not match the model; nothing was loaded.\n"
                                      + "\n".join(lines))
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for f in files:  # one shard open at a time; q/k/v parts wait (one layer's worth) until all three are read
        items = plan.get(str(f), [])
        if not items:
            continue
        with _open_safetensors(f) as h:
            for e, name, part in items:
                t = h.get_tensor(e.key)
                if part is None:
                    _copy_into(targets[name], t)
                    report.loaded.append(name)
                    continue
                got = pending.setdefault(name, {})
                got[part] = t
                if len(got) == 3:
                    _copy_into(targets[name], torch.cat([got[0], got[1], got[2]], dim=0))
                    report.loaded.append(name)
                    del pending[name]
    if tied:
        model.llm.tie_weights()
    report.files = [str(f) for f in files]
    return report


def build_from_hf(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  config_overrides: Mapping[str, Mapping[str, Any]] | None = None) -> nn.Module:
    """config.json (+ preprocessor_config.json) + weights -> `Qwen2VL`, built on the meta device (no random
    init), materialised with `to_empty`, filled by a strict streaming load."""
    from .model import Qwen2VL

    cfg = config_from_hf(path)
    for section, vals in (config_overrides or {}).items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **vals)})
    cfg.validate()
    with torch.device("meta"):
        model = Qwen2VL(cfg)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.llm.tie_weights()  # to_empty gives the two modules separate tensors
    load_hf(model, path, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def export_hf(model_or_state: nn.Module | Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
              cfg: Qwen2VLConfig | None = None, key_layout: str = "hub", max_shard_bytes: int = 5 * 2**30,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """config.json + preprocessor_config.json + model-0000i-of-0000N.safetensors + index, written atomically
    (temp dir beside `out_dir`, then renamed). Takes a `Qwen2VL` or a consolidated state dict (then `cfg`)."""
    from .model import Qwen2VL

    if isinstance(model_or_state, nn.Module):
        cfg = cfg or model_or_state.cfg
        state = model_or_state.state_dict()
    else:
        state = dict(model_or_state)
    if cfg is None:
        raise ValueError("export_hf: cfg is required when exporting a state dict")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    with torch.device("meta"):
        want = {k: v.shape for k, v in Qwen2VL(cfg).state_dict().items()}
    problems = [f"  missing {k} {_fmt_shape(s)}" for k, s in want.items() if k not in state]
    problems += [f"  unexpected {k} {_fmt_shape(state[k].shape)}" for k in state if k not in want]
    problems += [f"  mis-shaped {k} {_fmt_shape(state[k].shape)}, config expects {_fmt_shape(s)}"
                 for k, s in want.items() if k in state and tuple(state[k].shape) != tuple(s)]
    if problems:
        raise CheckpointMismatchError("export_hf: state dict does not match the config:\n" + "\n".join(problems))

    def own(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.contiguous().clone()  # safetensors refuses shared storage (splits, tied or ZeRO views)

    tensors = {k: own(v) for k, v in internal_to_hf({k: state[k] for k in want}, cfg, key_layout).items()}
    shards: list[list[str]] = [[]]
    cur = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and cur + nbytes > max_shard_bytes:
            shards.append([])
            cur = 0
        shards[-1].append(k)
        cur += nbytes
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    cfg_json = config_to_hf(cfg, _DTYPE_NAMES.get(floats.pop(), "float32") if len(floats) == 1 else "float32")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map = {}
        n = len(shards)
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in keys})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n", encoding="utf-8")
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg_json, indent=2) + "\n", encoding="utf-8")
        (tmp / PREPROCESSOR_NAME).write_text(json.dumps(preprocess_to_hf(cfg.preprocess), indent=2) + "\n",
                                             encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["KEY_LAYOUTS", "build_from_hf", "config_from_hf", "config_to_hf", "export_hf", "hf_key_to_internal",
           "internal_to_hf", "load_hf", "preprocess_to_hf", "read_preprocess"]
