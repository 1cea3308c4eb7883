"""The loop end to end on the single engine: loss falls, metrics land in metrics.jsonl and in the W&B
offline run file, the final export reloads as the next stage's init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.build import build_model
from train.config import load_config
from train.loop import train

SMALL = ["data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56", "data.seq_len=300",
         "train.micro_batch_size=2", "train.global_batch_size=4", "logging=quiet", "logging.every=1",
         "init.from_stage_dir=null", "train.export_final=false"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_decreases_and_metrics_logged(tmp_path, capsys):
    cfg = load_config(["recipe=demo_stage2", *SMALL, "train.steps=16", "optim.lr=3e-3", "optim.warmup_steps=2",
                       "optim.min_lr=3e-4", f"output_dir={tmp_path}", "train.save_every=0", "eval.max_batches=2"])
    summary = train(cfg)
    losses = summary["losses"]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert summary["eval_after"]["synthetic"]["loss"] < summary["eval_before"]["synthetic"]["loss"] - 0.5
    recs = [r for r in _records(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 17))
    assert [r["loss"] for r in recs] == pytest.approx(losses)
    r = recs[-1]
    for k in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "padding_fraction", "mem/rss_gb",
              "step_time_s", "tokens_seen", "tflops_per_device", "skipped/total"):
        assert k in r, k
    assert 0.0 < r["padding_fraction"] < 1.0 and r["samples_per_s"] > 0 and r["grad_norm"] > 0
    assert r["mfu"] > 0 and r["tflops_per_device"] > 0 and r["skipped/total"] == 0
    assert r["lr"] == pytest.approx(3e-4)  # cosine reached min LR at the last step
    assert recs[0]["lr"] == pytest.approx(3e-3)  # warmup (2 steps) done after step 1 -> peak next
    # per-task losses: synthetic rows cycle through the 8 task ids; the tracked ones average to the total
    tasks = [k for k in r if k.startswith("loss/")]
    assert len(tasks) >= 2
    out = capsys.readouterr().out
    assert "held-out loss (start -> end)" in out and "trainable" in out
    ck = tmp_path / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000016"


def test_wandb_mode_auto_follows_wandb_mode_then_the_api_key(monkeypatch):
    from train.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "Disabled")
    assert wandb_mode("auto") == "disabled"
    assert wandb_mode("offline") == "offline"  # the config's explicit choice wins
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        wandb_mode("auto")


def test_wandb_offline_run_has_the_metrics(tmp_path, monkeypatch):
    """What the loop hands W&B (through its public Run.log) equals metrics.jsonl, and the run is finished and
    W&B's service torn down (files flushed) when train() returns."""
    import wandb
    from wandb.sdk.wandb_run import Run

    logged: list[tuple[int, dict]] = []
    real_log = Run.log

    def spy(self, data, step=None, **kw):  # noqa: ANN001
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kw)

    monkeypatch.setattr(Run, "log", spy)
    cfg = load_config(["recipe=demo_stage1", *SMALL, "train.steps=3", f"output_dir={tmp_path}",
                       "logging.wandb.mode=offline", "logging.wandb.tags=[ci,demo]", "logging.every=1",
                       "eval.at_start=false", "eval.at_end=false", "train.save_every=0"])
    summary = train(cfg)
    assert wandb.run is None  # finished
    wdir = Path(summary["wandb_dir"])
    assert str(wdir).startswith(str(tmp_path)) and "offline-run-" in wdir.name
    assert len(list(wdir.glob("run-*.wandb"))) == 1
    rows = [(step, r) for step, r in logged if "loss" in r]
    jsonl = [r for r in _records(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [step for step, _ in rows] == [r["step"] for r in jsonl] == [1, 2, 3]
    assert [r["loss"] for _, r in rows] == pytest.approx([r["loss"] for r in jsonl])
    assert [r["lr"] for _, r in rows] == pytest.approx([r["lr"] for r in jsonl])


def test_final_export_initialises_next_stage(tmp_path):
    # the tiny model (llm.hidden 128, real vocabulary): the official layout needs the adapter's 128-dim heads
    small = [s for s in SMALL if not s.startswith(("model=", "train.export_final"))]
    cfg = load_config(["recipe=demo_stage1", *small, "train.steps=2", f"output_dir={tmp_path}/s1",
                       "eval.at_start=false", "eval.at_end=false", "train.export_final=true"])
    summary = train(cfg)
    export = Path(summary["export"])
    assert (export / "config.json").is_file() and (export / "model.safetensors.index.json").is_file()
    trained = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    cfg2 = load_config(["recipe=demo_stage2", *small, f"init.from_stage_dir={export}"])
    model2 = build_model(cfg2)  # 448 px model (at 56 here), positional table interpolated at run time
    state2 = model2.state_dict()
    assert set(state2) == set(trained)
    for k, v in trained.items():
        assert torch.equal(state2[k], v), k


def test_stage1_init_from_openclip_and_qwen_llm(tmp_path):
    """init.openclip + init.qwen_llm: the ViT from an OpenCLIP state dict (class token, text tower, CLIP's
    ln_post/proj dropped), the LLM from a text-only Qwen checkpoint, the adapter stays random."""
    from safetensors.torch import save_file

    from train.model.official import internal_key_to_official

    base = ["recipe=demo_stage1", *SMALL]
    donor = build_model(load_config([*base, "train.seed=123"]))
    sd = donor.state_dict()
    width = sd["visual.conv1.weight"].shape[0]
    clip = {k: v.clone() for k, v in sd.items() if k.startswith("visual.")}
    clip["visual.positional_embedding"] = torch.cat([torch.randn(1, width), sd["visual.positional_embedding"]])
    clip.update({"visual.class_embedding": torch.randn(width), "visual.ln_post.weight": torch.ones(width),
                 "visual.ln_post.bias": torch.zeros(width), "visual.proj": torch.randn(width, 16),
                 "token_embedding.weight": torch.randn(10, 16), "logit_scale": torch.ones(())})
    torch.save(clip, tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "qwen7b").mkdir()
    llm = {internal_key_to_official(k): v.clone() for k, v in sd.items() if k.startswith("llm.")}
    assert all(llm), "every LLM key has an official name"
    save_file(llm, str(tmp_path / "qwen7b" / "model.safetensors"))

    cfg = load_config([*base, f"init.openclip={tmp_path / 'open_clip_pytorch_model.bin'}",
                       f"init.qwen_llm={tmp_path / 'qwen7b'}"])
    model = build_model(cfg)
    fresh = build_model(load_config(base))  # same seed, no init: what random init gives
    for k, v in model.state_dict().items():
        if k.startswith(("visual.", "llm.")):
            assert torch.equal(v, sd[k]), k
        else:  # the adapter: random init (seed 0), not the donor's (seed 123)
            assert torch.equal(v, fresh.state_dict()[k]), k
    for k in ("adapter.query", "adapter.kv_proj.weight", "adapter.proj"):
        assert not torch.equal(model.state_dict()[k], sd[k]), k
    assert not any(p.requires_grad for p in model.llm.parameters())  # stage 1: LLM frozen after loading
    with pytest.raises(FileNotFoundError, match=r"init\.openclip"):
        build_model(load_config([*base, f"init.openclip={tmp_path / 'missing.bin'}"]))


def test_lora_run_exports_merged_weights_and_adapters(tmp_path):
    """A LoRA run's final export holds plain weights = base + scale * B @ A (checked against peft's own
    merge of the run's last checkpoint), plus the adapters alone in final_lora/; the export initialises a
    model without LoRA."""
    from train.lora import merged_state_dict
    from train.model.official import load_official

    cfg = load_config(["recipe=demo_lora", *SMALL, "train.export_final=true", "train.steps=3", "optim.lr=1e-2",
                       "lora.r=4", "lora.dropout=0.0", "lora.train_modules=[adapter]", f"output_dir={tmp_path}",
                       "eval.at_start=false", "eval.at_end=false", "train.save_every=0"])
    summary = train(cfg)
    trained = build_model(cfg)  # same structure (LoRA injected), then the run's last checkpoint
    trained.load_state_dict(load_file(str(Path(summary["checkpoint"]) / "model.safetensors")))
    assert any(float(p.detach().abs().max()) > 0 for n, p in trained.named_parameters() if ".lora_B." in n)
    want = merged_state_dict(trained)
    plain = build_model(load_config(["recipe=demo_stage3", *SMALL]))
    load_official(plain, summary["export"])
    got = plain.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    moved = [k for k in want if k.startswith("llm.h.") and k.endswith(("c_attn.weight", "w1.weight"))]
    base = build_model(load_config(["recipe=demo_stage3", *SMALL]))  # same seed: the untrained base
    assert all(not torch.equal(got[k], base.state_dict()[k]) for k in moved)  # the deltas were merged in
    adapters = load_file(str(tmp_path / "final_lora" / "adapter_model.safetensors"))
    assert any(".lora_A." in k for k in adapters) and any(k.startswith("base_model.model.adapter.") for k in adapters)
    assert not any(k.startswith(("base_model.model.visual.", "base_model.model.llm.wte")) for k in adapters)
    meta = json.loads((tmp_path / "final_lora" / "adapter_config.json").read_text())
    assert (meta["r"], meta["lora_alpha"]) == (4, 16)
