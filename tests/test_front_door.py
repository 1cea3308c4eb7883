"""What a newcomer meets first: misspelt keys fail naming them (with a suggestion), incomplete recipes still
print, wrong paths fail before the model is built, an empty held-out split is an error, Ctrl-C checkpoints
(exit 130) and a second one aborts, and a resumed run logs every step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from launching import ROOT, clean_env

from train.config import ConfigError, load_config, to_yaml

SMALL = ["data=synthetic", "model=micro_small_vocab", "model.vision.image_size=56", "data.seq_len=300",
         "train.micro_batch_size=2", "train.global_batch_size=4", "logging=quiet", "logging.every=1",
         "init.from_stage_dir=null", "train.export_final=false", "eval.at_start=false", "eval.at_end=false"]


@pytest.mark.parametrize("override,named,hint", [
    ("+optim.lrr=1", "optim.lrr", "optim.lr"),
    ("optim.lrr=1", "optim.lrr", "optim.lr"),  # without '+': Hydra refuses it, naming the key
    ("train.step=3", "train.step", "train.steps"),
    ("data.options.pakc=true", "data.options.pakc", "data.options.pack"),
    ("+train.stepz=5", "train.stepz", "train.steps"),
    ("+data.sources.0.wieght=2", "data.sources.0.wieght", "data.sources.0.weight"),
    ("+loging.every=2", "loging", "logging"),
])
def test_misspelt_key_fails_naming_it(override, named, hint):
    with pytest.raises(ConfigError) as err:
        load_config(["recipe=demo_stage1", override])
    assert named in str(err.value)
    if hint:
        assert f"did you mean {hint}?" in str(err.value)


def test_misspelt_key_cli_exit_code_and_no_run_dir(tmp_path):
    p = subprocess.run([sys.executable, "-m", "train", "recipe=demo_stage1", "+optim.lrr=1", "+train.stepz=5",
                        f"output_dir={tmp_path / 'run'}"], cwd=ROOT, env=clean_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "optim.lrr (did you mean optim.lr?)" in p.stderr and "train.stepz (did you mean train.steps?)" in p.stderr
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained


def test_free_form_dicts_still_take_new_keys():
    cfg = load_config(["recipe=demo_stage2", "+data.heldout.extra=/somewhere"])
    assert cfg.data.heldout.extra == "/somewhere"


@pytest.mark.parametrize("recipe", ["stage1_pretrain", "finetune_lora", "finetune_full", "stage3_sft"])
def test_incomplete_recipe_prints_without_data_or_weights(recipe):
    with pytest.raises(ConfigError):  # a run needs them ...
        load_config([f"recipe={recipe}"], world_size=8)
    text = to_yaml(load_config([f"recipe={recipe}"], check=False))  # ... printing does not
    assert text.startswith("# not set yet (???): data.root")
    assert f"run_name: {recipe}" in text and "root: ???" in text
    assert "${data.root}" in text  # the interpolations that depend on it are shown as written


def _no_build(monkeypatch):
    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr("train.loop.build_model", boom)


def test_wrong_data_root_fails_before_the_model_is_built(tmp_path, monkeypatch):
    from train.loop import train

    _no_build(monkeypatch)
    cfg = load_config(["recipe=demo_stage1", "data.demo.enabled=false", f"data.root={tmp_path / 'nope'}",
                       f"output_dir={tmp_path / 'run'}", "logging=quiet"])
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.shards \(source 'pretrain'\)=.*nope/pretrain"):
        train(cfg)


@pytest.mark.parametrize("key", ["init.official", "init.from_stage_dir", "train.resume"])
def test_wrong_weights_or_resume_path_fails_before_the_model_is_built(tmp_path, monkeypatch, key):
    from train.loop import train

    _no_build(monkeypatch)
    missing = tmp_path / "no_such_dir"
    cfg = load_config(["recipe=demo_stage2", *SMALL, f"{key}={missing}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}={missing}: no such"):
        train(cfg)


def test_heldout_split_without_samples_is_an_error(tmp_path, monkeypatch):
    from train.loop import EmptyHeldout, train

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "heldout-000000.tar", "w"):
        pass  # a readable shard with no sample in it
    cfg = load_config(["recipe=demo_stage1", "model=micro", "model.vision.image_size=56",
                       "data.demo.enabled=true", f"data.demo.dir={ROOT / '.cache' / 'test-demo-s0.1'}",
                       "data.demo.scale=0.1", f"+data.heldout.empty={shards}", "logging=quiet",
                       "data.seq_len=300", "train.steps=1", f"output_dir={tmp_path / 'run'}",
                       "train.export_final=false", "init.from_stage_dir=null"])
    cfg.data.heldout = {"empty": str(shards)}
    with pytest.raises(EmptyHeldout, match=r"held-out split 'empty' \(data\.heldout\.empty\) gave no target token"):
        train(cfg)


def _start(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    args = ["recipe=demo_stage2", *SMALL, "train.steps=100000", f"output_dir={tmp_path}", *extra]
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, env=env or clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"run ended early (rc {proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if metrics.is_file() and any(json.loads(x).get("step", 0) >= step
                                     for x in metrics.read_text().splitlines() if x.strip()):
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run did not reach the step in time")


@pytest.mark.slow
def test_first_ctrl_c_checkpoints_and_exits_130(tmp_path):
    proc = _start(tmp_path)
    _wait_for_step(proc, tmp_path / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, out[-3000:]
    # inside a step it finishes the step; between steps (data wait) it stops at once: both checkpoint
    assert ("received SIGINT: finishing this step and checkpointing" in out
            or "received SIGINT outside a step" in out), out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    state = json.loads((tmp_path / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] >= 2


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path):
    # a long step (big micro-batch at full length) so that both signals land inside it
    proc = _start(tmp_path, "train.micro_batch_size=4", "train.global_batch_size=16", "data.seq_len=1024")
    _wait_for_step(proc, tmp_path / "metrics.jsonl", 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert "aborted by a second Ctrl-C" in out
    assert not (tmp_path / "checkpoints" / "latest").exists()  # save_every=0: nothing was checkpointed


@pytest.mark.slow
def test_resumed_run_logs_every_step_once(tmp_path):
    env = clean_env(QWENVL_DEBUG_SIGKILL_AT_STEP="5")
    args = ["recipe=demo_stage2", *SMALL, "train.steps=7", "train.save_every=3", f"output_dir={tmp_path}"]
    p = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == -signal.SIGKILL
    first = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first == [1, 2, 3, 4, 5]  # killed after step 5; the checkpoint is at step 3
    env.pop("QWENVL_DEBUG_SIGKILL_AT_STEP")
    p = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 8))
    assert all(os.path.isabs(x.split()[-1]) for x in p.stdout.splitlines() if x.startswith("[train] done:")
               for x in [x.split("; checkpoints ")[1].split(";")[0]])
