"""The edge to the official Qwen-VL Hugging Face layout (and OpenCLIP / Qwen-7B initial weights).

This is the ONLY module that knows official key names and the official per-head fused ViT q/k/v
layout (SPEC §1); everything else uses the internal names of docs/DESIGN.md.

- `config_from_official` / `config_to_official`: official `config.json` <-> `QwenVLConfig`.
- `official_key_to_internal` / `internal_key_to_official`, `per_head_to_torch_qkv` /
  `torch_qkv_to_per_head`, `official_to_internal` / `internal_to_official`: pure translations.
- `load_official`, `load_qwen_llm`, `load_openclip_vision`: streaming loads (one shard open at a time,
  each tensor translated and copied straight into its parameter; never a second full state dict), from
  safetensors shards or from `pytorch_model*.bin` shards (how the official checkpoints were published;
  `torch.load(weights_only=True, mmap=True)`, no pickle code runs).
  Every mismatch (missing / unexpected / mis-shaped key) is collected first and raised as ONE
  `CheckpointMismatchError` before any parameter is touched.
- `build_from_official`: config.json + weights -> `QwenVL` (built on the meta device, no random init).
- `export_official`: config.json + sharded safetensors + index, written atomically; with `source_dir` the
  source checkpoint's run-time config fields and its tokenizer / model code files are carried over
  (`export_config`), so the export loads wherever the source did.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import AdapterConfig, LLMConfig, QwenVLConfig, SpecialIds, VisionConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# transformers' default before safetensors (how Qwen-VL / Qwen-VL-Chat were published): pickled torch shards
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
CONFIG_NAME = "config.json"
OFFICIAL_MODEL_TYPE = "qwen"
OFFICIAL_ADAPTER_HEAD_DIM = 128  # official Resampler: num_heads = output_dim // 128
OFFICIAL_N_QUERIES = 256
OFFICIAL_POS_GRID = 16  # official ViT hard-codes a 256-row positional table
OFFICIAL_VIT_LN_EPS = 1e-6

Transform = Callable[[torch.Tensor], torch.Tensor]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected and mis-shaped key."""


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def config_from_official(config_json: dict | str | os.PathLike) -> QwenVLConfig:
    """Official Qwen-VL `config.json` (dict, file, or the checkpoint directory) -> `QwenVLConfig`.

    The official `intermediate_size` is twice the SwiGLU width (22016 -> 11008). Special image ids
    follow the official rule: `</img>` = image_start_id + 1, `<imgpad>` = image_start_id + 2.
    """
    if isinstance(config_json, dict):
        d, where = config_json, "config"
    else:
        p = Path(config_json)
        p = p / CONFIG_NAME if p.is_dir() else p
        d, where = _read_json(p), str(p)

    def need(dct: dict, key: str, ctx: str = "") -> Any:
        if key not in dct:
            raise ValueError(f"{where}: missing required field {ctx}{key!r}")
        return dct[key]

    mt = d.get("model_type")
    if mt != OFFICIAL_MODEL_TYPE:
        raise ValueError(f"{where}: model_type {mt!r} is not supported; expected {OFFICIAL_MODEL_TYPE!r} (Qwen-VL)")
    if d.get("tie_word_embeddings", False):
        raise ValueError(f"{where}: tie_word_embeddings=true is not supported (Qwen-VL has an untied lm_head)")
    if float(d.get("rotary_pct", 1.0)) != 1.0:
        raise ValueError(f"{where}: rotary_pct {d['rotary_pct']} != 1.0 is not supported (rotary on all dims)")
    inter2 = int(need(d, "intermediate_size"))
    if inter2 % 2:
        raise ValueError(f"{where}: intermediate_size {inter2} must be even (the official code halves it)")
    hidden, heads = int(need(d, "hidden_size")), int(need(d, "num_attention_heads"))
    if "kv_channels" in d and heads * int(d["kv_channels"]) != hidden:
        raise ValueError(f"{where}: kv_channels {d['kv_channels']} x heads {heads} != hidden_size {hidden}")
    max_pos = d.get("max_position_embeddings", d.get("seq_length"))
    llm = LLMConfig(
        vocab_size=int(need(d, "vocab_size")),
        hidden=hidden,
        layers=int(need(d, "num_hidden_layers")),
        heads=heads,
        intermediate=inter2 // 2,
        rms_eps=float(d.get("layer_norm_epsilon", 1e-6)),
        rope_base=float(d.get("rotary_emb_base", 10000.0)),
        max_position=int(max_pos) if max_pos is not None else LLMConfig.max_position,
    )
    v = need(d, "visual")
    width = int(need(v, "width", "visual."))
    out_dim = int(v.get("output_dim", hidden))
    if out_dim != hidden:
        raise ValueError(f"{where}: visual.output_dim {out_dim} != hidden_size {hidden}")
    n_queries = int(v.get("n_queries", OFFICIAL_N_QUERIES))
    pos_grid = int(round(n_queries**0.5))
    vision = VisionConfig(
        image_size=int(need(v, "image_size", "visual.")),
        patch_size=int(need(v, "patch_size", "visual.")),
        width=width,
        layers=int(need(v, "layers", "visual.")),
        heads=int(need(v, "heads", "visual.")),
        mlp_width=int(width * float(need(v, "mlp_ratio", "visual."))),  # the official formula
        ln_eps=OFFICIAL_VIT_LN_EPS,
        pos_grid=OFFICIAL_POS_GRID,
    )
    adapter = AdapterConfig(n_queries=n_queries, pos_grid=pos_grid, head_dim=OFFICIAL_ADAPTER_HEAD_DIM,
                            ln_eps=OFFICIAL_VIT_LN_EPS)
    start = int(v.get("image_start_id", SpecialIds.img_start))
    ids = SpecialIds(img_start=start, img_end=start + 1, img_pad=start + 2)
    if "eos_token_id" in d and d["eos_token_id"] is not None:
        ids = replace(ids, eod=int(d["eos_token_id"]))
    try:
        return QwenVLConfig(vision=vision, adapter=adapter, llm=llm, ids=ids).validate()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _mlp_ratio(width: int, mlp_width: int) -> float:
    """Shortest decimal ratio r with int(width * r) == mlp_width (official code: int(width * mlp_ratio))."""
    for digits in range(0, 12):
        r = round(mlp_width / width, digits)
        if int(width * r) == mlp_width:
            return float(r) if digits else float(int(r))
    raise ValueError(f"no mlp_ratio reproduces mlp_width {mlp_width} from width {width}")


