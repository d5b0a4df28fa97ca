"""Sweeps: a grid of notebook runs, checked first, run in parallel, resumable, on a process pool or Dask.

A grid is a YAML file (``experiments/quick.yaml``)::

    notebooks: [../notebooks/02_batchnorm_folding.ipynb]   # relative to the grid file
    parameters:                  # cartesian product, for every notebook ...
      bench_batch: [1, 8]
      model_names: [[resnet18]]
    repeat: 2                    # ... each combination with seed = 0 .. repeat-1
    # runs: [{bench_batch: 1}, {bench_batch: 8, seed: 3}]   # or: explicit parameter sets

The number of runs is ``len(notebooks) x prod(len(values)) x repeat``.
Everything is checked before the first run starts (:func:`plan_sweep`): the
notebooks exist, every parameter name is in the notebook's ``parameters``
cell (``papermill.inspect_notebook``), and every value has the type of the
cell's default (an int where an int is, a list where a list is; an int is
accepted for a float, and any value for a default of ``None``).

Each run writes its own folder ``<out>/<run name>/`` (:func:`execute_run`):
``parameters.json``, the executed ``<notebook>.ipynb``, ``log.txt`` (the
cells' output) and ``status.json`` (``running`` with the current cell, then
``ok`` / ``failed`` / ``timeout`` with seconds, ``ename`` / ``evalue`` and the
recorded figures). Every file is written atomically (a temporary file, then
``os.replace``), so a killed run never leaves half a status behind.
``summary.csv`` / ``summary.md`` (:func:`fusionlib.experiments.write_summary`)
are rewritten after every finished run, one row per planned run.

Runs go to any :class:`concurrent.futures.Executor` (:func:`run_sweep`): a
process pool here (:func:`local_executor`), ``dask.distributed``'s
``Client.get_executor()`` on a cluster (:func:`dask_executor`). Each run's
kernel gets ``OMP_NUM_THREADS = cores // workers`` (torch's intra-op threads),
its own IPC socket folder and connection file, and its own output folder; the
trained-model cache is shared (it writes atomically). A folder is held by one
sweep at a time (``sweep.lock``, :mod:`filelock`). ``resume=True`` skips runs
whose ``status.json`` says ``ok``; failed, timed-out and unfinished runs run
again. A run whose worker dies is run once more; dying twice records it as
failed (``WorkerDied``). A process pool stops all its workers when one dies, so
the runs on the other workers are run again too.
"""
from __future__ import annotations

import ast
import concurrent.futures as cf
import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import logging
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from fusionlib.display import format_table, progress
from fusionlib.experiments import RunResult, run_notebook, write_summary

__all__ = [
    "SweepError", "RunSpec", "load_grid", "plan_sweep", "plan_runs", "check_parameters", "notebook_parameters",
    "run_name", "execute_run", "run_sweep", "local_executor", "dask_executor", "default_workers",
    "threads_per_run", "load_results", "expand_wildcard", "aggregate", "plot_figure", "default_axes", "default_figures",
]

GRID_KEYS = ("notebooks", "parameters", "runs", "repeat")
STATUS_FILE = "status.json"
PLAN_FILE = "plan.json"
LOCK_FILE = "sweep.lock"
FINAL_STATES = ("ok", "failed", "timeout")
#: Runs whose worker died are run again this many times before they are recorded as failed.
WORKER_DEATH_RETRIES = 1
#: A pool that breaks this many times before a run could start stops the sweep (workers that cannot start).
UNSTARTED_LIMIT = 3


class SweepError(ValueError):
    """A grid, notebook, parameter or folder that cannot run; the message says what to change."""


@dataclass(frozen=True)
class RunSpec:
    """One planned run: a notebook (absolute path), its parameters, and its folder name in the sweep."""

    notebook: str
    parameters: dict
    name: str

    def as_dict(self) -> dict[str, Any]:
        return {"notebook": self.notebook, "parameters": self.parameters, "name": self.name}


# ---------------------------------------------------------------------------------------------- grid and checks


