"""What the two step benchmarks (bench/step.py: Qwen-VL, bench/qwen2_vl_step.py: Qwen2-VL) share: synthetic
samples' raw material (word list, JPEGs), the model yaml lookup, one accumulation window, the interleaved
timing loop, its statistics and printed lines, and the command line / result handling around them. What is
family-specific (sample builders, packers, the baselines, FLOPs, memory) stays in each script.

Imported as ``from bench import common`` after the script put the repository root on ``sys.path``; calls
read ``common.NAME`` so that what is shared stands out from what is the script's own.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent

# a plain word list (the text's content does not matter, its token count does)
WORDS = ("the a of to and in is it that for on with as was be by this at from or an are have not but "
         "what all were when we there can which their said if do will each about how up out them then she "
         "many some so these would other into has more her two like him see time could no make than first "
         "been its who now people my made over did down only way find use may water long little very after "
         "words called just where most know get through back much before go good new write our used me man "
         "too any day same right look think also around another came come work three word must because does "
         "part even place well such here take why things help put years different away again off went old "
         "number great tell men say small every found still between name should home big give air line set "
         "own under read last never us left end along while might next sound below saw something thought "
         "both few those always looked show large often together asked house world going want school important "
         "until form food keep children feet land side without boy once animals life enough took sometimes "
         "four head above kind began almost live page got earth need far hand high year mother light parts "
         "country father let night following picture being study second eyes soon times story boys since white "
         "days ever paper hard near sentence better best across during today others however sure means knew "
         "image shows person table window street car tree dog cat red blue green left right top bottom").split()


# ----------------------------------------------------------------------------------------------- config


def read_model_yaml(name: str, *, glob: str = "*.yaml", known_label: str = "known") -> tuple[Path, dict]:
    """conf/model/NAME.yaml (or a path to such a file) -> (path, its mapping); a missing file exits naming the
    ones that match ``glob`` (the configs this bench takes)."""
    import yaml

    path = Path(name) if name.endswith(".yaml") else ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (ROOT / "conf" / "model").glob(glob))
        raise SystemExit(f"--model {name!r}: no file {path} ({known_label}: {', '.join(known)})")
    return path, yaml.safe_load(path.read_text()) or {}


# ---------------------------------------------------------------------------------------------- samples


def jpeg(rng: random.Random, w: int, h: int) -> bytes:
    """A w x h JPEG (gradient + noise, so it neither compresses to nothing nor is pure noise), from ``rng``."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(rng.randrange(2**32))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], -1)
    arr = np.clip(base + g.integers(-40, 40, (h, w, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def sentence(rng: random.Random, k: int, words: Sequence[str] = WORDS) -> str:
    """``k`` words drawn from ``words``, capitalised, with a full stop."""
    return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."


# -------------------------------------------------------------------------------------------- the steps


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``dtype == "bf16"``; fp32 runs without one."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a host timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The benches' optimizer: AdamW over the trainable parameters only (the frozen ViT has no state)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def accumulate_window(opt: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
                      loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor], device: torch.device,
                      dtype: str) -> float:
    """One accumulation window: forward (under ``dtype``'s autocast) + backward of ``loss_of(b)`` for every
    micro-batch (already scaled to its share of the window's loss), then one optimizer step. Returns the
    window's loss; it is summed on the device so that no micro-batch waits for the host."""
    total = torch.zeros((), device=device)
    for b in batches:
        with autocast(device, dtype):
            loss = loss_of(b)
        loss.backward()
        total += loss.detach()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(total)


# --------------------------------------------------------------------------------------------- timing

# (variant, dtype, warm-up: the first micro-batch only) -> the window's loss
Window = Callable[[str, str, bool], float]


def time_windows(window: Window, variants: Sequence[str], dtype: str, *, reps: int, warmup: bool,
                 device: torch.device, verbose: bool) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``reps`` rounds of every variant's window interleaved (A B C A B C ...: a drift of the machine hits all
    alike), after an untimed warm-up micro-batch + step of each (first-touch allocations, kernel selection).
    Returns the window times and losses per variant."""
    if warmup:
        for name in variants:
            window(name, dtype, True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(reps):
        for name in variants:
            sync(device)
            t = time.perf_counter()
            loss = window(name, dtype, False)
            sync(device)
            times[name].append(time.perf_counter() - t)
            losses[name].append(loss)
            if verbose:
                print(f"  [{dtype}] {name} window {times[name][-1]:.2f}s", flush=True)
    return times, losses


def window_stats(times: list[float], losses: list[float], real_tokens: int, *, flops: float | None = None,
                 peak: float | None = None) -> dict[str, Any]:
    """One variant's figures: the median window gives real tokens/s (and, given the window's useful FLOPs and
    the matmul peak, FLOP/s and MFU); the loss is the last window's."""
    med = statistics.median(times)
    r: dict[str, Any] = {"times_s": times, "median_s": med, "tokens_per_s": real_tokens / med}
    if flops is not None and peak is not None:
        r.update(flops_per_s=flops / med, mfu=flops / med / peak)
    r["loss"] = losses[-1]
    return r


