"""Adapter tests: explicit per-head reference, sin-cos table layout, key-grid resize, names, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.pos_embed import get_2d_sincos_pos_embed

from train.model.adapter import Adapter, sincos_2d
from train.model.config import AdapterConfig, micro

KV, DIM = 32, 64
CFG = AdapterConfig(head_dim=16)  # 4 heads of 16


def _adapter(seed: int = 0, cfg: AdapterConfig = CFG, kv: int = KV, dim: int = DIM) -> Adapter:
    torch.manual_seed(seed)
    a = Adapter(cfg, kv, dim).eval()
    with torch.no_grad():  # non-trivial norms and biases so a misplaced weight shows up
        for n, p in a.named_parameters():
            if n.startswith("ln_") and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(std=0.1)
    return a


def _bicubic(table: torch.Tensor, g_new: int) -> torch.Tensor:
    g = math.isqrt(table.shape[0])
    img = table.float().t().reshape(1, -1, g, g)
    return F.interpolate(img, size=(g_new, g_new), mode="bicubic", align_corners=False)[0].flatten(1).t()


def _reference(a: Adapter, x: torch.Tensor) -> torch.Tensor:
    """Plain re-derivation: LNs by formula, in_proj split by hand, per-head softmax(QK^T/sqrt(d))V."""

    def ln(t, mod):
        mu = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias

    dim, nh = a.dim, a.attn.num_heads
    hd = dim // nh
    g = math.isqrt(x.shape[1])
    kv = ln(x @ a.kv_proj.weight.t(), a.ln_kv)
    q_in = ln(a.query, a.ln_q) + a.pos_embed
    k_in = kv + _bicubic(a.pos_embed, g)
    wq, wk, wv = a.attn.in_proj_weight[:dim], a.attn.in_proj_weight[dim:2 * dim], a.attn.in_proj_weight[2 * dim:]
    bq, bk, bv = a.attn.in_proj_bias[:dim], a.attn.in_proj_bias[dim:2 * dim], a.attn.in_proj_bias[2 * dim:]
    q = q_in @ wq.t() + bq  # [Q, dim]
    k = k_in @ wk.t() + bk  # [N, L, dim]
    v = kv @ wv.t() + bv
    outs = []
    for h in range(nh):
        s = slice(h * hd, (h + 1) * hd)
        att = torch.softmax(torch.einsum("qd,nld->nql", q[:, s], k[..., s]) / math.sqrt(hd), dim=-1)
        outs.append(torch.einsum("nql,nld->nqd", att, v[..., s]))
    o = torch.cat(outs, -1) @ a.attn.out_proj.weight.t() + a.attn.out_proj.bias
    return ln(o, a.ln_post) @ a.proj


@pytest.mark.parametrize("grid", [16, 32, 4])
def test_adapter_matches_plain_reference(grid):
    a = _adapter()
    x = torch.randn(2, grid * grid, KV, generator=torch.Generator().manual_seed(grid))
    with torch.no_grad():
        got = a(x)
        ref = _reference(a, x)
    assert got.shape == (2, 256, DIM)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_values_get_no_position():
    """With a single key token the softmax weight is 1 whatever q and k are, so the output is
    out_proj(v): changing the position table must not change it unless values carry position."""
    a = _adapter()
    x = torch.randn(1, 1, KV)
    with torch.no_grad():
        y0 = a(x)
        a.pos_embed.add_(torch.randn_like(a.pos_embed))
        y1 = a(x)
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)


def test_sincos_table_direct_formula():
    dim, g = 32, 16
    t = sincos_2d(dim, g)
    assert t.shape == (g * g, dim) and t.dtype == torch.float32
    q = dim // 4
    expect = torch.zeros(g * g, dim, dtype=torch.float64)
    for r in range(g):  # row = h
        for c in range(g):  # column = w
            for k in range(q):
                w = 10000.0 ** (-k / q)
                expect[r * g + c, k] = math.sin(c * w)  # first half: w (column) index
                expect[r * g + c, q + k] = math.cos(c * w)
                expect[r * g + c, 2 * q + k] = math.sin(r * w)  # second half: h (row) index
                expect[r * g + c, 3 * q + k] = math.cos(r * w)
    torch.testing.assert_close(t.double(), expect, rtol=0, atol=2e-6)
    # same table as the MAE/open_clip helper that the official Qwen-VL code copied
    torch.testing.assert_close(t.double(), torch.from_numpy(get_2d_sincos_pos_embed(dim, g)), rtol=0, atol=2e-6)
    # the first dim/2 dims are constant along a column, the last dim/2 constant along a row
    grid = t.reshape(g, g, dim)
    assert torch.equal(grid[:, :, : dim // 2], grid[:1, :, : dim // 2].expand(g, g, dim // 2))
    assert torch.equal(grid[:, :, dim // 2:], grid[:, :1, dim // 2:].expand(g, g, dim // 2))
    with pytest.raises(ValueError):
        sincos_2d(30, 4)


def test_parameters_names_frozen_pos_and_init():
    a = Adapter(CFG, KV, DIM)
    shapes = {n: tuple(p.shape) for n, p in a.state_dict().items()}
    assert shapes == {
        "query": (256, DIM), "pos_embed": (256, DIM), "proj": (DIM, DIM), "kv_proj.weight": (DIM, KV),
        "attn.in_proj_weight": (3 * DIM, DIM), "attn.in_proj_bias": (3 * DIM,),
        "attn.out_proj.weight": (DIM, DIM), "attn.out_proj.bias": (DIM,),
        "ln_q.weight": (DIM,), "ln_q.bias": (DIM,), "ln_kv.weight": (DIM,), "ln_kv.bias": (DIM,),
        "ln_post.weight": (DIM,), "ln_post.bias": (DIM,),
    }
    assert not a.pos_embed.requires_grad
    assert a.attn.num_heads == DIM // CFG.head_dim and a.ln_q.eps == CFG.ln_eps
    torch.testing.assert_close(a.pos_embed.data, sincos_2d(DIM, 16))
    # trunc_normal_(std=.02) as in the official code (torch's cut-off is +-2 absolute, i.e. inactive)
    assert abs(a.query.std().item() - 0.02) < 0.002 and abs(a.kv_proj.weight.std().item() - 0.02) < 0.003
    assert abs(a.proj.std().item() - DIM**-0.5) < 0.1 * DIM**-0.5
    assert torch.equal(a.ln_post.weight, torch.ones(DIM)) and torch.equal(a.attn.out_proj.bias, torch.zeros(DIM))
    # stored (e.g. bf16-rounded) pos_embed values load from checkpoints and are used as-is
    sd = a.state_dict()
    sd["pos_embed"] = sd["pos_embed"].bfloat16().float()
    b = Adapter(CFG, KV, DIM)
    b.load_state_dict(sd)
    assert torch.equal(b.pos_embed, sd["pos_embed"]) and not b.pos_embed.requires_grad
    # an equal kv_dim still gets a real projection (official checkpoints always carry kv_proj)
    assert isinstance(Adapter(CFG, DIM, DIM).kv_proj, torch.nn.Linear)


def test_full_size_geometry_and_bad_input():
    with torch.device("meta"):
        big = Adapter(AdapterConfig(), 1664, 4096)
    assert big.attn.num_heads == 32 and big.kv_proj.weight.shape == (4096, 1664)
    a = _adapter()
    with pytest.raises(ValueError, match="square"):
        a(torch.zeros(1, 10, KV))
    with pytest.raises(ValueError, match="adapter input"):
        a(torch.zeros(1, 16, KV + 1))
    with pytest.raises(ValueError, match="head_dim"):
        Adapter(AdapterConfig(head_dim=24), KV, DIM)


def test_micro_config_and_gradients():
    cfg = micro()
    a = Adapter(cfg.adapter, cfg.vision.width, cfg.llm.hidden)
    x = torch.randn(2, cfg.vision.grid**2, cfg.vision.width, requires_grad=True)
    y = a(x)
    assert y.shape == (2, 256, cfg.llm.hidden)
    y.square().mean().backward()
    assert a.pos_embed.grad is None and x.grad is not None
    assert all(p.grad is not None for n, p in a.named_parameters() if p.requires_grad)
