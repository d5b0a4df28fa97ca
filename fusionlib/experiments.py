"""Key figures, papermill runs and parameter sweeps.

A notebook publishes a figure with :func:`record` (``record("max_rel_error", 3e-7)``).
The figure is stored as a notebook output with its own MIME type (the way
scrapbook's ``glue`` does it), so any executed notebook can be read back with
:func:`read_records`. Records are scalars. A speed-up is recorded with
:func:`record_speedup` as three sibling scalars: ``<name>`` (the paired ratio),
``<name>_lo`` and ``<name>_hi`` (its interval). A non-finite float (NaN, inf)
is stored as JSON ``null`` with a ``"nonfinite"`` tag (JSON has no NaN) and read
back as the float it was.

:func:`run_notebook` executes one notebook with papermill; :mod:`fusionlib.sweeps`
runs many into ``runs/<timestamp>/<run>/`` and collects status, seconds and figures
into ``summary.csv`` (every parameter and figure, one column each) and ``summary.md``
(every figure, one table per run); the printed summary (:func:`format_summary`) fits
120 columns and shows the headline figures only (see :func:`headline_figures`).

Command line: ``fusionlib run | sweep | report`` (:mod:`fusionlib.cli`; what
``make run`` calls); grids, parallel runs and reports are in :mod:`fusionlib.sweeps`.
The older ``python -m fusionlib.experiments run | sweep NOTEBOOK -p name=v1,v2``
still works and goes through the same code.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fusionlib.display import format_table

MIMETYPE = "application/vnd.fusionlib.record+json"

#: Figures recorded outside a notebook kernel (plain Python), by name.
RECORDED: dict[str, Any] = {}


def _in_notebook_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _plain(value: Any) -> Any:
    """Turn numpy / torch scalars into JSON-friendly Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return value


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"record() needs a non-empty string name, got {name!r}")


