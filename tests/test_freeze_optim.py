"""Freezing per stage, AdamW param groups (no-decay sets, ViT layer-wise LR decay) and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from train.build import build_model, build_train_data
from train.config import load_config
from train.distributed import DistInfo
from train.engine import SingleEngine
from train.freeze import freeze_table, param_counts, set_train_mode
from train.optim import WarmupCosine, build_optimizer, build_scheduler, lr_scale, param_groups

SMALL = ["data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56", "data.seq_len=300",
         "train.micro_batch_size=2", "train.global_batch_size=2", "logging=quiet", "optim.warmup_steps=0",
         "optim.lr=1e-2"]
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
STAGE_FREEZE = {1: ["llm"], 2: [], 3: ["visual"]}


def _cfg(stage: int, *extra: str):
    recipe = {1: "demo_stage1", 2: "demo_stage2", 3: "demo_stage3"}[stage]
    return load_config([f"recipe={recipe}", *SMALL, "init.from_stage_dir=null", *extra])


@pytest.mark.parametrize("stage,ckpt", [(1, False), (2, False), (3, False), (1, True), (3, True)])
def test_one_step_changes_exactly_the_trained_params(stage, ckpt):
    cfg = _cfg(stage, f"engine.grad_checkpointing={str(ckpt).lower()}")
    assert list(cfg.train.freeze) == STAGE_FREEZE[stage]
    model = build_model(cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    eng = SingleEngine(cfg, model, CPU)
    if ckpt:
        model.set_grad_checkpointing(True)
    batch = next(iter(build_train_data(cfg, CPU)))
    assert batch["pixel_values"].shape[0] > 0
    out = eng.forward(batch)
    eng.backward(out.loss)
    for name, p in model.named_parameters():
        if name.split(".")[0] in STAGE_FREEZE[stage]:
            assert p.grad is None, f"{name}: frozen module got a gradient (it must keep no autograd graph)"
    eng.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, f"stage {stage}: {name} changed={changed} trainable={p.requires_grad}"
    top = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert top == {"visual", "adapter", "llm"} - set(STAGE_FREEZE[stage])
    assert not model.adapter.pos_embed.requires_grad  # stored sin-cos table stays frozen


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_activation_checkpointing_with_frozen_modules(stage, monkeypatch):
    """Checkpointing stays on where activations are kept (also the frozen stage-1 LLM that gradients cross),
    the parts after a frozen module still train, and a frozen tower builds no autograd graph."""
    import train.model.llm as llm_mod
    import train.model.vision as vis_mod

    calls = {"llm": 0, "visual": 0}

    def counting(mod: str):
        real = (llm_mod if mod == "llm" else vis_mod).checkpoint

        def wrapped(fn, *a, **kw):
            calls[mod] += 1
            return real(fn, *a, **kw)
        return wrapped

    monkeypatch.setattr(llm_mod, "checkpoint", counting("llm"))
    monkeypatch.setattr(vis_mod, "checkpoint", counting("visual"))
    cfg = _cfg(stage, "engine.grad_checkpointing=true")
    model = build_model(cfg)
    eng = SingleEngine(cfg, model, CPU)
    model.set_grad_checkpointing(True)
    set_train_mode(model, list(cfg.train.freeze))
    graph = {"visual": False}
    model.visual.register_forward_hook(lambda m, i, o: graph.__setitem__("visual", o.requires_grad))
    batch = next(iter(build_train_data(cfg, CPU)))
    out = eng.forward(batch)
    eng.backward(out.loss)
    n_blocks = len(model.llm.h)
    assert calls["llm"] == n_blocks, calls  # frozen or not, the LLM blocks are checkpointed
    if stage == 3:
        assert not graph["visual"] and calls["visual"] == 0  # frozen tower: no graph, nothing to recompute
    else:
        assert graph["visual"] and calls["visual"] == len(model.visual.transformer.resblocks)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None and model.get_parameter(n).grad.abs().sum() > 0
               for n in trained if n.startswith(("adapter.proj", "adapter.kv_proj")))




def test_freeze_table_counts():
    cfg = _cfg(3)
    model = build_model(cfg)
    counts = param_counts(model)
    vis_total = sum(p.numel() for p in model.visual.parameters())
    assert counts["visual"] == (0, vis_total)
    assert counts["llm"][0] == counts["llm"][1] == sum(p.numel() for p in model.llm.parameters())
    assert counts["adapter"][0] == counts["adapter"][1] - model.adapter.pos_embed.numel()
    table = freeze_table(model)
    assert "visual" in table and "frozen" in table and f"{vis_total:,}" in table


def test_param_groups_decay_and_llrd():
    cfg = _cfg(2, "optim.llrd=0.9")
    model = build_model(cfg)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, llrd=0.9)
    where = {n: g for g in groups for n in g["names"]}
    n_blocks = len(model.visual.transformer.resblocks)
    assert n_blocks == 2
    # no weight decay: norms, biases, embeddings, adapter query table
    for n in ("llm.wte.weight", "visual.positional_embedding", "adapter.query", "llm.h.0.ln_1.weight",
              "llm.h.0.attn.c_attn.bias", "visual.ln_pre.weight", "adapter.ln_post.bias", "llm.ln_f.weight"):
        assert where[n]["weight_decay"] == 0.0, n
    for n in ("llm.lm_head.weight", "llm.h.1.mlp.w1.weight", "adapter.proj", "adapter.kv_proj.weight",
              "visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight"):
        assert where[n]["weight_decay"] == 0.05, n
    assert "adapter.pos_embed" not in where  # frozen, not optimised
    # LLRD: block i of L gets 0.9**(L-i); the stem 0.9**(L+1); adapter and LLM 1
    assert where["visual.transformer.resblocks.1.mlp.c_fc.weight"]["lr"] == pytest.approx(0.9)
    assert where["visual.transformer.resblocks.0.mlp.c_fc.weight"]["lr"] == pytest.approx(0.81)
    assert where["visual.conv1.weight"]["lr"] == pytest.approx(0.729)
    assert where["adapter.query"]["lr"] == 1.0 and where["llm.wte.weight"]["lr"] == 1.0
    assert lr_scale("visual.transformer.resblocks.47.ln_1.weight", 0.95, 48) == pytest.approx(0.95)
    assert lr_scale("visual.conv1.weight", 0.95, 48) == pytest.approx(0.95 ** 49)
    assert lr_scale("visual.conv1.weight", 1.0, 48) == 1.0
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable


def test_schedule_values_hand_computed():
    f = WarmupCosine(warmup=4, total=104, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(54) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(104) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(29) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert WarmupCosine(2, 10, 0.0, "constant")(9) == 1.0


def test_scheduler_keeps_llrd_ratios_and_reaches_min_lr():
    cfg = _cfg(1, "optim.lr=2e-4", "optim.min_lr=1e-6", "optim.llrd=0.95")
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, warmup=3, total=10, lr=2e-4, min_lr=1e-6)
    ratios = [g["lr"] / (2e-4 * g["lr_scale"]) for g in opt.param_groups]
    assert ratios == pytest.approx([1 / 3] * len(ratios))
    for _ in range(10):
        opt.step()
        sched.step()
    top = next(g for g in opt.param_groups if g["lr_scale"] == 1.0)
    assert top["lr"] == pytest.approx(1e-6)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_bf16_autocast_on_cpu_close_to_fp32():
    """engine.precision=bf16 on CPU: autocast (weights stay fp32), loss close to the fp32 one."""
    losses = {}
    for prec in ("fp32", "bf16"):
        cfg = _cfg(2, f"engine.precision={prec}")
        model = build_model(cfg)
        eng = SingleEngine(cfg, model, CPU)
        assert eng.precision == prec
        out = eng.forward(next(iter(build_train_data(cfg, CPU))))
        eng.backward(out.loss)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
        losses[prec] = float(out.loss.detach())
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


@pytest.mark.parametrize("train_modules", [[], ["adapter"]])
def test_lora_step_changes_only_adapters(train_modules):
    """lora.enabled: one step moves the LoRA matrices (and lora.train_modules), the base weights stay bitwise."""
    tm = "[" + ",".join(train_modules) + "]"
    cfg = load_config(["recipe=demo_lora", *SMALL, "init.from_stage_dir=null", "train.export_final=false",
                       "lora.r=4", "lora.dropout=0.0", f"lora.train_modules={tm}"])
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    assert len(lora) == 2 * 4 * len(model.llm.h)  # A and B for c_attn, c_proj, w1, w2 in every block
    assert trainable - lora == {n for n, p in model.named_parameters()
                                if n.split(".")[0] in train_modules and n != "adapter.pos_embed"}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    eng = SingleEngine(cfg, model, CPU)
    batch = next(iter(build_train_data(cfg, CPU)))
    eng.backward(eng.forward(batch).loss)
    eng.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if ".lora_A." in name:  # B starts at zero, so A gets no gradient in the first step; B does
            continue
        assert changed == (name in trainable), (name, changed)
