"""`python -m data.convert KIND --help` documents each input format, and every documented example converts;
--image-col / --caption-col work for JSONL and are refused where they cannot apply."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.convert import FORMATS, build_parser, main
from data.shards import iter_shard

# the fields each converter reads (from data/converters.py), which its --help must name
READS = {
    "pairs": ["image", "caption", "lang", ".txt", ".csv", "--image-col", "--caption-col"],
    "coco": ["images", "annotations", "file_name", "image_id", "caption"],
    "refcoco": ["image", "sentence", "bbox", "xywh", "width"],
    "vqa": ["image", "question", "answers", "answer"],
    "ocr": ["image", "lines", "text", "box", "quad"],
    "text": ["text", ".txt"],
    "qwen-chat": ["conversations", "from", "value", "user", "assistant", "<img>"],
}


def _help(kind: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([kind, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)).save(path)


def _report(out: Path) -> dict:
    return json.loads((out / "convert_report.json").read_text())


def test_every_kind_has_a_documented_format():
    kinds = set(build_parser()._subparsers._group_actions[0].choices)
    assert kinds == set(FORMATS) == set(READS)


@pytest.mark.parametrize("kind", sorted(READS))
def test_kind_help_names_the_input_fields_with_an_example(kind, capsys):
    text = _help(kind, capsys)
    for name in READS[kind]:
        assert name in text, f"{kind} --help does not mention {name!r}"
    for fname, content in FORMATS[kind].examples:
        assert f"example {fname}:" in text and content.splitlines()[0] in text
    assert f"python -m data.convert {kind} " in text


@pytest.mark.parametrize("kind", sorted(READS))
def test_documented_examples_convert_without_skips(kind, tmp_path):
    for fname, content in FORMATS[kind].examples:
        src = tmp_path / fname
        src.write_text(content, encoding="utf-8")
        for ref in set(re.findall(r"[\w/.-]+\.(?:jpg|png)", content)):
            _image(tmp_path / "images" / ref)
        out = tmp_path / f"out_{src.stem}_{src.suffix[1:]}"
        assert main([kind, str(src), "--out", str(out), *([] if kind == "text" else
                                                          ["--image-root", str(tmp_path / "images")])]) == 0
        rep = _report(out)
        assert rep["written"] >= 1 and rep["skipped_total"] == 0, rep


def test_jsonl_columns_are_used(tmp_path):
    _image(tmp_path / "a.jpg")
    src = tmp_path / "caps.jsonl"
    src.write_text(json.dumps({"file": "a.jpg", "alt_text": "A noisy picture.", "caption": "not this one"}) + "\n")
    out = tmp_path / "out"
    assert main(["pairs", str(src), "--out", str(out), "--image-col", "file", "--caption-col", "alt_text"]) == 0
    rep = _report(out)
    assert rep["written"] == 1 and rep["skipped_total"] == 0
    ((_, meta, files),) = [s for tar in sorted(out.glob("*.tar")) for s in iter_shard(tar)]
    assert meta["caption"] == "A noisy picture." and len(files) == 1


def test_jsonl_wrong_column_names_the_fields_the_record_has(tmp_path, capsys):
    _image(tmp_path / "a.jpg")
    src = tmp_path / "caps.jsonl"
    src.write_text(json.dumps({"file": "a.jpg", "alt_text": "A picture."}) + "\n")
    assert main(["pairs", str(src), "--out", str(tmp_path / "out")]) == 1  # nothing written
    (example,) = _report(tmp_path / "out")["examples"]["bad_record"]
    assert "missing field 'caption'" in example and "'file'" in example and "'alt_text'" in example


def test_columns_with_a_folder_input_are_refused(tmp_path, capsys):
    (tmp_path / "pics").mkdir()
    _image(tmp_path / "pics" / "a.jpg")
    (tmp_path / "pics" / "a.txt").write_text("A picture.")
    assert main(["pairs", str(tmp_path / "pics"), "--out", str(tmp_path / "out"), "--image-col", "x"]) == 2
    assert "--image-col" in capsys.readouterr().err
    assert main(["pairs", str(tmp_path / "pics"), "--out", str(tmp_path / "out2")]) == 0  # without: fine


def test_entry_point_help_exits_0():
    proc = subprocess.run([sys.executable, "-m", "data.convert", "vqa", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "question" in proc.stdout and "example vqa.jsonl:" in proc.stdout
