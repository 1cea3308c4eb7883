"""Decoder tests: parity with transformers' Qwen2, packing, KV cache, checkpointing, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.model.config import LLMConfig, get_config
from train.model.llm import KVCache, QwenLM, build_attention_mask, positions_from_segments

CFG = LLMConfig(vocab_size=512, hidden=64, layers=2, heads=4, intermediate=96, rope_base=10000.0)


def _model(seed: int = 0, cfg: LLMConfig = CFG) -> QwenLM:
    torch.manual_seed(seed)
    m = QwenLM(cfg).eval()
    # Non-trivial norms and biases so a parity test catches a misplaced weight.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n == "ln_f.weight":
                p.uniform_(0.5, 1.5)
            if n.endswith("c_attn.bias"):
                p.normal_(std=0.1)
    return m


def _hf_from(m: QwenLM, cfg: LLMConfig):
    transformers = pytest.importorskip("transformers")
    hcfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        rms_norm_eps=cfg.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        tie_word_embeddings=False,
        max_position_embeddings=cfg.max_position,
        attn_implementation="eager",
    )
    ref = transformers.Qwen2ForCausalLM(hcfg).eval()
    H = cfg.hidden
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(m.wte.weight)
        for i, blk in enumerate(m.h):
            r = ref.model.layers[i]
            w, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias
            for j, proj in enumerate((r.self_attn.q_proj, r.self_attn.k_proj, r.self_attn.v_proj)):
                proj.weight.copy_(w[j * H : (j + 1) * H])
                proj.bias.copy_(b[j * H : (j + 1) * H])
            r.self_attn.o_proj.weight.copy_(blk.attn.c_proj.weight)
            r.mlp.gate_proj.weight.copy_(blk.mlp.w2.weight)
            r.mlp.up_proj.weight.copy_(blk.mlp.w1.weight)
            r.mlp.down_proj.weight.copy_(blk.mlp.c_proj.weight)
            r.input_layernorm.weight.copy_(blk.ln_1.weight)
            r.post_attention_layernorm.weight.copy_(blk.ln_2.weight)
        ref.model.norm.weight.copy_(m.ln_f.weight)
        ref.lm_head.weight.copy_(m.lm_head.weight)
    return ref


def test_parameter_names_follow_design():
    names = set(dict(QwenLM(LLMConfig(vocab_size=64, hidden=16, layers=1, heads=2, intermediate=32)).named_parameters()))
    assert names == {
        "wte.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias",
        "h.0.attn.c_proj.weight", "h.0.ln_2.weight", "h.0.mlp.w1.weight", "h.0.mlp.w2.weight",
        "h.0.mlp.c_proj.weight", "ln_f.weight", "lm_head.weight",
    }  # fmt: skip


def test_parity_with_transformers_qwen2():
    m = _model()
    ref = _hf_from(m, CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 23))
    ours = m.logits(m(m.embed(ids)))
    theirs = ref(input_ids=ids).logits
    assert ours.shape == theirs.shape == (2, 23, CFG.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-5
    # Explicit, shifted positions must follow the same rotary convention.
    pos = torch.arange(5, 28).expand(2, -1)
    ours = m.logits(m(m.embed(ids), position_ids=pos))
    theirs = ref(input_ids=ids, position_ids=pos).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_positions_from_segments_hand_computed():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_attention_mask_is_causal_and_block_diagonal():
    seg = torch.tensor([[1, 1, 2, 0]])
    m = build_attention_mask(seg, seg, 4, 4, seg.device)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_packed_row_equals_separate_forwards():
    m = _model(1)
    a = torch.randint(0, CFG.vocab_size, (1, 9))
    b = torch.randint(0, CFG.vocab_size, (1, 6))
    pad = torch.zeros(1, 3, dtype=torch.long)
    packed = torch.cat([a, b, pad], 1)
    seg = torch.tensor([[1] * 9 + [2] * 6 + [0] * 3])
    with torch.no_grad():
        lp = m.logits(m(m.embed(packed), segment_ids=seg))  # positions derived from segments
        la = m.logits(m(m.embed(a)))
        lb = m.logits(m(m.embed(b)))
        # explicit position ids give the same result as derived ones
        lp2 = m.logits(m(m.embed(packed), position_ids=positions_from_segments(seg), segment_ids=seg))
    torch.testing.assert_close(lp[:, :9], la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp[:, 9:15], lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp, lp2, atol=0, rtol=0)
    # Without the segment mask the second sample would see the first: the test can fail.
    with torch.no_grad():
        leak = m.logits(m(m.embed(packed), position_ids=positions_from_segments(seg)))
    assert (leak[:, 9:15] - lb).abs().max() > 1e-3


def test_kv_cache_incremental_equals_full():
    m = _model(2)
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        full = m(m.embed(ids))
        cache = KVCache(CFG.layers)
        parts = [m(m.embed(ids[:, :5]), kv_cache=cache)]
        parts += [m(m.embed(ids[:, t : t + 1]), kv_cache=cache) for t in range(5, 9)]
        parts.append(m(m.embed(ids[:, 9:]), kv_cache=cache))  # multi-token step after the prefix
    assert cache.length == 12 and cache.k[0].shape == (2, CFG.heads, 12, CFG.head_dim)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_left_padding_matches_unpadded():
    m = _model(3)
    ids = torch.randint(1, CFG.vocab_size, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    seg = torch.tensor([[0, 0, 0] + [1] * 7])
    pos = (seg.cumsum(1) - 1).clamp(min=0)
    nxt = torch.randint(0, CFG.vocab_size, (1, 1))
    with torch.no_grad():
        ref = m(m.embed(torch.cat([ids, nxt], 1)))
        cache = KVCache(CFG.layers)
        h0 = m(m.embed(padded), position_ids=pos, segment_ids=seg, kv_cache=cache)
        h1 = m(m.embed(nxt), position_ids=pos[:, -1:] + 1, segment_ids=torch.ones(1, 1, dtype=torch.long),
               kv_cache=cache)
    torch.testing.assert_close(h0[:, 3:], ref[:, :7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1, ref[:, 7:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="segment_ids"):
        m(m.embed(nxt), kv_cache=cache)


def test_grad_checkpointing_same_grads():
    m = _model(4).train()
    ids = torch.randint(0, CFG.vocab_size, (2, 10))
    seg = torch.tensor([[1] * 6 + [2] * 4, [1] * 10])

    def grads():
        m.zero_grad()
        h = m(m.embed(ids), segment_ids=seg)
        F.cross_entropy(m.logits(h).flatten(0, 1), ids.flatten()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    m.set_grad_checkpointing(False)
    g0 = grads()
    m.set_grad_checkpointing(True)
    g1 = grads()
    assert g0.keys() == g1.keys() and all(g0[n].abs().sum() > 0 for n in g0)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5)


def test_bad_shapes_raise():
    m = _model()
    x = m.embed(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids shape"):
        m(x, segment_ids=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids shape"):
        m(x, position_ids=torch.zeros(1, 5, dtype=torch.long))


def test_full_size_llm_parameter_count_on_meta():
    cfg = get_config("qwen_vl_9b6").llm
    with torch.device("meta"):
        m = QwenLM(cfg)
    n = sum(p.numel() for p in m.parameters())
    # Hand count: 2 * V*H + L * (H*3H + 3H + H*H + 3*H*I + 2H) + H.
    H, V, L, Im = 4096, 151936, 32, 11008
    assert n == 2 * V * H + L * (3 * H * H + 3 * H + H * H + 3 * H * Im + 2 * H) + H
    assert abs(n / 7.72e9 - 1) < 0.01


@pytest.mark.gpu
def test_flash_varlen_matches_sdpa_on_gpu():
    from train.model import llm as llm_mod

    if not torch.cuda.is_available() or llm_mod.flash_attn_varlen_func is None:
        pytest.skip("needs CUDA and flash_attn")
    m = _model(5).cuda().to(torch.bfloat16)
    ids = torch.randint(0, CFG.vocab_size, (2, 64), device="cuda")
    seg = torch.tensor([[1] * 40 + [2] * 20 + [0] * 4, [1] * 64], device="cuda")
    with torch.no_grad():
        m.use_flash_attn = True
        a = m(m.embed(ids), segment_ids=seg)
        m.use_flash_attn = False
        b = m(m.embed(ids), segment_ids=seg)
    assert (a[seg > 0] - b[seg > 0]).abs().max().item() < 3e-2
