"""`python -m train --help`: exit 0, every recipe / group option / schema leaf key listed, from the sources."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

import train.config as config_mod
from train.cli_help import field_docs, render_help, schema_keys, yaml_description
from train.config import CONF_DIR, RECIPES_DIR, TrainConfig


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=120,
                          cwd=config_mod.REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _leaf_keys(cls: type, prefix: str = "") -> dict[str, str]:
    """Independent walk of the schema: dotted leaf key -> its annotation (spaces removed)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= _leaf_keys(tp, f"{prefix}{f.name}.")
            continue
        out[prefix + f.name] = str(f.type).replace(" ", "")
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out |= _leaf_keys(args[0], f"{prefix}{f.name}[*].")
    return out


def _section(text: str, title: str) -> list[str]:
    """Lines of the block whose header starts with `title`, up to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    block = []
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        block.append(ln)
    return block


def _key_rows(text: str) -> dict[str, list[str]]:
    rows = _section(text, "keys (")
    assert rows[0].split()[:3] == ["KEY", "TYPE", "DEFAULT"]
    return {ln.split()[0]: ln.split() for ln in rows[1:]}


@pytest.fixture(scope="module")
def plain() -> subprocess.CompletedProcess:
    return _run("--help")


@pytest.fixture(scope="module")
def with_recipe() -> subprocess.CompletedProcess:
    return _run("recipe=demo_stage1", "--help")


def test_help_exits_0_and_lists_every_recipe_and_group_option(plain, with_recipe):
    for proc in (plain, with_recipe):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: python -m train recipe=NAME")
        recipes = {ln.split()[0]: ln for ln in _section(proc.stdout, "recipes")}
        want = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        assert sorted(recipes) == want and len(want) >= 10
        for name in want:  # one line each, with the file's own description
            desc = yaml_description(RECIPES_DIR / f"{name}.yaml")
            assert desc and desc in recipes[name], name
        groups = _section(proc.stdout, "config groups")
        for group in ("model", "data", "optim", "engine", "logging"):
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            at = groups.index(f"  {group}:")
            listed = [ln.split()[0] for ln in groups[at + 1: at + 1 + len(options)]]
            assert listed == options, group


def test_every_schema_leaf_key_is_listed_with_its_type(plain, with_recipe):
    want = _leaf_keys(TrainConfig)
    assert {"optim.lr", "data.root", "model.vision.image_size", "data.sources[*].weight"} <= set(want)
    for proc in (plain, with_recipe):
        rows = _key_rows(proc.stdout)
        assert set(rows) == set(want)
        assert {k: r[1] for k, r in rows.items()} == want
        assert all(len(r) >= 4 for r in rows.values()), "every key has a default and a description"


def test_default_column_is_the_schema_or_the_recipe(plain, with_recipe):
    schema, recipe = _key_rows(plain.stdout), _key_rows(with_recipe.stdout)
    assert schema["optim.lr"][2] == repr(config_mod.OptimConf.lr)
    assert schema["data.root"][2] == "???"
    raw = OmegaConf.load(RECIPES_DIR / "demo_stage1.yaml")  # read the recipe file independently
    assert recipe["train.steps"][2] == str(raw.train.steps)
    assert recipe["optim.lr"][2] == repr(float(raw.optim.lr))
    assert recipe["train.freeze"][2] == "[" + ", ".join(raw.train.freeze) + "]"
    assert recipe["run_name"][2] == raw.run_name
    assert recipe["output_dir"][2] == f"outputs/demo/{raw.run_name}"  # interpolation resolved


def test_recipe_with_unset_values_still_prints_them_as_missing():
    rows = _key_rows(render_help("stage1_pretrain", ["optim.lr=0.5"]))
    assert rows["data.root"][2] == "???"
    assert rows["optim.lr"][2] == "0.5"
    assert rows["data.sources"][2].startswith("1x:")  # sources interpolating the unset data.root


def test_unknown_recipe_is_a_clear_error_not_a_traceback():
    proc = _run("recipe=no_such_recipe", "--help")
    assert proc.returncode == 2
    assert "unknown recipe 'no_such_recipe'" in proc.stderr and "Traceback" not in proc.stderr


def test_every_field_of_the_config_schema_has_its_own_description():
    """Descriptions come from the comments in train/config.py: a new field without one fails here."""
    own = [obj for obj in vars(config_mod).values()
           if dataclasses.is_dataclass(obj) and obj.__module__ == config_mod.__name__]
    assert config_mod.OptimConf in own and len(own) >= 10
    for cls in own:
        docs = field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, f"{cls.__name__}: add a `# description` to {undocumented}"
    assert all(k.help for k in schema_keys())


@dataclass
class _Inner:
    depth: int = 3  # how deep
    # a comment line above the field
    # continued on a second line
    label: str = "a # not a comment"


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)  # the inner section
    undocumented: float = 0.5
    items: list[_Inner] = field(default_factory=list)  # a list of sections


def test_a_new_key_appears_with_its_comment():
    keys = {k.name: k for k in schema_keys(_Outer)}
    assert list(keys) == ["inner.depth", "inner.label", "undocumented", "items", "items[*].depth",
                          "items[*].label"]
    assert keys["inner.depth"].help == "how deep" and keys["inner.depth"].type == "int"
    assert keys["inner.label"].help == "a comment line above the field continued on a second line"
    assert keys["inner.label"].default == "a # not a comment"
    assert keys["undocumented"].help == "undocumented"  # no comment, no section: the name
    assert keys["items"].type == "list[_Inner]" and keys["items[*].depth"].help == "how deep"
