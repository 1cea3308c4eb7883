"""Qwen-VL: vision tower + adapter + decoder, with image features written into `<img>` spans.

Each `<img>` token is followed by `n_queries` (256) slot tokens and `</img>`; the slot embeddings
are replaced by the adapter output of the matching image (images ordered as their `<img>` tokens
appear scanning rows in order). Training loss is a shifted, chunked cross-entropy that also
ignores targets crossing a packed-segment boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter
from .config import QwenVLConfig
from .llm import KVCache, QwenLM
from .loss import IGNORE_INDEX
from .vision import VisionTower

# CLIP mean/std of the pixel normalisation: the same numbers as data.images.OPENAI_DATASET_MEAN / _STD (the
# model package must not import data/; tests/test_images.py keeps the two copies equal).
PIXEL_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
_PIXEL_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> fp32 CLIP-normalised on the pixels' device (the ops of data.images.normalize,
    bit-identical). The [3,1,1] constants are copied to a device once per process, not per call."""
    stats = _PIXEL_STATS.get(pixels.device)
    if stats is None:
        stats = tuple(torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(pixels.device) for v in (PIXEL_MEAN,
                                                                                                     PIXEL_STD))
        _PIXEL_STATS[pixels.device] = stats
    t = pixels.to(torch.float32).div(255)
    return t.sub_(stats[0]).div_(stats[1])


