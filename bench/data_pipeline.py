"""Data pipeline throughput and packing efficiency (prints numbers; not a test).

1. Stage-2 pipeline (shards -> SampleBuilder at 448 px -> same-task packing at 2048 -> batches), one pass over
   the stage-2 part of the demo corpus, in samples/s, inline and with worker processes, and its ratio to
   plain decode + resize (+ CLIP normalisation) of the same images in one process.
2. Packing efficiency (real tokens / slots) on the demo stage-2 mix (7 sources, equal weights, as
   recipes/demo_stage2) at 2048 and 1024, same-task and mixed rows. Tokens do not depend on the image size,
   so this part decodes at a small size to stay fast.
3. Packing efficiency on an SFT-like length distribution (uniform 100-1500 tokens) at 2048 for several buffer
   sizes, plus same-task rows over the SPEC §4 stage-2 task mixture, and the packer's cost per row.

Usage: python bench/data_pipeline.py [--demo-dir DIR] [--scale X] [--workers N] [--size 448]
The default run (demo at scale 0.25, built once into .cache/bench_demo) takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.demo import build_demo  # noqa: E402
from data.images import load_image, to_tensor  # noqa: E402
from data.loader import build_stream  # noqa: E402
from data.packing import Packer, packing_efficiency  # noqa: E402
from data.pipeline import build_stage_stream  # noqa: E402
from data.tasks import STAGE2_TASKS  # noqa: E402


def throughput(dirs: list[dict], size: int, workers: int, seq_len: int) -> tuple[float, int, float, dict]:
    """(seconds to the first batch, samples after it, seconds after it, stats): start-up (pool, tokenizer
    load) is reported apart from the steady-state rate."""
    t = time.perf_counter()
    st = build_stage_stream(2, dirs, image_size=size, seq_len=seq_len, batch_size=4, train=False,
                            num_workers=workers)
    with st:
        it = iter(st)
        next(it)
        t1 = time.perf_counter()
        n1 = st.stats()["samples"]
        for _ in it:
            pass
        t2 = time.perf_counter()
        stats = st.stats()
    return t1 - t, stats["samples"] - n1, t2 - t1, stats


def decode_only(dirs: list[dict], size: int, repeats: int = 2) -> tuple[int, int, float]:
    """Plain decode + resize (+ normalise) of every image of the same samples, one process; best of repeats."""
    raws = list(build_stream(dirs, epochs=1, shuffle_shards=False))  # read first: time decode + resize only
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        n_img = 0
        for r in raws:
            for m in r.meta.get("images", []):
                to_tensor(load_image(r.files[m], name=f"{r.key}.{m}"), size)
                n_img += 1
        best = min(best, time.perf_counter() - t)
    return len(raws), n_img, best


def demo_mix_efficiency(root: str, seq_len: int, same_task: bool, n_batches: int) -> tuple[float, float]:
    sources = [{"name": t, "shards": os.path.join(root, t), "weight": 1.0} for t in STAGE2_TASKS]
    with build_stage_stream(2, sources, image_size=28, seq_len=seq_len, batch_size=8, seed=0, buffer_size=64,
                            same_task=same_task, pack_buffer=128) as st:
        for _ in range(n_batches):
            next(st)
        s = st.stats()
    return s["efficiency"], s["samples"] / s["rows"]


class _Len:
    """A token-count-only stand-in for a Sample (the packer only looks at lengths, tasks and images)."""

    def __init__(self, n: int, task: str = "text"):
        self.input_ids = [0] * n
        self.labels = [0] * n
        self.images: list = []
        self.task = task
        self.ref: list = []


def sft_like(n: int, buffer: int, same_task: bool, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    weights = [19.7, 3.6, 3.5, 8.7, 8.7, 24.8, 7.8]  # SPEC §4 stage-2 mixture
    cum = [sum(weights[:i + 1]) for i in range(len(weights))]
    samples = []
    for _ in range(n):
        task = STAGE2_TASKS[bisect.bisect_right(cum, rng.random() * cum[-1])] if same_task else "text"
        samples.append(_Len(rng.randint(100, 1500), task))
    t = time.perf_counter()
    rows = Packer(2048, buffer_size=buffer, same_task=same_task).pack_all(samples)
    return packing_efficiency(rows, 2048), (time.perf_counter() - t) / len(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", default=".cache/bench_demo")
    ap.add_argument("--scale", type=float, default=0.25, help="demo corpus scale (built once, then reused)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for the parallel run")
    ap.add_argument("--size", type=int, default=448, help="image size of the throughput runs")
    ap.add_argument("--batches", type=int, default=40, help="batches of 8 rows for the demo-mix efficiency")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    build_demo(args.demo_dir, seed=0, scale=args.scale)
    print(f"demo corpus {args.demo_dir} (scale {args.scale}) ready in {time.perf_counter() - t0:.1f}s; "
          f"{os.cpu_count()} CPUs, torch threads 1")
    dirs = [{"name": "stage2", "shards": [os.path.join(args.demo_dir, t) for t in STAGE2_TASKS]}]

    print(f"\n[1] stage-2 pipeline at {args.size}px, seq 2048, same-task packing, one pass over the demo stage-2 set")
    n_raw, n_img, dt_dec = decode_only(dirs, args.size)
    dec_rate = n_raw / dt_dec
    print(f"  decode+resize only:   {n_raw} samples ({n_img} images) in {dt_dec:.2f}s = {dec_rate:.1f} samples/s "
          f"({n_img / dt_dec:.1f} images/s)")
    for w in sorted({0, args.workers}):
        t_first, n, dt, stats = throughput(dirs, args.size, w, 2048)
        rate = n / dt
        print(f"  pipeline workers={w}:  first batch after {t_first:.2f}s, then {n} samples in {dt:.2f}s = "
              f"{rate:.1f} samples/s (ratio to decode+resize {rate / dec_rate:.2f}); packing efficiency "
              f"{stats['efficiency']:.3f}, skipped {stats['skipped'] or 0}")

    print("\n[2] packing efficiency on the demo stage-2 mix (7 sources, equal weights), pack_buffer 128")
    for seq_len in (2048, 1024):
        for same in (True, False):
            eff, per_row = demo_mix_efficiency(args.demo_dir, seq_len, same, args.batches)
            print(f"  seq {seq_len} same_task={same!s:5}: efficiency {eff:.4f}  ({per_row:.1f} samples/row)")

    print("\n[3] SFT-like lengths (uniform 100-1500) at 2048, 20000 samples")
    for same in (False, True):
        for buf in (16, 32, 64, 128, 256):
            eff, cost = sft_like(20000, buf, same)
            label = "same-task (SPEC mix)" if same else "any task           "
            print(f"  {label} pack_buffer {buf:3d}: efficiency {eff:.4f}  ({cost * 1e3:.2f} ms/row)")
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
