"""One optimizer step's gradient is the per-token gradient of the whole global batch, whatever the split
into micro-batches, accumulation steps and ranks (single engine, DeepSpeed ZeRO-2 and ZeRO-3, 2 processes).

The gradient is read back from the weights: with weight decay 0, no clipping and Adam's eps huge (eps = lr
= 1e6) the first AdamW update is -lr * g / (|g| + eps) = -g to ~1e-9 relative, so `before - after` is the
step's gradient on every engine, taken from the run's official-layout export. Synthetic rows hold 16-48
target tokens each, so micro-batches differ in target count and a mean of per-micro-batch means (what
main did before) is off by a few percent: the test checks it can tell the two apart."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
from launching import clean_env, run_group
from safetensors.torch import load_file

from train.build import build_model
from train.config import load_config
from train.model.official import load_official
from train.synthetic import SyntheticBatches

GLOBAL = 4
COMMON = ["recipe=demo_stage2", "data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56",
          "data.seq_len=300", "train.steps=1", "train.save_every=0", "logging=quiet", "init.from_stage_dir=null",
          "eval.at_start=false", "eval.at_end=false", "train.export_final=true", "optim.lr=1e6", "optim.eps=1e6",
          "optim.min_lr=0", "optim.weight_decay=0", "optim.grad_clip=0", "optim.warmup_steps=0",
          "optim.schedule=constant", "optim.llrd=1.0", f"train.global_batch_size={GLOBAL}", "eval.max_batches=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(micro: int, accum: int, world: int) -> list[dict]:
    """Every micro-batch of step 1, over all ranks."""
    m = load_config(COMMON).model
    out = []
    for rank in range(world):
        sb = SyntheticBatches(seed=0, seq_len=300, micro_batch=micro, grad_accum=accum, rank=rank, world_size=world,
                              image_size=56, n_queries=m.adapter.n_queries, img_start=m.ids.img_start,
                              img_end=m.ids.img_end, img_pad=m.ids.img_pad, eod=m.ids.eod)
        out += [sb.make(k) for k in range(accum)]
    return out


def _model():
    return build_model(load_config(COMMON))


def _grads(model, batches: list[dict], per_token: bool) -> dict[str, torch.Tensor]:
    """per_token: d(sum of CE over all tokens / all tokens); else the mean of per-micro-batch means."""
    model.zero_grad(set_to_none=True)
    total = 0
    outs = []
    for b in batches:
        inp = {k: b[k] for k in ("input_ids", "labels", "pixel_values", "segment_ids", "position_ids")}
        if inp["pixel_values"].shape[0] == 0:
            inp.pop("pixel_values")
        out = model(**inp)
        outs.append(out)
        total += int(out.n_tokens)
    loss = sum(o.loss_sum / total if per_token else o.loss / len(outs) for o in outs)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in a)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    return _grads(model, _batches(GLOBAL, 1, 1), per_token=True), before


def _step_single(micro: int) -> dict[str, torch.Tensor]:
    """One optimizer step of the loop's own `train_step` on the single engine, in this process."""
    from train import distributed
    from train.build import build_train_data
    from train.engine import build_engine
    from train.loop import next_window, train_step

    cfg = load_config([*COMMON, "engine=single", f"train.micro_batch_size={micro}"])
    info = distributed.init("single", "cpu")
    engine = build_engine(cfg, build_model(cfg, info), info)
    train_step(engine, next_window(iter(build_train_data(cfg, info)), engine.grad_accum), info)
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _check(after: dict[str, torch.Tensor], reference, micro: int, accum: int, world: int) -> None:
    want, before = reference
    if accum * micro < GLOBAL:  # several micro-batches: the test must be able to see a mean of means
        biased = _grads(_model(), _batches(micro, accum, world), per_token=False)
        assert _rel(biased, want) > 1e-2
    got = {n: before[n] - after[n] for n in want}
    assert _rel(got, want) < 1e-4, (micro, accum, world, _rel(got, want))


@pytest.mark.parametrize("micro,accum", [(4, 1), (1, 4)])
def test_single_engine_step_gradient_is_the_per_token_gradient(reference, micro, accum):
    _check(_step_single(micro), reference, micro, accum, 1)


@pytest.mark.slow
def test_two_process_zero2_zero3_step_gradient_is_the_per_token_gradient(tmp_path, reference):
    """(micro, accum, world) = (2,1,2) and (1,2,2) under ZeRO-2 and ZeRO-3, in one 2-process group."""
    splits = ["zero2:2", "zero2:1", "zero3:2", "zero3:1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(Path(__file__).with_name("token_weight_worker.py")), str(tmp_path), *splits,
           "--", *COMMON, "train.export_final=false"]
    p = run_group(cmd, clean_env(), 420)
    assert p.returncode == 0, p.stdout[-6000:]
    for split in splits:
        engine, micro = split.split(":")
        state = load_file(str(tmp_path / f"{engine}-m{micro}.safetensors"))
        _check(state, reference, int(micro), GLOBAL // (2 * int(micro)), 2)


def test_the_cli_step_exports_the_same_update(tmp_path, reference):
    """The entry point end to end (python -m train, one step, official-layout export) gives that update too."""
    p = run_group([sys.executable, "-m", "train", *COMMON, "train.micro_batch_size=1", f"output_dir={tmp_path}"],
                  clean_env(), 300)
    assert p.returncode == 0, p.stdout[-6000:]
    after = _model()
    load_official(after, tmp_path / "final")
    _check({n: q.detach() for n, q in after.named_parameters()}, reference, 1, 4, 1)
