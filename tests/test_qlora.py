"""Q-LoRA on the CPU (bitsandbytes' CPU 4-bit kernels): recipe demo_qlora validates here, a step moves only the
LoRA matrices (the packed 4-bit base is bitwise unchanged), the loss falls, checkpoints hold no base, and the
merge into the ORIGINAL full-precision base matches the 4-bit + adapter model within the NF4 error."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from train.build import build_model, build_train_data  # noqa: E402
from train.config import ConfigError, load_config, model_cfg  # noqa: E402
from train.distributed import DistInfo  # noqa: E402
from train.engine import SingleEngine  # noqa: E402
from train.lora import apply_lora, base_key, lora_layers, merged_state_dict  # noqa: E402
from train.model.qwen_vl import QwenVL  # noqa: E402
from train.qlora import base_4bit_tensors, dequantized, linear4bit_class, quantize_llm_4bit  # noqa: E402

SMALL = ["data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56", "data.seq_len=300",
         "train.micro_batch_size=2", "train.global_batch_size=2", "logging=quiet", "optim.warmup_steps=0",
         "optim.lr=1e-2", "init.from_stage_dir=null", "train.export_final=false", "lora.r=4", "lora.dropout=0.0"]
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
CFG = model_cfg(load_config(["recipe=demo_qlora", *SMALL]))  # micro_small_vocab: 1200-token vocabulary


def test_demo_qlora_validates_on_the_cpu_and_refuses_what_cannot_work():
    cfg = load_config(["recipe=demo_qlora"])
    assert cfg.lora.enabled and cfg.lora.qlora and cfg.lora.double_quant and cfg.lora.quant_type == "nf4"
    assert cfg.engine.device == "auto" and cfg.init.from_stage_dir  # the full-precision base to merge into
    load_config(["recipe=demo_qlora", *SMALL, "engine=zero3", "train.global_batch_size=4"], world_size=2)
    with pytest.raises(ConfigError, match=r"lora\.train_modules containing llm"):
        load_config(["recipe=demo_qlora", "lora.train_modules=[llm]"])
    with pytest.raises(ConfigError, match=r"needs init\.official or init\.from_stage_dir"):
        load_config(["recipe=demo_qlora", "init.from_stage_dir=null"])
    with pytest.raises(ConfigError, match=r"lora\.quant_type"):
        load_config(["recipe=demo_qlora", "lora.quant_type=int4"])


def test_step_moves_only_lora_and_keeps_the_4bit_base_bitwise():
    cfg = load_config(["recipe=demo_qlora", *SMALL])
    model = build_model(cfg)
    packed = {k: v.clone() for k, v in base_4bit_tensors(model).items()}
    assert len(packed) == 5 * len(model.llm.h)  # c_attn, attn.c_proj, w1, w2, mlp.c_proj of every block
    assert all(v.dtype == torch.uint8 for v in packed.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n} and len(trainable) == 2 * 4 * len(model.llm.h)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    assert not any(isinstance(m, torch.nn.Linear) and "visual" in n and m.weight.dtype == torch.uint8
                   for n, m in model.named_modules())  # the ViT and the adapter stay unquantised
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    eng = SingleEngine(cfg, model, CPU)
    data = iter(build_train_data(cfg, CPU))
    for _ in range(2):  # two steps: B moves in the first (it starts at 0), A in the second
        eng.backward(eng.forward(next(data)).loss)
        eng.step()
    after = base_4bit_tensors(model)
    assert after.keys() == packed.keys()
    assert all(torch.equal(after[k], v) for k, v in packed.items())  # the 4-bit bytes, bitwise
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p.detach()) == (name not in trainable), name
    # checkpoints (and ZeRO-3's consolidated state) hold the adapters and the full-precision rest, not the base
    state = model.state_dict()
    assert not any(k.endswith("base_layer.weight") or ".weight." in k for k in state if k.startswith("llm.h."))


def test_loss_decreases_over_a_short_run():
    cfg = load_config(["recipe=demo_qlora", *SMALL])
    model = build_model(cfg)
    eng = SingleEngine(cfg, model, CPU)
    batch = next(iter(build_train_data(cfg, CPU)))
    losses = []
    for _ in range(6):  # one batch, over and over: only the adapters can bring its loss down
        out = eng.forward(batch)
        eng.backward(out.loss)
        eng.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    q = CFG.adapter.n_queries
    ids = torch.randint(0, 1000, (2, q + 40), generator=g)  # below the remapped special ids
    ids[0, 3] = CFG.ids.img_start
    ids[0, 4 + q] = CFG.ids.img_end
    px = torch.randn(1, 3, CFG.vision.image_size, CFG.vision.image_size, generator=g)
    return {"input_ids": ids, "pixel_values": px}


def _logits(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return m(b["input_ids"], pixel_values=b["pixel_values"]).logits.float()


def _plain(seed: int = 0) -> QwenVL:
    torch.manual_seed(seed)
    return QwenVL(CFG).eval()


def test_qlora_merge_into_the_original_base_matches_within_nf4_error():
    original = _plain().state_dict()
    q = _plain()
    assert quantize_llm_4bit(q, compute_dtype=torch.float32, device="cpu", double_quant=True) == 5 * CFG.llm.layers
    apply_lora(q, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking adapters (fresh B is zero)
        for name, p in q.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    b = _batch()
    q_logits = _logits(q, b)

    merged = merged_state_dict(q, base=original)
    assert set(merged) == set(original)
    # merged weights are exactly W_original + scale * B @ A (never the dequantised 4-bit weight)
    sd = q.state_dict()
    for name, layer in lora_layers(q):
        a, bb = sd[f"{name}.lora_A.default.weight"], sd[f"{name}.lora_B.default.weight"]
        want = original[f"{name}.weight"].float() + layer.scaling["default"] * (bb.float() @ a.float())
        assert torch.equal(merged[f"{name}.weight"], want), name

    # the same adapters on the dequantised base reproduce the 4-bit model up to fp32 rounding: the merge math
    deq = {k: v.clone() for k, v in merged.items()}
    for name, layer in q.named_modules():  # every 4-bit layer, adapted or not (mlp.c_proj has no adapter)
        if isinstance(layer, linear4bit_class()):
            deq[base_key(f"{name}.weight")] = dequantized(layer)
    for name, layer in lora_layers(q):
        a, bb = sd[f"{name}.lora_A.default.weight"], sd[f"{name}.lora_B.default.weight"]
        deq[f"{name}.weight"] = deq[f"{name}.weight"] + layer.scaling["default"] * (bb @ a)
    m_deq = _plain(7)
    m_deq.load_state_dict(deq)
    torch.testing.assert_close(_logits(m_deq, b), q_logits, atol=2e-4, rtol=1e-4)

    # merged into the original: it differs from the 4-bit + adapter model by exactly the base's NF4 error
    # (the adapter term is identical), so the bound is the plain model's own 4-bit vs fp32 logits gap
    m = _plain(7)
    m.load_state_dict(merged)
    gap = (_logits(m, b) - q_logits).abs().max()
    plain_q = _plain()
    quantize_llm_4bit(plain_q, compute_dtype=torch.float32, device="cpu", double_quant=True)
    nf4_err = (_logits(_plain(), b) - _logits(plain_q, b)).abs().max()
    assert 0 < nf4_err < 0.5  # NF4 is lossy, and not broken
    assert gap <= 1.5 * nf4_err, (float(gap), float(nf4_err))
    print(f"Q-LoRA merged vs 4-bit+adapter max |logit delta| {gap:.4f}; NF4 base error alone {nf4_err:.4f}")


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    """A Q-LoRA single-engine checkpoint (no 4-bit base in it) restored into a freshly built model continues
    bitwise: the rebuilt base quantises to the same bytes and the adapters and Adam state come back."""
    from safetensors.torch import load_file

    cfg = load_config(["recipe=demo_qlora", *SMALL])
    data = iter(build_train_data(cfg, CPU))
    batches = [next(data) for _ in range(4)]

    def step(eng, batch) -> float:
        out = eng.forward(batch)
        eng.backward(out.loss)
        eng.step()
        return float(out.loss.detach())

    eng = SingleEngine(cfg, build_model(cfg), CPU)
    for b in batches[:2]:
        step(eng, b)
    eng.save(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert not any(t.dtype == torch.uint8 for t in saved.values())  # the packed base is never written
    want = [step(eng, b) for b in batches[2:]]
    again = SingleEngine(cfg, build_model(cfg), CPU)
    again.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(base_4bit_tensors(again.module).values(),
                                                  base_4bit_tensors(eng.module).values()))
    assert [step(again, b) for b in batches[2:]] == want


@pytest.mark.parametrize("qlora", [False, True])
def test_export_final_merged_official_layout_and_peft_adapters(qlora, tmp_path):
    """loop.export_final of a trained (Q-)LoRA run: the merged official-layout export reproduces the adapted
    model (LoRA: fp32, 1e-5; Q-LoRA: within the base's NF4 error, the merge being into the ORIGINAL weights),
    and the adapters alone, put by peft.PeftModel on the full-precision base, reproduce the merged export."""
    from train.export import load_lora_adapters
    from train.loop import export_final
    from train.model.official import export_official, load_official

    torch.manual_seed(1234)
    stage = export_official(QwenVL(CFG), tmp_path / "stage")
    args = [a for a in SMALL if not a.startswith(("init.", "train.export_final"))]
    cfg = load_config(["recipe=demo_qlora", *args, f"lora.qlora={str(qlora).lower()}", f"init.from_stage_dir={stage}",
                       "train.export_final=true", "lora.train_modules=[adapter]"])
    eng = SingleEngine(cfg, build_model(cfg), CPU)
    data = iter(build_train_data(cfg, CPU))
    for _ in range(2):
        eng.backward(eng.forward(next(data)).loss)
        eng.step()
    export_final(cfg, eng, tmp_path, CPU)
    b = _batch()
    adapted = _logits(eng.module.eval(), b)

    def from_dir(path) -> QwenVL:
        m = _plain(99)
        load_official(m, path)
        return m.eval()

    merged = _logits(from_dir(tmp_path / "final"), b)
    base = from_dir(stage)
    if qlora:
        plain_q = from_dir(stage)
        quantize_llm_4bit(plain_q, compute_dtype=torch.float32, device="cpu")
        nf4_err = (_logits(base, b) - _logits(plain_q, b)).abs().max()
        assert (merged - adapted).abs().max() <= 1.5 * nf4_err
    else:
        torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    pm = load_lora_adapters(base, tmp_path / "final_lora")
    torch.testing.assert_close(_logits(pm, b), merged, atol=1e-5, rtol=1e-5)
    assert (merged - _logits(from_dir(stage), b)).abs().max() > 1e-4  # the adapters did change the model
