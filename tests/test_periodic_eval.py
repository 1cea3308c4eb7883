"""In-training evaluation with the official protocols (train/periodic_eval.py): a tiny single-process run with
eval.every and eval.protocols writes eval/<task>/<metric> rows at those steps (and after the last one) into
metrics.jsonl, equal to the evaluator run on the checkpoint saved at the same step; under W&B (offline) a table
of predictions per task is logged whose replies are the evaluator's; lockstep decoding (ZeRO-3) replies as the
default mode does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from infer_helpers import box_png

from data.boxes import normalize_box
from data.shards import ShardWriter
from train.config import ConfigError, load_config

COLORS = ["red", "blue", "green"]  # 3 samples per task: 2 batches of eval.batch_size 2, the last uneven
TASKS = ["ref_grounding", "vqa"]
MAX_NEW = 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pe")
    with ShardWriter(d / "ref_grounding", max_samples=2) as w:
        for i, c in enumerate(COLORS):
            size, box = (64 + 8 * i, 48), (4 + i, 6, 30 + 2 * i, 40)
            w.write(f"r{i}", {"task": "ref_grounding", "lang": "en", "source": "t", "expression": f"the {c} box",
                              "box": list(normalize_box(box, *size))}, [("png", box_png(size, box, c))])
    with ShardWriter(d / "vqa", max_samples=2) as w:
        for i, c in enumerate(COLORS):
            w.write(f"v{i}", {"task": "vqa", "lang": "en", "source": "t", "question": "What color is the box?",
                              "answers": [c]}, [("png", box_png((40, 40), (5, 5, 30, 30), c))])
    return d


def _cfg(shards: Path, out: Path, *extra: str):  # noqa: ANN202 - DictConfig
    cfg = load_config(["recipe=demo_stage2", "model=micro", "model.vision.image_size=56", "data.demo.enabled=false",
                       f"data.root={shards}", "data.seq_len=300", "train.micro_batch_size=2",
                       "train.global_batch_size=2", "train.steps=2", "train.save_every=1", "train.keep_last=3",
                       "optim.lr=1e-2", "optim.warmup_steps=1", "logging=quiet", "logging.every=1",
                       "init.from_stage_dir=null", "train.export_final=false", "eval.at_start=false", "logging.peak_flops=1e11",
                       "eval.every=1", "eval.max_batches=1", f"eval.protocols={TASKS}", "eval.protocol_samples=3",
                       "eval.protocol_examples=2", f"eval.protocol_max_new_tokens={MAX_NEW}", "eval.batch_size=2",
                       "data.sources=[" + ",".join(f"{{name:{t},shards:'{shards / t}',weight:1.0}}" for t in TASKS) + "]",
                       f"output_dir={out}", *extra])
    cfg.data.heldout = {t: str(shards / t) for t in TASKS}  # the samples the run trains on (scores that move)
    return cfg


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> tuple[Path, dict, list[tuple[int, dict]]]:
    """2 steps, eval.every=1, W&B offline; what the run handed W&B's public Run.log is recorded."""
    from wandb.sdk.wandb_run import Run

    from train.loop import train

    out = tmp_path_factory.mktemp("run")
    logged: list[tuple[int, dict]] = []
    real_log = Run.log

    def spy(self, data, step=None, **kw):  # noqa: ANN001
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "log", spy)
        mp.delenv("WANDB_API_KEY", raising=False)
        summary = train(_cfg(shards, out, "logging.wandb.mode=offline"))
    return out, summary, logged


