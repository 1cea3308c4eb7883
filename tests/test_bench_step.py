"""Smoke test of `make bench-step` (bench/step.py --quick on the micro model): it runs both steps in both
dtypes, the matmul peak and the memory probe, and every figure it reports is there and positive."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_step_quick_reports_positive_numbers(tmp_path):
    out = tmp_path / "step.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "step.py"), "--quick", "--json", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["model"] == "micro_small_vocab" and res["real_tokens"] > 0 and res["targets"] > 0
    assert res["padded_rows"] == res["samples"] >= res["packed_rows"] >= 1
    assert res["flops_per_window"] > 0 and ("FlopsModel" in res["flop_formula"] or "inline" in res["flop_formula"])
    assert set(res["dtypes"]) == {"fp32", "bf16"}
    for dt, r in res["dtypes"].items():
        assert r["gemm_peak_flops"] > 0
        assert r["ratio"] > 0
        for name in ("packed", "padded"):
            x = r[name]
            assert x["tokens_per_s"] > 0 and x["flops_per_s"] > 0 and 0 < x["mfu"], (dt, name, x)
            assert math.isfinite(x["loss"]) and x["loss"] > 0
            assert len(x["times_s"]) == res["reps"]
    mem = [m for ms in res["memory"].values() for m in ms]
    assert [m["seq"] for m in mem] == [512, 1024]
    assert all("error" not in m and m["peak_bytes"] > 0 for m in mem), mem
    for text in ("packed / padded", "real tokens/s", "MFU", "matmul peak", "FLOPs per window", "memory"):
        assert text in p.stdout, text
