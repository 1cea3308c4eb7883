"""Qwen2-VL family: parity with transformers' Qwen2VLForConditionalGeneration / Qwen2VLImageProcessor /
get_rope_index on the same random tiny weights, packing, checkpoint import/export, the family registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

T = pytest.importorskip("transformers")

from data.qwen2_vl_images import n_image_tokens, preprocess, smart_resize, to_patches_uint8  # noqa: E402
from train.model.families import FAMILIES, family_for_model_dict, get_family  # noqa: E402
from train.model.official import CheckpointMismatchError  # noqa: E402
from train.model.qwen2_vl import hf  # noqa: E402
from train.model.qwen2_vl.config import Qwen2SpecialIds, Qwen2VLConfig, get_config  # noqa: E402
from train.model.qwen2_vl.model import Qwen2VL  # noqa: E402
from train.model.qwen2_vl.rope import mrope_positions  # noqa: E402

IDS = Qwen2SpecialIds()
VS, VE, PAD = IDS.vision_start, IDS.vision_end, IDS.image_pad
MERGE = 2


def _hf_config(tie: bool = False) -> T.Qwen2VLConfig:
    return T.Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=tie,
    )


def _reference(tie: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    ref = T.Qwen2VLForConditionalGeneration(_hf_config(tie)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or dropped one shows
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return ref


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference model, its save_pretrained dir, our model loaded from it through the importer)."""
    d = tmp_path_factory.mktemp("qwen2vl_ref")
    ref = _reference()
    ref.save_pretrained(d)
    return ref, d, hf.build_from_hf(d).eval()


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _sample(text_lens: list[int], sizes: list[tuple[int, int]], seed: int = 0):
    """ids with text runs and images between them; returns (ids list, pixel_values, grid)."""
    g = torch.Generator().manual_seed(seed)
    ims = [_image(h, w, seed * 10 + i) for i, (h, w) in enumerate(sizes)]
    pv, grid = preprocess(ims) if ims else (None, None)
    toks: list[int] = []
    for i, n in enumerate(text_lens):
        toks += torch.randint(10, 5000, (n,), generator=g).tolist()
        if i < len(sizes):
            toks += [VS] + [PAD] * int(grid[i].prod() // MERGE**2) + [VE]
    return toks, pv, grid


def _ref_logits(ref, ids, pv=None, grid=None):
    kw = {}
    if pv is not None:
        kw = dict(pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(ids == PAD).int())
    with torch.no_grad():
        return ref(input_ids=ids, **kw).logits


# ------------------------------------------------------------------------------------------ ids / config
def test_special_ids_match_reference_config():
    c = T.Qwen2VLConfig()
    assert (IDS.image_pad, IDS.video_pad, IDS.vision_start, IDS.vision_end) == (
        c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id)
    assert len(set(vars(IDS).values())) == len(vars(IDS))  # no id used twice


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="mrope_section"):
        get_config("qwen2_vl_tiny", llm={"mrope_section": (2, 2, 2)})
    with pytest.raises(ValueError, match="unknown model config key.*llm.kvheads"):
        Qwen2VLConfig.from_dict({"llm": {"kvheads": 2}})
    assert get_config("qwen2_vl_2b").llm.tie_embeddings and not get_config("qwen2_vl_7b").llm.tie_embeddings


# ------------------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("h,w", [(56, 84), (84, 56), (37, 100), (300, 200), (20, 20), (56, 56), (1000, 30)])
def test_preprocess_matches_reference_processor(h, w):
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)  # small budget: large images get resized down
    proc = T.Qwen2VLImageProcessor(**kw)
    ims = [_image(h, w, 1), _image(w, h, 2)]
    ref = proc(images=ims, return_tensors="pt")
    pv, grid = preprocess(ims, **kw)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert pv.shape == ref["pixel_values"].shape
    assert torch.equal(pv, ref["pixel_values"])  # same ops: bit-identical
    for (_t, gh, gw), im in zip(grid.tolist(), ims):
        assert n_image_tokens(im.height, im.width, **kw) == gh * gw // 4


def test_smart_resize_bounds():
    for h, w in [(10, 10), (5000, 3000), (28, 2000), (333, 777)]:
        rh, rw = smart_resize(h, w, 28, 3136, 200_000)
        assert rh % 28 == 0 and rw % 28 == 0 and 3136 <= rh * rw <= 200_000
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


