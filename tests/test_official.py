"""Official Qwen-VL checkpoint interop: config, key/layout translation, streaming loads, export.

The official-layout checkpoint here is written by the test itself: key names spelled out from the
SPEC list, the per-head fused ViT q/k/v packed with the test's own loops, shards + index written
with safetensors directly. Nothing from train.model.official is used to build the expected values.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from train.model import official
from train.model.config import LLMConfig, QwenVLConfig, VisionConfig, qwen_vl_9b6
from train.model.official import (
    CheckpointMismatchError,
    build_from_official,
    config_from_official,
    config_to_official,
    export_official,
    internal_key_to_official,
    load_official,
    load_openclip_vision,
    load_qwen_llm,
    official_key_to_internal,
    per_head_to_torch_qkv,
    torch_qkv_to_per_head,
)
from train.model.qwen_vl import QwenVL

W, VL, VH, MLP = 64, 2, 4, 256  # tiny ViT
H, LL, LH, INTER, VOCAB = 128, 2, 4, 256, 151936  # tiny LLM (adapter: 1 head of 128, as official)
IMG = 56

# The published Qwen/Qwen-VL-Chat config.json (fields that matter, values as published).
QWEN_VL_CHAT_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "attn_dropout_prob": 0.0,
    "emb_dropout_prob": 0.0,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 22016,
    "kv_channels": 128,
    "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192,
    "model_type": "qwen",
    "no_bias": True,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "onnx_safe": None,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 2048,
    "tie_word_embeddings": False,
    "tokenizer_type": "QWenTokenizer",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_dynamic_ntk": True,
    "use_flash_attn": "auto",
    "use_logn_attn": True,
    "visual": {
        "heads": 16,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 48,
        "mlp_ratio": 4.9231,
        "output_dim": 4096,
        "patch_size": 14,
        "width": 1664,
    },
    "vocab_size": 151936,
}

TINY_OFFICIAL_CONFIG = {
    **QWEN_VL_CHAT_CONFIG,
    "hidden_size": H,
    "intermediate_size": 2 * INTER,
    "kv_channels": H // LH,
    "num_attention_heads": LH,
    "num_hidden_layers": LL,
    "visual": {"heads": VH, "image_size": IMG, "image_start_id": 151857, "layers": VL, "mlp_ratio": 4.0,
               "output_dim": H, "patch_size": 14, "width": W},
}


def tiny_cfg() -> QwenVLConfig:
    return QwenVLConfig(
        vision=VisionConfig(image_size=IMG, width=W, layers=VL, heads=VH, mlp_width=MLP),
        llm=LLMConfig(hidden=H, layers=LL, heads=LH, intermediate=INTER),
    ).validate()


# ---------------------------------------------------------------------------------------------
# the test's own checkpoint writer (independent of official.py)
# ---------------------------------------------------------------------------------------------
def pack_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Official layout by hand: for each head, its q rows, then its k rows, then its v rows."""
    hd = q.shape[0] // heads
    parts = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        parts += [q[sl], k[sl], v[sl]]
    return torch.cat(parts, 0)


