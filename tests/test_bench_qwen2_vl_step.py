"""Smoke test of bench/qwen2_vl_step.py (packed vs padded Qwen2-VL steps): on tiny sizes it runs every variant
(transformers' padded step included), reports positive throughput and finite losses, and its packed rows hold
exactly the samples the padded rows hold (checked here against the samples themselves)."""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--samples", "3", "--seq-len", "320", "--max-words", "60"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_qwen2_vl_step", REPO / "bench" / "qwen2_vl_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_packed_rows_hold_the_padded_samples():
    """Independent of the bench's own counts: every padded row is one sample followed by padding, and the packed
    rows' segments are the same token sequences (as a multiset), with the same images in the same order."""
    b = _bench()
    a = b.parse_args([*TINY, "--samples", "5"])
    samples = b.make_samples(a.samples, seq_len=a.seq_len, max_pixels=a.max_pixels, seed=1,
                             words=(a.min_words, a.max_words), answer_words=tuple(a.answer_words), sides=tuple(a.sides))
    sizes = {len(s.images[0]) for s in samples}
    assert len(sizes) > 1, sizes  # variable-size images
    assert all(sum(t != -100 for t in s.labels) < len(s.input_ids) / 2 for s in samples)  # mostly prompt
    rows = b.Qwen2VLPacker(a.seq_len, buffer_size=len(samples)).pack_all(samples)
    assert len(rows) < len(samples)
    want = Counter(tuple(s.input_ids) for s in samples)
    got: Counter = Counter()
    for r in rows:
        batch = b.collate_qwen2_rows([r], a.seq_len)
        ids, seg = batch["input_ids"][0].tolist(), batch["segment_ids"][0].tolist()
        for k in range(1, max(seg) + 1):
            got[tuple(t for t, g in zip(ids, seg) if g == k)] += 1
        assert batch["pixel_values"].shape[0] == sum(len(s.images[0]) for s in r)
    assert got == want
    for s in samples:
        batch = b.collate_qwen2_rows([[s]], a.seq_len)
        n = len(s.input_ids)
        assert batch["input_ids"][0, :n].tolist() == s.input_ids and int((batch["segment_ids"] != 0).sum()) == n
    counts = [b.batch_counts([b.collate_qwen2_rows([x], a.seq_len) for x in layout], 151655)
              for layout in (rows, [[s] for s in samples])]
    assert {k: v for k, v in counts[0].items() if k != "rows"} == {k: v for k, v in counts[1].items() if k != "rows"}
    assert counts[0]["real_tokens"] == sum(len(s.input_ids) for s in samples)


def test_bench_qwen2_vl_quick_reports_every_variant(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "q2.json"
    assert _bench().main([*TINY, "--json", str(out)]) == 0  # in this process: the imports are the suite's
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["model"] == "qwen2_vl_tiny" and res["hf"] and res["variants"] == ["packed", "padded", "padded_hf"]
    assert res["padded_rows"] == res["samples"] == 3 > res["packed_rows"] >= 1
    c = res["counts"]
    assert c["packed"]["rows"] == res["packed_rows"] and c["padded"]["rows"] == 3
    for k in ("real_tokens", "image_tokens", "images", "targets"):
        assert c["packed"][k] == c["padded"][k] > 0, k
    assert res["images"] == 3 and sum(res["image_tokens_per_image"]) == res["image_tokens"]
    assert res["packing_efficiency"] > res["padding_efficiency"] > 0
    r = res["dtypes"]["fp32"]
    for name in res["variants"]:
        assert r[name]["tokens_per_s"] > 0 and math.isfinite(r[name]["loss"]) and r[name]["loss"] > 0, name
        assert len(r[name]["times_s"]) == res["reps"] == 1
    assert r["ratio"] > 0 and r["ratio_hf"] > 0
    for text in ("real tokens/s", "packed / padded =", "packed / padded_hf =", "padded rows"):
        assert text in stdout, text
