"""Recipes compose, carry the paper's hyperparameters, and bad configs fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from train.config import (
    ConfigError,
    compose_config,
    list_recipes,
    load_config,
    resolve_grad_accum,
    strip_launcher_args,
    warmup_steps,
)
from train.engine import deepspeed_config
from train.model.config import get_config

ROOT = Path(__file__).resolve().parent.parent
FULL = {"stage1_pretrain", "stage2_multitask", "stage3_sft"}
FULL_QWEN2_VL = {"qwen2_vl_stage1_pretrain", "qwen2_vl_stage2_multitask", "qwen2_vl_stage3_sft"}
DEMO = {"demo_stage1", "demo_stage2", "demo_stage3", "demo_lora"}
FINETUNE = {"finetune_lora", "finetune_qlora", "finetune_full"}


def test_every_recipe_composes_and_validates(monkeypatch):
    assert FULL | FULL_QWEN2_VL | DEMO | FINETUNE <= set(list_recipes())
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # finetune_qlora is CUDA-only
    for r in list_recipes():
        finetune = r in FINETUNE or r.startswith("finetune_")
        full = r in FULL | FULL_QWEN2_VL or finetune  # real-scale recipes: need data.root, a world of 8 GPUs
        extra = ["data.root=/data"] if full else []
        extra += ["init.official=/ckpt/qwen-vl-chat"] if finetune else []
        ws = 8 if full else 1
        cfg = load_config([f"recipe={r}", *extra], world_size=ws)
        assert cfg.run_name == r


@pytest.mark.parametrize("recipe", sorted(FINETUNE))
def test_finetune_recipes_carry_official_defaults(recipe, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    c = load_config([f"recipe={recipe}", "data.root=/d", "init.official=/ckpt"], world_size=8)
    assert (c.optim.lr, c.optim.weight_decay, list(c.optim.betas), c.optim.warmup_ratio) == (1e-5, 0.1, [0.9, 0.95], 0.01)
    assert c.optim.schedule == "cosine" and c.data.seq_len == 2048 and c.train.global_batch_size == 128
    assert c.engine.grad_checkpointing and c.engine.kind == "deepspeed"
    if recipe == "finetune_full":
        assert not c.lora.enabled and list(c.train.freeze) == ["visual"] and c.engine.zero_stage == 3
    else:
        lo = c.lora
        assert lo.enabled and (lo.r, lo.alpha, lo.dropout) == (64, 16, 0.05) and c.engine.zero_stage == 2
        assert list(lo.targets) == ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"]
        assert lo.qlora == (recipe == "finetune_qlora")


def test_lora_settings_validated(monkeypatch):
    with pytest.raises(ConfigError, match=r"init\.official"):  # the base checkpoint is mandatory
        load_config(["recipe=finetune_lora", "data.root=/d"], world_size=8)
    with pytest.raises(ConfigError, match=r"train\.freeze=\['visual'\] is not used with lora\.enabled"):
        load_config(["recipe=demo_lora", "train.freeze=[visual]"])
    with pytest.raises(ConfigError, match=r"lora\.train_modules: unknown"):
        load_config(["recipe=demo_lora", "lora.train_modules=[vit]"])
    with pytest.raises(ConfigError, match=r"lora\.r >= 1"):
        load_config(["recipe=demo_lora", "lora.r=0"])
    with pytest.raises(ConfigError, match=r"engine\.device=cuda but CUDA"):
        load_config(["recipe=finetune_qlora", "data.root=/d", "init.official=/c"], world_size=8)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    load_config(["recipe=finetune_qlora", "data.root=/d", "init.official=/c", "engine=zero3"], world_size=8)
    with pytest.raises(ConfigError, match=r"lora\.train_modules containing llm"):
        load_config(["recipe=finetune_qlora", "data.root=/d", "init.official=/c", "lora.train_modules=[llm]"],
                    world_size=8)
    with pytest.raises(ConfigError, match=r"lora\.qlora=true needs lora\.enabled"):
        load_config(["recipe=demo_lora", "lora.enabled=false", "lora.qlora=true"])


# (recipe, lr, min_lr, warmup, steps, global batch, seq len, image size, frozen, llrd) from SPEC §4
PAPER = [
    ("stage1_pretrain", 2e-4, 1e-6, 500, 50_000, 30_720, 512, 224, ["llm"], 0.95),
    ("stage2_multitask", 5e-5, 1e-5, 400, 19_000, 4_096, 2048, 448, [], 0.95),
    ("stage3_sft", 1e-5, 1e-6, 3000, 8_000, 128, 2048, 448, ["visual"], 1.0),
]


@pytest.mark.parametrize("recipe,lr,min_lr,warm,steps,gb,seq,img,frozen,llrd", PAPER)
def test_full_recipes_carry_paper_hyperparameters(recipe, lr, min_lr, warm, steps, gb, seq, img, frozen, llrd):
    c = load_config([f"recipe={recipe}", "data.root=/d"], world_size=8)
    assert (c.optim.lr, c.optim.min_lr, warmup_steps(c), c.train.steps) == (lr, min_lr, warm, steps)
    assert (c.train.global_batch_size, c.data.seq_len, c.model.vision.image_size) == (gb, seq, img)
    assert list(c.train.freeze) == frozen and c.optim.llrd == llrd
    assert list(c.optim.betas) == [0.9, 0.98] and c.optim.eps == 1e-6 and c.optim.weight_decay == 0.05
    assert c.optim.grad_clip == 1.0 and c.engine.precision == "bf16" and c.optim.schedule == "cosine"
    assert c.engine.kind == "deepspeed" and c.engine.zero_stage in (1, 2, 3)


def test_stage_chaining_inits():
    s2 = load_config(["recipe=stage2_multitask", "data.root=/d"], world_size=8)
    s3 = load_config(["recipe=stage3_sft", "data.root=/d"], world_size=8)
    assert s2.init.from_stage_dir == "outputs/stage1_pretrain/final"
    assert s3.init.from_stage_dir == "outputs/stage2_multitask/final"
    d3 = load_config(["recipe=demo_stage3"])
    assert d3.init.from_stage_dir == "outputs/demo/demo_stage2/final" and d3.output_dir == "outputs/demo/demo_stage3"
    assert d3.data.heldout.chat.endswith("heldout/chat")


def test_model_group_files_match_named_presets():
    for name in ("tiny", "qwen_vl_9b6", "micro"):
        cfg = compose_config("demo_stage1", [f"model={name}"])
        d = OmegaConf.to_container(cfg.model)
        d.pop("name")
        assert d.pop("family") == "qwen_vl"
        want = get_config(name).to_dict()
        want["vision"]["image_size"] = 224  # the demo_stage1 recipe sets 224
        assert d == want


@pytest.mark.parametrize("override,key", [
    ("optim.lrr=3", "optim.lrr"),  # misspelt key
    ("optim.lr=abc", "optim.lr"),  # wrong type
    ("train.steps=1.5", "train.steps"),
    ("model.vision.widht=8", "model.vision.widht"),
    ("engine=zero4", "engine"),  # unknown group option
    ("data.options.pack_bufer=4", "data.options.pack_bufer"),  # pipeline options are typed too
    ("data.options.pack=maybe", "data.options.pack"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(["recipe=demo_stage1", override])
    assert key in str(e.value)


def test_bad_recipe_file_names_the_key(tmp_path):
    base = (ROOT / "recipes" / "demo_stage1.yaml").read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(base.replace("train:\n", "train:\n  stpes: 3\n"))
    with pytest.raises(ConfigError, match=r"train\.stpes"):
        load_config([f"recipe={typo}"])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(base.replace("  micro_batch_size: 4", "  micro_batch_size: four"))
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size"):
        load_config([f"recipe={wrong}"])
    ok = tmp_path / "mine.yaml"
    ok.write_text(base)
    assert load_config([f"recipe={ok}"]).train.steps == load_config(["recipe=demo_stage1"]).train.steps


def test_semantic_validation_names_keys():
    with pytest.raises(ConfigError, match=r"data\.root"):
        load_config(["recipe=stage1_pretrain"], world_size=8)
    with pytest.raises(ConfigError, match=r"train\.freeze"):
        load_config(["recipe=demo_stage1", "train.freeze=[vision]"])
    with pytest.raises(ConfigError, match=r"optim\.min_lr"):
        load_config(["recipe=demo_stage1", "optim.min_lr=1"])
    with pytest.raises(ConfigError, match=r"engine\.kind=single.*WORLD_SIZE=2"):
        load_config(["recipe=demo_stage1"], world_size=2)
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'"):
        load_config(["recipe=nope"])
    with pytest.raises(ConfigError, match="no recipe given"):
        load_config(["optim.lr=1"])
    with pytest.raises(ConfigError, match=r"model: .*divisible"):
        load_config(["recipe=demo_stage1", "model.llm.heads=3"])


def test_pipeline_options_match_the_data_pipeline_signature():
    """data.options are passed as keywords to build_stage_stream / SampleBuilder: every key must be one of
    their parameters, and our defaults must be theirs (so an unset option means what the pipeline means)."""
    import inspect

    from data.pipeline import build_stage_stream
    from data.samples import SampleBuilder
    from train.config import PipelineConf

    # SampleBuilder last: where both take an option (truncate, max_pixels) its default is the real one
    params = {**inspect.signature(build_stage_stream).parameters, **inspect.signature(SampleBuilder).parameters}
    for name, value in OmegaConf.to_container(OmegaConf.structured(PipelineConf)).items():
        assert name in params, f"data.options.{name} is not a pipeline parameter"
        default = params[name].default
        if default is not inspect.Parameter.empty and default is not None:
            assert value == default, f"data.options.{name}={value!r}, pipeline default {default!r}"
    with pytest.raises(ConfigError, match=r"data\.options\.truncate"):
        load_config(["recipe=demo_stage3", "data.options.truncate=cut"])


def test_export_needs_an_official_layout_model():
    with pytest.raises(ConfigError, match=r"train\.export_final=true but model: .*adapter\.head_dim 32"):
        load_config(["recipe=demo_stage1", "model.adapter.head_dim=32"])
    load_config(["recipe=demo_stage1", "model.adapter.head_dim=32", "train.export_final=false"])


def test_synthetic_only_ids():
    c = load_config(["recipe=demo_stage2", "data=synthetic", "model=micro_small_vocab"])
    assert c.model.llm.vocab_size == 1200 and c.model.ids.img_start == 1103
    with pytest.raises(ConfigError, match=r"model\.ids\.img_start=1103 \(tokenizer: 151857\)"):
        load_config(["recipe=demo_stage2", "model=micro_small_vocab"])


def test_global_batch_arithmetic():
    c = load_config(["recipe=stage3_sft", "data.root=/d", "train.micro_batch_size=2"], world_size=8)
    assert resolve_grad_accum(c, 8) == 8  # 128 = 2 x 8 x 8
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(128\).*train\.micro_batch_size \(3\)"):
        load_config(["recipe=stage3_sft", "data.root=/d", "train.micro_batch_size=3"], world_size=8)
    with pytest.raises(ConfigError, match=r"train\.grad_accum \(3\) x world_size \(8\) = 48"):
        load_config(["recipe=stage3_sft", "data.root=/d", "train.grad_accum=3"], world_size=8)
    c = load_config(["recipe=stage3_sft", "data.root=/d", "train.grad_accum=8"], world_size=8)
    assert resolve_grad_accum(c, 8) == 8


def test_strip_launcher_args():
    assert strip_launcher_args(["--local_rank=3", "recipe=x", "a=1"]) == (["recipe=x", "a=1"], 3)
    assert strip_launcher_args(["recipe=x", "--local_rank", "1"]) == (["recipe=x"], 1)
    assert strip_launcher_args(["recipe=x"]) == (["recipe=x"], None)


def test_deepspeed_config_generated_from_hydra():
    c = load_config(["recipe=stage2_multitask", "data.root=/d", "engine=zero3", "engine.offload_optimizer=true",
                     "engine.offload_param=true"], world_size=64)
    ds = deepspeed_config(c, 64, "bf16")
    assert "scheduler" not in ds and "optimizer" not in ds
    assert ds["train_batch_size"] == 4096 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 16 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    c1 = load_config(["recipe=stage1_pretrain", "data.root=/d", "engine=zero1"], world_size=8)
    ds1 = deepspeed_config(c1, 8, "fp32")
    assert ds1["zero_optimization"]["stage"] == 1 and ds1["bf16"]["enabled"] is False
    assert "offload_optimizer" not in ds1["zero_optimization"]
    with pytest.raises(ConfigError, match=r"engine\.offload_param needs engine\.zero_stage=3"):
        load_config(["recipe=stage1_pretrain", "data.root=/d", "engine.offload_param=true"], world_size=8)


def test_cli_prints_config_and_reports_errors():
    env_py = sys.executable
    ok = subprocess.run([env_py, "-m", "train", "recipe=demo_stage2", "optim.lr=0.5", "--cfg", "--local_rank=0"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.5" in ok.stdout and "run_name: demo_stage2" in ok.stdout
    bad = subprocess.run([env_py, "-m", "train", "recipe=demo_stage2", "optim.betaz=[0.9,0.9]"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "optim.betaz" in bad.stderr


def test_deepspeed_buckets_sized_from_the_model():
    """DeepSpeed allocates its buckets at the configured size: capped at the model's parameter count (a micro
    model must not get the 2 GB fp32 reduce bucket of the 500M-element default), left alone at full size."""
    from train.engine import model_numel

    small = ["recipe=demo_stage2", "data=synthetic", "model=micro_small_vocab", "init.from_stage_dir=null",
             "model.vision.image_size=56", "data.seq_len=300"]
    for stage in (2, 3):
        cfg = load_config([*small, f"engine=zero{stage}"], world_size=2)
        n = model_numel(cfg)
        assert 100_000 < n < 5_000_000
        z = deepspeed_config(cfg, 2, "fp32")["zero_optimization"]
        assert z["reduce_bucket_size"] == n
        assert z.get("allgather_bucket_size", n) == n and z.get("stage3_prefetch_bucket_size", n) == n
    full = load_config(["recipe=stage2_multitask", "data.root=/d"], world_size=8)
    z = deepspeed_config(full, 8, "bf16")["zero_optimization"]
    assert z["reduce_bucket_size"] == full.engine.reduce_bucket_size  # 9.6B params: the configured size