def config_to_official(cfg: QwenVLConfig, torch_dtype: str = "bfloat16", seq_length: int = 2048) -> dict:
    """`QwenVLConfig` -> official Qwen-VL `config.json` dict (fields as in Qwen/Qwen-VL-Chat).

    Raises if the config cannot be expressed in the official code (the official model hard-codes
    adapter heads of 128 dims, a 16x16 ViT position table and LayerNorm eps 1e-6).
    """
    v, a, m = cfg.vision, cfg.adapter, cfg.llm
    problems = []
    if a.head_dim != OFFICIAL_ADAPTER_HEAD_DIM:
        problems.append(f"adapter.head_dim {a.head_dim} != {OFFICIAL_ADAPTER_HEAD_DIM}")
    if v.pos_grid != OFFICIAL_POS_GRID:
        problems.append(f"vision.pos_grid {v.pos_grid} != {OFFICIAL_POS_GRID}")
    if v.ln_eps != OFFICIAL_VIT_LN_EPS or a.ln_eps != OFFICIAL_VIT_LN_EPS:
        problems.append(f"LayerNorm eps (vision {v.ln_eps}, adapter {a.ln_eps}) != {OFFICIAL_VIT_LN_EPS}")
    if (cfg.ids.img_end, cfg.ids.img_pad) != (cfg.ids.img_start + 1, cfg.ids.img_start + 2):
        problems.append("ids.img_end/img_pad must be img_start+1/+2")
    if problems:
        raise ValueError("config not representable in the official Qwen-VL layout: " + "; ".join(problems))
    visual = {
        "heads": v.heads,
        "image_size": v.image_size,
        "image_start_id": cfg.ids.img_start,
        "layers": v.layers,
        "mlp_ratio": _mlp_ratio(v.width, v.mlp_width),
        "output_dim": m.hidden,
        "patch_size": v.patch_size,
        "width": v.width,
    }
    if a.n_queries != OFFICIAL_N_QUERIES:
        visual["n_queries"] = a.n_queries  # passed through to the official VisionTransformer(**visual)
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": m.hidden,
        "initializer_range": 0.02,
        "intermediate_size": 2 * m.intermediate,
        "kv_channels": m.head_dim,
        "layer_norm_epsilon": m.rms_eps,
        "max_position_embeddings": m.max_position,
        "model_type": OFFICIAL_MODEL_TYPE,
        "no_bias": True,
        "num_attention_heads": m.heads,
        "num_hidden_layers": m.layers,
        "onnx_safe": None,
        "rotary_emb_base": m.rope_base if m.rope_base != int(m.rope_base) else int(m.rope_base),
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": seq_length,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "visual": visual,
        "vocab_size": m.vocab_size,
    }


