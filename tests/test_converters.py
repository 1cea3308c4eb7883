"""Round trip through every converter: real photos (skimage.data) on disk -> shards -> iter_shard."""

import csv
import io
import json

import pytest
from PIL import Image

from data.converters import (
    ConvertError,
    convert_caption_csv,
    convert_caption_folder,
    convert_caption_jsonl,
    convert_coco_captions,
    convert_ocr,
    convert_qwen_chat,
    convert_referring,
    convert_text,
    convert_vqa,
    detect_lang,
)
from data.shards import ShardWriter, iter_shard, read_manifest


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """astronaut 512x512 (jpg), coffee 600x400 (jpg), chelsea 451x300 (png), plus corrupt files."""
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    for name, fmt in (("astronaut", "JPEG"), ("coffee", "JPEG"), ("chelsea", "PNG")):
        ext = "jpg" if fmt == "JPEG" else "png"
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.{ext}", fmt, quality=85)
    good = (d / "astronaut.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])  # header fine, data cut: decode fails
    (d / "garbage.jpg").write_bytes(b"this is not an image at all")
    return d


def read_all(out):
    man = read_manifest(out)
    got = {}
    for s in man["shards"]:
        for key, meta, files in iter_shard(out / s["name"]):
            got[key] = (meta, files)
    assert len(got) == man["totals"]["n_samples"]
    return got


def check_images(meta, files, photos, names):
    """Embedded bytes equal the source files, decode, and sizes match."""
    assert meta["images"] == [f"img{i}.{n.rsplit('.', 1)[1]}" for i, n in enumerate(names)]
    for member, name, size in zip(meta["images"], names, meta["sizes"]):
        assert files[member] == (photos / name).read_bytes()
        im = Image.open(io.BytesIO(files[member]))
        im.load()
        assert list(im.size) == size


def test_detect_lang():
    assert detect_lang("A dog runs on the grass.") == "en"
    assert detect_lang("一只狗在草地上奔跑。") == "zh"
    assert detect_lang("我爱Python编程") == "zh"  # 4 ideographs / (4 + 6 letters) = 0.4
    assert detect_lang("A photo of the Forbidden City in 北京 at night") == "en"  # 2 / (2 + 32) < 0.2
    assert detect_lang("12345 !!!") == "en"


def test_caption_folder(photos, tmp_path):
    src = tmp_path / "pairs"
    (src / "sub").mkdir(parents=True)
    for name, cap in (("astronaut.jpg", "An astronaut in a white suit."), ("sub/chelsea.png", "一只猫躺着。")):
        (src / name).write_bytes((photos / name.split("/")[-1]).read_bytes())
        (src / name).with_suffix(".txt").write_text(cap + "\n", encoding="utf-8")
    (src / "coffee.jpg").write_bytes((photos / "coffee.jpg").read_bytes())  # no caption
    (src / "astronaut.png").write_bytes((photos / "chelsea.png").read_bytes())  # second image, same stem
    (src / "orphan.txt").write_text("caption without image")
    (src / "truncated.jpg").write_bytes((photos / "truncated.jpg").read_bytes())
    (src / "truncated.txt").write_text("a broken picture")
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        rep = convert_caption_folder(src, w, source="mypairs")
    assert rep.written == 2
    assert dict(rep.skipped) == {"missing_caption": 1, "missing_image": 1, "corrupt_image": 1, "duplicate_stem": 1}
    assert "astronaut.png" in rep.examples["duplicate_stem"][0]
    assert "coffee.jpg" in rep.examples["missing_caption"][0]
    got = read_all(out)
    by_cap = {m["caption"]: (m, f) for m, f in got.values()}
    m, f = by_cap["An astronaut in a white suit."]
    assert m["task"] == "caption" and m["lang"] == "en" and m["source"] == "mypairs" and m["sizes"] == [[512, 512]]
    check_images(m, f, photos, ["astronaut.jpg"])
    m, f = by_cap["一只猫躺着。"]
    assert m["lang"] == "zh" and m["sizes"] == [[451, 300]]
    check_images(m, f, photos, ["chelsea.png"])
    assert not list(out.glob("*.tmp"))


def test_caption_jsonl_and_strict(photos, tmp_path):
    src = tmp_path / "caps.jsonl"
    rows = [json.dumps({"image": "astronaut.jpg", "caption": "An astronaut.", "lang": "en"}),
            json.dumps({"image": "coffee.jpg", "caption": "一杯咖啡", "lang": "zh-CN"}),
            "{broken json",
            json.dumps({"image": "missing.jpg", "caption": "gone"}),
            json.dumps({"image": "garbage.jpg", "caption": "bad bytes"}),
            json.dumps({"image": "coffee.jpg", "caption": "   "}),
            json.dumps({"image": "coffee.jpg", "caption": "Coffee.", "lang": "fr"})]
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        rep = convert_caption_jsonl(src, w, image_root=str(photos), source="caps")
    assert rep.written == 2
    assert dict(rep.skipped) == {"bad_record": 1, "missing_image": 1, "corrupt_image": 1, "empty_text": 1,
                                 "bad_lang": 1}
    assert rep.examples["missing_image"][0].startswith(f"{src}:4:")
    got = read_all(out)
    assert sorted(k for k in got) == ["caps-000000000", "caps-000000001"]  # keys follow input line order
    m, f = got["caps-000000001"]
    assert m["caption"] == "一杯咖啡" and m["lang"] == "zh" and m["origin"] == f"{src}:2"
    check_images(m, f, photos, ["coffee.jpg"])
    # strict: the first bad record is an error naming file and line
    with ShardWriter(tmp_path / "strict") as w, pytest.raises(ConvertError, match=r"caps\.jsonl:3: bad_record"):
        convert_caption_jsonl(src, w, image_root=str(photos), strict=True)


def test_caption_csv(photos, tmp_path):
    src = tmp_path / "caps.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["file", "text"])
        wr.writerow([str(photos / "chelsea.png"), "A cat, lying down."])  # absolute path
        wr.writerow(["nope.jpg", "missing"])
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        rep = convert_caption_csv(src, w, image_col="file", caption_col="text", lang="en")
    assert rep.written == 1 and dict(rep.skipped) == {"missing_image": 1}
    assert rep.examples["missing_image"][0].startswith(f"{src}:3:")
    (m, f), = read_all(out).values()
    assert m["caption"] == "A cat, lying down."
    check_images(m, f, photos, ["chelsea.png"])
    with ShardWriter(tmp_path / "o2") as w, pytest.raises(ConvertError, match="lacks column"):
        convert_caption_csv(src, w)


def test_coco_captions(photos, tmp_path):
    coco = {"images": [{"id": 1, "file_name": "astronaut.jpg"}, {"id": 2, "file_name": "coffee.jpg"}],
            "annotations": [{"image_id": 1, "caption": "An astronaut poses."},
                            {"image_id": 2, "caption": "A cup of coffee."},
                            {"image_id": 1, "caption": "A woman in a space suit."},
                            {"image_id": 99, "caption": "unknown image"}]}
    src = tmp_path / "captions.json"
    src.write_text(json.dumps(coco))
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        rep = convert_coco_captions(src, photos, w)
    assert rep.written == 3 and dict(rep.skipped) == {"bad_record": 1}
    got = read_all(out)
    caps = {m["caption"]: (m, f) for m, f in got.values()}
    assert set(caps) == {"An astronaut poses.", "A cup of coffee.", "A woman in a space suit."}
    check_images(*caps["A woman in a space suit."], photos, ["astronaut.jpg"])
    out2 = tmp_path / "per_image"
    with ShardWriter(out2) as w:
        rep = convert_coco_captions(src, photos, w, per_image=True)
    assert rep.written == 2 and dict(rep.skipped) == {"bad_record": 1}
    metas = sorted((m for m, _ in read_all(out2).values()), key=lambda m: m["caption"])
    assert metas[1]["captions"] == ["An astronaut poses.", "A woman in a space suit."]


def test_referring_all_variants(photos, tmp_path):
    recs = [{"image": "astronaut.jpg", "sentences": ["the woman", {"sent": "person in white"}],
             "bbox": [100, 50, 200, 300]},                                   # xywh
            {"image": "astronaut.jpg", "sentence": "off the image", "bbox": [600, 10, 50, 50]},  # outside
            {"image": "astronaut.jpg", "sentence": "no area", "bbox": [10, 10, 0, 40]},
            {"image": "missing.jpg", "sentence": "x", "bbox": [1, 1, 5, 5]},
            {"image": "coffee.jpg", "sentence": "杯子", "bbox": [-10, 100, 710, 200], "width": 600, "height": 400}]
    src = tmp_path / "refs.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs))
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        rep = convert_referring(src, photos, w, tasks=("ref_grounding", "region_caption", "grounded_caption"))
    assert rep.written == 9  # (2 + 1 sentences) x 3 tasks
    assert dict(rep.skipped) == {"invalid_box": 2, "missing_image": 1}
    got = read_all(out)
    # xywh [100,50,200,300] -> xyxy (100,50,300,350) in 512x512:
    # 100*999/512 = 195.1 -> 195; 50 -> 97.6 -> 98; 300 -> 585.4 -> 585; 350 -> 682.9 -> 683
    box = [195, 98, 585, 683]
    ref = [m for m, _ in got.values() if m["task"] == "ref_grounding" and m["lang"] == "en"]
    assert sorted(m["expression"] for m in ref) == ["person in white", "the woman"]
    assert all(m["box"] == box for m in ref)
    reg = [m for m, _ in got.values() if m["task"] == "region_caption" and m["description"] == "the woman"]
    assert reg[0]["box"] == box
    gc = [m for m, _ in got.values() if m["task"] == "grounded_caption" and m["lang"] == "en"]
    assert "<ref>the woman</ref><box>(195,98),(585,683)</box>" in [m["caption"] for m in gc]
    # coffee 600x400, xywh -> (-10,100,700,300): x -10 clamps to 0; 700 clamps to 999; 100*999/400 = 249.75 -> 250; 300 -> 749.25 -> 749
    zh = [m for m, _ in got.values() if m["task"] == "ref_grounding" and m["lang"] == "zh"]
    assert zh[0]["expression"] == "杯子" and zh[0]["box"] == [0, 250, 999, 749]
    m, f = next(iter(got.values()))
    check_images(m, f, photos, ["astronaut.jpg"])
    # xyxy format: the same box given as corners
    src2 = tmp_path / "refs.json"
    src2.write_text(json.dumps([{"image": "astronaut.jpg", "sentence": "the woman", "bbox": [100, 50, 300, 350]}]))
    with ShardWriter(tmp_path / "o2") as w:
        convert_referring(src2, photos, w, box_format="xyxy")
    (m, _), = read_all(tmp_path / "o2").values()
    assert m["box"] == box and m["task"] == "ref_grounding"


def test_vqa(photos, tmp_path):
    recs = [{"image": "coffee.jpg", "question": "What is in the cup?", "answer": "coffee",
             "answers": [{"answer": "latte"}, {"answer": "coffee"}, "coffee"]},
            {"image": "chelsea.png", "question": "这是什么动物？", "answers": ["猫"]},
            {"image": "chelsea.png", "question": "No answer?"}]
    src = tmp_path / "vqa.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs))
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        rep = convert_vqa(src, photos, w)
    assert rep.written == 2 and dict(rep.skipped) == {"bad_record": 1}
    got = {m["question"]: (m, f) for m, f in read_all(out).values()}
    m, f = got["What is in the cup?"]
    # the training answer moves to the front; the annotator answers stay the same multiset
    assert m["answers"] == ["coffee", "latte", "coffee"] and m["lang"] == "en"
    check_images(m, f, photos, ["coffee.jpg"])
    assert got["这是什么动物？"][0]["lang"] == "zh" and got["这是什么动物？"][0]["answers"] == ["猫"]


def test_ocr(photos, tmp_path):
    recs = [{"image": "coffee.jpg", "lines": [
                {"text": "COFFEE", "box": [60, 40, 300, 120]},
                {"text": "咖啡", "quad": [[30, 200], [90, 200], [90, 260], [30, 260]]}]},
            {"image": "coffee.jpg", "lines": [{"text": "ok", "box": [0, 0, 10, 10]},
                                              {"text": "flat", "box": [5, 5, 5, 50]}]},
            {"image": "coffee.jpg", "lines": [{"text": "no geometry"}]}]
    src = tmp_path / "ocr.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs))
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        rep = convert_ocr(src, photos, w)
    assert rep.written == 1 and dict(rep.skipped) == {"invalid_box": 1, "bad_record": 1}
    (m, f), = read_all(out).values()
    # 600x400: box (60,40,300,120) -> 60*999/600 = 99.9 -> 100, 40*999/400 = 99.9 -> 100, 300 -> 499.5 -> 500,
    # 120 -> 299.7 -> 300; quad x 30 -> 49.95 -> 50, 90 -> 149.85 -> 150; y 200 -> 499.5 -> 500, 260 -> 649.35 -> 649
    assert m["lines"] == [{"text": "COFFEE", "quad": [100, 100, 500, 100, 500, 300, 100, 300]},
                          {"text": "咖啡", "quad": [50, 500, 150, 500, 150, 649, 50, 649]}]
    assert m["task"] == "ocr"
    check_images(m, f, photos, ["coffee.jpg"])


def test_text(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("First paragraph\ncontinues here.\n\n\n第二段是中文。\n\nThird.\n", encoding="utf-8")
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"text": "Hello world."}) + "\n" + json.dumps({"text": ""}) + "\n")
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        r1 = convert_text(txt, w, source="book")
        r2 = convert_text(jl, w, source="jl")
    assert r1.written == 3 and r1.n_skipped == 0
    assert r2.written == 1 and dict(r2.skipped) == {"empty_text": 1}
    got = read_all(out)
    assert got["book-000000000"][0]["text"] == "First paragraph\ncontinues here."
    assert got["book-000000001"][0]["lang"] == "zh" and got["book-000000001"][0]["origin"] == f"{txt}:5"
    assert got["jl-000000000"][0] == {"task": "text", "lang": "en", "text": "Hello world.", "source": "jl",
                                      "origin": f"{jl}:1", "images": []}
    assert read_manifest(out)["totals"]["tasks"] == {"text": 4}


