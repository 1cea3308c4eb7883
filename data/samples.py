"""Per-stage sample building (SPEC §3): raw shard sample -> token ids, labels and image tensors.

Label convention (HF): ``labels[i] == input_ids[i]`` where position i is a trained target, -100 elsewhere;
the model shifts. Every image occupies a 258-token span (``<img>`` + 256 slots + ``</img>``) built with
``QwenTokenizer.image_span`` and gets one ``uint8 [3,S,S]`` tensor in ``Sample.images`` (span order; resized,
not normalised: the model normalises on the device, see ``data.images``).

Stage 1 (``caption`` only): ``<img>P</img>`` + caption + ``<|endoftext|>``; loss on caption + eod.
Stage 2: the SPEC §3 multitask templates below; prompt not in the loss, target + eod in the loss; pure text
is all in the loss. The instruction language follows ``meta["lang"]``: English prompts are exactly SPEC's;
``zh`` samples get SPEC's English wording with "in Chinese" (``zh_prompts="english"``, default: what the
official checkpoints were trained and are evaluated with) or Chinese-language instructions (``"chinese"``).
Stage 3: ChatML (SPEC §3) for ``chat`` samples; loss on assistant content + ``<|im_end|>`` + ``\\n``
(``official_loss=True`` also trains what the official finetune.py trains: ``<|im_start|>`` of every turn and
``<|im_end|>``, ``\\n`` of system/user turns, and, like its ``preprocess()``, drops a first message that is not
from the user). Pieces are tokenised separately exactly as finetune.py does (role, newline, content) so ids
match the official pipeline. Conversation text is used verbatim (the official format already carries
``Picture N: `` labels); every ``<img>X</img>`` becomes an image span, ``X`` resolved to a shard member. An
image span is never in the loss, inside an assistant turn too (official trains on its slot ids there: see
docs/DESIGN.md "Official compatibility"). Stage-2 task samples in stage 3 use the stage-2 templates.

Text from data is encoded with only the grounding markup (``<ref>``, ``<box>``, ``<quad>`` and their closing
tags) as special tokens: a stray ``<|im_end|>`` or ``<|endoftext|>`` in a caption stays plain text, so data
can never forge chat structure or end-of-document tokens.

Anything unusable raises ``SkipSample(reason, key, message)``; reasons are listed in ``SKIP_REASONS``.
The builder has no hidden state: the same raw sample always gives the same Sample (the only random choice,
``vqa_answer="sample"``, is seeded from ``(seed, key)``), which exact resume relies on.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from data.boxes import GRID, InvalidBox, format_box, format_quad, format_ref, parse_boxes
from data.images import DEFAULT_MAX_PIXELS, IMAGE_REASONS, ImageError, load_image, to_uint8
from data.loader import RawSample
from data.sanity import sample_problem
from data.tasks import LANGS, STAGE2_TASKS, TASKS
from data.tokenizer import QwenTokenizer

IGNORE = -100
IMAGE_SPAN_LEN = 258
MARKUP = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")  # allowed as special ids in data text
DEFAULT_SYSTEM = "You are a helpful assistant."

SKIP_REASONS: tuple[str, ...] = (
    "unknown_task",        # meta task not in data.tasks.TASKS
    "task_not_in_stage",   # e.g. chat in stage 1/2, anything but caption in stage 1
    "missing_key",         # a required metadata field is absent
    "bad_value",           # a field has the wrong type / value (lang, answers, markup inside a phrase ...)
    "empty_text",          # empty caption / answer / text / no assistant content
    "invalid_box",         # box / quad not 4 / 8 ints in [0,1000) with positive extent
    "bad_markup",          # unbalanced <ref>/<box> tags in a grounded caption
    "bad_conversation",    # malformed turn (role, value)
    "missing_image",       # referenced image member not in the sample
    "bad_member_name",     # sample key is an absolute path or has a '..' component (data.sanity)
    "invalid_unicode",     # a metadata string holds a lone surrogate (data.sanity), never silently replaced
    *IMAGE_REASONS,        # from data.images.load_image: empty/corrupt/truncated/too_many_pixels/unsupported
    "too_long",            # longer than max_len (truncate="drop", or no trained label fits)
    "image_span_cut",      # truncate="shorten" could only cut inside the first image span
)

# Stage-2 instructions. English: exactly SPEC §3. "chinese": Chinese-language instructions for zh samples.
_PROMPTS: dict[str, dict[str, str]] = {
    "en": {"caption": "Generate the caption in English:",
           "grounded_caption": "Generate the caption in English with grounding:",
           "vqa": "{question} Answer:", "vqa_target": " {answer}",
           "region": "<ref>This</ref>{box} is", "region_target": " {description}",
           "ocr": "OCR with grounding:"},
    "chinese": {"caption": "生成中文图片描述：",
                "grounded_caption": "生成带定位框的中文图片描述：",
                "vqa": "{question}回答：", "vqa_target": "{answer}",
                "region": "<ref>这</ref>{box}是", "region_target": "{description}",
                "ocr": "带定位框的文字识别："},
    "english": {"caption": "Generate the caption in Chinese:",
                "grounded_caption": "Generate the caption in Chinese with grounding:",
                "vqa": "{question} Answer:", "vqa_target": " {answer}",
                "region": "<ref>This</ref>{box} is", "region_target": " {description}",
                "ocr": "OCR with grounding:"},
}
_ROLES = {"user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
_IMG_RE = re.compile(r"<img>(.*?)</img>", re.S)


@dataclass
class Sample:
    """One tokenised training sample (see the module doc for the label convention)."""

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor] = field(default_factory=list)
    task: str = ""
    ref: list[Any] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


class SkipSample(Exception):
    """A raw sample that cannot become a training sample: `reason` (one of SKIP_REASONS), `key`, message."""

    def __init__(self, reason: str, key: str, message: str = ""):
        self.reason, self.key, self.message = reason, key, message
        super().__init__(f"sample {key!r}: {reason}" + (f": {message}" if message else ""))

    def __reduce__(self) -> tuple:  # survive the trip back from a process-pool worker
        return (type(self), (self.reason, self.key, self.message))


@lru_cache(maxsize=4)
def _tokenizer(path: str | None) -> QwenTokenizer:
    """One tokenizer per process and path (loading the BPE ranks takes ~0.5 s; builders are many)."""
    return QwenTokenizer(path)


# A token piece: ("text", ids, trained) or ("image", member) — assembled into ids/labels at the end.
_Piece = tuple


class SampleBuilder:
    """Callable raw sample -> Sample for one training stage; raises SkipSample. Picklable (the tokenizer is
    created lazily in each process)."""

    def __init__(self, stage: int, tokenizer_path: str | os.PathLike | None, image_size: int, max_len: int, *,
                 seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, truncate: str = "drop",
                 system: str = DEFAULT_SYSTEM, official_loss: bool = False, zh_prompts: str = "english",
                 vqa_answer: str = "first"):
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        if truncate not in ("drop", "shorten"):
            raise ValueError(f"truncate must be 'drop' or 'shorten', got {truncate!r}")
        if zh_prompts not in ("chinese", "english"):
            raise ValueError(f"zh_prompts must be 'chinese' or 'english', got {zh_prompts!r}")
        if vqa_answer not in ("first", "sample"):
            raise ValueError(f"vqa_answer must be 'first' or 'sample', got {vqa_answer!r}")
        if image_size <= 0 or max_len <= 0 or max_pixels <= 0:
            raise ValueError(f"image_size, max_len and max_pixels must be positive, got {image_size}, {max_len}, "
                             f"{max_pixels}")
        self.stage, self.image_size, self.max_len = stage, int(image_size), int(max_len)
        self.tokenizer_path = None if tokenizer_path is None else os.fspath(tokenizer_path)
        self.seed, self.max_pixels, self.truncate = int(seed), int(max_pixels), truncate
        self.system, self.official_loss = system, bool(official_loss)
        self.zh_prompts, self.vqa_answer = zh_prompts, vqa_answer
        self._tok: QwenTokenizer | None = None

    # ---- pickling: never ship the tokenizer (tiktoken) to workers
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    @property
    def tok(self) -> QwenTokenizer:
        if self._tok is None:
            self._tok = _tokenizer(self.tokenizer_path)
        return self._tok

    # ---- entry point
    def __call__(self, raw: RawSample) -> Sample:
        meta = raw.meta if isinstance(raw.meta, dict) else {}
        problem = sample_problem(raw.key, meta)
        if problem:
            raise self._skip(raw, *problem)
        task = meta.get("task")
        if task is None:
            raise self._skip(raw, "missing_key", "metadata has no 'task'")
        if task not in TASKS:
            raise self._skip(raw, "unknown_task", f"task {task!r} is not one of {TASKS}")
        if self.stage == 1:
            if task != "caption":
                raise self._skip(raw, "task_not_in_stage", f"stage 1 takes 'caption' samples, got {task!r}")
            pieces = self._stage1(raw)
        elif task == "chat":
            if self.stage != 3:
                raise self._skip(raw, "task_not_in_stage", "'chat' (ChatML SFT) samples belong to stage 3")
            pieces = self._chat(raw)
        else:
            assert task in STAGE2_TASKS
            pieces = self._stage2(raw, task)
        return self._assemble(raw, task, pieces)

    # ---- helpers
    @staticmethod
    def _skip(raw: RawSample, reason: str, msg: str) -> SkipSample:
        return SkipSample(reason, raw.key, f"{msg} ({raw.url} #{raw.index})")

    def _enc(self, text: str) -> list[int]:
        """Data text: grounding markup -> special ids, every other special-token string stays plain text."""
        return self.tok.encode(text, special=MARKUP) if text else []

    def _field(self, raw: RawSample, name: str, *, strip: bool = True) -> str:
        if name not in raw.meta:
            raise self._skip(raw, "missing_key", f"task {raw.meta.get('task')!r} needs {name!r}")
        v = raw.meta[name]
        if not isinstance(v, str):
            raise self._skip(raw, "bad_value", f"{name!r} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise self._skip(raw, "empty_text", f"{name!r} is empty")
        return v.strip() if strip else v

    def _image_member(self, raw: RawSample) -> str:
        """The single image of a stage-1/2 sample."""
        images = raw.meta.get("images")
        if images is None:
            raise self._skip(raw, "missing_key", "metadata has no 'images'")
        if not isinstance(images, list) or not all(isinstance(m, str) for m in images):
            raise self._skip(raw, "bad_value", f"'images' must be a list of member names, got {images!r}")
        if not images:
            raise self._skip(raw, "missing_image", f"task {raw.meta.get('task')!r} needs an image, 'images' is []")
        if images[0] not in raw.files:
            raise self._skip(raw, "missing_image", f"member {images[0]!r} is not in the sample "
                                                   f"(has {sorted(raw.files)})")
        return images[0]

    def _prompts(self, raw: RawSample) -> dict[str, str]:
        if "lang" not in raw.meta:
            raise self._skip(raw, "missing_key", "metadata has no 'lang'")
        lang = raw.meta["lang"]
        if lang not in LANGS:
            raise self._skip(raw, "bad_value", f"lang {lang!r} is not one of {LANGS}")
        return _PROMPTS["en" if lang == "en" else self.zh_prompts]

    def _box(self, raw: RawSample, v: Any, what: str) -> str:
        if not (isinstance(v, (list, tuple)) and len(v) == 4):
            raise self._skip(raw, "invalid_box", f"{what} must be [x1,y1,x2,y2], got {v!r}")
        try:
            text = format_box(v)  # ints in [0, GRID)
        except InvalidBox as e:
            raise self._skip(raw, "invalid_box", f"{what}: {e}") from None
        if not (v[2] > v[0] and v[3] > v[1]):
            raise self._skip(raw, "invalid_box", f"{what} {list(v)} has no positive width/height")
        return text

    def _ref(self, raw: RawSample, phrase: str, what: str) -> str:
        try:
            return format_ref(phrase)
        except ValueError as e:
            raise self._skip(raw, "bad_value", f"{what}: {e}") from None

    # ---- stage 1
    def _stage1(self, raw: RawSample) -> list[_Piece]:
        caption = self._field(raw, "caption")
        member = self._image_member(raw)
        return [("image", member), ("text", self._enc(caption), True), ("text", [self.tok.eod_id], True)]

    # ---- stage 2 templates
    def _stage2(self, raw: RawSample, task: str) -> list[_Piece]:
        if task == "text":
            text = self._field(raw, "text", strip=False)
            return [("text", self.tok.encode(text, special=False), True), ("text", [self.tok.eod_id], True)]
        p = self._prompts(raw)
        if task == "caption":
            prompt, target = p["caption"], self._field(raw, "caption")
        elif task == "grounded_caption":
            prompt, target = p["grounded_caption"], self._field(raw, "caption")
            self._check_grounded(raw, target)
        elif task == "vqa":
            question = self._field(raw, "question")
            prompt, target = p["vqa"].format(question=question), p["vqa_target"].format(answer=self._answer(raw))
        elif task == "ref_grounding":
            if "box" not in raw.meta:
                raise self._skip(raw, "missing_key", "task 'ref_grounding' needs 'box'")
            prompt = self._ref(raw, self._field(raw, "expression"), "'expression'")
            target = self._box(raw, raw.meta["box"], "'box'")
        elif task == "region_caption":
            if "box" not in raw.meta:
                raise self._skip(raw, "missing_key", "task 'region_caption' needs 'box'")
            prompt = p["region"].format(box=self._box(raw, raw.meta["box"], "'box'"))
            target = p["region_target"].format(description=self._field(raw, "description"))
        elif task == "ocr":
            prompt, target = p["ocr"], self._ocr_target(raw)
        else:  # pragma: no cover - STAGE2_TASKS is exhaustive above
            raise self._skip(raw, "unknown_task", f"no stage-2 template for {task!r}")
        member = self._image_member(raw)
        return [("image", member), ("text", self._enc(prompt), False), ("text", self._enc(target), True),
                ("text", [self.tok.eod_id], True)]

    def _answer(self, raw: RawSample) -> str:
        if "answers" not in raw.meta:
            raise self._skip(raw, "missing_key", "task 'vqa' needs 'answers'")
        answers = raw.meta["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise self._skip(raw, "bad_value", f"'answers' must be a list of strings, got {answers!r}")
        if self.vqa_answer == "first":  # DESIGN: the first answer is the training answer
            if not answers or not answers[0].strip():
                raise self._skip(raw, "empty_text", "first answer is empty")
            return answers[0].strip()
        usable = [a.strip() for a in answers if a.strip()]
        if not usable:
            raise self._skip(raw, "empty_text", "no non-empty answer")
        # seeded from (seed, key): re-processing this sample (e.g. after resume) picks the same answer
        return random.Random(f"vqa/{self.seed}/{raw.key}").choice(usable)

    def _check_grounded(self, raw: RawSample, caption: str) -> None:
        for a, b in (("<ref>", "</ref>"), ("<box>", "</box>")):
            if caption.count(a) != caption.count(b):
                raise self._skip(raw, "bad_markup", f"unbalanced {a}..{b} in caption {caption!r}")
        if "<quad>" in caption or "</quad>" in caption:
            raise self._skip(raw, "bad_markup", "grounded caption contains <quad>")
        boxes = parse_boxes(caption)
        if len(boxes) != caption.count("<box>"):
            raise self._skip(raw, "invalid_box", f"malformed <box> in caption {caption!r}")
        for b in boxes:
            if not (all(0 <= v < GRID for v in b) and b[2] > b[0] and b[3] > b[1]):
                raise self._skip(raw, "invalid_box", f"box {b} in caption is outside [0,{GRID}) or empty")

    def _ocr_target(self, raw: RawSample) -> str:
        if "lines" not in raw.meta:
            raise self._skip(raw, "missing_key", "task 'ocr' needs 'lines'")
        lines = raw.meta["lines"]
        if not isinstance(lines, list):
            raise self._skip(raw, "bad_value", f"'lines' must be a list, got {type(lines).__name__}")
        if not lines:
            raise self._skip(raw, "empty_text", "'lines' is empty")
        out = []
        for i, ln in enumerate(lines):
            if not isinstance(ln, dict):
                raise self._skip(raw, "bad_value", f"lines[{i}] must be a dict, got {ln!r}")
            for k in ("text", "quad"):
                if k not in ln:
                    raise self._skip(raw, "missing_key", f"lines[{i}] has no {k!r}")
            if not isinstance(ln["text"], str):
                raise self._skip(raw, "bad_value", f"lines[{i}].text must be a string")
            if not ln["text"].strip():
                raise self._skip(raw, "empty_text", f"lines[{i}].text is empty")
            q = ln["quad"]
            try:
                quad = format_quad(q) if isinstance(q, (list, tuple)) else format_quad([])
            except InvalidBox as e:
                raise self._skip(raw, "invalid_box", f"lines[{i}].quad: {e}") from None
            out.append(self._ref(raw, ln["text"], f"lines[{i}].text") + quad)
        return "".join(out)

    # ---- stage 3: ChatML
    def _resolve(self, raw: RawSample, ref: str) -> str:
        """`<img>X</img>` -> member name: the member itself, ``KEY.member`` or a path whose file name is a member
        (official JSON paths kept in shards written by other tools)."""
        x = ref.strip()
        names = set(raw.files)
        listed = raw.meta.get("images")
        if isinstance(listed, list):
            names |= {m for m in listed if isinstance(m, str)}
        for cand in (x, x[len(raw.key) + 1:] if x.startswith(raw.key + ".") else None, os.path.basename(x)):
            if cand and cand in names:
                if cand not in raw.files:
                    raise self._skip(raw, "missing_image", f"<img>{ref}</img>: member {cand!r} is not in the sample")
                return cand
        raise self._skip(raw, "missing_image", f"<img>{ref}</img> names no member of the sample "
                                               f"(has {sorted(raw.files)})")

    def _content(self, raw: RawSample, value: str, trained: bool) -> list[_Piece]:
        pieces: list[_Piece] = []
        pos = 0
        for m in _IMG_RE.finditer(value):
            if m.start() > pos:
                pieces.append(("text", self._enc(value[pos:m.start()]), trained))
            pieces.append(("image", self._resolve(raw, m.group(1))))
            pos = m.end()
        if pos < len(value):
            pieces.append(("text", self._enc(value[pos:]), trained))
        return pieces

    def _chat(self, raw: RawSample) -> list[_Piece]:
        if "conversations" not in raw.meta:
            raise self._skip(raw, "missing_key", "task 'chat' needs 'conversations'")
        conv = raw.meta["conversations"]
        if not isinstance(conv, list):
            raise self._skip(raw, "bad_value", f"'conversations' must be a list, got {type(conv).__name__}")
        t = self.tok
        nl = t.encode("\n", special=False)
        off = self.official_loss
        # system turn: official trains <|im_start|>, <|im_end|>, \n only under official_loss
        pieces: list[_Piece] = [("text", [t.im_start_id], off),
                                ("text", t.encode("system", special=False) + nl + self._enc(self.system), False),
                                ("text", [t.im_end_id] + nl, off)]
        has_target = False
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise self._skip(raw, "bad_conversation", f"conversations[{i}] is not a dict: {turn!r}")
            role = _ROLES.get(turn.get("from"))  # type: ignore[arg-type]
            value = turn.get("value")
            if role is None:
                raise self._skip(raw, "bad_conversation", f"conversations[{i}] has role {turn.get('from')!r}")
            if not isinstance(value, str):
                raise self._skip(raw, "bad_conversation", f"conversations[{i}].value is not a string")
            if off and i == 0 and role != "user":
                continue  # official preprocess() drops a first message not from the user (that one only)
            is_asst = role == "assistant"
            has_target |= is_asst and bool(_IMG_RE.sub("", value).strip())
            pieces.append(("text", [t.im_start_id], off))
            pieces.append(("text", t.encode(role, special=False) + nl, False))
            pieces += self._content(raw, value, is_asst)
            pieces.append(("text", [t.im_end_id] + nl, is_asst or off))
        if not has_target:
            raise self._skip(raw, "empty_text", "no non-empty assistant turn (nothing to train on)")
        return pieces

    # ---- assembly, truncation, images
    def _assemble(self, raw: RawSample, task: str, pieces: list[_Piece]) -> Sample:
        ids: list[int] = []
        labels: list[int] = []
        spans: list[tuple[int, str]] = []  # (start, member)
        for p in pieces:
            if p[0] == "image":
                spans.append((len(ids), p[1]))
                span = self.tok.image_span(p[1])
                ids += span
                labels += [IGNORE] * len(span)
            else:
                ids += p[1]
                labels += list(p[1]) if p[2] else [IGNORE] * len(p[1])
        if not any(lab != IGNORE for lab in labels[1:]):  # labels[0] is never a target after the shift
            raise self._skip(raw, "empty_text", "no trained token")
        if len(ids) > self.max_len:
            cut = self._cut(raw, ids, labels, spans)
            ids, labels = ids[:cut], labels[:cut]
            spans = [(s, m) for s, m in spans if s + IMAGE_SPAN_LEN <= cut]
        images = self._images(raw, [m for _, m in spans])
        return Sample(input_ids=ids, labels=labels, images=images, task=task, ref=raw.ref())

    def _cut(self, raw: RawSample, ids: list[int], labels: list[int], spans: list[tuple[int, str]]) -> int:
        n = len(ids)
        if self.truncate == "drop":
            raise self._skip(raw, "too_long", f"{n} tokens > max_len {self.max_len}")
        cut = self.max_len
        for s, _ in spans:  # never inside a span: move the cut back to the span's start
            if s < cut < s + IMAGE_SPAN_LEN:
                cut = s
        if not any(lab != IGNORE for lab in labels[1:cut]):
            reason = "image_span_cut" if cut < self.max_len else "too_long"
            raise self._skip(raw, reason, f"{n} tokens > max_len {self.max_len} and no cut at or before "
                                          f"{self.max_len} outside an image span keeps a trained token")
        return cut

    def _images(self, raw: RawSample, members: list[str]) -> list[torch.Tensor]:
        cache: dict[str, torch.Tensor] = {}
        out = []
        for m in members:
            if m not in cache:
                data = raw.files.get(m)
                if data is None:
                    raise self._skip(raw, "missing_image", f"member {m!r} is not in the sample")
                try:
                    img = load_image(data, name=f"{raw.key}.{m}", max_pixels=self.max_pixels)
                except ImageError as e:
                    raise self._skip(raw, e.reason, str(e)) from None
                cache[m] = to_uint8(img, self.image_size)  # normalised on the device
            out.append(cache[m])
        return out


__all__ = ["IGNORE", "IMAGE_SPAN_LEN", "SKIP_REASONS", "Sample", "SkipSample", "SampleBuilder"]
