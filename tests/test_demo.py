"""Demo corpus: deterministic bytes, every task and both languages, boxes/quads match the pixels."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.demo import COLORS, build_demo
from data.shards import iter_shard
from data.tasks import TASKS

SCALE = 0.05


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "a"
    manifest = build_demo(root, seed=0, scale=SCALE)
    return root, manifest


def samples(root: Path, sub: str) -> list[tuple[str, dict, dict[str, bytes]]]:
    shards = sorted((root / sub).glob("*.tar"))
    assert shards, f"no shards under {root / sub}"
    return [s for p in shards for s in iter_shard(str(p))]


def test_bytes_identical_for_same_seed_and_differs_for_other_seed(demo, tmp_path):
    root, manifest = demo
    again = build_demo(tmp_path / "b", seed=0, scale=SCALE)
    assert again == manifest
    d1, d2 = tree_digest(root), tree_digest(tmp_path / "b")
    assert d1 == d2 and any(k.endswith(".tar") for k in d1)
    other = build_demo(tmp_path / "c", seed=1, scale=SCALE)
    assert other["seed"] == 1
    assert tree_digest(tmp_path / "c") != d1


def test_idempotent_stamp_and_rebuild_on_change(demo, tmp_path):
    out = tmp_path / "d"
    build_demo(out, seed=0, scale=SCALE)
    tar = sorted((out / "caption").glob("*.tar"))[0]
    mtime = tar.stat().st_mtime_ns
    build_demo(out, seed=0, scale=SCALE)  # same stamp: nothing rewritten
    assert tar.stat().st_mtime_ns == mtime
    m = build_demo(out, seed=2, scale=SCALE)  # different seed: rebuilt
    assert json.loads((out / ".demo_stamp.json").read_text())["seed"] == 2 and m["seed"] == 2
    assert tree_digest(out) != tree_digest(demo[0])


def test_two_builds_of_one_directory_at_once_take_turns(demo, tmp_path):
    """Two demos (or two test workers) building the same directory at the same time: one builds, the other
    waits and reuses it; neither sees the other's half-swapped directories."""
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "shared"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: build_demo(out, seed=0, scale=SCALE), range(2)))
    assert results[0] == results[1] == demo[1]
    assert tree_digest(out) == tree_digest(demo[0])
    assert not list(out.glob(".build-*"))


def test_every_task_split_and_language_present(demo):
    root, manifest = demo
    assert set(manifest["train"]) == set(TASKS) and set(manifest["heldout"]) == set(TASKS)
    for sub, task in [*[(t, t) for t in TASKS], ("pretrain", "caption"), *[(f"heldout/{t}", t) for t in TASKS]]:
        ss = samples(root, sub)
        assert ss
        assert {m["task"] for _, m, _ in ss} == {task}, sub
        assert {m["lang"] for _, m, _ in ss} == {"en", "zh"}, sub
        for key, meta, imgs in ss:
            assert set(meta["images"]) == set(imgs), key
            for data in imgs.values():
                im = Image.open(io.BytesIO(data))
                im.load()
                assert min(im.size) >= 32, key
            assert isinstance(meta["source"], str) and meta["source"].startswith("demo/")
            if meta["lang"] == "zh":
                text = json.dumps(meta, ensure_ascii=False)
                assert re.search(r"[\u4e00-\u9fff]", text), key
    train_keys = {k for t in TASKS for k, _, _ in samples(root, t)}
    held_keys = {k for t in TASKS for k, _, _ in samples(root, f"heldout/{t}")}
    assert not train_keys & held_keys


