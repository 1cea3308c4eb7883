"""Image decoding and the Qwen-VL pixel preprocessing.

`load_image` turns shard bytes into an RGB PIL image, refusing bad input with an `ImageError` that carries a
reason code (counted by the sample builder) and the member name. The pixel count is checked from the header,
before the full decode, so a decompression bomb never allocates its pixels. (PIL itself refuses images above
2x ``Image.MAX_IMAGE_PIXELS`` at open; those are reported as ``too_many_pixels`` too, whatever `max_pixels` is.
Truncated files are refused as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default False.)

`to_tensor` is the official Qwen-VL transform (SPEC §1): resize to a square ``size x size`` with PIL
bicubic (no crop, aspect ratio not kept), ``/255``, CLIP mean/std normalisation. It performs the same float32
operations as torchvision's ``Resize((s, s), BICUBIC) + ToTensor() + Normalize(mean, std)`` on a PIL image,
so the result is bit-identical to the official pipeline.

The training pipeline stops halfway: `to_uint8` gives the resized pixels as ``uint8 [3,S,S]`` (what samples,
the packer and batches hold and what crosses process boundaries: a quarter of the fp32 bytes), and the model
normalises them on the device (``QwenVL.encode_images``, with its own copy of the constants below, which a
test keeps equal). `normalize` is that second half on the host: ``normalize(to_uint8(im, s)) == to_tensor(im,
s)`` bit for bit.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# open_clip.constants.OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (copied so data/ does not import open_clip)
OPENAI_DATASET_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS default

# reason codes raised by load_image (the sample builder passes them on as SkipSample reasons)
IMAGE_REASONS: tuple[str, ...] = ("empty_image", "corrupt_image", "truncated_image", "too_many_pixels")

_MEAN = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32).view(3, 1, 1)


class ImageError(ValueError):
    """An image the pipeline refuses: `name` (member / file), `reason` (one of IMAGE_REASONS), detail."""

    def __init__(self, name: str, reason: str, detail: str = ""):
        self.name, self.reason, self.detail = name, reason, detail
        super().__init__(f"image {name!r}: {reason}" + (f": {detail}" if detail else ""))

    def __reduce__(self) -> tuple:  # keep the fields when the error crosses a process-pool boundary
        return (type(self), (self.name, self.reason, self.detail))


def load_image(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` to an RGB image (first frame; no EXIF rotation, as the official code and the box
    annotations use the stored pixel grid). Raises ImageError(name, reason)."""
    if not data:
        raise ImageError(name, "empty_image", "0 bytes")
    try:
        with warnings.catch_warnings():
            # our own limit is checked below; PIL's warning between 1x and 2x its limit is noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # lazy: parses the header only
    except Image.DecompressionBombError as e:  # PIL refuses > 2x its own limit already at open
        raise ImageError(name, "too_many_pixels", str(e)) from None
    except UnidentifiedImageError:
        raise ImageError(name, "corrupt_image", f"not a recognised image format ({len(data)} bytes)") from None
    except EOFError as e:
        raise ImageError(name, "truncated_image", f"{type(e).__name__}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(name, _reason(e), f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(name, "empty_image", f"size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(name, "too_many_pixels", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    try:
        im.load()  # the full decode
        out = im.convert("RGB")
    except EOFError as e:
        raise ImageError(name, "truncated_image", f"{type(e).__name__}: {e}") from None
    except (OSError, SyntaxError, ValueError, struct.error, MemoryError) as e:  # ValueError: unconvertible mode
        raise ImageError(name, _reason(e), f"{type(e).__name__}: {e}") from None
    return out


def _reason(e: Exception) -> str:
    # PIL reports cut-off data as OSError("image file is truncated ...") / "Truncated File Read"
    return "truncated_image" if isinstance(e, OSError) and "truncat" in str(e).lower() else "corrupt_image"


def to_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> UInt8[3, size, size]: bicubic resize to a square (no crop), channels first."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """UInt8[..., 3, S, S] -> Float[..., 3, S, S]: /255 and CLIP mean/std, in float32."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {pixels.dtype}")
    # same op order and dtype as torchvision ToTensor + Normalize (bit-identical results)
    t = pixels.to(torch.float32).div(255)
    return t.sub_(_MEAN.to(t.device)).div_(_STD.to(t.device))


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> Float[3, size, size]: bicubic resize to a square (no crop), /255, CLIP mean/std."""
    return normalize(to_uint8(img, size))


__all__ = ["ImageError", "IMAGE_REASONS", "OPENAI_DATASET_MEAN", "OPENAI_DATASET_STD", "DEFAULT_MAX_PIXELS",
           "load_image", "normalize", "to_tensor", "to_uint8"]