def _encode(name: str, value: Any) -> dict[str, Any]:
    """The MIME payload of one record; a non-finite float becomes ``null`` plus a ``nonfinite`` tag."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return {"name": name, "value": None, "nonfinite": repr(value)}  # 'nan', 'inf', '-inf'
    try:
        json.dumps(value, allow_nan=False)  # fail here, not when the notebook is saved
    except ValueError as exc:
        raise ValueError(f"record {name!r}: {value!r} holds a non-finite number; record scalars") from exc
    except TypeError as exc:
        raise TypeError(f"record {name!r}: a {type(value).__name__} is not JSON-serializable; "
                        "record a number, a string or a bool") from exc
    return {"name": name, "value": value}


def _decode(item: dict[str, Any]) -> Any:
    if item.get("nonfinite"):
        return float(item["nonfinite"])
    return item.get("value")


def _text(name: str, value: Any) -> str:
    return f"{name} = {value:.6g}" if isinstance(value, float) else f"{name} = {value}"


def _publish(items: list[dict[str, Any]], text: str) -> None:
    """Keep the records in ``RECORDED``; show them as one output (a notebook) or print ``text``."""
    for item in items:
        RECORDED[item["name"]] = _decode(item)
    if _in_notebook_kernel():
        from IPython.display import display

        payload = items[0] if len(items) == 1 else items
        display({MIMETYPE: payload, "text/plain": text}, raw=True)
    else:
        print(text)


def record(name: str, value: Any) -> None:
    """Publish a key figure of this notebook (an error, a ratio, an accuracy).

    In a notebook it becomes an output with MIME type ``MIMETYPE`` (read back by
    :func:`read_records`) and shows as ``name = value``; elsewhere it is printed
    and kept in ``RECORDED``. NaN and infinities are stored as JSON ``null``
    tagged ``"nonfinite": "nan"`` (or ``"inf"``, ``"-inf"``) and read back as
    floats; a value JSON cannot hold raises ``TypeError`` naming the record.
    """
    _check_name(name)
    item = _encode(name, value)
    _publish([item], _text(name, _decode(item)))


def record_speedup(name: str, speedup: Any, row: str | None = None) -> None:
    """Record a speed-up and its interval as the scalars ``<name>``, ``<name>_lo`` and ``<name>_hi``.

    ``speedup`` is a :class:`fusionlib.bench.LatencyTable` with ``row`` the
    name of the measured row (``record_speedup("speedup_resnet18", table,
    "resnet18 folded")``), or a :class:`fusionlib.bench.Speedup` (no ``row``).
    Shows as one line: ``speedup_resnet18 = 1.44 (interval 1.40-1.49)``.
    """
    _check_name(name)
    if hasattr(speedup, "interval") and callable(speedup.interval):  # a LatencyTable
        if row is None:
            raise ValueError(f"record_speedup({name!r}, table): name the table row to record, "
                             f"e.g. row={speedup.rows[-1].name!r}")
        speedup = speedup.interval(row)
    elif row is not None:
        raise ValueError(f"record_speedup({name!r}): row={row!r} needs a LatencyTable, got {type(speedup).__name__}")
    if not all(hasattr(speedup, attr) for attr in ("ratio", "lo", "hi")):
        raise TypeError(f"record_speedup({name!r}) takes a LatencyTable and a row name, or a Speedup; "
                        f"got {type(speedup).__name__}")
    items = [_encode(name, speedup.ratio), _encode(f"{name}_lo", speedup.lo), _encode(f"{name}_hi", speedup.hi)]
    ratio, lo, hi = (_decode(item) for item in items)
    _publish(items, f"{name} = {ratio:.4g} (interval {lo:.4g}-{hi:.4g})")


def read_records(notebook: str | Path | dict) -> dict[str, Any]:
    """The figures a notebook recorded, in order (a later record of a name wins).

    Non-finite figures come back as ``float("nan")`` / ``float("inf")``.
    """
    nb = notebook if isinstance(notebook, dict) else json.loads(Path(notebook).read_text())
    found: dict[str, Any] = {}
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if MIMETYPE in data:
                payload = data[MIMETYPE]
                for item in payload if isinstance(payload, list) else [payload]:
                    found[item["name"]] = _decode(item)
    return found


@dataclass
class RunResult:
    """One executed notebook: where it went, how it ended, what it recorded."""

    notebook: str
    output: str
    status: str  # "ok", "failed", "timeout", or "pending" (not run yet, or stopped mid-run)
    seconds: float
    parameters: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # "<ename>: <evalue>"
    ename: str = ""  # the exception's name, e.g. "RuntimeError" or "CellTimeoutError"
    evalue: str = ""  # its message (one line)
    run: str = ""  # the run's folder name in a sweep


def _ipc_kernel_manager_class(socket_dir: str | Path, env: dict[str, str] | None = None):
    """A kernel manager whose kernels talk over local IPC sockets in ``socket_dir``, not TCP ports.

    Kernels started for a run live on this machine only; IPC opens no port and
    spares every run the kernel's "running over TCP without encryption" warning.
    The sockets live in ``socket_dir`` (an absolute path): by default they would
    be created in the kernel's working directory (the notebooks' folder), where
    two concurrent runs race for the same ``kernel-ipc-N`` names. The
    connection file is there too, and ``env`` is added to the kernel's
    environment only (safe when several runs share a process, as Dask threads do).
    """
    from jupyter_client.manager import AsyncKernelManager

    ip = os.path.join(os.path.abspath(socket_dir), "kernel-ipc")
    extra_env = dict(env or {})

    class IpcKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = ip
            self.connection_file = os.path.join(os.path.abspath(socket_dir), "kernel.json")

        async def _async_pre_start_kernel(self, **kw: Any):
            if extra_env:
                kw["env"] = {**(kw.get("env") or os.environ), **extra_env}
            return await super()._async_pre_start_kernel(**kw)

    return IpcKernelManager


def run_notebook(
    notebook: str | Path,
    output: str | Path,
    parameters: dict[str, Any] | None = None,
    kernel_name: str = "python3",
    timeout: float | None = None,
    log_output: bool = False,
    on_cell_start: Any = None,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Execute one notebook with papermill; never raises for a failing notebook.

    ``timeout`` is papermill's ``execution_timeout`` (seconds one cell may run;
    the run then ends with status ``"timeout"``). ``log_output`` sends the cells'
    output to the ``papermill`` logger; ``on_cell_start(cell=, cell_index=)`` is
    nbclient's hook; ``env`` adds environment variables for the kernel only.
    A failed run keeps the notebook's exception as ``ename`` / ``evalue``.
    """
    import papermill as pm

    notebook, output = Path(notebook), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    parameters = dict(parameters or {})
    start = time.perf_counter()
    status, ename, evalue = "ok", "", ""
    socket_dir = tempfile.mkdtemp(prefix="fusionlib-ipc-")  # private to this run; removed below
    hooks = {"on_cell_start": on_cell_start} if on_cell_start is not None else {}
    try:
        _on_own_event_loop(lambda: pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            kernel_name=kernel_name,
            cwd=str(notebook.parent),
            progress_bar=False,
            log_output=log_output,
            execution_timeout=timeout,
            kernel_manager_class=_ipc_kernel_manager_class(socket_dir, env),
            **hooks,
        ))
    except Exception as exc:  # papermill raises PapermillExecutionError (ename / evalue) and friends
        status, ename, evalue = _describe_failure(exc)
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    records = read_records(output) if output.exists() else {}
    error = f"{ename}: {evalue}" if status != "ok" else ""
    return RunResult(notebook.name, str(output), status, seconds, parameters, records, error, ename, evalue)


