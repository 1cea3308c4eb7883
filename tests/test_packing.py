"""Packing: row layout (segments, positions, labels, images), policy (fit, same task, efficiency), errors,
and loss parity of a packed row with the same samples run separately through the tiny model."""

from __future__ import annotations

import io
import itertools
import random

import pytest
import torch

from data.loader import RawSample
from data.packing import (
    EOD_ID,
    IGNORE_INDEX,
    IMG_START_ID,
    Packer,
    PackingError,
    best_fill,
    check_sample,
    collate_rows,
    packing_efficiency,
    pad_collate,
)
from data.samples import Sample, SampleBuilder
from data.tasks import TASK_ID

IMG_END_ID = 151858
IMG_PAD_ID = 151859


def _sample(uid: int, n_text: int, n_img: int = 0, task: str = "caption", seed: int = 0, size: int = 8) -> Sample:
    """A sample with `n_img` image spans (each followed by text) and a unique constant-valued image tensor
    per span (value = uid * 10 + k), so image order can be checked in pixel_values."""
    rng = random.Random(seed * 100_003 + uid)
    ids: list[int] = []
    labels: list[int] = []
    images = []
    for k in range(n_img):
        span = [IMG_START_ID] + [IMG_PAD_ID] * 256 + [IMG_END_ID]
        ids += span
        labels += [IGNORE_INDEX] * len(span)
        images.append(torch.full((3, size, size), float(uid * 10 + k)))
    text = [rng.randrange(0, 151000) for _ in range(n_text)]
    ids += text
    n_prompt = n_text // 3
    labels += [IGNORE_INDEX] * n_prompt + text[n_prompt:]
    return Sample(input_ids=ids, labels=labels, images=images, task=task, ref=["src", "mem.tar", uid, f"k{uid}"])


