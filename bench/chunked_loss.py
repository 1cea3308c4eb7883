"""Loss head benchmark: peak memory of naive vs chunked vs fused-forward-gradient cross-entropy at the Qwen
vocabulary (fp32 and bf16 autocast), and the loss head's share of a tiny-model training step.

Usage: python bench/chunked_loss.py [--tokens N] [--hidden H] [--vocab V] [--chunk C] [--device cpu|cuda]
                                    [--dtypes fp32,bf16] [--methods naive,chunked,fused_fwd_grad]
                                    [--step] [--step-only] [--rows 2] [--seq 2048] [--repeats 3]

Memory: forward + backward of one loss on [N,H] hidden and a [V,H] fp32 weight (fp32 master weights; bf16
means autocast, as the single engine runs). On CUDA the peak is torch.cuda.max_memory_allocated above the
inputs; on CPU each (method, dtype) runs in its own subprocess and the peak is the growth of ru_maxrss
after the inputs and their gradient buffers are allocated and touched (maxrss is monotonic).

Step share (--step): the tiny official-layout model (conf/model/tiny.yaml) on `rows` x `seq` packed rows
(documents of 100-1200 tokens, every position a target except document ends). A full training step
(forward + backward) is timed, then the loss head alone (forward + backward of `lm_head` on the same
hidden states and targets, under the same autocast); share = head / step, each the minimum of `repeats`.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.model.loss import linear_cross_entropy  # noqa: E402

MIB = 2**20
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _inputs(n: int, h: int, v: int, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
    weight = (0.02 * torch.randn(v, h, generator=g)).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    targets[::7] = -100
    return hidden, weight, targets


def _autocast(device: str, dtype: str):
    return torch.autocast(device, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None)


def _run(method: str, dtype: str, hidden, weight, targets, chunk: int) -> float:
    with _autocast(hidden.device.type, dtype):
        s = linear_cross_entropy(hidden, weight, targets, chunk, method).loss_sum
    loss = s / (targets != -100).sum()
    loss.backward()
    return float(loss)


def _child(args: argparse.Namespace) -> None:
    """One (method, dtype) in this process; prints a JSON line with the peak growth in bytes."""
    torch.manual_seed(0)
    hidden, weight, targets = _inputs(args.tokens, args.hidden, args.vocab, "cpu")
    # Pre-allocate the gradient buffers so every method is charged the same for them.
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = _run(args.method, args.dtype, hidden, weight, targets, args.chunk)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_bytes": peak, "loss": loss, "seconds": dt}))


def _cuda_one(args: argparse.Namespace, method: str, dtype: str) -> dict:
    hidden, weight, targets = _inputs(args.tokens, args.hidden, args.vocab, "cuda")
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = _run(method, dtype, hidden, weight, targets, args.chunk)
    torch.cuda.synchronize()
    out = {"peak_bytes": torch.cuda.max_memory_allocated() - base, "loss": loss, "seconds": time.perf_counter() - t0}
    del hidden, weight, targets
    torch.cuda.empty_cache()
    return out


def _cpu_one(args: argparse.Namespace, method: str, dtype: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--method", method, "--dtype", dtype,
           "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--chunk", str(args.chunk)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{method}/{dtype} run failed (rc {res.returncode}):\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory_table(args: argparse.Namespace) -> None:
    print(f"device={args.device} N={args.tokens} H={args.hidden} V={args.vocab} chunk={args.chunk} "
          f"(1/7 of rows ignored); one [N,V] fp32 logits block = {args.tokens * args.vocab * 4 / MIB:.1f} MiB")
    one = _cuda_one if args.device == "cuda" else _cpu_one
    methods = args.methods.split(",")
    for dtype in args.dtypes.split(","):
        res = {m: one(args, m, dtype) for m in methods}
        ref = res.get("naive")
        for m in methods:
            r = res[m]
            rel = f"{r['peak_bytes'] / max(ref['peak_bytes'], 1):5.2f}x naive" if ref else ""
            diff = f"|loss-naive| {abs(r['loss'] - ref['loss']):.1e}" if ref else ""
            print(f"{dtype:4s} {m:15s} peak {r['peak_bytes'] / MIB:8.1f} MiB  {rel}   loss {r['loss']:.6f}  "
                  f"{diff}  {r['seconds']:.2f} s")


# ----------------------------------------------------------------------------------------------- step
def _packed_batch(rows: int, seq: int, vocab_hi: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_hi, (rows, seq), generator=g)
    seg = torch.zeros(rows, seq, dtype=torch.long)
    pos = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        s, k = 0, 1
        while s < seq:
            n = min(int(torch.randint(100, 1201, (1,), generator=g)), seq - s)
            seg[r, s : s + n], pos[r, s : s + n] = k, torch.arange(n)
            s, k = s + n, k + 1
    return {"input_ids": ids, "labels": ids.clone(), "segment_ids": seg, "position_ids": pos}


def _step_and_head_seconds(model, batch: dict, targets: torch.Tensor, dtype: str, method: str,
                           repeats: int) -> tuple[float, float]:
    """(min seconds of a forward + backward step, min seconds of the loss head alone on its hidden states)."""
    device, cfg = targets.device, model.cfg
    captured = {}
    model.llm.register_forward_hook(lambda _m, _i, out: captured.__setitem__("h", out.detach()))

    def step() -> None:
        with _autocast(device.type, dtype):
            out = model(**batch)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    def head() -> None:
        h = captured["h"].reshape(-1, cfg.llm.hidden).requires_grad_()
        with _autocast(device.type, dtype):
            s = model.llm.lm_head(h, targets, cfg.loss_chunk_tokens, method).loss_sum
        (s / targets.numel()).backward()
        model.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step()  # warm-up (allocator, kernels); fills `captured`
    t_step, t_head = [], []
    for _ in range(repeats):  # interleaved, so load changes on a shared machine hit both
        t_step.append(timed(step))
        t_head.append(timed(head))
    return min(t_step), min(t_head)


def step_share(args: argparse.Namespace) -> None:
    from train.model.config import tiny
    from train.model.qwen_vl import QwenVL, shift_targets

    device = torch.device(args.device)
    cfg = tiny()
    batch = {k: v.to(device) for k, v in _packed_batch(args.rows, args.seq, cfg.ids.eod).items()}
    targets = shift_targets(batch["labels"], batch["segment_ids"]).reshape(-1)
    n_tgt = int((targets != -100).sum())
    print(f"tiny model step: {args.rows}x{args.seq} packed, {n_tgt} target tokens, "
          f"threads {torch.get_num_threads()}, chunk {cfg.loss_chunk_tokens}")
    # The head's share of the step's matmul FLOPs (train/flops.py) bounds what any loss implementation can reach.
    from train.flops import FlopsModel, causal_pairs

    fm = FlopsModel(QwenVL(cfg), cfg)
    total = fm(float((batch["segment_ids"] != 0).sum()), 0, n_tgt, float(causal_pairs(batch["segment_ids"])))
    print(f"loss head share of the step's FLOPs: {100 * fm.head_per_target * n_tgt / total:.1f}% "
          f"({fm.head_per_target * n_tgt / 1e9:.0f} of {total / 1e9:.0f} GFLOP)")
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            if method == "naive":
                continue  # [N,V] logits of a whole step: not a training option
            cfg.loss_impl = method
            torch.manual_seed(0)
            ts, th = _step_and_head_seconds(QwenVL(cfg).to(device).train(), batch, targets, dtype, method,
                                            args.repeats)
            print(f"{dtype:4s} {method:15s} step {ts:6.2f} s   loss head {th:6.2f} s   share {100 * th / ts:5.1f}%",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="rows N of the memory benchmark")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--methods", default="naive,chunked,fused_fwd_grad")
    p.add_argument("--step", action="store_true", help="also measure the loss head's share of a tiny-model step")
    p.add_argument("--step-only", action="store_true", help="only the step share")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="fused_fwd_grad", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    if not args.step_only:
        memory_table(args)
    if args.step or args.step_only:
        step_share(args)


if __name__ == "__main__":
    main()
