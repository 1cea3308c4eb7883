"""Resume under another world size or engine: a world-size-independent view of a saved checkpoint.

Checkpoints keep their native per-engine form (single: model.safetensors + optimizer.pt; DeepSpeed: its own
per-rank ZeRO partitions), so a resume with the same world size and engine stays bitwise exact and nothing
is written twice. Only when the world size, the engine kind or the ZeRO stage differ does `read_portable`
assemble, per parameter NAME, the fp32 weight and the Adam state (exp_avg, exp_avg_sq, step) from whatever
form was saved, and `load_portable` writes them into the new engine's own layout (a ZeRO rank keeps only its
partition). The files are opened memory-mapped and a parameter is assembled only when it is loaded, so no
rank holds a second full copy of the optimizer state.

DeepSpeed ZeRO-1/2 partitions are cut with the `param_slice_mappings` DeepSpeed saves next to them (the
fragment of each parameter in each rank's flat partition, what its universal checkpoint uses); ZeRO-3's
with the per-parameter partition layout (every parameter padded and split in equal slices, rank order).
DeepSpeed's optimizer files hold a few of its own objects (loss scaler, ZeRO stage enum): they are read with
torch.load(weights_only=True) and exactly those classes allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

PARAM_NAMES = "param_names.json"  # single engine: the parameter names of every optimizer group, in order
MOMENTS = ("exp_avg", "exp_avg_sq")


class PortableError(ValueError):
    """A checkpoint that cannot be resumed under another world size / engine (names the file and why)."""


class PortableState:
    """Per-name view of one checkpoint: `weight(name)` (fp32 master weight, or the saved tensor for frozen
    parameters and buffers), `moment(name, key)`, `step` (Adam's step count), `scheduler` (LambdaLR state)."""

    def __init__(self, source: str, step: int, scheduler: dict[str, Any] | None, n_groups: int) -> None:
        self.source, self.step, self.scheduler, self.n_groups = source, step, scheduler, n_groups

    def names(self) -> list[str]:
        raise NotImplementedError

    def trainable(self) -> set[str]:
        raise NotImplementedError

    def weight(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def moment(self, name: str, key: str) -> torch.Tensor | None:
        raise NotImplementedError


# ------------------------------------------------------------------------------------- single engine
class _SingleState(PortableState):
    def __init__(self, ckpt: Path) -> None:
        from safetensors import safe_open

        from train.checkpoint import load_json_file, load_torch_file, reading  # errors name the file

        names_file = ckpt / PARAM_NAMES
        if not names_file.is_file():
            raise PortableError(f"{ckpt}: no {PARAM_NAMES} (written by newer versions); this checkpoint can only be "
                                "resumed with the world size and engine it was saved with")
        groups = load_json_file(names_file)
        opt = load_torch_file(ckpt / "optimizer.pt", map_location="cpu", mmap=True)
        sched = load_torch_file(ckpt / "scheduler.pt", map_location="cpu")
        if len(groups) != len(opt["param_groups"]):
            raise PortableError(f"{ckpt}: {PARAM_NAMES} lists {len(groups)} groups, optimizer.pt has "
                                f"{len(opt['param_groups'])}")
        self._state: dict[str, dict[str, torch.Tensor]] = {}
        steps = set()
        for names, g in zip(groups, opt["param_groups"]):
            for name, idx in zip(names, g["params"]):
                st = opt["state"].get(idx)
                if st:
                    self._state[name] = st
                    steps.add(int(float(st["step"])))
        self._trainable = {n for names in groups for n in names}
        with reading(ckpt / "model.safetensors"):
            self._file = safe_open(str(ckpt / "model.safetensors"), framework="pt")  # memory-mapped, read per tensor
        super().__init__(str(ckpt), max(steps) if steps else 0, sched, len(groups))

    def names(self) -> list[str]:
        return list(self._file.keys())

    def trainable(self) -> set[str]:
        return set(self._trainable)

    def weight(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    def moment(self, name: str, key: str) -> torch.Tensor | None:
        st = self._state.get(name)
        return None if st is None else st[key]


# ------------------------------------------------------------------------------------------- DeepSpeed
def _ds_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _ds_load(path: Path) -> dict[str, Any]:
    with torch.serialization.safe_globals(_ds_safe_globals()):
        try:
            return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except Exception as e:  # noqa: BLE001 - name the file; the cause is chained
            raise PortableError(f"{path}: cannot read this DeepSpeed checkpoint file: {e}") from e


def _rank_files(d: Path, suffix: str) -> list[Path]:
    """`*zero_pp_rank_R_mp_rank_00_<suffix>` in rank order (bf16_ prefix for DeepSpeed's bf16 optimizer)."""
    found = {}
    for f in d.glob(f"*zero_pp_rank_*_mp_rank_00_{suffix}"):
        r = int(f.name.split("zero_pp_rank_")[1].split("_")[0])
        found[r] = f
    if sorted(found) != list(range(len(found))) or not found:
        raise PortableError(f"{d}: expected zero_pp_rank_0.._N {suffix} files, found ranks {sorted(found)}")
    return [found[r] for r in range(len(found))]


class _ZeroState(PortableState):
    def __init__(self, ckpt: Path) -> None:
        d = ckpt / "deepspeed"
        optim = [_ds_load(f)["optimizer_state_dict"] for f in _rank_files(d, "optim_states.pt")]
        self.world = len(optim)
        self.stage = int(optim[0].get("zero_stage", 1))  # DeepSpeed's bf16 optimizer (ZeRO-1) does not save it
        if self.stage == 3:
            models = [_ds_load(f) for f in _rank_files(d, "model_states.pt")]
        else:
            models = [_ds_load(d / "mp_rank_00_model_states.pt")]
        m0 = models[0]
        self._shapes: list[dict[str, Any]] = list(m0["param_shapes"])
        self._module = m0.get("module") or {}
        self._buffers = set(m0.get("buffer_names") or [])
        base = [o["base_optimizer_state"] if self.stage != 3 else o["optimizer_state_dict"] for o in optim]
        self._optim, self._base = optim, base
        self._where: dict[str, int] = {n: i for i, shapes in enumerate(self._shapes) for n in shapes}
        self._frozen_shapes = dict(m0.get("frozen_param_shapes") or {})
        self._frozen = [m.get("frozen_param_fragments") or {} for m in models]
        if self.stage == 3:
            self._z3_offsets()
        steps = {int(float(st["step"])) for st in base[0]["state"].values() if "step" in st}
        super().__init__(str(d), max(steps) if steps else 0, m0.get("lr_scheduler"), len(self._shapes))

    # ZeRO-3: every rank's flat group is its slice of each parameter in turn; slice = ceil(numel / world)
    def _z3_offsets(self) -> None:
        self._z3: dict[str, tuple[int, int, int]] = {}  # name -> (sub-group, offset, partition numel)
        for i, shapes in enumerate(self._shapes):
            off = 0
            for name, shape in shapes.items():
                part = math.ceil(math.prod(shape) / self.world)
                self._z3[name] = (i, off, part)
                off += part

    def names(self) -> list[str]:
        return [*self._where, *self._frozen_shapes, *(k for k in self._module if k not in self._where
                                                     and k not in self._frozen_shapes)]

    def trainable(self) -> set[str]:
        return set(self._where)

    def _flat(self, r: int, i: int, key: str | None) -> torch.Tensor:
        if key is None:
            o = self._optim[r]
            groups = o.get("single_partition_of_fp32_groups") or o.get("fp32_flat_groups")
            return groups[i]
        return self._base[r]["state"][i][key]

    def _assemble(self, name: str, key: str | None) -> torch.Tensor:
        i = self._where[name]
        shape = self._shapes[i][name]
        if self.stage == 3:
            g, off, part = self._z3[name]
            full = torch.cat([self._flat(r, g, key).narrow(0, off, part) for r in range(self.world)])
        else:
            pieces = []
            for r in range(self.world):
                frag = self._optim[r]["param_slice_mappings"][i].get(name)
                if frag is not None and frag.numel > 0:
                    pieces.append(self._flat(r, i, key).narrow(0, frag.start, frag.numel))
            full = torch.cat(pieces)
        n = math.prod(shape)
        if full.numel() < n:
            raise PortableError(f"{self.source}: {name}: assembled {full.numel()} of {n} elements from {self.world} "
                                "ranks; the checkpoint is incomplete")
        return full[:n].reshape(tuple(shape)).clone()

    def weight(self, name: str) -> torch.Tensor:
        if name in self._where:
            return self._assemble(name, None)
        if name in self._frozen_shapes and self.stage == 3:
            shape = self._frozen_shapes[name]
            full = torch.cat([f[name].reshape(-1) for f in self._frozen])
            return full[:math.prod(shape)].reshape(tuple(shape)).clone()
        if name in self._module:
            return self._module[name]
        raise PortableError(f"{self.source}: no tensor {name!r} in the checkpoint")

    def moment(self, name: str, key: str) -> torch.Tensor | None:
        if name not in self._where:
            return None
        return self._assemble(name, key)


def read_portable(ckpt: Path, meta: dict[str, Any]) -> PortableState:
    """The per-name view of checkpoint `ckpt` (its trainer_state.json is `meta`)."""
    if meta["engine"] == "single":
        return _SingleState(ckpt)
    if meta["engine"] == "deepspeed":
        return _ZeroState(ckpt)
    raise PortableError(f"{ckpt}: engine {meta['engine']!r} has no portable reader")


# -------------------------------------------------------------------------------------------- loading
def _check_names(st: PortableState, module: torch.nn.Module, trainable: list[str]) -> None:
    have = set(st.names())
    want = [n for n, _ in module.named_parameters()]
    missing = [n for n in want if n not in have]
    if missing:
        raise PortableError(f"{st.source}: {len(missing)} model parameters are not in the checkpoint "
                            f"(e.g. {missing[:3]}); was it saved by a different model config?")
    untrained = [n for n in trainable if n not in st.trainable()]
    if untrained:
        raise PortableError(f"{st.source}: {len(untrained)} parameters trainable now were frozen when it was saved "
                            f"(e.g. {untrained[:3]}): no optimizer state to continue; keep train.freeze / "
                            "lora settings as they were")


def _step(st: PortableState, group: dict[str, Any], like: torch.Tensor, as_tensor: bool) -> Any:
    """Adam's step as torch keeps it: a float32 scalar, on the parameter's device for fused / capturable
    AdamW, else on the CPU (DeepSpeedCPUAdam: a plain int)."""
    if not as_tensor:
        return int(st.step)
    on_device = bool(group.get("fused")) or bool(group.get("capturable"))
    return torch.tensor(float(st.step), dtype=torch.float32, device=like.device if on_device else "cpu")


def _adam_state(st: PortableState, name: str, like: torch.Tensor, step: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"step": step}
    for k in MOMENTS:
        m = st.moment(name, k)
        if m is None:
            raise PortableError(f"{st.source}: no optimizer state {k!r} for {name}")
        out[k] = m.to(device=like.device, dtype=torch.float32).reshape(like.shape).clone()
    return out


def _set_lrs(scheduler: Any, st: PortableState) -> None:
    if st.scheduler is None:
        raise PortableError(f"{st.source}: no LR scheduler state saved")
    groups = scheduler.optimizer.param_groups
    if len(st.scheduler.get("base_lrs", [])) != len(groups):
        raise PortableError(f"{st.source}: saved LR schedule has {len(st.scheduler.get('base_lrs', []))} parameter "
                            f"groups, this run's optimizer {len(groups)}; were optim.llrd / freezing changed?")
    scheduler.load_state_dict(st.scheduler)
    for g, lr in zip(groups, scheduler.get_last_lr()):
        g["lr"] = lr  # LambdaLR.load_state_dict restores its counters, not the groups' current LRs


@torch.no_grad()
def _load_torch(module: torch.nn.Module, optimizer: torch.optim.Optimizer, st: PortableState) -> None:
    names = {id(p): n for n, p in module.named_parameters()}
    trainable = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    _check_names(st, module, trainable)
    have = set(st.names())
    module.load_state_dict({k: st.weight(k) if k in have else v for k, v in module.state_dict().items()})
    for g in optimizer.param_groups:
        for p in g["params"]:
            optimizer.state[p] = _adam_state(st, names[id(p)], p, _step(st, g, p, as_tensor=True))


@torch.no_grad()
def _load_zero(engine: Any, st: PortableState) -> None:
    """ZeRO-1/2/3: every rank writes its partition of the module weights, the fp32 master weights and the
    Adam moments through DeepSpeed's tensor-fragment API (`safe_set_full_*`)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ds, stage = engine.ds, engine.zero_stage
    zopt = ds.optimizer
    module = engine.module
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    _check_names(st, module, trainable)
    base = zopt.optimizer  # our torch AdamW (or DeepSpeedCPUAdam) over the flat fp32 partitions
    as_tensor = isinstance(base, torch.optim.AdamW)
    flags = {"fused": any(g.get("fused") for g in base.param_groups),
             "capturable": any(g.get("capturable") for g in base.param_groups)}
    if stage == 3:
        flats = zopt.fp32_partitioned_groups_flat
    else:  # ZeRO-1/2 optimizer, or DeepSpeed's BF16_Optimizer (bf16 ZeRO-1)
        flats = getattr(zopt, "single_partition_of_fp32_groups", None) or zopt.fp32_groups_flat_partition
    for flat in flats:  # Adam state is created lazily at the first step: create it now, then fill it
        st_flat = base.state.setdefault(flat, {})
        st_flat["step"] = _step(st, flags, flat, as_tensor)
        for k in MOMENTS:
            if k not in st_flat:
                st_flat[k] = torch.zeros_like(flat)
    if stage != 3:
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()
    for name, p in module.named_parameters():
        w = st.weight(name)
        if stage == 3:
            _copy_into_partition(p, w)
        else:
            p.data.copy_(w.reshape(p.shape))
        if p.requires_grad:
            safe_set_full_fp32_param(p, w.to(device=p.device, dtype=torch.float32).reshape(-1))
            for k in MOMENTS:
                m = st.moment(name, k)
                safe_set_full_optimizer_state(p, m.to(device=p.device, dtype=torch.float32).reshape(-1), k)
    have = set(st.names())
    for bname, b in module.named_buffers():
        if bname in have:
            b.copy_(st.weight(bname))
    ds.global_steps = st.step
    ds.global_samples = st.step * ds.train_batch_size()
    ds.skipped_steps = 0
    engine._last_global_steps = ds.global_steps


def _copy_into_partition(param: torch.Tensor, t: torch.Tensor) -> None:
    """ZeRO-3: this rank's equal slice [r * n, (r + 1) * n) of the flattened, padded parameter."""
    import torch.distributed as dist

    local = param.ds_tensor
    n = int(local.ds_numel)
    start = n * dist.get_rank(group=param.ds_process_group)
    flat = t.reshape(-1)
    count = max(0, min(n, flat.numel() - start))
    if count:
        local.narrow(0, 0, count).copy_(flat.narrow(0, start, count))


def load_portable(engine: Any, st: PortableState) -> None:
    """Write a portable state into `engine` (collective-free; every rank calls it)."""
    if engine.kind == "deepspeed" and getattr(engine, "zero_stage", 0) >= 1:
        _load_zero(engine, st)
    elif engine.kind == "deepspeed":
        raise PortableError(f"{st.source}: resuming into DeepSpeed ZeRO-0 from another world size is not supported; "
                            "use engine=zero1/zero2/zero3 or engine=single")
    else:
        _load_torch(engine.module, engine.optimizer, st)
    _set_lrs(engine.scheduler, st)


def param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of every optimizer group's parameters, in order (what optimizer.pt indexes by position)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


# ----------------------------------------------------------------------------------------------- data
def resplit_data(data: Any, states: list[dict[str, Any] | None], step: int) -> dict[str, Any] | None:
    """Continue the data stream of the whole old world on this rank of the new one; returns what was not
    carried over exactly (None for nothing to say). Synthetic batches are a pure function of the global
    sample index: after `step` optimizer steps the new split continues at the same rows."""
    if data is None or all(s is None for s in states):
        return None
    if hasattr(data, "load_resplit"):
        return data.load_resplit(states)
    if all(set(s) == {"pos"} for s in states) and hasattr(data, "accum"):  # train.synthetic.SyntheticBatches
        data.load_state_dict({"pos": step * int(data.accum)})
        return {"from_ranks": len(states), "exact": True}
    raise PortableError(f"data stream {type(data).__name__} cannot be re-split over another world size")