def test_protocol_rows_equal_the_evaluator_on_the_saved_checkpoints(shards, run):
    import wandb

    from train.evaluation import evaluate, read_eval_samples
    from train.infer import load_model

    tmp_path, summary, logged = run
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    proto = {r["step"]: r for r in rows if "eval/vqa/vqa_score" in r}
    assert sorted(proto) == [1, 2]  # eval.every=1 (step 1; step 2 is the end, scored once)
    samples = read_eval_samples({t: shards / t for t in TASKS})
    tables = {s: d for s, d in logged if any(k.startswith("eval_examples/") for k in d)}
    assert sorted(tables) == [1, 2]
    for step in (1, 2):
        model, tok, _ = load_model(tmp_path / "checkpoints" / f"step_{step:08d}", device="cpu", dtype="fp32")
        ref = evaluate(model, tok, samples, batch_size=3, max_new_tokens={t: MAX_NEW for t in TASKS})
        want = {f"eval/{t}/{m}": v for t, ms in ref.metrics.items() for m, v in ms.items()}
        got = {k: v for k, v in proto[step].items() if k in want}
        assert got == pytest.approx(want, abs=1e-9) and len(got) == len(want) == 6, (got, want)
        assert proto[step]["eval/ref_grounding/n"] == 3 and proto[step]["eval/vqa/n"] == 3
        # the W&B table per task: the first 2 records, with the evaluator's replies and an image each
        for t in TASKS:
            table = tables[step][f"eval_examples/{t}"]
            assert isinstance(table, wandb.Table)
            cols = table.columns
            assert [r[cols.index("reply")] for r in table.data] == [r.reply for r in ref.records[t][:2]]
            assert all(isinstance(r[cols.index("image")], wandb.Image) for r in table.data)
        assert proto[step]["eval_protocols_seconds"] > 0
    assert summary["protocols_after"]["vqa"]["n"] == 3
    # the offline run holds the tables as media files (W&B's files listing)
    run_files = Path(summary["wandb_dir"]) / "files"
    listed = sorted(p.name for p in run_files.rglob("*.table.json"))
    assert len(listed) == 4 and all(p.startswith(("ref_grounding_", "vqa_")) for p in listed), listed


def test_lockstep_decoding_replies_as_default(shards, run):
    """ZeRO-3's mode (full budget every batch, cut at the first stop token) gives the default mode's replies,
    also where rows of a batch stop at different steps."""
    from collections import Counter

    import torch

    from train.evaluation import evaluate, read_eval_samples
    from train.infer import load_model

    model, tok, _ = load_model(run[0] / "checkpoints" / "step_00000002", device="cpu", dtype="fp32")
    samples = read_eval_samples({t: shards / t for t in TASKS})
    mnt = {"ref_grounding": 8, "vqa": 8}
    free = evaluate(model, tok, samples, batch_size=2, max_new_tokens=mnt)
    # make <|endoftext|> win wherever the most frequent generated token would: replies now stop early, unevenly
    common = Counter(t for rs in free.records.values() for r in rs for t in tok.encode(r.reply, special=False))
    top = common.most_common(1)[0][0]
    with torch.no_grad():
        w = model.llm.lm_head.weight
        w[model.cfg.ids.eod] = 1.05 * w[top]
    a = evaluate(model, tok, samples, batch_size=2, max_new_tokens=mnt)
    b = evaluate(model, tok, samples, batch_size=2, max_new_tokens=mnt, lockstep=True)
    lengths = {len(r.reply) for rs in a.records.values() for r in rs}
    assert len(lengths) > 1 and min(lengths) < min(len(r.reply) for rs in free.records.values() for r in rs)
    assert a.metrics == b.metrics
    for t in TASKS:
        assert [r.reply for r in a.records[t]] == [r.reply for r in b.records[t]]


def test_protocols_off_by_default_and_validated(shards, tmp_path):
    cfg = load_config(["recipe=demo_stage2"])
    assert list(cfg.eval.protocols) == []
    with pytest.raises(ConfigError, match="eval.protocols: no evaluation protocol for"):
        load_config(["recipe=demo_stage2", "eval.protocols=[grounding]"])
    with pytest.raises(ConfigError, match=r"eval.protocols: \['vqa'\] have no held-out split"):
        load_config(["recipe=demo_stage3", "eval.protocols=[vqa]"])