# config.json fields that say how the official code runs the model, not what its weights are. An export
# keeps the source checkpoint's values; without a source these defaults make the official code compute what
# this framework's model computes: plain RoPE at every length (no dynamic NTK, no logn attention scaling),
# precision chosen by the official code (all three flags false = auto), transformers of the official release.
RUNTIME_DEFAULTS: dict[str, Any] = {
    "bf16": False, "fp16": False, "fp32": False, "use_flash_attn": "auto",
    "use_dynamic_ntk": False, "use_logn_attn": False, "transformers_version": "4.32.0",
}
# everything else a source config holds is kept too, except the fields the model's own config decides
_SHAPE_FIELDS = frozenset({
    "hidden_size", "intermediate_size", "kv_channels", "layer_norm_epsilon", "max_position_embeddings",
    "model_type", "num_attention_heads", "num_hidden_layers", "rotary_emb_base", "rotary_pct",
    "tie_word_embeddings", "vocab_size", "torch_dtype", "seq_length", "visual",
})
_VISUAL_SHAPE_FIELDS = frozenset({"heads", "image_size", "image_start_id", "layers", "mlp_ratio", "output_dim",
                                  "patch_size", "width", "n_queries"})
# files of an official checkpoint directory that the export copies beside its weights: the tokenizer, the
# remote code `auto_map` points at, generation defaults, the font the official grounding drawer uses,
# the licence. Weights, indexes and config.json are never copied (the export writes its own).
SOURCE_FILE_PATTERNS = ("*.py", "*.tiktoken", "*.ttf", "tokenizer_config.json", "generation_config.json",
                        "special_tokens_map.json", "added_tokens.json", "LICENSE*", "NOTICE*")


def export_config(cfg: QwenVLConfig, torch_dtype: str = "bfloat16", source: Mapping[str, Any] | None = None,
                  seq_length: int | None = None) -> dict:
    """The `config.json` of an export: the shape fields from `cfg` (`config_to_official`), every other field
    from the `source` checkpoint's config.json (precision flags, `use_flash_attn`, `use_dynamic_ntk`,
    `use_logn_attn`, `transformers_version`, `auto_map`, ...) or, without a source, `RUNTIME_DEFAULTS`.

    seq_length: the length the run trained at (`data.seq_len`). The official code applies dynamic NTK and
    logn scaling only beyond `seq_length`, so it must not be below what the model was trained on: the export
    says max(source's seq_length, seq_length) -- a model fine-tuned at 8192 from Qwen-VL-Chat (2048) says
    8192; one fine-tuned on shorter rows keeps the source's 2048. Neither known: 2048 (Qwen-VL-Chat's).
    """
    known = [int(v) for v in ((source or {}).get("seq_length"), seq_length) if v is not None]
    if any(v <= 0 for v in known):
        raise ValueError(f"seq_length must be positive, got {known}")
    out = config_to_official(cfg, torch_dtype=torch_dtype, seq_length=max(known) if known else 2048)
    if source is None:
        out.update(RUNTIME_DEFAULTS)
        return dict(sorted(out.items()))
    if source.get("model_type") != OFFICIAL_MODEL_TYPE:
        raise ValueError(f"source config: model_type {source.get('model_type')!r} is not {OFFICIAL_MODEL_TYPE!r} "
                         "(Qwen-VL)")
    for k, v in source.items():
        if k not in _SHAPE_FIELDS:
            out[k] = v
    src_visual = source.get("visual") if isinstance(source.get("visual"), dict) else {}
    out["visual"] = {**{k: v for k, v in src_visual.items() if k not in _VISUAL_SHAPE_FIELDS}, **out["visual"]}
    for k, v in RUNTIME_DEFAULTS.items():  # an old source config may lack some: say what ours computes
        out.setdefault(k, v)
    return dict(sorted(out.items()))


