"""The training loop: build -> (resume) -> held-out eval -> steps (log, checkpoint) -> final save,
official-layout export, held-out eval again."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig

from train import distributed
from train.build import build_heldout, build_model, build_train_data, check_inputs, prepare_data
from train.checkpoint import CheckpointManager, step_dir_name
from train.config import model_cfg, to_yaml
from train.engine import Engine, build_engine
from train.flops import FlopsModel, causal_pairs, mfu, resolve_peak_flops
from train.freeze import MODULES, freeze_table, set_train_mode
from train.metrics import MetricsLogger, memory_stats, per_task_losses
from train.model.loss import IGNORE_INDEX
from train.model.qwen_vl import shift_targets
from train.periodic_eval import run_protocols

log = logging.getLogger("train")
N_TASK_SLOTS = 16
# test hook: SIGKILL this process right after optimizer step N (simulates a crash: no cleanup at all)
KILL_ENV = "QWENVL_DEBUG_SIGKILL_AT_STEP"
# test hook: make rank 0's loss NaN at these optimizer steps ("3", "3,4", "3-7"), as a bad batch would
NAN_ENV = "QWENVL_DEBUG_NAN_AT_STEPS"


class EmptyHeldout(RuntimeError):
    """A held-out split gave no target token: a 0.0 loss over nothing would look like a result."""


class NonFiniteRun(RuntimeError):
    """train.max_nonfinite_steps optimizer steps in a row had a NaN/inf loss or gradient norm."""


class DataStreamError(RuntimeError):
    """The training data stream cannot go on (data.loader.LoaderError), e.g. no usable sample in a whole pass."""


def _steps_from_env(name: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, os.environ.get(name, "").split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _say(info: distributed.DistInfo, msg: str) -> None:
    if info.is_main:
        print(msg, flush=True)


@torch.no_grad()
def evaluate(engine: Engine, heldout: dict[str, Any], max_batches: int) -> dict[str, dict[str, float]]:
    """Held-out loss per task: token-weighted mean over at most max_batches batches."""
    engine.module.eval()
    out = {}
    for task, make in heldout.items():
        loss_sum, n_tok, n_batches = 0.0, 0, 0
        it = make()
        try:
            for batch in islice(iter(it), max_batches):
                res = engine.forward(batch)
                loss_sum += float(res.loss_sum)
                n_tok += int(res.n_tokens)
                n_batches += 1
        finally:
            if hasattr(it, "close"):
                it.close()
        if n_tok == 0:
            skipped = it.stats().get("skipped", {}) if hasattr(it, "stats") else {}
            raise EmptyHeldout(f"held-out split {task!r} (data.heldout.{task}) gave no target token in "
                               f"{n_batches} batches: its shards hold no usable sample (skipped: {skipped})")
        out[task] = {"loss": loss_sum / n_tok, "tokens": n_tok, "batches": n_batches}
    return out


def eval_table(before: dict[str, dict[str, float]] | None, after: dict[str, dict[str, float]] | None) -> str:
    tasks = list((after or before or {}).keys())
    rows = [("task", "loss before", "loss after", "tokens")]
    for t in tasks:
        b = f"{before[t]['loss']:.4f}" if before and t in before else "-"
        a = f"{after[t]['loss']:.4f}" if after and t in after else "-"
        rows.append((t, b, a, str(int((after or before)[t]["tokens"]))))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


class StopNow(BaseException):
    """Raised by the StopRequest handler when a stop signal arrives outside a step (waiting for data, evaluating):
    there is no step boundary to wait for. A BaseException so that no ``except Exception`` on the way (the data
    pipeline wraps map errors) turns it into a failure."""


class Boundary(NamedTuple):
    """What a stop outside a step checkpoints: the last completed step and the state that goes with it."""

    step: int
    data_state: Any
    counters: dict[str, float]
    losses: list[float]


class StopRequest:
    """Records SIGTERM / SIGUSR1 / SIGINT instead of dying mid-step; the loop checkpoints at the step boundary.

    Inside a step (`in_step`, set by the loop around the optimizer step and its checkpoint) the signal is
    recorded and the step finishes. Outside one (a data wait, periodic evaluation) an `interruptible` request
    raises StopNow at once: a stream that never yields would otherwise never reach a boundary. `boundary()`
    records the last completed step and the data state that goes with it, so the run can still checkpoint it
    (train: only when that step is newer than the last checkpoint). The first Ctrl-C (SIGINT) behaves like
    SIGTERM; a second one aborts at once (KeyboardInterrupt, no checkpoint). Installed only in the main thread
    (signal handlers cannot be set elsewhere); restored by `restore`."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, interruptible: bool = True) -> None:
        self.signum: int | None = None
        # multi-rank: one rank leaving early while the others sit in a collective would hang them, so there
        # the signal always waits for the step boundary (where the stop flag is all-reduced)
        self.interruptible = interruptible
        self.in_step = False
        self.last: Boundary | None = None  # the last completed step and its data state
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def boundary(self, step: int, data: Any, counters: dict[str, float], losses: list[float]) -> None:
        """Between steps: what a stop outside a step checkpoints. Leaves the step (`in_step` False)."""
        if self.interruptible:  # the snapshot is only used by a stop outside a step (single process)
            state = data.state_dict() if hasattr(data, "state_dict") else None
            # one attribute store: a signal arriving mid-update never pairs a new step with an old data state
            self.last = Boundary(step, state, dict(counters), losses)
        self.in_step = False

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second Ctrl-C: aborting without a checkpoint")
        now = self.interruptible and not self.in_step and self.last is not None
        if self.signum is None:
            if now:
                print(f"[train] received {signal.Signals(signum).name} outside a step (waiting for data or "
                      f"evaluating): stopping now", flush=True)
            else:
                how = "Ctrl-C again to abort at once" if signum == signal.SIGINT else "checkpointing after this step"
                print(f"[train] received {signal.Signals(signum).name}: finishing this step and checkpointing "
                      f"({how})", flush=True)
        self.signum = signum
        if now:
            self.interruptible = False  # a second signal while the run stops must not interrupt its checkpoint
            raise StopNow(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        """What the process should exit with: 130 after Ctrl-C (the shell convention), else 0."""
        return 130 if self.signum == signal.SIGINT else 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# [loss_sum, n_tokens, samples, non-pad tokens, total tokens, images, causal attention pairs, out_of_time,
#  stop_asked] + per task
_SLOTS = ("loss_sum", "n_tokens", "samples", "real_tokens", "all_tokens", "images", "attn_pairs", "out_of_time",
          "stop_asked")
N_FIXED = len(_SLOTS)


class StepStats:
    """Accumulates one optimizer step's numbers over micro-batches; reduced across ranks once per step,
    together with the stop flags (one collective, one host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.t = torch.zeros(N_FIXED + 2 * N_TASK_SLOTS, dtype=torch.float64, device=device)

    def add(self, out: Any, batch: dict[str, Any]) -> None:
        seg = batch["segment_ids"]
        vals = torch.stack([out.loss_sum.detach().double().to(self.t.device),
                            out.n_tokens.detach().double().to(self.t.device)])
        self.t[0:2] += vals
        pix = batch.get("pixel_values")
        # counted on the CPU batch: no device sync
        host = torch.tensor([float(batch["n_samples"].sum()) if "n_samples" in batch else seg.shape[0],
                             float((seg != 0).sum()), float(seg.numel()),
                             0.0 if pix is None else float(pix.shape[0]), float(causal_pairs(seg))],
                            dtype=torch.float64)
        self.t[2:7] += host.to(self.t.device)
        if out.row_loss_sum is not None and "task_ids" in batch:
            tid = batch["task_ids"].to(self.t.device).clamp(max=N_TASK_SLOTS - 1)
            self.t[N_FIXED:N_FIXED + N_TASK_SLOTS].index_add_(0, tid, out.row_loss_sum.detach().double().to(self.t.device))
            self.t[N_FIXED + N_TASK_SLOTS:].index_add_(0, tid, out.row_n_tokens.detach().double().to(self.t.device))

    def reduce(self, out_of_time: bool, stop_asked: bool) -> dict[str, Any]:
        self.t[7], self.t[8] = float(out_of_time), float(stop_asked)
        t = distributed.all_reduce_sum(self.t).cpu()
        r: dict[str, Any] = {k: float(t[i]) for i, k in enumerate(_SLOTS)}
        r["out_of_time"], r["stop_asked"] = r["out_of_time"] > 0, r["stop_asked"] > 0
        r["tasks"] = torch.stack([t[N_FIXED:N_FIXED + N_TASK_SLOTS], t[N_FIXED + N_TASK_SLOTS:]], 1)
        return r


def count_targets(batch: dict[str, Any]) -> int:
    """Valid target tokens of a (CPU) batch, by the model's own shifting rule (no device sync)."""
    return int((shift_targets(batch["labels"], batch.get("segment_ids")) != IGNORE_INDEX).sum())


def next_window(it: Iterator[dict[str, Any]], accum: int) -> list[dict[str, Any]]:
    """The micro-batches of one optimizer step, read ahead so their token count is known before backward."""
    from data.loader import LoaderError

    try:
        return [next(it) for _ in range(accum)]
    except StopIteration as err:
        raise RuntimeError("training data stream ended early; use an infinite (epochs=None) stream") from err
    except LoaderError as err:  # e.g. no usable sample in a whole pass: the stream cannot go on
        raise DataStreamError(str(err)) from err


def train_step(engine: Engine, window: list[dict[str, Any]], info: distributed.DistInfo,
               poison: bool = False) -> tuple[StepStats, float | None]:
    """One optimizer step over `window`: token-weighted backward of every micro-batch, then the update
    (skipped by the engine when the global grad norm is not finite). `poison`: the NaN test hook."""
    local = torch.tensor([float(sum(count_targets(b) for b in window))], dtype=torch.float64, device=info.device)
    window_tokens = float(distributed.all_reduce_sum(local)[0])  # every rank, every micro-batch
    stats = StepStats(info.device)
    for batch in window:
        out = engine.forward(batch)
        loss = engine.token_weighted(out.loss_sum, window_tokens)
        if poison and info.rank == 0:
            loss = loss * float("nan")
            out = type(out)(**{**out, "loss_sum": out.loss_sum * float("nan")})
        engine.backward(loss)
        stats.add(out, batch)
    return stats, engine.step()


def _step_record(engine: Engine, r: dict[str, Any], grad_norm: float | None, dt: float, step_flops: float,
                 peak_flops: float, counters: dict[str, float], world: int, data: Any) -> dict[str, Any]:
    skipped = data.stats().get("skipped", {}) if hasattr(data, "stats") else {}
    rec = {"loss": r["loss_sum"] / max(r["n_tokens"], 1.0), "lr": engine.lr(),
           "grad_norm": grad_norm if grad_norm is not None else float("nan"),
           "tokens_per_s": r["real_tokens"] / dt, "samples_per_s": r["samples"] / dt,
           "mfu": mfu(step_flops, dt, peak_flops, world),
           "tflops_per_device": step_flops / dt / world / 1e12,
           "padding_fraction": 1.0 - r["real_tokens"] / max(r["all_tokens"], 1.0),
           "step_time_s": dt, "tokens_seen": counters["tokens"], "samples_seen": counters["samples"],
           **per_task_losses(r["tasks"]), **memory_stats(engine.device)}
    flat = _flatten(skipped)
    rec["skipped/total"] = float(sum(flat.values()))  # always present: 0 is worth seeing too
    rec["skipped/nonfinite_step"] = counters.get("nonfinite_steps", 0.0)  # optimizer steps skipped (NaN/inf)
    rec.update({f"skipped/{k}": v for k, v in flat.items()})
    return rec


def _report_build(cfg: DictConfig, model: torch.nn.Module, info: distributed.DistInfo) -> None:
    held, full, nbytes = param_residency(model)
    if info.is_main or cfg.engine.kind == "deepspeed":  # ZeRO-3: each rank holds its own partition
        print(f"[train] rank {info.rank}: holds {held:,} of {full:,} parameter elements ({nbytes / 2**20:.1f} MiB) "
              f"after build; peak RSS {_peak_rss_mib():.0f} MiB", flush=True)
    _say(info, f"[train] parameters (stage {cfg.train.stage}):\n{freeze_table(model)}")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one recipe end to end; returns a summary (rank 0 has the full one)."""
    info = distributed.init(cfg.engine.kind, cfg.engine.device)
    out_dir = Path(cfg.output_dir).resolve()
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    _say(info, f"[train] run {cfg.run_name} -> {out_dir}  (world size {info.world_size}, "
               f"engine {cfg.engine.kind}{'' if cfg.engine.kind == 'single' else f' ZeRO-{cfg.engine.zero_stage}'}, "
               f"device {info.device})")
    prepare_data(cfg, info)
    check_inputs(cfg)  # every path the run reads exists: fail before the model is built
    model = build_model(cfg, info)
    _report_build(cfg, model, info)
    flops = FlopsModel(model, model_cfg(cfg))
    engine = build_engine(cfg, model, info)
    data = build_train_data(cfg, info)
    heldout_skips: Counter[str] = Counter()  # skips of every held-out evaluation pass, for the end-of-run line
    heldout = _counting_skips(build_heldout(cfg), heldout_skips)
    ckpt = CheckpointManager(out_dir, cfg.train.keep_last, info)

    start_step, counters = 0, {"tokens": 0.0, "samples": 0.0}
    resume_from, meta = ckpt.resume(cfg.train.resume, engine, data)  # auto: falls back past unreadable ones
    if resume_from is not None and meta is not None:
        start_step = int(meta["step"])
        counters = meta.get("counters", counters)
        _say(info, f"[train] resumed from {resume_from} at step {start_step}")

    logger = MetricsLogger(cfg, out_dir, info.is_main, int(cfg.train.steps), start_step)
    summary: dict[str, Any] = {"output_dir": str(out_dir), "start_step": start_step, "eval_before": None}
    if cfg.eval.at_start and start_step == 0 and heldout:
        summary["eval_before"] = evaluate(engine, heldout, cfg.eval.max_batches)
        _say(info, "[train] held-out loss at start:\n" + eval_table(summary["eval_before"], None))
        logger.log(0, {f"eval/{k}": v["loss"] for k, v in summary["eval_before"].items()})

    # SLURM / torchrun / preemption ask with SIGTERM (or --signal=USR1@T): finish the step (StopRequest)
    stop = StopRequest(interruptible=info.world_size == 1)
    try:
        step, losses = run_steps(cfg, engine, data, heldout, ckpt, logger, flops, info, start_step, counters,
                                 stop, summary)
    except StopNow:
        step, losses = _stopped_outside_step(engine, ckpt, stop, start_step, summary)
        counters = stop.last.counters if stop.last is not None else counters
    finally:
        stop.restore()
    summary.update(steps_run=step - start_step, final_step=step, losses=losses, exit_code=stop.exit_code)
    if step == int(cfg.train.steps) and "nonfinite_stop" not in summary:
        finish_run(cfg, engine, heldout, ckpt, logger, data, info, step, counters, summary)
    summary["wandb_dir"] = logger.wandb_dir
    summary["metrics_jsonl"] = str(out_dir / "metrics.jsonl") if cfg.logging.jsonl else None
    logger.close()  # W&B run finished and flushed: its files are complete when train() returns
    if info.is_main and cfg.logging.jsonl:
        summary["curves"] = _draw_curves(out_dir)
    summary["skipped"] = _skip_counts(data)
    summary["heldout_skipped"] = dict(sorted(heldout_skips.items()))
    # after a stop in a data wait the stream may sit in a blocked read (a prefetch thread would never join)
    if hasattr(data, "close") and "stopped_outside_step" not in summary:
        data.close()
    _say(info, "[train] done: " + "; ".join(f"{k} {v}" for k, v in _done_paths(summary).items()))
    distributed.barrier()
    if "nonfinite_stop" in summary:
        raise NonFiniteRun(f"run {cfg.run_name} stopped at step {summary['final_step']}: {summary['nonfinite_stop']}")
    return summary


def _skip_counts(data: Any) -> dict[str, int]:
    try:
        flat = _flatten(data.stats().get("skipped", {})) if hasattr(data, "stats") else {}
    except Exception:  # noqa: BLE001 - a stream interrupted mid-read: its counts are not worth failing the run
        return {}
    return {k: int(v) for k, v in sorted(flat.items()) if v}


def _stopped_outside_step(engine: Engine, ckpt: CheckpointManager, stop: StopRequest, start_step: int,
                          summary: dict[str, Any]) -> tuple[int, list[float]]:
    """A stop signal came outside a step: checkpoint the last completed step with the data state taken right
    after it (`StopRequest.boundary`), unless no step completed since the last checkpoint."""
    b = stop.last if stop.last is not None else Boundary(start_step, None, {}, [])
    step = b.step
    last = ckpt.latest()
    if step > start_step and (last is None or last.name != step_dir_name(step)):
        ckpt.save(step, engine, _SavedState(b.data_state), {"counters": b.counters})
        where = f"checkpoint of step {step} saved in {ckpt.root}"
    else:
        where = f"no step since the last checkpoint ({last if last is not None else 'none'}): nothing saved"
    print(f"[train] stop signal received outside a step after step {step}; {where}; stopping "
          "(rerun the same command to resume: train.resume=auto)", flush=True)
    summary["stopped_early"] = summary["stopped_outside_step"] = "stop signal received outside a step"
    return step, b.losses


class _SkipCountingEval:
    """A held-out batch iterable that adds its stream's skip counts to `into` when evaluation closes it."""

    def __init__(self, it: Any, into: Counter[str]) -> None:
        self.it, self.into = it, into

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.it)

    def stats(self) -> dict[str, Any]:
        return self.it.stats() if hasattr(self.it, "stats") else {}

    def close(self) -> None:
        self.into.update(_skip_counts(self.it))
        if hasattr(self.it, "close"):
            self.it.close()


