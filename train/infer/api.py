"""The notebook API:

    from train.infer import load
    m = load("outputs/demo/demo_stage3/final")
    r = m.chat("Where is the red circle?", images=["shapes.png"]);  r.text, r.boxes;  r.draw("out.png")

`chat` speaks the official ChatML (prompts.chatml_ids) and keeps the history for the next turn (`history=r.history`);
`complete` continues a raw prompt such as the stage-2 / evaluation templates (`<img>P</img><ref>the cat</ref><box>`).
Boxes refer to the latest image of the conversation, as the official Qwen-VL-Chat draws them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data.images import load_image, to_tensor
from data.samples import DEFAULT_SYSTEM
from data.tokenizer import QwenTokenizer
from train.infer.draw import Grounding, draw_groundings, groundings
from train.infer.generation import GenerationConfig, GenerationOutput, TextStreamer, generate
from train.infer.loading import LoadedFrom, load_model
from train.infer.prompts import chatml_ids, encode_with_images, user_content

ImageLike = str | os.PathLike | Image.Image
# where the pixels of `<img>X</img>` come from: X -> PIL image
ImageResolver = Callable[[str], Image.Image]


def file_resolver(root: str | os.PathLike | None = None) -> ImageResolver:
    """Local files (relative to `root` or the working directory); no URLs (no network at run time)."""

    def resolve(path: str) -> Image.Image:
        if "://" in path:
            raise ValueError(f"<img>{path}</img>: only local image files are supported")
        p = Path(path) if root is None or os.path.isabs(path) else Path(root) / path
        try:
            data = p.read_bytes()
        except OSError as e:
            raise FileNotFoundError(f"image {p}: cannot read ({e.strerror or e})") from None
        return load_image(data, name=str(p))

    return resolve


@dataclass
class Reply:
    text: str  # decoded with the grounding markup kept (<ref>..</ref><box>..</box>)
    tokens: list[int]
    finish_reason: str
    boxes: list[Grounding] = field(default_factory=list)
    image: Image.Image | None = None  # the image the boxes' pixels refer to
    image_name: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)  # chat only: [(user content, reply)], this turn included

    def draw(self, out: str | os.PathLike | None = None) -> Image.Image:
        """The referred image with this reply's boxes drawn (saved to `out` when given)."""
        if self.image is None:
            raise ValueError("this reply refers to no image: nothing to draw on")
        return draw_groundings(self.image, self.boxes, out)


class VLModel:
    """A loaded model + tokenizer with chat / completion helpers (see the module doc)."""

    def __init__(self, model: torch.nn.Module, tokenizer: QwenTokenizer, source: LoadedFrom | None = None,
                 resolver: ImageResolver | None = None, generation: GenerationConfig | None = None) -> None:
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.resolver = resolver or file_resolver()
        self.generation = generation or GenerationConfig()
        self._images: dict[str, Image.Image] = {}

    @property
    def image_size(self) -> int:
        return self.model.cfg.vision.image_size

    # ---- images
    def _register(self, images: Sequence[ImageLike] | None) -> list[str]:
        """Names to write into `<img>..</img>`; in-memory PIL images get a stable synthetic name."""
        names = []
        for im in images or []:
            if isinstance(im, Image.Image):
                name = f"image-{id(im):x}.png"
                self._images[name] = im.convert("RGB")
            else:
                name = os.fspath(im)
            names.append(name)
        return names

    def image(self, name: str) -> Image.Image:
        if name not in self._images:
            self._images[name] = self.resolver(name)
        return self._images[name]

    def _pixels(self, names: Sequence[str]) -> list[torch.Tensor]:
        return [to_tensor(self.image(n), self.image_size) for n in names]

    # ---- generation
    def _config(self, overrides: dict[str, Any]) -> GenerationConfig:
        return replace(self.generation, **overrides) if overrides else self.generation

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=False)

    def _reply(self, out: GenerationOutput, names: Sequence[str]) -> Reply:
        text = self.decode(out.tokens)
        img_name = names[-1] if names else None
        img = self.image(img_name) if img_name is not None else None
        boxes = groundings(text, img.size if img is not None else None, img_name)
        return Reply(text, out.tokens, out.finish_reason, boxes, img, img_name)

    def complete_batch(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]] | None = None,
                       streamer: Callable[[int, int], None] | None = None, **gen: Any) -> list[Reply]:
        """Raw prompts (with `<img>X</img>`; images[i] are prepended as `<img>` spans when given) -> replies."""
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        ids, names = [], []
        for i, p in enumerate(prompts):
            extra = self._register(images[i]) if images is not None else []
            ii, nn = encode_with_images(self.tokenizer, "".join(f"<img>{n}</img>" for n in extra) + p)
            ids.append(ii)
            names.append(nn)
        outs = generate(self.model, ids, [self._pixels(n) for n in names], self._config(gen), streamer)
        return [self._reply(o, n) for o, n in zip(outs, names)]

    def complete(self, prompt: str, images: Sequence[ImageLike] | None = None,
                 stream: Callable[[str], None] | None = None, **gen: Any) -> Reply:
        ts = TextStreamer(self.decode, stream) if stream is not None else None
        r = self.complete_batch([prompt], [images or []], ts, **gen)[0]
        if ts is not None:
            ts.flush()
        return r

    def chat(self, query: str, images: Sequence[ImageLike] | None = None,
             history: Sequence[tuple[str, str]] | None = None, system: str = DEFAULT_SYSTEM,
             stream: Callable[[str], None] | None = None, **gen: Any) -> Reply:
        """One ChatML turn. images: shown before the query as `Picture i: <img>..</img>`; `<img>path</img>` written
        in the query works too. stream(text_piece) receives the reply as it is generated."""
        content = user_content(query, self._register(images))
        messages: list[tuple[str, str]] = []
        for q, a in history or []:
            messages += [("user", q), ("assistant", a)]
        messages.append(("user", content))
        ids, names = chatml_ids(self.tokenizer, messages, system)
        ts = TextStreamer(self.decode, stream) if stream is not None else None
        out = generate(self.model, [ids], [self._pixels(names)], self._config(gen), ts)[0]
        if ts is not None:
            ts.flush()
        r = self._reply(out, names)
        r.history = [*(history or []), (content, r.text)]
        return r


def load(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
         image_root: str | os.PathLike | None = None, **gen: Any) -> VLModel:
    """`VLModel` from any checkpoint path train.infer.loading accepts; gen: GenerationConfig defaults."""
    model, tok, src = load_model(path, device, dtype)
    return VLModel(model, tok, src, file_resolver(image_root), GenerationConfig(**gen))