def _source_dir(path: str | os.PathLike) -> Path:
    """`init.official` / `init.from_stage_dir` may name a checkpoint directory or a file inside one."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"export source {p}: no such file or directory")
    return p if p.is_dir() else p.parent


def _source_files(src: Path, exclude: set[str]) -> list[Path]:
    """The tokenizer / code / generation files of a source checkpoint directory (top level only)."""
    found: dict[str, Path] = {}
    for pattern in SOURCE_FILE_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and f.name not in exclude and not f.name.startswith("."):
                found.setdefault(f.name, f)
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# key and tensor translation (pure functions)
# ---------------------------------------------------------------------------------------------
_OFF_VIT_QKV = re.compile(r"^transformer\.visual\.(transformer\.resblocks\.\d+\.attn)\.in_proj\.(weight|bias)$")
_INT_VIT_QKV = re.compile(r"^visual\.(transformer\.resblocks\.\d+\.attn)\.in_proj_(weight|bias)$")
# (official prefix, internal prefix); order matters: the first match wins
_PREFIXES = (
    ("transformer.visual.attn_pool.", "adapter."),
    ("transformer.visual.ln_post.", "adapter.ln_post."),
    ("transformer.visual.", "visual."),
    ("transformer.wte.", "llm.wte."),
    ("transformer.h.", "llm.h."),
    ("transformer.ln_f.", "llm.ln_f."),
    ("lm_head.", "llm.lm_head."),
)
_EXACT = (("transformer.visual.proj", "adapter.proj"),)
# internal -> official needs the most specific internal prefix first (adapter.ln_post. before adapter.)
_PREFIXES_REV = tuple(sorted(_PREFIXES, key=lambda p: -len(p[1])))
# buffers some official code versions may save; never parameters
_OFFICIAL_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def official_key_to_internal(key: str) -> str | None:
    """Official checkpoint key -> internal parameter name (None: no rule maps it)."""
    for off, ours in _EXACT:
        if key == off:
            return ours
    m = _OFF_VIT_QKV.match(key)
    if m:
        return f"visual.{m.group(1)}.in_proj_{m.group(2)}"
    for off, ours in _PREFIXES:
        if key.startswith(off) and len(key) > len(off):
            return ours + key[len(off):]
    return None


def internal_key_to_official(key: str) -> str | None:
    """Internal parameter name -> official checkpoint key (None: no rule maps it)."""
    for off, ours in _EXACT:
        if key == ours:
            return off
    m = _INT_VIT_QKV.match(key)
    if m:
        return f"transformer.visual.{m.group(1)}.in_proj.{m.group(2)}"
    for off, ours in _PREFIXES_REV:
        if key.startswith(ours) and len(key) > len(ours):
            return off + key[len(ours):]
    return None


def is_vit_qkv(internal_key: str) -> bool:
    """Whether an internal key is a ViT block's fused q/k/v (the only tensors whose layout differs)."""
    return _INT_VIT_QKV.match(internal_key) is not None


def per_head_to_torch_qkv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Official per-head fused [3*W(, W)] (row = head*3*hd + {0 q, hd k, 2hd v} + d) -> torch [Q;K;V]."""
    rows, rest = t.shape[0], t.shape[1:]
    if rows % (3 * heads):
        raise ValueError(f"fused q/k/v has {rows} rows, not divisible by 3 x {heads} heads")
    hd = rows // (3 * heads)
    return t.reshape(heads, 3, hd, *rest).transpose(0, 1).reshape(rows, *rest).contiguous()


def torch_qkv_to_per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """torch [Q;K;V] [3*W(, W)] -> official per-head fused layout (inverse of `per_head_to_torch_qkv`)."""
    rows, rest = t.shape[0], t.shape[1:]
    if rows % (3 * heads):
        raise ValueError(f"fused q/k/v has {rows} rows, not divisible by 3 x {heads} heads")
    hd = rows // (3 * heads)
    return t.reshape(3, heads, hd, *rest).transpose(0, 1).reshape(rows, *rest).contiguous()


def official_to_internal(state: Mapping[str, torch.Tensor], vision_heads: int) -> dict[str, torch.Tensor]:
    """Translate a whole (small) official state dict; unknown keys are an error naming them."""
    out, bad = {}, []
    for k, t in state.items():
        ours = official_key_to_internal(k)
        if ours is None:
            if not _OFFICIAL_IGNORED.search(k):
                bad.append(k)
            continue
        out[ours] = per_head_to_torch_qkv(t, vision_heads) if is_vit_qkv(ours) else t
    if bad:
        raise CheckpointMismatchError(f"no internal name for official key(s): {', '.join(bad)}")
    return out


def internal_to_official(state: Mapping[str, torch.Tensor], vision_heads: int) -> dict[str, torch.Tensor]:
    """Translate a whole internal state dict to official names and layout."""
    out, bad = {}, []
    for k, t in state.items():
        off = internal_key_to_official(k)
        if off is None:
            bad.append(k)
            continue
        out[off] = torch_qkv_to_per_head(t, vision_heads) if is_vit_qkv(k) else t
    if bad:
        raise CheckpointMismatchError(f"no official name for internal key(s): {', '.join(bad)}")
    return out


# ---------------------------------------------------------------------------------------------
# checkpoint sources
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load did: internal names filled, and checkpoint keys skipped on purpose (ignored)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # only non-empty with strict=False
    unexpected: list[str] = field(default_factory=list)  # only non-empty with strict=False
    ignored: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


@dataclass
class _Entry:
    key: str  # checkpoint key
    file: str
    shape: tuple[int, ...]


def resolve_checkpoint(path: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """A directory (index + shards, or a single file; safetensors preferred over `pytorch_model*.bin`, as
    transformers does), an index file, a .safetensors file or a torch (.bin) file -> (shard files in order,
    weight_map or None)."""
    p = Path(path)
    if p.is_dir():
        for name in (INDEX_NAME, SINGLE_NAME, BIN_INDEX_NAME, BIN_SINGLE_NAME):
            if (p / name).is_file():
                break
        else:
            raise FileNotFoundError(f"{p}: none of {INDEX_NAME}, {SINGLE_NAME}, {BIN_INDEX_NAME}, {BIN_SINGLE_NAME} "
                                    "found")
        if not name.endswith(".index.json"):
            return [p / name], None
        p = p / name
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    if p.name.endswith(".index.json"):
        idx = _read_json(p)
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{p}: no 'weight_map' in the index")
        files = []
        for name in dict.fromkeys(wm.values()):  # first-seen order, deduplicated
            f = p.parent / name
            if not f.is_file():
                raise FileNotFoundError(f"{p}: shard {name} listed in the index does not exist")
            if f.suffix != ".safetensors" and f.suffix not in TORCH_SUFFIXES:
                raise ValueError(f"{p}: shard {name} is neither .safetensors nor a torch file ({TORCH_SUFFIXES})")
            files.append(f)
        return files, wm
    if p.suffix == ".safetensors" or p.suffix in TORCH_SUFFIXES:
        return [p], None
    raise ValueError(f"{p}: not a .safetensors or torch (.bin) file, an index file, or a checkpoint directory")


class _TorchShard:
    """A weights-only torch shard behind the safetensors handle interface (keys, get_slice().get_shape(),
    get_tensor), so the scan and the streaming copy treat both formats alike."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def get_slice(self, key: str) -> _TorchSlice:
        return _TorchSlice(tuple(self._state[key].shape))

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._state[key]


