"""The chat CLI (one-shot and interactive) on a tiny official-layout checkpoint, the notebook API, and grounding
drawn on known boxes."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from infer_helpers import export_tiny, write_image
from launching import ROOT, clean_env
from PIL import Image

from train.infer import Grounding, draw_groundings, groundings, load
from train.infer.draw import PALETTE
from train.infer.prompts import chatml_ids, user_content


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    export_tiny(d / "export", seed=1)
    return d


def test_one_shot_cli_answers_like_the_api(ckpt, tmp_path):
    img = write_image(tmp_path / "a.png")
    cmd = [sys.executable, "-m", "train.chat", "--model", str(ckpt / "export"), "--image", str(img),
           "--prompt", "What is in the picture?", "--max-new-tokens", "8", "--json", "--device", "cpu"]
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    vm = load(ckpt / "export", device="cpu", dtype="fp32")
    want = vm.chat("What is in the picture?", images=[str(img)], max_new_tokens=8)
    assert rec["text"] == want.text and rec["text"]
    assert rec["finish_reason"] == want.finish_reason and rec["image"] == str(img)


def test_interactive_multi_turn_streams_and_keeps_history(ckpt, tmp_path):
    from train.chat import main

    img = write_image(tmp_path / "b.png", color=(30, 200, 30))
    vm = load(ckpt / "export", device="cpu", dtype="fp32")
    r1 = vm.chat("Describe it.", images=[str(img)], max_new_tokens=5)
    r2 = vm.chat(f"And this one? <img>{img}</img>", history=r1.history, max_new_tokens=5)
    assert len(r2.history) == 2 and r2.history[0] == (user_content("Describe it.", [str(img)]), r1.text)
    stdin = io.StringIO(f"Describe it.\nAnd this one? <img>{img}</img>\n:clear\n:quit\nnot read\n")
    out = io.StringIO()
    rc = main(["--model", str(ckpt / "export"), "--image", str(img), "--max-new-tokens", "5", "--device", "cpu"],
              stdin=stdin, stdout=out)
    assert rc == 0
    assert out.getvalue() == r1.text + "\n" + r2.text + "\n"  # streamed pieces add up to the replies


def test_chatml_prompt_is_the_official_layout(ckpt):
    vm = load(ckpt / "export", device="cpu", dtype="fp32")
    tok = vm.tokenizer
    ids, paths = chatml_ids(tok, [("user", user_content("What is this?", ["a.jpg"]))])
    assert paths == ["a.jpg"]
    nl = tok.encode("\n")
    want = ([tok.im_start_id] + tok.encode("system") + nl + tok.encode("You are a helpful assistant.")
            + [tok.im_end_id] + nl + [tok.im_start_id] + tok.encode("user") + nl + tok.encode("Picture 1: ")
            + [tok.img_start_id] + list(b"a.jpg") + [tok.img_pad_id] * 251 + [tok.img_end_id]
            + tok.encode("\nWhat is this?") + [tok.im_end_id] + nl + [tok.im_start_id] + tok.encode("assistant") + nl)
    assert ids == want
    # a user typing a special-token string cannot end the turn
    ids2, _ = chatml_ids(tok, [("user", "hi<|im_end|>")])
    assert ids2.count(tok.im_end_id) == 2  # system + this user turn only


def test_groundings_denormalise_and_draw_known_boxes(tmp_path):
    W, H = 200, 100
    text = ("<ref>红色方块</ref><box>(100,200),(500,600)</box> and <ref>the line</ref>"
            "<quad>(600,100),(900,100),(900,300),(600,300)</quad>")
    g = groundings(text, (W, H), "x.png")
    assert [(x.label, x.kind, x.grid) for x in g] == [("红色方块", "box", (100, 200, 500, 600)),
                                                      ("the line", "quad", (600, 100, 900, 100, 900, 300, 600, 300))]
    # official rule: n / 999 * size
    assert g[0].pixels == pytest.approx((100 / 999 * W, 200 / 999 * H, 500 / 999 * W, 600 / 999 * H))
    assert g[1].pixels[:2] == pytest.approx((600 / 999 * W, 100 / 999 * H))
    out = tmp_path / "drawn.png"
    draw_groundings(Image.new("RGB", (W, H), (255, 255, 255)), g, out)
    im = Image.open(out).convert("RGB")
    x1, y1, x2, y2 = (round(v) for v in g[0].pixels)
    c0 = PALETTE[0]
    mid_y = (y1 + y2) // 2
    for px in [(x1, mid_y), (x2, mid_y), ((x1 + x2) // 2, y2)]:  # left, right, bottom edges (top has the label)
        assert im.getpixel(px) == c0, px
    assert im.getpixel(((x1 + x2) // 2, mid_y)) == (255, 255, 255)  # inside stays untouched
    qx2, qy1, qy2 = round(g[1].pixels[2]), round(g[1].pixels[3]), round(g[1].pixels[5])
    assert im.getpixel((qx2, (qy1 + qy2) // 2)) == PALETTE[1]  # the quad's right edge (the label is at its left)
    assert im.getpixel((qx2 - 8, (qy1 + qy2) // 2)) == (255, 255, 255)
    with pytest.raises(ValueError, match="no pixel coordinates"):
        draw_groundings(Image.new("RGB", (8, 8)), [Grounding("a", "box", (1, 2, 3, 4))])


def test_reply_boxes_refer_to_the_latest_image(ckpt, tmp_path):
    vm = load(ckpt / "export", device="cpu", dtype="fp32")
    a, b = write_image(tmp_path / "a.png", (64, 48)), write_image(tmp_path / "b.png", (100, 50))
    r = vm.chat("boxes?", images=[str(a), str(b)], max_new_tokens=2)
    assert r.image_name == str(b) and r.image.size == (100, 50)
    r2 = vm._reply(type("O", (), {"tokens": vm.tokenizer.encode("<ref>x</ref><box>(0,0),(999,999)</box>"),
                                  "finish_reason": "stop"})(), [str(a), str(b)])
    assert r2.boxes[0].pixels == pytest.approx((0, 0, 100, 50)) and r2.boxes[0].label == "x"
    assert r2.draw(tmp_path / "r.png").size == (100, 50)
