"""Plan a sweep and check it before anything runs: values, grids, parameters, run names.

Every value the user types (``-p name=value``, a grid file, a run name, a figure
family's ``*``) is read by one YAML loader, :func:`load_yaml`, with the YAML 1.2
core schema (ruamel.yaml): ``1e-3`` is a float, ``no`` / ``on`` are strings.
A value must be JSON (a run's parameters are stored as JSON and handed to
papermill): a YAML date, or NaN, is refused when the run is planned, by name.

A grid is a YAML file (``experiments/quick.yaml``)::

    notebooks: [../notebooks/02_batchnorm_folding.ipynb]   # relative to the grid file
    parameters:                  # cartesian product, for every notebook ...
      bench_batch: [1, 8]
      model_names: [[resnet18]]
    repeat: 2                    # ... each combination with seed = 0 .. repeat-1
    # runs: [{bench_batch: 1}, {bench_batch: 8, seed: 3}]   # or: explicit parameter sets

The number of runs is ``len(notebooks) x prod(len(values)) x repeat``. Checked
first (:func:`plan_sweep`): the notebooks exist, every parameter name is in the
notebook's ``parameters`` cell (``papermill.inspect_notebook``), and every value
has the type of the cell's default (an int where an int is, a list of str where
a list of str is; an int is accepted for a float, any value for ``None``).
"""
from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fusionlib.yaml12 import load_yaml, yaml_error

__all__ = [
    "SweepError", "FolderInUse", "RunSpec", "load_yaml", "parse_value", "parse_parameters", "load_grid",
    "notebook_parameters", "check_parameters", "check_timeout", "run_name", "plan_runs", "plan_sweep",
]

GRID_KEYS = ("notebooks", "parameters", "runs", "repeat")
MAX_NAME = 100


class SweepError(ValueError):
    """A grid, notebook, parameter or folder that cannot run; the message says what to change."""


class FolderInUse(SweepError):
    """The output folder already holds runs (or a sweep); ``folder`` is it."""

    def __init__(self, message: str, folder: Path) -> None:
        super().__init__(message)
        self.folder = folder


@dataclass(frozen=True)
class RunSpec:
    """One planned run: a notebook (absolute path), its parameters, and its folder name in the sweep."""

    notebook: str
    parameters: dict
    name: str

    def as_dict(self) -> dict[str, Any]:
        return {"notebook": self.notebook, "parameters": self.parameters, "name": self.name}


# ---------------------------------------------------------------------------------------------- values


def parse_value(text: str) -> Any:
    """One ``-p`` value: YAML (``1e-3`` -> 0.001, ``[a, b]`` -> a list); text that is not YAML stays a string."""
    try:
        return load_yaml(text)
    except yaml_error():
        return text


def parse_parameters(items: Sequence[str]) -> dict[str, Any]:
    """``["seed=1", "model=resnet18"]`` -> ``{"seed": 1, "model": "resnet18"}`` (values by :func:`parse_value`)."""
    params: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"parameter {item!r} is not of the form name=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise SweepError(f"parameter name {key!r} is not a Python identifier")
        params[key] = parse_value(text)
    return params