def _on_own_event_loop(fn: Any) -> Any:
    """Call ``fn``; off the main thread, in a fresh ``contextvars`` context, closing the loop it made.

    jupyter_core keeps its event loop in a context variable; threads that run
    tasks in a copy of their submitter's context (Dask's workers do) would all
    share the submitter's loop and fail with "This event loop is already running".
    """
    import contextvars
    import threading

    if threading.current_thread() is threading.main_thread():
        return fn()
    try:
        return contextvars.Context().run(fn)
    finally:
        import asyncio

        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except Exception:  # no loop was set in this thread
            loop = None
        if loop is not None and not loop.is_running():
            loop.close()
            asyncio.set_event_loop(None)


def _describe_failure(exc: BaseException) -> tuple[str, str, str]:
    """(status, ename, evalue) of a failed run: ``timeout`` for a cell that ran past the timeout."""
    if hasattr(exc, "ename"):  # PapermillExecutionError: the notebook's own exception
        return "failed", str(exc.ename), str(exc.evalue).strip()
    lines = str(exc).strip().splitlines()
    status = "timeout" if isinstance(exc, TimeoutError) or type(exc).__name__ == "CellTimeoutError" else "failed"
    return status, type(exc).__name__, (lines[0] if status == "timeout" and lines else lines[-1] if lines else "")


def new_run_dir(root: str | Path = "runs") -> Path:
    """``runs/<timestamp>/``, created (a suffix keeps two runs in one second apart)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def _csv_value(value: Any) -> Any:
    """Lists and mappings as JSON (``["resnet18"]``), so the CSV reads back with a YAML or JSON parser."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def results_table(results: Sequence[RunResult]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: notebook, each parameter, status, seconds, error, each recorded figure."""
    param_keys = list(dict.fromkeys(k for r in results for k in r.parameters))
    record_keys = list(dict.fromkeys(k for r in results for k in r.records))
    header = ["notebook", *param_keys, "status", "seconds", "error", *record_keys]
    rows = []
    for r in results:
        rows.append(
            [r.notebook]
            + [_csv_value(r.parameters.get(k, "")) for k in param_keys]
            + [r.status, round(r.seconds, 1), r.error]
            + [r.records.get(k, "") for k in record_keys]
        )
    return header, rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


#: Records whose names start with one of these are a run's headline figures.
HEADLINE_PREFIXES = ("speedup", "max_rel_error", "test_accuracy", "accuracy")
#: At most this many headline figures per run in the printed summary.
HEADLINE_COUNT = 3
#: Width of the printed summary.
SUMMARY_WIDTH = 120


def headline_figures(records: dict[str, Any], count: int = HEADLINE_COUNT) -> list[str]:
    """Up to ``count`` figures as ``"name = value"`` text, for the printed summary.

    The headline figures are the first ``count`` records whose names start
    with one of ``HEADLINE_PREFIXES``, taken in that order of prefixes
    (speed-ups first, then errors, then accuracies) and in recording order
    within a prefix; a run with none shows its first ``count`` records. A speed-up
    shows its ``_lo`` / ``_hi`` siblings as ``1.44 [1.40-1.49]``. Every record
    is in ``summary.csv`` and ``summary.md``.
    """
    siblings = {n for n in records if n.endswith(("_lo", "_hi")) and n[:-3] in records}
    names = [n for n in records if n not in siblings]
    chosen = [n for prefix in HEADLINE_PREFIXES for n in names if n.startswith(prefix)] or names
    lines = []
    for n in chosen[:count]:
        text = f"{n} = {_cell(records[n])}"
        if f"{n}_lo" in records and f"{n}_hi" in records:
            text += f" [{_cell(records[n + '_lo'])}-{_cell(records[n + '_hi'])}]"
        lines.append(text)
    if len(names) > len(lines):
        lines.append(f"(+{len(names) - len(lines)} more in summary.csv)")
    return lines


def _run_label(r: RunResult) -> str:
    params = ", ".join(f"{k}={v}" for k, v in r.parameters.items())
    return f"{r.notebook} [{params}]" if params else r.notebook


def _status(r: RunResult) -> str:
    if r.status in ("ok", "pending"):
        return "ok" if r.status == "ok" else "not run"
    return f"{'TIMED OUT' if r.status == 'timeout' else 'FAILED'} ({r.error})"


