"""One training step, the project's packed path vs a padded baseline that does what the official Qwen-VL
fine-tuning code does, on the same samples and the same model (issue 9, item 7).

Usage: python bench/step.py [--quick] [--dtype fp32|bf16|both] [--device cpu|cuda] [--model NAME]
                            [--json PATH] [--reps N] [--samples N] [--no-memory]

Samples: stage-3 ChatML samples built by the project's ``SampleBuilder`` (real tokenizer, a JPEG decoded to a
uint8 [3,S,S] tensor, 258-token image span): one image + a user question + an assistant answer, 100-1200 words
in all (uniform, fixed seed); the loss covers the answer (SFT).

Both variants process the whole sample set as ONE accumulation window (forward + backward of every
micro-batch of one row, then one AdamW step), interleaved A B A B ... (``--reps`` times per dtype, after an
untimed warm-up micro-batch + step of each); the median window time gives the real (non-pad) tokens per second.

* packed (A): ``data.packing.Packer`` rows of ``seq_len`` -> ``collate_rows`` -> ``QwenVL.forward`` with
  ``segment_ids`` / ``position_ids`` (whatever attention and loss path the model code has now); each
  micro-batch's ``loss_sum`` is divided by the window's target count (token-weighted loss).
* padded (B), as the official finetune.py + modeling_qwen.py: every sample its own row padded to
  ``seq_len`` (finetune_ds.sh: per-device batch 1, model_max_length 2048), image features written into the
  span by a Python loop, a dense boolean [B,1,T,T] causal+padding mask passed to SDPA in every layer,
  logits [B,T,V] over every position and ``F.cross_entropy`` on them (mean per micro-batch / accumulation).
  It runs on the very same parameters (the bench's own forward over the model's modules).

The ViT is frozen in both (official ``--fix_vit True``); adapter and LLM train. Model FLOPs (the same useful
work for both variants, so the padded baseline's waste shows as lower MFU) are printed with the formula;
the matmul peak is a 2048^3 GEMM measured in this process before and after each dtype's runs.

Memory: peak RSS growth (CUDA: max_memory_allocated) of one packed step (forward, backward, AdamW) on one row
of 2048 / 8192 / 32768 tokens packed full of SFT-like samples (micro-batch 1, ``--mem-model``, tiny by
default), over the state after a small warm-up step (weights, grads, AdamW state), in a child process per
dtype capped with RLIMIT_AS so a dense [T,T] path fails cleanly instead of taking the machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from data.loader import RawSample  # noqa: E402
from data.packing import IGNORE_INDEX, Packer, collate_rows, pad_collate  # noqa: E402
from data.samples import Sample, SampleBuilder  # noqa: E402
from train.model.config import QwenVLConfig  # noqa: E402
from train.model.qwen_vl import QwenVL, shift_targets  # noqa: E402

VARIANTS = ("packed", "padded")  # timed A B A B ...


# ----------------------------------------------------------------------------------------------- config


def load_model_config(name: str) -> QwenVLConfig:
    """conf/model/NAME.yaml (or a path to such a file) -> QwenVLConfig."""
    _, d = common.read_model_yaml(name)
    d.pop("name", None)
    return QwenVLConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------- samples


def make_samples(n: int, *, image_size: int, seq_len: int, seed: int = 0, min_words: int = 100,
                 max_words: int = 1200) -> list[Sample]:
    """``n`` stage-3 samples (one image, SFT-like text of min..max words), deterministic in ``seed``."""
    rng = random.Random(seed)
    builder = SampleBuilder(3, None, image_size, seq_len, truncate="shorten")
    out = []
    for i in range(n):
        words = rng.randint(min_words, max_words)
        n_q = max(5, words // 10)
        conv = [{"from": "user", "value": f"Picture 1: <img>img0.jpg</img>\n{common.sentence(rng, n_q)}"},
                {"from": "assistant", "value": common.sentence(rng, words - n_q)}]
        raw = RawSample(key=f"s{i:04d}", meta={"task": "chat", "conversations": conv},
                        files={"img0.jpg": common.jpeg(rng, 640, 480)}, source="bench", url="bench", index=i)
        out.append(builder(raw))
    return out


_TOKENIZER_SPECIALS = {"eod": 151643, "im_start": 151644, "im_end": 151645, "img_start": 151857,
                       "img_end": 151858, "img_pad": 151859}  # SPEC §2 ids of the real tokenizer


def remap_ids(samples: list[Sample], cfg: QwenVLConfig) -> list[Sample]:
    """For a model with a small vocabulary / remapped special ids (smoke tests): the tokenizer's special ids
    become the model's, every other id ``id % min(model special ids)``. A no-op for the real vocabulary."""
    ids = cfg.ids
    table = {v: getattr(ids, k) for k, v in _TOKENIZER_SPECIALS.items()}
    if all(k == v for k, v in table.items()):
        return samples
    mod = min(table.values())

    def m(t: int) -> int:
        return t if t == IGNORE_INDEX else table.get(t, t % mod)

    return [Sample([m(t) for t in s.input_ids], [m(t) for t in s.labels], s.images, s.task, s.ref)
            for s in samples]