def _counting_skips(heldout: dict[str, Any], into: Counter[str]) -> dict[str, Any]:
    return {task: (lambda make=make: _SkipCountingEval(make(), into)) for task, make in heldout.items()}


class _SavedState:
    """Stands in for the data stream in CheckpointManager.save: the state snapshot of a step boundary."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state


def _done_paths(summary: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": summary["steps_run"], "checkpoints": Path(summary["output_dir"]) / "checkpoints"}
    # occurrences: a sample skipped again in a later epoch is counted again (so are the stream's own resumed
    # counts); held-out evaluation's skips are those of every evaluation pass, summed
    out["skipped samples (occurrences, by reason)"] = summary.get("skipped") or "none"
    if summary.get("heldout_skipped"):
        out["held-out skipped (occurrences over all evaluations)"] = summary["heldout_skipped"]
    for key in ("export", "export_lora", "metrics_jsonl", "curves", "wandb_dir"):
        if summary.get(key):
            out[key.replace("_", " ")] = summary[key]
    return out


def _draw_curves(out_dir: Path) -> str | None:
    """curves.png next to metrics.jsonl; a plotting failure never fails a finished run."""
    try:
        from train.report import write_curves

        return str(write_curves(out_dir))
    except Exception as err:  # noqa: BLE001 - the run is done; say why there is no picture
        log.warning("could not draw %s/curves.png: %s", out_dir, err)
        return None


def run_steps(cfg: DictConfig, engine: Engine, data: Any, heldout: dict[str, Any], ckpt: CheckpointManager,
              logger: MetricsLogger, flops: FlopsModel, info: distributed.DistInfo, start_step: int,
              counters: dict[str, float], stop: StopRequest, summary: dict[str, Any]) -> tuple[int, list[float]]:
    """The optimizer steps from start_step to train.steps (or an earlier stop); returns (last step, losses)."""
    total, t = int(cfg.train.steps), cfg.train
    # modules without a trainable parameter (train.freeze, or everything but the adapters under LoRA)
    frozen = [m for m in MODULES if not any(p.requires_grad for p in getattr(engine.module, m).parameters())]
    it = iter(data)
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    poison_at = _steps_from_env(NAN_ENV)
    peak = resolve_peak_flops(info.device, engine.precision, cfg.logging.peak_flops)  # for MFU; measured once
    t_start = time.time()
    step, losses = start_step, []
    streak = 0  # optimizer steps in a row skipped for a non-finite loss / grad norm
    stop.boundary(step, data, counters, losses)  # from here a stop signal outside a step ends the run at once
    while step < total:
        set_train_mode(engine.module, frozen)
        t0 = time.time()
        window = next_window(it, engine.grad_accum)
        stop.in_step = True  # a stop signal from here on waits for this step (and its checkpoint)
        stats, grad_norm = train_step(engine, window, info, poison=step + 1 in poison_at)
        step += 1
        if engine.step_applied:
            streak = 0
        else:
            streak += 1
            counters["nonfinite_steps"] = counters.get("nonfinite_steps", 0.0) + 1
            _say(info, f"[train] step {step}: non-finite loss or gradient norm ({grad_norm}): update skipped on "
                       f"every rank ({streak} in a row; the run stops at train.max_nonfinite_steps={t.max_nonfinite_steps})")
        # any rank out of time or asked to stop -> every rank checkpoints and stops at this same step
        r = stats.reduce(t.max_seconds > 0 and time.time() - t_start > t.max_seconds, stop.signum is not None)
        dt = time.time() - t0
        counters["tokens"] += r["real_tokens"]
        counters["samples"] += r["samples"]
        losses.append(r["loss_sum"] / max(r["n_tokens"], 1.0))
        if step % cfg.logging.every == 0 or step == total or step == start_step + 1 or streak:
            step_flops = flops(r["real_tokens"], r["images"], target_tokens=r["n_tokens"], attn_pairs=r["attn_pairs"])
            logger.log(step, _step_record(engine, r, grad_norm, dt, step_flops, peak, counters, info.world_size, data))
        logger.advance()
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if streak >= t.max_nonfinite_steps:
            last = ckpt.latest()
            summary["nonfinite_stop"] = (f"{streak} optimizer steps in a row (steps {step - streak + 1}-{step}) had a "
                                         "non-finite loss or gradient norm; last good checkpoint: "
                                         f"{last if last is not None else 'none'} (lower optim.lr, check the data of "
                                         "those steps, or raise train.max_nonfinite_steps)")
            break
        halt = r["out_of_time"] or r["stop_asked"]
        # no periodic checkpoint inside a non-finite streak: keep_last must not prune the last good one
        if step < total and ((t.save_every and step % t.save_every == 0 and not streak) or halt):
            ckpt.save(step, engine, data, {"counters": counters})
        if halt:
            why = "train.max_seconds reached" if r["out_of_time"] else "stop signal received"
            _say(info, f"[train] {why} at step {step}; checkpoint saved in {ckpt.root}, stopping "
                       "(rerun the same command to resume: train.resume=auto)")
            summary["stopped_early"] = why
            break
        stop.boundary(step, data, counters, losses)  # step done: the data wait and evaluation are outside a step
        if cfg.eval.every and step % cfg.eval.every == 0 and step < total:
            if heldout:
                res = evaluate(engine, heldout, cfg.eval.max_batches)
                logger.log(step, {f"eval/{k}": v["loss"] for k, v in res.items()})
            run_protocols(cfg, engine, logger, info, step)  # eval.protocols (train/periodic_eval.py); off: no-op
    return step, losses


def finish_run(cfg: DictConfig, engine: Engine, heldout: dict[str, Any], ckpt: CheckpointManager,
               logger: MetricsLogger, data: Any, info: distributed.DistInfo, step: int,
               counters: dict[str, float], summary: dict[str, Any]) -> None:
    """After the last step: final checkpoint, official-layout export, held-out evaluation."""
    summary["checkpoint"] = str(ckpt.save(step, engine, data, {"counters": counters}).resolve())
    if cfg.train.export_final:
        summary["export"] = export_final(cfg, engine, Path(summary["output_dir"]), info)
        if cfg.lora.enabled:
            summary["export_lora"] = str(Path(summary["output_dir"]) / "final_lora")
    if cfg.eval.at_end and heldout:
        after = evaluate(engine, heldout, cfg.eval.max_batches)
        _say(info, "[train] held-out loss (start -> end):\n" + eval_table(summary["eval_before"], after))
        logger.log(step, {f"eval/{k}": v["loss"] for k, v in after.items()})
        logger.summary({f"eval_final/{k}": v["loss"] for k, v in after.items()})
        summary["eval_after"] = after
    scores = run_protocols(cfg, engine, logger, info, step)  # eval.protocols after the last step; off: None
    if scores is not None:
        logger.summary({f"eval_final/{t}/{m}": v for t, ms in scores.items() for m, v in ms.items()})
        summary["protocols_after"] = scores


def export_final(cfg: DictConfig, engine: Engine, out_dir: Path, info: distributed.DistInfo) -> str:
    """Final weights in the official HF layout at <output_dir>/final (ZeRO-3: consolidated first; LoRA:
    adapters merged into the base weights, and the adapters alone under <output_dir>/final_lora)."""
    import inspect

    from train.model.families import get_family

    export = get_family(str(cfg.model.family)).checkpoint.fn("export")  # Qwen-VL: official.export_official
    state = engine.full_state_dict()  # collective under ZeRO-3
    dest = out_dir / "final"
    if info.is_main:
        state = dict(state)
        if cfg.lora.enabled:
            from train.export import expected_keys, lora_base_weights, save_lora_adapters
            from train.lora import lora_scaling, merge_lora_state

            lo = cfg.lora
            save_lora_adapters(state, out_dir / "final_lora", cfg)  # peft's layout (peft.PeftModel loads it)
            # Q-LoRA: merged into the ORIGINAL full-precision base (the state holds no 4-bit weights at all)
            base = lora_base_weights(cfg) if lo.qlora else None
            state = merge_lora_state(state, lora_scaling(lo.r, lo.alpha, lo.rslora), expected_keys(model_cfg(cfg)),
                                     base)
        # config.json keeps the source checkpoint's values (precision flags, NTK, seq_length >= trained length)
        # and its tokenizer / model code files come along, so the export loads where the source loaded
        # (the options a family's export takes: Qwen-VL's source_dir / seq_length have no Qwen2-VL counterpart)
        extra = {"source_dir": cfg.init.from_stage_dir or cfg.init.official, "seq_length": cfg.data.seq_len}
        takes = inspect.signature(export).parameters
        export(state, dest, cfg=model_cfg(cfg), overwrite=True, **{k: v for k, v in extra.items() if k in takes})
    distributed.barrier()
    return str(dest.resolve())


def param_residency(model: torch.nn.Module) -> tuple[int, int, int]:
    """(parameter elements this rank holds, elements of the full model, bytes held): under ZeRO-3 a
    partitioned parameter holds only its slice (`ds_tensor`) and `ds_numel` is its full size."""
    held = full = nbytes = 0
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)
        t = p.data if local is None else local
        held += t.numel()
        nbytes += t.numel() * t.element_size()
        full += int(getattr(p, "ds_numel", p.numel()))
    return held, full, nbytes


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out
