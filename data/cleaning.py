"""Stage-1 image-text cleaning (SPEC §4) as a library.

The paper lists the rules but publishes no thresholds, so every threshold lives in `CleaningConfig`.
A `Cleaner` takes samples (key, meta, {member: image bytes}) and returns a `Decision` per sample: keep
(with possibly rewritten text) or reject with the name of the first rule that failed. `CleaningReport`
counts every input sample exactly once, as kept or as removed under one rule.

Rules, in the order they are applied (the rule name is what the report uses):
  bad_image            image member missing or undecodable (caption samples need exactly one image)
  image_too_small      min(width, height) < min_image_side
  aspect_ratio         max(w/h, h/w) > max_aspect_ratio
  -- text rewriting (counted under report["modified"], never removes by itself):
  strip_html           <script>/<style> blocks, tags and comments removed, entities unescaped
  strip_url            http(s)://..., www.... removed (links carry no visual content)
  strip_email          e-mail addresses removed
  collapse_repeats     a run of > max_char_repeat identical non-digit characters ("!!!!!!", "=====",
                       "soooooo") collapsed to one character; digit runs are left (numbers like 1000000)
  --
  missing_text         no text, or nothing left after stripping
  emoji                any emoji / pictograph / flag / ZWJ / variation-selector code point
  non_en_zh_chars      fraction of characters that are neither English (ASCII) nor Chinese (CJK
                       ideographs, CJK/fullwidth punctuation, general punctuation) > max_foreign_fraction
  boilerplate          matches a boilerplate regex ("click here", "read more", "all rights reserved",
                       "stock photo", "点击查看", ...): such captions describe the web page, not the picture
  text_too_short       weighted length < min_text_len (CJK ideograph counts cjk_char_weight, others 1)
  text_too_long        weighted length > max_text_len
  clip_score           cosine(image, text) of a user-named OpenCLIP model < threshold (per source)
  exact_duplicate      same normalised text AND same decoded pixels as an already kept sample
  near_duplicate_image 64-bit dHash within image_hamming of a kept sample's hash
  near_duplicate_text  MinHash-estimated Jaccard of character shingles >= text_jaccard vs a kept sample
  invalid_sample       kept by the rules but refused by the shard writer (data.shards.validate_meta: e.g. a
                       key that is not a plain name, a passthrough sample with an invalid task); set by the
                       CLI after the rules, see CleaningReport.unwritable

Samples that cannot be read at all (bad/missing JSON, truncated tar, unreadable member, unsafe key, invalid
Unicode: the loader's and data.sanity's reasons) never reach the rules; they are counted under
report["skipped"] by reason, separately from "input" (samples the rules saw).

Samples whose task is not in `CleaningConfig.tasks` pass through unchanged and are counted as such.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import re
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image

RULES = (
    "bad_image", "image_too_small", "aspect_ratio", "missing_text", "emoji", "non_en_zh_chars",
    "boilerplate", "text_too_short", "text_too_long", "clip_score", "exact_duplicate",
    "near_duplicate_image", "near_duplicate_text", "invalid_sample",
)
REWRITES = ("strip_html", "strip_url", "strip_email", "collapse_repeats")

DEFAULT_BOILERPLATE = (
    r"\bclick (here|to)\b", r"\bread more\b", r"\ball rights reserved\b", r"\bstock (photo|image)s?\b",
    r"\bimage may contain\b", r"\b(subscribe|sign up) (now|today|for)\b", r"\bfree download\b",
    r"\bdownload (now|free)\b", r"\bshop now\b", r"\bbuy now\b", r"\bno description available\b",
    r"\bcopyright\b", r"©",
    r"点击(这里|此处|查看|下载)", r"查看更多", r"版权所有", r"免费下载", r"立即购买", r"扫码关注",
)


@dataclass
class CleaningConfig:
    """All stage-1 thresholds (no published numbers; these are conservative defaults)."""

    max_aspect_ratio: float = 3.0
    min_image_side: int = 64
    min_text_len: float = 6.0  # weighted characters, see text_length()
    max_text_len: float = 512.0
    cjk_char_weight: float = 2.0  # one CJK ideograph carries about as much as 2 Latin characters
    max_foreign_fraction: float = 0.0  # > this fraction of disallowed characters -> reject
    reject_emoji: bool = True
    strip_html: bool = True
    strip_urls: bool = True
    strip_emails: bool = True
    max_char_repeat: int = 4
    boilerplate_patterns: tuple[str, ...] = DEFAULT_BOILERPLATE
    dedup_exact: bool = True
    dedup_near_image: bool = True
    image_hamming: int = 4  # of 64 dHash bits
    dedup_near_text: bool = True
    text_jaccard: float = 0.9
    shingle_size: int = 3  # character shingles work for both English and Chinese
    minhash_perms: int = 64
    minhash_bands: int = 16
    clip_model: str | None = None  # e.g. "ViT-B-32"; None disables the CLIP filter
    clip_pretrained: str | None = None  # tag (hub) or local path
    clip_threshold: float = 0.28
    clip_thresholds: dict[str, float] = field(default_factory=dict)  # per meta["source"] overrides
    clip_batch_size: int = 32
    clip_device: str = "cpu"
    tasks: tuple[str, ...] = ("caption", "text")
    text_fields: dict[str, str] = field(default_factory=lambda: {"caption": "caption", "text": "text"})
    examples_per_rule: int = 5

    def __post_init__(self) -> None:
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.min_text_len > self.max_text_len:
            raise ValueError(f"min_text_len {self.min_text_len} > max_text_len {self.max_text_len}")
        if not 0 <= self.max_foreign_fraction <= 1:
            raise ValueError(f"max_foreign_fraction must be in [0,1], got {self.max_foreign_fraction}")
        if self.minhash_perms % self.minhash_bands:
            raise ValueError(f"minhash_perms {self.minhash_perms} not divisible by bands {self.minhash_bands}")
        if not 0 <= self.image_hamming < 64:
            raise ValueError(f"image_hamming must be in [0,64), got {self.image_hamming}")
        self.boilerplate_patterns = tuple(self.boilerplate_patterns)
        self.tasks = tuple(self.tasks)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CleaningConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CleaningConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["boilerplate_patterns"] = list(self.boilerplate_patterns)
        d["tasks"] = list(self.tasks)
        return d


# ---------------------------------------------------------------- character classes

def is_cjk_ideograph(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2A6DF
            or 0x2A700 <= o <= 0x2EBEF or 0xF900 <= o <= 0xFAFF or 0x3007 == o)


def is_emoji(ch: str) -> bool:
    o = ord(ch)
    return (0x1F300 <= o <= 0x1FAFF  # pictographs, emoticons, transport, supplemental symbols
            or 0x1F000 <= o <= 0x1F2FF  # mahjong, cards, enclosed alphanumerics/ideographs (🅰, 🈶)
            or 0x2600 <= o <= 0x27BF  # misc symbols + dingbats (☀, ✂, ❤)
            or o in (0x2B05, 0x2B06, 0x2B07, 0x2B1B, 0x2B1C, 0x2B50, 0x2B55)  # arrows, ⭐, ⭕
            or o in (0x200D, 0xFE0F, 0x20E3)  # ZWJ, emoji presentation selector, keycap
            or 0xE0020 <= o <= 0xE007F)  # tag characters (subdivision flags)


_EXTRA_ALLOWED = set("\t\n\r\u00a0\u00b7\u00b0\u00d7\u00f7")  # whitespace, nbsp, · ° × ÷


def is_allowed_char(ch: str) -> bool:
    """English (printable ASCII) or Chinese (ideographs and the punctuation Chinese text uses)."""
    o = ord(ch)
    return (0x20 <= o <= 0x7E or ch in _EXTRA_ALLOWED or is_cjk_ideograph(ch)
            or 0x3000 <= o <= 0x303F  # CJK symbols and punctuation (、。「」《》)
            or 0xFF00 <= o <= 0xFFEF  # fullwidth forms (，！？：；（）０-９)
            or 0x2000 <= o <= 0x206F  # general punctuation (— ‘ ’ “ ” …)
            or 0xFE30 <= o <= 0xFE4F)  # CJK compatibility forms


def text_length(text: str, cjk_weight: float = 2.0) -> float:
    """Weighted non-space length: CJK ideographs count `cjk_weight`, everything else 1."""
    n = 0.0
    for ch in text:
        if ch.isspace():
            continue
        n += cjk_weight if is_cjk_ideograph(ch) else 1.0
    return n


def detect_lang(text: str) -> str:
    """'zh' if CJK ideographs make up >= 30% of the letters, else 'en' (report bucketing only)."""
    cjk = sum(1 for c in text if is_cjk_ideograph(c))
    letters = sum(1 for c in text if c.isalpha())
    return "zh" if letters and cjk / letters >= 0.3 else "en"


def normalize_text(text: str) -> str:
    """Key for exact dedup: NFKC, lower case, whitespace collapsed, edge punctuation dropped."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = " ".join(t.split())
    return t.strip(" .,;:!?。，；：！？\"'“”‘’")