def make_weights(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> tuple[dict, dict]:
    """(official state dict, internal torch-layout state dict) with the same random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    def ln(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    off, ours = {}, {}

    def put(o: str, i: str, t: torch.Tensor, t_ours: torch.Tensor | None = None) -> None:
        off[o] = t
        ours[i] = t if t_ours is None else t_ours

    put("transformer.visual.conv1.weight", "visual.conv1.weight", r(W, 3, 14, 14))
    put("transformer.visual.positional_embedding", "visual.positional_embedding", r(256, W))
    for n in ("weight", "bias"):
        put(f"transformer.visual.ln_pre.{n}", f"visual.ln_pre.{n}", ln(W) if n == "weight" else r(W))
    for b in range(VL):
        po, pi = f"transformer.visual.transformer.resblocks.{b}.", f"visual.transformer.resblocks.{b}."
        for lnn in ("ln_1", "ln_2"):
            put(f"{po}{lnn}.weight", f"{pi}{lnn}.weight", ln(W))
            put(f"{po}{lnn}.bias", f"{pi}{lnn}.bias", r(W))
        q, k, v = r(W, W), r(W, W), r(W, W)
        put(f"{po}attn.in_proj.weight", f"{pi}attn.in_proj_weight", pack_per_head(q, k, v, VH), torch.cat([q, k, v]))
        qb, kb, vb = r(W), r(W), r(W)
        put(f"{po}attn.in_proj.bias", f"{pi}attn.in_proj_bias", pack_per_head(qb, kb, vb, VH), torch.cat([qb, kb, vb]))
        put(f"{po}attn.out_proj.weight", f"{pi}attn.out_proj.weight", r(W, W))
        put(f"{po}attn.out_proj.bias", f"{pi}attn.out_proj.bias", r(W))
        put(f"{po}mlp.c_fc.weight", f"{pi}mlp.c_fc.weight", r(MLP, W))
        put(f"{po}mlp.c_fc.bias", f"{pi}mlp.c_fc.bias", r(MLP))
        put(f"{po}mlp.c_proj.weight", f"{pi}mlp.c_proj.weight", r(W, MLP))
        put(f"{po}mlp.c_proj.bias", f"{pi}mlp.c_proj.bias", r(W))
    pa = "transformer.visual.attn_pool."
    put(pa + "query", "adapter.query", r(256, H))
    put(pa + "pos_embed", "adapter.pos_embed", r(256, H))  # arbitrary: must be loaded as stored
    put(pa + "kv_proj.weight", "adapter.kv_proj.weight", r(H, W))
    put(pa + "attn.in_proj_weight", "adapter.attn.in_proj_weight", r(3 * H, H))
    put(pa + "attn.in_proj_bias", "adapter.attn.in_proj_bias", r(3 * H))
    put(pa + "attn.out_proj.weight", "adapter.attn.out_proj.weight", r(H, H))
    put(pa + "attn.out_proj.bias", "adapter.attn.out_proj.bias", r(H))
    for lnn in ("ln_q", "ln_kv"):
        put(f"{pa}{lnn}.weight", f"adapter.{lnn}.weight", ln(H))
        put(f"{pa}{lnn}.bias", f"adapter.{lnn}.bias", r(H))
    put("transformer.visual.ln_post.weight", "adapter.ln_post.weight", ln(H))
    put("transformer.visual.ln_post.bias", "adapter.ln_post.bias", r(H))
    put("transformer.visual.proj", "adapter.proj", r(H, H))
    off_llm, ours_llm = make_llm_weights(g, r, ln)
    off.update(off_llm)
    ours.update(ours_llm)
    return off, ours


def make_llm_weights(g, r, ln) -> tuple[dict, dict]:  # noqa: ANN001
    off, ours = {}, {}
    off["transformer.wte.weight"] = ours["llm.wte.weight"] = r(VOCAB, H)
    for b in range(LL):
        po, pi = f"transformer.h.{b}.", f"llm.h.{b}."
        for name, t in (
            ("ln_1.weight", ln(H)),
            ("attn.c_attn.weight", r(3 * H, H)),
            ("attn.c_attn.bias", r(3 * H)),
            ("attn.c_proj.weight", r(H, H)),
            ("ln_2.weight", ln(H)),
            ("mlp.w1.weight", r(INTER, H)),
            ("mlp.w2.weight", r(INTER, H)),
            ("mlp.c_proj.weight", r(H, INTER)),
        ):
            off[po + name] = ours[pi + name] = t
    off["transformer.ln_f.weight"] = ours["llm.ln_f.weight"] = ln(H)
    off["lm_head.weight"] = ours["llm.lm_head.weight"] = r(VOCAB, H)
    return off, ours


def write_sharded(off: dict, d: Path, n_shards: int, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    keys = list(off)
    per = math.ceil(len(keys) / n_shards)
    wm = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: off[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(d / name), metadata={"format": "pt"})
        wm.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def image_batch(cfg: QwenVLConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = cfg.ids
    span = [ids.img_start] + [0] * cfg.adapter.n_queries + [ids.img_end]
    row = [100, 200] + span + [300, 400, ids.eod]
    input_ids = torch.tensor([row])
    labels = input_ids.clone()
    labels[0, : len(span) + 2] = -100
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return input_ids, labels, pixels


@pytest.fixture(scope="module")
def weights() -> tuple[dict, dict]:
    return make_weights()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, weights) -> Path:
    return write_sharded(weights[0], tmp_path_factory.mktemp("ckpt") / "qwen-vl", 3, TINY_OFFICIAL_CONFIG)


@pytest.fixture(scope="module")
def imported(ckpt_dir) -> QwenVL:
    return build_from_official(ckpt_dir, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_config_from_published_qwen_vl_chat_matches_full_geometry():
    cfg = config_from_official(QWEN_VL_CHAT_CONFIG)
    full = qwen_vl_9b6()
    assert cfg.llm.intermediate == 11008  # 22016 halved
    assert cfg.vision.mlp_width == 8192  # int(1664 * 4.9231)
    for sec in ("vision", "adapter", "ids"):
        assert getattr(cfg, sec) == getattr(full, sec), sec
    assert cfg.llm == full.llm


def test_config_to_official_reproduces_published_fields():
    out = config_to_official(qwen_vl_9b6())
    for k in ("hidden_size", "intermediate_size", "kv_channels", "layer_norm_epsilon", "model_type",
              "num_attention_heads", "num_hidden_layers", "rotary_emb_base", "vocab_size", "visual",
              "max_position_embeddings", "tie_word_embeddings", "rotary_pct"):
        assert out[k] == QWEN_VL_CHAT_CONFIG[k], k
    assert config_from_official(out) == qwen_vl_9b6()
    assert config_from_official(config_to_official(tiny_cfg())) == tiny_cfg()


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="model_type 'llama'"):
        config_from_official({**QWEN_VL_CHAT_CONFIG, "model_type": "llama"})
    bad = dict(QWEN_VL_CHAT_CONFIG)
    del bad["hidden_size"]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"config\.json: missing required field 'hidden_size'"):
        config_from_official(tmp_path)
    with pytest.raises(ValueError, match="adapter.head_dim 32"):
        config_to_official(QwenVLConfig(adapter=qwen_vl_9b6().adapter.__class__(head_dim=32)))


# ---------------------------------------------------------------------------------------------
# pure translation
# ---------------------------------------------------------------------------------------------
KEY_PAIRS = [
    ("transformer.visual.conv1.weight", "visual.conv1.weight"),
    ("transformer.visual.positional_embedding", "visual.positional_embedding"),
    ("transformer.visual.ln_pre.bias", "visual.ln_pre.bias"),
    ("transformer.visual.transformer.resblocks.47.attn.in_proj.weight",
     "visual.transformer.resblocks.47.attn.in_proj_weight"),
    ("transformer.visual.transformer.resblocks.3.attn.in_proj.bias", "visual.transformer.resblocks.3.attn.in_proj_bias"),
    ("transformer.visual.transformer.resblocks.3.attn.out_proj.weight",
     "visual.transformer.resblocks.3.attn.out_proj.weight"),
    ("transformer.visual.transformer.resblocks.0.mlp.c_fc.bias", "visual.transformer.resblocks.0.mlp.c_fc.bias"),
    ("transformer.visual.attn_pool.query", "adapter.query"),
    ("transformer.visual.attn_pool.pos_embed", "adapter.pos_embed"),
    ("transformer.visual.attn_pool.attn.in_proj_weight", "adapter.attn.in_proj_weight"),
    ("transformer.visual.attn_pool.ln_kv.weight", "adapter.ln_kv.weight"),
    ("transformer.visual.ln_post.weight", "adapter.ln_post.weight"),
    ("transformer.visual.proj", "adapter.proj"),
    ("transformer.wte.weight", "llm.wte.weight"),
    ("transformer.h.31.attn.c_attn.bias", "llm.h.31.attn.c_attn.bias"),
    ("transformer.h.0.mlp.w2.weight", "llm.h.0.mlp.w2.weight"),
    ("transformer.ln_f.weight", "llm.ln_f.weight"),
    ("lm_head.weight", "llm.lm_head.weight"),
]


@pytest.mark.parametrize("off,ours", KEY_PAIRS)
def test_key_translation_both_ways(off, ours):
    assert official_key_to_internal(off) == ours
    assert internal_key_to_official(ours) == off


def test_unknown_keys_have_no_translation():
    assert official_key_to_internal("model.embed_tokens.weight") is None
    assert internal_key_to_official("foo.bar") is None


def test_per_head_permutation_matches_hand_packing_and_inverts():
    heads, hd, w = 3, 5, 7
    q, k, v = (torch.randn(heads * hd, w) for _ in range(3))
    packed = pack_per_head(q, k, v, heads)
    assert torch.equal(per_head_to_torch_qkv(packed, heads), torch.cat([q, k, v]))
    assert torch.equal(torch_qkv_to_per_head(torch.cat([q, k, v]), heads), packed)
    b = torch.randn(3 * heads * hd)
    assert torch.equal(torch_qkv_to_per_head(per_head_to_torch_qkv(b, heads), heads), b)
    # spot check the SPEC index formula: row head*3*hd + {0 q, hd k, 2hd v} + d
    assert torch.equal(packed[2 * 3 * hd + hd + 4], k[2 * hd + 4])


def test_permuted_weights_reproduce_official_visual_attention():
    """Official VisualAttention math (per-head split of the fused projection) == torch MHA after permute."""
    torch.manual_seed(0)
    heads, width, n = 4, 32, 6
    w_off, b_off = torch.randn(3 * width, width) * 0.2, torch.randn(3 * width) * 0.2
    x = torch.randn(n, width)
    hd = width // heads
    mixed = (x @ w_off.T + b_off).view(n, heads, 3 * hd)
    q, k, v = mixed.split(hd, dim=-1)  # official: [sq, np, 3*hn] -> 3 x [sq, np, hn]
    probs = torch.einsum("qhd,khd->hqk", q / math.sqrt(hd), k).softmax(-1)
    ref = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, width)
    mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(per_head_to_torch_qkv(w_off, heads))
        mha.in_proj_bias.copy_(per_head_to_torch_qkv(b_off, heads))
        mha.out_proj.weight.copy_(torch.eye(width))
        mha.out_proj.bias.zero_()
    out = mha(x[None], x[None], x[None], need_weights=False)[0][0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# import / forward / export
# ---------------------------------------------------------------------------------------------
def test_import_matches_reference_and_forward_agrees(imported, weights):
    _, ours = weights
    sd = imported.state_dict()
    assert set(sd) == set(ours)
    for k, t in ours.items():
        assert sd[k].dtype == torch.float32
        assert torch.equal(sd[k], t.float()), k
    ref = QwenVL(tiny_cfg())
    ref.load_state_dict(ours)  # the other path: the test's own torch-layout state dict
    ref.eval()
    imported.eval()
    ids, labels, pix = image_batch(imported.cfg)
    with torch.no_grad():
        h_imp = imported.llm(imported.embed_inputs(ids, pix))
        h_ref = ref.llm(ref.embed_inputs(ids, pix))
        out = imported(ids, labels=labels, pixel_values=pix)
        out_ref = ref(ids, labels=labels, pixel_values=pix)
    assert torch.equal(h_imp, h_ref)
    assert int(out.n_tokens) == 3 and torch.isfinite(out.loss)  # 300, 400, eod
    assert torch.equal(out.loss_sum, out_ref.loss_sum)
    # the adapter must have used the stored pos_embed, not a recomputed sin-cos table
    assert torch.equal(imported.adapter.pos_embed, ours["adapter.pos_embed"].float())


def test_export_roundtrip_is_bitwise(imported, weights, tmp_path):
    off, _ = weights
    out = export_official(imported, tmp_path / "export", max_shard_bytes=20 * 2**20, dtype=torch.bfloat16)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(idx["weight_map"].values()))
    assert len(files) >= 3  # wte and lm_head alone are ~39 MB each in bf16
    got = {}
    for f in files:
        part = load_file(str(out / f))
        assert all(idx["weight_map"][k] == f for k in part)
        got.update(part)
    assert set(got) == set(off)
    for k, t in off.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in off.values())
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["intermediate_size"] == 2 * INTER and cfg_json["torch_dtype"] == "bfloat16"
    assert cfg_json["visual"] == TINY_OFFICIAL_CONFIG["visual"]
    assert config_from_official(out) == imported.cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_export_from_state_dict_and_reimport(weights, tmp_path):
    _, ours = weights
    with pytest.raises(ValueError, match="cfg is required"):
        export_official(ours, tmp_path / "x")
    out = export_official(ours, tmp_path / "sd", cfg=tiny_cfg(), max_shard_bytes=2**40)
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) == 1
    m = build_from_official(out, dtype=torch.bfloat16)
    for k, t in m.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ours[k]), k
    with pytest.raises(FileExistsError, match="already exists"):
        export_official(ours, out, cfg=tiny_cfg())
    export_official(ours, out, cfg=tiny_cfg(), dtype=torch.float32, overwrite=True)  # swapped in by rename
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert load_file(str(out / "model-00001-of-00001.safetensors"))["lm_head.weight"].dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]  # no temp or backup dirs left
    bad = {k: v for k, v in ours.items() if k != "llm.ln_f.weight"}
    bad["llm.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as ei:
        export_official(bad, tmp_path / "bad", cfg=tiny_cfg())
    assert "missing llm.ln_f.weight [128]" in str(ei.value) and "unexpected llm.extra [1]" in str(ei.value)
    assert not (tmp_path / "bad").exists()


def test_export_failure_leaves_nothing_behind(weights, tmp_path, monkeypatch):
    _, ours = weights
    calls = []

    def failing_save(tensors, path, metadata=None):  # noqa: ANN001
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(official, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_official(ours, tmp_path / "out", cfg=tiny_cfg(), max_shard_bytes=20 * 2**20)
    assert list(tmp_path.iterdir()) == []


def test_single_file_load(weights, tmp_path):
    off, ours = weights
    save_file({k: v.contiguous() for k, v in off.items()}, str(tmp_path / "model.safetensors"))
    m = QwenVL(tiny_cfg())
    rep = load_official(m, tmp_path)
    assert len(rep.loaded) == len(ours)
    for k, t in m.state_dict().items():
        assert torch.equal(t, ours[k].float()), k


def test_mismatches_raise_one_error_and_load_nothing(weights, tmp_path):
    off, _ = weights
    bad = dict(off)
    del bad["transformer.h.1.mlp.w1.weight"]
    bad["transformer.visual.unknown_thing"] = torch.zeros(3)
    bad["transformer.ln_f.weight"] = torch.ones(H + 1, dtype=torch.bfloat16)
    bad["transformer.visual.transformer.resblocks.0.attn.in_proj.weight"] = torch.zeros(3 * W, W + 2)
    d = write_sharded(bad, tmp_path / "bad", 2)
    m = QwenVL(tiny_cfg())
    before = m.llm.wte.weight.detach().clone()
    with pytest.raises(CheckpointMismatchError) as ei:
        load_official(m, d)
    msg = str(ei.value)
    assert "missing (1" in msg and "llm.h.1.mlp.w1.weight [256,128]" in msg
    assert "unexpected (1" in msg and "transformer.visual.unknown_thing [3]" in msg
    assert "mis-shaped (2" in msg and "transformer.ln_f.weight [129] -> llm.ln_f.weight expects [128]" in msg
    assert "resblocks.0.attn.in_proj.weight [192,66]" in msg
    assert torch.equal(m.llm.wte.weight, before)  # nothing half-loaded


def test_index_pointing_at_missing_shard_names_it(weights, tmp_path):
    d = write_sharded(weights[0], tmp_path / "c", 2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_official(QwenVL(tiny_cfg()), d)


def test_load_streams_one_shard_at_a_time(ckpt_dir, monkeypatch):
    opened, live, peak = [], [0], [0]
    real = official.safe_open

    class Tracked:
        def __init__(self, path, framework, device):  # noqa: ANN001
            self.h = real(path, framework=framework, device=device)
            opened.append(Path(path).name)

        def __enter__(self):
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            return self.h.__enter__()

        def __exit__(self, *a):  # noqa: ANN002
            live[0] -= 1
            return self.h.__exit__(*a)

    monkeypatch.setattr(official, "safe_open", Tracked)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    m = QwenVL(tiny_cfg())
    load_official(m, ckpt_dir)
    assert peak[0] == 1
    # header scan + data pass: each of the 3 shards opened exactly twice
    assert sorted(opened) == sorted([f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] * 2)


# ---------------------------------------------------------------------------------------------
# stage-1 inits: OpenCLIP ViT and Qwen-7B LLM-only
# ---------------------------------------------------------------------------------------------
def _openclip_vit():
    from open_clip.transformer import LayerNorm, VisionTransformer

    torch.manual_seed(3)
    vit = VisionTransformer(image_size=224, patch_size=14, width=W, layers=VL, heads=VH, mlp_ratio=MLP / W,
                            output_dim=32, norm_layer=partial(LayerNorm, eps=1e-6))
    with torch.no_grad():  # open_clip zero/one-inits LNs and biases: randomise so a mix-up shows
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_openclip_vision_import_gives_open_clip_patch_tokens(tmp_path, fmt):
    vit = _openclip_vit()
    state = {f"visual.{k}": v for k, v in vit.state_dict().items()}
    assert state["visual.positional_embedding"].shape == (257, W)
    state["text.token_embedding.weight"] = torch.randn(10, 8)  # text tower: ignored
    state["logit_scale"] = torch.ones([])
    if fmt == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    m = QwenVL(tiny_cfg())
    llm_before = m.llm.h[0].mlp.w1.weight.detach().clone()
    rep = load_openclip_vision(m, path)
    assert "visual.class_embedding" in rep.ignored and "visual.proj" in rep.ignored
    assert "text.token_embedding.weight" in rep.ignored
    assert torch.equal(m.visual.positional_embedding, vit.positional_embedding[1:])
    assert torch.equal(m.llm.h[0].mlp.w1.weight, llm_before)
    pix = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # open_clip's own modules, class token left out
        x = vit.conv1(pix).flatten(2).transpose(1, 2) + vit.positional_embedding[1:]
        ref = vit.transformer(vit.ln_pre(x))
        got = m.visual.eval()(pix)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_openclip_missing_block_is_reported(tmp_path):
    vit = _openclip_vit()
    state = {f"visual.{k}": v for k, v in vit.state_dict().items() if "resblocks.1.mlp.c_fc" not in k}
    save_file(state, str(tmp_path / "oc.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"visual\.transformer\.resblocks\.1\.mlp\.c_fc\.weight \[256,64\]"):
        load_openclip_vision(QwenVL(tiny_cfg()), tmp_path / "oc.safetensors")


def test_qwen_llm_only_import(weights, ckpt_dir, tmp_path):
    g = torch.Generator().manual_seed(7)
    off, ours = make_llm_weights(
        g, lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16),
        lambda n: torch.ones(n, dtype=torch.bfloat16) + 0.1 * torch.randn(n, generator=g).to(torch.bfloat16))
    d = write_sharded(off, tmp_path / "qwen7b", 2)
    m = QwenVL(tiny_cfg())
    vis_before = m.visual.conv1.weight.detach().clone()
    rep = load_qwen_llm(m, d)
    assert sorted(rep.loaded) == sorted(ours)
    for k, t in ours.items():
        assert torch.equal(m.state_dict()[k], t.float()), k
    assert torch.equal(m.visual.conv1.weight, vis_before)
    # a full Qwen-VL checkpoint also works: its visual part is ignored and counted
    rep = load_qwen_llm(m, ckpt_dir)
    assert len(rep.ignored) == sum(k.startswith("transformer.visual.") for k in weights[0])
    assert torch.equal(m.llm.lm_head.weight, weights[1]["llm.lm_head.weight"].float())


def test_loading_into_meta_model_is_a_clear_error(ckpt_dir):
    with torch.device("meta"):
        m = QwenVL(tiny_cfg())
    with pytest.raises(ValueError, match="to_empty"):
        load_official(m, ckpt_dir)


def test_export_reads_back_with_safe_open_names(imported, tmp_path):
    out = export_official(imported, tmp_path / "e", max_shard_bytes=2**40)
    with safe_open(str(out / "model-00001-of-00001.safetensors"), framework="pt") as h:
        keys = set(h.keys())
    assert "transformer.visual.transformer.resblocks.1.attn.in_proj.weight" in keys
    assert "transformer.visual.attn_pool.pos_embed" in keys and "lm_head.weight" in keys
    assert not any(k.startswith(("visual.", "adapter.", "llm.")) for k in keys)
    # float32 model exported without dtype keeps float32
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_full_size_key_map_on_meta():
    """Every parameter of the full 9.6B model has an official name with the published shape."""
    with torch.device("meta"):
        m = QwenVL(config_from_official(QWEN_VL_CHAT_CONFIG))
    sd = m.state_dict()
    off = {internal_key_to_official(k): tuple(v.shape) for k, v in sd.items()}
    assert None not in off
    assert all(official_key_to_internal(k) in sd for k in off)
    assert off["transformer.visual.transformer.resblocks.47.attn.in_proj.weight"] == (4992, 1664)
    assert off["transformer.visual.transformer.resblocks.0.mlp.c_fc.weight"] == (8192, 1664)
    assert off["transformer.visual.positional_embedding"] == (256, 1664)
    assert off["transformer.visual.attn_pool.kv_proj.weight"] == (4096, 1664)
    assert off["transformer.visual.attn_pool.attn.in_proj_weight"] == (12288, 4096)
    assert off["transformer.visual.proj"] == (4096, 4096)
    assert off["transformer.h.31.mlp.w2.weight"] == (11008, 4096)
    assert off["transformer.h.0.attn.c_attn.bias"] == (12288,)
    assert off["lm_head.weight"] == (151936, 4096)
    # ViT: conv1, pos, ln_pre x2 + 12 per block; adapter 14; LLM: wte + 8 per block + ln_f + lm_head
    assert len(off) == 4 + 48 * 12 + 14 + 1 + 32 * 8 + 2
    assert 9.6e9 < sum(v.numel() for v in sd.values()) < 9.7e9


def test_non_strict_load_reports_missing(tmp_path):
    g = torch.Generator().manual_seed(5)
    off, ours = make_llm_weights(g, lambda *s: torch.randn(*s, generator=g), lambda n: torch.ones(n))
    d = write_sharded(off, tmp_path / "llm_only", 2)
    m = QwenVL(tiny_cfg())
    with pytest.raises(CheckpointMismatchError, match=r"missing \(42;"):
        load_official(m, d)
    rep = load_official(m, d, strict=False)
    n_vis_adapter = sum(1 for k in m.state_dict() if not k.startswith("llm."))
    assert n_vis_adapter == 4 + VL * 12 + 14
    assert len(rep.missing) == n_vis_adapter and sorted(rep.loaded) == sorted(ours)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_on_cuda_bf16(ckpt_dir, weights):
    m = build_from_official(ckpt_dir, device="cuda", dtype=torch.bfloat16)
    for k, t in m.state_dict().items():
        assert t.is_cuda and t.dtype == torch.bfloat16 and torch.equal(t.cpu(), weights[1][k]), k


# ---------------------------------------------------------------------------------------------
# pytorch_model*.bin checkpoints (transformers' default when Qwen-VL was published)
# ---------------------------------------------------------------------------------------------
def write_bin_sharded(off: dict, d: Path, n_shards: int, config: dict | None = None) -> Path:
    """The test's own writer for the old transformers layout: torch.save'd shards + pytorch_model.bin.index.json."""
    d.mkdir(parents=True, exist_ok=True)
    keys = list(off)
    per = math.ceil(len(keys) / n_shards)
    wm = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: off[k].clone() for k in keys[i * per:(i + 1) * per]}
        torch.save(part, d / name)
        wm.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in off.values())
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": wm}))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory, weights) -> Path:
    return write_bin_sharded(weights[0], tmp_path_factory.mktemp("bin") / "qwen-vl-bin", 3, TINY_OFFICIAL_CONFIG)


def test_bin_shards_import_bitwise(bin_dir, weights):
    _, ours = weights
    m = build_from_official(bin_dir, dtype=torch.bfloat16)
    sd = m.state_dict()
    assert set(sd) == set(ours)
    for k, t in ours.items():
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], t), k
    # the index file itself, and the LLM-only loader, take the same layout
    rep = load_qwen_llm(QwenVL(tiny_cfg()), bin_dir / "pytorch_model.bin.index.json")
    assert len(rep.loaded) == sum(k.startswith("llm.") for k in ours)


def test_bin_load_is_weights_only_mmap_and_one_shard_at_a_time(bin_dir, monkeypatch):
    import gc
    import weakref

    real = torch.load
    calls, alive = [], []  # alive: weak references to the tensors of the previously loaded shard

    def tracked(path, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        gc.collect()
        assert not [r for r in alive if r() is not None], "a previous shard's tensors are still referenced"
        calls.append((Path(path).name, kw.get("weights_only"), kw.get("mmap")))
        obj = real(path, *a, **kw)
        alive[:] = [weakref.ref(t) for t in obj.values()]
        return obj

    monkeypatch.setattr(torch, "load", tracked)
    monkeypatch.setattr(official, "safe_open", lambda *a, **k: pytest.fail("safe_open used for .bin shards"))
    load_official(QwenVL(tiny_cfg()), bin_dir)
    names = [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    assert calls == [(n, True, True) for n in names * 2]  # key/shape scan, then the copy pass


def test_bin_single_file_and_safetensors_preferred(weights, tmp_path):
    off, ours = weights
    torch.save({k: v.clone() for k, v in off.items()}, tmp_path / "pytorch_model.bin")
    m = QwenVL(tiny_cfg())
    rep = load_official(m, tmp_path)
    assert rep.files == [str(tmp_path / "pytorch_model.bin")] and len(rep.loaded) == len(ours)
    assert torch.equal(m.llm.lm_head.weight, ours["llm.lm_head.weight"].float())
    # both formats present: safetensors wins (as in transformers); the .bin here is deliberately different
    both = tmp_path / "both"
    write_sharded(off, both, 2)
    torch.save({"transformer.wte.weight": torch.zeros(3)}, both / "pytorch_model.bin")
    assert load_official(QwenVL(tiny_cfg()), both).files[0].endswith(".safetensors")


def test_bin_mismatch_and_bad_file_are_named(weights, tmp_path):
    off, _ = weights
    bad = {k: v for k, v in off.items() if k != "transformer.ln_f.weight"}
    d = write_bin_sharded(bad, tmp_path / "bad", 2)
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1;[\s\S]*llm\.ln_f\.weight \[128\]"):
        load_official(QwenVL(tiny_cfg()), d)
    (d / "pytorch_model-00002-of-00002.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"pytorch_model-00002-of-00002\.bin: cannot load as a weights-only"):
        load_official(QwenVL(tiny_cfg()), d)


# ---------------------------------------------------------------------------------------------
# export: the source checkpoint's run-time config and its tokenizer / code files
# ---------------------------------------------------------------------------------------------
SOURCE_FILES = {
    "qwen.tiktoken": b"aGVsbG8= 0\n",
    "tokenization_qwen.py": b"# official tokenizer code\n",
    "modeling_qwen.py": b"# official model code\n",
    "visual.py": b"# official ViT code\n",
    "configuration_qwen.py": b"# official config code\n",
    "qwen_generation_utils.py": b"# official generation helpers\n",
    "tokenizer_config.json": b'{"auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", null]}}',
    "generation_config.json": b'{"chat_format": "chatml", "max_window_size": 6144}',
    "SimSun.ttf": b"\x00\x01font",
}
NOT_COPIED = {"README.md": b"# the source model card", "pytorch_model.bin.index.json": b"{}"}


def source_checkpoint(d: Path, off: dict, **config: object) -> Path:
    write_sharded(off, d, 2, {**TINY_OFFICIAL_CONFIG, **config})
    for name, data in {**SOURCE_FILES, **NOT_COPIED}.items():
        (d / name).write_bytes(data)
    return d


def test_export_keeps_source_runtime_fields_and_copies_code(weights, tmp_path):
    off, ours = weights
    runtime = {"bf16": True, "fp16": False, "fp32": False, "use_flash_attn": False, "use_dynamic_ntk": False,
               "use_logn_attn": False, "seq_length": 2048, "transformers_version": "4.31.0",
               "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
               "onnx_safe": None, "custom_field": [1, 2]}
    src = source_checkpoint(tmp_path / "src", off, **runtime)
    m = build_from_official(src)
    # source given as a file inside it (init.official may name the index); trained at 8192
    out = export_official(m, tmp_path / "final", source_dir=src / "model.safetensors.index.json", seq_length=8192)
    cj = json.loads((out / "config.json").read_text())
    for k, v in runtime.items():
        assert cj[k] == (8192 if k == "seq_length" else v), k
    for k in ("hidden_size", "num_hidden_layers", "visual", "vocab_size", "intermediate_size"):
        assert cj[k] == TINY_OFFICIAL_CONFIG[k], k
    assert cj["torch_dtype"] == "float32"  # the tensors written, not the source's bfloat16
    for name, data in SOURCE_FILES.items():
        assert (out / name).read_bytes() == data, name
    assert not any((out / n).exists() for n in NOT_COPIED)
    assert config_from_official(out) == m.cfg
    back = build_from_official(out)
    assert all(torch.equal(back.state_dict()[k], t.float()) for k, t in ours.items())
    # trained on rows shorter than the source's: the source's native length stays (NTK only beyond it)
    again = export_official(m, tmp_path / "short", source_dir=src, seq_length=512)
    assert json.loads((again / "config.json").read_text())["seq_length"] == 2048


def test_export_keeps_source_values_it_does_not_set(weights, tmp_path):
    """Qwen-VL-Chat's published run-time values come through unchanged (dynamic NTK and logn on there)."""
    off, _ = weights
    src = source_checkpoint(tmp_path / "chat", off, bf16=False, fp16=False, fp32=False, use_flash_attn="auto",
                            transformers_version="4.32.0")
    out = export_official(build_from_official(src), tmp_path / "e", source_dir=src)
    cj = json.loads((out / "config.json").read_text())
    assert (cj["use_dynamic_ntk"], cj["use_logn_attn"], cj["seq_length"]) == (True, True, 2048)
    assert cj["transformers_version"] == "4.32.0" and cj["use_flash_attn"] == "auto"


def test_export_without_source_describes_this_model(imported, tmp_path):
    """No source: the official code must compute what ours does -- plain RoPE (no dynamic NTK, no logn
    scaling) -- and seq_length is the trained length."""
    out = export_official(imported, tmp_path / "e", seq_length=8192)
    cj = json.loads((out / "config.json").read_text())
    assert cj["seq_length"] == 8192
    assert cj["use_dynamic_ntk"] is False and cj["use_logn_attn"] is False
    assert (cj["bf16"], cj["fp16"], cj["fp32"], cj["use_flash_attn"]) == (False, False, False, "auto")
    assert cj["transformers_version"] == "4.32.0"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model-00001-of-00001.safetensors",
                                                     "model.safetensors.index.json"]
    assert json.loads((export_official(imported, tmp_path / "d") / "config.json").read_text())["seq_length"] == 2048


def test_export_source_errors_are_named(imported, weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        export_official(imported, tmp_path / "e", source_dir=tmp_path / "no_such_dir")
    src = source_checkpoint(tmp_path / "llama", weights[0])
    cfg_path = src / "config.json"
    cfg_path.write_text(json.dumps({**TINY_OFFICIAL_CONFIG, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type 'llama'.*llama/config\.json"):
        export_official(imported, tmp_path / "e", source_dir=src)
    assert not (tmp_path / "e").exists()
