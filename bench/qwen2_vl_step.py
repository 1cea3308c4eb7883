"""One Qwen2-VL training step, the project's packed path vs padded rows, on the same SFT-like samples and the
same weights (issue 13: "packed vs padded real tokens/s for Qwen2-VL tiny at SFT-like lengths").

Usage: python bench/qwen2_vl_step.py [--quick] [--dtype fp32|bf16|both] [--device cpu|cuda] [--model NAME]
                                     [--seq-len N] [--samples N] [--reps N] [--max-pixels N] [--no-hf] [--json PATH]

Samples: stage-3 ChatML samples built by the project's ``Qwen2VLSampleBuilder`` (real tokenizer): one JPEG of a
random size (``--min-side``..``--max-side`` px each side, fixed seed) resized by ``smart_resize`` within
``--max-pixels`` (so every image has its own token count: (h/28)*(w/28)), a long user prompt
(``--min-words``..``--max-words``) and a short assistant answer (``--answer-words``): mostly-prompt rows, the loss
on the answer only (SFT). The ViT is frozen (the fine-tune recipes' train.freeze=[visual]); merger + LLM train.

Every variant processes the whole sample set as ONE accumulation window (forward + backward of every
micro-batch, then one AdamW step), interleaved A B C A B C ... (``--reps`` times per dtype, after an untimed
warm-up micro-batch + step of each); the median window time gives the real (non-pad) tokens per second.

* packed (A): ``Qwen2VLPacker`` rows of ``seq_len`` -> ``collate_qwen2_rows`` -> ``Qwen2VL.forward`` with
  ``segment_ids`` / ``position_ids`` / ``image_grid_thw`` (per-document attention, M-RoPE positions restarting
  per sample, the loss head over target positions only); each micro-batch's ``loss_sum`` is divided by the
  window's target count (token-weighted loss).
* padded (B): the same model code, one sample per row padded to ``seq_len`` (per-device batch 1, padding to
  the maximum length), mean loss per micro-batch / accumulation: what packing alone saves.
* padded_hf (C): transformers' ``Qwen2VLForConditionalGeneration`` (sdpa attention) loaded from this model's
  Hugging Face export (the same initial weights), fed the same padded rows with ``attention_mask`` and float
  processor-layout ``pixel_values``, its own loss (logits over every position [B,T,V], mean CE): the padded
  step an HF-Trainer fine-tune runs. Skipped with ``--no-hf`` or when transformers is not installed.

The bench checks that every variant's batches hold the same real tokens, image tokens and targets (the counts
are in the output) before timing anything.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from data.loader import RawSample  # noqa: E402
from data.qwen2_vl_packing import Qwen2VLPacker, collate_qwen2_rows  # noqa: E402
from data.qwen2_vl_samples import Qwen2VLSample, Qwen2VLSampleBuilder  # noqa: E402
from train.model.families import family_for_model_dict  # noqa: E402
from train.model.loss import IGNORE_INDEX  # noqa: E402
from train.model.qwen2_vl.config import Qwen2VLConfig  # noqa: E402
from train.model.qwen2_vl.model import Qwen2VL, normalize_patches  # noqa: E402
from train.model.qwen_vl import shift_targets  # noqa: E402

VARIANTS = ("packed", "padded", "padded_hf")
# the first 126 and the last 17 words of the common list: the list this bench's samples were always drawn
# from, so that its token counts (and numbers) stay comparable with earlier runs
_WORDS = common.WORDS[:126] + common.WORDS[-17:]


# ----------------------------------------------------------------------------------------------- config
def load_model_config(name: str) -> Qwen2VLConfig:
    """conf/model/NAME.yaml (or a path to such a file) of the qwen2_vl family -> Qwen2VLConfig."""
    path, d = common.read_model_yaml(name, glob="qwen2_vl*.yaml", known_label="Qwen2-VL ones")
    family, rest = family_for_model_dict(d)
    if family.name != "qwen2_vl":
        raise SystemExit(f"--model {name!r}: {path} is a {family.name} model; this bench takes the qwen2_vl family "
                         "(bench/step.py is the Qwen-VL one)")
    return family.config_from_dict(rest)


# ---------------------------------------------------------------------------------------------- samples
def make_samples(n: int, *, seq_len: int, max_pixels: int, min_pixels: int = 3136, seed: int = 0,
                 words: tuple[int, int] = (100, 1000), answer_words: tuple[int, int] = (8, 64),
                 sides: tuple[int, int] = (112, 1024)) -> list[Qwen2VLSample]:
    """``n`` stage-3 samples: one image of a random size, a long prompt, a short answer; deterministic in
    ``seed``. Text is shortened (never through the image) to fit ``seq_len``."""
    rng = random.Random(seed)
    builder = Qwen2VLSampleBuilder(3, None, seq_len, min_pixels=min_pixels, max_pixels_resize=max_pixels,
                                   truncate="shorten")

    def text(k: int) -> str:
        return common.sentence(rng, k, _WORDS)

    out = []
    for i in range(n):
        w, h = rng.randint(*sides), rng.randint(*sides)
        conv = [{"from": "user", "value": f"Picture 1: <img>img0.jpg</img>\n{text(rng.randint(*words))}"},
                {"from": "assistant", "value": text(rng.randint(*answer_words))}]
        raw = RawSample(key=f"s{i:04d}", meta={"task": "chat", "conversations": conv},
                        files={"img0.jpg": common.jpeg(rng, w, h)}, source="bench", url="bench", index=i)
        out.append(builder(raw))
    return out


def batch_counts(batches: list[dict[str, torch.Tensor]], image_pad: int) -> dict[str, int]:
    """What a variant's batches hold: real (non-pad) tokens, image tokens, images, loss targets, rows."""
    return {"real_tokens": sum(int((b["segment_ids"] != 0).sum()) for b in batches),
            "image_tokens": sum(int((b["input_ids"] == image_pad).sum()) for b in batches),
            "images": sum(int(b["image_grid_thw"].shape[0]) for b in batches),
            "targets": sum(int((shift_targets(b["labels"], b["segment_ids"]) != IGNORE_INDEX).sum()) for b in batches),
            "rows": len(batches)}


