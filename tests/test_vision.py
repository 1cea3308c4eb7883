"""Vision tower tests: parity with open_clip's VisionTransformer, positional resize, drop path,
window attention, activation checkpointing, parameter names and geometry."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, ResidualAttentionBlock, VisionTransformer
from torch import nn

from train.model.adapter import Adapter
from train.model.config import VisionConfig, micro
from train.model.vision import VisionTower, drop_path, resize_pos_table

# 4x4 patch grid at 56 px; pos table stored for the same grid unless a test changes it.
CFG = replace(micro().vision, pos_grid=4)


def _tower(cfg: VisionConfig = CFG, seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    m = VisionTower(cfg)
    with torch.no_grad():  # non-trivial norms/biases so a misplaced weight shows up
        for n, p in m.named_parameters():
            if "ln" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(std=0.1)
    return m


def _pixels(cfg: VisionConfig = CFG, n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)


def _bicubic(table: torch.Tensor, g_new: int) -> torch.Tensor:
    g = math.isqrt(table.shape[0])
    img = table.float().t().reshape(1, -1, g, g)
    out = F.interpolate(img, size=(g_new, g_new), mode="bicubic", align_corners=False)
    return out.reshape(table.shape[1], -1).t().to(table.dtype)


def test_parameter_names_and_bigg_geometry():
    names = set(VisionTower(CFG).state_dict())
    expect = {"conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias"}
    for i in range(CFG.layers):
        b = f"transformer.resblocks.{i}."
        expect |= {b + s for s in (
            "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
            "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
            "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}
    assert names == expect
    with torch.device("meta"):
        big = VisionTower(VisionConfig())
        # open_clip's own block at bigG geometry: the same parameter names and shapes
        ref = ResidualAttentionBlock(1664, 16, mlp_ratio=(8192 + 0.5) / 1664, norm_layer=partial(LayerNorm, eps=1e-6))
    blk = big.transformer.resblocks[0]
    assert {k: v.shape for k, v in blk.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert big.positional_embedding.shape == (256, 1664)
    assert big.conv1.weight.shape == (1664, 3, 14, 14) and big.conv1.bias is None
    assert blk.mlp.c_fc.weight.shape == (8192, 1664) and blk.attn.num_heads == 16
    assert isinstance(blk.mlp.gelu, nn.GELU) and blk.mlp.gelu.approximate == "none"
    assert blk.ln_1.eps == 1e-6 and big.ln_pre.eps == 1e-6
    n = sum(p.numel() for p in big.parameters())
    assert abs(n / 1e9 - 1.84) < 0.01, n


def test_parity_with_open_clip_vision_transformer():
    """Reference = open_clip's VisionTransformer code path (its _embeds + its Transformer) with the same
    weights. It always adds a class token; an attention mask stops patch tokens from attending to it,
    which makes its patch-token outputs exactly those of a class-token-free ViT."""
    ours = _tower().eval()
    torch.manual_seed(5)
    ref = VisionTransformer(
        image_size=CFG.image_size, patch_size=CFG.patch_size, width=CFG.width, layers=CFG.layers,
        heads=CFG.heads, mlp_ratio=CFG.mlp_width / CFG.width, act_layer=nn.GELU,
        norm_layer=partial(LayerNorm, eps=CFG.ln_eps), output_dim=CFG.width,
    ).eval()
    sd = {k: v for k, v in ours.state_dict().items() if k != "positional_embedding"}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == {"class_embedding", "positional_embedding", "ln_post.weight",
                                               "ln_post.bias", "proj"}
    with torch.no_grad():
        ref.positional_embedding[1:] = ours.positional_embedding
    px = _pixels()
    length = CFG.grid**2 + 1
    mask = torch.zeros(length, length)
    mask[1:, 0] = float("-inf")
    with torch.no_grad():
        expect = ref.transformer(ref._embeds(px), attn_mask=mask)[:, 1:]
        got = ours(px)
    assert got.shape == (2, CFG.grid**2, CFG.width)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # and the mask matters: without it the class token changes the patch tokens
    with torch.no_grad():
        unmasked = ref.transformer(ref._embeds(px))[:, 1:]
    assert (unmasked - expect).abs().max() > 1e-3


def test_pos_resize_matches_bicubic_and_identity():
    torch.manual_seed(0)
    table = torch.randn(256, 24)
    torch.testing.assert_close(resize_pos_table(table, 32), _bicubic(table, 32), rtol=0, atol=0)
    assert resize_pos_table(table, 16) is table
    bf = table.bfloat16()
    out = resize_pos_table(bf, 32)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _bicubic(bf.float(), 32).bfloat16(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="square"):
        resize_pos_table(torch.zeros(10, 4), 4)


def test_tower_interpolates_pos_224_to_448():
    """Stored 16x16 table, 448 px input (32x32 grid): ln_pre sees conv1 patches + bicubic table."""
    cfg = VisionConfig(image_size=448, width=16, layers=1, heads=2, mlp_width=32, pos_grid=16)
    m = _tower(cfg).eval()
    seen = {}
    m.ln_pre.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0]))
    px = _pixels(cfg, n=1)
    with torch.no_grad():
        out = m(px)
        patches = F.conv2d(px, m.conv1.weight, stride=14).flatten(2).transpose(1, 2)
        expect = patches + _bicubic(m.positional_embedding, 32)
    assert out.shape == (1, 1024, 16)
    torch.testing.assert_close(seen["x"], expect, rtol=1e-6, atol=1e-6)


def test_drop_path_eval_equal_train_differs():
    base = _tower().eval()
    dp = VisionTower(replace(CFG, drop_path=0.5))
    dp.load_state_dict(base.state_dict())
    rates = [b.drop_path_rate for b in dp.transformer.resblocks]
    assert rates == pytest.approx([0.0, 0.5])  # linear in depth, first block never dropped
    px = _pixels()
    dp.eval()
    with torch.no_grad():
        a, b, ref = dp(px), dp(px), base(px)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    dp.train()
    torch.manual_seed(0)
    outs = [dp(px) for _ in range(4)]
    assert any((o - ref).abs().max() > 1e-4 for o in outs)
    assert any((o - outs[0]).abs().max() > 1e-4 for o in outs[1:])


def test_drop_path_function_per_sample():
    x = torch.ones(4000, 3, 2)
    torch.manual_seed(0)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.reshape(4000, -1)
    # each sample is either dropped entirely or kept and rescaled by 1/(1-p)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert drop_path(x, 0.25, training=False) is x


def _manual_attention(mha: nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    d = h.shape[-1]
    nh = mha.num_heads
    hd = d // nh
    wq, wk, wv = mha.in_proj_weight.split(d)
    bq, bk, bv = mha.in_proj_bias.split(d)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], nh, hd).transpose(1, 2)

    q, k, v = heads(h @ wq.t() + bq), heads(h @ wk.t() + bk), heads(h @ wv.t() + bv)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    o = (p @ v).transpose(1, 2).reshape(h.shape)
    return o @ mha.out_proj.weight.t() + mha.out_proj.bias


def _naive_windowed(m: VisionTower, px: torch.Tensor, ws: int) -> torch.Tensor:
    """Reference: each block's attention computed separately on the real tokens of every window."""
    x = m.conv1(px).flatten(2).transpose(1, 2)
    g = math.isqrt(x.shape[1])
    x = m.ln_pre(x + resize_pos_table(m.positional_embedding, g))
    for blk in m.transformer.resblocks:
        h = blk.ln_1(x)
        a = torch.zeros_like(h)
        for r0 in range(0, g, ws):
            for c0 in range(0, g, ws):
                idx = [r * g + c for r in range(r0, min(r0 + ws, g)) for c in range(c0, min(c0 + ws, g))]
                a[:, idx] = _manual_attention(blk.attn, h[:, idx])
        x = x + a
        x = x + blk.mlp(blk.ln_2(x))
    return x


