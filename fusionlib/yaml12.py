"""YAML 1.2 (core schema), read and written one way everywhere in fusionlib.

Every value a user types — ``-p name=value``, a sweep grid, a quantization descriptor
saved as text — goes through :func:`load_yaml`: ``1e-3`` is a float and ``no`` / ``on``
are words (YAML 1.1, which PyYAML reads, makes them booleans). ruamel.yaml does the work.
"""
from __future__ import annotations

import io
from typing import Any

__all__ = ["load_yaml", "dump_yaml", "yaml_error"]


def _yaml():
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True)


def load_yaml(text: str) -> Any:
    """YAML text -> Python values, YAML 1.2 core schema. Raises ``ruamel.yaml.YAMLError`` (with
    ``problem_mark`` / ``problem``) for text that is not YAML."""
    return _yaml().load(io.StringIO(text))


def dump_yaml(value: Any) -> str:
    """Python values -> YAML text in block style (one mapping entry a line); tuples are written as lists."""
    plain = lambda v: [plain(e) for e in v] if isinstance(v, (tuple, list)) else (
        {k: plain(e) for k, e in v.items()} if isinstance(v, dict) else v)
    out, yaml = io.StringIO(), _yaml()
    yaml.default_flow_style = False
    yaml.dump(plain(value), out)
    return out.getvalue()


def yaml_error() -> type[Exception]:
    """The exception :func:`load_yaml` raises for text that is not YAML (imported only when asked for)."""
    from ruamel.yaml import YAMLError

    return YAMLError