# -------------------------------------------------------------------------------------------- the steps
def packed_window(model: Qwen2VL, opt: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
                  n_targets: int, device: torch.device, dtype: str) -> float:
    """Project path: every packed row one micro-batch, token-weighted loss, one optimizer step."""
    return common.accumulate_window(opt, batches, lambda b: _forward(model, b).loss_sum / n_targets, device,
                                    dtype)


def padded_window(model: Qwen2VL, opt: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
                  device: torch.device, dtype: str) -> float:
    """Same model code on one padded sample per micro-batch: mean loss / grad_accum, one optimizer step."""
    return common.accumulate_window(opt, batches, lambda b: _forward(model, b).loss / len(batches), device,
                                    dtype)


def _forward(model: Qwen2VL, b: dict[str, torch.Tensor]) -> Any:
    return model(b["input_ids"], b["labels"], b["pixel_values"], b["segment_ids"], b["position_ids"],
                 b["image_grid_thw"])


def hf_inputs(b: dict[str, torch.Tensor], cfg: Qwen2VLConfig) -> dict[str, torch.Tensor]:
    """A padded batch as transformers' Qwen2VLForConditionalGeneration takes it: attention_mask, float
    CLIP-normalised pixel_values with both temporal copies (the processor's layout), mm_token_type_ids."""
    v = cfg.vision
    pv = b["pixel_values"]
    L = pv.shape[0]
    pv = pv.view(L, v.in_channels, 1, -1).expand(L, v.in_channels, v.temporal_patch_size, -1).reshape(L, -1)
    return {"input_ids": b["input_ids"], "attention_mask": (b["segment_ids"] != 0).long(), "labels": b["labels"],
            "pixel_values": normalize_patches(pv, v.in_channels), "image_grid_thw": b["image_grid_thw"],
            "mm_token_type_ids": (b["input_ids"] == cfg.ids.image_pad).int()}


