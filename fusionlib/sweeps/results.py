"""A sweep folder and what it holds: run statuses, the summary tables, and figures aggregated over seeds.

A run or sweep folder (``runs/<timestamp>/``) holds ``plan.json`` (the planned
runs), one folder per run (``status.json``: ``running`` with the current cell,
then ``ok`` / ``failed`` / ``timeout`` / ``interrupted``, seconds, ``ename`` /
``evalue`` and the recorded figures) and ``summary.csv`` / ``summary.md`` (one
row per planned run). Paths stored in these files are relative to the folder,
so a finished folder can be moved or shared; :func:`load_results` rebuilds
everything from the folder. Every file is written atomically (a temporary
file, then ``os.replace``): a killed run never leaves half a file behind.

The printed summary (:func:`format_summary`) fits 120 columns and shows each
run's headline figures (:func:`headline_figures`); ``summary.csv`` has every
parameter and figure, one column each.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fusionlib.display import format_table
from fusionlib.sweeps.plan import RunSpec, SweepError, _label, parse_value

__all__ = [
    "RunResult", "STATUS_FILE", "PLAN_FILE", "FINAL_STATES", "load_results", "write_summary", "results_table",
    "format_summary", "format_full_summary", "headline_figures", "expand_wildcard", "default_figures",
    "default_axes", "aggregate", "format_points", "Point",
]

STATUS_FILE = "status.json"
PLAN_FILE = "plan.json"
#: A run in one of these states is finished; ``--resume`` reruns all but ``ok``.
FINAL_STATES = ("ok", "failed", "timeout", "interrupted")


@dataclass
class RunResult:
    """One executed notebook: where it went, how it ended, what it recorded."""

    notebook: str
    output: str  # the executed notebook, relative to the sweep folder: "<run>/<stem>.ipynb"
    status: str  # "ok", "failed", "timeout", "interrupted", or "pending" (not run yet, or stopped mid-run)
    seconds: float
    parameters: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # "<ename>: <evalue>"
    ename: str = ""  # the exception's name, e.g. "RuntimeError" or "CellTimeoutError"
    evalue: str = ""  # its message (one line)
    run: str = ""  # the run's folder name in a sweep


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a temporary file beside ``path``, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_result(spec: RunSpec, status: Mapping[str, Any] | None) -> RunResult:
    """The :class:`RunResult` of a planned run from its ``status.json`` (``None``: not started)."""
    status = status or {}
    state = status.get("status", "pending")
    if state not in FINAL_STATES:
        state = "pending"  # not finished: queued, running, or stopped with a killed sweep
    ename, evalue = status.get("ename", "") or "", status.get("evalue", "") or ""
    error = f"{ename}: {evalue}" if ename or evalue else ""
    records = {k: (float("nan") if v is None else v) for k, v in (status.get("records") or {}).items()}
    return RunResult(Path(spec.notebook).name, f"{spec.name}/{Path(spec.notebook).stem}.ipynb",
                     state, float(status.get("seconds") or 0.0), dict(spec.parameters), records, error,
                     ename=ename, evalue=evalue, run=spec.name)


def load_plan(out_dir: Path) -> list[RunSpec] | None:
    plan = read_json(out_dir / PLAN_FILE)
    return None if plan is None else [RunSpec(**r) for r in plan.get("runs", [])]


def load_results(out_dir: str | Path) -> list[RunResult]:
    """The runs of a sweep or run folder, in plan order."""
    out = Path(out_dir)
    runs = load_plan(out)
    if runs is None:
        raise SweepError(f"{out} holds no {PLAN_FILE}: not a run or sweep folder (written by `fusionlib run` or `sweep`)")
    return [run_result(r, read_json(out / r.name / STATUS_FILE)) for r in runs]


# ---------------------------------------------------------------------------------------------- tables


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


_STATUS_TEXT = {"timeout": "TIMED OUT", "interrupted": "INTERRUPTED"}


def _status(r: RunResult) -> str:
    if r.status in ("ok", "pending"):
        return "ok" if r.status == "ok" else "not run"
    return f"{_STATUS_TEXT.get(r.status, 'FAILED')} ({r.error})"


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


# ---------------------------------------------------------------------------------------------- figures


def expand_wildcard(results: Sequence[RunResult], pattern: str, name: str) -> list[RunResult]:
    """Turn a family of figures into a parameter: ``speedup_fold_resnet18_b*`` with ``name="batch"``.

    Every figure matching ``pattern`` (``*`` stands for any text) becomes a
    row of its own, with ``name`` = the text ``*`` matched (read as YAML, so
    ``8`` -> 8) and the figure (and its ``_lo`` / ``_hi``) under the name
    ``pattern``. For notebooks that loop over values inside one run
    (``batch_sizes = [1, 8, 32]``) and record one figure per value.
    """
    if pattern.count("*") != 1:
        raise SweepError(f"a figure pattern holds one '*', got {pattern!r}")
    regex = re.compile("^" + re.escape(pattern).replace(r"\*", "(.+?)") + "$")
    expanded = []
    for r in results:
        for fig, value in r.records.items():
            match = regex.match(fig)
            if not match or fig.endswith(("_lo", "_hi")) and fig[:-3] in r.records:
                continue
            key = parse_value(match.group(1))
            records = {pattern: value}
            records.update({pattern + s: r.records[fig + s] for s in ("_lo", "_hi") if fig + s in r.records})
            expanded.append(RunResult(r.notebook, r.output, r.status, r.seconds, {**r.parameters, name: key},
                                      records, r.error, r.ename, r.evalue, r.run))
    if not expanded:
        raise SweepError(f"no recorded figure matches {pattern!r}")
    return expanded


def default_figures(results: Sequence[RunResult], count: int = 3) -> list[str]:
    """The figures to plot when none is named: numeric headline figures (speed-ups first), at most ``count``."""
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