def _check_batch(batch: dict, rows: list[list[Sample]], T: int) -> None:
    """Every row is its samples back to back, segments 1..k, positions restarting, padding after."""
    B = len(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (B, T)
    assert batch["segment_ids"].shape == batch["position_ids"].shape == (B, T)
    assert batch["segment_ids"].dtype == torch.int32 and batch["input_ids"].dtype == torch.long
    imgs = []
    for b, row in enumerate(rows):
        t = 0
        for k, s in enumerate(row):
            n = len(s.input_ids)
            assert batch["input_ids"][b, t:t + n].tolist() == s.input_ids
            assert batch["labels"][b, t:t + n].tolist() == s.labels
            assert batch["segment_ids"][b, t:t + n].tolist() == [k + 1] * n
            assert batch["position_ids"][b, t:t + n].tolist() == list(range(n))
            imgs += s.images
            t += n
        assert batch["input_ids"][b, t:].tolist() == [EOD_ID] * (T - t)
        assert batch["labels"][b, t:].tolist() == [IGNORE_INDEX] * (T - t)
        assert batch["segment_ids"][b, t:].tolist() == [0] * (T - t)
        assert batch["position_ids"][b, t:].tolist() == list(range(T - t))
        assert int(batch["task_ids"][b]) == TASK_ID[row[0].task]
        assert int(batch["n_samples"][b]) == len(row)
    # images in <img> scan order: the k-th <img> of the flattened batch is the k-th image tensor
    starts = (batch["input_ids"] == IMG_START_ID).nonzero().tolist()
    assert len(starts) == len(imgs) == batch["pixel_values"].shape[0]
    for k, im in enumerate(imgs):
        assert torch.equal(batch["pixel_values"][k], im)


def test_best_fill_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(0, 9)
        lengths = [rng.randint(1, 60) for _ in range(n)]
        cap = rng.randint(0, 150)
        got = best_fill(lengths, cap)
        assert got == sorted(set(got))
        assert sum(lengths[i] for i in got) <= cap
        best = max((sum(c) for r in range(n + 1) for c in itertools.combinations(lengths, r) if sum(c) <= cap),
                   default=0)
        assert sum(lengths[i] for i in got) == best


def test_rows_layout_and_every_sample_once():
    rng = random.Random(1)
    samples = [_sample(i, rng.randint(5, 300), n_img=rng.choice([0, 1, 1, 2])) for i in range(60)]
    T = 1024
    rows = Packer(T, buffer_size=16).pack_all(samples)
    got = sorted(s.ref[2] for r in rows for s in r)
    assert got == list(range(60))  # nothing lost, nothing duplicated
    assert all(sum(len(s.input_ids) for s in r) <= T for r in rows)
    assert max(len(r) for r in rows) > 1  # it does pack
    # oldest-first anchor: the first sample of each row is the oldest pending, so anchors arrive in order
    anchors = [r[0].ref[2] for r in rows]
    assert anchors == sorted(anchors)
    for i in range(0, len(rows), 4):
        chunk = rows[i:i + 4]
        _check_batch(collate_rows(chunk, T, image_size=8), chunk, T)


def test_same_task_rows():
    rng = random.Random(2)
    tasks = ["caption", "vqa", "ocr", "text"]
    samples = [_sample(i, rng.randint(20, 400), n_img=0, task=rng.choice(tasks)) for i in range(80)]
    rows = Packer(2048, buffer_size=32, same_task=True).pack_all(samples)
    assert all(len({s.task for s in r}) == 1 for r in rows)
    assert sorted(s.ref[2] for r in rows for s in r) == list(range(80))
    mixed = Packer(2048, buffer_size=32, same_task=False).pack_all(samples)
    assert any(len({s.task for s in r}) > 1 for r in mixed)  # the constraint is what keeps rows pure
    batch = collate_rows(rows[:3], 2048)
    assert batch["task_ids"].tolist() == [TASK_ID[r[0].task] for r in rows[:3]]


def test_efficiency_sft_like_lengths():
    rng = random.Random(1234)
    samples = [_sample(i, rng.randint(100, 1500)) for i in range(3000)]
    rows = Packer(2048, buffer_size=64).pack_all(samples)
    eff = packing_efficiency(rows, 2048)
    assert eff >= 0.97, eff
    assert sum(len(r) for r in rows) == 3000


def test_pad_collate_unpacked():
    samples = [_sample(0, 10, n_img=1), _sample(1, 40), _sample(2, 3, n_img=2)]
    batch = pad_collate(samples)
    T = max(len(s.input_ids) for s in samples)
    _check_batch(batch, [[s] for s in samples], T)
    fixed = pad_collate(samples, 1024)
    _check_batch(fixed, [[s] for s in samples], 1024)
    text_only = pad_collate([_sample(3, 10)], image_size=32)
    assert text_only["pixel_values"].shape == (0, 3, 32, 32)


def test_errors_name_the_sample():
    with pytest.raises(PackingError, match=r"k7.*seq_len 512.*SampleBuilder"):
        Packer(512).add(_sample(7, 600))
    bad = _sample(8, 10, n_img=1)
    bad.images = []
    with pytest.raises(PackingError, match=r"k8.*1 <img> tokens but 0 images"):
        Packer(512).add(bad)
    bad2 = _sample(9, 10)
    bad2.labels = bad2.labels[:-1]
    with pytest.raises(PackingError, match=r"k9.*labels"):
        pad_collate([bad2])
    with pytest.raises(PackingError, match=r"> seq_len 20"):
        collate_rows([[_sample(1, 15), _sample(2, 15)]], 20)


def test_image_spans_and_targets_are_validated_on_the_host():
    """What the model no longer checks in its forward (host syncs) is checked once per sample here."""
    def span_sample(uid: int) -> Sample:
        return _sample(uid, 12, n_img=1)

    ok = span_sample(20)
    Packer(1024).add(ok)
    trunc = span_sample(21)
    trunc.input_ids, trunc.labels = trunc.input_ids[:100], trunc.labels[:100]
    with pytest.raises(PackingError, match=r"k21.*1 <img> tokens but 0 </img>"):
        Packer(1024).add(trunc)
    trunc.input_ids[-1] = IMG_END_ID  # </img> count right, but too early: the span is cut short
    with pytest.raises(PackingError, match=r"k21.*span at position 0.*</img>.*at position 257"):
        Packer(1024).add(trunc)
    cut = span_sample(22)
    cut.input_ids, cut.labels = cut.input_ids[:200] + [IMG_END_ID], cut.labels[:201]
    cut.input_ids[0:1] = [5]
    cut.input_ids[-2] = IMG_START_ID  # <img> at 199, </img> at 200: the span runs past the sample's end
    with pytest.raises(PackingError, match=r"k22.*truncated"):
        check_sample(cut)
    stray = _sample(23, 12)
    stray.input_ids[3] = IMG_END_ID
    with pytest.raises(PackingError, match=r"k23.*</img>.*position 3 without <img>"):
        pad_collate([stray])
    trained = span_sample(24)
    trained.labels[5] = trained.input_ids[5]
    with pytest.raises(PackingError, match=r"k24.*trained labels"):
        Packer(1024).add(trained)
    neg = _sample(25, 12)
    neg.labels[-1] = -7
    with pytest.raises(PackingError, match=r"k25.*labels must be -100 or token ids"):
        Packer(1024).add(neg)
    big = _sample(26, 12)
    with pytest.raises(PackingError, match=r"k26.*\[0, 1000\)"):
        Packer(1024, check={"vocab_size": 1000}).add(big)
    Packer(1024, check={"vocab_size": 151936}).add(big)


def test_batches_carry_uint8_pixels():
    def img(v: int) -> torch.Tensor:
        return torch.full((3, 8, 8), v, dtype=torch.uint8)

    a, b = _sample(30, 10, n_img=1), _sample(31, 10, n_img=2)
    a.images, b.images = [img(1)], [img(2), img(3)]
    batch = collate_rows([[a, b]], 1024)
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1, 2, 3]
    assert pad_collate([_sample(32, 5)], image_size=8)["pixel_values"].dtype == torch.uint8
    b.images[1] = b.images[1].float()
    with pytest.raises(PackingError, match="share a shape and dtype"):
        collate_rows([[a, b]], 1024)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches():
    batch = collate_rows([[_sample(40, 10, n_img=1)]], 512, pin_memory=True)
    assert all(v.is_pinned() for v in batch.values())


