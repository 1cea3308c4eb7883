"""Attention benchmark: peak memory and time of dense-mask SDPA vs the project's packed-row path.

Usage: python bench/attention.py [--seqs 2048,8192,32768] [--heads 4] [--head-dim 32] [--layout packed|one]
                                 [--paths dense,auto] [--dtype fp32|bf16] [--device cpu|cuda] [--repeats 2]
                                 [--dense-limit-gb 6]

One row of T tokens, tiny-config heads (conf/model/tiny.yaml: 4 heads of 32), forward + backward of the
attention alone (q, k, v [1,heads,T,d] with gradients; the path's mask or plan is built inside the measured
region, as the model does once per forward). `dense` is SDPA with the [1,1,T,T] reference mask
(`attn_impl=sdpa_dense`); `auto` is what training takes (sdpa_docs on the CPU, flex or flash-attn on CUDA).
Layout `packed`: documents of 150-1500 tokens (seed 0) and a padding tail; `one`: one document and a
padding tail (the long-run worst case; slow at 32768 on a CPU).

Memory: on CUDA torch.cuda.max_memory_allocated above the inputs; on the CPU each (path, T) runs in its own
subprocess (after a warm-up at T=512) and `peak` is the growth of ru_maxrss after the inputs are allocated
and touched (maxrss is monotonic), `alloc` the peak growth of tensor bytes from the profiler's allocation
events (exact; no page or allocator effects). Dense runs whose estimated peak exceeds --dense-limit-gb are skipped and say so. Time: the
minimum over --repeats of forward + backward. The issue's target: peak at 32768 < 4x peak at 8192.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.model import attention as A  # noqa: E402

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPL = {"dense": "sdpa_dense", "auto": "auto", "docs": "sdpa_docs", "flex": "flex", "flash": "flash"}


def segments(T: int, layout: str) -> torch.Tensor:
    """[1,T] segment ids: documents 1..k then a padding tail of 0."""
    pad = max(1, T // 64)
    if layout == "one":
        lens = [T - pad]
    else:
        rng, lens, used = random.Random(0), [], 0
        while used < T - pad:
            n = min(rng.randint(150, 1500), T - pad - used)
            lens.append(n)
            used += n
    ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lens)] + [torch.zeros(pad, dtype=torch.long)])
    return ids[None]


def dense_estimate_bytes(T: int, heads: int, elem: int) -> int:
    """Rough peak of the math SDPA path: the bool mask, the scores/probabilities kept for backward and
    their gradient (a few [heads,T,T] buffers)."""
    return T * T + 4 * heads * T * T * elem


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _profiled_peak(fn) -> int:  # noqa: ANN001
    """Peak growth of CPU tensor bytes while fn runs (the profiler's allocation events; exact, no pages)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        trace = os.path.join(d, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            mem = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not mem:
        return 0
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(a["Total Allocated"] for a in mem) - base


def measure(path: str, T: int, args: argparse.Namespace, warm: bool = True) -> dict:
    """Run in the current process: peak memory growth and best time of one forward + backward."""
    if warm:  # page in the kernels' code and the allocator's arenas first, so they are not counted
        measure(path, 512, argparse.Namespace(**{**vars(args), "repeats": 0}), warm=False)
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    seg = segments(T, args.layout).to(dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = [torch.randn(1, args.heads, T, args.head_dim, generator=g).to(dev, dtype).requires_grad_() for _ in range(3)]
    up = torch.randn(1, args.heads, T, args.head_dim, generator=g).to(dev, dtype)
    x = torch.empty(1, T, 1, device=dev, dtype=dtype)  # only its device/dtype steer the plan

    def step() -> None:
        for t in qkv:
            t.grad = None
        plan = A.plan_attention(seg, IMPL[path], x)
        (A.attend(*qkv, plan) * up).sum().backward()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        alloc = peak
    else:
        base = _rss_bytes()
        alloc = _profiled_peak(step)
        peak = _rss_bytes() - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * min(times) if times else float("nan")
    return {"path": path, "ran": A.last_path, "T": T, "peak_mib": peak / MIB, "alloc_mib": alloc / MIB, "ms": ms}


def run_isolated(path: str, T: int, args: argparse.Namespace) -> dict:
    """CPU: a fresh process per measurement so ru_maxrss starts low; CUDA: in process."""
    if args.device == "cuda":
        return measure(path, T, args)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, str(T)] + _forward_args(args)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _forward_args(args: argparse.Namespace) -> list[str]:
    return ["--heads", str(args.heads), "--head-dim", str(args.head_dim), "--layout", args.layout,
            "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="2048,8192,32768")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layout", choices=("packed", "one"), default="packed")
    p.add_argument("--paths", default="dense,auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dense-limit-gb", type=float, default=6.0)
    p.add_argument("--child", nargs=2, metavar=("PATH", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args)))
        return

    seqs = [int(s) for s in args.seqs.split(",")]
    paths = args.paths.split(",")
    bad = [x for x in paths if x not in IMPL]
    if bad:
        raise SystemExit(f"--paths: unknown {', '.join(bad)}; known: {', '.join(IMPL)}")
    elem = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    print(f"# attention fwd+bwd, 1 row, {args.heads} heads x {args.head_dim}, {args.dtype}, {args.device}, "
          f"layout {args.layout}, torch threads {torch.get_num_threads()}")
    print(f"{'path':>6} {'ran':>12} {'T':>6} {'peak MiB':>10} {'alloc MiB':>10} {'ms':>10}")
    res: dict[tuple[str, int], dict] = {}
    for T in seqs:
        for path in paths:
            est = dense_estimate_bytes(T, args.heads, elem)
            if path == "dense" and est > args.dense_limit_gb * 2**30:
                print(f"{path:>6} {'-':>12} {T:>6} {'skipped':>10} {'':>10} {'':>10}  (estimated {est / 2**30:.0f} GiB "
                      f"> --dense-limit-gb {args.dense_limit_gb:g})")
                continue
            r = run_isolated(path, T, args)
            res[(path, T)] = r
            print(f"{path:>6} {r['ran']:>12} {T:>6} {r['peak_mib']:>10.1f} {r['alloc_mib']:>10.1f} {r['ms']:>10.1f}",
                  flush=True)
    for path in paths:
        for key in ("peak_mib", "alloc_mib"):
            a, b = res.get((path, 8192)), res.get((path, 32768))
            if a and b and a[key] > 0:
                ratio = b[key] / a[key]
                print(f"{path}: {key} at 32768 / at 8192 = {ratio:.2f} (linear memory gives ~4, quadratic ~16; "
                      f"target < 4: {'met' if ratio < 4 else 'not met'})")

if __name__ == "__main__":
    main()