def _check_json(where: str, key: str, value: Any) -> None:
    """Refuse a value JSON cannot hold (a date, NaN, a set), naming the parameter."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        kind = "a non-finite number" if isinstance(value, float) else _a(_type_name(value))
        hint = f" (quote it to pass it as text: '{value}')" if isinstance(value, (_dt.date, _dt.time)) else ""
        raise SweepError(f"{where}: parameter {key!r} = {value!r} is {kind}, which a run cannot take; "
                         f"use a finite number, a string, a bool, null, or a list / mapping of them{hint}") from None


def check_timeout(timeout: Any) -> int | None:
    """Seconds one cell may run: a finite positive number, rounded up to whole seconds (papermill's unit)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise SweepError(f"timeout must be a finite positive number of seconds, got {timeout!r}")
    return math.ceil(timeout)


# ---------------------------------------------------------------------------------------------- grids


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read a grid file; bad YAML or an unknown key is a :class:`SweepError` naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"grid file {str(path)!r} does not exist")
    try:
        grid = load_yaml(path.read_text())
    except yaml_error() as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SweepError(f"grid file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(grid, dict):
        raise SweepError(f"grid file {str(path)!r} must be a mapping with the keys {', '.join(GRID_KEYS)}; "
                         f"got {_a(_type_name(grid))}")
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise SweepError(f"grid file {str(path)!r}: unknown key(s) {unknown}; the keys are {', '.join(GRID_KEYS)}")
    return grid


_INSPECTED: dict[tuple[str, float], dict[str, dict]] = {}


def notebook_parameters(notebook: str | Path) -> dict[str, dict]:
    """The ``parameters`` cell of a notebook: name -> papermill's info (``default`` is the source text)."""
    import papermill as pm

    path = Path(notebook)
    if not path.is_file():
        raise SweepError(f"notebook {str(path)!r} does not exist")
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _INSPECTED:
        try:
            _INSPECTED[key] = dict(pm.inspect_notebook(str(path)))
        except Exception as exc:  # not JSON, not a notebook
            raise SweepError(f"notebook {str(path)!r} cannot be read: {exc}") from None
    return _INSPECTED[key]


def _default_value(info: Mapping[str, Any]) -> tuple[bool, Any]:
    """(known, value) of a parameter's default, when it is a Python literal."""
    try:
        return True, ast.literal_eval(str(info.get("default")))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def _type_name(value: Any) -> str:
    """``int``, ``None``; a list names its element types: ``list of str``, ``list of int and str``."""
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)) and value:
        kinds = list(dict.fromkeys(_type_name(v) for v in value))
        return f"{type(value).__name__} of {' and '.join(kinds)}"
    return type(value).__name__


def _a(type_name: str) -> str:
    return f"{'an' if type_name[0] in 'aeiouAEIOU' else 'a'} {type_name}"