# ------------------------------------------------------------------------------------------ M-RoPE
def test_rope_index_matches_reference(pair):
    ref = pair[0]
    a, _, ga = _sample([3, 2, 4], [(56, 84), (84, 112)], seed=1)
    b, _, gb = _sample([5, 1], [(112, 56)], seed=2)
    T_ = max(len(a), len(b))
    ids = torch.full((2, T_), IDS.eod)
    mask = torch.zeros(2, T_, dtype=torch.long)
    ids[0, :len(a)], mask[0, :len(a)] = torch.tensor(a), 1
    ids[1, T_ - len(b):], mask[1, T_ - len(b):] = torch.tensor(b), 1  # left padding
    grid = torch.cat([ga, gb])
    want, _ = ref.model.get_rope_index(ids, (ids == PAD).int(), grid, attention_mask=mask)
    got = mrope_positions(ids, grid, PAD, MERGE, segment_ids=mask)
    m = mask.bool()
    assert torch.equal(got[:, m], want[:, m])
    # the image tokens really use 2D positions (the test would pass vacuously on text only)
    assert (got[1] != got[2]).any()


def test_rope_positions_restart_per_packed_sample():
    a, _, ga = _sample([2, 3], [(56, 84)], seed=3)
    b, _, gb = _sample([4, 2], [(84, 84)], seed=4)
    ids = torch.tensor([a + b])
    seg = torch.tensor([[1] * len(a) + [2] * len(b)])
    packed = mrope_positions(ids, torch.cat([ga, gb]), PAD, MERGE, segment_ids=seg)
    pa = mrope_positions(torch.tensor([a]), ga, PAD, MERGE)
    pb = mrope_positions(torch.tensor([b]), gb, PAD, MERGE)
    assert torch.equal(packed, torch.cat([pa, pb], dim=2))
    pos1d = torch.tensor([list(range(len(a))) + list(range(len(b)))])  # the packer's 1-D restart positions
    assert torch.equal(mrope_positions(ids, torch.cat([ga, gb]), PAD, MERGE, position_ids=pos1d), packed)


