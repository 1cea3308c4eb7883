"""Unsafe sample keys and invalid Unicode in metadata are counted skips (data.sanity), in training and
cleaning alike, never silently repaired."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from data.loader import RawSample
from data.samples import SKIP_REASONS, SampleBuilder, SkipSample
from data.sanity import key_problem, sample_problem, text_problem


def _jpg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _raw(key: str = "cap", caption: str = "A red square.") -> RawSample:
    meta = {"task": "caption", "images": ["img0.jpg"], "caption": caption, "lang": "en", "source": "t"}
    return RawSample(key=key, meta=meta, files={"img0.jpg": _jpg()}, source="s", url="/d/x.tar", index=3)


@pytest.mark.parametrize("key", ["../evil", "a/../../b", "/etc/passwd", "..\\win", "C:\\x"])
def test_unsafe_keys(key):
    assert key_problem(key)
    with pytest.raises(SkipSample) as ei:
        SampleBuilder(1, None, 28, 2048)(_raw(key=key))
    assert ei.value.reason == "bad_member_name" and "/d/x.tar #3" in str(ei.value)


@pytest.mark.parametrize("key", ["cap", "dir/sub/k-1", "a..b", "x.y"])
def test_safe_keys(key):
    assert key_problem(key) is None


def test_lone_surrogate_is_counted_not_replaced():
    meta = json.loads('{"caption": "ok", "lines": [{"text": "bad \\udc80 here"}]}')  # as a shard's JSON holds it
    assert "lines[0].text" in text_problem(meta) and "U+DC80" in text_problem(meta)
    assert text_problem({"caption": "中文 and émoji 🐶 fine"}) is None
    assert sample_problem("k", {"\ud800": 1})[0] == "invalid_unicode"  # a key inside the metadata too
    with pytest.raises(SkipSample) as ei:
        SampleBuilder(1, None, 28, 2048)(_raw(caption=json.loads('"x \\ud800 y"')))
    assert ei.value.reason == "invalid_unicode" and "caption" in str(ei.value)
    assert SampleBuilder(1, None, 28, 2048)(_raw()).input_ids  # the same sample with valid text builds
    assert {"bad_member_name", "invalid_unicode"} <= set(SKIP_REASONS)


def test_training_stream_counts_them(tmp_path):
    """Through the real stage pipeline: the unsafe key and the surrogate are counted under their reasons, the
    good sample is trained on."""
    import tarfile

    from data.pipeline import build_stage_stream

    def meta(caption: str) -> bytes:
        return json.dumps({"task": "caption", "images": ["img0.jpg"], "caption": caption, "lang": "en",
                           "source": "t"}).encode()

    members = [("good.json", meta("A red square.")), ("good.img0.jpg", _jpg()),
               ("../up.json", meta("A red square too.")), ("../up.img0.jpg", _jpg()),
               ("sur.json", meta("x \\ud800 y").replace(b"\\\\ud800", b"\\ud800")), ("sur.img0.jpg", _jpg())]
    shard = tmp_path / "s-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    st = build_stage_stream(1, str(shard), image_size=28, seq_len=512, batch_size=1, train=False)
    batches = list(st)
    assert len(batches) == 1
    stats = st.stats()
    assert stats["skipped"] == {"bad_member_name": 1, "invalid_unicode": 1} and stats["samples"] == 1
