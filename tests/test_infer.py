"""Inference: loading every checkpoint kind, KV-cache generation vs the model's reference greedy loop, batched
(left-padded) generation equal to one-by-one for greedy and sampling, stop tokens, sampling filters, streaming."""

from __future__ import annotations

import json

import pytest
import torch
from infer_helpers import export_tiny, tiny_model, write_image

from train.infer import GenerationConfig, generate, load, load_model
from train.infer.generation import TextStreamer, apply_repetition_penalty, filter_top_k_top_p
from train.infer.prompts import chatml_ids, encode_with_images, user_content


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    export_tiny(d / "export")
    img = write_image(d / "a.png")
    img2 = write_image(d / "b.png", (40, 80), (20, 40, 220))
    vm = load(d / "export", device="cpu", dtype="fp32")
    return d, vm, img, img2


def _prompts(vm, img, img2):
    tok = vm.tokenizer
    p = [chatml_ids(tok, [("user", user_content("What is this?", [str(img)]))]),
         chatml_ids(tok, [("user", "Say something much longer than the other prompts, please, at length.")]),
         encode_with_images(tok, f"<img>{img2}</img><ref>the blue box</ref><box>"),
         encode_with_images(tok, f"<img>{img}</img>Picture 2: <img>{img2}</img>two")]
    ids = [x[0] for x in p]
    assert len({len(i) for i in ids}) == len(ids)  # all different lengths: real left padding
    return ids, [vm._pixels(x[1]) for x in p]


def test_greedy_matches_model_reference_loop(tiny):
    _, vm, img, img2 = tiny
    ids, px = _prompts(vm, img, img2)
    out = generate(vm.model, [ids[0]], [px[0]], GenerationConfig(max_new_tokens=10, stop_ids=(0,)))[0]
    ref = vm.model.generate(torch.tensor([ids[0]]), torch.stack(px[0]), max_new_tokens=10, eos_id=0)
    assert out.tokens == ref[0, len(ids[0]):].tolist()
    assert len(out.tokens) == 10 and out.finish_reason == "length"


@pytest.mark.parametrize("gen", [
    dict(),
    dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=3),
    dict(repetition_penalty=1.3),
])
def test_batched_equals_one_by_one(tiny, gen):
    _, vm, img, img2 = tiny
    ids, px = _prompts(vm, img, img2)
    cfg = GenerationConfig(max_new_tokens=12, **gen)
    batched = generate(vm.model, ids, px, cfg)
    single = [generate(vm.model, [i], [p], cfg)[0] for i, p in zip(ids, px)]
    assert [b.tokens for b in batched] == [s.tokens for s in single]
    assert [b.finish_reason for b in batched] == [s.finish_reason for s in single]
    assert all(len(b.tokens) > 0 for b in batched)


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    _, vm, img, img2 = tiny
    ids, px = _prompts(vm, img, img2)
    s = dict(do_sample=True, temperature=1.5, max_new_tokens=12)
    a = generate(vm.model, ids[:1], px[:1], GenerationConfig(seed=1, **s))[0].tokens
    b = generate(vm.model, ids[:1], px[:1], GenerationConfig(seed=1, **s))[0].tokens
    c = generate(vm.model, ids[:1], px[:1], GenerationConfig(seed=2, **s))[0].tokens
    g = generate(vm.model, ids[:1], px[:1], GenerationConfig(max_new_tokens=12))[0].tokens
    k1 = generate(vm.model, ids[:1], px[:1], GenerationConfig(seed=5, do_sample=True, top_k=1, max_new_tokens=12))
    assert a == b and a != c and a != g
    assert k1[0].tokens == g  # top-k 1 sampling is greedy