# ------------------------------------------------------------------------------------------ logits parity
def test_text_only_logits_match(pair):
    ref, _, ours = pair
    ids = torch.randint(0, 151936, (2, 17), generator=torch.Generator().manual_seed(0))
    want = _ref_logits(ref, ids)
    with torch.no_grad():
        got = ours(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sizes", [[(56, 84)], [(56, 84), (112, 56)]], ids=["one_image", "two_images"])
def test_image_logits_match(pair, sizes):
    ref, _, ours = pair
    toks, pv, grid = _sample([4, 3, 5][: len(sizes) + 1], sizes, seed=len(sizes))
    ids = torch.tensor([toks])
    want = _ref_logits(ref, ids, pv, grid)
    with torch.no_grad():
        got = ours(ids, pixel_values=pv, image_grid_thw=grid).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the images matter: zeroing the pixels changes the logits after the first image
    with torch.no_grad():
        other = ours(ids, pixel_values=torch.zeros_like(pv), image_grid_thw=grid).logits
    assert (other - got).abs().max() > 1e-3


def test_uint8_one_frame_patches_equal_float_path(pair):
    ours = pair[2]
    toks, pv, grid = _sample([3, 2], [(84, 56)], seed=5)
    u8, g = to_patches_uint8(_image(84, 56, 50))
    assert torch.equal(torch.tensor([g]), grid) and u8.dtype == torch.uint8 and u8.shape[1] == 3 * 14 * 14
    ids = torch.tensor([toks])
    with torch.no_grad():
        a = ours(ids, pixel_values=pv, image_grid_thw=grid).logits
        b = ours(ids, pixel_values=u8, image_grid_thw=grid).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_packed_row_equals_separate_forwards(pair):
    ours = pair[2]
    a, pva, ga = _sample([3, 4], [(56, 84)], seed=6)
    b, pvb, gb = _sample([2, 2, 3], [(84, 112), (56, 56)], seed=7)
    pad = 3
    ids = torch.tensor([a + b + [IDS.eod] * pad])
    seg = torch.tensor([[1] * len(a) + [2] * len(b) + [0] * pad])
    labels = ids.clone()
    labels[ids == PAD] = -100
    pv, grid = torch.cat([pva, pvb]), torch.cat([ga, gb])
    with torch.no_grad():
        packed = ours(ids, pixel_values=pv, image_grid_thw=grid, segment_ids=seg).logits[0]
        la = ours(torch.tensor([a]), pixel_values=pva, image_grid_thw=ga).logits[0]
        lb = ours(torch.tensor([b]), pixel_values=pvb, image_grid_thw=gb).logits[0]
        loss_p = ours(ids, labels=labels, pixel_values=pv, image_grid_thw=grid, segment_ids=seg)
        loss_a = ours(torch.tensor([a]), labels=labels[:, :len(a)], pixel_values=pva, image_grid_thw=ga)
        loss_b = ours(torch.tensor([b]), labels=labels[:, len(a):len(a) + len(b)], pixel_values=pvb,
                      image_grid_thw=gb)
    torch.testing.assert_close(packed[:len(a)], la, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[len(a):len(a) + len(b)], lb, rtol=0, atol=1e-5)
    assert int(loss_p.n_tokens) == int(loss_a.n_tokens) + int(loss_b.n_tokens)
    torch.testing.assert_close(loss_p.loss_sum, loss_a.loss_sum + loss_b.loss_sum, rtol=1e-5, atol=1e-4)


def test_debug_checks_catch_wrong_image_token_count(pair):
    ours = pair[2]
    toks, pv, grid = _sample([2, 2], [(56, 84)], seed=8)
    toks.remove(PAD)
    with pytest.raises(ValueError, match="runs of"):
        ours.embed_inputs(torch.tensor([toks]), pv, grid, check=True)


# ------------------------------------------------------------------------------------------ training
def test_training_step_gradients_and_imageless_rank():
    torch.manual_seed(0)
    model = Qwen2VL(get_config("qwen2_vl_tiny")).train()
    toks, pv, grid = _sample([3, 4], [(56, 84)], seed=9)
    ids = torch.tensor([toks])
    out = model(ids, labels=ids, pixel_values=pv, image_grid_thw=grid)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.adapter.c_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out = model(ids[:, :3], labels=ids[:, :3])  # no image: the dummy path still reaches the vision params
    out.loss.backward()
    assert model.visual.conv1.weight.grad is not None and model.visual.conv1.weight.grad.abs().sum() == 0


def test_generate_matches_full_forward_argmax(pair):
    ours = pair[2]
    toks, pv, grid = _sample([3, 2], [(56, 56)], seed=10)
    ids = torch.tensor([toks])
    out = ours.generate(ids, pv, max_new_tokens=4, eos_id=-1, image_grid_thw=grid)
    assert out.shape[1] == ids.shape[1] + 4
    with torch.no_grad():  # each generated token is the argmax of a full (cache-free) forward over its prefix
        for t in range(ids.shape[1], out.shape[1]):
            logits = ours(out[:, :t], pixel_values=pv, image_grid_thw=grid).logits
            assert int(logits[0, -1].argmax()) == int(out[0, t])


# ------------------------------------------------------------------------------------------ checkpoints
def test_import_both_key_generations(pair, tmp_path):
    from safetensors.torch import save_file

    ref, d, ours = pair
    keys = set(json.loads((d / "config.json").read_text()))
    assert "model_type" in keys
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}  # in memory: the transformers-5 names
    assert any(k.startswith("model.language_model.") for k in state)
    (tmp_path / "new").mkdir()
    save_file(state, str(tmp_path / "new" / "model.safetensors"))
    (tmp_path / "new" / "config.json").write_text((d / "config.json").read_text())
    other = hf.build_from_hf(tmp_path / "new")
    a, b = ours.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", hf.KEY_LAYOUTS)
def test_export_loads_in_transformers_with_same_logits(pair, tmp_path, layout):
    ref, _, ours = pair
    out = hf.export_hf(ours, tmp_path / "export", key_layout=layout, max_shard_bytes=20_000_000)
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded + index
    back = T.Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    toks, pv, grid = _sample([2, 3, 2], [(84, 56), (56, 56)], seed=11)
    ids = torch.tensor([toks])
    want = _ref_logits(ref, ids, pv, grid)
    torch.testing.assert_close(_ref_logits(back, ids, pv, grid), want, rtol=0, atol=1e-5)
    again = hf.build_from_hf(out)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_preprocessor_config_saved_and_read_back(pair, tmp_path):
    ours = pair[2]
    cfg = Qwen2VLConfig.from_dict({**ours.cfg.to_dict(), "preprocess": {"min_pixels": 4 * 784,
                                                                        "max_pixels": 100 * 784}})
    out = hf.export_hf(ours.state_dict(), tmp_path / "e", cfg=cfg)
    assert hf.read_preprocess(out) == cfg.preprocess
    assert hf.config_from_hf(out).preprocess == cfg.preprocess
    proc = T.Qwen2VLImageProcessor.from_pretrained(out)
    im = _image(400, 300, 3)
    pv, grid = preprocess([im], cfg.preprocess.min_pixels, cfg.preprocess.max_pixels)
    assert torch.equal(proc(images=[im], return_tensors="pt")["image_grid_thw"], grid)
    assert int(grid.prod()) // 4 <= 100


