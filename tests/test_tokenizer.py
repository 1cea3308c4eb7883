"""Tokenizer: the real qwen.tiktoken, the special ids of SPEC §2, round trips and image spans."""

from __future__ import annotations

import pickle

import pytest

from data.tokenizer import QwenTokenizer, TokenizerError, find_ranks_file


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer()


def test_vocab_size_and_special_ids(tok: QwenTokenizer) -> None:
    assert tok.n_vocab == 151860
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|extra_0|>": 151646,
                "<|extra_204|>": 151850, "<ref>": 151851, "</ref>": 151852, "<box>": 151853, "</box>": 151854,
                "<quad>": 151855, "</quad>": 151856, "<img>": 151857, "</img>": 151858, "<imgpad>": 151859}
    for name, i in expected.items():
        assert tok.encode(name) == [i], name
        assert tok.token(name) == i
    assert tok._enc.n_vocab == 151860


def test_chatml_prefix(tok: QwenTokenizer) -> None:
    assert tok.encode("<|im_start|>user") == [151644, 872]


def test_known_ids(tok: QwenTokenizer) -> None:
    # ids shared by Qwen's BPE ranks (the first 151643 ids of Qwen/Qwen2 vocabularies)
    assert tok.encode("Hello world") == [9707, 1879]
    # digits are single tokens
    assert len(tok.encode("12345")) == 5


@pytest.mark.parametrize("text", [
    "A photo of a cat sitting on a red sofa.",
    "一只猫坐在红色的沙发上。",
    "Mixed 中英文 text, with digits 2024 and emoji-free punctuation：好！",
    "line one\nline two\n\n  indented\ttab",
])
def test_round_trip(tok: QwenTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and all(0 <= i < 151643 for i in ids)
    assert tok.decode(ids) == text


def test_nfc_normalisation(tok: QwenTokenizer) -> None:
    decomposed = "e\u0301"  # e + combining acute
    assert tok.encode(decomposed) == tok.encode("\u00e9")


def test_special_text_can_be_plain(tok: QwenTokenizer) -> None:
    plain = tok.encode("<|im_start|>", special=False)
    assert 151644 not in plain and tok.decode(plain) == "<|im_start|>"
    only_ref = tok.encode("<ref>x</ref><|im_end|>", special={"<ref>", "</ref>"})
    assert only_ref[0] == 151851 and 151852 in only_ref and 151645 not in only_ref


def test_image_span(tok: QwenTokenizer) -> None:
    span = tok.image_span("demo/cat.jpg")
    assert len(span) == 258
    assert span[0] == 151857 and span[-1] == 151858
    assert span[1:13] == list(b"demo/cat.jpg") and set(span[13:-1]) == {151859}
    assert len(tok.image_span()) == 258 and len(tok.image_span("x" * 400)) == 258
    # decode reads the path back out of the slots (official): tags kept unless skipping special tokens
    ids = tok.encode("Picture 1: ") + span + tok.encode("\nWhat is this?")
    assert tok.decode(ids) == "Picture 1: demo/cat.jpg\nWhat is this?"
    assert tok.decode(ids, skip_special=False) == "Picture 1: <img>demo/cat.jpg</img>\nWhat is this?"


IMG, IMG_END, PAD = 151857, 151858, 151859


def hand_span(path_bytes: bytes) -> list[int]:
    """An image span written out by hand: <img>, the path's bytes as ids 0..255, <imgpad> to 256, </img>."""
    return [IMG, *path_bytes, *[PAD] * (256 - len(path_bytes)), IMG_END]


def test_decode_image_spans_give_back_paths(tok: QwenTokenizer) -> None:
    path = "/data/coco/val2014/猫 1.jpg"
    ids = tok.encode("Picture 1: ") + hand_span(path.encode()) + tok.encode("\n<ref>the cat</ref>")
    assert tok.decode(ids, skip_special=False) == f"Picture 1: <img>{path}</img>\n<ref>the cat</ref>"
    assert tok.decode(ids) == f"Picture 1: {path}\nthe cat"  # official skip_special_tokens=True
    assert tok.decode(ids, keep_image_special=True) == f"Picture 1: {path}\n<ref>the cat</ref>"
    two = hand_span(b"a.png") + tok.encode(" and ") + hand_span(b"b.png")
    assert tok.decode(two, skip_special=False) == "<img>a.png</img> and <img>b.png</img>"
    assert tok.decode(hand_span(b""), skip_special=False) == "<img></img>"
    full = "x" * 255 + "y"  # 256 bytes: no <imgpad> at all
    assert tok.decode(hand_span(full.encode()), skip_special=False) == f"<img>{full}</img>"
    assert tok.decode(IMG, skip_special=False) == "<img>"  # a single id, as the official decode takes


def test_decode_image_tags_that_are_not_spans(tok: QwenTokenizer) -> None:
    # `<img>x</img>` encoded as text (not 256 slots) round-trips as text, not as a path
    text = "see <img>cat.jpg</img> here"
    assert tok.decode(tok.encode(text), skip_special=False) == text
    # a reply cut inside a span (streaming) decodes instead of raising (the official code raises)
    cut = hand_span(b"ab.jpg")[:40]
    assert tok.decode(cut, skip_special=False).startswith("<img>")
    assert "ab.jpg" not in tok.decode(cut, skip_special=False)


def test_decode_errors_modes(tok: QwenTokenizer) -> None:
    lead = tok._enc.encode_single_token(b"\xe7")  # first byte of a 3-byte UTF-8 character, alone
    ids = tok.encode("a") + [lead] + tok.encode("b")
    assert tok.decode(ids) == "a\ufffdb"  # default "replace", as official
    assert tok.decode(ids, errors="replace") == "a\ufffdb"
    assert tok.decode(ids, errors="ignore") == "ab"
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids, errors="strict")
    # path bytes cut inside a character (a path longer than 256 bytes) follow the same rule
    span = hand_span("é".encode()[:1])
    assert tok.decode(span, skip_special=False) == "<img>\ufffd</img>"
    assert tok.decode(span, skip_special=False, errors="ignore") == "<img></img>"
    with pytest.raises(UnicodeDecodeError):
        tok.decode(span, errors="strict")


def test_decode_skips_specials(tok: QwenTokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n<ref>the dog</ref><box>(1,2),(3,4)</box><|im_end|>")
    assert tok.decode(ids) == "assistant\nthe dog(1,2),(3,4)"
    assert tok.decode(ids, skip_special=False).startswith("<|im_start|>assistant\n<ref>the dog</ref>")


def test_pickles_without_encoder(tok: QwenTokenizer) -> None:
    tok.encode("warm")  # builds the encoder
    blob = pickle.dumps(tok)
    assert len(blob) < 10_000  # the ranks are not shipped to workers
    assert pickle.loads(blob).encode("你好 world") == tok.encode("你好 world")


def test_bad_files(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no qwen.tiktoken"):
        find_ranks_file(tmp_path)
    real = find_ranks_file()
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(real.read_bytes()[:-100])  # truncated copy
    with pytest.raises(TokenizerError, match="sha256"):
        QwenTokenizer(tmp_path).encode("x")
    # a model directory holding the real file works
    good = tmp_path / "model"
    good.mkdir()
    (good / "qwen.tiktoken").write_bytes(real.read_bytes())
    assert QwenTokenizer(good).encode("<|im_start|>user") == [151644, 872]
