"""Prompt text -> token ids with image spans, in the official formats (SPEC §3, §6).

`<img>X</img>` anywhere in the text becomes a 258-token image span (`QwenTokenizer.image_span(X)`: the path's
bytes in the slots, as the official tokenizer stores them); X is handed back so the caller can load the image.
Other text is encoded with only the grounding markup (`<ref>`, `<box>`, `<quad>` and their closing tags) as
special tokens, like the training samples (data/samples.py): a literal `<|im_end|>` typed by a user stays text
and cannot end their turn.

ChatML (`chatml_ids`) is tokenised piecewise exactly as data/samples.py builds stage-3 samples (role, newline and
content encoded separately), so a prompt at inference has the ids the model was trained on:
    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    <|im_start|>user\nPicture 1: <img>a.jpg</img>\nWhat is this?<|im_end|>\n
    <|im_start|>assistant\n
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from data.samples import DEFAULT_SYSTEM, MARKUP
from data.tokenizer import QwenTokenizer

_IMG_RE = re.compile(r"<img>(.*?)</img>", re.S)
ROLES = ("user", "assistant")


def encode_with_images(tok: QwenTokenizer, text: str) -> tuple[list[int], list[str]]:
    """Text with `<img>X</img>` -> (ids with image spans, [X, ...] in span order)."""
    ids: list[int] = []
    paths: list[str] = []
    pos = 0
    for m in _IMG_RE.finditer(text):
        if m.start() > pos:
            ids += tok.encode(text[pos:m.start()], special=MARKUP)
        path = m.group(1).strip()
        if not path:
            raise ValueError("empty <img></img> in the prompt (write <img>path/to/image</img>)")
        ids += tok.image_span(path)
        paths.append(path)
        pos = m.end()
    if pos < len(text):
        ids += tok.encode(text[pos:], special=MARKUP)
    return ids, paths


def user_content(query: str, images: Sequence[str] = ()) -> str:
    """The official query layout (tokenizer.from_list_format): `Picture i: <img>path</img>\\n` per image, then text."""
    head = "".join(f"Picture {i}: <img>{p}</img>\n" for i, p in enumerate(images, 1))
    return head + query


def chatml_ids(tok: QwenTokenizer, messages: Sequence[tuple[str, str]], system: str = DEFAULT_SYSTEM,
               add_generation_prompt: bool = True) -> tuple[list[int], list[str]]:
    """[(role, content)] (roles user/assistant, content with `<img>` spans) -> (ids, image paths in span order).
    add_generation_prompt: end with `<|im_start|>assistant\\n` for the model to continue."""
    nl = tok.encode("\n", special=False)
    ids = [tok.im_start_id, *tok.encode("system", special=False), *nl, *tok.encode(system, special=MARKUP),
           tok.im_end_id, *nl]
    paths: list[str] = []
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
        body, p = encode_with_images(tok, content)
        ids += [tok.im_start_id, *tok.encode(role, special=False), *nl, *body, tok.im_end_id, *nl]
        paths += p
    if add_generation_prompt:
        ids += [tok.im_start_id, *tok.encode("assistant", special=False), *nl]
    return ids, paths
