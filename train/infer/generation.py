"""Batched generation with a KV cache: greedy or sampling (temperature, top-k, top-p), repetition penalty, stop
tokens, `max_new_tokens`, a per-token streaming callback.

Prompts of different lengths are left-padded into one batch; the padding is masked out of attention (segment id
0) and positions count from each prompt's first real token, so every row computes what it would compute alone:
the outputs equal one-by-one generation (tests/test_infer.py). Sampling draws every row from its own generator
seeded with `seed`, so a prompt samples the same tokens whatever batch it is in.

The loop is written here (not `QwenVL.generate`, the minimal greedy reference) so that decoding strategies stay
out of the model code; it uses only the model's public pieces (`embed_inputs`, `llm`, `llm.logits`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from train.model.llm import KVCache

# streamer(row, token_id): called for each generated token that is not a stop token, as it is produced
Streamer = Callable[[int, int], None]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False  # False: greedy (temperature / top_k / top_p unused)
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens already in the prompt or the output (HF rule)
    stop_ids: tuple[int, ...] | None = None  # None: <|im_end|>, <|endoftext|> and <|im_start|> (as official chat)
    seed: int = 0

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self


@dataclass
class GenerationOutput:
    tokens: list[int]  # generated ids, the stop token excluded
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens or the model's context)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF / official Qwen rule on tokens already seen: positive logits divided by `penalty`, negative multiplied."""
    if penalty == 1.0:
        return logits
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pen, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-k and outside the smallest set of probability >= top_p set to -inf.
    The most likely token always survives."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _count_images(ids: Sequence[int], img_start: int) -> int:
    return sum(1 for i in ids if i == img_start)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[torch.Tensor]] | None = None,
    config: GenerationConfig | None = None,
    streamer: Streamer | None = None,
) -> list[GenerationOutput]:
    """Continue every prompt (token ids, image spans included) and return the generated ids per prompt.

    images[i]: the pixel tensors [3,S,S] of prompt i's image spans in order (none: text-only prompts).
    """
    cfg = (config or GenerationConfig()).validate()
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt (give at least one token)")
    ids_cfg = model.cfg.ids
    images = images if images is not None else [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(images)} image lists")
    for i, (p, im) in enumerate(zip(prompts, images)):
        n = _count_images(p, ids_cfg.img_start)
        if n != len(im):
            raise ValueError(f"generate: prompt {i} has {n} image spans but {len(im)} images were given")
    default_stop = [ids_cfg.im_end, ids_cfg.eod, ids_cfg.im_start]
    stop = torch.tensor(list(cfg.stop_ids) if cfg.stop_ids is not None else default_stop)
    p0 = next(model.parameters())
    device = p0.device
    stop = stop.to(device)
    B, T = len(prompts), max(len(p) for p in prompts)
    budget = min(cfg.max_new_tokens, max(0, model.cfg.llm.max_position - T))
    input_ids = torch.full((B, T), ids_cfg.eod, dtype=torch.long)
    seg = torch.zeros((B, T), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        input_ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        seg[i, T - len(p):] = 1
    input_ids, seg = input_ids.to(device), seg.to(device)
    pos = (seg.cumsum(1) - 1).clamp(min=0)
    flat = [t for im in images for t in im]
    # float pixels are taken as normalised, uint8 ones are normalised by the model (QwenVL.encode_images)
    pixels = torch.stack(flat).to(device) if flat else None

    vocab = model.cfg.llm.vocab_size
    seen = torch.zeros((B, vocab), dtype=torch.bool, device=device)
    if cfg.repetition_penalty != 1.0:
        real = seg.bool()
        rows = torch.arange(B, device=device)[:, None].expand(B, T)
        seen[rows[real], input_ids[real].clamp(max=vocab - 1)] = True
    gens = None
    if cfg.do_sample:
        gens = [torch.Generator(device=device).manual_seed(cfg.seed) for _ in range(B)]

    cache = KVCache(len(model.llm.h))
    hidden = model.llm(model.embed_inputs(input_ids, pixels), position_ids=pos, segment_ids=seg, kv_cache=cache)
    next_pos = pos[:, -1:] + 1
    out: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(budget):
        logits = model.llm.logits(hidden[:, -1]).float()
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        if cfg.do_sample:
            logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
            probs = logits.softmax(-1)
            tok = torch.cat([torch.multinomial(probs[i], 1, generator=gens[i]) for i in range(B)])
        else:
            tok = logits.argmax(-1)
        is_stop = torch.isin(tok, stop)
        tok_list, stop_list, done_list = tok.tolist(), is_stop.tolist(), done.tolist()
        for i in range(B):
            if done_list[i]:
                continue
            if stop_list[i]:
                finish[i] = "stop"
            else:
                out[i].append(tok_list[i])
                if streamer is not None:
                    streamer(i, tok_list[i])
        done |= is_stop
        if bool(done.all()):
            break
        tok = torch.where(done, torch.full_like(tok, ids_cfg.eod), tok)  # finished rows feed a dummy token
        seen[torch.arange(B, device=device), tok] = True
        hidden = model.llm(model.llm.embed(tok[:, None]), position_ids=next_pos,
                           segment_ids=torch.ones_like(tok)[:, None], kv_cache=cache)
        next_pos = next_pos + 1
    return [GenerationOutput(o, f) for o, f in zip(out, finish)]


class TextStreamer:
    """Turns streamed token ids of one row into text pieces: decodes everything generated so far and hands out
    the new suffix, holding back an incomplete UTF-8 character (a CJK character can span several tokens)."""

    def __init__(self, decode: Callable[[list[int]], str], emit: Callable[[str], None]) -> None:
        self.decode, self.emit = decode, emit
        self.ids: list[int] = []
        self.sent = 0

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)

    def flush(self) -> None:
        text = self.decode(self.ids)
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)
