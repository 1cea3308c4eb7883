"""Checks on a sample read from a shard that the tar/JSON reader cannot make: is its key a safe name, and is
all of its metadata text valid Unicode.

Used by training (``data.samples.SampleBuilder``) and cleaning (``data.clean``) so both count the same samples
under the same reasons instead of silently repairing them:

* ``bad_member_name``: the key is an absolute path or has a ``..`` component (``../../etc/x.json`` in a tar).
  Such a key would escape the output directory of any tool that writes samples back out by key.
* ``invalid_unicode``: a string in the metadata holds a lone surrogate (JSON ``"\\ud800"`` decodes to one in
  Python). It is not a Unicode scalar value: UTF-8 encoding fails, and a tokenizer or writer would either
  crash or replace it. Invalid UTF-8 *bytes* never get this far: the loader counts them as ``bad_json``.
"""

from __future__ import annotations

import re
from typing import Any

_SEP = re.compile(r"[/\\]")


def key_problem(key: str) -> str | None:
    """Why `key` is unsafe as a member name, or None when it is fine."""
    if not isinstance(key, str) or not key:
        return f"key {key!r} is empty or not a string"
    if key.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[/\\]", key):
        return f"key {key!r} is an absolute path"
    if ".." in _SEP.split(key):
        return f"key {key!r} has a '..' path component"
    return None


def _first_invalid(v: Any, path: str) -> str | None:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{path or 'metadata'}: {e.reason} U+{ord(v[e.start]):04X} at character {e.start}"
        return None
    if isinstance(v, dict):
        for k, x in v.items():
            found = _first_invalid(k, f"{path}.<key>" if path else "<key>") or \
                _first_invalid(x, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(v, list):
        for i, x in enumerate(v):
            found = _first_invalid(x, f"{path}[{i}]")
            if found:
                return found
    return None


def text_problem(meta: Any) -> str | None:
    """Where `meta` (parsed JSON) holds a string that is not valid Unicode, or None."""
    return _first_invalid(meta, "")


def sample_problem(key: str, meta: Any) -> tuple[str, str] | None:
    """(reason, detail) for the first problem of a loaded sample, or None."""
    detail = key_problem(key)
    if detail:
        return "bad_member_name", detail
    detail = text_problem(meta)
    if detail:
        return "invalid_unicode", detail
    return None


__all__ = ["key_problem", "sample_problem", "text_problem"]
