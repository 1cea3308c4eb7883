"""recipe config -> (model, data, engine): the pieces the loop runs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from train.config import ConfigError, model_cfg, resolve_grad_accum
from train.distributed import DistInfo, barrier
from train.freeze import apply_freeze

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ model
def uses_zero_init(cfg: DictConfig) -> bool:
    """ZeRO-3 builds the model partitioned (deepspeed.zero.Init) unless engine.zero_init=false."""
    e = cfg.engine
    return e.kind == "deepspeed" and int(e.zero_stage) == 3 and bool(e.zero_init)


def _zero_init_context(cfg: DictConfig, info: DistInfo) -> Any:
    """deepspeed.zero.Init for this run's DeepSpeed config, creating every tensor on the CPU in fp32 as the
    plain path does (same random draws whatever the accelerator); each module's parameters are cast to the
    run's dtype, moved to the device and partitioned as soon as that module's __init__ returns, so a rank
    never holds more than one module's full weights."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    from train.engine import deepspeed_config, resolve_precision

    class _Init(deepspeed.zero.Init):
        def _post_init_method(self, module: torch.nn.Module) -> None:
            for p in module.parameters(recurse=False):
                if not is_zero_param(p) and p.is_floating_point():
                    p.data = p.data.to(self.dtype)  # what DeepSpeed's bf16 cast does on the plain path
            super()._post_init_method(module)
            # torch's MultiheadAttention zeroes its child out_proj's bias in its own __init__, after zero.Init
            # has partitioned out_proj: redo it on this rank's slice (zeros: no gather needed)
            if isinstance(module, torch.nn.MultiheadAttention) and module.out_proj.bias is not None:
                with torch.no_grad():
                    module.out_proj.bias.ds_tensor.zero_()

    import torch.distributed as dist

    ds_config = deepspeed_config(cfg, dist.get_world_size(), resolve_precision(cfg, info.device))
    return _Init(config_dict_or_path=ds_config, tensor_overrides=[])


def _apply_lora(cfg: DictConfig, model: torch.nn.Module, info: DistInfo | None) -> None:
    """Q-LoRA's 4-bit base (lora.qlora), then the adapters. Under zero.Init the base is already partitioned:
    each linear is gathered alone to be quantised (train/qlora.py keeps the 4-bit weights out of ZeRO), and
    the parameters created here (adapters, 4-bit layers' biases) are partitioned at once, cast to the run's
    dtype as zero.Init would, so a rank holds only its slices of them too."""
    from train.engine import resolve_precision
    from train.lora import apply_lora
    from train.qlora import quantize_llm_4bit

    lo = cfg.lora
    device = info.device if info is not None else torch.device("cpu")
    dtype = torch.bfloat16 if resolve_precision(cfg, device) == "bf16" else torch.float32
    if lo.qlora:
        n = quantize_llm_4bit(model, compute_dtype=dtype, device=device, quant_type=lo.quant_type,
                              double_quant=lo.double_quant)
        from train.qlora import base_4bit_tensors

        nbytes = sum(t.numel() * t.element_size() for t in base_4bit_tensors(model).values())
        log.info("lora.qlora: %d LLM linears quantised to %s (double quant %s): %.1f MiB of packed 4-bit weights, "
                 "replicated on every rank", n, lo.quant_type, lo.double_quant, nbytes / 2**20)
    # the adapters' random init must not depend on how the base's init drew from the RNG (zero.Init or not)
    torch.manual_seed(cfg.train.seed + 1)
    apply_lora(model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, targets=list(lo.targets),
               train_modules=list(lo.train_modules), modules_to_save=list(lo.modules_to_save),
               rslora=lo.rslora, dora=lo.dora)
    if uses_zero_init(cfg):
        from deepspeed.runtime.zero.partition_parameters import is_zero_param

        params = list(model.parameters())
        new = [p for p in params if not is_zero_param(p)]
        anchor = next((p for p in params if is_zero_param(p)), None)
        if new and anchor is not None:
            for p in new:
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
            anchor.convert_to_zero_parameters(param_list=new)


def build_model(cfg: DictConfig, info: DistInfo | None = None) -> torch.nn.Module:
    """QwenVL from the config, initial weights per `init`, stage freezing (or LoRA adapters) applied.
    Under ZeRO-3 (`uses_zero_init`; `info` required) the parameters are partitioned as they are created and
    initial weights are streamed into each rank's partitions."""
    import contextlib

    from train.model import official
    from train.model.families import get_family

    family = get_family(str(cfg.model.family))
    ctx: Any = contextlib.nullcontext()
    if uses_zero_init(cfg):
        if info is None:
            raise ValueError("build_model: ZeRO-3 with engine.zero_init=true needs the DistInfo (initialised "
                             "process group)")
        ctx = _zero_init_context(cfg, info)
    torch.manual_seed(cfg.train.seed)  # identical random init on every rank
    with ctx:
        model = family.build_model(model_cfg(cfg))
    init = cfg.init
    load = family.checkpoint.fn("load")  # the family's checkpoint layout (validate() refuses the others)
    for key, fn in (("official", load), ("from_stage_dir", load),
                    ("openclip", official.load_openclip_vision), ("qwen_llm", official.load_qwen_llm)):
        path = init.get(key)
        if path:
            if not Path(path).exists():
                raise FileNotFoundError(f"init.{key}={path}: no such file or directory")
            report = fn(model, path)
            log.info("init.%s: loaded %d tensors from %s", key, len(report.loaded), path)
    lo = cfg.lora
    if lo.enabled:
        _apply_lora(cfg, model, info)
    else:
        apply_freeze(model, list(cfg.train.freeze))
    return model