def _collate_kw(cfg: QwenVLConfig) -> dict[str, Any]:
    check = {"img_end_id": cfg.ids.img_end, "n_slots": cfg.adapter.n_queries, "vocab_size": cfg.llm.vocab_size}
    return {"pad_id": cfg.ids.eod, "img_start_id": cfg.ids.img_start, "check": check}


# -------------------------------------------------------------------------------------------- the steps


def packed_window(model: QwenVL, opt: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
                  n_targets: int, device: torch.device, dtype: str) -> float:
    """Project path: every packed row one micro-batch, token-weighted loss, one optimizer step."""

    def loss_of(b: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=b["input_ids"], labels=b["labels"], pixel_values=b["pixel_values"],
                    segment_ids=b["segment_ids"], position_ids=b["position_ids"])
        return out.loss_sum / n_targets

    return common.accumulate_window(opt, batches, loss_of, device, dtype)


def _rotary(T: int, d: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    f = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, -1)
    return (xf * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def official_loss(model: QwenVL, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """What modeling_qwen.py computes in training (fix_vit): mean CE over the full [B,T,V] logits."""
    cfg, llm = model.cfg, model.llm
    B, T = input_ids.shape
    x = llm.wte(input_ids)
    if pixel_values.shape[0]:
        feats = model.encode_images(pixel_values)
        # official: torch.where over <img>/</img> ids (host sync), then a Python loop of slice writes
        starts = torch.where(input_ids == cfg.ids.img_start)
        ends = torch.where(input_ids == cfg.ids.img_end)
        x = x.clone()
        for k, (i, a, e) in enumerate(zip(starts[0].tolist(), starts[1].tolist(), ends[1].tolist())):
            x[i, a + 1:e] = feats[k].to(x.dtype)
    nh, hd = cfg.llm.heads, cfg.llm.head_dim
    cos, sin = _rotary(T, hd, cfg.llm.rope_base, x.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # dense [B,1,T,T]
    mask = mask | torch.eye(T, dtype=torch.bool, device=x.device)  # pad queries: never a fully masked row
    for blk in llm.h:
        h = blk.ln_1(x)
        q, k, v = blk.attn.c_attn(h).split(cfg.llm.hidden, -1)
        q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + blk.attn.c_proj(a.transpose(1, 2).reshape(B, T, cfg.llm.hidden))
        x = x + blk.mlp(blk.ln_2(x))
    x = llm.ln_f(x)
    logits = F.linear(x, llm.lm_head.weight)  # [B,T,V]
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1),
                           ignore_index=IGNORE_INDEX)


def padded_window(model: QwenVL, opt: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
                  device: torch.device, dtype: str) -> float:
    """Official path: one padded sample per micro-batch, mean loss / grad_accum, one optimizer step."""

    def loss_of(b: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = official_loss(model, b["input_ids"], b["labels"], b["pixel_values"], b["segment_ids"] != 0)
        return loss / len(batches)

    return common.accumulate_window(opt, batches, loss_of, device, dtype)


# ---------------------------------------------------------------------------------------------- flops


@dataclass
class Work:
    real_tokens: int
    targets: int
    images: int
    seg_lens: list[int]


def model_flops(cfg: QwenVLConfig, w: Work, vit_trainable: bool = False) -> tuple[float, str]:
    """Useful training FLOPs of a window and the formula (inline: train/flops.py is used when it exists)."""
    m, v, a = cfg.llm, cfg.vision, cfg.adapter
    H, L, V = m.hidden, m.layers, m.vocab_size
    n_layer = L * (H * 3 * H + 3 * H + H * H + 3 * H * m.intermediate)  # c_attn (+bias), c_proj, w1/w2/c_proj
    llm_dense = 6 * n_layer * w.real_tokens
    attn = 3 * 2 * L * H * sum(s * s for s in w.seg_lens)  # causal: QK^T + PV on the lower triangle, x3 train
    head = 6 * H * V * w.targets
    P = (v.image_size // v.patch_size) ** 2
    W, Mw, Q = v.width, v.mlp_width, a.n_queries
    vit_fwd = (2 * 3 * v.patch_size ** 2 * W * P + v.layers * (2 * (4 * W * W + 2 * W * Mw) * P + 4 * P * P * W))
    vit = (3 if vit_trainable else 1) * vit_fwd * w.images
    ad_fwd = 2 * W * H * P + 2 * 2 * H * H * P + 2 * 3 * H * H * Q + 4 * Q * P * H  # kv_proj, k/v; q/out/proj; attn
    adapter = 3 * ad_fwd * w.images
    total = llm_dense + attn + head + vit + adapter
    formula = (f"LLM 6*N*tokens (N={n_layer / 1e6:.1f}M non-embedding) + attention 6*L*H*sum(s_i^2) (causal, "
               f"per sample) + head 6*H*V*targets (only tokens with a target) + ViT {'3x' if vit_trainable else '1x'}"
               f"(frozen: forward only) (2*N_vit*P + 4*P^2*W per layer) + adapter 3*(kv/k/v proj over P patches, "
               f"q/out/proj over {Q} queries, cross-attention) per image; computed inline in bench/step.py")
    return float(total), formula


def flops_of(model: QwenVL, cfg: QwenVLConfig, w: Work) -> tuple[float, str]:
    """Useful FLOPs of a window: train/flops.py's FlopsModel (the project's one FLOP model) when it exists,
    else the inline count above; the other one is quoted beside it as a cross-check."""
    inline, formula = model_flops(cfg, w)
    try:
        from train.flops import FlopsModel
    except ImportError:
        return inline, formula
    pairs = sum(s * (s + 1) // 2 for s in w.seg_lens)  # document-causal query-key pairs
    total = float(FlopsModel(model, cfg)(w.real_tokens, w.images, target_tokens=w.targets, attn_pairs=pairs))
    return total, ("train.flops.FlopsModel: per weight matrix of N elements 6N per row when it trains, 4N when "
                   "only gradients cross it, 2N when frozen under no_grad (the ViT); LLM weights x real tokens, "
                   "head x target tokens, attention 4*hidden*layers*sum L_i(L_i+1)/2 (x3 training), ViT and "
                   f"adapter per image (patches / queries, attention); inline cross-check {inline / 1e12:.3f} TFLOP")


def gemm_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Median FLOP/s of an n^3 GEMM (after one warm-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    ts = []
    for _ in range(reps):
        common.sync(device)
        t = time.perf_counter()
        a @ b
        common.sync(device)
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts)


# -------------------------------------------------------------------------------------------- memory


def mem_child(args: argparse.Namespace) -> None:
    """One packed step on one row of each of ``--mem-seqs`` tokens (ascending), in this process; prints a JSON
    line per length with the growth of the peak over the state after a small warm-up step. CPU: ru_maxrss is
    a high-water mark, so ascending lengths in one process each read their own peak."""
    device = torch.device(args.device)
    cfg = load_model_config(args.mem_model)
    torch.manual_seed(0)
    model = QwenVL(cfg).to(device).train()
    model.visual.requires_grad_(False)
    opt = common.adamw(model)
    longest = max(args.mem_seqs)
    samples = remap_ids(make_samples(max(2, min(longest, 8192) // 1000), image_size=cfg.vision.image_size,
                                     seq_len=min(min(args.mem_seqs), 2048), seed=1), cfg)
    kw = _collate_kw(cfg)
    small = common.to_device(collate_rows([samples[:1]], len(samples[0].input_ids), **kw), device)
    packed_window(model, opt, [small], 1, device, args.dtype)  # allocates optimizer state and grads once
    common.sync(device)
    base = (torch.cuda.memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    for T in sorted(args.mem_seqs):
        # one row of T tokens packed full by cycling the samples (SFT-like lengths, many documents)
        row, n = [], 0
        for s in samples * (T // 100 + 1):
            if n + len(s.input_ids) <= T:
                row.append(s)
                n += len(s.input_ids)
        batch = common.to_device(collate_rows([row], T, **kw), device)
        n_t = int((shift_targets(batch["labels"], batch["segment_ids"]) != IGNORE_INDEX).sum())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        packed_window(model, opt, [batch], n_t, device, args.dtype)
        common.sync(device)
        dt = time.perf_counter() - t
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
        del batch
        print(json.dumps({"seq": T, "real_tokens": n, "segments": len(row), "peak_bytes": int(peak), "seconds": dt}),
              flush=True)


def _mem_cap() -> int:
    """Address-space cap of a memory child: 6 GiB of virtual headroom (libraries, thread stacks, allocator
    reservations) + 70% of the memory available now, at most 40 GiB: a dense [T,T] path at 32768 tokens fails
    with an allocation error instead of pushing the machine into the OOM killer."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = 16 << 30
    return int(min((6 << 30) + 0.7 * avail, 40 << 30))


def run_memory(args: argparse.Namespace, dtype: str) -> list[dict[str, Any]]:
    """The memory child for ``dtype`` (all lengths, ascending) under an address-space cap on the CPU."""
    cap = _mem_cap() if args.device == "cpu" else None
    seqs = sorted(args.mem_seqs)
    cmd = [sys.executable, __file__, "--_mem-child", "--mem-seqs", ",".join(map(str, seqs)), "--mem-model",
           args.mem_model, "--dtype", dtype, "--device", args.device]

    def limit(c: int | None = cap) -> None:
        if c is not None:
            resource.setrlimit(resource.RLIMIT_AS, (c, c))

    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, env=dict(os.environ))
    got = {m["seq"]: m for m in (json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{"))}
    err = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
    return [got.get(T, {"seq": T, "error": f"rc {p.returncode}: {err}", "cap_bytes": cap}) for T in seqs]


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtypes = common.device_and_dtypes(args)
    res = {"dtypes": {}} if args.memory_only else run_steps(args, device, dtypes)
    if args.memory:
        res["memory"] = {}
        for dt in (dtypes[-1:] if args.quick else dtypes):
            mem = run_memory(args, dt)
            res["memory"][dt] = mem
            for m in mem:
                if "error" in m:
                    print(f"[{dt}] memory ({args.mem_model}) seq {m['seq']}: FAILED {m['error']}")
                else:
                    print(f"[{dt}] memory ({args.mem_model}) one packed step, seq {m['seq']} "
                          f"({m['segments']} samples): peak +{m['peak_bytes'] / 2**20:.0f} MiB ({m['seconds']:.1f}s)")
            ok = {m["seq"]: m["peak_bytes"] for m in mem if "error" not in m}
            if len(ok) >= 2:
                lo, hi = sorted(ok)[-2:]
                print(f"[{dt}] memory {hi} / {lo} tokens: {ok[hi] / max(ok[lo], 1):.2f}x (linear would be "
                      f"{hi / lo:.0f}x)")
    return res


def run_steps(args: argparse.Namespace, device: torch.device, dtypes: list[str]) -> dict[str, Any]:
    """The interleaved packed / padded windows per dtype (see the module doc)."""
    cfg = load_model_config(args.model)
    T = args.seq_len
    samples = remap_ids(make_samples(args.samples, image_size=cfg.vision.image_size, seq_len=T, seed=args.seed,
                                     min_words=args.min_words, max_words=args.max_words), cfg)
    kw = _collate_kw(cfg)
    rows = Packer(T, buffer_size=len(samples), img_start_id=cfg.ids.img_start, check=kw["check"]).pack_all(samples)
    packed = [common.to_device(collate_rows([r], T, **kw), device) for r in rows]
    padded = [common.to_device(pad_collate([s], T, **kw), device) for s in samples]
    n_targets = sum(int((shift_targets(b["labels"], b["segment_ids"]) != IGNORE_INDEX).sum()) for b in packed)
    work = Work(real_tokens=sum(len(s.input_ids) for s in samples), targets=n_targets,
                images=sum(len(s.images) for s in samples), seg_lens=[len(s.input_ids) for s in samples])
    torch.manual_seed(0)
    model = QwenVL(cfg).to(device).train()
    model.visual.requires_grad_(False)  # official finetune.py --fix_vit True (the stage-3 default)
    flops, formula = flops_of(model, cfg, work)
    opt = common.adamw(model)
    n_params = model.num_parameters()
    res: dict[str, Any] = {
        **common.result_head(args, n_params, device, len(samples), len(packed), len(padded)),
        "real_tokens": work.real_tokens, "targets": n_targets, "images": work.images,
        "packing_efficiency": work.real_tokens / (len(packed) * T), "padding_efficiency": work.real_tokens /
        (len(padded) * T), "flops_per_window": flops, "flop_formula": formula, "reps": args.reps, "dtypes": {}}
    print(common.model_line(args.model, n_params, device, 1))
    print(f"{len(samples)} samples, {work.real_tokens} real tokens ({n_targets} targets): {len(packed)} packed rows "
          f"of {T} ({res['packing_efficiency']:.1%} full) vs {len(padded)} padded rows ({res['padding_efficiency']:.1%})")
    print(f"FLOPs per window {flops / 1e12:.3f} TFLOP: {formula}")

    def window(name: str, dt: str, warmup: bool) -> float:
        if name == "packed":
            return packed_window(model, opt, packed[:1] if warmup else packed, n_targets, device, dt)
        return padded_window(model, opt, padded[:1] if warmup else padded, device, dt)

    for dt in dtypes:
        tdt = torch.float32 if dt == "fp32" else torch.bfloat16
        peaks = [gemm_peak(tdt, device, args.gemm_n, args.gemm_reps)]
        times, losses = common.time_windows(window, VARIANTS, dt, reps=args.reps, warmup=args.warmup,
                                            device=device, verbose=args.verbose)
        peaks.append(gemm_peak(tdt, device, args.gemm_n, args.gemm_reps))
        peak = statistics.median(peaks)
        r: dict[str, Any] = {"gemm_peak_flops": peak, "gemm_peaks": peaks}
        for name in VARIANTS:
            r[name] = common.window_stats(times[name], losses[name], work.real_tokens, flops=flops, peak=peak)
        r["ratio"] = r["packed"]["tokens_per_s"] / r["padded"]["tokens_per_s"]
        res["dtypes"][dt] = r
        print(f"[{dt}] matmul peak ({args.gemm_n}^3 GEMM, median of before/after) {peak / 1e9:.1f} GFLOP/s "
              f"({', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
        for name in VARIANTS:
            x = r[name]
            flops_text = f"{x['flops_per_s'] / 1e9:.1f} GFLOP/s  MFU {x['mfu']:.1%}  "
            print(common.window_line(dt, name, x, 6, flops_text))
        print(f"[{dt}] packed / padded = {r['ratio']:.2f}x")
    if len(dtypes) == 2:
        res["bf16_over_fp32"] = {k: res["dtypes"]["bf16"][k]["tokens_per_s"] / res["dtypes"]["fp32"][k]["tokens_per_s"]
                                 for k in VARIANTS}
        print(f"bf16 / fp32 tokens/s: packed {res['bf16_over_fp32']['packed']:.2f}x, "
              f"padded {res['bf16_over_fp32']['padded']:.2f}x")
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.window_parser(
        __doc__, quick_help="smoke test: micro_small_vocab model, seq 512, 2 samples, 1 rep, small GEMM, memory of "
        "the last dtype only", dtype_default="both", dtype_help=None, model_default=None,
        model_help="conf/model name or yaml path (default bench100m)", samples_default=6, reps_what="A/B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory runs")
    p.add_argument("--mem-model", default=None, help="model of the memory runs (default tiny)")
    p.add_argument("--mem-seqs", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated row lengths of the memory runs (default 2048,8192,32768)")
    p.add_argument("--gemm-n", type=int, default=None, help="size of the peak GEMM (default 2048)")
    p.add_argument("--gemm-reps", type=int, default=None, help="timed GEMMs before and after each dtype (default 5)")
    common.add_output_args(p)
    p.add_argument("--_mem-child", dest="mem_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    quick = {"model": "micro_small_vocab", "seq_len": 512, "samples": 2, "reps": 1, "min_words": 50,
             "max_words": 200, "mem_model": "micro_small_vocab", "mem_seqs": [512, 1024], "gemm_n": 512,
             "gemm_reps": 2}
    full = {"model": "bench100m", "seq_len": 2048, "samples": 6, "reps": 3, "min_words": 100, "max_words": 1200,
            "mem_model": "tiny", "mem_seqs": [2048, 8192, 32768], "gemm_n": 2048, "gemm_reps": 5}
    common.fill_defaults(p, a, quick, full)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mem_child:
        mem_child(args)
        return 0
    return common.finish(run(args), args.json, VARIANTS)


if __name__ == "__main__":
    sys.exit(main())
