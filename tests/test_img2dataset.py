"""Web-scale image-text shards as img2dataset writes them (the layout of LAION / DataComp / COYO downloads:
KEY.jpg + KEY.txt + KEY.json): a source declares `layout: img2dataset` and stage 1 trains on them, the
cleaning CLI reads them, and their bad samples (unsafe keys, invalid UTF-8 captions) are counted."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data.clean import main as clean_main
from data.layouts import make_layout
from data.loader import LoaderError, ShardStream, build_stream, read_refs
from data.samples import SampleBuilder
from train.config import ConfigError, load_config
from train.loop import train

CAPTIONS = ["a red square on a white background", "a small blue circle in the middle of a grey field",
            "一只红色的猫坐在白色的桌子上", "green triangle pointing up on a black background",
            "two yellow stripes across a dark blue picture", "an orange disc next to a purple square"]


def _jpeg(i: int, side: int = 96) -> bytes:
    import numpy as np

    # noise, seeded per sample: distinct images (flat colours would be near-duplicates to the cleaner's dHash)
    img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
                          ).resize((side, side), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_img2dataset_shard(path: Path, captions: list[str], shard_id: int = 0,
                            extra: list[tuple[str, dict[str, bytes]]] = ()) -> list[str]:
    """One shard exactly as img2dataset's WebDatasetSampleWriter writes it (webdataset.TarWriter; keys
    shard id (5 digits) + sample index (4 digits); members sorted: jpg, json, txt; json indent=4 with
    url/caption/key/status/error_message/width/height/original_width/original_height/exif/sha256).
    `extra`: raw (member name, bytes) groups appended after the good samples (hand-made bad ones)."""
    import hashlib

    from webdataset.writer import TarWriter

    keys = []
    with open(path, "wb") as f:
        tw = TarWriter(f)
        for i, cap in enumerate(captions):
            key = f"{shard_id:05d}{i:04d}"
            img = _jpeg(i)
            meta = {"url": f"https://example.com/img/{i}.jpg", "caption": cap, "key": key, "status": "success",
                    "error_message": None, "width": 96, "height": 96, "original_width": 640,
                    "original_height": 640, "exif": "{}", "sha256": hashlib.sha256(img).hexdigest()}
            tw.write({"__key__": key, "jpg": img, "txt": cap, "json": json.dumps(meta, indent=4)})
            keys.append(key)
        tw.close()
    if extra:  # append members to the finished archive (tarfile "a" mode rewrites the end blocks)
        with tarfile.open(path, "a") as tf:
            for _, members in extra:
                for name, data in members.items():
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    return keys


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    d = tmp_path / "laion"
    d.mkdir()
    write_img2dataset_shard(d / "00000.tar", CAPTIONS)
    (d / "00000_stats.json").write_text("{}")  # img2dataset writes these next to the tars: not shards
    return d


def test_shard_reads_in_the_project_layout(shard_dir):
    layout = make_layout("laion", "img2dataset")
    st = ShardStream(shard_dir, name="laion", epochs=1, layout=layout, shuffle_shards=False)
    samples = list(st)
    assert [s.key for s in samples] == [f"0000000{i:02d}" for i in range(len(CAPTIONS))]
    s = samples[0]
    assert s.meta["task"] == "caption" and s.meta["caption"] == CAPTIONS[0] and s.meta["images"] == ["img0.jpg"]
    assert s.meta["url"] == "https://example.com/img/0.jpg" and s.meta["source"] == "laion"
    assert sorted(s.files) == ["img0.jpg"] and s.files["img0.jpg"][:3] == b"\xff\xd8\xff"
    # language detected per sample (data.converters.detect_lang), or set by the source
    assert [x.meta["lang"] for x in samples] == ["en", "en", "zh", "en", "en", "en"]
    zh = list(ShardStream(shard_dir, name="laion", epochs=1, shuffle_shards=False,
                          layout=make_layout("laion", "img2dataset", lang="zh")))
    assert {x.meta["lang"] for x in zh} == {"zh"}
    # caption from a JSON field instead of KEY.txt
    js = list(ShardStream(shard_dir, name="laion", epochs=1, shuffle_shards=False,
                          layout=make_layout("laion", "img2dataset", caption_from="json:url")))
    assert js[1].meta["caption"] == "https://example.com/img/1.jpg"
    # the builder takes them as stage-1 captions; a reference re-reads them with their layout
    b = SampleBuilder(1, None, 56, 300)
    out = b(s)
    assert out.task == "caption" and len(out.images) == 1
    again = read_refs([samples[3].ref()])[0]
    assert again.meta == samples[3].meta and again.files == samples[3].files
    # without the layout every sample is refused by the builder, as the issue reported
    from data.samples import SkipSample

    raw = next(iter(ShardStream(shard_dir, name="laion", epochs=1, shuffle_shards=False)))
    with pytest.raises(SkipSample, match="metadata has no 'task'"):
        b(raw)


def test_bad_keys_and_invalid_text_are_counted(tmp_path):
    shard = tmp_path / "bad.tar"
    good = _jpeg(0)
    extra = [("evil", {"../../etc/evil.jpg": good, "../../etc/evil.txt": b"a caption that escapes"}),
             ("abs", {"/abs/x.jpg": good, "/abs/x.txt": b"an absolute caption"}),
             ("surrogate", {"000000099.jpg": good, "000000099.txt": b"bad \xed\xa0\x80 caption"}),
             ("latin1", {"000000098.jpg": good, "000000098.txt": "caf\u00e9 au lait".encode("latin-1")}),
             ("json_surrogate", {"000000097.jpg": good, "000000097.txt": b"fine",
                                 "000000097.json": b'{"caption": "x \\ud800 y"}'})]
    write_img2dataset_shard(shard, CAPTIONS[:2], extra=extra)
    st = build_stream([{"name": "web", "shards": str(shard), "layout": "img2dataset",
                        "caption_from": "json:caption"}], epochs=1, shuffle_shards=False)
    got = list(st)
    assert [s.key for s in got] == ["000000000", "000000001", "000000097"]
    # keys with '..' / absolute paths: bad_member_name; the .txt without json: caption_from=json needs a json
    assert st.skipped == {"bad_member_name": 2, "missing_json": 2}
    # a lone surrogate written into JSON decodes into a str: the builder counts it (never replaced)
    from data.samples import SkipSample

    with pytest.raises(SkipSample) as e:
        SampleBuilder(1, None, 56, 300)(got[2])
    assert e.value.reason == "invalid_unicode"
    st = build_stream([{"name": "web", "shards": str(shard), "layout": "img2dataset"}], epochs=1,
                      shuffle_shards=False)
    assert [s.key for s in st] == ["000000000", "000000001", "000000097"]
    # an encoded surrogate / latin-1 bytes in KEY.txt: not UTF-8, counted as invalid_unicode
    assert st.skipped == {"bad_member_name": 2, "invalid_unicode": 2}


def test_layout_keys_are_checked_at_start_up(tmp_path):
    with pytest.raises(LoaderError, match="layout 'laion' is not one of"):
        build_stream([{"name": "x", "shards": str(tmp_path), "layout": "laion"}])
    with pytest.raises(ConfigError, match=r"data\.sources\.0: source 'web': caption_from 'json' must be"):
        load_config(["recipe=demo_stage1", "data.demo.enabled=false",
                     "data.sources=[{name:web,shards:x,layout:img2dataset,caption_from:json}]"])


def test_stage1_trains_on_img2dataset_shards(shard_dir, tmp_path, capsys):
    """The issue's case: stage 1 on an img2dataset shard, declared in the data config. Held-out evaluation on a
    project-layout split with one unusable sample: its skip is in the end-of-run line."""
    held = tmp_path / "held"
    held.mkdir()
    with tarfile.open(held / "held-000000.tar", "w") as tf:
        for key, meta in (("h0", {"task": "caption", "lang": "en", "images": ["img0.jpg"], "source": "t",
                                  "caption": "a red square on a white background"}),
                          ("h1", {"lang": "en", "images": ["img0.jpg"], "caption": "no task here"})):
            for name, data in ((f"{key}.json", json.dumps(meta).encode()), (f"{key}.img0.jpg", _jpeg(1))):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    cfg = load_config(["recipe=demo_stage1", "model=micro", "model.vision.image_size=56", "data.seq_len=300",
                       "data.demo.enabled=false", "data.buffer_size=0", "logging=quiet", "train.steps=3",
                       "train.micro_batch_size=2", "train.global_batch_size=2", "data.options.pack_buffer=4",
                       f"data.sources=[{{name:laion,shards:'{shard_dir}',layout:img2dataset}}]",
                       f"data.heldout={{caption:'{held}'}}", "eval.at_start=false", "eval.at_end=true",
                       f"output_dir={tmp_path / 'run'}", "train.export_final=false", "init.from_stage_dir=null"])
    assert cfg.data.sources[0].layout == "img2dataset" and cfg.data.sources[0].caption_from == "txt"
    summary = train(cfg)
    assert summary["steps_run"] == 3 and all(x == x for x in summary["losses"])  # finite losses
    assert summary["skipped"] == {}
    assert summary["heldout_skipped"] == {"missing_key": 1}
    done = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[train] done:")][-1]
    assert "skipped samples (occurrences, by reason) none" in done
    assert "held-out skipped (occurrences over all evaluations) {'missing_key': 1}" in done


def test_cleaning_cli_reads_img2dataset_shards(shard_dir, tmp_path, capsys):
    out = tmp_path / "clean"
    clean_main([str(shard_dir / "00000.tar"), "--out", str(out), "--layout", "img2dataset", "--source", "laion"])
    rep = json.loads((out / "cleaning_report.json").read_text())
    assert rep["input"] == len(CAPTIONS) and rep["skipped_total"] == 0
    assert rep["kept"] == len(CAPTIONS), rep
    assert rep["by_lang"]["zh"]["kept"] == 1 and rep["by_lang"]["en"]["kept"] == len(CAPTIONS) - 1
    # the output is in the project's layout and trains without a declared layout
    samples = list(ShardStream(out, name="c", epochs=1, shuffle_shards=False))
    assert len(samples) == len(CAPTIONS)
    assert samples[0].meta["source"] == "laion" and samples[0].meta["task"] == "caption"
    assert SampleBuilder(1, None, 56, 300)(samples[0]).task == "caption"
    # without --layout the img2dataset members (jpg, txt, no 'images' list) are not an image sample
    out2 = tmp_path / "clean2"
    clean_main([str(shard_dir / "00000.tar"), "--out", str(out2)])
    rep2 = json.loads((out2 / "cleaning_report.json").read_text())
    assert rep2["kept"] == 0 and rep2["removed"]["bad_image"] == len(CAPTIONS)
