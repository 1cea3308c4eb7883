"""Evaluation metrics as pure functions (SPEC §6), each checked against hand-computed values in
tests/test_eval_metrics.py.

- referring grounding: Acc@IoU>=0.5 of the first predicted box (pixels, official /999 de-normalisation upstream);
- VQA: the VQAv2 score, exactly the official `vqaEval.py` (GT-Vision-Lab/VQA): the prediction is normalised
  (punctuation, number words, articles, contractions), the ground-truth answers only have punctuation processed
  and only when they are not all identical (the official quirk, kept so numbers compare with published ones);
  score = mean over the leave-one-out subsets of min(1, #matches / 3). A question with a single answer has no
  leave-one-out subset: it scores normalised exact match (documented choice; VQAv2 always has 10);
- exact match (GQA-style): normalised prediction equals a normalised answer;
- captioning: CIDEr (CIDEr-D, as pycocoevalcap's `Cider`) and BLEU-4 through pycocoevalcap, after its PTB
  tokenizer (Java). Chinese text is split into characters first (PTB would keep a sentence as one token);
- OCR: exact match and edit-distance accuracy 1 - Levenshtein(pred, gt) / max(len(pred), len(gt)).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from functools import lru_cache

from data.boxes import box_iou

# ----------------------------------------------------------------------------------------- grounding


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1,y1,x2,y2] boxes (data.boxes.box_iou); 0 for empty or degenerate unions."""
    return box_iou(a, b)


def grounding_hits(preds: Sequence[Sequence[float] | None], gts: Sequence[Sequence[float]],
                   threshold: float = 0.5) -> list[bool]:
    """Per sample: a predicted box exists and IoU(pred, gt) >= threshold."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth boxes")
    return [p is not None and iou(p, g) >= threshold for p, g in zip(preds, gts)]


def grounding_accuracy(preds: Sequence[Sequence[float] | None], gts: Sequence[Sequence[float]],
                       threshold: float = 0.5) -> float:
    hits = grounding_hits(preds, gts, threshold)
    return sum(hits) / len(hits) if hits else 0.0


# ----------------------------------------------------------------------------------------------- VQA
# vqaEval.py (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py), verbatim tables
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (a typo for a lookbehind)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def vqa_process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official call is periodStrip.sub("", outText, re.UNICODE): re.UNICODE (32) lands in `count`
    return _PERIOD_STRIP.sub("", out, count=32)


def vqa_process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(answer: str) -> str:
    """The official normalisation applied to a predicted answer."""
    return vqa_process_digit_article(vqa_process_punctuation(_clean(answer)))


def vqa_score(pred: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against its (usually 10) human answers; see the module doc."""
    if not answers:
        raise ValueError("vqa_score: no ground-truth answers")
    res = vqa_normalize(pred)
    gts = [_clean(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [vqa_process_punctuation(a) for a in gts]
    if len(gts) == 1:
        return float(res == vqa_normalize(gts[0]))
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def exact_match(pred: str, answers: Sequence[str]) -> float:
    """GQA-style: 1.0 when the normalised prediction equals a normalised ground-truth answer."""
    res = vqa_normalize(pred)
    return float(any(res == vqa_normalize(a) for a in answers))


# ------------------------------------------------------------------------------------------ captions
_CJK = re.compile(r"([\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef])")


def split_cjk(text: str) -> str:
    """Spaces around every CJK character / fullwidth punctuation, so word-level metrics count characters."""
    return re.sub(r"\s+", " ", _CJK.sub(r" \1 ", text)).strip()


@lru_cache(maxsize=1)
def java_available() -> bool:
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class CaptionMetricsUnavailable(RuntimeError):
    """pycocoevalcap or Java (its PTB tokenizer) is missing."""


def ptb_tokenize(texts: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTB tokenizer (Java): lower-cased, punctuation removed; CJK split into characters first."""
    if not java_available():
        raise CaptionMetricsUnavailable("captioning metrics need Java for pycocoevalcap's PTB tokenizer: "
                                        "install a JRE (Debian: apt-get install openjdk-17-jre-headless)")
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise CaptionMetricsUnavailable("captioning metrics need pycocoevalcap: pip install pycocoevalcap") from None
    data = {k: [{"caption": split_cjk(c)} for c in v] for k, v in texts.items()}
    return PTBTokenizer().tokenize(data)


def cider(preds: Mapping[str, str], refs: Mapping[str, Sequence[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap `Cider`, x10 scale as reported) on already tokenised, space-separated text."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _check_caption_inputs(preds, refs)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def bleu4(preds: Mapping[str, str], refs: Mapping[str, Sequence[str]]) -> float:
    """Corpus BLEU-4 (pycocoevalcap `Bleu(4)`, closest reference length) on tokenised text."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = _check_caption_inputs(preds, refs)
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])


def _check_caption_inputs(preds: Mapping[str, str], refs: Mapping[str, Sequence[str]]) -> tuple[dict, dict]:
    if set(preds) != set(refs):
        raise ValueError(f"caption ids differ: {len(set(preds) ^ set(refs))} ids are in only one of preds/refs")
    if not preds:
        raise ValueError("no captions to score")
    for k, v in refs.items():
        if not v:
            raise ValueError(f"caption {k!r}: no reference")
    return {k: list(refs[k]) for k in preds}, {k: [preds[k]] for k in preds}


def caption_scores(preds: Mapping[str, str], refs: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{"CIDEr", "BLEU-4"} with the official tokenisation. Raises CaptionMetricsUnavailable without Java."""
    keys = list(preds)
    tok = ptb_tokenize({**{f"p/{k}": [preds[k]] for k in keys}, **{f"r/{k}": list(refs[k]) for k in keys}})
    p = {k: tok[f"p/{k}"][0] for k in keys}
    r = {k: tok[f"r/{k}"] for k in keys}
    return {"CIDEr": cider(p, r), "BLEU-4": bleu4(p, r)}


# ----------------------------------------------------------------------------------------------- OCR


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insert / delete / substitute, each 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def edit_accuracy(pred: str, gt: str) -> float:
    """1 - Levenshtein / max length (1.0 for two empty strings)."""
    n = max(len(pred), len(gt))
    return 1.0 if n == 0 else 1.0 - edit_distance(pred, gt) / n


def ocr_scores(preds: Sequence[str], gts: Sequence[str]) -> dict[str, float]:
    """Mean exact match and mean edit-distance accuracy over samples (strings compared after strip())."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} OCR predictions for {len(gts)} references")
    if not preds:
        return {"exact_match": 0.0, "edit_accuracy": 0.0}
    em = [float(p.strip() == g.strip()) for p, g in zip(preds, gts)]
    ea = [edit_accuracy(p.strip(), g.strip()) for p, g in zip(preds, gts)]
    return {"exact_match": sum(em) / len(em), "edit_accuracy": sum(ea) / len(ea)}