def format_summary(results: Sequence[RunResult], width: int = SUMMARY_WIDTH) -> str:
    """One row per run: notebook [parameters], status, seconds and its headline figures.

    Long cells wrap so that no line is wider than ``width`` (>= 80) characters;
    :func:`headline_figures` says which figures are shown.
    """
    if width < 80:
        raise ValueError(f"format_summary needs width >= 80, got {width!r}")
    name_w, status_w = 28, 24
    figures_w = width - name_w - status_w - 9 - 3 * 2  # "seconds" is 9 wide, two spaces between columns
    rows = [[_run_label(r), _status(r), round(r.seconds, 1), "\n".join(headline_figures(r.records))]
            for r in results]
    while True:  # a seconds column wider than 9 (runs over 27 hours) takes its width from the figures
        text = format_table(["notebook", "status", "seconds", "headline figures"], rows,
                            floatfmt=("", "", ".1f", ""), maxcolwidths=[name_w, status_w, None, figures_w])
        excess = max(len(line) for line in text.splitlines()) - width
        if excess <= 0 or figures_w <= 20:
            return text
        figures_w -= excess


def format_full_summary(results: Sequence[RunResult]) -> str:
    """Markdown: the printed summary, then every run's parameters and figures in a table of its own."""
    parts = ["# Run summary", "", "```text", format_summary(results), "```"]
    for r in results:
        parts += ["", f"## {_run_label(r)}", "",
                  f"{_status(r)}, {r.seconds:.1f} s, executed notebook: `{r.output}`", ""]
        rows = [[f"parameter {k}", _cell(v)] for k, v in r.parameters.items()]
        rows += [[k, _cell(v)] for k, v in r.records.items()]
        if rows:
            parts += ["```text", format_table(["name", "value"], rows, colalign=("left", "left")), "```"]
        else:
            parts.append("(no figures recorded)")
    return "\n".join(parts) + "\n"


def write_summary(results: Sequence[RunResult], out_dir: str | Path) -> None:
    """``summary.csv`` (one column per parameter and figure) and ``summary.md`` (:func:`format_full_summary`)."""
    out_dir = Path(out_dir)
    header, rows = results_table(results)
    tmp = out_dir / f".summary.csv.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, out_dir / "summary.csv")  # atomic: a reader never sees half a table
    tmp = out_dir / f".summary.md.{os.getpid()}.tmp"
    tmp.write_text(format_full_summary(results))
    os.replace(tmp, out_dir / "summary.md")


def load_summary(run_dir: str | Path) -> list[dict[str, str]]:
    """Read ``summary.csv`` of a run folder back as a list of dicts."""
    with open(Path(run_dir) / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def parse_parameters(items: Sequence[str], sweep_lists: bool = False) -> dict[str, Any]:
    """``["seed=1", "model=resnet18"]`` -> {"seed": 1, "model": "resnet18"}.

    With ``sweep_lists`` each value is a comma-separated list: ``batch_size=1,8``.
    """
    params: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"parameter {item!r} is not of the form name=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise ValueError(f"parameter name {key!r} is not a Python identifier")
        if sweep_lists:
            params[key] = [_parse_value(v) for v in text.split(",")]
        else:
            params[key] = _parse_value(text)
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fusionlib.experiments``: the older command line, kept; ``fusionlib`` (:mod:`fusionlib.cli`) is the new one.

    ``run`` is ``fusionlib run``; ``sweep NOTEBOOK -p name=v1,v2`` runs one notebook
    over the product of comma-separated values.
    """
    from fusionlib import cli

    parser = argparse.ArgumentParser(prog="python -m fusionlib.experiments", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="execute notebooks into runs/<timestamp>/ and print a summary")
    p_run.add_argument("notebooks", nargs="+")
    p_run.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE")
    p_run.add_argument("-o", "--out", default=None, help="output folder (default: runs/<timestamp>)")
    p_sweep = sub.add_parser("sweep", help="run one notebook over a grid of parameters")
    p_sweep.add_argument("notebook")
    p_sweep.add_argument("-p", "--param", action="append", default=[], metavar="NAME=V1,V2,...")
    p_sweep.add_argument("-o", "--out", default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        return cli.main(["run", *args.notebooks, *(arg for p in args.param for arg in ("-p", p))]
                        + (["--out", args.out] if args.out else []))
    try:
        grid = parse_parameters(args.param, sweep_lists=True)
        return cli.run_grid({"notebooks": [str(Path(args.notebook).resolve())], "parameters": grid}, out=args.out)
    except ValueError as exc:  # fusionlib.sweeps.SweepError included
        print(f"python -m fusionlib.experiments sweep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