# ---------------------------------------------------------------- text rewriting

_SCRIPT_RE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT_RE = re.compile(r"<!--.*?-->", re.DOTALL)
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(\s[^<>]*)?/?>")
_ENTITY_RE = re.compile(r"&(#\d+|#x[0-9A-Fa-f]+|[A-Za-z][A-Za-z0-9]*);")
_URL_RE = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"'，。]+", re.IGNORECASE)
_EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")


def strip_html(text: str) -> str:
    t = _SCRIPT_RE.sub(" ", text)
    t = _COMMENT_RE.sub(" ", t)
    t = _TAG_RE.sub(" ", t)
    return html.unescape(t)


def collapse_repeats(text: str, max_repeat: int) -> str:
    pattern = re.compile(rf"(\D)\1{{{max_repeat},}}")  # > max_repeat identical non-digits
    return pattern.sub(r"\1", text)


def _squash_ws(text: str) -> str:
    return " ".join(text.split())


def rewrite_text(text: str, cfg: CleaningConfig) -> tuple[str, list[str]]:
    """Apply the stripping rules; returns (new text, names of the rewrites that changed something)."""
    applied = []
    t = text
    steps = []
    if cfg.strip_html:
        steps.append(("strip_html", lambda s: strip_html(s) if ("<" in s or "&" in s) else s))
    if cfg.strip_urls:
        steps.append(("strip_url", lambda s: _URL_RE.sub(" ", s)))
    if cfg.strip_emails:
        steps.append(("strip_email", lambda s: _EMAIL_RE.sub(" ", s)))
    if cfg.max_char_repeat > 0:
        steps.append(("collapse_repeats", lambda s: collapse_repeats(s, cfg.max_char_repeat)))
    for name, fn in steps:
        new = fn(t)
        if _squash_ws(new) != _squash_ws(t):
            applied.append(name)
        t = new
    return _squash_ws(t), applied