# ------------------------------------------------------------------ loss parity with the tiny model


def _jpeg(seed: int, w: int, h: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _raw(i: int, meta: dict, images: int = 1) -> RawSample:
    files = {f"img{k}.jpg": _jpeg(i * 7 + k, 40 + 8 * k, 30 + 5 * i) for k in range(images)}
    meta = {"lang": "en", "source": "t", "images": sorted(files), **meta}
    return RawSample(key=f"s{i}", meta=meta, files=files, source="t", url="mem.tar", index=i)


def test_packed_row_loss_equals_separate_samples():
    from train.model.config import get_config
    from train.model.qwen_vl import QwenVL

    cfg = get_config("tiny")
    b = SampleBuilder(2, None, cfg.vision.image_size, 1024)
    samples = [
        b(_raw(0, {"task": "caption", "caption": "A cat sitting on a red mat next to a window."})),
        b(_raw(1, {"task": "text", "text": "Pure text sample, all of it in the loss. " * 4}, images=0)),
        b(_raw(2, {"task": "vqa", "question": "What color is the mat?", "answers": ["red"]})),
    ]
    assert [len(s.images) for s in samples] == [1, 0, 1]
    torch.manual_seed(0)
    model = QwenVL(cfg).eval()
    T = sum(len(s.input_ids) for s in samples) + 8  # a little padding; short rows keep the test fast
    packed = collate_rows([samples], T, image_size=cfg.vision.image_size)
    assert packed["n_samples"].tolist() == [3]
    with torch.no_grad():
        out = model(packed["input_ids"], labels=packed["labels"], pixel_values=packed["pixel_values"],
                    segment_ids=packed["segment_ids"], position_ids=packed["position_ids"])
        ref_sum, ref_n = 0.0, 0
        for s in samples:  # each sample alone: no packing, no segments, default positions
            ids = torch.tensor([s.input_ids])
            px = torch.stack(s.images) if s.images else None
            o = model(ids, labels=torch.tensor([s.labels]), pixel_values=px)
            ref_sum += float(o.loss_sum)
            ref_n += int(o.n_tokens)
    assert int(out.n_tokens) == ref_n > 0
    assert float(out.loss_sum) == pytest.approx(ref_sum, rel=1e-5)