def test_tied_embeddings_roundtrip(tmp_path):
    ref = _reference(tie=True, seed=1)
    ref.save_pretrained(tmp_path / "ref")
    ours = hf.build_from_hf(tmp_path / "ref").eval()
    assert ours.cfg.llm.tie_embeddings and ours.llm.lm_head.weight is ours.llm.wte.weight
    ids = torch.randint(0, 151936, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, _ref_logits(ref, ids), rtol=0, atol=1e-5)
    out = hf.export_hf(ours, tmp_path / "exp")
    assert "lm_head.weight" not in json.loads((out / hf.INDEX_NAME).read_text())["weight_map"]
    back = T.Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_ref_logits(back, ids), _ref_logits(ref, ids), rtol=0, atol=1e-5)


def test_mismatched_checkpoint_is_one_error_naming_keys(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, d, _ = pair
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    state["model.extra.weight"] = torch.zeros(2)
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((d / "config.json").read_text())
    model = Qwen2VL(get_config("qwen2_vl_tiny"))
    before = model.llm.wte.weight.clone()
    with pytest.raises(CheckpointMismatchError) as e:
        hf.load_hf(model, tmp_path / "bad")
    msg = str(e.value)
    assert "llm.h.1.attn.c_attn.weight" in msg and "model.extra.weight" in msg and "nothing was loaded" in msg
    assert torch.equal(model.llm.wte.weight, before)


def test_config_json_roundtrip(pair):
    ours = pair[2]
    d = hf.config_to_hf(ours.cfg)
    assert hf.config_from_hf(d, preprocess=ours.cfg.preprocess) == ours.cfg
    with pytest.raises(ValueError, match="model_type"):
        hf.config_from_hf({**d, "model_type": "qwen"})


# ------------------------------------------------------------------------------------------ registry
def test_family_registry_builds_from_model_group_files():
    import yaml

    from train.config import CONF_DIR

    for name in ("qwen2_vl_tiny", "qwen2_vl_2b", "qwen2_vl_7b"):
        d = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())
        fam, rest = family_for_model_dict(d)
        assert fam.name == "qwen2_vl"
        assert fam.config_from_dict(rest) == fam.get_config(name)  # the group file = the named config
    fam, rest = family_for_model_dict(yaml.safe_load((CONF_DIR / "model" / "micro.yaml").read_text()))
    assert fam.name == "qwen_vl" and fam.config_from_dict(rest).llm.hidden == 64
    q2 = get_family("qwen2_vl")
    assert q2.prompt.image(3) == "<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>"
    assert q2.prompt.box(1, 2, 3, 4) == "<|box_start|>(1,2),(3,4)<|box_end|>"
    assert FAMILIES["qwen_vl"].prompt.image() == "<img>" + "<imgpad>" * 256 + "</img>"
    assert callable(q2.checkpoint.fn("load")) and q2.batch_keys == ("image_grid_thw",)
    for fam in FAMILIES.values():  # every adapter reference resolves
        assert all(callable(fam.checkpoint.fn(w)) for w in ("load", "build", "export", "config_from", "config_to"))
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("llava")


