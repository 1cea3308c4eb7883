"""Image decoding + Qwen-VL preprocessing: parity with the official torchvision transform, bad-input reasons."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from data.images import (
    IMAGE_REASONS,
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    ImageError,
    load_image,
    normalize,
    to_tensor,
    to_uint8,
)

PHOTOS = ("astronaut", "coffee", "chelsea", "camera")  # camera is greyscale


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def official_transform(size: int) -> transforms.Compose:
    """The Qwen-VL repo's visual.py image_transform."""
    return transforms.Compose([
        transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD),
    ])


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height in a valid IHDR but carries (almost) no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))


def test_constants_are_open_clips():
    from open_clip.constants import OPENAI_DATASET_MEAN as M
    from open_clip.constants import OPENAI_DATASET_STD as S
    assert tuple(M) == OPENAI_DATASET_MEAN and tuple(S) == OPENAI_DATASET_STD


def test_model_normalises_uint8_like_the_official_transform():
    """The pipeline ships uint8 (a quarter of the bytes); the model normalises on the device with its own copy
    of the constants: same numbers, bit-identical result to to_tensor."""
    from train.model.qwen_vl import PIXEL_MEAN, PIXEL_STD, normalize_pixels

    assert (PIXEL_MEAN, PIXEL_STD) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    img = photo("chelsea")
    u8 = to_uint8(img, 64)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 64, 64)
    ref = to_tensor(img, 64)
    assert torch.equal(normalize(u8), ref)
    assert torch.equal(normalize_pixels(u8[None])[0], ref)
    with pytest.raises(TypeError, match="uint8"):
        normalize(ref)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("size", [224, 448])
def test_matches_official_torchvision_transform(name, size):
    """Decode real JPEG bytes, then compare with the official transform on an independently decoded image."""
    data = encode(photo(name), "JPEG", quality=92)
    img = load_image(data, name=f"{name}.jpg", max_pixels=10**8)
    assert img.mode == "RGB"
    ours = to_tensor(img, size)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    ref = official_transform(size)(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_close_to_torch_antialiased_bicubic():
    """Second reference with a different resize implementation (torch, antialiased bicubic on floats)."""
    img = photo("astronaut")
    ours = to_tensor(img, 448)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(448, 448), mode="bicubic", antialias=True, align_corners=False)[0]
    y = y.clamp(0, 255).round().div(255)
    y = (y - torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]) / torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    diff_px = (ours - y).abs() * torch.tensor(OPENAI_DATASET_STD)[:, None, None] * 255  # in 0..255 units
    assert diff_px.max() <= 8 and diff_px.mean() < 0.5, (diff_px.max(), diff_px.mean())


def test_square_resize_without_crop():
    """A wide image is squashed, not cropped: its left (red) and right (blue) halves both survive."""
    arr = np.zeros((40, 200, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:] = (0, 0, 255)
    t = to_tensor(load_image(encode(Image.fromarray(arr), "PNG"), name="wide.png"), 64)
    std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    mean = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    px = (t * std + mean) * 255
    assert torch.allclose(px[:, :, 5], torch.tensor([255.0, 0, 0])[:, None].expand(3, 64), atol=1)
    assert torch.allclose(px[:, :, 58], torch.tensor([0, 0, 255.0])[:, None].expand(3, 64), atol=1)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_modes_become_rgb(mode):
    im = photo("astronaut").resize((32, 32)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im).astype(np.uint16) * 4)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = load_image(encode(im, fmt), name=f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == (32, 32)


def test_truncated_jpeg():
    data = encode(photo("coffee"), "JPEG", quality=90)
    with pytest.raises(ImageError) as ei:
        load_image(data[: len(data) // 2], name="k.img0.jpg")
    assert ei.value.reason == "truncated_image" and ei.value.name == "k.img0.jpg"
    assert "k.img0.jpg" in str(ei.value)


def test_truncated_png():
    data = encode(photo("chelsea"), "PNG")
    with pytest.raises(ImageError) as ei:
        load_image(data[: len(data) // 3], name="k.img0.png")
    assert ei.value.reason == "truncated_image"


def test_random_bytes_and_broken_jpeg_body():
    rng = np.random.default_rng(0)
    with pytest.raises(ImageError) as ei:
        load_image(rng.bytes(4096), name="noise")
    assert ei.value.reason == "corrupt_image"
    jpg = encode(photo("astronaut"), "JPEG")
    with pytest.raises(ImageError) as ei:  # right magic, garbage after the first header bytes
        load_image(jpg[:20] + rng.bytes(5000), name="garbled.jpg")
    assert ei.value.reason in ("corrupt_image", "truncated_image")


def test_empty_bytes():
    with pytest.raises(ImageError) as ei:
        load_image(b"", name="e.jpg")
    assert ei.value.reason == "empty_image"


def test_over_limit_real_image():
    data = encode(photo("astronaut"), "PNG")  # 512 x 512 = 262144 px
    assert load_image(data, name="ok", max_pixels=512 * 512).size == (512, 512)
    with pytest.raises(ImageError) as ei:
        load_image(data, name="big", max_pixels=512 * 512 - 1)
    assert ei.value.reason == "too_many_pixels" and "262144" in str(ei.value)


def test_bomb_refused_from_header_before_decoding():
    """The header claims 30000 x 30000; there is no pixel data. A decode would fail as truncated (or allocate
    2.7 GB); the header check refuses it as too_many_pixels first."""
    bomb = png_header(30000, 30000)
    assert len(bomb) < 100
    with pytest.raises(ImageError) as ei:
        load_image(bomb, name="bomb.png", max_pixels=10**6)
    assert ei.value.reason == "too_many_pixels"
    # the same kind of file within the limit does reach the decoder, which then finds the data missing
    with pytest.raises(ImageError) as ei:
        load_image(png_header(300, 300), name="small.png", max_pixels=10**6)
    assert ei.value.reason in ("truncated_image", "corrupt_image")
    # beyond 2x PIL's own limit PIL refuses at open; still reported as too_many_pixels
    with pytest.raises(ImageError) as ei:
        load_image(png_header(20000, 20000), name="huge.png", max_pixels=10**12)
    assert ei.value.reason == "too_many_pixels"


def test_image_error_pickles():
    e = pickle.loads(pickle.dumps(ImageError("k.img0.jpg", "corrupt_image", "detail")))
    assert (e.name, e.reason, e.detail) == ("k.img0.jpg", "corrupt_image", "detail")
    assert set(IMAGE_REASONS) == {"empty_image", "corrupt_image", "truncated_image", "too_many_pixels"}