def test_qwen_chat(photos, tmp_path):
    data = [
        {"id": "identity_0", "conversations": [
            {"from": "user", "value": "Picture 1: <img>astronaut.jpg</img>\nPicture 2: <img>" + str(photos / "chelsea.png")
             + "</img>\nWhat differs?"},
            {"from": "assistant", "value": "One is a person, one is a cat."},
            {"from": "user", "value": "Look again: <img>astronaut.jpg</img>"},
            {"from": "assistant", "value": "<ref>The astronaut</ref><box>(195,98),(585,683)</box>"}]},
        {"id": "identity_1", "conversations": [
            {"from": "user", "value": "Picture 1: <img>missing.jpg</img>\nhi"}, {"from": "assistant", "value": "x"}]},
        {"id": "identity_2", "conversations": [
            {"from": "human", "value": "Picture 1: <img>truncated.jpg</img>\nhi"}, {"from": "gpt", "value": "x"}]},
        {"id": "identity_3", "conversations": [
            {"from": "user", "value": "你好"}, {"from": "assistant", "value": "你好！有什么可以帮你？"}]},
        {"id": "identity_4", "conversations": [{"from": "system", "value": "x"}]},
    ]
    src = photos / "train.json"  # relative <img> paths resolve against the file's directory by default
    src.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    with ShardWriter(out) as w:
        rep = convert_qwen_chat(src, None, w, source="sft")
    assert rep.written == 2
    assert dict(rep.skipped) == {"missing_image": 1, "corrupt_image": 1, "bad_record": 1}
    assert rep.examples["missing_image"][0].startswith(f"{src}[1]:")
    got = read_all(out)
    m, f = got["sft-000000000"]
    assert m["task"] == "chat" and m["id"] == "identity_0" and m["lang"] == "en"
    conv = m["conversations"]
    assert conv[0] == {"from": "user", "value": "Picture 1: <img>img0.jpg</img>\nPicture 2: <img>img1.png</img>\n"
                                               "What differs?"}
    assert conv[2]["value"] == "Look again: <img>img0.jpg</img>"  # same path -> same member
    assert conv[3]["value"] == data[0]["conversations"][3]["value"]
    check_images(m, f, photos, ["astronaut.jpg", "chelsea.png"])
    m3, f3 = got["sft-000000003"]
    assert m3["lang"] == "zh" and m3["images"] == [] and f3 == {}
    with ShardWriter(tmp_path / "strict") as w, pytest.raises(ConvertError, match=r"train\.json\[1\]: missing_image"):
        convert_qwen_chat(src, photos, w, strict=True)


