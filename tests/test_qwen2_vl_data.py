"""Qwen2-VL data side: samples rendered in the family's format from the shared shards, variable image token
counts, packing budgets and the collated batch the model consumes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import data.qwen2_vl_samples as q2s
from data.loader import RawSample
from data.packing import PackingError
from data.qwen2_vl_images import n_image_tokens
from data.qwen2_vl_packing import Qwen2VLPacker, check_qwen2_sample, collate_qwen2_rows
from data.qwen2_vl_samples import Qwen2VLSampleBuilder
from data.tokenizer import SPECIAL_IDS
from train.model.families import get_family
from train.model.qwen2_vl.config import Qwen2SpecialIds, get_config
from train.model.qwen2_vl.model import Qwen2VL

IDS = Qwen2SpecialIds()
QWEN_VL_IDS = {SPECIAL_IDS[t] for t in ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>",
                                        "</img>", "<imgpad>")}


def _png(h: int, w: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _raw(key: str, meta: dict, sizes: list[tuple[int, int]], index: int = 0) -> RawSample:
    files = {f"img{i}.png": _png(h, w, index * 7 + i) for i, (h, w) in enumerate(sizes)}
    meta = {"lang": "en", "source": "t", "images": list(files), **meta}
    return RawSample(key=key, meta=meta, files=files, source="t", url="mem", index=index)


def test_data_ids_equal_the_model_config_ids():
    assert (q2s.EOD_ID, q2s.IM_START_ID, q2s.IM_END_ID) == (IDS.eod, IDS.im_start, IDS.im_end)
    assert (q2s.OBJECT_REF_START_ID, q2s.OBJECT_REF_END_ID, q2s.BOX_START_ID, q2s.BOX_END_ID, q2s.QUAD_START_ID,
            q2s.QUAD_END_ID) == (IDS.object_ref_start, IDS.object_ref_end, IDS.box_start, IDS.box_end,
                                 IDS.quad_start, IDS.quad_end)
    assert (q2s.VISION_START_ID, q2s.VISION_END_ID, q2s.IMAGE_PAD_ID) == (IDS.vision_start, IDS.vision_end,
                                                                          IDS.image_pad)


def test_caption_with_dynamic_resolution_image():
    b = Qwen2VLSampleBuilder(1, None, max_len=512)
    s = b(_raw("k0", {"task": "caption", "caption": "a red square"}, [(90, 150)]))
    n = n_image_tokens(90, 150)
    assert s.input_ids[: n + 2] == [IDS.vision_start] + [IDS.image_pad] * n + [IDS.vision_end]
    assert all(lab == -100 for lab in s.labels[: n + 2]) and s.labels[-1] == IDS.eod
    (t, gh, gw), = s.grids
    assert t == 1 and gh * gw // 4 == n and s.images[0].shape == (gh * gw, 3 * 14 * 14)
    assert s.images[0].dtype == torch.uint8
    assert not QWEN_VL_IDS.intersection(s.input_ids)
    # the text ids are those of the Qwen-VL builder (same BPE ranks)
    from data.samples import SampleBuilder

    ref = SampleBuilder(1, None, 224, 512)(_raw("k0", {"task": "caption", "caption": "a red square"}, [(90, 150)]))
    assert s.input_ids[n + 2:] == ref.input_ids[258:]


def test_grounding_uses_the_family_box_tokens():
    b = Qwen2VLSampleBuilder(2, None, max_len=512)
    s = b(_raw("k1", {"task": "ref_grounding", "expression": "the cat", "box": [10, 20, 300, 400]}, [(56, 56)]))
    ids = s.input_ids
    assert IDS.object_ref_start in ids and IDS.object_ref_end in ids
    i, j = ids.index(IDS.box_start), ids.index(IDS.box_end)
    assert i < j and all(s.labels[k] != -100 for k in range(i, j + 1))  # the box is the target
    fam = get_family("qwen2_vl").prompt
    from data.tokenizer import QwenTokenizer

    text = QwenTokenizer().decode(ids[i + 1:j])
    assert fam.box(10, 20, 300, 400) == "<|box_start|>" + text + "<|box_end|>"
    assert not QWEN_VL_IDS.intersection(ids)


def test_chat_two_images_of_different_sizes():
    conv = [{"from": "user", "value": "Picture 1: <img>img0.png</img>\nPicture 2: <img>img1.png</img>\nSame?"},
            {"from": "assistant", "value": "No."}]
    s = Qwen2VLSampleBuilder(3, None, max_len=1024)(_raw("k2", {"task": "chat", "conversations": conv},
                                                         [(56, 84), (140, 56)]))
    runs = [g[1] * g[2] // 4 for g in s.grids]
    assert runs == [n_image_tokens(56, 84), n_image_tokens(140, 56)] and runs[0] != runs[1]
    assert s.input_ids.count(IDS.image_pad) == sum(runs) and check_qwen2_sample(s) == len(s.input_ids)
    assert s.labels[-2] == IDS.im_end


def test_too_long_is_dropped_and_shorten_never_cuts_an_image():
    from data.samples import SkipSample

    raw = _raw("k3", {"task": "caption", "caption": "word " * 40}, [(112, 112)])
    with pytest.raises(SkipSample, match="too_long"):
        Qwen2VLSampleBuilder(1, None, max_len=20)(raw)
    s = Qwen2VLSampleBuilder(1, None, max_len=40, truncate="shorten")(raw)
    assert len(s.input_ids) == 40 and check_qwen2_sample(s) == 40


def test_check_rejects_wrong_image_token_count():
    s = Qwen2VLSampleBuilder(1, None, max_len=512)(_raw("k4", {"task": "caption", "caption": "x y"}, [(56, 56)]))
    s.input_ids.remove(IDS.image_pad)
    s.labels.pop(1)
    with pytest.raises(PackingError, match="needs"):
        check_qwen2_sample(s)


def test_packed_batch_trains_the_model_like_separate_samples():
    b = Qwen2VLSampleBuilder(2, None, max_len=256, max_pixels_resize=112 * 112)
    sizes = [(56, 84), (112, 56), (84, 84), (56, 56), (140, 112)]
    samples = [b(_raw(f"s{i}", {"task": "caption", "caption": "thing " * (3 + i)}, [sz], index=i))
               for i, sz in enumerate(sizes)]
    packer = Qwen2VLPacker(128, buffer_size=4)
    rows = packer.pack_all(samples)
    assert len(rows) < len(samples) and all(sum(len(s.input_ids) for s in r) <= 128 for r in rows)
    batch = collate_qwen2_rows(rows, 128, checked=True)
    assert batch["image_grid_thw"].shape == (len(samples), 3) and batch["pixel_values"].dtype == torch.uint8
    torch.manual_seed(0)
    model = Qwen2VL(get_config("qwen2_vl_tiny")).eval()
    keys = ("input_ids", "labels", "pixel_values", "image_grid_thw", "segment_ids", "position_ids")
    with torch.no_grad():
        out = model(**{k: batch[k] for k in keys})
        singles = [model(**{k: v for k, v in collate_qwen2_rows([[s]]).items() if k in keys})
                   for r in rows for s in r]
    assert int(out.n_tokens) == sum(int(o.n_tokens) for o in singles)
    torch.testing.assert_close(out.loss_sum, sum(o.loss_sum for o in singles), rtol=1e-5, atol=1e-4)
    empty = collate_qwen2_rows([[Qwen2VLSampleBuilder(2, None, max_len=64)(
        RawSample("t0", {"task": "text", "text": "only words", "lang": "en", "images": []}, {}, "t", "m", 9))]])
    assert empty["pixel_values"].shape == (0, 3 * 14 * 14) and empty["image_grid_thw"].shape == (0, 3)
    with torch.no_grad():
        assert torch.isfinite(model(**{k: empty[k] for k in keys}).loss)