def window_line(dtype: str, name: str, x: dict[str, Any], width: int, extra: str = "") -> str:
    """The printed line of one variant's ``window_stats``; ``extra`` goes before the loss."""
    return (f"[{dtype}] {name:{width}s}: {x['tokens_per_s']:9.1f} real tokens/s  window {x['median_s']:.2f}s "
            f"(runs {', '.join(f'{t:.2f}' for t in x['times_s'])})  {extra}loss {x['loss']:.3f}")


# ---------------------------------------------------------------------------------------- run and result


def device_and_dtypes(args: argparse.Namespace) -> tuple[torch.device, list[str]]:
    """``--device`` (a clear exit when CUDA is asked for and missing) and the dtypes ``--dtype`` names."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    return device, ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]


def result_head(args: argparse.Namespace, n_params: dict[str, int], device: torch.device, n_samples: int,
                n_packed: int, n_padded: int) -> dict[str, Any]:
    """The first keys of a bench's result, the same in both."""
    return {"model": args.model, "params": n_params, "device": str(device), "threads": torch.get_num_threads(),
            "seq_len": args.seq_len, "samples": n_samples, "packed_rows": n_packed, "padded_rows": n_padded}


def model_line(name: str, n_params: dict[str, int], device: torch.device, digits: int) -> str:
    """The first printed line: the model, its parameters (per part, in millions to ``digits``), the device."""
    return (f"model {name}: {n_params['total'] / 1e6:.1f}M parameters "
            f"({ {k: round(v / 1e6, digits) for k, v in n_params.items()} }M), "
            f"device {device}, {torch.get_num_threads()} threads")


def finish(res: dict[str, Any], json_path: Path | None, variants: Sequence[str]) -> int:
    """Write the result to ``--json`` (when given); exit status 0 only when every variant's loss is finite."""
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=1))
        print(f"wrote {json_path}")
    return 0 if all(math.isfinite(r[k]["loss"]) for r in res["dtypes"].values() for k in variants) else 1


# ------------------------------------------------------------------------------------------ command line


def window_parser(doc: str, *, quick_help: str, dtype_default: str | None, dtype_help: str | None,
                  model_default: str | None, model_help: str, samples_default: int, reps_what: str,
                  words_help: tuple[str | None, str | None] = (None, None)) -> argparse.ArgumentParser:
    """The parser with the options both benches take, in their order: --quick ... --max-words. A script adds
    its own after them, then ``add_output_args``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default=dtype_default, help=dtype_help)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=model_default, help=model_help)
    p.add_argument("--seq-len", type=int, default=None, help="row length (default 2048)")
    p.add_argument("--samples", type=int, default=None, help=f"samples in the window (default {samples_default})")
    p.add_argument("--reps", type=int, default=None, help=f"timed {reps_what} repeats per dtype (default 3)")
    p.add_argument("--min-words", type=int, default=None, help=words_help[0])
    p.add_argument("--max-words", type=int, default=None, help=words_help[1])
    return p


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="print every window's time as it ends")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def fill_defaults(p: argparse.ArgumentParser, a: argparse.Namespace, quick: dict[str, Any],
                  full: dict[str, Any]) -> None:
    """Options left unset take the ``--quick`` or the full run's value; then the sizes both take are checked."""
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if min(a.seq_len, a.samples, a.reps, a.min_words) < 1 or a.max_words < a.min_words:
        p.error("--seq-len, --samples, --reps, --min-words must be >= 1 and --max-words >= --min-words")