# ------------------------------------------------------------------------------------------ shared tools
def test_lora_freeze_and_optimizer_take_the_family_unchanged(tmp_path):
    from train.freeze import apply_freeze, param_counts
    from train.lora import apply_lora, merged_state_dict
    from train.optim import param_groups

    torch.manual_seed(0)
    model = Qwen2VL(get_config("qwen2_vl_tiny"))
    from train.model.families import family_of_model

    assert family_of_model(model).name == "qwen2_vl"
    apply_freeze(model, ["visual"])
    counts = param_counts(model)
    assert counts["visual"][0] == 0 and counts["adapter"][0] == counts["adapter"][1] > 0
    groups = param_groups(model, 1e-4, 0.1, llrd=0.9, n_vit_blocks=None)
    names = {n for g in groups for n in g["names"]}
    assert "llm.wte.weight" in names and not any(n.startswith("visual.") for n in names)

    lm = Qwen2VL(get_config("qwen2_vl_tiny"))
    apply_lora(lm, r=4, alpha=8, dropout=0.0)  # the default targets: attn.c_attn, attn.c_proj, mlp.w1, mlp.w2
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".attn.c_attn.lora_A" in n for n in trainable) and any(".mlp.w2.lora_B" in n for n in trainable)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    toks, pv, grid = _sample([2, 3], [(56, 56)], seed=12)
    ids = torch.tensor([toks])
    lm.eval()
    with torch.no_grad():
        want = lm(ids, pixel_values=pv, image_grid_thw=grid).logits
    merged = merged_state_dict(lm)
    plain = Qwen2VL(get_config("qwen2_vl_tiny")).eval()
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, pixel_values=pv, image_grid_thw=grid).logits, want, rtol=1e-4,
                                   atol=1e-4)
    back = T.Qwen2VLForConditionalGeneration.from_pretrained(hf.export_hf(plain, tmp_path / "m"),
                                                             dtype=torch.float32).eval()
    torch.testing.assert_close(_ref_logits(back, ids, pv, grid), want, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_generate_equals_single_rows(pair):
    ours = pair[2]
    a, pva, ga = _sample([3, 2], [(56, 84)], seed=13)
    b, pvb, gb = _sample([2, 6, 1], [(56, 56), (84, 56)], seed=14)
    T_ = max(len(a), len(b))
    ids = torch.full((2, T_), IDS.eod)
    mask = torch.zeros(2, T_, dtype=torch.long)
    ids[0, T_ - len(a):], mask[0, T_ - len(a):] = torch.tensor(a), 1
    ids[1, T_ - len(b):], mask[1, T_ - len(b):] = torch.tensor(b), 1
    out = ours.generate(ids, torch.cat([pva, pvb]), max_new_tokens=3, eos_id=-1, attention_mask=mask,
                        image_grid_thw=torch.cat([ga, gb]))
    oa = ours.generate(torch.tensor([a]), pva, max_new_tokens=3, eos_id=-1, image_grid_thw=ga)
    ob = ours.generate(torch.tensor([b]), pvb, max_new_tokens=3, eos_id=-1, image_grid_thw=gb)
    assert out[0, T_:].tolist() == oa[0, len(a):].tolist() and out[1, T_:].tolist() == ob[0, len(b):].tolist()


def test_kv_cache_decode_logits_equal_full_forward(pair):
    """Each cached decoding step (left-padded batch with images) gives the logits of a full forward over the
    prefix: the decode positions continue after the largest M-RoPE index, per row."""
    ours = pair[2]
    a, pva, ga = _sample([3, 2], [(56, 84)], seed=15)
    b, pvb, gb = _sample([2, 4, 1], [(112, 56), (56, 56)], seed=16)
    T_ = max(len(a), len(b))
    ids = torch.full((2, T_), IDS.eod)
    mask = torch.zeros(2, T_, dtype=torch.long)
    ids[0, T_ - len(a):], mask[0, T_ - len(a):] = torch.tensor(a), 1
    ids[1, T_ - len(b):], mask[1, T_ - len(b):] = torch.tensor(b), 1
    pv, grid = torch.cat([pva, pvb]), torch.cat([ga, gb])
    hidden, cache, pos, seg = ours.prefill(ids, pv, grid, mask)
    new = torch.tensor([[11, 12, 13], [21, 22, 23]])
    for t in range(new.shape[1]):
        hidden = ours.decode_step(new[:, t], cache, pos, seg)
        pos = pos + 1
        step = ours.llm.logits(hidden[:, -1])
        for r, (row, pvr, gr) in enumerate([(a, pva, ga), (b, pvb, gb)]):
            full = torch.tensor([row + new[r, :t + 1].tolist()])
            with torch.no_grad():
                want = ours(full, pixel_values=pvr, image_grid_thw=gr).logits[0, -1]
            torch.testing.assert_close(step[r], want, rtol=0, atol=1e-5)