def test_stop_tokens_and_streaming(tiny):
    _, vm, img, img2 = tiny
    ids, px = _prompts(vm, img, img2)
    free = generate(vm.model, ids, px, GenerationConfig(max_new_tokens=6))
    # make row 0's third token a stop token: row 0 stops after 2 tokens, the others run to the limit
    stop_tok = free[0].tokens[2]
    seen: list[tuple[int, int]] = []
    out = generate(vm.model, ids, px, GenerationConfig(max_new_tokens=6, stop_ids=(stop_tok,)),
                   streamer=lambda r, t: seen.append((r, t)))
    assert out[0].finish_reason == "stop" and len(out[0].tokens) <= 2
    for o, f in zip(out, free):
        if stop_tok in f.tokens:
            assert o.tokens == f.tokens[:f.tokens.index(stop_tok)] and o.finish_reason == "stop"
        else:
            assert o.tokens == f.tokens and o.finish_reason == "length"
    for row, o in enumerate(out):  # every generated token streamed once, in order
        assert [t for r, t in seen if r == row] == o.tokens
    assert generate(vm.model, ids[:1], px[:1], GenerationConfig(max_new_tokens=0))[0].tokens == []


def test_text_streamer_holds_back_partial_utf8(tiny):
    _, vm, _, _ = tiny
    ids = vm.tokenizer.encode("猫 cat 🐱")
    pieces: list[str] = []
    ts = TextStreamer(vm.decode, pieces.append)
    for t in ids:
        ts(0, t)
    ts.flush()
    assert "".join(pieces) == "猫 cat 🐱" and all("\ufffd" not in p for p in pieces)


def test_filters_and_penalty_hand_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)[0, 2:]).all()
    assert torch.isfinite(filter_top_k_top_p(logits, 2, 1.0)[0, :2]).all()
    # softmax = [0.644, 0.237, 0.087, 0.032]: top_p 0.7 keeps the first two (mass before #2 is 0.644 < 0.7)
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.7))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.01))[0].tolist() == [True, False, False, False]
    seen = torch.tensor([[True, False, False, True]])
    pen = apply_repetition_penalty(logits, seen, 2.0)
    assert pen.tolist() == [[1.0, 1.0, 0.0, -2.0]]


def test_bf16_cpu_generates(tiny):
    d, _, img, _ = tiny
    vm = load(d / "export", device="cpu", dtype="bf16")
    assert next(vm.model.parameters()).dtype == torch.bfloat16
    r = vm.chat("What is this?", images=[str(img)], max_new_tokens=4)
    assert len(r.tokens) == 4 or r.finish_reason == "stop"


def test_run_checkpoint_and_run_dir_load_same_model(tmp_path, tiny):
    from safetensors.torch import save_file

    from train.config import to_yaml

    d, vm, img, img2 = tiny
    model, cfg = tiny_model()
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000007"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    (step / "trainer_state.json").write_text(json.dumps({"step": 7}), encoding="utf-8")
    (run / "checkpoints" / "latest").write_text("step_00000007\n", encoding="utf-8")
    (run / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    ids, px = _prompts(vm, img, img2)
    want = [o.tokens for o in generate(vm.model, ids, px, GenerationConfig(max_new_tokens=5))]
    for path in (step, run):
        m2, _, src = load_model(path, device="cpu", dtype=torch.float32)
        assert src.kind == "run_checkpoint" and src.path == step
        assert [o.tokens for o in generate(m2, ids, px, GenerationConfig(max_new_tokens=5))] == want
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path, device="cpu")


def test_lora_run_checkpoint_is_merged_on_load(tmp_path):
    from safetensors.torch import save_file

    from train.build import build_model
    from train.config import load_config, to_yaml

    cfg = load_config(["recipe=demo_lora", "init.from_stage_dir=null", "model.vision.image_size=224"])
    model = build_model(cfg).eval()
    with torch.no_grad():  # lora_B starts at zero: make the adapters change the output
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    (step / "trainer_state.json").write_text("{}", encoding="utf-8")
    (tmp_path / "run" / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    merged, _, _ = load_model(step, device="cpu", dtype=torch.float32)
    assert not any(".lora_" in k for k in merged.state_dict())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = model(ids).logits
        got = merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
