"""FlopsModel against a hand count on a tiny geometry (full training, frozen ViT, frozen LLM, LoRA, window
attention), causal pair counting, and the peak-FLOP/s resolution (override, GPU table, measured CPU)."""

from __future__ import annotations

import pytest
import torch

from train.flops import FlopsModel, causal_pairs, gpu_table_peak, measure_matmul_peak, mfu, resolve_peak_flops
from train.model.config import AdapterConfig, LLMConfig, QwenVLConfig, VisionConfig

V = 151936  # must exceed the special ids

# Hand count for the geometry of _cfg() (weights only; biases, norms, tables excluded):
# ViT per patch: conv 8*3*14*14 = 4704; one block: in_proj 3*8*8 + out_proj 8*8 + c_fc 16*8 + c_proj 8*16 = 512
VIT_PER_PATCH = 4704 + 512
VIT_ATTN = 4 * 8 * 4**2  # 4 * width * L^2 * layers, L = (28/14)^2 = 4 patches
# Adapter (kv_dim 8, dim 16): kv_proj 8*16 + k,v in_proj 2*16*16 per patch; q in_proj, out_proj, proj per query
AD_PER_PATCH, AD_PER_QUERY = 8 * 16 + 2 * 16 * 16, 3 * 16 * 16
AD_ATTN = 4 * 16 * 4 * 4  # 4 * dim * n_queries * L
# LLM per token: c_attn 48*16 + c_proj 16*16 + w1 32*16 + w2 32*16 + mlp.c_proj 16*32 = 2560; head V*16
LLM_PER_TOKEN, HEAD = 2560, V * 16
LLM_ATTN_PER_PAIR = 4 * 16 * 1  # 4 * hidden * layers
# LoRA r=2 on c_attn (A 2x16, B 48x2), attn.c_proj (2x16, 16x2), w1 and w2 (2x16, 32x2 each)
LORA_PER_TOKEN = (32 + 96) + (32 + 32) + 2 * (32 + 64)

T, TT, P, IMAGES = 100, 60, 1000, 3  # tokens, target tokens, causal pairs, images


def _cfg(**vision) -> QwenVLConfig:
    return QwenVLConfig(
        vision=VisionConfig(image_size=28, width=8, layers=1, heads=2, mlp_width=16, **vision),
        adapter=AdapterConfig(n_queries=4, pos_grid=2, head_dim=8),
        llm=LLMConfig(vocab_size=V, hidden=16, layers=1, heads=2, intermediate=32, max_position=64),
    ).validate()


def _model(cfg: QwenVLConfig):
    from train.model.qwen_vl import QwenVL

    torch.manual_seed(0)
    return QwenVL(cfg)


def _expected(vit: int, ad: int, llm: int, head: int, lora: int = 0, vit_attn: int = VIT_ATTN) -> int:
    """Hand formula: each factor is 2 (forward) + 2 (gradients cross) + 2 (weight trains); attention 1 or 3."""

    def attn(f: int) -> int:  # attention backward runs when gradients cross the module
        return 3 if f > 2 else 1

    per_image = (4 * (vit * VIT_PER_PATCH + ad * AD_PER_PATCH) + 4 * ad * AD_PER_QUERY
                 + attn(vit) * vit_attn + attn(max(ad, vit)) * AD_ATTN)
    return (llm * LLM_PER_TOKEN * T + 6 * lora * T + head * HEAD * TT + 3 * LLM_ATTN_PER_PAIR * P
            + per_image * IMAGES)


def test_full_training_matches_hand_count():
    cfg = _cfg()
    fm = FlopsModel(_model(cfg), cfg)
    assert fm(1, 0, target_tokens=0, attn_pairs=1) == 6 * 2560 + 3 * 64 == 15552  # one token, no head
    assert fm(T, IMAGES, target_tokens=TT, attn_pairs=P) == _expected(6, 6, 6, 6)
    assert fm(T, 0) == 6 * LLM_PER_TOKEN * T + 6 * HEAD * T  # defaults: every token a target, no attention


def test_frozen_vit_and_frozen_llm():
    cfg = _cfg()
    model = _model(cfg)
    for p in model.visual.parameters():
        p.requires_grad_(False)
    assert FlopsModel(model, cfg)(T, IMAGES, TT, P) == _expected(2, 6, 6, 6)  # stage-3 like: ViT forward only
    model = _model(cfg)
    for p in model.llm.parameters():
        p.requires_grad_(False)
    # stage-1 like: the frozen LLM (head included) still carries activation gradients back to the adapter
    assert FlopsModel(model, cfg)(T, IMAGES, TT, P) == _expected(6, 6, 4, 4)


def test_lora_base_is_4n_and_adapters_6n():
    pytest.importorskip("peft")
    from train.lora import apply_lora

    cfg = _cfg()
    model = apply_lora(_model(cfg), r=2, alpha=4, dropout=0.0)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LORA_PER_TOKEN
    # ViT and adapter frozen with nothing before them training: forward only
    assert FlopsModel(model, cfg)(T, IMAGES, TT, P) == _expected(2, 2, 4, 4, lora=LORA_PER_TOKEN)


def test_window_attention_counts_window_pairs():
    cfg = _cfg(window_size=1)  # 2x2 grid in 1x1 windows: each patch attends to itself only
    fm = FlopsModel(_model(cfg), cfg)
    assert fm(T, IMAGES, TT, P) == _expected(6, 6, 6, 6, vit_attn=4 * 8 * 4)


def test_causal_pairs_per_document():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 0, 0]])
    assert causal_pairs(seg).item() == 3 * 4 / 2 + 2 * 3 / 2 + 4 * 5 / 2  # 19
    assert causal_pairs(torch.ones(1, 7, dtype=torch.long)).item() == 28
    assert causal_pairs(torch.zeros(2, 5, dtype=torch.long)).item() == 0


def test_peak_override_table_and_measured():
    assert resolve_peak_flops("cpu", "bf16", 123e12) == 123e12
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="logging.peak_flops"):
            resolve_peak_flops("cpu", "bf16", bad)
    with pytest.raises(ValueError, match="dtype"):
        resolve_peak_flops("cpu", "int8", None)
    assert gpu_table_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert gpu_table_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_table_peak("NVIDIA H200", "bf16") == 989e12
    assert gpu_table_peak("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156e12
    assert gpu_table_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert gpu_table_peak("Tesla T4", "bf16") is None
    measure_matmul_peak.cache_clear()
    peak = resolve_peak_flops("cpu", torch.float32, None)
    assert peak > 1e8 and resolve_peak_flops(torch.device("cpu"), "fp32", None) == peak
    info = measure_matmul_peak.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # measured once, then cached
    assert mfu(peak, 1.0, peak, 1) == pytest.approx(1.0) and mfu(1.0, 0.0, peak, 1) == 0.0
