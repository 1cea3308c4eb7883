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
    with pytest.raises(LoraError, match="not a valid regex"):
        apply_lora(_model(), targets=["visual.transformer.resblocks.(.mlp.c_fc"])
    with pytest.raises(LoraError, match="modules_to_save: unknown"):
        apply_lora(_model(), modules_to_save=["llm.nonexistent"])
    # every engine and device runs Q-LoRA now (bitsandbytes has CPU kernels; ZeRO-3 keeps the 4-bit base whole)
    for qlora, stage, device in ((True, 3, "cpu"), (True, 2, "cpu"), (False, 3, "cpu"), (True, 3, "cuda")):
        check_engine(qlora, stage, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Q-LoRA's 4-bit base needs CUDA + bitsandbytes")
def test_qlora_4bit_base_on_gpu() -> None:
    pytest.importorskip("bitsandbytes")
    original = _model().state_dict()
    m = _model().cuda()
    n = quantize_llm_4bit(m, compute_dtype=torch.bfloat16, device="cuda")
    assert n == 5 * CFG.llm.layers
    apply_lora(m, r=4, alpha=8, dropout=0.0)
    _perturb_adapters(m)
    merged = merged_state_dict(m, base=original)
    assert merged["llm.h.0.mlp.w1.weight"].dtype == original["llm.h.0.mlp.w1.weight"].dtype


def _lora_cfg(**lora):
    from omegaconf import OmegaConf

    lo = {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"],
          "train_modules": [], "modules_to_save": [], "qlora": False, "rslora": False, "dora": False, **lora}
    return OmegaConf.create({"lora": lo, "init": {"from_stage_dir": "/base", "official": None}})


def test_peft_layout_export_loads_with_peft_model(tmp_path):
    from peft import PeftModel

    from train.export import load_lora_adapters, save_lora_adapters

    cfg = _lora_cfg(train_modules=["adapter"], modules_to_save=["llm.lm_head"])
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.0, train_modules=["adapter"], modules_to_save=["llm.lm_head"])
    _perturb_adapters(m)
    with torch.no_grad():  # the fully trained modules moved too
        m.adapter.query.add_(0.1)
        m.llm.lm_head.weight.mul_(1.5)
    b = _batch()
    want = _logits(m, b)
    dest = save_lora_adapters(m.state_dict(), tmp_path / "final_lora", cfg)
    from safetensors.torch import load_file

    keys = set(load_file(str(dest / "adapter_model.safetensors")))
    assert all(k.startswith("base_model.model.") and ".default" not in k for k in keys)
    assert len([k for k in keys if ".lora_" in k]) == 2 * 4 * CFG.llm.layers
    assert "base_model.model.adapter.query" in keys and "base_model.model.llm.lm_head.weight" in keys
    assert not any(k.startswith("base_model.model.visual.") or "base_layer" in k for k in keys)
    pm = load_lora_adapters(_model(), dest)  # a fresh model with the base weights + the saved adapters
    assert isinstance(pm, PeftModel)
    torch.testing.assert_close(_logits(pm, b), want, atol=1e-5, rtol=1e-5)
    assert (_logits(pm, b) - _logits(_model(), b)).abs().max() > 1e-3  # the adapters are really applied


@pytest.mark.parametrize("rslora,dora", [(True, False), (False, True)])
def test_rslora_and_dora_merge_parity(rslora, dora, tmp_path):
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.0, rslora=rslora, dora=dora)
    scales = {layer.scaling["default"] for _, layer in lora_layers(m)}
    assert scales == {8 / 4 ** 0.5 if rslora else 8 / 4}
    _perturb_adapters(m)
    if dora:  # trained magnitudes
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1.1)
    b = _batch()
    fresh = _model(seed=5)
    fresh.load_state_dict(merged_state_dict(m))
    torch.testing.assert_close(_logits(fresh, b), _logits(m, b), atol=1e-5, rtol=1e-5)
    from train.export import load_lora_adapters, save_lora_adapters

    dest = save_lora_adapters(m.state_dict(), tmp_path / "a", _lora_cfg(rslora=rslora, dora=dora))
    torch.testing.assert_close(_logits(load_lora_adapters(_model(), dest), b), _logits(m, b), atol=1e-6, rtol=1e-6)


def test_targets_on_the_vit_and_the_adapter_and_embeddings_trained():
    vit = r"visual\.transformer\.resblocks\.\d+\.mlp\.c_fc"
    m = apply_lora(_model(), r=4, alpha=8, dropout=0.0, targets=["attn.c_attn", vit, "adapter.kv_proj"],
                   modules_to_save=["llm.wte", "llm.lm_head"])
    names = {n for n, _ in lora_layers(m)}
    assert names == {f"llm.h.{i}.attn.c_attn" for i in range(CFG.llm.layers)} | {
        f"visual.transformer.resblocks.{i}.mlp.c_fc" for i in range(CFG.vision.layers)} | {"adapter.kv_proj"}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".lora_" not in n} == {"llm.wte.weight", "llm.lm_head.weight"}
    _perturb_adapters(m)
    b = _batch()
    fresh = _model(seed=5)
    fresh.load_state_dict(merged_state_dict(m))
    torch.testing.assert_close(_logits(fresh, b), _logits(m, b), atol=1e-5, rtol=1e-5)
    with pytest.raises(LoraError, match="MultiheadAttention out_proj"):
        apply_lora(_model(), targets=[r"visual\.transformer\.resblocks\.\d+\.attn\.out_proj"])