class ModelOutput(dict):
    """The model's outputs, read as attributes. A dict (not a dataclass) because DeepSpeed's ZeRO-3 module
    hooks find the tensors inside tuples, lists and dicts only; inside any other type they warn and skip them.

    loss: mean CE over valid target tokens (fp32); loss_sum: its sum; n_tokens: valid target tokens (Long);
    row_loss_sum / row_n_tokens: [B] per-row sums and counts (per-task logging); logits: [B,T,V] when no labels.
    """

    FIELDS = ("loss", "loss_sum", "n_tokens", "row_loss_sum", "row_n_tokens", "logits")

    def __init__(self, **values: torch.Tensor | None) -> None:
        unknown = set(values) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"ModelOutput: unknown field(s) {sorted(unknown)}")
        super().__init__({k: values.get(k) for k in self.FIELDS})

    def __getattr__(self, name: str) -> torch.Tensor | None:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _requires_grad(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


def shift_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """targets[t] = labels[t+1]; -100 at the last position, at padding, and across segment boundaries."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if segment_ids is not None:
        cross = torch.ones_like(labels, dtype=torch.bool)
        cross[:, :-1] = (segment_ids[:, 1:] != segment_ids[:, :-1]) | (segment_ids[:, :-1] == 0)
        targets = targets.masked_fill(cross, IGNORE_INDEX)
    return targets


class QwenVL(nn.Module):
    def __init__(self, cfg: QwenVLConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.adapter = Adapter(cfg.adapter, kv_dim=cfg.vision.width, dim=cfg.llm.hidden)
        self.llm = QwenLM(cfg.llm)
        # Run the image path on a zero-weighted dummy image in every training forward without images, even
        # when the tower and adapter are frozen: under parameter sharding (ZeRO-3) their forward gathers
        # parameters collectively, so a rank that skipped it would leave the others waiting.
        self.always_run_image_path = False

    # ---- helpers -------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> dict[str, int]:
        """Parameter counts per submodule plus the total (optionally only those requiring grad)."""

        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)

        out = {"visual": count(self.visual), "adapter": count(self.adapter), "llm": count(self.llm)}
        out["total"] = sum(out.values())
        return out

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.llm.set_grad_checkpointing(enabled)
        if hasattr(self.visual, "set_grad_checkpointing"):
            self.visual.set_grad_checkpointing(enabled)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [N,3,S,S] -> [N, n_queries, hidden]. A frozen tower runs without an autograd graph.

        ``uint8`` pixels (what the data pipeline delivers: resized, not normalised) are moved to the device as
        they are (a quarter of the fp32 bytes) and CLIP-normalised there; float pixels are taken as already
        normalised (callers and tests that build their own tensors)."""
        p = next(self.visual.parameters())
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_pixels(pixel_values.to(p.device, non_blocking=True))
        pixel_values = pixel_values.to(device=p.device, dtype=p.dtype)
        if _requires_grad(self.visual):
            feats = self.visual(pixel_values)
        else:
            with torch.no_grad():
                feats = self.visual(pixel_values)
        return self.adapter(feats)

    def _image_slots(self, input_ids: torch.Tensor, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate image spans; return (rows, cols) [N, n_queries] of the slot positions in row-major order.

        Host syncs (``nonzero``, ``int``, ``bool``): the training forward calls it only with
        ``cfg.debug_checks`` (the data pipeline validates every sample on the host instead:
        ``data.packing.check_sample``); ``_slot_mask`` places the features without syncs."""
        ids, q = self.cfg.ids, self.cfg.adapter.n_queries
        B, T = input_ids.shape
        starts = (input_ids == ids.img_start).nonzero()  # row-major order
        n_end = int((input_ids == ids.img_end).sum())
        if starts.shape[0] != n_images:
            raise ValueError(
                f"batch has {starts.shape[0]} <img> tokens (id {ids.img_start}) but {n_images} images in "
                f"pixel_values; rows with <img>: {sorted(set(starts[:, 0].tolist()))}"
            )
        if n_end != n_images:
            raise ValueError(f"batch has {n_end} </img> tokens (id {ids.img_end}) but {n_images} images")
        if n_images == 0:
            empty = input_ids.new_zeros((0, q))
            return empty, empty
        rows, pos = starts[:, 0], starts[:, 1]
        end = pos + q + 1
        ok_len = end < T
        end_tok = input_ids[rows, end.clamp(max=T - 1)]
        bad = ~(ok_len & (end_tok == ids.img_end))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"image span at row {int(rows[i])}, position {int(pos[i])}: <img> must be followed by {q} "
                f"slot tokens and </img> (id {ids.img_end}) at position {int(end[i])}"
                + ("" if bool(ok_len[i]) else f", but the row has only {T} tokens (span truncated)")
            )
        cols = pos[:, None] + 1 + torch.arange(q, device=input_ids.device)
        return rows[:, None].expand(-1, q), cols

    def _slot_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B,T] bool: the ``n_queries`` positions after every ``<img>``, without a host sync (cumsum of the
        ``<img>`` indicator: position t is a slot iff an ``<img>`` lies in [t - q, t - 1])."""
        q, T = self.cfg.adapter.n_queries, input_ids.shape[1]
        c = (input_ids == self.cfg.ids.img_start).to(torch.int32).cumsum(1)
        before = F.pad(c, (1, 0))[:, :T]  # starts at positions <= t - 1
        too_far = F.pad(c, (q + 1, 0))[:, :T]  # starts at positions <= t - 1 - q
        return before > too_far

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     check: bool | None = None) -> torch.Tensor:
        """Token embeddings with adapter outputs written into the image slots (row-major image order).

        ``check`` (default ``cfg.debug_checks``): validate the image spans against ``pixel_values`` first
        (host syncs; training batches are validated by the data pipeline). Unchecked, the features go into the
        slots by a masked scatter, which needs no host sync."""
        embeds = self.llm.embed(input_ids)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if self.cfg.debug_checks if check is None else check:
            self._image_slots(input_ids, n_images)
        if n_images > 0:
            feats = self.encode_images(pixel_values)
            mask = self._slot_mask(input_ids)[..., None]
            embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        elif torch.is_grad_enabled() and (self.always_run_image_path or _requires_grad(self.visual)
                                          or _requires_grad(self.adapter)):
            # No image here, but trainable vision/adapter params must still get (zero) gradients so a
            # data-parallel rank without images joins the gradient all-reduce instead of hanging.
            s = self.cfg.vision.image_size
            p = next(self.visual.parameters())
            dummy = self.encode_images(torch.zeros(1, 3, s, s, device=p.device, dtype=p.dtype))
            embeds = embeds + 0.0 * dummy.sum().to(embeds.dtype)
        return embeds

    # ---- training / scoring ---------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B,T], got shape {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}")
        embeds = self.embed_inputs(input_ids, pixel_values)
        hidden = self.llm(embeds, position_ids=position_ids, segment_ids=segment_ids)
        if labels is None:
            return ModelOutput(logits=self.llm.logits(hidden))
        B, T, H = hidden.shape
        targets = shift_targets(labels, segment_ids)
        head = self.llm.lm_head(hidden.reshape(B * T, H), targets.reshape(-1), self.cfg.loss_chunk_tokens,
                                self.cfg.loss_impl)
        loss_sum = head.loss_sum  # differentiable; the per-token losses are a detached side output
        row_loss_sum = None if head.per_token is None else head.per_token.view(B, T).sum(1)
        row_n = (targets != IGNORE_INDEX).sum(1)
        n = row_n.sum()
        return ModelOutput(
            loss=loss_sum / n.clamp(min=1),
            loss_sum=loss_sum,
            n_tokens=n,
            row_loss_sum=row_loss_sum,
            row_n_tokens=row_n,
        )

    # ---- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_id: int | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with a KV cache. Returns [B, T + n_generated] (prompt included).

        attention_mask [B,T] (1 = token, 0 = pad) allows left-padded batches. Finished rows are
        filled with the first eos id. Stops when every row has produced an eos or after max_new_tokens.
        """
        eos = self.cfg.ids.eod if eos_id is None else eos_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        B, T = input_ids.shape
        seg = pos = None
        if attention_mask is not None:
            if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                raise ValueError("generate: attention_mask must be left-padded (zeros before ones)")
            seg = attention_mask.long()
            pos = (seg.cumsum(1) - 1).clamp(min=0)
        cache = KVCache(len(self.llm.h))
        embeds = self.embed_inputs(input_ids, pixel_values, check=True)  # user prompts: a clear error, not garbage
        hidden = self.llm(embeds, position_ids=pos, segment_ids=seg, kv_cache=cache)
        next_pos = pos[:, -1:] + 1 if pos is not None else None
        out, done = [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            tok = self.llm.logits(hidden[:, -1]).argmax(-1)
            tok = torch.where(done, eos_ids[0], tok)
            out.append(tok)
            done |= torch.isin(tok, eos_ids)
            if bool(done.all()):
                break
            step_seg = torch.ones_like(tok)[:, None] if seg is not None else None
            hidden = self.llm(self.llm.embed(tok[:, None]), position_ids=next_pos, segment_ids=step_seg,
                              kv_cache=cache)
            if next_pos is not None:
                next_pos = next_pos + 1
        if not out:
            return input_ids
        return torch.cat([input_ids, torch.stack(out, 1)], dim=1)