def test_cli_pairs_and_refcoco(photos, tmp_path):
    from data.convert import main

    src = tmp_path / "caps.jsonl"
    src.write_text(json.dumps({"image": "astronaut.jpg", "caption": "An astronaut."}) + "\n"
                   + json.dumps({"image": "nope.jpg", "caption": "missing"}) + "\n")
    out = tmp_path / "out"
    assert main(["pairs", str(src), "--out", str(out), "--image-root", str(photos), "--prefix", "p"]) == 0
    rep = json.loads((out / "convert_report.json").read_text())
    assert rep["written"] == 1 and rep["skipped"] == {"missing_image": 1} and rep["manifest"]["n_samples"] == 1
    assert [p.name for p in sorted(out.glob("*.tar"))] == ["p-000000.tar"]
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"image": "astronaut.jpg", "sentence": "the woman", "bbox": [100, 50, 300, 350]}))
    out2 = tmp_path / "out2"
    assert main(["refcoco", str(refs), "--out", str(out2), "--image-root", str(photos), "--box-format", "xyxy",
                 "--tasks", "ref_grounding", "region_caption"]) == 0
    assert read_manifest(out2)["totals"]["tasks"] == {"ref_grounding": 1, "region_caption": 1}
    # strict mode failure -> non-zero exit, message names the line
    assert main(["pairs", str(src), "--out", str(tmp_path / "o3"), "--image-root", str(photos), "--strict"]) == 2


def test_load_image_formats(photos, tmp_path):
    import numpy as np

    from data.converters import decode_image_bytes, load_image

    jpg = load_image(photos / "coffee.jpg")
    assert (jpg.ext, jpg.size) == ("jpg", (600, 400)) and jpg.data == (photos / "coffee.jpg").read_bytes()
    # formats outside jpg/png/webp are re-encoded losslessly to PNG
    arr = np.asarray(Image.open(photos / "chelsea.png"))
    Image.fromarray(arr).save(tmp_path / "cat.bmp")
    bmp = load_image(tmp_path / "cat.bmp")
    assert bmp.ext == "png" and bmp.size == (451, 300)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(bmp.data))), arr)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.jpg")
    for bad in ("truncated.jpg", "garbage.jpg"):
        with pytest.raises(ValueError, match=bad):
            load_image(photos / bad)
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "x.png")
