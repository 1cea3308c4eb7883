"""Evaluation sharded over 2 data-parallel ranks (torchrun, gloo) gives the numbers and predictions of 1 rank; the
in-process API (`evaluate_tasks`, `baseline_scores`) agrees with the command line."""

from __future__ import annotations

import json
import sys

import pytest
from infer_helpers import box_png, export_tiny
from launching import clean_env, run_group

from data.boxes import normalize_box
from data.shards import ShardWriter

TIMEOUT = 420
pytestmark = pytest.mark.slow  # a 2-process torchrun


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("evdist")
    export_tiny(d / "model", seed=2)
    colors = ["red", "blue", "green", "purple", "orange"]
    # 5 samples per task over 2 shards: ranks get 3 and 2 (uneven), every shard boundary crossed
    with ShardWriter(d / "ref", max_samples=3) as w:
        for i, c in enumerate(colors):
            size, box = (64 + 8 * i, 48), (4 + i, 6, 30 + 2 * i, 40)
            w.write(f"r{i}", {"task": "ref_grounding", "lang": "en", "source": "t", "expression": f"the {c} box",
                              "box": list(normalize_box(box, *size))}, [("png", box_png(size, box, c))])
    with ShardWriter(d / "vqa", max_samples=3) as w:
        for i, c in enumerate(colors):
            w.write(f"v{i}", {"task": "vqa", "lang": "en", "source": "t", "question": "What color is the box?" + "?" * i,
                              "answers": [c]}, [("png", box_png((40, 40), (5, 5, 30, 30), c))])
    return d


def _eval(d, out: str, ranks: int) -> dict:
    args = ["--model", str(d / "model"), "--task", "ref_grounding", "--task", "vqa", "--data", str(d / "ref"),
            "--data", str(d / "vqa"), "--batch-size", "2", "--max-new-tokens", "6", "--device", "cpu",
            "--out", str(d / out)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "train.eval", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "train.eval", *args]
    p = run_group(cmd, clean_env(), TIMEOUT)
    assert p.returncode == 0, p.stdout[-5000:]
    assert f"{ranks} rank(s)" in p.stdout
    return json.loads((d / out).read_text(encoding="utf-8"))


def test_two_ranks_equal_one_rank(setup):
    from train.evaluation import baseline_scores, evaluate, read_eval_samples
    from train.infer import load_model

    two = _eval(setup, "two.json", 2)
    # one rank, in process (also: the API and the command line agree); another batch size, so other padding
    model, tok, _ = load_model(setup / "model", device="cpu", dtype="fp32")
    samples = read_eval_samples({"ref_grounding": setup / "ref", "vqa": setup / "vqa"})
    one = evaluate(model, tok, samples, batch_size=5, max_new_tokens={"ref_grounding": 6, "vqa": 6})
    assert one.metrics == two["metrics"]
    assert one.metrics["ref_grounding"]["n"] == 5 and one.metrics["vqa"]["n"] == 5
    for task in ("ref_grounding", "vqa"):
        r1, r2 = one.records[task], two["records"][task]
        assert [r.key for r in r1] == [r["key"] for r in r2] == [f"{task[0]}{i}" for i in range(5)]
        assert [r.reply for r in r1] == [r["reply"] for r in r2]
        assert [json.loads(json.dumps(r.prediction)) for r in r1] == [r["prediction"] for r in r2]
    base = baseline_scores(samples)
    assert base["vqa"]["exact_match"] == pytest.approx(0.2)  # all answers differ: the majority one hits once
    assert 0 <= base["ref_grounding"]["acc@0.5"] <= 1 and base["ref_grounding"]["n"] == 5
