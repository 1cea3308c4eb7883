"""Evaluation metrics against hand-computed values; task prompts / predictions / baselines on known samples."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from data.loader import RawSample
from train.evaluation import metrics as M
from train.evaluation.tasks import baseline_predictions, make_item, prediction, task_metrics

# ------------------------------------------------------------------------------------------------ IoU


@pytest.mark.parametrize("a,b,want", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),  # disjoint
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges: zero-area intersection
    ((0, 0, 10, 10), (0, 0, 5, 5), 0.25),  # contained: 25 / 100
    ((0, 0, 2, 1), (1, 0, 3, 1), 1 / 3),  # half overlap: 1 / (2 + 2 - 1)
    ((5, 5, 5, 5), (5, 5, 5, 5), 0.0),  # degenerate: empty union
    ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175),
])
def test_iou_edge_cases(a, b, want):
    assert M.iou(a, b) == pytest.approx(want)
    assert M.iou(b, a) == pytest.approx(want)


def test_grounding_accuracy_threshold_is_inclusive_and_none_misses():
    gts = [(0, 0, 2, 1), (0, 0, 10, 10), (0, 0, 10, 10)]
    preds = [(0, 0, 1, 1), (0, 0, 5, 5), None]  # IoU exactly 0.5 (hit), 0.25 (miss), no box (miss)
    assert M.grounding_hits(preds, gts) == [True, False, False]
    assert M.grounding_accuracy(preds, gts) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 predictions for 3"):
        M.grounding_accuracy(preds[:2], gts)


# ------------------------------------------------------------------------------------------------ VQA


def test_vqa_score_ten_answers_leave_one_out():
    answers = ["2", "2", "two", "two", "two", "3", "3", "3", "3", "3"]
    # "Two." -> "2". Leaving out one of the two "2"s leaves 1 match (1/3); leaving out any of the other 8 leaves
    # 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6. The ground truths are not number-mapped (official).
    assert M.vqa_score("Two.", answers) == pytest.approx(0.6)
    # "3": 5 answers; leaving out a "3" leaves 4 (>= 3: 1), leaving out another leaves 5 (1): 1.0
    assert M.vqa_score("3", answers) == pytest.approx(1.0)
    # "two" normalises to "2": same as "Two."; "yes" matches nothing
    assert M.vqa_score("two", answers) == pytest.approx(0.6)
    assert M.vqa_score("yes", answers) == 0.0
    # 3 of 10 say "red": leave out a "red" -> 2/3, leave out another -> 1: (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert M.vqa_score("Red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)


def test_vqa_normalisation_official_rules():
    assert M.vqa_normalize("  The Dog!\n") == "dog"  # articles, case, punctuation, whitespace
    assert M.vqa_normalize("dont") == "don't"  # contractions table
    assert M.vqa_normalize("1,000") == "1000"  # comma between digits is removed, not spaced
    assert M.vqa_normalize("3.5") == "3.5" and M.vqa_normalize("yes.") == "yes"  # a decimal point stays
    assert M.vqa_normalize("black/white") == "black white"
    # official quirk: identical ground truths are compared unprocessed, so "two" (-> "2") does not match them
    assert M.vqa_score("two", ["two"] * 10) == 0.0
    assert M.vqa_score("2", ["2"] * 10) == 1.0
    assert M.vqa_score("A cat.", ["cat"]) == 1.0  # one answer: normalised exact match


def test_exact_match_gqa_style():
    assert M.exact_match("Yes.", ["yes"]) == 1.0
    assert M.exact_match("the red one", ["red"]) == 0.0
    assert M.exact_match("Three", ["3", "4"]) == 1.0


# -------------------------------------------------------------------------------------------- captions


def test_cider_hand_computed():
    # Two images, references share no n-gram across images, so every n-gram has document frequency 1 and weight
    # log(2) (CIDEr-D: tf x (log N - log df)). B: candidate == reference -> cosine 1 for n=1..4, score 10.
    # A: candidate "a b c d e" vs "a b c d": n-gram counts 5/4, 4/3, 3/2, 2/1 with all reference n-grams shared:
    # cosines 4/(sqrt5*2), 3/(2*sqrt3), 2/(sqrt3*sqrt2), 1/(sqrt2*1); length penalty exp(-1/(2*6^2)).
    cos = [4 / (math.sqrt(5) * 2), 3 / (2 * math.sqrt(3)), 2 / (math.sqrt(3) * math.sqrt(2)), 1 / math.sqrt(2)]
    a = sum(cos) / 4 * math.exp(-1 / 72) * 10
    got = M.cider({"A": "a b c d e", "B": "w x y z"}, {"A": ["a b c d"], "B": ["w x y z"]})
    assert got == pytest.approx((a + 10) / 2, rel=1e-9)
    assert M.cider({"A": "q r s t", "B": "w x y z"}, {"A": ["a b c d"], "B": ["w x y z"]}) == pytest.approx(5.0)


def test_bleu4_hand_computed():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2, no brevity penalty: (4/5 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.2 ** 0.25
    assert M.bleu4({"A": "a b c d e"}, {"A": ["a b c d f"]}) == pytest.approx(0.2 ** 0.25, rel=1e-6)


def test_caption_scores_with_ptb_tokenizer():
    if not M.java_available():
        pytest.skip("Java is not installed: pycocoevalcap's PTB tokenizer cannot run (install a JRE)")
    # PTB lower-cases and drops punctuation: the same hand case as test_cider_hand_computed
    s = M.caption_scores({"A": "A b, c d e.", "B": "W x y z!"}, {"A": ["a b c d"], "B": ["w x y z"]})
    cos = [4 / (math.sqrt(5) * 2), 3 / (2 * math.sqrt(3)), 2 / (math.sqrt(3) * math.sqrt(2)), 1 / math.sqrt(2)]
    assert s["CIDEr"] == pytest.approx((sum(cos) / 4 * math.exp(-1 / 72) * 10 + 10) / 2, rel=1e-9)
    assert 0 < s["BLEU-4"] < 1
    zh = M.caption_scores({"A": "一只猫", "B": "w x y z"}, {"A": ["一只猫"], "B": ["w x y z"]})
    # characters are tokens: 3 unigrams, 2 bigrams, 1 trigram all match (cosine 1), no 4-gram (0):
    # A scores 10 * 3/4, B 10
    assert zh["CIDEr"] == pytest.approx((7.5 + 10) / 2)
    assert M.split_cjk("一只cat在睡觉。") == "一 只 cat 在 睡 觉 。"


# pycocoevalcap's own example (example/coco_eval_example.py, the cocoEvalCapDemo notebook of tylin/coco-caption):
# COCO(annotations) -> coco.loadRes(results) -> COCOEvalCap(coco, res).evaluate(). Image 1 is the notebook's shown
# case (its 5 ground-truth captions and the fake generated caption); the other two are ours, so that n-grams have
# document frequencies below the image count (CIDEr-D's idf is 0 on a single image).
COCO_EXAMPLE = {
    1: (["A train traveling down tracks next to lights.", "A blue and silver train next to train station and trees.",
         "A blue train is next to a sidewalk on the rails.", "A passenger train pulls into a train station.",
         "A train coming down the tracks arriving at a station."],
        "train traveling down a track in front of a road"),
    2: (["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
         "A person on a surfboard riding a wave."], "a man riding a wave on a surfboard"),
    3: (["Two cats sleeping on a red couch.", "A pair of cats curled up on a sofa.", "Cats asleep on the couch."],
        "a cat sitting on a red chair"),
}


def test_caption_scores_equal_pycocoevalcap_example_pipeline(tmp_path, monkeypatch, capsys):
    if not M.java_available():
        pytest.skip("Java is not installed: pycocoevalcap's PTB tokenizer cannot run (install a JRE)")
    import json

    import pycocoevalcap.eval as coco_eval_mod
    from pycocotools.coco import COCO

    class Skipped:  # METEOR (a 2 GB Java process) and SPICE (downloads Stanford CoreNLP) are not compared here
        def method(self) -> str:
            return "skipped"

        def compute_score(self, gts, res):  # noqa: ANN001, ANN201
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval_mod, "Meteor", Skipped)
    monkeypatch.setattr(coco_eval_mod, "Spice", Skipped)
    ann = {"images": [{"id": i} for i in COCO_EXAMPLE],
           "annotations": [{"id": 10 * i + j, "image_id": i, "caption": c}
                           for i, (refs, _) in COCO_EXAMPLE.items() for j, c in enumerate(refs)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": g} for i, (_, g) in COCO_EXAMPLE.items()]))
    coco = COCO(str(tmp_path / "ann.json"))
    res = coco.loadRes(str(tmp_path / "res.json"))
    ev = coco_eval_mod.COCOEvalCap(coco, res)
    ev.params["image_id"] = res.getImgIds()
    ev.evaluate()
    ours = M.caption_scores({str(i): g for i, (_, g) in COCO_EXAMPLE.items()},
                            {str(i): refs for i, (refs, _) in COCO_EXAMPLE.items()})
    assert 0.1 < ev.eval["CIDEr"] < 10 and 0 < ev.eval["Bleu_4"] < 1  # a real, non-degenerate score
    assert ours["CIDEr"] == pytest.approx(ev.eval["CIDEr"], rel=1e-12)
    assert ours["BLEU-4"] == pytest.approx(ev.eval["Bleu_4"], rel=1e-12)


# ------------------------------------------------------------------------------------------------ OCR


def test_edit_distance_and_ocr_scores():
    assert M.edit_distance("kitten", "sitting") == 3
    assert M.edit_distance("", "abc") == 3 and M.edit_distance("abc", "abc") == 0
    assert M.edit_accuracy("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert M.edit_accuracy("", "") == 1.0
    s = M.ocr_scores(["hello world", "kitten", "中文"], ["hello world", "sitting", "中国"])
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["edit_accuracy"] == pytest.approx((1 + (1 - 3 / 7) + 0.5) / 3)


# ------------------------------------------------------------------------------------- task protocols


def _raw(meta: dict, size=(200, 100)) -> RawSample:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
    return RawSample("k1", {"lang": "en", "images": ["img0.png"], "source": "t", **meta}, {"img0.png": buf.getvalue()},
                     "src", "mem://shard.tar", 0)


def test_ref_grounding_protocol():
    raw = _raw({"task": "ref_grounding", "expression": "the red circle", "box": [0, 0, 499, 999]})
    it = make_item(raw, "ref_grounding")
    assert it.prompt == "<img>img0.png</img><ref>the red circle</ref><box>"
    assert it.reference == pytest.approx((0, 0, 499 / 999 * 200, 100))
    # the reply continues after "<box>": the first (x1,y1),(x2,y2) anywhere is the prediction, /999 to pixels
    p = prediction(it, "(0,0),(499,999)</box> and (1,1),(2,2)")
    assert p == pytest.approx(it.reference)
    assert prediction(it, "no box here") is None
    m = task_metrics("ref_grounding", [it, it], [p, None])
    assert m["acc@0.5"] == 0.5 and m["n"] == 2


def test_vqa_caption_ocr_prompts():
    v = make_item(_raw({"task": "vqa", "question": "What color?", "answers": ["red"]}), "vqa")
    assert v.prompt == "<img>img0.png</img>What color? Answer:" and v.reference == ["red"]
    c = make_item(_raw({"task": "caption", "caption": "A cat."}), "caption")
    assert c.prompt == "<img>img0.png</img>Describe the image in English:"
    assert make_item(_raw({"task": "caption", "caption": "A cat."}), "caption", "train").prompt.endswith(
        "Generate the caption in English:")
    o = make_item(_raw({"task": "ocr", "lines": [{"text": "Hello", "quad": [0] * 8},
                                                  {"text": "World", "quad": [0] * 8}]}), "ocr")
    assert o.prompt == "<img>img0.png</img>OCR with grounding:" and o.reference == "Hello\nWorld"
    reply = "<ref>Hello</ref><quad>(1,1),(5,1),(5,5),(1,5)</quad><ref>Wor1d</ref><quad>(1,1),(5,1),(5,5),(1,5)</quad>"
    assert prediction(o, reply) == "Hello\nWor1d"
    with pytest.raises(ValueError, match="is task 'vqa', not 'ocr'"):
        make_item(_raw({"task": "vqa", "question": "q", "answers": ["a"]}), "ocr")


def test_baselines_mean_box_and_majority_answer():
    items = [make_item(_raw({"task": "ref_grounding", "expression": "x", "box": b}), "ref_grounding")
             for b in ([0, 0, 100, 100], [200, 200, 500, 500])]
    preds = baseline_predictions("ref_grounding", items)
    assert preds[0] == pytest.approx((100 / 999 * 200, 100 / 999 * 100, 300 / 999 * 200, 300 / 999 * 100))
    vq = [make_item(_raw({"task": "vqa", "question": "q", "answers": [a]}), "vqa") for a in ("red", "blue", "red")]
    assert baseline_predictions("vqa", vq) == ["red"] * 3
    assert task_metrics("vqa", vq, baseline_predictions("vqa", vq))["exact_match"] == pytest.approx(2 / 3)


def test_example_images_show_gt_and_prediction(tmp_path):
    from train.evaluation.examples import GT_COLOR, PRED_COLOR, draw_record, save_examples
    from train.evaluation.runner import EvalResult, Record

    raw = _raw({"task": "ref_grounding", "expression": "x", "box": [0, 0, 499, 999]}, size=(300, 150))
    it = make_item(raw, "ref_grounding")
    pred = (150.0, 30.0, 270.0, 120.0)
    rec = Record(0, raw.key, it.prompt, "(500,200),(900,800)", pred, it.reference, 0.0)
    im = draw_record("ref_grounding", raw, rec)
    assert im.getpixel((0, 75)) == GT_COLOR  # left edge of the ground truth
    assert im.getpixel((270, 75)) == PRED_COLOR and im.getpixel((210, 120)) == PRED_COLOR
    assert im.getpixel((100, 75)) == (10, 20, 30)  # inside: untouched
    paths = save_examples(EvalResult({}, {"ref_grounding": [rec]}), {"ref_grounding": [raw]}, tmp_path, n=3)
    assert [p.name for p in paths] == ["ref_grounding_000.png"]
    assert Image.open(paths[0]).convert("RGB").getpixel((270, 75)) == PRED_COLOR
