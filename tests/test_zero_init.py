"""ZeRO-3 builds the model inside deepspeed.zero.Init: with 2 CPU processes (torchrun via
launch/single_node.sh) each rank holds only its half of every parameter right after the build, and
initial weights streamed from an exported stage dir (init.from_stage_dir) into those partitions give
the same losses and final weights as 1 plain process loading the same dir."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from launching import clean_env, run_group
from safetensors.torch import load_file

from train.model.official import resolve_checkpoint

COMMON = ["recipe=demo_stage2", "data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56",
          "data.seq_len=300", "train.steps=2", "train.save_every=0", "logging=quiet", "logging.every=1",
          "train.micro_batch_size=1", "train.global_batch_size=4", "train.export_final=true",
          "eval.at_start=false", "eval.at_end=false", "optim.warmup_steps=1", "optim.lr=2e-3"]
TIMEOUT = 240
HOLDS = re.compile(r"\[train\] rank (\d+): holds ([\d,]+) of ([\d,]+) parameter elements")


def _stage_dir(root: Path) -> Path:
    """An exported official-layout stage dir whose weights differ from the runs' own seed-0 random init."""
    from train.config import load_config, model_cfg
    from train.model.official import export_official
    from train.model.qwen_vl import QwenVL

    cfg = load_config([*COMMON, "init.from_stage_dir=null", f"output_dir={root / 'unused'}"])
    torch.manual_seed(1234)
    return export_official(QwenVL(model_cfg(cfg)), root / "stage", max_shard_bytes=1 << 20)


def _curve(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _export(out: Path) -> dict[str, torch.Tensor]:
    files, _ = resolve_checkpoint(out / "final")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.slow
def test_zero_init_partitions_at_build_and_loads_a_stage_dir(tmp_path):
    stage = _stage_dir(tmp_path)
    assert len(resolve_checkpoint(stage)[0]) > 1  # several shards: the load streams shard by shard
    args = [*COMMON, f"init.from_stage_dir={stage}"]
    p1 = run_group([sys.executable, "-m", "train", *args, f"output_dir={tmp_path / 'single'}"], clean_env(), TIMEOUT)
    assert p1.returncode == 0, p1.stdout[-6000:]
    p2 = run_group(["bash", "launch/single_node.sh", "2", *args, "engine=zero3", f"output_dir={tmp_path / 'z3'}"],
                   clean_env(), TIMEOUT)
    assert p2.returncode == 0, p2.stdout[-6000:]
    assert "world size 2, engine deepspeed ZeRO-3" in p2.stdout

    # after the build (before deepspeed.initialize) each rank holds about half of the parameters
    _, full1, _ = (int(x.replace(",", "")) for x in HOLDS.search(p1.stdout).groups())
    holds = {int(r): (int(h.replace(",", "")), int(f.replace(",", ""))) for r, h, f in HOLDS.findall(p2.stdout)}
    assert sorted(holds) == [0, 1], p2.stdout[-3000:]
    for held, full in holds.values():
        assert full == full1  # the full size is known on every rank (ds_numel)
        assert full / 2 <= held < 0.51 * full, (held, full)  # padding to equal slices only
    print(f"zero.Init: each rank holds {holds[0][0]:,} of {full1:,} parameter elements after build")

    # loaded into the partitions: the same losses and final weights as one process loading the dir
    l1, l2 = _curve(tmp_path / "single"), _curve(tmp_path / "z3")
    assert len(l1) == len(l2) == 2
    assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-5)
    wa, wb = _export(tmp_path / "single"), _export(tmp_path / "z3")
    assert wa.keys() == wb.keys()
    wdelta = max(float((wb[k].float() - v.float()).abs().max()) for k, v in wa.items())
    assert wdelta < 1e-5
    print(f"first-step loss {l1[0]:.6f} (1 process) vs {l2[0]:.6f} (ZeRO-3, 2 processes); max |weight delta| "
          f"{wdelta:.2e}")
