"""Qwen2-VL pixel preprocessing ("naive dynamic resolution"): the image keeps its aspect ratio, both sides are
rounded to multiples of patch*merge (28) with the pixel count inside [min_pixels, max_pixels], then cut into
patches in the order the vision tower and its 2x2 merger expect.

The same operations as transformers' Qwen2VLImageProcessor (torchvision backend): `smart_resize` is its size
rule, the resize is torchvision's bicubic with antialias on the uint8 tensor, normalisation is the fused
(x - 255*mean) / (255*std) in fp32, and `patchify` its patch layout (channel-major vectors of C x T x P x P,
merge x merge blocks row-major). tests/test_qwen2_vl.py checks `preprocess` against the reference.

The training pipeline stops at uint8: `to_patches_uint8` gives [L, C*P*P] uint8 (one frame; the model makes the
temporal copies and normalises on the device, bit-identical to `preprocess`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from .images import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT = 200  # the reference refuses more elongated images


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(h, w) multiples of `factor`, h*w within [min_pixels, max_pixels], aspect ratio kept as closely as the
    rounding allows (the reference rule, operation for operation)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT}, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def as_uint8_chw(img: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """RGB PIL image / HxWx3 uint8 array / 3xHxW uint8 tensor -> uint8 [3,H,W]."""
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = np.asarray(img, dtype=np.uint8)
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 array, got {img.shape} {img.dtype}")
        return torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous()
    if img.dim() != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 [3,H,W] tensor, got {tuple(img.shape)} {img.dtype}")
    return img


def resize(img: Image.Image | torch.Tensor | np.ndarray, min_pixels: int = DEFAULT_MIN_PIXELS,
           max_pixels: int = DEFAULT_MAX_PIXELS, factor: int = 28) -> torch.Tensor:
    """-> uint8 [3,h,w] with (h, w) = smart_resize(H, W): torchvision bicubic with antialias (the reference)."""
    t = as_uint8_chw(img)
    h, w = smart_resize(t.shape[1], t.shape[2], factor, min_pixels, max_pixels)
    if (h, w) == tuple(t.shape[1:]):
        return t
    return tvF.resize(t, [h, w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [3,H,W] -> fp32, (x - 255*mean) / (255*std): the reference's fused rescale + normalise."""
    mean = torch.tensor(OPENAI_DATASET_MEAN) * (1.0 / (1 / 255))
    std = torch.tensor(OPENAI_DATASET_STD) * (1.0 / (1 / 255))
    return tvF.normalize(pixels.to(torch.float32), mean.tolist(), std.tolist())


def patchify(pixels: torch.Tensor, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[C,H,W] (H, W multiples of patch*merge) -> ([gh*gw, C*T*P*P], grid (1, gh, gw)); T = temporal_patch_size
    copies of the frame (temporal_patch_size=1 gives the one-frame [L, C*P*P] layout)."""
    C, H, W = pixels.shape
    f = patch_size * merge_size
    if H % f or W % f:
        raise ValueError(f"image {H}x{W} is not a multiple of patch_size*merge_size = {f}")
    gh, gw = H // patch_size, W // patch_size
    p = pixels.reshape(C, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    p = p.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
    p = p.unsqueeze(5).expand(*p.shape[:5], temporal_patch_size, patch_size, patch_size)
    return p.reshape(gh * gw, C * temporal_patch_size * patch_size * patch_size), (1, gh, gw)


def preprocess(images: list, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
               patch_size: int = 14, merge_size: int = 2,
               temporal_patch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values fp32 [sum L, C*T*P*P], image_grid_thw Long [N,3]): Qwen2VLImageProcessor's output."""
    pv, grids = [], []
    for img in images:
        t = resize(img, min_pixels, max_pixels, patch_size * merge_size)
        x, g = patchify(normalize(t), patch_size, merge_size, temporal_patch_size)
        pv.append(x)
        grids.append(g)
    return torch.cat(pv), torch.tensor(grids, dtype=torch.long)


def to_patches_uint8(img: Image.Image | torch.Tensor | np.ndarray, min_pixels: int = DEFAULT_MIN_PIXELS,
                     max_pixels: int = DEFAULT_MAX_PIXELS, patch_size: int = 14,
                     merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """-> (uint8 [L, C*P*P] one-frame patches, grid (1, gh, gw)): what samples and batches carry."""
    t = resize(img, min_pixels, max_pixels, patch_size * merge_size)
    x, g = patchify(t, patch_size, merge_size, 1)
    return x.contiguous(), g


def n_image_tokens(height: int, width: int, min_pixels: int = DEFAULT_MIN_PIXELS,
                   max_pixels: int = DEFAULT_MAX_PIXELS, patch_size: int = 14, merge_size: int = 2) -> int:
    """LLM tokens of an HxW image: (h/28)*(w/28) after smart_resize (default geometry)."""
    f = patch_size * merge_size
    h, w = smart_resize(height, width, f, min_pixels, max_pixels)
    return (h // f) * (w // f)


__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MIN_PIXELS", "n_image_tokens", "normalize", "patchify", "preprocess",
           "resize", "smart_resize", "to_patches_uint8"]
