"""Key figures, papermill runs and parameter sweeps.

A notebook publishes a figure with :func:`record` (``record("max_rel_error", 3e-7)``).
The figure is stored as a notebook output with its own MIME type (the way
scrapbook's ``glue`` does it), so any executed notebook can be read back with
:func:`read_records`. :func:`run_notebooks` executes notebooks with papermill into
``runs/<timestamp>/`` and collects status, seconds and figures into one table;
:func:`sweep` does the same for the cartesian product of parameter values.

Command line (what ``make run`` calls)::

    python -m fusionlib.experiments run notebooks/*.ipynb [-p seed=1]
    python -m fusionlib.experiments sweep notebooks/03_fuse_modules.ipynb -p batch_size=1,8 -p seed=0,1
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

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


def record(name: str, value: Any) -> None:
    """Publish a key figure of this notebook (an error, a ratio, an accuracy).

    In a notebook it becomes an output with MIME type ``MIMETYPE`` (read back by
    :func:`read_records`) and shows as ``name = value``; elsewhere it is printed
    and kept in ``RECORDED``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"record() needs a non-empty string name, got {name!r}")
    value = _plain(value)
    json.dumps(value)  # fail here, not when the notebook is saved
    RECORDED[name] = value
    text = f"{name} = {value:.6g}" if isinstance(value, float) else f"{name} = {value}"
    if _in_notebook_kernel():
        from IPython.display import display

        display({MIMETYPE: {"name": name, "value": value}, "text/plain": text}, raw=True)
    else:
        print(text)


def read_records(notebook: str | Path | dict) -> dict[str, Any]:
    """The figures a notebook recorded, in order (a later record of a name wins)."""
    nb = notebook if isinstance(notebook, dict) else json.loads(Path(notebook).read_text())
    found: dict[str, Any] = {}
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if MIMETYPE in data:
                item = data[MIMETYPE]
                found[item["name"]] = item["value"]
    return found


@dataclass
class RunResult:
    """One executed notebook: where it went, how it ended, what it recorded."""

    notebook: str
    output: str
    status: str  # "ok" or "failed"
    seconds: float
    parameters: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _ipc_kernel_manager_class():
    """A kernel manager whose kernels talk over local IPC sockets instead of TCP ports.

    Kernels started for a run live on this machine only; IPC opens no port and
    spares every run the kernel's "running over TCP without encryption" warning.
    """
    from jupyter_client.manager import AsyncKernelManager

    class IpcKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"

    return IpcKernelManager


def run_notebook(
    notebook: str | Path,
    output: str | Path,
    parameters: dict[str, Any] | None = None,
    kernel_name: str = "python3",
) -> RunResult:
    """Execute one notebook with papermill; never raises for a failing notebook."""
    import papermill as pm

    notebook, output = Path(notebook), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    parameters = dict(parameters or {})
    start = time.perf_counter()
    status, error = "ok", ""
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            kernel_name=kernel_name,
            cwd=str(notebook.parent),
            progress_bar=False,
            kernel_manager_class=_ipc_kernel_manager_class(),
        )
    except Exception as exc:  # papermill raises PapermillExecutionError and friends
        status = "failed"
        error = f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    seconds = time.perf_counter() - start
    records = read_records(output) if output.exists() else {}
    return RunResult(notebook.name, str(output), status, seconds, parameters, records, error)


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


def _progress(items: Sequence, desc: str):
    from tqdm import tqdm  # plain text bars: no ipywidgets needed, readable in saved notebooks

    return tqdm(items, desc=desc, unit="nb")


def run_notebooks(
    notebooks: Iterable[str | Path],
    parameters: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
) -> tuple[Path, list[RunResult]]:
    """Run each notebook into ``out_dir`` (default: a new ``runs/<timestamp>/``).

    A failing notebook is recorded and the rest still run. Writes
    ``summary.csv`` and ``summary.md`` beside the executed notebooks.
    """
    notebooks = [Path(n) for n in notebooks]
    out = Path(out_dir) if out_dir else new_run_dir()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    bar = _progress(notebooks, "notebooks")
    for nb in bar:
        bar.set_postfix_str(nb.name)
        results.append(run_notebook(nb, out / nb.name, parameters))
    write_summary(results, out)
    return out, results


def sweep_grid(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of parameter values: {"a": [1, 2], "b": [3]} -> [{a:1,b:3}, {a:2,b:3}]."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def sweep(
    notebook: str | Path,
    grid: dict[str, Sequence[Any]],
    out_dir: str | Path | None = None,
) -> tuple[Path, list[RunResult]]:
    """Run ``notebook`` once per point of ``grid``; one summary table for all runs."""
    notebook = Path(notebook)
    out = Path(out_dir) if out_dir else new_run_dir()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    points = sweep_grid(grid)
    for params in _progress(points, f"sweep {notebook.stem}"):
        tag = "__".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        results.append(run_notebook(notebook, out / f"{notebook.stem}__{tag}.ipynb", params))
    write_summary(results, out)
    return out, results


def results_table(results: Sequence[RunResult]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: notebook, status, seconds, each parameter, each recorded figure."""
    param_keys = list(dict.fromkeys(k for r in results for k in r.parameters))
    record_keys = list(dict.fromkeys(k for r in results for k in r.records))
    header = ["notebook", "status", "seconds", *param_keys, *record_keys]
    rows = []
    for r in results:
        rows.append(
            [r.notebook, r.status, round(r.seconds, 1)]
            + [r.parameters.get(k, "") for k in param_keys]
            + [r.records.get(k, "") for k in record_keys]
        )
    return header, rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(results: Sequence[RunResult]) -> str:
    """One line per notebook: status, seconds, and its figures as name=value (long form)."""
    header = ["notebook", "status", "seconds", "key figures"]
    rows = []
    for r in results:
        figures = ", ".join(f"{k}={_cell(v)}" for k, v in r.records.items())
        params = ", ".join(f"{k}={v}" for k, v in r.parameters.items())
        name = f"{r.notebook} [{params}]" if params else r.notebook
        rows.append([name, r.status if r.status == "ok" else f"FAILED ({r.error})", round(r.seconds, 1), figures])
    return format_table(header, rows)


def write_summary(results: Sequence[RunResult], out_dir: str | Path) -> None:
    """``summary.csv`` (one column per parameter and figure) and ``summary.md``."""
    out_dir = Path(out_dir)
    header, rows = results_table(results)
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    (out_dir / "summary.md").write_text(format_summary(results) + "\n")


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

    from fusionlib.env import format_environment

    print(format_environment())
    if args.command == "run":
        out, results = run_notebooks(args.notebooks, parse_parameters(args.param), args.out)
    else:
        out, results = sweep(args.notebook, parse_parameters(args.param, sweep_lists=True), args.out)
    print()
    print(format_summary(results))
    print(f"\nexecuted notebooks and summary.csv / summary.md in {out}/")
    failed = [r for r in results if r.status != "ok"]
    if failed:
        print(f"{len(failed)} of {len(results)} notebook run(s) FAILED: " + ", ".join(r.notebook for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