# ---------------------------------------------------------------------------------------------- inputs
def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _check_shards(key: str, spec: str) -> None:
    from data.loader import LoaderError, expand_source

    try:
        shards = expand_source(spec)
    except LoaderError as err:
        raise ConfigError(f"{key}={spec}: {err}") from err
    if not shards:
        raise ConfigError(f"{key}={spec}: the spec expands to no shard")
    missing = [s for s in shards if not _is_remote(s) and not Path(s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(shards)})" if len(missing) > 1 else ""
        raise ConfigError(f"{key}={spec}: shard {missing[0]} does not exist{more}")


def check_inputs(cfg: DictConfig) -> None:
    """Every path the run will read (shards, held-out shards, initial weights, a resume checkpoint) exists,
    checked before the model is built; the message names the key and the path. Remote shards (URLs,
    `pipe:`) are checked when they are opened."""
    d = cfg.data
    _configure_remote(d)  # a remote manifest is fetched here already
    if d.kind == "shards":
        for i, src in enumerate(d.sources):
            _check_shards(f"data.sources.{i}.shards (source {src.name!r})", str(src.shards))
        for task, spec in d.heldout.items():
            _check_shards(f"data.heldout.{task}", str(spec))
    for key in ("official", "from_stage_dir", "openclip", "qwen_llm"):
        path = cfg.init.get(key)
        if path and not Path(path).exists():
            raise ConfigError(f"init.{key}={path}: no such file or directory")
    resume = str(cfg.train.resume)
    if resume not in ("auto", "never") and not Path(resume).exists():
        raise ConfigError(f"train.resume={resume}: no such checkpoint directory")


# ------------------------------------------------------------------------------------------------- data
def prepare_data(cfg: DictConfig, info: DistInfo) -> None:
    """Build the demo corpus once (rank 0) when the recipe asks for it."""
    d = cfg.data.demo
    if d.enabled:
        if info.is_main:
            from data.demo import build_demo

            build_demo(d.dir, seed=d.seed, scale=d.scale)
        barrier()


def _configure_remote(d: DictConfig) -> None:
    from data import remote

    remote.configure(timeout_s=float(d.remote_timeout_s), retries=int(d.remote_retries))  # per process


def _stage_stream(cfg: DictConfig, sources: Any, *, rank: int, world: int, batch_size: int, train: bool,
                  seed: int) -> Any:
    from data.pipeline import build_stage_stream

    d = cfg.data
    _configure_remote(d)
    options = OmegaConf.to_container(d.options, resolve=True)
    # the family's image geometry: Qwen-VL's square image_size, Qwen2-VL's resize limits (model.preprocess)
    m = cfg.model
    geometry: dict[str, Any] = {"image_size": m.vision.image_size} if "image_size" in m.vision else {
        "image_size": None, "min_pixels": m.preprocess.min_pixels, "max_pixels_resize": m.preprocess.max_pixels,
        "patch_size": m.preprocess.patch_size, "merge_size": m.preprocess.merge_size}
    # train=False: one pass, no shuffling, inline processing (held-out evaluation)
    return build_stage_stream(cfg.train.stage, sources, family=str(m.family), **geometry, seq_len=d.seq_len,
                              batch_size=batch_size, seed=seed, rank=rank, world_size=world, train=train,
                              buffer_size=d.buffer_size, num_workers=d.num_workers if train else 0,
                              prefetch_batches=d.prefetch_batches if train else 0,
                              strict=d.strict, **options)


def build_train_data(cfg: DictConfig, info: DistInfo) -> Any:
    """Iterable of collated batches (DESIGN.md) with state_dict/load_state_dict/stats for this rank."""
    d, m = cfg.data, cfg.model
    if d.kind == "synthetic":
        from train.synthetic import for_model

        return for_model(m, seed=d.seed, seq_len=d.seq_len, micro_batch=cfg.train.micro_batch_size,
                         grad_accum=resolve_grad_accum(cfg, info.world_size), rank=info.rank,
                         world_size=info.world_size)
    sources = [OmegaConf.to_container(s, resolve=True) for s in d.sources]
    return _stage_stream(cfg, sources, rank=info.rank, world=info.world_size,
                         batch_size=cfg.train.micro_batch_size, train=True, seed=d.seed)


def build_heldout(cfg: DictConfig) -> dict[str, Callable[[], Iterable[dict[str, Any]]]]:
    """task -> factory of a fresh held-out batch iterable. Every rank reads the same batches (rank 0 of 1),
    so ZeRO-3's collective forward stays in step; only rank 0 reports."""
    d = cfg.data
    bs = cfg.eval.batch_size or cfg.train.micro_batch_size
    if d.kind == "synthetic":
        from train.synthetic import for_model

        def synth() -> Iterable[dict[str, Any]]:
            return for_model(cfg.model, seed=d.seed + 7919, seq_len=d.seq_len, micro_batch=bs, grad_accum=1,
                             rank=0, world_size=1)

        return {"synthetic": synth}
    out = {}
    for task, spec in d.heldout.items():
        out[task] = (lambda spec=spec, task=task: _stage_stream(
            cfg, [{"name": task, "shards": spec}], rank=0, world=1, batch_size=bs, train=False, seed=d.seed))
    return out
