"""Packed-row attention without dense masks: parity with the dense reference, no [T,T] allocation,
path selection by the compute dtype, and which path ran (train/model/attention.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from train.model import attention as A
from train.model.config import LLMConfig, micro
from train.model.llm import QwenLM
from train.model.vision import VisionTower


def _seg(*rows: list[int]) -> torch.Tensor:
    """Rows of segment run lengths; a (0, n) entry is padding. Rows are padded to one length with 0."""
    out = []
    for row in rows:
        ids = []
        k = 0
        for n in row:
            if isinstance(n, tuple):
                ids += [0] * n[1]
            else:
                k += 1
                ids += [k] * n
        out.append(ids)
    T = max(len(r) for r in out)
    return torch.tensor([r + [0] * (T - len(r)) for r in out])


LAYOUTS = {
    "pad_and_len1": _seg([40, 1, 20, (0, 3)]),
    "two_rows_one_whole": _seg([9, 6, (0, 3)], [18]),
    "many_tiny_grouped": _seg([1, 2, 3, 1, 5, 1, 1, 7, 2, (0, 4)]),
    "long_runs_past_chunk": _seg([A.DOC_CHUNK + 44, 1, 60, 7, (0, 5)], [3, A.DOC_CHUNK + 100, 1, 13]),
    "all_padding_row": _seg([(0, 30)], [12, 18]),
}


def _dense_plan(seg: torch.Tensor) -> A.AttentionPlan:
    T = seg.shape[1]
    return A.AttentionPlan("sdpa_dense", mask=A.build_attention_mask(seg, seg, T, T, seg.device))


def _qkv(seg: torch.Tensor, heads: int = 2, d: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, T = seg.shape
    return [torch.randn(B, heads, T, d, generator=g).requires_grad_() for _ in range(3)]


def _fwd_bwd(plan: A.AttentionPlan, qkv: list[torch.Tensor], up: torch.Tensor):
    for t in qkv:
        t.grad = None
    out = A.attend(*qkv, plan)
    (out * up).sum().backward()
    return out.detach(), [t.grad.clone() for t in qkv]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_docs_path_equals_dense_reference_values_and_grads(name):
    seg = LAYOUTS[name]
    qkv = _qkv(seg)
    up = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(1))
    ref, ref_g = _fwd_bwd(_dense_plan(seg), qkv, up)
    x = torch.zeros(*seg.shape, 4)
    plan = A.plan_attention(seg, "sdpa_docs", x)
    got, got_g = _fwd_bwd(plan, qkv, up)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The layouts are packed (several runs in some row), so the docs path itself ran, not the causal one.
    assert plan.path == "sdpa_docs"
    if name == "many_tiny_grouped":  # short runs share chunks with a small mask instead of one call each
        assert any(m is not None for _, _, m in plan.chunks[0])


def test_reference_differs_from_plain_causal():
    """The layouts really constrain attention: plain causal attention gives other values (tests can fail)."""
    seg = LAYOUTS["pad_and_len1"]
    qkv = _qkv(seg)
    ref = A.attend(*qkv, _dense_plan(seg))
    causal = A.attend(*qkv, A.AttentionPlan("sdpa_causal"))
    assert (ref - causal).abs().max() > 1e-2


def test_model_docs_path_equals_dense_values_and_param_grads():
    cfg = LLMConfig(vocab_size=97, hidden=32, layers=2, heads=2, intermediate=48)
    seg = _seg([11, 1, 30, (0, 6)], [4, 44])
    ids = torch.randint(0, 97, seg.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for impl in ("sdpa_dense", "sdpa_docs"):
        torch.manual_seed(0)
        m = QwenLM(LLMConfig(**{**cfg.__dict__, "attn_impl": impl})).train()
        h = m(m.embed(ids), segment_ids=seg)
        assert A.last_path == impl
        F.cross_entropy(m.logits(h).flatten(0, 1), ids.flatten()).backward()
        results.append((h.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (h0, g0), (h1, g1) = results
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)


def _largest_allocation(fn, trace_path) -> tuple[int, int]:
    """(largest single CPU allocation, peak growth of allocated bytes) while fn runs, from the profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace_path))
    mem = [e["args"] for e in json.loads(trace_path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    assert mem, "profiler recorded no allocations"
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(a["Bytes"] for a in mem), max(a["Total Allocated"] for a in mem) - base


def _probe_model(T: int, impl: str, seg: torch.Tensor):
    torch.manual_seed(0)
    m = QwenLM(LLMConfig(vocab_size=32, hidden=8, layers=1, heads=1, intermediate=16, attn_impl=impl)).train()
    ids = torch.randint(0, 32, (1, T))

    def step():
        m(m.embed(ids), segment_ids=seg).square().mean().backward()

    return step


def test_no_tt_allocation_at_16k_tokens(tmp_path):
    T = 16384  # a [T,T] bool mask would be 256 MiB, fp32 scores 1 GiB
    seg = torch.repeat_interleave(torch.arange(1, 9), T // 8)[None].clone()
    seg[0, -100:] = 0  # padding tail
    biggest, peak = _largest_allocation(_probe_model(T, "auto", seg), tmp_path / "docs.json")
    assert A.last_path == "sdpa_docs"
    assert biggest < T * T // 64, biggest
    assert peak < T * T // 4, peak  # whole forward + backward (~16 MB here) well below one [T,T] bool

    # The probe sees a dense path's [T,T] allocations (so the check above can fail).
    t = 1024
    dense_seg = torch.repeat_interleave(torch.arange(1, 3), t // 2)[None]
    biggest, _ = _largest_allocation(_probe_model(t, "sdpa_dense", dense_seg), tmp_path / "dense.json")
    assert A.last_path == "sdpa_dense"
    assert biggest >= t * t


@pytest.mark.parametrize("name", ["pad_and_len1", "long_runs_past_chunk", "all_padding_row"])
@pytest.mark.parametrize("block", [16, 128])
def test_flex_blocks_match_dense_reference_blockwise(name, block):
    seg = LAYOUTS[name]
    B, T = seg.shape
    dense = A.build_attention_mask(seg, seg, T, T, seg.device)[:, 0]
    nb = -(-T // block)
    padded = F.pad(dense, (0, nb * block - T, 0, nb * block - T))
    valid = F.pad(torch.ones(T, T, dtype=torch.bool), (0, nb * block - T, 0, nb * block - T))
    tiles = padded.reshape(B, nb, block, nb, block).transpose(2, 3)
    vt = valid.reshape(nb, block, nb, block).transpose(1, 2)
    any_ = tiles.any((-1, -2))
    all_ = (tiles | ~vt).all((-1, -2))
    partial, full = A.flex_blocks(seg, block)
    torch.testing.assert_close(partial | full, any_, atol=0, rtol=0)
    torch.testing.assert_close(full, all_ & any_ & ~torch.eye(nb, dtype=torch.bool), atol=0, rtol=0)
    assert not (partial & full).any()


def test_flex_eager_mask_mod_equals_dense_reference():
    seg = LAYOUTS["pad_and_len1"]
    qkv = [t.detach() for t in _qkv(seg, d=16)]
    ref = A.attend(*qkv, _dense_plan(seg))
    plan = A.AttentionPlan("flex", block_mask=A.flex_block_mask(seg, block=16), compiled=False)
    with pytest.warns(UserWarning, match="without torch.compile"):
        got = A.attend(*qkv, plan)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_flex_compiled_uses_block_lists_and_equals_dense():
    """Compiled flex (the GPU default; CPU forward only) follows the block lists: exact with ours, wrong
    with every block dropped. Small shape so the one-time compile stays a few seconds (warm cache)."""
    seg = _seg([40, 1, 70, (0, 17)])
    qkv = [t.detach() for t in _qkv(seg, d=16)]
    ref = A.attend(*qkv, _dense_plan(seg))
    bm = A.flex_block_mask(seg, block=16)
    got = A.attend(*qkv, A.AttentionPlan("flex", block_mask=bm))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    empty = A.BlockMask.from_kv_blocks(
        torch.zeros_like(bm.kv_num_blocks), bm.kv_indices, BLOCK_SIZE=16, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths
    )
    assert (A.attend(*qkv, A.AttentionPlan("flex", block_mask=empty)) - ref).abs().max() > 1e-2


def test_flex_on_cpu_refuses_training():
    seg = LAYOUTS["pad_and_len1"]
    m = QwenLM(LLMConfig(vocab_size=32, hidden=16, layers=1, heads=1, intermediate=16, attn_impl="flex")).train()
    with pytest.raises(ValueError, match="no FlexAttention backward on the CPU"):
        m(m.embed(torch.zeros_like(seg)), segment_ids=seg)


def test_select_path_by_compute_dtype():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert A.select_path("auto", "cuda", bf16, flash_ok=True) == "flash_varlen"
    assert A.select_path("auto", "cuda", fp32, flash_ok=True) == "flex"  # fp32 compute: flash cannot run
    assert A.select_path("auto", "cuda", bf16, flash_ok=False) == "flex"
    assert A.select_path("auto", "cuda", bf16, flash_ok=False, flex_ok=False) == "sdpa_docs"
    assert A.select_path("auto", "cpu", bf16, flash_ok=True) == "sdpa_docs"
    assert A.select_path("sdpa_dense", "cuda", bf16) == "sdpa_dense"
    with pytest.raises(ValueError, match="attn_impl=flash needs CUDA"):
        A.select_path("flash", "cpu", bf16)
    with pytest.raises(ValueError, match="attn_impl=flash needs CUDA"):
        A.select_path("flash", "cuda", fp32, flash_ok=True)
    with pytest.raises(ValueError, match="model.llm.attn_impl must be one of"):
        QwenLM(LLMConfig(vocab_size=8, hidden=8, layers=1, heads=1, intermediate=8, attn_impl="dense"))


def test_compute_dtype_follows_autocast_not_the_residual():
    x = torch.zeros(2, 3)  # fp32 residual stream, as under the single engine's autocast
    assert A.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert A.compute_dtype(x) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert A.compute_dtype(x) == torch.float32


def test_unpacked_rows_take_is_causal_and_paths_are_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(A, "_logged", set())
    caplog.set_level(logging.INFO, logger="train.attention")
    x = torch.zeros(2, 12, 4)
    before = A.path_counts.copy()
    assert A.plan_attention(None, "auto", x).path == "sdpa_causal"
    assert A.plan_attention(torch.full((2, 12), 3), "auto", x).path == "sdpa_causal"  # one segment per row
    packed = _seg([5, 7], [12])
    for _ in range(3):
        assert A.plan_attention(packed, "auto", x).path == "sdpa_docs"
    assert A.last_path == "sdpa_docs"
    assert A.path_counts["sdpa_docs"] - before["sdpa_docs"] == 3
    assert A.path_counts["sdpa_causal"] - before["sdpa_causal"] == 2
    msgs = [r.getMessage() for r in caplog.records if r.name == "train.attention"]
    assert sum("sdpa_docs" in s for s in msgs) == 1 and sum("sdpa_causal" in s for s in msgs) == 1


def test_docs_path_under_bf16_autocast_close_to_dense():
    cfg = LLMConfig(vocab_size=64, hidden=32, layers=1, heads=2, intermediate=32)
    seg = _seg([20, 1, 30, (0, 5)])
    ids = torch.randint(0, 64, seg.shape, generator=torch.Generator().manual_seed(0))
    outs = []
    for impl in ("sdpa_dense", "auto"):
        torch.manual_seed(0)
        m = QwenLM(LLMConfig(**{**cfg.__dict__, "attn_impl": impl}))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(m(m.embed(ids), segment_ids=seg).float())
    assert A.last_path == "sdpa_docs"
    torch.testing.assert_close(outs[1], outs[0], atol=3e-2, rtol=3e-2)


def test_vision_tower_attention_runs_fused_sdpa():
    """The ViT has no packing: its global attention is unmasked SDPA, which takes the fused (flash) kernel."""
    tower = VisionTower(micro().vision).train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tower(torch.randn(2, 3, 56, 56)).sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::scaled_dot_product_attention" in names
    fused = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
             "aten::_scaled_dot_product_efficient_attention"}
    assert names & fused and "aten::_scaled_dot_product_attention_math" not in names


@pytest.mark.gpu
def test_flex_on_cuda_equals_dense_values_and_grads():
    if not torch.cuda.is_available() or not A.flex_available():
        pytest.skip("needs CUDA and FlexAttention")
    seg = LAYOUTS["long_runs_past_chunk"].cuda()
    qkv = [t.detach().cuda().requires_grad_() for t in _qkv(seg, d=16)]
    up = torch.randn(qkv[0].shape, device="cuda")
    ref, ref_g = _fwd_bwd(_dense_plan(seg), qkv, up)
    plan = A.plan_attention(seg, "auto", torch.empty(*seg.shape, 1, device="cuda"), allow_flash=False)
    assert plan.path == "flex"
    got, got_g = _fwd_bwd(plan, qkv, up)
    tol = 2e-3  # fp32 inputs, but the Triton kernel may use TF32 dots
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