def _same_kind(value: Any, default: Any) -> bool:
    """Does ``value`` fit where the notebook's default is ``default``? (int for float; bool is not int)."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return False
        kinds = {_type_name(d) for d in default}
        if len(kinds) == 1 and default:  # a list of one kind: every element of that kind
            return all(_same_kind(v, default[0]) for v in value)
        return True
    if isinstance(default, dict):
        return isinstance(value, dict)
    return isinstance(value, type(default))


def check_parameters(notebook: str | Path, parameters: Mapping[str, Any]) -> None:
    """Raise :class:`SweepError` for a name the ``parameters`` cell lacks, a value of the wrong type, or
    a value that is not JSON."""
    declared = notebook_parameters(notebook)
    name = Path(notebook).name
    unknown = [k for k in parameters if k not in declared]
    if unknown:
        valid = ", ".join(declared) or "(none: the notebook has no cell tagged 'parameters')"
        raise SweepError(f"{name} has no parameter {', '.join(map(repr, unknown))}; its parameters are: {valid}")
    for key, value in parameters.items():
        _check_json(name, key, value)
        known, default = _default_value(declared[key])
        if known and not _same_kind(value, default):
            raise SweepError(f"{name}: parameter {key!r} = {value!r} is {_a(_type_name(value))}, but its default "
                             f"{declared[key]['default']} is {_a(_type_name(default))}")


# ---------------------------------------------------------------------------------------------- run names

_SAFE = re.compile(r"[^A-Za-z0-9._+,=-]+")
_PLAIN = re.compile(r"^[A-Za-z0-9._+-]+$")


def _label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_label(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_label(v)}" for k, v in value.items())
    return str(value)


def _plain_value(value: Any) -> bool:
    if isinstance(value, (bool, int, float)) or value is None:
        return True
    return isinstance(value, str) and bool(_PLAIN.match(value)) and not _looks_like_other_type(value)


def _looks_like_other_type(text: str) -> bool:
    try:
        return not isinstance(load_yaml(text), str)
    except yaml_error():
        return True


def run_name(notebook: str | Path, parameters: Mapping[str, Any], stem: str | None = None) -> str:
    """A folder name for one run: ``<stem>__name=value__...``, safe on every file system.

    ``stem`` defaults to the notebook's file stem (:func:`notebook_stems` gives
    a longer one when two notebooks of a grid share it). Characters other than
    letters, digits and ``._+,=-`` become ``_`` (a ``/`` in a value makes no
    subfolder). When that loses information (lists, odd strings, a string that
    reads as a number) or the name is longer than ``MAX_NAME``, a short hash of
    the exact parameters is appended, so two different runs never share a folder.
    """
    stem = stem or Path(notebook).stem
    parts = [stem] + [f"{k}={_label(v)}" for k, v in parameters.items()]
    name = _SAFE.sub("_", "__".join(parts)).strip("._") or "run"
    lossy = not all(_plain_value(v) for v in parameters.values()) or name != "__".join(parts)
    if lossy or len(name) > MAX_NAME:
        digest = hashlib.sha1(json.dumps([stem, parameters], sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}"
    return name


def notebook_stems(notebooks: Sequence[str | Path]) -> dict[Path, str]:
    """Each notebook's name in run names: its stem, or, where two share a stem, the stem plus the
    shortest parent path that tells them apart (``dA/nb.ipynb`` -> ``dA-nb``)."""
    paths = [Path(n).resolve() for n in notebooks]
    stems: dict[Path, str] = {}
    for path in paths:
        twins = [p for p in dict.fromkeys(paths) if p.stem == path.stem and p != path]
        depth = 0
        while twins and depth < len(path.parts):
            depth += 1
            mine = path.parent.parts[len(path.parent.parts) - depth:]
            twins = [p for p in twins if p.parent.parts[len(p.parent.parts) - depth:] == mine]
        stems[path] = "-".join([*path.parent.parts[len(path.parent.parts) - depth:], path.stem]) if depth \
            else path.stem
    return stems


def plan_runs(notebooks: Sequence[str | Path], parameter_sets: Sequence[Mapping[str, Any]]) -> list[RunSpec]:
    """Check every (notebook, parameter set) and name its folder; the runs in order (notebook-major)."""
    if not notebooks:
        raise SweepError("no notebooks to run")
    missing = [str(n) for n in notebooks if not Path(n).is_file()]
    if missing:
        raise SweepError(f"notebook(s) not found: {', '.join(missing)}")
    stems = notebook_stems(notebooks)
    runs: list[RunSpec] = []
    names: set[str] = set()
    for nb in notebooks:
        path = Path(nb).resolve()
        for params in parameter_sets:
            params = dict(params)
            check_parameters(nb, params)
            name = run_name(nb, params, stems[path])
            if name in names:
                raise SweepError(f"the run {name!r} is listed twice ({Path(nb).name} with {params})")
            names.add(name)
            runs.append(RunSpec(str(path), params, name))
    return runs


def plan_sweep(grid: Mapping[str, Any] | str | Path, base_dir: str | Path | None = None) -> list[RunSpec]:
    """The checked runs of a grid (a mapping, or a YAML file; relative notebook paths are from its folder)."""
    if isinstance(grid, (str, Path)):
        base_dir = Path(grid).resolve().parent if base_dir is None else base_dir
        grid = load_grid(grid)
    base = Path(base_dir or ".")
    notebooks = grid.get("notebooks")
    if isinstance(notebooks, str):
        notebooks = [notebooks]
    if not isinstance(notebooks, list) or not notebooks or not all(isinstance(n, str) for n in notebooks):
        raise SweepError(f"the grid needs 'notebooks:', a list of notebook paths; got {notebooks!r}")
    paths = [Path(n) if Path(n).is_absolute() else base / n for n in notebooks]
    if "parameters" in grid and "runs" in grid:
        raise SweepError("the grid has both 'parameters:' (a product) and 'runs:' (a list); keep one")
    if "runs" in grid:
        sets = grid["runs"]
        if not isinstance(sets, list) or not all(isinstance(s, dict) for s in sets) or not sets:
            raise SweepError(f"'runs:' must be a list of parameter mappings, got {sets!r}")
    else:
        product = grid.get("parameters") or {}
        if not isinstance(product, dict):
            raise SweepError(f"'parameters:' must map each name to a list of values, got {product!r}")
        bad = {k: v for k, v in product.items() if not isinstance(v, list) or not v}
        if bad:
            name, value = next(iter(bad.items()))
            raise SweepError(f"'parameters:' {name!r} must be a non-empty list of values, got {value!r} "
                             f"(one value: [{value!r}]; a list value: [[{value!r}]])")
        keys = list(product)
        sets = [dict(zip(keys, values)) for values in itertools.product(*(product[k] for k in keys))]
    repeat = grid.get("repeat")
    if repeat is not None:
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise SweepError(f"'repeat:' must be a positive integer, got {repeat!r}")
        if any("seed" in s for s in sets):
            raise SweepError("'repeat:' sets seed = 0 .. repeat-1, so 'seed' cannot be listed as well")
        sets = [{**s, "seed": seed} for s in sets for seed in range(repeat)]
    return plan_runs(paths, sets)
