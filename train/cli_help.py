"""`python -m train --help`: recipes, config groups and every schema key, generated from the sources.

Nothing here is written by hand twice: the recipe and group lines are the leading `# ...` comment of each
YAML file, the keys are walked from the `TrainConfig` dataclasses, and each key's description is the
comment beside (or directly above) its field in the dataclass source (`field_docs`). A key added to the
schema therefore shows up in `--help` with its comment, and a key without one falls back to its
section's description. With a recipe, the default column holds that recipe's composed values (not
validated: a `???` the user must set prints as `???`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train.config import CONF_DIR, RECIPES_DIR, TrainConfig, compose_config, list_recipes

GROUPS = ("model", "data", "optim", "engine", "logging")
_MAX_VALUE = 36  # default column width cap: long lists/paths are cut, the full value is in `--cfg`
# a full stop ends the sentence unless it closes an abbreviation
_SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<!etc\.)(?<!vs\.)(?<=\.)\s+")

USAGE = """\
usage: python -m train recipe=NAME [KEY=VALUE ...] [GROUP=OPTION ...] [--cfg] [-h]
       torchrun --nproc_per_node N -m train recipe=NAME [...]    (also deepspeed, launch/*.sh)

Train from a recipe plus Hydra overrides, e.g.
  python -m train recipe=demo_stage1 optim.lr=1e-3 train.steps=10
  python -m train recipe=stage2_multitask engine=zero3 data.root=/data/shards 'data.sources.0.weight=2.0'
--cfg prints the composed config and exits; recipe=NAME --help shows that recipe's values as defaults."""


@dataclass(frozen=True)
class Key:
    """One leaf of the schema: dotted name, annotation as written, schema default, description."""

    name: str
    type: str
    default: Any
    help: str


# ------------------------------------------------------------------------------------ schema walking
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its comment in the dataclass source: the trailing `# ...` on the field's line, else
    the comment line(s) directly above it. Fields without either are absent."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a frozen app): descriptions fall back to the section's
        return {}
    lines = src.splitlines()
    trailing: dict[int, str] = {}
    own_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            row, col = tok.start
            (own_line if not lines[row - 1][:col].strip() else trailing)[row] = text
    cdef = ast.parse(src).body[0]
    docs: dict[str, str] = {}
    for node in getattr(cdef, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = trailing.get(node.end_lineno or node.lineno) or trailing.get(node.lineno)
        if not text:
            above, row = [], node.lineno - 1
            while row in own_line:
                above.insert(0, own_line[row])
                row -= 1
            text = " ".join(above)
        if text:
            docs[node.target.id] = text
    return docs


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")


def _item_dataclass(tp: Any) -> type | None:
    """`list[SomeDataclass]` -> SomeDataclass (its fields are listed as `key[*].field`)."""
    if typing.get_origin(tp) is list:
        (arg,) = typing.get_args(tp) or (None,)
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _schema_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


@cache
def schema_keys(root: type = TrainConfig) -> tuple[Key, ...]:
    """Every leaf key of the schema in declaration order; `list[Dataclass]` fields also list their items'
    fields as `key[*].field`."""
    out: list[Key] = []

    def walk(cls: type, prefix: str, section_help: str) -> None:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            name, tp = prefix + f.name, hints[f.name]
            own = docs.get(f.name, "")
            if dataclasses.is_dataclass(tp):
                walk(tp, name + ".", own or _first_line(tp.__doc__) or section_help)
                continue
            words = f.name.replace("_", " ")
            desc = own or (f"{section_help}: {words}" if section_help else words)
            # types without spaces keep the table one token per column (`int|None`)
            out.append(Key(name, str(f.type).replace(" ", ""), _schema_default(f), desc))
            item = _item_dataclass(tp)
            if item is not None:
                walk(item, name + "[*].", own or _first_line(item.__doc__))

    walk(root, "", "")
    return tuple(out)


# ------------------------------------------------------------------------------------ YAML comments
def yaml_description(path: Path) -> str:
    """One line from the `# ...` comment block at the top of a YAML file: its first sentence (a comment
    wrapped over several lines reads as one), else ''."""
    block: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s.startswith("#") or not s.lstrip("#").strip():
            break
        block.append(s.lstrip("#").strip())
    return _SENTENCE_END.split(" ".join(block), maxsplit=1)[0].rstrip(".")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# ------------------------------------------------------------------------------------ values
def _flow(value: Any) -> str:
    """YAML-ish flow style, as one would type it in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        r = repr(value)
        return r if len(r) <= 10 else f"{value:.6g}"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def _fmt(value: Any) -> str:
    """One cell of the default column: data.sources as its names (what is mixed), long values cut."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        s = f"{len(value)}x: " + ",".join(str(v.get("name", "?")) for v in value)
    else:
        s = " ".join(_flow(value).split())
    return s if len(s) <= _MAX_VALUE else s[: _MAX_VALUE - 3] + "..."


def _composed_value(cfg: DictConfig, key: str) -> Any:
    """The recipe's value for a leaf key: resolved when it can be, else as written (`${...}`, `???`)."""
    if "[*]" in key:
        return None
    *parents, last = key.split(".")
    node: Any = cfg
    for p in parents:
        node = node[p]
    if OmegaConf.is_missing(node, last):
        return "???"
    try:
        value = node[last]
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
        return value
    except OmegaConfBaseException:  # interpolates a ??? value, e.g. ${data.root}/caption with root unset
        raw = node._get_node(last)
        return OmegaConf.to_container(raw, resolve=False) if isinstance(raw, (DictConfig, ListConfig)) \
            else raw._value()


# ------------------------------------------------------------------------------------ rendering
def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip() for r in rows]


def render_help(recipe: str | None, overrides: list[str] | None = None) -> str:
    """The full `--help` text; with `recipe` (and optional overrides), its composed values as defaults.

    Raises train.config.ConfigError when the recipe (or an override) does not compose.
    """
    cfg = compose_config(recipe, overrides) if recipe else None
    out = [USAGE, "", "recipes (recipes/NAME.yaml, or recipe=/path/to/file.yaml):"]
    out += _table([(name, yaml_description(RECIPES_DIR / f"{name}.yaml")) for name in list_recipes()])
    out += ["", "config groups (conf/GROUP/OPTION.yaml; pick one with GROUP=OPTION, e.g. engine=zero3):"]
    for group in GROUPS:
        out.append(f"  {group}:")
        out += _table([(opt, yaml_description(CONF_DIR / group / f"{opt}.yaml")) for opt in group_options(group)],
                      indent="    ")
    where = f"recipe {recipe}" if recipe else "the schema (a recipe sets many of them)"
    out += ["", f"keys (KEY=VALUE; defaults: {where}; ??? = must be set; key[*].field: each list item's):"]
    rows = [("KEY", "TYPE", "DEFAULT", "DESCRIPTION")]
    for k in schema_keys():
        value = k.default if cfg is None or "[*]" in k.name else _composed_value(cfg, k.name)
        rows.append((k.name, k.type, _fmt(value), k.help))
    out += _table(rows)
    return "\n".join(out) + "\n"