def load_grid(path: str | Path) -> dict[str, Any]:
    """Read a grid file; bad YAML or an unknown key is a :class:`SweepError` naming the file (and line)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"grid file {str(path)!r} does not exist")
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SweepError(f"grid file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(grid, dict):
        raise SweepError(f"grid file {str(path)!r} must be a mapping with the keys {', '.join(GRID_KEYS)}; "
                         f"got a {type(grid).__name__}")
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
    return "None" if value is None else type(value).__name__


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
    """Raise :class:`SweepError` for a name the ``parameters`` cell lacks or a value of the wrong type."""
    declared = notebook_parameters(notebook)
    name = Path(notebook).name
    unknown = [k for k in parameters if k not in declared]
    if unknown:
        valid = ", ".join(declared) or "(none: the notebook has no cell tagged 'parameters')"
        raise SweepError(f"{name} has no parameter {', '.join(map(repr, unknown))}; its parameters are: {valid}")
    for key, value in parameters.items():
        known, default = _default_value(declared[key])
        if known and not _same_kind(value, default):
            raise SweepError(f"{name}: parameter {key!r} = {value!r} is {_a(_type_name(value))}, but its default "
                             f"{declared[key]['default']} is {_a(_type_name(default))}")


_SAFE = re.compile(r"[^A-Za-z0-9._+,=-]+")
_PLAIN = re.compile(r"^[A-Za-z0-9._+-]+$")
MAX_NAME = 100


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
    import yaml

    try:
        return not isinstance(yaml.safe_load(text), str)
    except yaml.YAMLError:
        return True


def run_name(notebook: str | Path, parameters: Mapping[str, Any]) -> str:
    """A folder name for one run: ``<stem>__name=value__...``, safe on every file system.

    Characters other than letters, digits and ``._+,=-`` become ``_`` (a ``/`` in a
    value makes no subfolder). When that loses information (lists, odd strings, a
    string that reads as a number) or the name is longer than ``MAX_NAME``, a short
    hash of the exact parameters is appended, so two different runs never share a folder.
    """
    stem = Path(notebook).stem
    parts = [stem] + [f"{k}={_label(v)}" for k, v in parameters.items()]
    name = _SAFE.sub("_", "__".join(parts)).strip("._") or "run"
    lossy = not all(_plain_value(v) for v in parameters.values()) or name != "__".join(parts)
    if lossy or len(name) > MAX_NAME:
        digest = hashlib.sha1(json.dumps([stem, parameters], sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}"
    return name


def plan_runs(notebooks: Sequence[str | Path], parameter_sets: Sequence[Mapping[str, Any]]) -> list[RunSpec]:
    """Check every (notebook, parameter set) and name its folder; the runs in order (notebook-major)."""
    if not notebooks:
        raise SweepError("no notebooks to run")
    missing = [str(n) for n in notebooks if not Path(n).is_file()]
    if missing:
        raise SweepError(f"notebook(s) not found: {', '.join(missing)}")
    runs: list[RunSpec] = []
    names: set[str] = set()
    for nb in notebooks:
        for params in parameter_sets:
            params = dict(params)
            check_parameters(nb, params)
            name = run_name(nb, params)
            if name in names:
                raise SweepError(f"the run {name!r} is listed twice ({Path(nb).name} with {params})")
            names.add(name)
            runs.append(RunSpec(str(Path(nb).resolve()), params, name))
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
                             f"(one value: [{value!r}]; a list value: [{value!r}] as well)")
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


# ---------------------------------------------------------------------------------------------- one run


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a temporary file beside ``path``, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


class _ThreadLog(logging.Handler):
    """papermill's log lines (the cells' output) from this thread only, into a file."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.thread = threading.get_ident()
        self.stream = open(path, "a", encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.stream.close()
        super().close()


def execute_run(spec: RunSpec | Mapping[str, Any], out_dir: str | Path, timeout: float | None = None,
                threads: int = 1, attempt: int = 1) -> dict[str, Any]:
    """Run one planned run into ``out_dir/<name>/``; the final status (what ``status.json`` holds).

    Never raises for a failing notebook. ``timeout`` is papermill's
    ``execution_timeout``: the seconds one cell may take before the run is
    stopped and recorded as ``timeout``. The kernel gets ``OMP_NUM_THREADS =
    MKL_NUM_THREADS = threads``. Top-level, so a process pool or Dask can ship it.
    """
    if not isinstance(spec, RunSpec):
        spec = RunSpec(**spec)
    run_dir = Path(out_dir) / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    notebook = Path(spec.notebook)
    _write_json(run_dir / "parameters.json", {"notebook": spec.notebook, "parameters": spec.parameters})
    # papermill adds a cell of injected parameters
    n_cells = len(json.loads(notebook.read_text()).get("cells", [])) + (1 if spec.parameters else 0)
    status: dict[str, Any] = {"status": "running", "notebook": notebook.name, "cell": 0, "cells": n_cells,
                              "started": _now(), "host": socket.gethostname(), "pid": os.getpid(),
                              "attempt": attempt, "threads": threads}
    _write_json(run_dir / STATUS_FILE, status)

    def on_cell_start(cell: Any = None, cell_index: int = 0, **_: Any) -> None:
        status["cell"] = min(cell_index + 1, n_cells)
        _write_json(run_dir / STATUS_FILE, status)

    log = _ThreadLog(run_dir / "log.txt")
    log.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("papermill")
    logger.addHandler(log)
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    partial = run_dir / f"{notebook.stem}.partial.ipynb"
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        result = run_notebook(notebook, partial, spec.parameters, timeout=timeout, log_output=True,
                              on_cell_start=on_cell_start, env=env)
    finally:
        logger.removeHandler(log)
        logger.setLevel(old_level)
        log.close()
    final = run_dir / f"{notebook.stem}.ipynb"
    if partial.exists():
        os.replace(partial, final)
    status.update(status=result.status, seconds=round(result.seconds, 3), ename=result.ename,
                  evalue=result.evalue, records=result.records, finished=_now(), output=str(final))
    _write_json(run_dir / STATUS_FILE, status)
    return status


# ---------------------------------------------------------------------------------------------- executors


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_run(workers: int, cores: int | None = None) -> int:
    """Threads for each run's kernel so that ``workers`` runs do not oversubscribe ``cores``."""
    if not isinstance(workers, int) or workers < 1:
        raise SweepError(f"workers must be a positive integer, got {workers!r}")
    return max(1, (cores or default_workers()) // workers)


@contextlib.contextmanager
def local_executor(workers: int) -> Iterator[Callable[[], cf.Executor]]:
    """A factory of process pools with ``workers`` processes (a new one after a worker dies); all shut down at exit."""
    import multiprocessing

    made: list[cf.Executor] = []

    def make() -> cf.Executor:
        # spawn: a fresh interpreter per worker, no forked copy of the caller's threads and locks
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        made.append(pool)
        return pool

    try:
        yield make
    finally:
        for pool in made:
            pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def dask_executor(workers: int, scheduler: str | None = None) -> Iterator[Callable[[], cf.Executor]]:
    """``Client.get_executor()`` on the cluster at ``scheduler``, or on a new ``LocalCluster`` of ``workers``.

    The LocalCluster runs its workers as threads of this process (``processes=False``;
    each run's kernel is a process of its own), which starts in well under a second.
    Dask is imported here only: it is the optional extra ``fusionlib[dask]``.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise SweepError("--executor dask needs Dask: pip install 'fusionlib[dask]' "
                         "(or pip install 'dask[distributed]')") from exc
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        yield lambda: client.get_executor(pure=False)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ---------------------------------------------------------------------------------------------- the sweep


def _result(spec: RunSpec, status: Mapping[str, Any] | None, out_dir: Path) -> RunResult:
    status = status or {}
    state = status.get("status", "pending")
    if state not in FINAL_STATES:
        state = "pending"  # not finished: queued, running, or stopped with a killed sweep
    ename, evalue = status.get("ename", "") or "", status.get("evalue", "") or ""
    error = f"{ename}: {evalue}" if ename or evalue else ""
    records = {k: (float("nan") if v is None else v) for k, v in (status.get("records") or {}).items()}
    return RunResult(Path(spec.notebook).name, str(out_dir / spec.name / f"{Path(spec.notebook).stem}.ipynb"),
                     state, float(status.get("seconds") or 0.0), dict(spec.parameters), records, error,
                     ename=ename, evalue=evalue, run=spec.name)


def _check_plan(out: Path, runs: Sequence[RunSpec], resume: bool) -> None:
    plan = _read_json(out / PLAN_FILE)
    if plan is None:
        started = [p.name for p in out.iterdir() if (p / STATUS_FILE).exists()] if out.exists() else []
        if started and not resume:
            raise SweepError(f"{out} already holds runs ({started[0]}, ...); pass --resume to continue there, "
                             "or choose another --out")
        return
    if not resume:
        raise SweepError(f"{out} already holds a sweep ({len(plan.get('runs', []))} runs); pass --resume to "
                         "continue it, or choose another --out")


def run_sweep(runs: Sequence[RunSpec], out_dir: str | Path, executor: str = "local", workers: int | None = None,
              scheduler: str | None = None, resume: bool = False, timeout: float | None = None,
              show_progress: bool = True) -> list[RunResult]:
    """Run every planned run into ``out_dir``; one :class:`RunResult` per run, in plan order.

    ``executor`` is ``"local"`` (a process pool of ``workers``), ``"dask"`` (a
    Dask cluster at ``scheduler``, or a LocalCluster of ``workers``), or
    ``"serial"`` (this process, one run after another; what ``workers=1``
    locally means too). A folder is locked for the whole sweep; ``resume``
    skips runs already ``ok``. Writes ``summary.csv`` / ``summary.md`` after every run.
    The local pool starts its workers with ``spawn``: a script that calls this
    must guard the call with ``if __name__ == "__main__":`` (the ``fusionlib``
    command and Jupyter need nothing).
    """
    from filelock import FileLock, Timeout

    if executor not in ("local", "dask", "serial"):
        raise SweepError(f"executor must be 'local', 'dask' or 'serial', got {executor!r}")
    if executor == "dask":
        import importlib.util

        if importlib.util.find_spec("distributed") is None:
            raise SweepError("--executor dask needs Dask: pip install 'fusionlib[dask]' "
                             "(or pip install 'dask[distributed]')")
    workers = default_workers() if workers is None else workers
    threads = threads_per_run(workers)
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise SweepError(f"timeout must be a positive number of seconds, got {timeout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SweepError(f"another sweep is writing to {out} (it holds {out / LOCK_FILE}); wait for it to "
                         "finish, or choose another --out") from None
    try:
        _check_plan(out, runs, resume)
        _write_json(out / PLAN_FILE, {"runs": [r.as_dict() for r in runs], "written": _now()})
        statuses: dict[str, Any] = {r.name: _read_json(out / r.name / STATUS_FILE) if resume else None for r in runs}
        todo = [r for r in runs if (statuses[r.name] or {}).get("status") != "ok"]
        if not resume:
            for r in runs:  # a folder without plan.json may hold an older run of the same name
                (out / r.name / STATUS_FILE).unlink(missing_ok=True)
        results = {r.name: _result(r, statuses[r.name], out) for r in runs}
        write_summary([results[r.name] for r in runs], out)
        bar = progress(None, total=len(runs), desc="sweep", unit="run", enabled=show_progress)
        bar.update(len(runs) - len(todo))

        def finish(spec: RunSpec, status: dict[str, Any]) -> None:
            results[spec.name] = _result(spec, status, out)
            write_summary([results[r.name] for r in runs], out)
            bar.update(1)

        try:
            if executor == "serial" or (executor == "local" and workers == 1):
                _run_serial(todo, out, timeout, threads, bar, finish, results)
            else:
                factory_cm = local_executor(workers) if executor == "local" else dask_executor(workers, scheduler)
                with factory_cm as factory:
                    _run_parallel(todo, out, timeout, threads, factory, bar, finish, results)
        finally:
            bar.close()
        return [results[r.name] for r in runs]
    finally:
        lock.release()


def _postfix(results: Mapping[str, RunResult], running: str = "") -> str:
    states = [r.status for r in results.values()]
    text = f"ok {states.count('ok')} failed {states.count('failed') + states.count('timeout')} " \
           f"left {states.count('pending')}"
    return f"{text} | {running}" if running else text


def _short_labels(runs: Sequence[RunSpec]) -> dict[str, str]:
    """Run name -> notebook stem and the parameter values that vary across ``runs``, for the bar's text."""
    keys = [k for k in dict.fromkeys(k for r in runs for k in r.parameters)
            if len({json.dumps(r.parameters.get(k), sort_keys=True, default=str) for r in runs}) > 1]
    labels = {}
    for r in runs:
        stem = Path(r.notebook).stem
        stem = stem if len(stem) <= 24 else stem[:21] + "..."
        labels[r.name] = " ".join([stem] + [f"{k}={_label(r.parameters[k])}"[:24] for k in keys if k in r.parameters])
    return labels


def _cell_text(out: Path, spec: RunSpec, label: str) -> str:
    status = _read_json(out / spec.name / STATUS_FILE) or {}
    if status.get("status") != "running":
        return ""
    name = label
    cell = status.get("cell", 0)
    return f"{name} " + (f"cell {cell}/{status.get('cells', '?')}" if cell else "starting")


def _run_serial(todo, out, timeout, threads, bar, finish, results) -> None:
    labels = _short_labels(todo)
    for spec in todo:
        bar.set_postfix_str(_postfix(results, labels[spec.name]), refresh=True)
        finish(spec, execute_run(spec, out, timeout, threads))
    bar.set_postfix_str(_postfix(results), refresh=True)


def _worker_died(out: Path, spec: RunSpec, exc: BaseException, attempt: int) -> dict[str, Any]:
    status = _read_json(out / spec.name / STATUS_FILE) or {}
    status.update(status="failed", ename="WorkerDied", evalue=f"the worker running it ended ({type(exc).__name__}: "
                  f"{exc}) on attempt {attempt}", finished=_now(), records=status.get("records") or {})
    status.setdefault("seconds", 0.0)
    (out / spec.name).mkdir(parents=True, exist_ok=True)
    _write_json(out / spec.name / STATUS_FILE, status)
    return status


def _run_parallel(todo, out, timeout, threads, factory, bar, finish, results) -> None:
    attempts = {spec.name: 1 for spec in todo}
    unstarted: dict[str, int] = {}
    labels = _short_labels(todo)
    queue = list(todo)
    while queue:
        pool = factory()
        futures = {pool.submit(execute_run, spec, str(out), timeout, threads, attempts[spec.name]): spec
                   for spec in queue}
        queue = []
        shown = ""
        while futures:
            done, _ = cf.wait(futures, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                spec = futures.pop(fut)
                try:
                    finish(spec, fut.result())
                except Exception as exc:  # the worker died (BrokenProcessPool, dask's KilledWorker, ...)
                    started = (_read_json(out / spec.name / STATUS_FILE) or {}).get("status") == "running"
                    if not started and isinstance(exc, cf.BrokenExecutor):
                        unstarted[spec.name] = unstarted.get(spec.name, 0) + 1
                        if unstarted[spec.name] > UNSTARTED_LIMIT:
                            raise SweepError(
                                f"the worker processes stopped {unstarted[spec.name]} times before {spec.name} "
                                "started. A script that calls run_sweep must guard it with "
                                "`if __name__ == \"__main__\":` (the pool starts its workers with 'spawn', which "
                                "imports the script again)") from exc
                        queue.append(spec)  # never started: the pool broke under it
                    elif attempts[spec.name] <= WORKER_DEATH_RETRIES:
                        attempts[spec.name] += 1
                        _write_json(out / spec.name / STATUS_FILE, {"status": "queued", "attempt": attempts[spec.name]})
                        queue.append(spec)
                    else:
                        finish(spec, _worker_died(out, spec, exc, attempts[spec.name]))
            running = [_cell_text(out, s, labels[s.name]) for s in futures.values()]
            text = _postfix(results, "; ".join(t for t in running if t))
            if text != shown:
                bar.set_postfix_str(text, refresh=True)
                shown = text
    bar.set_postfix_str(_postfix(results), refresh=True)


# ---------------------------------------------------------------------------------------------- reading a folder


def load_results(out_dir: str | Path) -> list[RunResult]:
    """The runs of a sweep or run folder, in plan order."""
    out = Path(out_dir)
    plan = _read_json(out / PLAN_FILE)
    if plan is None:
        raise SweepError(f"{out} holds no {PLAN_FILE}: not a run or sweep folder (written by `fusionlib run` or `sweep`)")
    runs = [RunSpec(**r) for r in plan.get("runs", [])]
    return [_result(r, _read_json(out / r.name / STATUS_FILE), out) for r in runs]


def expand_wildcard(results: Sequence[RunResult], pattern: str, name: str) -> list[RunResult]:
    """Turn a family of figures into a parameter: ``speedup_fold_resnet18_b*`` with ``name="batch"``.

    Every figure matching ``pattern`` (``*`` stands for any text) becomes a
    row of its own, with ``name`` = the text ``*`` matched (read as YAML, so
    ``b8`` -> ``8``) and the figure (and its ``_lo`` / ``_hi``) under the name
    ``pattern``. For notebooks that loop over values inside one run
    (``batch_sizes = [1, 8, 32]``) and record one figure per value.
    """
    import yaml

    if pattern.count("*") != 1:
        raise SweepError(f"a figure pattern holds one '*', got {pattern!r}")
    regex = re.compile("^" + re.escape(pattern).replace(r"\*", "(.+?)") + "$")
    expanded = []
    for r in results:
        for fig, value in r.records.items():
            match = regex.match(fig)
            if not match or fig.endswith(("_lo", "_hi")) and fig[:-3] in r.records:
                continue
            try:
                key = yaml.safe_load(match.group(1))
            except yaml.YAMLError:
                key = match.group(1)
            records = {pattern: value}
            records.update({pattern + s: r.records[fig + s] for s in ("_lo", "_hi") if fig + s in r.records})
            expanded.append(RunResult(r.notebook, r.output, r.status, r.seconds, {**r.parameters, name: key},
                                      records, r.error, r.ename, r.evalue, r.run))
    if not expanded:
        raise SweepError(f"no recorded figure matches {pattern!r}")
    return expanded


def default_figures(results: Sequence[RunResult], count: int = 3) -> list[str]:
    """The figures to plot when none is named: numeric headline figures (speed-ups first), at most ``count``."""
    from fusionlib.experiments import HEADLINE_PREFIXES

    names = list(dict.fromkeys(k for r in results if r.status == "ok" for k, v in r.records.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)))
    names = [n for n in names if not (n.endswith(("_lo", "_hi")) and n[:-3] in names)]
    chosen = [n for p in HEADLINE_PREFIXES for n in names if n.startswith(p)] or names
    return list(dict.fromkeys(chosen))[:count]


def _key(value: Any) -> Any:
    """A hashable, printable stand-in for a parameter value (lists become tuples)."""
    if isinstance(value, list):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return value


def default_axes(results: Sequence[RunResult]) -> tuple[str | None, str | None]:
    """(x, by): the first and second parameters that take more than one value (``seed`` never)."""
    varying = [k for k in dict.fromkeys(k for r in results for k in r.parameters)
               if k != "seed" and len({_key(r.parameters.get(k)) for r in results}) > 1]
    return (varying[0] if varying else None), (varying[1] if len(varying) > 1 else None)


@dataclass
class Point:
    """One plotted point: the mean of a figure over the runs that differ only in ``seed``."""

    series: str
    x: Any
    mean: float
    sd: float  # standard deviation over seeds (nan with one run)
    n: int
    lo: float  # the recorded interval (<name>_lo / _hi) when a single run has one, else nan
    hi: float


def aggregate(results: Sequence[RunResult], y: str, x: str, by: str | None = None) -> list[Point]:
    """Mean and standard deviation of figure ``y`` at each ``x``, per series.

    A series is one value of ``by`` together with every other parameter that
    varies (and the notebook, when several ran); ``seed`` is what is averaged over.
    """
    ok = [r for r in results if r.status == "ok" and isinstance(r.records.get(y), (int, float))]
    if not ok:
        raise SweepError(f"no finished run recorded {y!r}")
    others = [k for k in dict.fromkeys(k for r in ok for k in r.parameters)
              if k not in (x, by, "seed") and len({_key(r.parameters.get(k)) for r in ok}) > 1]
    several_notebooks = len({r.notebook for r in ok}) > 1
    groups: dict[tuple[str, Any], list[RunResult]] = {}
    for r in ok:
        label = [f"{by}={_label(r.parameters.get(by))}"] if by else []
        label += [f"{k}={_label(r.parameters.get(k))}" for k in others]
        if several_notebooks:
            label.insert(0, Path(r.notebook).stem)
        groups.setdefault((", ".join(label) or y, _key(r.parameters.get(x))), []).append(r)
    points = []
    for (series, xv), rs in groups.items():
        values = [float(r.records[y]) for r in rs]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
        lo = hi = math.nan
        if len(rs) == 1 and isinstance(rs[0].records.get(f"{y}_lo"), (int, float)):
            lo, hi = float(rs[0].records[f"{y}_lo"]), float(rs[0].records.get(f"{y}_hi", math.nan))
        points.append(Point(series, xv, mean, sd, len(values), lo, hi))
    return points


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, _label(value))


def format_points(points: Sequence[Point], y: str, x: str) -> str:
    """The aggregated figure as a table: series, x, mean, sd over seeds, n."""
    order = list(dict.fromkeys(p.series for p in points))
    points = sorted(points, key=lambda p: (order.index(p.series), _sort_key(p.x)))
    rows = [[p.series, p.x if isinstance(p.x, (int, float)) else _label(p.x), p.mean,
             "" if math.isnan(p.sd) else p.sd, p.n] for p in points]
    return format_table(["series", x, f"{y} (mean)", "sd over seeds", "runs"], rows)


def plot_figure(results: Sequence[RunResult], y: str, x: str, by: str | None, path: str | Path) -> Path:
    """A PNG of figure ``y`` against parameter ``x``, one line per series; error bars are the standard
    deviation over seeds where seeds repeat, else the recorded interval (``<y>_lo`` / ``<y>_hi``) if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = aggregate(results, y, x, by)
    xs = list(dict.fromkeys(p.x for p in points))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    if numeric:
        xs = sorted(xs)
    position = {v: (v if numeric else i) for i, v in enumerate(xs)}
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=80)
    uses_sd = uses_interval = False
    for series in dict.fromkeys(p.series for p in points):
        pts = sorted((p for p in points if p.series == series), key=lambda p: xs.index(p.x))
        px = [position[p.x] for p in pts]
        py = [p.mean for p in pts]
        lower, upper = [], []
        for p in pts:
            if p.n > 1:
                lower.append(p.sd), upper.append(p.sd)
                uses_sd = True
            elif not math.isnan(p.lo):
                lower.append(max(0.0, p.mean - p.lo)), upper.append(max(0.0, p.hi - p.mean))
                uses_interval = True
            else:
                lower.append(0.0), upper.append(0.0)
        ax.errorbar(px, py, yerr=[lower, upper], marker="o", capsize=3, label=series)
    if not numeric:
        ax.set_xticks(range(len(xs)), [_label(v) for v in xs])
    else:
        if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [_label(v) for v in xs])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    bars = " and ".join(t for t, used in (("± sd over seeds", uses_sd), ("recorded interval", uses_interval)) if used)
    n = max(p.n for p in points)
    ax.set_title(f"{y} vs {x}" + (f" (mean of {n} seeds)" if n > 1 else "") + (f"\nerror bars: {bars}" if bars else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    if y.startswith("speedup"):
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)  # no difference
    if len({p.series for p in points}) > 1 or points[0].series != y:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
