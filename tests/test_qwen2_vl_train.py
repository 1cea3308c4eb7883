"""Qwen2-VL through the shared training front door: the family picked by the model group file types the config
(misspelt keys still fail), the same loop / engines / recipes / shards train it, and 2-process ZeRO-2 / ZeRO-3
runs with a rank that has no image in its batch match one process."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from launching import clean_env, run_group
from omegaconf import OmegaConf

from train.config import (
    SCHEMAS,
    ConfigError,
    ModelConf,
    Qwen2VLModelConf,
    compose_config,
    load_config,
    model_cfg,
)
from train.model.families import FAMILIES
from train.model.qwen2_vl.config import Qwen2VLConfig
from train.synthetic import for_model

ROOT = Path(__file__).resolve().parent.parent
DEMO_CACHE = ROOT / ".cache" / "test-demo-s0.1"  # shared with test_demo_run.py (build_demo is idempotent)
RECIPE = "recipe=demo_qwen2_vl_stage2"
# init.from_stage_dir=null: the recipe chains from demo_qwen2_vl_stage1's export; these runs start from random weights
SMALL = ["data=synthetic", "data.seq_len=96", "logging=quiet", "logging.every=1", "eval.at_start=false",
         "eval.at_end=false", "train.save_every=0", "init.from_stage_dir=null"]


# ----------------------------------------------------------------------------------------------- config
def test_every_family_has_a_schema():
    assert set(SCHEMAS) == set(FAMILIES)


def test_family_types_the_model_node():
    q2 = compose_config("demo_qwen2_vl_stage2")
    assert OmegaConf.get_type(q2.model) is Qwen2VLModelConf and q2.model.family == "qwen2_vl"
    assert q2.model.preprocess.max_pixels == 224 * 224
    assert isinstance(model_cfg(q2), Qwen2VLConfig)
    # the same recipe set, the other family: the Qwen-VL schema as before
    q1 = compose_config("demo_stage2")
    assert OmegaConf.get_type(q1.model) is ModelConf and q1.model.family == "qwen_vl"
    assert type(model_cfg(q1)).__name__ == "QwenVLConfig"
    # another geometry of the family by override (the group file and a key of it)
    sw = compose_config("finetune_qwen2_vl_full", ["model=qwen2_vl_2b", "model.llm.layers=3"])
    assert OmegaConf.get_type(sw.model) is Qwen2VLModelConf and sw.model.llm.layers == 3
    assert sw.model.llm.tie_embeddings and sw.model.name == "qwen2_vl_2b"


@pytest.mark.parametrize("override,msg", [
    ("model.preprocess.min_pixel=10", "model.preprocess.min_pixels"),  # misspelt: did you mean
    ("model.vision.image_size=448", "image_size"),  # a Qwen-VL key is not a Qwen2-VL key
    ("model.llm.hidden=abc", "model.llm.hidden"),  # wrong type
])
def test_qwen2_keys_are_checked(override, msg):
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        compose_config("demo_qwen2_vl_stage2", [override])


def test_qwen_vl_errors_unchanged():
    with pytest.raises(ConfigError, match=r"did you mean model\.vision\.width"):
        compose_config("demo_stage2", ["model.vision.widht=3"])


@pytest.mark.parametrize("extra,msg", [
    (["data.seq_len=6"], r"must fit one image span \(6 tokens\)"),  # min_pixels 3136 -> 4 tokens + 2 markers
    (["init.openclip=/x"], "init.openclip: Qwen-VL component weights"),
    (["model.ids.image_pad=5"], "model.ids.image_pad=5"),  # shards are tokenised with the Qwen2-VL ids
])
def test_validate_is_family_aware(extra, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config([RECIPE, *extra])
    load_config([RECIPE, "data.seq_len=7"])  # the smallest row that fits


# ------------------------------------------------------------------------------------------- synthetic
def _synthetic(rank: int, **kw):
    m = compose_config("demo_qwen2_vl_stage2").model
    args = dict(seed=0, seq_len=96, micro_batch=1, grad_accum=2, world_size=2) | kw
    return for_model(m, rank=rank, **args)


def test_synthetic_qwen2_batches_fit_the_model():
    from train.model.qwen2_vl.config import tiny
    from train.model.qwen2_vl.model import Qwen2VL

    model = Qwen2VL(tiny())
    src = _synthetic(0, micro_batch=4, grad_accum=1, world_size=1)
    b = src.make(0)
    grid = b["image_grid_thw"]
    assert grid.shape == (3, 3) and b["pixel_values"].dtype == torch.uint8  # row 3 has no image
    assert b["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert len({tuple(g) for g in grid.tolist()}) > 1  # images of one batch differ in size
    model.check_images(b["input_ids"], grid)  # every <|image_pad|> run matches its grid
    out = model(b["input_ids"], b["labels"], b["pixel_values"], b["segment_ids"], b["position_ids"], grid)
    assert torch.isfinite(out.loss) and int(out.n_tokens) > 0


def test_a_rank_without_image_meets_a_rank_with_one():
    """The premise of the 2-process runs: in step 1 one rank's micro-batch has an image, the other's not."""
    r0, r1 = _synthetic(0), _synthetic(1)
    n0 = [r0.make(k)["image_grid_thw"].shape[0] for k in range(2)]
    n1 = [r1.make(k)["image_grid_thw"].shape[0] for k in range(2)]
    assert n0 == [1, 1] and n1 == [1, 0]


# ----------------------------------------------------------------------------------------------- loop
def test_single_engine_loss_falls_and_export_is_hf(tmp_path):
    from train.loop import train

    cfg = load_config([RECIPE, *SMALL, "train.steps=12", "train.micro_batch_size=2", "train.global_batch_size=4",
                       "optim.lr=3e-3", "optim.warmup_steps=2", "optim.min_lr=3e-4", f"output_dir={tmp_path}"])
    losses = train(cfg)["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    final = tmp_path / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "qwen2_vl"
    pre = json.loads((final / "preprocessor_config.json").read_text())
    assert pre["max_pixels"] == 224 * 224  # the run's pixel limits travel with the weights
    # the export is the next run's init, through the family's checkpoint loader (hub key layout)
    from safetensors.torch import load_file

    from train.build import build_model

    state: dict[str, torch.Tensor] = {}
    for f in sorted(final.glob("*.safetensors")):
        state.update(load_file(str(f)))
    fresh = build_model(load_config([RECIPE, *SMALL]))
    loaded = build_model(load_config([RECIPE, *SMALL, f"init.official={final}"]))
    assert torch.equal(loaded.llm.wte.weight, state["model.embed_tokens.weight"])
    assert not torch.equal(fresh.llm.wte.weight, loaded.llm.wte.weight)

    # LoRA fine-tune of that export: the final export merges the adapters into the family's own layout
    lora_out = tmp_path / "lora"
    cfg = load_config(["recipe=finetune_qwen2_vl_lora", "model=qwen2_vl_tiny", "engine=single", "engine.precision=fp32",
                       "engine.grad_checkpointing=false", *SMALL, "train.steps=2", "train.micro_batch_size=2",
                       "train.global_batch_size=2", "optim.lr=1e-2", "optim.warmup_ratio=0", "lora.r=4",
                       f"init.official={final}", f"output_dir={lora_out}"])
    train(cfg)
    merged: dict[str, torch.Tensor] = {}
    for f in sorted((lora_out / "final").glob("*.safetensors")):
        merged.update(load_file(str(f)))
    assert merged.keys() == state.keys()
    changed = {k for k in state if not torch.equal(state[k], merged[k])}
    assert changed and all(k.startswith("model.layers.") and "proj" in k for k in changed), sorted(changed)[:8]
    assert (lora_out / "final_lora").is_dir()


def test_demo_shards_stream_resumes_exactly():
    """The family-neutral demo shards through build_stage_stream(family="qwen2_vl"): Qwen2-VL batches, and a
    stream restored from a state_dict continues with the same batches."""
    from data.demo import build_demo
    from data.pipeline import build_stage_stream

    build_demo(DEMO_CACHE, seed=0, scale=0.1)
    srcs = [{"name": "vqa", "shards": str(DEMO_CACHE / "vqa"), "weight": 1.0},
            {"name": "ref_grounding", "shards": str(DEMO_CACHE / "ref_grounding"), "weight": 1.0}]
    kw = dict(family="qwen2_vl", image_size=None, seq_len=256, batch_size=2, seed=0, buffer_size=8, pack_buffer=8,
              min_pixels=3136, max_pixels_resize=224 * 224, pin_memory=False)
    a = build_stage_stream(2, srcs, **kw)
    first = next(a)
    assert first["image_grid_thw"].shape[1] == 3 and first["pixel_values"].shape[0] == int(
        first["image_grid_thw"].prod(-1).sum())
    state = a.state_dict()
    want = [next(a) for _ in range(2)]
    b = build_stage_stream(2, srcs, **kw)
    b.load_state_dict(state)
    got = [next(b) for _ in range(2)]
    for x, y in zip(want, got):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(Exception, match="min_pixels"):  # a state from other pixel limits does not fit
        c = build_stage_stream(2, srcs, **(kw | {"min_pixels": 6272}))
        c.load_state_dict(state)


# ---------------------------------------------------------------------------------------- 2 processes
DIST = [RECIPE, *SMALL, "train.steps=3", "train.micro_batch_size=1", "train.global_batch_size=4",
        "optim.warmup_steps=1", "optim.lr=2e-3", "train.export_final=true"]


def _curve(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _run(cmd: list[str]) -> str:
    p = run_group(cmd, clean_env(), 300)
    assert p.returncode == 0, p.stdout[-6000:]
    return p.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single_qwen2")
    _run([sys.executable, "-m", "train", *DIST, f"output_dir={out}"])
    return _curve(out)


# ZeRO-3's default build (zero.Init) is the one in the default suite: it also checks that every module's init
# goes through Module.apply (a plain loop would initialise empty partitions); the others are extended.


@pytest.mark.slow
@pytest.mark.parametrize("engine,extra", [
    pytest.param("zero2", [], marks=pytest.mark.extended),
    pytest.param("zero3", ["engine.zero_init=false"], marks=pytest.mark.extended),  # built whole, then partitioned
    pytest.param("zero3", []),  # built partitioned under zero.Init
])
def test_two_process_zero_matches_single_process(engine, extra, reference, tmp_path):
    out = tmp_path / engine
    log = _run(["bash", "launch/single_node.sh", "2", *DIST, f"engine={engine}", *extra, f"output_dir={out}"])
    assert f"world size 2, engine deepspeed ZeRO-{engine[-1]}" in log
    got = _curve(out)
    assert len(got) == len(reference) == 3
    assert got == pytest.approx(reference, rel=1e-5, abs=1e-5)
    assert (out / "final" / "preprocessor_config.json").is_file()  # rank 0 exported the consolidated weights
    print(f"{engine}: losses {got} vs 1 process {reference}")


@pytest.mark.parametrize("recipe", ["finetune_qwen2_vl_full", "finetune_qwen2_vl_lora", "finetune_qwen2_vl_qlora"])
@pytest.mark.parametrize("model", ["qwen2_vl_2b", "qwen2_vl_7b"])
def test_finetune_recipes_validate(recipe, model, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # the Q-LoRA recipe asks for engine.device=cuda
    c = load_config([f"recipe={recipe}", f"model={model}", "data.root=/d", "init.official=/ckpt"], world_size=8)
    assert c.model.name == model and c.init.required and c.train.stage == 3
    assert (c.optim.lr, c.optim.weight_decay, list(c.optim.betas), c.optim.warmup_ratio) == (1e-5, 0.1, [0.9, 0.95], 0.01)
    assert c.engine.zero_stage == (3 if recipe.endswith("full") else 2) and c.lora.enabled == recipe.endswith("lora")
    assert c.lora.qlora == recipe.endswith("qlora") and c.engine.device == ("cuda" if c.lora.qlora else "auto")
    if c.lora.qlora:  # the LoRA recipe's adapters, on the 4-bit base
        assert (c.lora.quant_type, c.lora.double_quant, c.lora.r) == ("nf4", True, 64)
        assert "mlp.c_proj" in c.lora.targets
    with pytest.raises(ConfigError, match="init.required"):
        load_config([f"recipe={recipe}", f"model={model}", "data.root=/d"], world_size=8)


# recipe -> (stage, train.freeze, the recipe whose <output_dir>/final it starts from); the Qwen2-VL report's three
# stages: ViT-side alignment (ViT + merger, LLM frozen), all parameters, SFT with the ViT frozen
STAGE_RECIPES = {
    "qwen2_vl_stage1_pretrain": (1, ["llm"], None),
    "qwen2_vl_stage2_multitask": (2, [], "qwen2_vl_stage1_pretrain"),
    "qwen2_vl_stage3_sft": (3, ["visual"], "qwen2_vl_stage2_multitask"),
    "demo_qwen2_vl_stage1": (1, ["llm"], None),
    "demo_qwen2_vl_stage2": (2, [], "demo_qwen2_vl_stage1"),
    "demo_qwen2_vl_stage3": (3, ["visual"], "demo_qwen2_vl_stage2"),
}


@pytest.mark.parametrize("recipe", sorted(STAGE_RECIPES))
def test_stage_recipes_validate_and_chain(recipe):
    stage, freeze, prev = STAGE_RECIPES[recipe]
    demo = recipe.startswith("demo_")
    # the full recipes on the other geometry of the family (model=qwen2_vl_2b), on 8 ranks; the demos as they are
    extra, ws = ([], 1) if demo else (["data.root=/d", "model=qwen2_vl_2b"], 8)
    c = load_config([f"recipe={recipe}", *extra], world_size=ws)
    assert c.run_name == recipe and c.model.family == "qwen2_vl"
    assert c.model.name == ("qwen2_vl_tiny" if demo else "qwen2_vl_2b")
    assert c.train.stage == stage and list(c.train.freeze) == freeze and not c.lora.enabled
    assert c.data.demo.enabled == demo and (c.engine.kind == "single") == demo
    if prev is None:
        assert c.init.from_stage_dir is None
    else:  # starts from the previous stage's export: that recipe's <output_dir>/final
        assert c.init.from_stage_dir == f"{compose_config(prev, extra).output_dir}/final"


def _export(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.extended  # ~45 s on a loaded 2-core machine (three builds, exports, the 151936-wide output layer)
def test_demo_stage_chain_runs(tmp_path, monkeypatch, caplog):
    """demo_qwen2_vl_stage1 -> 2 -> 3, two steps each, each stage from the previous one's Hugging Face export: the
    ViT trained in stage 2 arrives unchanged at the end of stage 3 (frozen there), the merger and LLM move."""
    import logging

    import train.loop as loop
    from data.demo import build_demo

    build_demo(DEMO_CACHE, seed=0, scale=0.1)
    monkeypatch.setattr(loop, "_draw_curves", lambda out: None)  # matplotlib: seconds, and not what is tested
    small = [f"data.demo.dir={DEMO_CACHE}", "data.demo.scale=0.1", "train.steps=2", "optim.warmup_steps=1",
             "logging=quiet", "logging.peak_flops=1e12", "eval.at_start=false", "eval.at_end=false",
             "train.resume=never", "data.seq_len=320", "train.micro_batch_size=1", "train.global_batch_size=1",
             "data.buffer_size=4", "data.options.pack_buffer=4"]
    finals: list[Path] = []
    for s in (1, 2, 3):
        r = f"demo_qwen2_vl_stage{s}"
        init = [f"init.from_stage_dir={finals[-1]}"] if finals else []
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="train.build"):
            res = loop.train(load_config([f"recipe={r}", *small, *init, f"output_dir={tmp_path / r}"]))
        assert len(res["losses"]) == 2 and all(math.isfinite(x) for x in res["losses"]), (r, res["losses"])
        if finals:
            assert "init.from_stage_dir: loaded" in caplog.text and str(finals[-1]) in caplog.text, caplog.text
        finals.append(tmp_path / r / "final")
        assert json.loads((finals[-1] / "config.json").read_text())["model_type"] == "qwen2_vl"
    w1, w2, w3 = (_export(f) for f in finals)
    vit = [k for k in w3 if k.startswith("visual.") and ".merger." not in k]
    rest = [k for k in w3 if k not in vit]
    assert vit and rest and w1.keys() == w2.keys() == w3.keys()
    assert all(torch.equal(w3[k], w2[k]) for k in vit)  # stage 3: ViT frozen, as stage 2 exported it
    assert not all(torch.equal(w2[k], w1[k]) for k in vit)  # stage 2 trained it
    assert not all(torch.equal(w3[k], w2[k]) for k in rest)  # stage 3 trained merger + LLM
    llm = [k for k in w1 if not k.startswith("visual.")]
    assert not all(torch.equal(w2[k], w1[k]) for k in llm)  # stage 1 froze the LLM, stage 2 trains it


def test_loop_resumes_on_demo_shards(tmp_path):
    """A Qwen2-VL run on the demo shards resumed from its mid-run checkpoint continues with the same batches."""
    from train.loop import train

    base = [RECIPE, f"data.demo.dir={DEMO_CACHE}", "data.demo.scale=0.1", "data.seq_len=256", "train.steps=4",
            "train.save_every=2", "train.keep_last=2", "train.micro_batch_size=2", "train.global_batch_size=2",
            "logging=quiet", "logging.every=1", "eval.at_start=false", "eval.at_end=false",
            "train.export_final=false", "optim.warmup_steps=1", "init.from_stage_dir=null"]
    first = train(load_config([*base, f"output_dir={tmp_path / 'a'}"]))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
    second = train(load_config([*base, f"output_dir={tmp_path / 'b'}", f"train.resume={ckpt}"]))
    assert second["start_step"] == 2 and len(second["losses"]) == 2
    assert second["losses"] == pytest.approx(first["losses"][2:], rel=1e-6)
