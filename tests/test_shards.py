"""ShardWriter / iter_shard / read_manifest over real shards on disk."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data.shards import ShardError, ShardWriter, iter_shard, read_manifest, validate_meta


def _jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _samples():
    """One sample per task family (and both languages)."""
    j0, j1, p0 = _jpeg(0), _jpeg(1), _png(2)
    return [
        ("cap-0", {"task": "caption", "lang": "en", "source": "t", "caption": "A red square."}, [("jpg", j0)]),
        ("vqa-0", {"task": "vqa", "lang": "zh", "source": "t", "question": "这是什么？", "answers": ["猫", "猫咪"]},
         [("png", p0)]),
        ("gc-0", {"task": "grounded_caption", "lang": "en", "source": "t",
                  "caption": "<ref>a dog</ref><box>(1,2),(30,40)</box> runs"}, [("img0.jpg", j1)]),
        ("ref-0", {"task": "ref_grounding", "lang": "en", "source": "t", "expression": "left dog",
                   "box": [1, 2, 30, 40]}, [("jpg", j0)]),
        ("reg-0", {"task": "region_caption", "lang": "en", "source": "t", "box": [0, 0, 999, 999],
                   "description": "everything"}, [("jpg", j0)]),
        ("ocr-0", {"task": "ocr", "lang": "zh", "source": "t",
                   "lines": [{"text": "你好", "quad": [1, 2, 3, 2, 3, 4, 1, 4]}]}, [("jpg", j1)]),
        ("txt-0", {"task": "text", "lang": "en", "source": "t", "text": "Plain text."}, []),
        ("chat-0", {"task": "chat", "lang": "en", "source": "t", "conversations": [
            {"from": "user", "value": "Picture 1: <img>img0.jpg</img>\nPicture 2: <img>img1.png</img>\nSame?"},
            {"from": "assistant", "value": "No."}]}, [("jpg", j1), ("png", p0)]),
    ]


def test_roundtrip_layout_and_manifest(tmp_path):
    samples = _samples()
    with ShardWriter(tmp_path, prefix="t") as w:
        for key, meta, imgs in samples:
            w.write(key, meta, imgs)
    assert not list(tmp_path.glob("*.tmp"))
    man = read_manifest(tmp_path)
    assert [s["name"] for s in man["shards"]] == ["t-000000.tar"]
    shard = tmp_path / "t-000000.tar"
    # member names and order per DESIGN.md: KEY.json then KEY.img0.EXT, ...
    with tarfile.open(shard) as tar:
        members = tar.getnames()
        infos = tar.getmembers()
    assert members[:2] == ["cap-0.json", "cap-0.img0.jpg"]
    assert "chat-0.img0.jpg" in members and "chat-0.img1.png" in members and "txt-0.json" in members
    assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" and i.mode == 0o644 for i in infos)
    got = {k: (m, f) for k, m, f in iter_shard(shard)}
    assert list(got) == [k for k, _, _ in samples]
    for key, meta, imgs in samples:
        m, files = got[key]
        names = [f"img{i}.{(e if '.' not in e else e.split('.')[1])}" for i, (e, _) in enumerate(imgs)]
        assert m == {**meta, "images": names}
        assert files == {n: b for n, (_, b) in zip(names, imgs)}
        for b in files.values():
            Image.open(io.BytesIO(b)).load()
    # manifest counts equal what is actually in the tar
    s = man["shards"][0]
    assert s["n_samples"] == len(samples) == sum(n.endswith(".json") for n in members) == man["totals"]["n_samples"]
    assert s["bytes"] == shard.stat().st_size
    assert len(members) == sum(1 + len(imgs) for _, _, imgs in samples)
    assert s["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert man["totals"]["tasks"] == {t: 1 for t in ("caption", "vqa", "grounded_caption", "ref_grounding",
                                                     "region_caption", "ocr", "text", "chat")}
    assert man["totals"]["langs"] == {"en": 6, "zh": 2}


def test_webdataset_reads_our_shards(tmp_path):
    """An independent reader (webdataset) groups our members into the expected samples."""
    import webdataset as wds

    with ShardWriter(tmp_path) as w:
        for key, meta, imgs in _samples():
            w.write(key, meta, imgs)
    ds = wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False)
    rows = list(ds)
    assert [r["__key__"] for r in rows] == [k for k, _, _ in _samples()]
    chat = rows[-1]
    assert set(chat) >= {"json", "img0.jpg", "img1.png"}
    assert json.loads(chat["json"])["images"] == ["img0.jpg", "img1.png"]


def test_size_and_count_bounds(tmp_path):
    imgs = [_jpeg(i, 96) for i in range(12)]
    max_bytes = 3 * len(imgs[0]) + 6000
    with ShardWriter(tmp_path, prefix="s", max_bytes=max_bytes, max_samples=100) as w:
        for i, b in enumerate(imgs):
            w.write(f"k{i}", {"task": "caption", "lang": "en", "source": "t", "caption": f"c{i}"}, [("jpg", b)])
    man = read_manifest(tmp_path)
    files = sorted(tmp_path.glob("s-*.tar"))
    assert len(files) == len(man["shards"]) >= 3
    assert [p.name for p in files] == [f"s-{i:06d}.tar" for i in range(len(files))]
    keys = []
    for p, s in zip(files, man["shards"]):
        assert p.stat().st_size <= max_bytes and p.stat().st_size == s["bytes"]
        got = [k for k, _, _ in iter_shard(p)]
        assert len(got) == s["n_samples"] >= 1
        keys += got
    assert keys == [f"k{i}" for i in range(12)]
    assert not list(tmp_path.glob("*.tmp"))

    # sample-count bound
    d2 = tmp_path / "count"
    with ShardWriter(d2, max_samples=5) as w:
        for i in range(12):
            w.write(f"t{i}", {"task": "text", "lang": "en", "source": "t", "text": f"x{i}"})
    assert [s["n_samples"] for s in read_manifest(d2)["shards"]] == [5, 5, 2]


def test_oversized_sample_gets_its_own_shard(tmp_path):
    big = _png(0, 160)  # ~77 KB of noise, above max_bytes
    with ShardWriter(tmp_path, max_bytes=20480) as w:
        w.write("a", {"task": "text", "lang": "en", "source": "t", "text": "x"})
        w.write("b", {"task": "caption", "lang": "en", "source": "t", "caption": "y"}, [("png", big)])
        w.write("c", {"task": "text", "lang": "en", "source": "t", "text": "z"})
    assert [s["n_samples"] for s in read_manifest(tmp_path)["shards"]] == [1, 1, 1]


def test_reproducible_bytes(tmp_path):
    for d in ("a", "b"):
        with ShardWriter(tmp_path / d) as w:
            for key, meta, imgs in _samples():
                w.write(key, meta, imgs)
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()


@pytest.mark.parametrize("key,meta,imgs,match", [
    ("a.b", {"task": "text", "lang": "en", "source": "t", "text": "x"}, [], "must match"),
    ("a/b", {"task": "text", "lang": "en", "source": "t", "text": "x"}, [], "must match"),
    ("k", {"task": "poem", "lang": "en", "source": "t", "text": "x"}, [], "task 'poem'"),
    ("k", {"task": "text", "lang": "fr", "source": "t", "text": "x"}, [], "lang 'fr'"),
    ("k", {"task": "text", "source": "t", "text": "x"}, [], "lang None"),
    ("k", {"task": "text", "lang": "en", "text": "x"}, [], "source"),
    ("k", {"task": "text", "lang": "en", "source": "t", "text": "x"}, [("jpg", _jpeg(0))], "no images"),
    ("k", {"task": "caption", "lang": "en", "source": "t", "caption": "x"}, [], "exactly one image"),
    ("k", {"task": "caption", "lang": "en", "source": "t", "caption": "  "}, [("jpg", _jpeg(0))], "caption"),
    ("k", {"task": "caption", "lang": "en", "source": "t", "caption": "x"}, [("jpg", _png(0))], "magic"),
    ("k", {"task": "caption", "lang": "en", "source": "t", "caption": "x"}, [("gif", b"GIF89a")], "extension"),
    ("k", {"task": "caption", "lang": "en", "source": "t", "caption": "x"}, [("img1.jpg", _jpeg(0))], "img0"),
    ("k", {"task": "caption", "lang": "en", "source": "t", "caption": "x", "images": ["img0.png"]},
     [("jpg", _jpeg(0))], "disagrees"),
    ("k", {"task": "ref_grounding", "lang": "en", "source": "t", "expression": "x", "box": [0, 0, 1000, 5]},
     [("jpg", _jpeg(0))], "box"),
    ("k", {"task": "vqa", "lang": "en", "source": "t", "question": "q", "answers": []}, [("jpg", _jpeg(0))],
     "answers"),
    ("k", {"task": "ocr", "lang": "en", "source": "t", "lines": [{"text": "a", "quad": [1, 2, 3, 4]}]},
     [("jpg", _jpeg(0))], "lines"),
    ("k", {"task": "chat", "lang": "en", "source": "t", "conversations": [
        {"from": "user", "value": "<img>img1.jpg</img> hi"}, {"from": "assistant", "value": "x"}]},
     [("jpg", _jpeg(0))], "references"),
    ("k", {"task": "text", "lang": "en", "source": "t", "text": float("nan")}, [], "text"),
    ("k", {"task": "text", "lang": "en", "source": "t", "text": "x", "extra": float("nan")}, [], "JSON"),
])
def test_rejects_bad_samples(tmp_path, key, meta, imgs, match):
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ShardError, match=match) as ei:
            w.write(key, meta, imgs)
        assert repr(key)[1:-1] in str(ei.value) or "key" in str(ei.value)
        assert w.n_written == 0


def test_duplicate_key_and_caller_meta_untouched(tmp_path):
    meta = {"task": "text", "lang": "en", "source": "t", "text": "x"}
    with ShardWriter(tmp_path) as w:
        w.write("k", meta)
        with pytest.raises(ShardError, match="twice"):
            w.write("k", meta)
    assert "images" not in meta  # the writer copies, never mutates the caller's dict
    assert read_manifest(tmp_path)["totals"]["n_samples"] == 1


def test_exception_in_block_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_samples=2) as w:
            for i in range(3):
                w.write(f"k{i}", {"task": "text", "lang": "en", "source": "t", "text": "x"})
            raise RuntimeError("boom")
    # the full first shard was finalised; the open one (k2) is removed; no manifest marks it incomplete
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]


def test_overwrite_false_refuses_existing(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write("k", {"task": "text", "lang": "en", "source": "t", "text": "x"})
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path, overwrite=False)


def test_iter_shard_reports_malformed(tmp_path):
    p = tmp_path / "bad.tar"
    with tarfile.open(p, "w") as tar:
        for name, data in [("a.json", b"{not json"), ]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    with pytest.raises(ValueError, match="a.json is not valid JSON"):
        list(iter_shard(p))
    with tarfile.open(p, "w") as tar:
        data = json.dumps({"task": "caption", "images": ["img0.jpg"]}).encode()
        ti = tarfile.TarInfo("b.json")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    with pytest.raises(ValueError, match="not in the shard"):
        list(iter_shard(p))
    with pytest.raises(ValueError, match="manifest"):
        read_manifest(tmp_path)


def test_validate_meta_accepts_all_tasks():
    for key, meta, imgs in _samples():
        validate_meta(key, {**meta, "images": [f"img{i}.x" for i in range(len(imgs))] if key != "chat-0"
                            else ["img0.jpg", "img1.png"]})


def test_rerun_replaces_previous_shards(tmp_path):
    text = {"task": "text", "lang": "en", "source": "t", "text": "x"}
    with ShardWriter(tmp_path, max_samples=1) as w:
        for i in range(3):
            w.write(f"k{i}", text)
    (tmp_path / "shard-000007.tar.tmp").write_bytes(b"left by a crash")
    (tmp_path / "other-000000.tar").write_bytes(b"not ours")
    with ShardWriter(tmp_path, max_samples=1) as w:
        w.write("only", text)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["manifest.json", "other-000000.tar", "shard-000000.tar"]
    assert [k for k, _, _ in iter_shard(tmp_path / "shard-000000.tar")] == ["only"]
