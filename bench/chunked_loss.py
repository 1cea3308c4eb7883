"""Peak memory of chunked vs naive cross-entropy (forward + backward) at the Qwen vocabulary.

Usage: python bench/chunked_loss.py [--tokens N] [--hidden H] [--vocab V] [--chunk C] [--device cpu|cuda]

On CUDA the peak is torch.cuda.max_memory_allocated above the inputs. On CPU each method runs in
its own subprocess and the peak is the growth of ru_maxrss after the inputs are allocated and
touched (maxrss is monotonic, so one method per process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.model.loss import chunked_cross_entropy  # noqa: E402


def _inputs(n: int, h: int, v: int, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
    weight = (0.02 * torch.randn(v, h, generator=g)).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    targets[::7] = -100
    return hidden, weight, targets


def _run(method: str, hidden, weight, targets, chunk: int) -> float:
    if method == "chunked":
        s, n = chunked_cross_entropy(hidden, weight, targets, chunk)
        loss = s / n
    else:
        loss = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    loss.backward()
    return float(loss)


def _child(args: argparse.Namespace) -> None:
    """One method in this process; prints a JSON line with the peak growth in bytes."""
    hidden, weight, targets = _inputs(args.tokens, args.hidden, args.vocab, "cpu")
    # Pre-allocate the gradient buffers so both methods are charged the same for them.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = _run(args.method, hidden, weight, targets, args.chunk)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"method": args.method, "peak_bytes": peak, "loss": loss, "seconds": dt}))


def _cuda(args: argparse.Namespace) -> dict[str, dict]:
    out = {}
    for method in ("chunked", "naive"):
        hidden, weight, targets = _inputs(args.tokens, args.hidden, args.vocab, "cuda")
        hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = _run(method, hidden, weight, targets, args.chunk)
        torch.cuda.synchronize()
        out[method] = {
            "peak_bytes": torch.cuda.max_memory_allocated() - base,
            "loss": loss,
            "seconds": time.perf_counter() - t0,
        }
        del hidden, weight, targets
        torch.cuda.empty_cache()
    return out


def _cpu(args: argparse.Namespace) -> dict[str, dict]:
    out = {}
    for method in ("chunked", "naive"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--method", method,
               "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
               "--chunk", str(args.chunk)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"{method} run failed (rc {res.returncode}):\n{res.stderr[-2000:]}")
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=None, help="rows N (default 4096 on CUDA, 2048 on CPU)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="chunked", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tokens is None:
        args.tokens = 4096 if args.device == "cuda" else 2048
    if args.child:
        _child(args)
        return
    res = _cuda(args) if args.device == "cuda" else _cpu(args)
    mib = 2**20
    logits_fp32 = args.tokens * args.vocab * 4
    print(f"device={args.device} N={args.tokens} H={args.hidden} V={args.vocab} chunk={args.chunk}")
    print(f"one [N,V] fp32 logits block = {logits_fp32 / mib:.1f} MiB")
    for m in ("chunked", "naive"):
        r = res[m]
        print(f"{m:8s} peak {r['peak_bytes'] / mib:9.1f} MiB   loss {r['loss']:.6f}   {r['seconds']:.2f} s")
    ratio = res["naive"]["peak_bytes"] / max(res["chunked"]["peak_bytes"], 1)
    print(f"naive/chunked peak ratio = {ratio:.2f}x   |loss diff| = {abs(res['naive']['loss'] - res['chunked']['loss']):.2e}")


if __name__ == "__main__":
    main()
