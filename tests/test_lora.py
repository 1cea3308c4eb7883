"""LoRA / Q-LoRA: injection targets, trainable set, merge parity (incl. merging into external fp weights)."""

from __future__ import annotations

import pytest
import torch

from train.lora import (
    LoraError,
    apply_lora,
    check_engine,
    lora_layers,
    lora_state_dict,
    merge_lora_state,
    merged_state_dict,
    quantize_llm_4bit,
)
from train.model.config import get_config
from train.model.qwen_vl import QwenVL

CFG = get_config("tiny")


def _model(seed: int = 0) -> QwenVL:
    torch.manual_seed(seed)
    return QwenVL(CFG).eval()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    q = CFG.adapter.n_queries
    ids = torch.randint(0, 1000, (2, q + 40), generator=g)
    ids[0, 3] = CFG.ids.img_start
    ids[0, 4 + q] = CFG.ids.img_end
    px = torch.randn(1, 3, CFG.vision.image_size, CFG.vision.image_size, generator=g)
    return {"input_ids": ids, "pixel_values": px}


def _logits(m: QwenVL, b: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return m(b["input_ids"], pixel_values=b["pixel_values"]).logits


def _perturb_adapters(m: torch.nn.Module) -> None:
    # fresh LoRA B matrices are zero (no effect): give them values as training would
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_targets_and_trainable_set() -> None:
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.0)
    names = [n for n, _ in lora_layers(m)]
    n_layers = CFG.llm.layers
    assert len(names) == 4 * n_layers
    assert all(n.startswith("llm.h.") for n in names)
    assert {n.split(".", 3)[3] for n in names} == {"attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"}
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    m2 = apply_lora(_model(), r=4, alpha=8, dropout=0.0, train_modules=["adapter"])
    extra = {n for n, p in m2.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert extra == {n for n, p in _model().adapter.named_parameters(prefix="adapter") if p.requires_grad}
    assert "adapter.query" in extra and "adapter.pos_embed" not in extra  # the fixed sin-cos table stays fixed


def test_fresh_adapters_change_nothing_and_merge_matches() -> None:
    b = _batch()
    base = _model()
    ref = _logits(base, b)
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.0)
    torch.testing.assert_close(_logits(m, b), ref, atol=0, rtol=0)
    _perturb_adapters(m)
    lora_out = _logits(m, b)
    assert (lora_out - ref).abs().max() > 1e-3
    merged = merged_state_dict(m)
    assert not any(".lora_" in k or "base_layer" in k for k in merged)
    assert set(merged) == set(base.state_dict())
    fresh = _model(seed=123)
    fresh.load_state_dict(merged)
    torch.testing.assert_close(_logits(fresh, b), lora_out, atol=1e-5, rtol=1e-5)


def test_merge_equals_naive_formula() -> None:
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.0)
    _perturb_adapters(m)
    sd = m.state_dict()
    key = "llm.h.0.mlp.w2"
    a, bmat = sd[f"{key}.lora_A.default.weight"], sd[f"{key}.lora_B.default.weight"]
    expect = sd[f"{key}.base_layer.weight"] + (8 / 4) * (bmat @ a)
    torch.testing.assert_close(merged_state_dict(m)[f"{key}.weight"], expect)


def test_merge_into_external_full_precision_base() -> None:
    # the Q-LoRA path: the state holds the adapted base weights in packed 4-bit form; the merge must take the
    # original full-precision weights for those (and only those) and add the adapters' deltas to them
    original = _model().state_dict()
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.0)
    _perturb_adapters(m)
    state = m.state_dict()
    key = "llm.h.1.attn.c_attn"
    packed = f"{key}.base_layer.weight"
    state[packed] = torch.zeros(state[packed].numel() // 2, 1, dtype=torch.uint8)  # stand-in for NF4 storage
    expected = {k: t.shape for k, t in original.items()}
    merged = merge_lora_state(state, 8 / 4, expected, base=original)
    a, b = state[f"{key}.lora_A.default.weight"], state[f"{key}.lora_B.default.weight"]
    torch.testing.assert_close(merged[f"{key}.weight"], original[f"{key}.weight"] + 2.0 * (b @ a))
    torch.testing.assert_close(merged_state_dict(m)[f"{key}.weight"], merged[f"{key}.weight"])
    with pytest.raises(LoraError, match=f"{key}.weight: the state holds a torch.uint8"):
        merge_lora_state(state, 2.0, expected)  # no full-precision base to merge into


def test_adapter_state_dict_is_small_and_round_trips() -> None:
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.0)
    _perturb_adapters(m)
    sd = lora_state_dict(m)
    total = sum(p.numel() for p in m.parameters())
    assert 0 < sum(t.numel() for t in sd.values()) < 0.2 * total
    m2 = apply_lora(_model(), r=4, alpha=8, dropout=0.0)
    missing, unexpected = m2.load_state_dict(sd, strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)
    b = _batch()
    torch.testing.assert_close(_logits(m2, b), _logits(m, b), atol=0, rtol=0)


def test_bad_settings_are_named() -> None:
    with pytest.raises(LoraError, match="lora.r"):
        apply_lora(_model(), r=0)
    with pytest.raises(LoraError, match="train_modules"):
        apply_lora(_model(), train_modules=["vision_tower"])
    with pytest.raises(LoraError, match="matched no linear"):
        apply_lora(_model(), targets=["mlp.nonexistent"])
    with pytest.raises(LoraError, match="zero_stage=3"):
        check_engine(True, 3, "cuda")
    with pytest.raises(LoraError, match="CUDA"):
        check_engine(True, 2, "cpu")
    check_engine(False, 3, "cpu")
    check_engine(True, 2, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Q-LoRA's 4-bit base needs CUDA + bitsandbytes")
def test_qlora_4bit_base_on_gpu() -> None:
    pytest.importorskip("bitsandbytes")
    original = _model().state_dict()
    m = _model().cuda()
    n = quantize_llm_4bit(m)
    assert n == 4 * CFG.llm.layers
    apply_lora(m, r=4, alpha=8, dropout=0.0)
    _perturb_adapters(m)
    merged = merged_state_dict(m, base=original)
    assert merged["llm.h.0.mlp.w1.weight"].dtype == original["llm.h.0.mlp.w1.weight"].dtype