def test_task_fields(demo):
    root, _ = demo
    for _, m, _ in samples(root, "vqa"):
        assert m["question"] and m["answers"] and all(isinstance(a, str) and a for a in m["answers"])
    for _, m, imgs in samples(root, "text"):
        assert not imgs and len(m["text"]) > 20
    for key, m, _ in samples(root, "chat"):
        conv = m["conversations"]
        assert conv and [t["from"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        refs = re.findall(r"<img>(.*?)</img>", " ".join(t["value"] for t in conv))
        assert refs == m["images"], key  # each member referenced once, in order
    chats = samples(root, "chat") + samples(root, "heldout/chat")
    assert any(len(m["images"]) == 2 for _, m, _ in chats)  # multi-image
    assert any(not m["images"] for _, m, _ in chats)  # pure text dialogue
    for _, m, _ in chats:  # arithmetic answers are right
        for q, a in zip(m["conversations"][::2], m["conversations"][1::2]):
            mm = re.fullmatch(r"(?:What is (\d+) plus (\d+)\?|Compute (\d+) \+ (\d+)\.|(\d+)加(\d+)等于多少？|请计算(\d+)\+(\d+)。)",
                              q["value"])
            if mm:
                x, y = [int(v) for v in mm.groups() if v is not None]
                assert str(x + y) in a["value"]


def _color_of(phrase: str) -> tuple[int, int, int]:
    phrase = phrase.split(" on a ")[0]  # the background colour is not the object's
    for en, zh, rgb in COLORS:
        if re.search(rf"\b{en}\b", phrase) or zh in phrase:
            return rgb
    raise AssertionError(f"no colour in {phrase!r}")


def _component_boxes(im: Image.Image, rgb) -> list[tuple[int, int, int, int]]:
    from skimage.measure import label, regionprops

    mask = np.all(np.asarray(im.convert("RGB")) == np.array(rgb, dtype=np.uint8), axis=-1)
    # regionprops bbox = (min_row, min_col, max_row, max_col) with exclusive max
    return [(r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in regionprops(label(mask)) if r.area > 20]


def _check_box(im: Image.Image, box: list[int], phrase: str, key: str) -> None:
    assert len(box) == 4 and all(isinstance(v, int) and 0 <= v < 1000 for v in box), (key, box)
    assert box[0] < box[2] and box[1] < box[3], (key, box)
    W, H = im.size
    px = (box[0] * W / 1000, box[1] * H / 1000, box[2] * W / 1000, box[3] * H / 1000)
    comps = _component_boxes(im, _color_of(phrase))
    assert any(max(abs(a - b) for a, b in zip(c, px)) <= 2.5 for c in comps), (key, phrase, px, comps)


def test_boxes_match_drawn_shapes(demo):
    root, _ = demo
    n = 0
    for sub in ("ref_grounding", "heldout/ref_grounding"):
        for key, m, imgs in samples(root, sub):
            _check_box(Image.open(io.BytesIO(imgs[m["images"][0]])), m["box"], m["expression"], key)
            n += 1
    for key, m, imgs in samples(root, "region_caption"):
        _check_box(Image.open(io.BytesIO(imgs[m["images"][0]])), m["box"], m["description"], key)
        n += 1
    for key, m, imgs in samples(root, "grounded_caption"):
        im = Image.open(io.BytesIO(imgs[m["images"][0]]))
        pairs = re.findall(r"<ref>(.*?)</ref><box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>", m["caption"])
        assert pairs, key
        for phrase, *coords in pairs:
            _check_box(im, [int(c) for c in coords], phrase, key)
            n += 1
    assert n > 30


def test_ocr_quads_cover_the_ink(demo):
    root, _ = demo
    for sub in ("ocr", "heldout/ocr"):
        for key, m, imgs in samples(root, sub):
            im = np.asarray(Image.open(io.BytesIO(imgs[m["images"][0]])).convert("L"))
            H, W = im.shape
            ink = im < 150
            covered = np.zeros_like(ink)
            assert m["lines"], key
            for ln in m["lines"]:
                q = ln["quad"]
                assert len(q) == 8 and all(isinstance(v, int) and 0 <= v < 1000 for v in q), key
                x1, y1, x2, y2 = q[0], q[1], q[4], q[5]
                assert (q[2], q[3], q[6], q[7]) == (x2, y1, x1, y2), key  # clockwise axis-aligned corners
                c = (int(x1 * W / 1000) - 2, int(y1 * H / 1000) - 2, int(x2 * W / 1000) + 3, int(y2 * H / 1000) + 3)
                region = ink[max(0, c[1]):c[3], max(0, c[0]):c[2]]
                assert region.any(), (key, ln)  # each quad holds ink
                covered[max(0, c[1]):c[3], max(0, c[0]):c[2]] = True
                assert ln["text"].strip()
            assert not (ink & ~covered).any(), key  # no ink outside the quads