@dataclass
class _TorchSlice:
    shape: tuple[int, ...]

    def get_shape(self) -> list[int]:
        return list(self.shape)


@contextmanager
def _open_shard(f: Path) -> Iterator[Any]:
    """One checkpoint shard, open for the duration of the block: safetensors through `safe_open` (header and
    lazily read tensors), a torch file through `torch.load(weights_only=True, mmap=True)` (no pickle code
    runs; the tensors are file-backed, released when the block ends and the caller drops them)."""
    if Path(f).suffix in TORCH_SUFFIXES:
        shard = _TorchShard(_load_torch_state(Path(f)))
        try:
            yield shard
        finally:
            shard._state = {}
        return
    try:
        handle = safe_open(str(f), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - the library raises its own error types; name the file
        raise ValueError(f"{f}: cannot read safetensors file ({e})") from None
    with handle as h:
        yield h


_open_safetensors = _open_shard  # the older name (train/model/qwen2_vl/hf.py imports it)


def _scan_shards(files: list[Path], weight_map: dict[str, str] | None) -> tuple[list[_Entry], list[str]]:
    """Keys and shapes (safetensors: from the headers; torch: from the mmap-ed load, no data read);
    index inconsistencies as problems."""
    entries, problems, seen = [], [], {}
    for f in files:
        with _open_shard(f) as h:
            for k in h.keys():
                shape = tuple(h.get_slice(k).get_shape())
                if k in seen:
                    problems.append(f"duplicate key {k} in {seen[k]} and {f.name}")
                    continue
                seen[k] = f.name
                entries.append(_Entry(k, str(f), shape))
    if weight_map is not None:
        for k, name in weight_map.items():
            if seen.get(k) != name:
                where = f"found in {seen[k]}" if k in seen else "not in any shard"
                problems.append(f"index lists {k} in {name} but it is {where}")
    return entries, problems


_scan_safetensors = _scan_shards  # the older name (train/model/qwen2_vl/hf.py imports it)


def _fmt_shape(s: tuple[int, ...] | torch.Size) -> str:
    return "[" + ",".join(str(int(x)) for x in s) + "]"


def _out_shape(fn: Transform | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape a transform produces, computed on the meta device (no data)."""
    return shape if fn is None else tuple(fn(torch.empty(shape, device="meta")).shape)


# translate(checkpoint_key, shape) -> (internal_name, transform or None) | "ignore" | None (unexpected)
Translate = Callable[[str, tuple[int, ...]], "tuple[str, Transform | None] | str | None"]


def _plan(
    entries: list[_Entry],
    targets: Mapping[str, torch.Tensor],
    translate: Translate,
    source: str,
    strict: bool,
    extra_problems: list[str] | None = None,
) -> tuple[list[tuple[_Entry, str, Transform | None]], LoadReport]:
    """Match checkpoint entries to target parameters; raise ONE error listing every mismatch."""
    report = LoadReport()
    plan, unexpected, misshaped, filled = [], [], [], {}
    problems = list(extra_problems or [])
    for e in entries:
        tr = translate(e.key, e.shape)
        if tr == "ignore":
            report.ignored.append(e.key)
            continue
        if tr is None or tr[0] not in targets:
            target = "" if tr is None else f" (-> {tr[0]})"
            unexpected.append(f"{e.key} {_fmt_shape(e.shape)}{target} in {Path(e.file).name}")
            report.unexpected.append(e.key)
            continue
        name, fn = tr
        if name in filled:
            problems.append(f"{name} filled twice: by {filled[name]} and {e.key}")
            continue
        filled[name] = e.key
        want = _full_shape(targets[name])
        try:
            got = _out_shape(fn, e.shape)
        except (RuntimeError, ValueError) as err:
            got = None
            misshaped.append(f"{e.key} {_fmt_shape(e.shape)} -> {name} expects {_fmt_shape(want)} ({err})")
        if got is not None and got != want:
            misshaped.append(f"{e.key} {_fmt_shape(e.shape)} -> {name} expects {_fmt_shape(want)}")
        elif got is not None:
            plan.append((e, name, fn))
    meta = [n for n in targets if targets[n].is_meta]
    if meta:
        raise ValueError(f"{source}: {len(meta)} model parameters (e.g. {meta[0]}) are on the meta device; "
                         "call model.to_empty(device=...) before loading")
    missing = [n for n in targets if n not in filled]
    report.missing = missing
    report.unexpected = report.unexpected if not strict else []
    lines = []
    if strict and missing:
        lines.append(f"missing ({len(missing)}; model parameters the checkpoint does not provide):")
        lines += [f"  {n} {_fmt_shape(_full_shape(targets[n]))}" for n in missing]
    if strict and unexpected:
        lines.append(f"unexpected ({len(unexpected)}; checkpoint tensors with no model parameter):")
        lines += [f"  {u}" for u in unexpected]
    if misshaped:
        lines.append(f"mis-shaped ({len(misshaped)}):")
        lines += [f"  {m}" for m in misshaped]
    if problems:
        lines.append(f"other ({len(problems)}):")
        lines += [f"  {p}" for p in problems]
    if lines:
        raise CheckpointMismatchError(f"{source}: checkpoint does not match the model; nothing was loaded.\n"
                                      + "\n".join(lines))
    return plan, report


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape; under DeepSpeed ZeRO-3 (zero.Init) the full one, not the empty local stub."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


@torch.no_grad()
def _copy_into(param: torch.Tensor, t: torch.Tensor) -> None:
    if param.is_meta:
        raise ValueError("model parameters are on the meta device; call model.to_empty(device=...) first")
    if hasattr(param, "ds_tensor"):  # partitioned by ZeRO-3: fill only this rank's slice (no collective)
        _copy_into_partition(param, t)
        return
    param.copy_(t)  # casts into the parameter's dtype and device


def _copy_into_partition(param: torch.Tensor, t: torch.Tensor) -> None:
    """DeepSpeed ZeRO-3 layout: the flattened parameter padded to `ds_numel_aligned` and cut into equal
    slices, rank r holding [r * n, (r + 1) * n) in `ds_tensor` (n = ds_tensor.ds_numel). Every rank reads
    the checkpoint tensor (mmap-ed) and copies its own slice."""
    import torch.distributed as dist

    local = param.ds_tensor
    if getattr(param, "ds_status", None) is not None and param.ds_status.name != "NOT_AVAILABLE":
        raise RuntimeError(f"ZeRO-3 parameter {getattr(param, 'ds_id', '?')} is gathered ({param.ds_status.name});"
                           " initial weights are loaded into partitions before deepspeed.initialize")
    n, world = int(local.ds_numel), dist.get_world_size(group=param.ds_process_group)
    if n * world != int(param.ds_numel_aligned):
        raise RuntimeError(f"unexpected ZeRO-3 partition layout: {n} x {world} ranks != "
                           f"{param.ds_numel_aligned} (aligned numel)")
    start = n * dist.get_rank(group=param.ds_process_group)
    flat = t.reshape(-1)
    count = max(0, min(n, flat.numel() - start))
    if count:
        local.narrow(0, 0, count).copy_(flat.narrow(0, start, count))


def _stream_checkpoint(
    path: str | os.PathLike, targets: Mapping[str, torch.Tensor], translate: Translate, strict: bool
) -> LoadReport:
    files, wm = resolve_checkpoint(path)
    entries, problems = _scan_shards(files, wm)
    plan, report = _plan(entries, targets, translate, str(path), strict, problems)
    by_file: dict[str, list[tuple[_Entry, str, Transform | None]]] = {}
    for item in plan:
        by_file.setdefault(item[0].file, []).append(item)
    for f in files:  # one shard open at a time; each tensor is read, translated, copied, dropped
        items = by_file.get(str(f), [])
        if not items:
            continue
        with _open_shard(f) as h:
            for e, name, fn in items:
                t = h.get_tensor(e.key)
                _copy_into(targets[name], fn(t) if fn is not None else t)
                report.loaded.append(name)
                del t
    report.files = [str(f) for f in files]
    return report


def _params(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a module keyed by full internal name (prefix + local name)."""
    out = {prefix + n: p for n, p in module.named_parameters()}
    sd_keys = set(module.state_dict(keep_vars=True).keys())
    out.update({prefix + n: b for n, b in module.named_buffers() if n in sd_keys})
    return out


def _vision_heads(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "vision"):
        raise TypeError("expected a QwenVL model (with .cfg.vision, .visual, .adapter, .llm)")
    return cfg.vision.heads


def _official_translate(vision_heads: int, llm_only: bool = False) -> Translate:
    def qkv(t: torch.Tensor) -> torch.Tensor:
        return per_head_to_torch_qkv(t, vision_heads)

    def tr(key: str, shape: tuple[int, ...]) -> tuple[str, Transform | None] | str | None:
        if _OFFICIAL_IGNORED.search(key):
            return "ignore"
        if llm_only and key.startswith("transformer.visual."):
            return "ignore"
        ours = official_key_to_internal(key)
        if ours is None:
            return None
        return ours, (qkv if is_vit_qkv(ours) else None)

    return tr


# ---------------------------------------------------------------------------------------------
# public loaders
# ---------------------------------------------------------------------------------------------
def load_official(model: nn.Module, path_or_dir: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Stream an official Qwen-VL checkpoint (dir with index + shards, or one model.safetensors; or the same
    as `pytorch_model*.bin`) into a `QwenVL`. strict: every model parameter must be filled and every
    checkpoint key used."""
    targets = _params(model, "")
    return _stream_checkpoint(path_or_dir, targets, _official_translate(_vision_heads(model)), strict)


def load_qwen_llm(model: nn.Module, path_or_dir: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Stream a Qwen-7B (text-only official HF layout) checkpoint into `model.llm` only.
    `transformer.visual.*` keys (a full Qwen-VL checkpoint) are ignored and reported in `ignored`."""
    targets = _params(model.llm, "llm.")
    return _stream_checkpoint(path_or_dir, targets, _official_translate(1, llm_only=True), strict)


def _load_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A torch checkpoint without pickle code execution (weights_only); mmap keeps it off the heap."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be mmap-ed
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise ValueError(f"{path}: cannot load as a weights-only torch checkpoint ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (or {{'state_dict': ...}})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_openclip_vision(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Stage-1 init: OpenCLIP ViT weights (a CLIP state dict with `visual.*` keys, or a bare
    VisionTransformer state dict) into `model.visual`. The class-token row of `positional_embedding`
    and `class_embedding` are dropped; CLIP's own `ln_post`/`proj` and the text tower are ignored.
    Source: a .safetensors file (streamed) or a torch checkpoint (torch.load(weights_only=True))."""
    p = Path(path)
    targets = _params(model.visual, "visual.")
    n_pos = _full_shape(targets["visual.positional_embedding"])[0]

    def drop_cls(t: torch.Tensor) -> torch.Tensor:
        return t[1:] if t.shape[0] == n_pos + 1 else t

    def make_translate(keys: list[str]) -> Translate:
        prefix = "visual." if any(k.startswith("visual.") for k in keys) else ""
        drop = {f"{prefix}class_embedding", f"{prefix}proj"}

        def tr(key: str, shape: tuple[int, ...]) -> tuple[str, Transform | None] | str | None:
            if not key.startswith(prefix):
                return "ignore"  # text tower, logit_scale, ...
            local = key[len(prefix):]
            if key in drop or local.startswith("ln_post."):
                return "ignore"
            return "visual." + local, (drop_cls if local == "positional_embedding" else None)

        return tr

    if not p.is_file():
        raise FileNotFoundError(f"{p}: OpenCLIP checkpoint not found")
    if p.suffix == ".safetensors":
        with _open_shard(p) as h:
            keys = list(h.keys())
        return _stream_checkpoint(p, targets, make_translate(keys), strict)
    state = _load_torch_state(p)
    entries = [_Entry(k, str(p), tuple(v.shape)) for k, v in state.items()]
    plan, report = _plan(entries, targets, make_translate(list(state)), str(p), strict)
    for e, name, fn in plan:
        t = state[e.key]
        _copy_into(targets[name], fn(t) if fn is not None else t)
        report.loaded.append(name)
    report.files = [str(p)]
    return report


def build_from_official(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> nn.Module:
    """config.json + weights in `path` -> `QwenVL` on `device` in `dtype`.

    Built on the meta device (no random init, no fp32 copy of a bf16 model), materialised with
    `to_empty`, then every parameter is filled by a strict streaming load. config_overrides changes
    training-only fields per section, e.g. {"vision": {"grad_checkpointing": True}}.
    """
    from .qwen_vl import QwenVL  # local: importing this module must not pull in the whole model

    cfg = config_from_official(path)
    for section, vals in (config_overrides or {}).items():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **vals)})
    cfg.validate()
    with torch.device("meta"):
        model = QwenVL(cfg)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    load_official(model, path, strict=True)  # strict: nothing left uninitialised
    return model


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _expected_shapes(cfg: QwenVLConfig) -> dict[str, torch.Size]:
    from .qwen_vl import QwenVL

    with torch.device("meta"):
        ref = QwenVL(cfg)
    return {k: v.shape for k, v in ref.state_dict().items()}


def export_official(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    cfg: QwenVLConfig | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
    seq_length: int | None = None,
) -> Path:
    """Write an official-layout checkpoint: config.json + model-0000i-of-0000N.safetensors + index.

    Takes a `QwenVL` or a consolidated internal state dict (then `cfg` is required). The state dict is
    checked against the config first (one error listing missing/unexpected/mis-shaped keys). dtype
    casts floating tensors (None keeps them). Atomic: written into a temp dir beside `out_dir` and
    renamed; an existing `out_dir` is an error unless overwrite=True.

    source_dir: the checkpoint the weights started from (`init.official` / `init.from_stage_dir`; a
    directory or a file in it). Its config.json's run-time fields are kept (`export_config`) and its
    tokenizer and model code files (`SOURCE_FILE_PATTERNS`: qwen.tiktoken, tokenization_qwen.py,
    modeling_qwen.py, visual.py, configuration_qwen.py, qwen_generation_utils.py, tokenizer_config.json,
    generation_config.json, ...) are copied, so the export loads where the source loaded. seq_length: the
    sequence length the run trained at (`data.seq_len`), see `export_config`.
    """
    if isinstance(model_or_state, nn.Module):
        cfg = cfg or model_or_state.cfg
        state = model_or_state.state_dict()
    else:
        state = model_or_state
    if cfg is None:
        raise ValueError("export_official: cfg is required when exporting a state dict")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")

    want = _expected_shapes(cfg)
    problems = [f"  missing {k} {_fmt_shape(s)}" for k, s in want.items() if k not in state]
    problems += [f"  unexpected {k} {_fmt_shape(state[k].shape)}" for k in state if k not in want]
    problems += [
        f"  mis-shaped {k} {_fmt_shape(state[k].shape)}, config expects {_fmt_shape(s)}"
        for k, s in want.items() if k in state and tuple(state[k].shape) != tuple(s)
    ]
    if problems:
        raise CheckpointMismatchError("export_official: state dict does not match the config:\n" + "\n".join(problems))
    src = _source_dir(source_dir) if source_dir is not None else None
    src_config = _read_json(src / CONFIG_NAME) if src is not None and (src / CONFIG_NAME).is_file() else None
    try:
        export_config(cfg, source=src_config, seq_length=seq_length)  # raises early: not representable / bad
    except ValueError as e:
        raise ValueError(f"export_official: {e}" + (f" ({src / CONFIG_NAME})" if src_config else "")) from None

    heads = cfg.vision.heads

    def tensor_for(k: str) -> torch.Tensor:
        t = state[k].detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if is_vit_qkv(k):
            t = torch_qkv_to_per_head(t, heads)
        # safetensors refuses tensors sharing storage (views of a flat ZeRO buffer): own the memory
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        return t

    # shard plan from sizes only (tensors are materialised one shard at a time)
    keys = list(want)
    size = {}
    for k in keys:
        out_dtype = dtype if dtype is not None and state[k].is_floating_point() else state[k].dtype
        size[k] = state[k].numel() * out_dtype.itemsize
    shards: list[list[str]] = [[]]
    cur = 0
    for k in keys:
        if shards[-1] and cur + size[k] > max_shard_bytes:
            shards.append([])
            cur = 0
        shards[-1].append(k)
        cur += size[k]
    n = len(shards)
    float_dtypes = {dtype or state[k].dtype for k in keys if state[k].is_floating_point()}
    only = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32  # mixed: say float32
    official_json = export_config(cfg, _DTYPE_NAMES.get(only, "float32"), src_config, seq_length)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: the export is meant to be read by others too
        weight_map = {}
        for i, shard_keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tensors = {internal_key_to_official(k): tensor_for(k) for k in shard_keys}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
            del tensors
        index = {"metadata": {"total_size": sum(size.values())}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (tmp / CONFIG_NAME).write_text(json.dumps(official_json, indent=2) + "\n", encoding="utf-8")
        if src is not None:
            for f in _source_files(src, {p.name for p in tmp.iterdir()}):
                shutil.copyfile(f, tmp / f.name)  # follows symlinks (HF cache snapshots are links)
        if out.exists():  # overwrite: swap via a rename so a crash never leaves out_dir half-written
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
