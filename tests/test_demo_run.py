"""CI smoke test of `make demo` (`python -m train.demo`) with a few steps per stage: builds the demo corpus,
runs stage 1 -> 2 -> 3 on the real shard pipeline with the tiny model, chains each stage from the previous
export, and the held-out and training losses fall. W&B runs offline; its run files hold the metrics. The demo
ends with the official evaluators on a tiny held-out subset (--eval-n 2): the before/after/baseline table is
printed and the example PNGs are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
EVAL_N = 2  # held-out samples per task in the closing evaluation (an untrained model decodes to the token cap)
DEMO_CACHE = ROOT / ".cache" / "test-demo-s0.1"  # shared with test_resume.py (build_demo is idempotent)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo")
    # a small corpus (scale) keeps the build short; the demo shards are the pipeline's real input format
    cmd = [sys.executable, "-m", "train.demo", "--out", str(out / "runs"), "--data-dir", str(DEMO_CACHE),
           "--steps", str(STEPS), "--eval-batches", "1", "--eval-n", str(EVAL_N), "--no-progress", "--wandb", "offline",
           "data.demo.scale=0.1", "optim.lr=2e-3", "train.save_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="2", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)  # generous: shared CI cores
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    summary = json.loads((out / "runs" / "demo_summary.json").read_text())
    return out / "runs", summary, p.stdout


@pytest.mark.slow
def test_demo_runs_all_stages_and_chains_them(demo):
    runs, summary, stdout = demo
    assert set(summary["stages"]) == {"1", "2", "3"}
    for s, name in (("1", "demo_stage1"), ("2", "demo_stage2"), ("3", "demo_stage3")):
        res = summary["stages"][s]
        assert res["steps_run"] == STEPS and res["final_step"] == STEPS
        export = Path(res["export"])
        assert export == (runs / name / "final").resolve()
        assert (export / "config.json").is_file() and (export / "model.safetensors.index.json").is_file()
        assert (runs / name / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
        cfg = yaml.safe_load((runs / name / "config.yaml").read_text())
        if s != "1":  # each stage starts from the previous stage's export
            assert Path(cfg["init"]["from_stage_dir"]).resolve() == (runs / f"demo_stage{int(s) - 1}" / "final")
        assert f"checkpoints : {runs.resolve() / name / 'checkpoints'}" in stdout or \
            f"checkpoints : {runs / name / 'checkpoints'}" in stdout
    # held-out tasks per stage: caption (1), every stage-2 task (2), chat (3)
    assert set(summary["stages"]["1"]["eval_after"]) == {"caption"}
    assert set(summary["stages"]["2"]["eval_after"]) == {"caption", "vqa", "grounded_caption", "ref_grounding",
                                                        "region_caption", "ocr", "text"}
    assert set(summary["stages"]["3"]["eval_after"]) == {"chat"}
    assert "held-out loss per task (before -> after)" in stdout


@pytest.mark.slow
def test_demo_loss_decreases(demo):
    _, summary, _ = demo
    for s, res in summary["stages"].items():
        before, after = res["eval_before"], res["eval_after"]
        mean_b = sum(v["loss"] for v in before.values()) / len(before)
        mean_a = sum(v["loss"] for v in after.values()) / len(after)
        # stage 1 trains only ViT + adapter under a frozen random LLM: a small but real drop
        assert mean_a < mean_b - (0.02 if s == "1" else 0.3), (s, before, after)
        assert all(v["tokens"] > 0 for v in after.values())
        losses = res["losses"]
        assert min(losses[-2:]) < losses[0], (s, losses)  # training loss falls too
    losses = summary["stages"]["2"]["losses"]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses  # stage 2 trains everything: a clear drop


@pytest.mark.slow
def test_demo_wandb_offline_runs_and_metrics(demo):
    _, summary, _ = demo
    for res in summary["stages"].values():
        wdir = Path(res["wandb_dir"])
        assert "offline-run-" in wdir.name and len(list(wdir.glob("run-*.wandb"))) == 1
        jsonl = [json.loads(x) for x in Path(res["metrics_jsonl"]).read_text().splitlines()]
        train_rows = [r for r in jsonl if "loss" in r]
        assert [r["step"] for r in train_rows] == sorted({r["step"] for r in train_rows})  # each step once
        for key in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "padding_fraction", "mem/rss_gb"):
            assert key in train_rows[-1], key
        assert any(k.startswith("loss/") for k in train_rows[-1])  # per-task training loss
        assert any(k.startswith("eval/") for r in jsonl for k in r)  # held-out losses logged too


@pytest.mark.slow
def test_demo_closing_evaluation_table_and_examples(demo):
    runs, summary, stdout = demo
    ev = summary["eval"]
    assert list(ev["points"]) == ["before stage 2", "after stage 2", "after stage 3"]
    assert ev["n_per_task"] == {t: EVAL_N for t in ("ref_grounding", "vqa", "caption", "ocr")}
    for scores in [ev["baseline"], *ev["points"].values()]:
        assert 0.0 <= scores["ref_grounding"]["acc@0.5"] <= 1.0 and 0.0 <= scores["vqa"]["vqa_score"] <= 1.0
        assert scores["ref_grounding"]["n"] == EVAL_N
    assert 0.0 < ev["baseline"]["ref_grounding"]["mean_iou"] < 1.0  # the constant mean box overlaps somewhat
    # the printed table: a header with the baseline and one column per evaluated model, a row per metric
    assert "held-out evaluation, official protocols" in stdout
    header = next(ln for ln in stdout.splitlines() if ln.startswith("task") and "baseline" in ln)
    assert header.split()[:3] == ["task", "metric", "baseline"] and "after stage 3" in header
    for task, metric in (("ref_grounding", "Acc@0.5"), ("vqa", "VQA score"), ("ocr", "edit acc")):
        row = next(ln for ln in stdout.splitlines() if ln.startswith(task) and metric in ln)
        assert len(row.split()) >= len(metric.split()) + 1 + 4, row  # task, metric, baseline + 3 models
    # example predictions drawn for the final model: grounding and OCR, EVAL_N each
    pngs = [Path(p) for p in ev["examples"]]
    assert sorted(p.name for p in pngs) == sorted([f"ref_grounding_{i:03d}.png" for i in range(EVAL_N)]
                                                  + [f"ocr_{i:03d}.png" for i in range(EVAL_N)])
    assert all(p.is_file() and p.parent == (runs / "examples").resolve() for p in pngs)
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and min(im.size) >= 32
    assert str(pngs[0]) in stdout