@pytest.mark.parametrize("ws", [2, 3])
def test_window_attention_matches_naive_reference(ws):
    cfg = replace(CFG, image_size=70, pos_grid=5)  # 5x5 grid: windows of 2 or 3 need padding
    glob = _tower(cfg).eval()
    win = VisionTower(replace(cfg, window_size=ws)).eval()
    win.load_state_dict(glob.state_dict())
    px = _pixels(cfg)
    with torch.no_grad():
        got, g_out, ref = win(px), glob(px), _naive_windowed(win, px, ws)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - g_out).abs().max() > 1e-3  # the option really changes the output
    # also in training mode with autograd on (torch's MHA takes a different path there)
    win.train()
    torch.testing.assert_close(win(px), ref, rtol=1e-5, atol=1e-5)


def test_window_covering_grid_equals_global():
    glob = _tower().eval()
    win = VisionTower(replace(CFG, window_size=CFG.grid)).eval()
    win.load_state_dict(glob.state_dict())
    px = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(win(px), glob(px), rtol=1e-5, atol=1e-5)


def _grads(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_checkpointing_same_outputs_and_grads():
    cfg = replace(CFG, drop_path=0.3)  # RNG must be replayed identically in the recompute
    plain = _tower(cfg).train()
    ck = VisionTower(replace(cfg, grad_checkpointing=True)).train()
    ck.load_state_dict(plain.state_dict())
    px = _pixels()
    outs, grads = [], []
    for m in (plain, ck):
        torch.manual_seed(3)
        y = m(px)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outs.append(y.detach())
        grads.append(_grads(m))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys() and "conv1.weight" in grads[1]  # pixels need no grad
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-6, atol=1e-7)
    # method toggle works as well
    plain.set_grad_checkpointing(True)
    assert plain.transformer.grad_checkpointing


def test_checkpointing_with_frozen_embeddings_trains_blocks():
    """Partly frozen tower (embeddings frozen, blocks trainable): block inputs need no grad, which
    silently drops every block gradient with reentrant checkpointing."""
    m = VisionTower(replace(CFG, grad_checkpointing=True)).train()
    for mod in (m.conv1, m.ln_pre):
        mod.requires_grad_(False)
    m.positional_embedding.requires_grad_(False)
    m(_pixels()).square().mean().backward()
    for n, p in m.transformer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_frozen_tower_with_checkpointing_trains_adapter():
    cfg = micro()
    tower = VisionTower(replace(cfg.vision, grad_checkpointing=True)).train()
    tower.requires_grad_(False)
    adapter = Adapter(cfg.adapter, cfg.vision.width, cfg.llm.hidden)
    out = adapter(tower(_pixels(cfg.vision)))
    out.square().mean().backward()
    assert all(p.grad is None for p in tower.parameters())
    for n, p in adapter.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_dtype_follows_module_and_bad_input():
    m = _tower().to(torch.bfloat16).eval()
    with torch.no_grad():
        y = m(_pixels())  # fp32 pixels into a bf16 tower
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    with pytest.raises(ValueError, match="square"):
        m(torch.zeros(1, 3, 56, 42))
    with pytest.raises(ValueError, match="multiple of patch"):
        m(torch.zeros(1, 3, 50, 50))


def test_lr_layer_ids():
    m = VisionTower(CFG)
    ids = {n: m.lr_layer_id(n) for n, _ in m.named_parameters()}
    assert ids["conv1.weight"] == 0 and ids["positional_embedding"] == 0 and ids["ln_pre.bias"] == 0
    assert ids["transformer.resblocks.1.mlp.c_fc.weight"] == 2