# ---------------------------------------------------------------- hashes

def dhash(img: Image.Image) -> int:
    """64-bit difference hash: 9x8 grey thumbnail, bit = left pixel brighter than its right neighbour."""
    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (g[:, :-1] > g[:, 1:]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def pixel_hash(img: Image.Image) -> str:
    """Content hash of the decoded RGB pixels (a re-encoded copy of the same pixels still matches)."""
    rgb = img.convert("RGB")
    h = hashlib.sha1(f"{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


_MERSENNE = (1 << 31) - 1


def shingles(text: str, k: int) -> set[str]:
    t = normalize_text(text)
    if len(t) <= k:
        return {t}
    return {t[i:i + k] for i in range(len(t) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


class MinHasher:
    """MinHash over character shingles with universal hashing (a*x + b) mod (2^31 - 1)."""

    def __init__(self, num_perm: int = 64, shingle_size: int = 3, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _MERSENNE, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _MERSENNE, size=num_perm, dtype=np.uint64)
        self.k = shingle_size

    def signature(self, text: str) -> np.ndarray:
        sh = shingles(text, self.k)
        x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")
                      % _MERSENNE for s in sorted(sh)], dtype=np.uint64)
        # a, x < 2^31 so a*x + b < 2^63: no uint64 overflow
        return ((self.a[:, None] * x[None, :] + self.b[:, None]) % _MERSENNE).min(axis=1)

    @staticmethod
    def estimate(s1: np.ndarray, s2: np.ndarray) -> float:
        return float(np.mean(s1 == s2))


class NearDupIndex:
    """Exact Hamming-radius lookup for 64-bit hashes by pigeonhole banding: two hashes within
    distance r agree exactly on at least one of r+1 disjoint bit bands."""

    def __init__(self, radius: int):
        self.radius = radius
        n = radius + 1
        edges = [round(i * 64 / n) for i in range(n + 1)]
        self.bands = [(edges[i], edges[i + 1]) for i in range(n)]
        self.tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in self.bands]

    def _keys(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self.bands]

    def find(self, h: int) -> int | None:
        for table, k in zip(self.tables, self._keys(h)):
            for other in table.get(k, ()):
                if hamming(h, other) <= self.radius:
                    return other
        return None

    def add(self, h: int) -> None:
        for table, k in zip(self.tables, self._keys(h)):
            table[k].append(h)


class TextLSH:
    """MinHash LSH: candidates share a band of rows, confirmed by the signature Jaccard estimate."""

    def __init__(self, hasher: MinHasher, bands: int, threshold: float):
        self.hasher, self.bands, self.threshold = hasher, bands, threshold
        self.rows = len(hasher.a) // bands
        self.tables: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
        self.sigs: list[np.ndarray] = []

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def find(self, sig: np.ndarray) -> float | None:
        seen = set()
        for table, k in zip(self.tables, self._band_keys(sig)):
            for idx in table.get(k, ()):
                if idx in seen:
                    continue
                seen.add(idx)
                sim = MinHasher.estimate(sig, self.sigs[idx])
                if sim >= self.threshold:
                    return sim
        return None

    def add(self, sig: np.ndarray) -> None:
        idx = len(self.sigs)
        self.sigs.append(sig)
        for table, k in zip(self.tables, self._band_keys(sig)):
            table[k].append(idx)


# ---------------------------------------------------------------- CLIP scoring

class ClipScorer:
    """Cosine similarity between image and text embeddings of any OpenCLIP model.

    `model_name` is an open_clip architecture name (built-in, registered with add_model_config, or an
    'hf-hub:'/'local-dir:' id); `pretrained` is a tag or a local checkpoint path (None = random init,
    only useful for tests)."""

    def __init__(self, model_name: str, pretrained: str | None = None, device: str = "cpu"):
        import open_clip
        import torch

        self.torch = torch
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device)
        except Exception as e:  # name the model and weights the user asked for
            raise RuntimeError(f"cannot build OpenCLIP model {model_name!r} (pretrained={pretrained!r}): {e}") from e
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device

    def score(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            return np.zeros(0, dtype=np.float32)
        torch = self.torch
        with torch.no_grad():
            px = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
            tok = self.tokenizer(texts).to(self.device)
            fi = self.model.encode_image(px, normalize=True).float()
            ft = self.model.encode_text(tok, normalize=True).float()
            return (fi * ft).sum(-1).cpu().numpy()


# ---------------------------------------------------------------- cleaner and report

@dataclass
class Decision:
    key: str
    keep: bool
    rule: str | None  # failing rule when rejected; None when kept
    meta: dict[str, Any]  # (possibly rewritten) metadata to write when kept
    lang: str
    detail: str = ""
    rewrites: list[str] = field(default_factory=list)
    passthrough: bool = False


class CleaningReport:
    """Counts every sample once: kept, or removed under one rule; also per language and rewrites."""

    def __init__(self, examples_per_rule: int = 5):
        self.n_examples = examples_per_rule
        self.input = 0
        self.kept = 0
        self.passthrough = 0
        self.removed: dict[str, int] = {r: 0 for r in RULES}
        self.modified: dict[str, int] = {r: 0 for r in REWRITES}
        self.by_lang: dict[str, dict[str, Any]] = {}
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.skipped: dict[str, int] = defaultdict(int)
        self.skip_examples: dict[str, list[str]] = defaultdict(list)

    def skip(self, reason: str, url: str, member: str, detail: str) -> None:
        """A sample (or the rest of a shard) that could not be read: counted by reason, never seen by the rules."""
        self.skipped[reason] += 1
        if len(self.skip_examples[reason]) < self.n_examples:
            self.skip_examples[reason].append(f"{url}: {member}: {detail}")

    def unwritable(self, d: Decision, detail: str) -> None:
        """A sample `add` counted as kept that the shard writer refused: moved to removed['invalid_sample']."""
        assert d.keep, d
        self.kept -= 1
        self.by_lang[d.lang]["kept"] -= 1
        self.passthrough -= int(d.passthrough)
        self.add(Decision(d.key, False, "invalid_sample", d.meta, d.lang, detail))
        self.input -= 1  # add() counted the sample a second time
        self.by_lang[d.lang]["input"] -= 1

    def add(self, d: Decision) -> None:
        self.input += 1
        lang = self.by_lang.setdefault(d.lang, {"input": 0, "kept": 0, "removed": {}})
        lang["input"] += 1
        for r in d.rewrites:
            self.modified[r] += 1
        if d.keep:
            self.kept += 1
            lang["kept"] += 1
            self.passthrough += int(d.passthrough)
            return
        if d.rule not in self.removed:
            raise ValueError(f"sample {d.key}: unknown rule {d.rule!r}")
        self.removed[d.rule] += 1
        lang["removed"][d.rule] = lang["removed"].get(d.rule, 0) + 1
        if len(self.examples[d.rule]) < self.n_examples:
            self.examples[d.rule].append(d.key)

    @property
    def n_removed(self) -> int:
        return sum(self.removed.values())

    def check(self) -> None:
        if self.kept + self.n_removed != self.input:
            raise AssertionError(f"report does not add up: kept {self.kept} + removed {self.n_removed} "
                                 f"!= input {self.input}")

    def to_dict(self) -> dict[str, Any]:
        self.check()
        return {
            "input": self.input, "kept": self.kept, "removed_total": self.n_removed,
            "passthrough": self.passthrough, "removed": dict(self.removed), "modified": dict(self.modified),
            "by_lang": {k: self.by_lang[k] for k in sorted(self.by_lang)},
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
            "skipped_total": sum(self.skipped.values()), "skipped": dict(sorted(self.skipped.items())),
            "skip_examples": {k: list(v) for k, v in sorted(self.skip_examples.items())},
        }

    def write(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Atomic JSON write (tmp + os.replace)."""
        d = self.to_dict()
        if extra:
            d.update(extra)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(d, f, ensure_ascii=False, indent=2)
        os.replace(tmp, path)


class Cleaner:
    """Applies the rules in module-doc order. Dedup state only holds samples that were kept."""

    def __init__(self, cfg: CleaningConfig | None = None, clip_scorer: ClipScorer | None = None):
        self.cfg = cfg or CleaningConfig()
        self.report = CleaningReport(self.cfg.examples_per_rule)
        self._boiler = [re.compile(p, re.IGNORECASE) for p in self.cfg.boilerplate_patterns]
        self._exact: set[tuple[str, str]] = set()
        self._img_index = NearDupIndex(self.cfg.image_hamming)
        self._hasher = MinHasher(self.cfg.minhash_perms, self.cfg.shingle_size)
        self._text_index = TextLSH(self._hasher, self.cfg.minhash_bands, self.cfg.text_jaccard)
        self._clip = clip_scorer
        if self._clip is None and self.cfg.clip_model:
            self._clip = ClipScorer(self.cfg.clip_model, self.cfg.clip_pretrained, self.cfg.clip_device)

    # -- stage A: per-sample rules that need no corpus state
    def _check_sample(self, key: str, meta: dict[str, Any], images: dict[str, bytes]) -> tuple[Decision, Any]:
        cfg = self.cfg
        task = meta.get("task", "caption")
        field_name = cfg.text_fields.get(task, "caption")
        raw = meta.get(field_name)
        lang = meta.get("lang") or (detect_lang(raw) if isinstance(raw, str) else "unknown")
        if task not in cfg.tasks:
            return Decision(key, True, None, meta, lang, passthrough=True), None

        def reject(rule: str, detail: str = "", rewrites: list[str] | None = None) -> tuple[Decision, Any]:
            return Decision(key, False, rule, meta, lang, detail, rewrites or []), None

        img = None
        if task != "text":
            members = meta.get("images") or sorted(images)
            if len(members) != 1 or members[0] not in images:
                return reject("bad_image", f"expected 1 image member, meta lists {members}, have {sorted(images)}")
            try:
                img = Image.open(io.BytesIO(images[members[0]]))
                img.load()
            except Exception as e:
                return reject("bad_image", f"{members[0]}: {type(e).__name__}: {e}")
            w, h = img.size
            if min(w, h) < cfg.min_image_side:
                return reject("image_too_small", f"{w}x{h}")
            if max(w / h, h / w) > cfg.max_aspect_ratio:
                return reject("aspect_ratio", f"{w}x{h}")
        if not isinstance(raw, str) or not raw.strip():
            return reject("missing_text", f"field {field_name!r} missing or empty")
        text, rewrites = rewrite_text(raw, cfg)
        if not text:
            return reject("missing_text", "empty after stripping", rewrites)
        if cfg.reject_emoji:
            emo = [c for c in text if is_emoji(c)]
            if emo:
                return reject("emoji", "".join(emo[:5]), rewrites)
        bad = [c for c in text if not is_allowed_char(c)]
        if bad and len(bad) / len(text) > cfg.max_foreign_fraction:
            return reject("non_en_zh_chars", "".join(bad[:10]), rewrites)
        for pat in self._boiler:
            if pat.search(text):
                return reject("boilerplate", pat.pattern, rewrites)
        n = text_length(text, cfg.cjk_char_weight)
        if n < cfg.min_text_len:
            return reject("text_too_short", f"{n:g}", rewrites)
        if n > cfg.max_text_len:
            return reject("text_too_long", f"{n:g}", rewrites)
        new_meta = dict(meta)
        new_meta[field_name] = text
        if "lang" not in new_meta:
            new_meta["lang"] = lang
        return Decision(key, True, None, new_meta, lang, rewrites=rewrites), (img, text)

    # -- stage C: corpus-level dedup, registering kept samples
    def _dedup(self, d: Decision, img: Image.Image | None, text: str) -> Decision:
        cfg = self.cfg
        ph = pixel_hash(img) if img is not None else ""
        exact_key = (hashlib.sha1(normalize_text(text).encode()).hexdigest(), ph)
        dh = dhash(img) if img is not None else None
        sig = self._hasher.signature(text) if cfg.dedup_near_text else None
        if cfg.dedup_exact and exact_key in self._exact:
            return self._rejected(d, "exact_duplicate")
        if cfg.dedup_near_image and dh is not None:
            other = self._img_index.find(dh)
            if other is not None:
                return self._rejected(d, "near_duplicate_image", f"hamming {hamming(dh, other)}")
        if sig is not None:
            sim = self._text_index.find(sig)
            if sim is not None:
                return self._rejected(d, "near_duplicate_text", f"jaccard~{sim:.2f}")
        self._exact.add(exact_key)
        if dh is not None:
            self._img_index.add(dh)
        if sig is not None:
            self._text_index.add(sig)
        return d

    @staticmethod
    def _rejected(d: Decision, rule: str, detail: str = "") -> Decision:
        return Decision(d.key, False, rule, d.meta, d.lang, detail, d.rewrites)

    def clip_threshold(self, meta: dict[str, Any]) -> float:
        return self.cfg.clip_thresholds.get(str(meta.get("source", "")), self.cfg.clip_threshold)

    def process_batch(self, samples: list[tuple[str, dict[str, Any], dict[str, bytes]]]) -> list[Decision]:
        """Decide a batch (CLIP scores are computed batched); updates `self.report`."""
        staged = [self._check_sample(k, m, imgs) for k, m, imgs in samples]
        if self._clip is not None:
            idx = [i for i, (d, extra) in enumerate(staged) if d.keep and extra is not None and extra[0] is not None]
            for s in range(0, len(idx), self.cfg.clip_batch_size):
                chunk = idx[s:s + self.cfg.clip_batch_size]
                scores = self._clip.score([staged[i][1][0] for i in chunk], [staged[i][1][1] for i in chunk])
                for i, sc in zip(chunk, scores):
                    d, extra = staged[i]
                    d.meta["clip_score"] = round(float(sc), 4)
                    if sc < self.clip_threshold(d.meta):
                        staged[i] = (self._rejected(d, "clip_score", f"{sc:.4f}"), None)
        out = []
        for d, extra in staged:
            if d.keep and extra is not None:
                d = self._dedup(d, *extra)
            self.report.add(d)
            out.append(d)
        return out

    def process(self, key: str, meta: dict[str, Any], images: dict[str, bytes]) -> Decision:
        return self.process_batch([(key, meta, images)])[0]