def hf_window(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
              device: torch.device, dtype: str) -> float:
    """transformers' model on the padded rows: its own loss (mean CE over the full logits) / grad_accum."""
    return common.accumulate_window(opt, batches, lambda b: model(**b, use_cache=False).loss / len(batches),
                                    device, dtype)


def build_hf_twin(model: Qwen2VL, device: torch.device) -> torch.nn.Module | None:
    """transformers' Qwen2VLForConditionalGeneration with `model`'s weights (through the HF export), ViT frozen
    (merger trained, as ours); None when transformers is missing."""
    try:
        from transformers import Qwen2VLForConditionalGeneration
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    hf_logging.disable_progress_bar()  # a "Loading weights" bar in the middle of the bench's lines
    from train.model.qwen2_vl.hf import export_hf

    with tempfile.TemporaryDirectory() as d:
        out = export_hf(model, Path(d) / "export")
        twin = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
    twin = twin.to(device).train()
    for name, p in twin.named_parameters():
        p.requires_grad_(not ("visual." in name and ".merger." not in name))
    return twin


# ---------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    device, dtypes = common.device_and_dtypes(args)
    cfg = load_model_config(args.model)
    T = args.seq_len
    samples = make_samples(args.samples, seq_len=T, max_pixels=args.max_pixels, min_pixels=args.min_pixels,
                           seed=args.seed, words=(args.min_words, args.max_words),
                           answer_words=tuple(args.answer_words), sides=tuple(args.sides))
    m = cfg.vision.merge_size
    rows = Qwen2VLPacker(T, buffer_size=len(samples), merge_size=m, vocab_size=cfg.llm.vocab_size).pack_all(samples)
    packed = [common.to_device(collate_qwen2_rows([r], T, checked=True, merge_size=m), device) for r in rows]
    padded = [common.to_device(collate_qwen2_rows([[s]], T, checked=True, merge_size=m), device)
              for s in samples]
    counts = {"packed": batch_counts(packed, cfg.ids.image_pad), "padded": batch_counts(padded, cfg.ids.image_pad)}
    same = {k: v for k, v in counts["packed"].items() if k != "rows"}
    if same != {k: v for k, v in counts["padded"].items() if k != "rows"}:
        raise SystemExit(f"packed and padded batches differ in content: {counts}")  # a packing bug, not a speed
    n_targets = same["targets"]
    torch.manual_seed(0)
    model = Qwen2VL(cfg).to(device).train()
    model.visual.requires_grad_(False)  # the fine-tune recipes' train.freeze=[visual]: merger + LLM train
    twin = None if not args.hf else build_hf_twin(model, device)
    variants = [v for v in VARIANTS if v != "padded_hf" or twin is not None]
    hf_batches = [hf_inputs(b, cfg) for b in padded] if twin is not None else []
    opts = {"model": common.adamw(model)}
    if twin is not None:
        opts["twin"] = common.adamw(twin)
    n_params = model.num_parameters()
    grids = torch.cat([b["image_grid_thw"] for b in padded])
    res: dict[str, Any] = {
        **common.result_head(args, n_params, device, len(samples), len(packed), len(padded)),
        "real_tokens": same["real_tokens"], "image_tokens": same["image_tokens"], "targets": n_targets,
        "images": same["images"], "image_tokens_per_image": (grids.prod(-1) // (m * m)).tolist(),
        "packing_efficiency": same["real_tokens"] / (len(packed) * T),
        "padding_efficiency": same["real_tokens"] / (len(padded) * T), "counts": counts, "variants": variants,
        "hf": twin is not None, "reps": args.reps, "dtypes": {}}
    print(common.model_line(args.model, n_params, device, 2))
    print(f"{len(samples)} SFT samples, {same['real_tokens']} real tokens ({same['image_tokens']} image tokens in "
          f"{same['images']} images of {min(res['image_tokens_per_image'])}-{max(res['image_tokens_per_image'])} "
          f"tokens, {n_targets} targets): {len(packed)} packed rows of {T} ({res['packing_efficiency']:.1%} full) "
          f"vs {len(padded)} padded rows ({res['padding_efficiency']:.1%})")
    if args.hf and twin is None:
        print("padded_hf skipped: transformers is not installed (pip install -e '.[test]')")

    def window(name: str, dt: str, warmup: bool) -> float:
        n = 1 if warmup else None  # warm-up: the first micro-batch only
        if name == "packed":
            return packed_window(model, opts["model"], packed[:n], n_targets, device, dt)
        if name == "padded":
            return padded_window(model, opts["model"], padded[:n], device, dt)
        return hf_window(twin, opts["twin"], hf_batches[:n], device, dt)

    for dt in dtypes:
        times, losses = common.time_windows(window, variants, dt, reps=args.reps, warmup=args.warmup,
                                            device=device, verbose=args.verbose)
        r: dict[str, Any] = {}
        for name in variants:
            r[name] = common.window_stats(times[name], losses[name], same["real_tokens"])
            print(common.window_line(dt, name, r[name], 9))
        r["ratio"] = r["packed"]["tokens_per_s"] / r["padded"]["tokens_per_s"]
        line = f"[{dt}] packed / padded = {r['ratio']:.2f}x (same model code)"
        if twin is not None:
            r["ratio_hf"] = r["packed"]["tokens_per_s"] / r["padded_hf"]["tokens_per_s"]
            line += f", packed / padded_hf = {r['ratio_hf']:.2f}x (transformers)"
        print(line)
        res["dtypes"][dt] = r
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.window_parser(
        __doc__, quick_help="smoke test: seq 512, 3 samples, 1 rep, small images and texts, fp32",
        dtype_default=None, dtype_help="default fp32", model_default="qwen2_vl_tiny",
        model_help="conf/model name or yaml path of the qwen2_vl family", samples_default=8, reps_what="A/B/C",
        words_help=("prompt words, at least (default 100)", "prompt words, at most (default 1000)"))
    p.add_argument("--answer-words", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="answer words min,max (default 8,64)")
    p.add_argument("--sides", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="image side lengths min,max in px before resizing (default 112,1024)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="resize budget per image (default 28*28*512: up to 512 image tokens)")
    p.add_argument("--min-pixels", type=int, default=3136)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hf", dest="hf", action="store_false", help="leave out the transformers baseline")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    common.add_output_args(p)
    a = p.parse_args(argv)
    quick = {"dtype": "fp32", "seq_len": 512, "samples": 3, "reps": 1, "min_words": 20, "max_words": 150,
             "answer_words": [4, 12], "sides": [40, 400], "max_pixels": 28 * 28 * 64}
    full = {"dtype": "fp32", "seq_len": 2048, "samples": 8, "reps": 3, "min_words": 100, "max_words": 1000,
            "answer_words": [8, 64], "sides": [112, 1024], "max_pixels": 28 * 28 * 512}
    common.fill_defaults(p, a, quick, full)
    for k in ("answer_words", "sides"):
        v = getattr(a, k)
        if len(v) != 2 or not 1 <= v[0] <= v[1]:
            p.error(f"--{k.replace('_', '-')}: expected min,max with 1 <= min <= max, got {v}")
    if not 0 < a.min_pixels <= a.max_pixels:
        p.error(f"need 0 < --min-pixels ({a.min_pixels}) <= --max-pixels ({a.max_pixels})")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    return common.finish(res, args.json, res["variants"])


if __name__ == "__main__":
    sys.exit(main())
