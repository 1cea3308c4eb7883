"""Stage-1 cleaning rules: each rule with one passing and one failing sample, report accounting,
CLIP filter with a tiny random OpenCLIP model, and the CLI end to end on real shards."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data.cleaning import (
    RULES,
    Cleaner,
    CleaningConfig,
    ClipScorer,
    MinHasher,
    NearDupIndex,
    dhash,
    hamming,
    jaccard,
    shingles,
    text_length,
)


def noise_png(seed: int, w: int = 96, h: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def sample(caption, seed=0, w=96, h=96, lang=None, img=None, **extra):
    meta = {"task": "caption", "images": ["img0.png"], "caption": caption, "source": "test", **extra}
    if lang:
        meta["lang"] = lang
    return meta, {"img0.png": img if img is not None else noise_png(seed, w, h)}


def decide(caption, cfg=None, **kw):
    c = Cleaner(cfg or CleaningConfig())
    meta, imgs = sample(caption, **kw)
    return c.process("k", meta, imgs)


GOOD_EN = "A brown dog runs across a green field."
GOOD_ZH = "一只棕色的小狗在绿色的草地上奔跑。"


@pytest.mark.parametrize("text", [GOOD_EN, GOOD_ZH, "Mixed 中英文 caption, OK."])
def test_good_samples_pass(text):
    d = decide(text)
    assert d.keep and d.rule is None, d.detail


@pytest.mark.parametrize(
    "rule,bad_kwargs,good_kwargs",
    [
        ("image_too_small", dict(w=40, h=100), dict(w=64, h=100)),
        ("aspect_ratio", dict(w=310, h=100), dict(w=300, h=100)),
        ("aspect_ratio", dict(w=80, h=260), dict(w=80, h=240)),
        ("bad_image", dict(img=b"not an image at all"), dict()),
    ],
)
def test_image_rules(rule, bad_kwargs, good_kwargs):
    bad = decide(GOOD_EN, **bad_kwargs)
    assert not bad.keep and bad.rule == rule, (bad.rule, bad.detail)
    good = decide(GOOD_EN, **good_kwargs)
    assert good.keep, (good.rule, good.detail)


def test_missing_image_member_is_bad_image():
    c = Cleaner()
    meta, _ = sample(GOOD_EN)
    d = c.process("k", meta, {})
    assert d.rule == "bad_image" and "img0.png" in d.detail


@pytest.mark.parametrize(
    "rule,bad,good",
    [
        ("missing_text", "   ", GOOD_EN),
        ("missing_text", "<div><br/></div>", "<div>A cat sleeping on a sofa.</div>"),
        ("emoji", "A happy dog in the park 🐶", "A happy dog in the park :)"),
        ("emoji", "阳光明媚的海滩☀", "阳光明媚的海滩。"),
        ("non_en_zh_chars", "Собака бежит по полю", GOOD_EN),
        ("non_en_zh_chars", "강아지가 들판을 달린다", GOOD_ZH),
        ("non_en_zh_chars", "Un café à Paris près de la gare", "A cafe in Paris near the station"),
        ("boilerplate", "Click here to see more dog photos", "Three dogs playing with a ball"),
        ("boilerplate", "点击查看大图：海边的日落", "海边的日落，天空是橙色的。"),
        ("boilerplate", "Sunset beach stock photo", "Sunset over a quiet beach"),
        ("text_too_short", "dog", "a dog ran"),  # weighted length 3 < 6 <= 7
        ("text_too_short", "小狗", "小狗跑"),  # CJK weight 2: 4 < 6 <= 6
        ("text_too_long", "word " * 200, "word " * 100),
    ],
)
def test_text_rules(rule, bad, good):
    d_bad = decide(bad)
    assert not d_bad.keep and d_bad.rule == rule, (d_bad.rule, d_bad.detail)
    d_good = decide(good)
    assert d_good.keep, (d_good.rule, d_good.detail)


def test_foreign_fraction_is_configurable():
    text = "A small café near the river bank"  # 1 foreign char of 32
    assert decide(text).rule == "non_en_zh_chars"
    assert decide(text, cfg=CleaningConfig(max_foreign_fraction=0.05)).keep


def test_text_length_weights_cjk():
    assert text_length("a b c") == 3
    assert text_length("小狗 dog", cjk_weight=2.0) == 7
    assert text_length("小狗", cjk_weight=1.5) == 3


@pytest.mark.parametrize(
    "rewrite,raw,expected",
    [
        ("strip_html", "<p>A <b>red</b> car &amp; a bus</p><script>var x=1;</script>", "A red car & a bus"),
        ("strip_url", "A red car parked outside https://example.com/cars?id=3 today", "A red car parked outside today"),
        ("strip_url", "一辆红色的汽车 www.example.cn 停在路边", "一辆红色的汽车 停在路边"),
        ("strip_email", "A red car, contact me at joe.doe@example.org", "A red car, contact me at"),
        ("collapse_repeats", "What a view!!!!!!! Sooooooo nice", "What a view! So nice"),
    ],
)
def test_rewrites_strip_and_are_counted(rewrite, raw, expected):
    c = Cleaner()
    meta, imgs = sample(raw)
    d = c.process("k", meta, imgs)
    assert d.keep, (d.rule, d.detail)
    assert d.meta["caption"] == expected
    assert d.rewrites == [rewrite]
    assert c.report.modified[rewrite] == 1
    assert meta["caption"] == raw  # input metadata is not mutated


def test_digit_runs_are_not_collapsed():
    d = decide("A banner that reads 1000000 visitors")
    assert d.keep and "1000000" in d.meta["caption"] and not d.rewrites


def test_exact_duplicate_same_pixels_reencoded():
    c = Cleaner(CleaningConfig(dedup_near_image=False, dedup_near_text=False))
    png = noise_png(1)
    rgb = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="BMP")  # different container, identical pixels
    m1, _ = sample("A red kite in the sky.")
    m2 = dict(m1, images=["img0.bmp"])
    assert c.process("a", m1, {"img0.png": png}).keep
    d = c.process("b", m2, {"img0.bmp": buf.getvalue()})
    assert d.rule == "exact_duplicate"
    # normalisation: case / whitespace / final punctuation do not matter
    assert c.process("c", dict(m1, caption="a red  KITE in the sky"), {"img0.png": png}).rule == "exact_duplicate"
    # same image, different text -> kept (near-dup rules disabled here)
    assert c.process("d", dict(m1, caption="Kite flying over a beach."), {"img0.png": png}).keep


def test_near_duplicate_image_dhash():
    base = np.asarray(Image.open(io.BytesIO(noise_png(3, 128, 128))).resize((16, 16))).repeat(8, 0).repeat(8, 1)
    img = Image.fromarray(base)
    shifted = Image.fromarray(np.clip(base.astype(int) + 12, 0, 255).astype(np.uint8))  # brightness change
    other = Image.open(io.BytesIO(noise_png(4, 128, 128)))
    h0, h1, h2 = dhash(img), dhash(shifted), dhash(other)
    assert hamming(h0, h1) <= 4 < hamming(h0, h2)

    def png(im):
        b = io.BytesIO()
        im.save(b, format="PNG")
        return b.getvalue()

    c = Cleaner()
    assert c.process("a", *sample("A textured pattern of squares.", img=png(img))).keep
    d = c.process("b", *sample("Totally different words about boats.", img=png(shifted)))
    assert d.rule == "near_duplicate_image"
    assert c.process("c", *sample("Another caption about trains.", img=png(other))).keep


def test_near_dup_index_is_exact_radius():
    rng = np.random.default_rng(0)
    idx = NearDupIndex(radius=4)
    base = int(rng.integers(0, 2**63)) | (1 << 63)
    idx.add(base)
    for k in range(0, 9):
        bits = rng.choice(64, size=k, replace=False)
        h = base
        for b in bits:
            h ^= 1 << int(b)
        assert (idx.find(h) is not None) == (k <= 4), k


def test_near_duplicate_text_minhash():
    t1 = "A large brown dog is running across a wide green field on a sunny afternoon in the park."
    t2 = "A large brown dog is running across a wide green field on a sunny afternoon in the park today."
    t3 = "Two children are building a sandcastle next to the sea while their parents watch."
    k = 3
    assert jaccard(shingles(t1, k), shingles(t2, k)) > 0.9 > jaccard(shingles(t1, k), shingles(t3, k))
    mh = MinHasher(256, k)
    est = MinHasher.estimate(mh.signature(t1), mh.signature(t2))
    assert abs(est - jaccard(shingles(t1, k), shingles(t2, k))) < 0.1
    c = Cleaner()
    assert c.process("a", *sample(t1, seed=1)).keep
    assert c.process("b", *sample(t2, seed=2)).rule == "near_duplicate_text"
    assert c.process("c", *sample(t3, seed=3)).keep


def test_rejected_samples_do_not_enter_dedup_state():
    c = Cleaner()
    png = noise_png(5)
    assert c.process("a", *sample("Buy now: a red car parked outside.", img=png)).rule == "boilerplate"
    assert c.process("b", *sample("A red car parked outside.", img=png)).keep


def test_text_task_and_passthrough():
    c = Cleaner()
    d = c.process("t", {"task": "text", "lang": "zh", "images": [], "text": GOOD_ZH}, {})
    assert d.keep and not d.passthrough
    d = c.process("t2", {"task": "text", "images": [], "text": "Привет мир, как дела?"}, {})
    assert d.rule == "non_en_zh_chars"
    v = c.process("v", {"task": "vqa", "lang": "en", "images": [], "question": "🐶?", "answers": ["x"]}, {})
    assert v.keep and v.passthrough
    assert c.report.passthrough == 1 and c.report.input == 3


def test_report_counts_add_up():
    c = Cleaner(CleaningConfig(examples_per_rule=2))
    inputs = [
        sample(GOOD_EN, seed=1, lang="en"), sample(GOOD_ZH, seed=2, lang="zh"),
        sample("dog", seed=3, lang="en"), sample("cat", seed=4, lang="en"), sample("bird", seed=5, lang="en"),
        sample("Собака", seed=6), sample(GOOD_EN, seed=1, lang="en"),  # exact duplicate of the first
        sample(GOOD_ZH, seed=7, w=20, h=20, lang="zh"),
    ]
    decisions = c.process_batch([(f"k{i}", m, im) for i, (m, im) in enumerate(inputs)])
    rep = c.report.to_dict()
    assert rep["input"] == 8 and rep["kept"] == 2
    assert rep["kept"] + rep["removed_total"] == rep["input"]
    assert sum(rep["removed"].values()) == 6
    assert rep["removed"]["text_too_short"] == 3 and rep["removed"]["exact_duplicate"] == 1
    assert rep["removed"]["non_en_zh_chars"] == 1 and rep["removed"]["image_too_small"] == 1
    assert rep["examples"]["text_too_short"] == ["k2", "k3"]  # capped at examples_per_rule
    # "Собака" has no lang and no CJK, so detect_lang buckets it as en
    assert rep["by_lang"]["en"]["input"] == 6 and rep["by_lang"]["zh"]["kept"] == 1
    assert sum(v["input"] for v in rep["by_lang"].values()) == 8
    assert set(rep["removed"]) == set(RULES)
    assert [d.keep for d in decisions] == [True, True, False, False, False, False, False, False]


def test_config_validation():
    with pytest.raises(ValueError, match="unknown CleaningConfig keys"):
        CleaningConfig.from_dict({"max_aspect": 2})
    with pytest.raises(ValueError, match="min_text_len"):
        CleaningConfig(min_text_len=10, max_text_len=5)
    cfg = CleaningConfig.from_dict(CleaningConfig(min_image_side=10).to_dict())
    assert cfg.min_image_side == 10 and isinstance(cfg.boilerplate_patterns, tuple)


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    import torch

    d = tmp_path_factory.mktemp("clipcfg")
    (d / "tiny-clip-cleaning-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d / "tiny-clip-cleaning-test.json")
    torch.manual_seed(0)
    return ClipScorer("tiny-clip-cleaning-test", pretrained=None)


def test_clip_scorer_matches_model_forward(tiny_clip):
    import torch

    ims = [Image.open(io.BytesIO(noise_png(s))) for s in (10, 11)]
    texts = ["a noisy picture", "一张噪声图片"]
    scores = tiny_clip.score(ims, texts)
    with torch.no_grad():  # independent path: CLIP.forward returns normalised features
        px = torch.stack([tiny_clip.preprocess(im) for im in ims])
        out = tiny_clip.model(px, tiny_clip.tokenizer(texts))
        fi, ft = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
        ref = (fi * ft).sum(-1).numpy()
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    assert np.all(np.abs(scores) <= 1 + 1e-5)


def test_clip_filter_threshold_and_per_source(tiny_clip):
    pairs = [("a noisy picture of pixels", 20), ("一张彩色噪声图片", 21)]
    ims = [Image.open(io.BytesIO(noise_png(s))) for _, s in pairs]
    s = tiny_clip.score(ims, [t for t, _ in pairs])
    assert abs(s[0] - s[1]) > 1e-4
    thr = float((s[0] + s[1]) / 2)
    hi = int(np.argmax(s))
    c = Cleaner(CleaningConfig(clip_threshold=thr), clip_scorer=tiny_clip)
    ds = c.process_batch([(f"k{i}", *sample(t, seed=sd)) for i, (t, sd) in enumerate(pairs)])
    assert ds[hi].keep and abs(ds[hi].meta["clip_score"] - s[hi]) < 1e-3
    assert not ds[1 - hi].keep and ds[1 - hi].rule == "clip_score"
    assert c.report.removed["clip_score"] == 1
    # a per-source threshold below both scores keeps both
    c2 = Cleaner(CleaningConfig(clip_threshold=thr, clip_thresholds={"test": float(min(s)) - 0.01}),
                 clip_scorer=tiny_clip)
    assert all(d.keep for d in c2.process_batch([(f"k{i}", *sample(t, seed=sd)) for i, (t, sd) in enumerate(pairs)]))


def test_clip_scorer_bad_model_name_is_clear():
    with pytest.raises(RuntimeError, match="no-such-clip-model"):
        ClipScorer("no-such-clip-model")


def _write_input_shards(out_dir, max_samples=3):
    from data.shards import ShardWriter

    rows = [
        ("good-en", sample(GOOD_EN, seed=30, lang="en")),
        ("good-zh", sample(GOOD_ZH, seed=31, lang="zh")),
        ("html", sample("<b>A red bus</b> on a rainy street &amp; people", seed=32, lang="en")),
        ("short", sample("dog", seed=33, lang="en")),
        ("emoji", sample("A cute puppy 🐶🐶", seed=34, lang="en")),
        ("tiny", sample(GOOD_EN + " Again.", seed=35, w=30, h=30, lang="en")),
        ("dup", sample(GOOD_EN, seed=30, lang="en")),
        ("cyrillic", sample("Красная машина на дороге", seed=36, lang="en")),
    ]
    w = ShardWriter(str(out_dir), "in", 1 << 20, max_samples)
    for key, (meta, imgs) in rows:
        w.write(key, meta, images=list(imgs.items()))
    w.close()
    return rows


def test_cli_end_to_end(tmp_path):
    import subprocess
    import sys

    from data.shards import iter_shard

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rows = _write_input_shards(src)
    assert len(list(src.glob("*.tar"))) >= 2  # several input shards
    r = subprocess.run([sys.executable, "-m", "data.clean", str(src), "--out", str(out), "--set", "min_text_len=8",
                        "--max-samples", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "cleaning_report.json").read_text())
    assert rep["input"] == len(rows) == rep["kept"] + rep["removed_total"]
    assert rep["config"]["min_text_len"] == 8
    expect = {"short": "text_too_short", "emoji": "emoji", "tiny": "image_too_small", "dup": "exact_duplicate",
              "cyrillic": "non_en_zh_chars"}
    for key, rule in expect.items():
        assert key in rep["examples"][rule], (key, rule, rep["examples"])
    assert rep["modified"]["strip_html"] == 1
    kept = {}
    for p in sorted(out.glob("*.tar")):
        for key, meta, imgs in iter_shard(str(p)):
            kept[key] = (meta, imgs)
    assert set(kept) == {"good-en", "good-zh", "html"} and rep["kept"] == 3
    assert kept["html"][0]["caption"] == "A red bus on a rainy street & people"
    orig = dict(rows)
    for key, (meta, imgs) in kept.items():
        assert imgs == orig[key][1]  # image bytes carried unchanged
        assert meta["lang"] == orig[key][0]["lang"]


def test_resolve_inputs_patterns(tmp_path):
    from data.clean import resolve_inputs

    _write_input_shards(tmp_path)
    tars = sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert len(tars) >= 2
    assert resolve_inputs([str(tmp_path)]) == tars
    if (tmp_path / "manifest.json").exists():
        assert sorted(resolve_inputs([str(tmp_path / "manifest.json")])) == tars
    names = ",".join(os.path.basename(t) for t in tars[:2])
    assert resolve_inputs([f"{tmp_path}/{{{names}}}"]) == tars[:2]  # brace list
    assert resolve_inputs([str(tmp_path / "*.tar")]) == tars  # glob
    assert resolve_inputs([tars[0]]) == tars[:1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_inputs([str(tmp_path / "missing-{0..1}.tar")])
    with pytest.raises(FileNotFoundError, match="neither manifest.json nor"):
        resolve_inputs([str(tmp_path / "empty")]) if (tmp_path / "empty").mkdir() is None else None


# ---------------------------------------------------------------- malformed input and atomic output


def _raw_tar(path, members):
    """A tar written by hand (not ShardWriter, which refuses bad samples): [(member name, bytes)]."""
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _meta_bytes(caption, **extra):
    meta = {"task": "caption", "images": ["img0.png"], "caption": caption, "lang": "en", "source": "t", **extra}
    return json.dumps(meta).encode()


def _malformed_inputs(root):
    """One good shard set plus a shard of malformed samples and a truncated shard; returns the input dir."""
    src = root / "in"
    src.mkdir()
    _write_input_shards(src)
    (src / "manifest.json").unlink()  # read every *.tar of the directory, the hand-made ones too
    png = noise_png(50)
    _raw_tar(src / "bad-000000.tar", [
        ("badjson.json", b'{"task": "caption", "caption": '), ("badjson.img0.png", png),
        ("nojson.img0.png", noise_png(51)),
        ("../evil.json", _meta_bytes("A grey cat sleeps on a wooden chair.")), ("../evil.img0.png", noise_png(52)),
        ("surrogate.json", _meta_bytes("A lone \\ud800 surrogate").replace(b"\\\\ud800", b"\\ud800")),
        ("surrogate.img0.png", noise_png(53)),
        ("fine.json", _meta_bytes("A yellow kite flies over the beach.")), ("fine.img0.png", noise_png(54)),
    ])
    full = root / "cut.tar"
    _raw_tar(full, [("cut1.json", _meta_bytes("Two horses stand in a snowy meadow.")), ("cut1.img0.png", noise_png(55)),
                    ("cut2.json", _meta_bytes("An old red tractor parked in a barn.")), ("cut2.img0.png", noise_png(56))])
    data = full.read_bytes()
    (src / "cut-000000.tar").write_bytes(data[:int(len(data) * 0.7)])  # inside cut2's image
    return src


def test_clean_skips_and_counts_malformed_samples(tmp_path, capsys):
    from data.clean import main
    from data.shards import read_manifest

    src, out = _malformed_inputs(tmp_path), tmp_path / "out"
    assert b"\\ud800" in (src / "bad-000000.tar").read_bytes()  # the escape itself is in the JSON
    main([str(src), "--out", str(out), "--set", "min_text_len=8"])  # used to raise on the first bad sample
    rep = json.loads((out / "cleaning_report.json").read_text())
    # the cut lands inside cut2's image: that member is unreadable, and the archive itself is truncated
    assert rep["skipped"] == {"bad_json": 1, "missing_json": 1, "bad_member_name": 1, "invalid_unicode": 1,
                              "unreadable_member": 1, "truncated_tar": 1}, rep["skipped"]
    assert rep["skipped_total"] == 6
    assert any("cut-000000.tar" in e for e in rep["skip_examples"]["truncated_tar"])
    assert any("badjson.json" in e for e in rep["skip_examples"]["bad_json"])
    # the readable samples all went through the rules: 8 good-set rows + fine + cut1 (cut2 lost its image)
    assert rep["input"] == 10 == rep["kept"] + rep["removed_total"]
    man = read_manifest(out)
    kept = set()
    for s in man["shards"]:
        for key, _, _ in iter_shard_keys(out / s["name"]):
            kept.add(key)
    assert kept == {"good-en", "good-zh", "html", "fine", "cut1"} and man["totals"]["n_samples"] == rep["kept"]
    assert "skipped (unreadable) 6" in capsys.readouterr().out


def iter_shard_keys(path):
    from data.shards import iter_shard

    return iter_shard(str(path))


def test_writer_refusal_is_counted_not_fatal(tmp_path):
    from data.clean import clean_shards

    src = tmp_path / "in"
    src.mkdir()
    vqa = json.dumps({"task": "vqa", "images": ["img0.png"], "question": "What?", "lang": "en", "source": "t"})
    _raw_tar(src / "x-000000.tar", [
        ("vqa.json", vqa.encode()), ("vqa.img0.png", noise_png(60)),  # passthrough task, no 'answers'
        ("dir/nested.json", _meta_bytes("A blue boat on a calm lake.")), ("dir/nested.img0.png", noise_png(61)),
        ("ok.json", _meta_bytes("A small bird sits on a branch.")), ("ok.img0.png", noise_png(62)),
    ])
    rep = clean_shards([str(src)], str(tmp_path / "out"))
    assert rep["removed"]["invalid_sample"] == 2 and rep["kept"] == 1 == rep["input"] - rep["removed_total"]
    assert set(rep["examples"]["invalid_sample"]) == {"vqa", "dir/nested"}


@pytest.mark.parametrize("previous", [False, True])
def test_failed_run_leaves_no_output(tmp_path, monkeypatch, previous):
    from data.clean import clean_shards

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _write_input_shards(src, max_samples=2)
    if previous:  # an earlier complete output must survive a failed rerun byte for byte
        clean_shards([str(src)], str(out), max_samples=1)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = Cleaner._check_sample

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected rule failure")
        return real(self, *a, **kw)

    monkeypatch.setattr(Cleaner, "_check_sample", flaky)
    with pytest.raises(RuntimeError, match="injected rule failure"):
        clean_shards([str(src)], str(out), max_samples=1, batch_size=1)  # shards were already finished
    assert calls["n"] == 5
    if previous:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in", "out"] if previous else ["in"])  # no temp dir


def test_rerun_replaces_output_and_refuses_foreign_dirs(tmp_path):
    from data.clean import clean_shards

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _write_input_shards(src)
    clean_shards([str(src)], str(out), max_samples=1)
    assert len(list(out.glob("*.tar"))) == 3
    clean_shards([str(src)], str(out), max_samples=10)  # a rerun replaces the whole previous output
    assert sorted(p.name for p in out.iterdir()) == ["clean-000000.tar", "cleaning_report.json", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary leftovers
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        clean_shards([str(src)], str(out))
    with pytest.raises(ValueError, match="holds input shard"):
        clean_shards([str(src)], str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert clean_shards([str(src)], str(empty))["kept"] == 3 and (empty / "manifest.json").exists()
