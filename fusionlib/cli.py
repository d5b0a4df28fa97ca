"""The ``fusionlib`` command: run notebooks, sweep a grid, report a folder.

::

    fusionlib run NOTEBOOK... [-p NAME=VALUE]... [--out DIR] [--workers N] [--timeout S]
    fusionlib sweep GRID.yaml [--workers N] [--out DIR] [--resume] [--executor local|dask]
                              [--scheduler ADDRESS] [--timeout S]
    fusionlib report DIR [--x PARAM] [--y FIGURE]... [--by PARAM] [--no-plots]
    fusionlib report DIR --y 'speedup_fold_resnet18_b*' --x batch [--by PARAM]

``-p`` values are YAML 1.2: ``-p seed=1 -p lr=1e-3 -p model_names='["resnet18"]' -p tag=fast``.
``run`` and ``sweep`` check every notebook, parameter name and value type before
the first run, write one folder per run and ``summary.csv`` / ``summary.md`` in
``DIR`` (default ``runs/<timestamp>/``), print the summary, and exit 1 when a
run failed. ``report`` prints a folder's table and writes PNG plots of a figure
against a parameter into ``DIR/plots/``. ``python -m fusionlib`` is the same
command. Grids, executors and plots are in :mod:`fusionlib.sweeps`; no library
module imports this one. Paths may be relative: the output folder is made
absolute before anything runs, and printed as typed. Ctrl-C stops a sweep with
one line (exit status 130); ``--resume`` continues it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from fusionlib import sweeps
from fusionlib.sweeps import RunResult, format_summary, new_run_dir, parse_parameters


def _print_header() -> None:
    from fusionlib.env import format_environment

    print(format_environment())
    print()


def _shown(path: Path) -> str:
    """``path`` as the user would type it: relative to the working folder when it lies inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _finish(out: Path, results: Sequence[RunResult]) -> int:
    print()
    print(format_summary(results))
    print(f"\nexecuted notebooks and summary.csv / summary.md in {_shown(out)}/")
    failed = [r for r in results if r.status not in ("ok", "pending")]
    if failed:
        print(f"{len(failed)} of {len(results)} notebook run(s) FAILED: " + ", ".join(r.run or r.notebook for r in failed),
              file=sys.stderr)
        return 1
    return 0


def run_notebooks(notebooks: Sequence[str], parameters: Mapping[str, Any], out: str | None = None,
                  workers: int = 1, timeout: float | None = None) -> int:
    """``fusionlib run``: every notebook once with ``parameters``; the exit status."""
    runs = sweeps.plan_runs([Path(n) for n in notebooks], [dict(parameters)])
    timeout = sweeps.check_timeout(timeout)
    _print_header()
    out_dir = Path(out).resolve() if out else new_run_dir()
    try:
        results = sweeps.run_sweep(runs, out_dir, workers=workers, timeout=timeout)
    except sweeps.FolderInUse as exc:
        raise sweeps.SweepError(f"{_shown(exc.folder)} already holds runs: give `fusionlib run` a new --out "
                                "(or none, for a new runs/<timestamp>/), or continue a sweep there with "
                                f"`fusionlib sweep GRID.yaml --out {_shown(exc.folder)} --resume`") from None
    return _finish(out_dir, results)


def run_grid(grid: Mapping[str, Any] | str | Path, out: str | None = None, workers: int | None = None,
             executor: str = "local", scheduler: str | None = None, resume: bool = False,
             timeout: float | None = None) -> int:
    """``fusionlib sweep``: every run of a grid (a mapping or a YAML file); the exit status."""
    runs = sweeps.plan_sweep(grid)
    timeout = sweeps.check_timeout(timeout)
    if resume and not out:
        raise sweeps.SweepError("--resume needs --out DIR, the folder of the sweep to continue")
    _print_header()
    out_dir = Path(out).resolve() if out else new_run_dir()
    print(f"{len(runs)} runs into {_shown(out_dir)}/", flush=True)
    results = sweeps.run_sweep(runs, out_dir, executor=executor, workers=workers, scheduler=scheduler,
                               resume=resume, timeout=timeout)
    return _finish(out_dir, results)


def report(folder: str | Path, x: str | None = None, ys: Sequence[str] = (), by: str | None = None,
           plots: bool = True) -> list[Path]:
    """``fusionlib report``: print a folder's table; plot each figure against ``x`` (PNG paths)."""
    folder = Path(folder)
    results = sweeps.load_results(folder)
    table = format_summary(results)
    patterns = [y for y in ys if "*" in y]
    if patterns:  # a family of figures, e.g. speedup_fold_resnet18_b*: the '*' becomes parameter x
        if len(ys) > 1 or not x:
            raise sweeps.SweepError("a figure pattern with '*' is plotted alone and needs --x NAME, the name for "
                                    "what '*' stands for (e.g. --y 'speedup_fold_resnet18_b*' --x batch)")
        results = sweeps.expand_wildcard(results, patterns[0], x)
    default_x, default_by = sweeps.default_axes(results)
    params = {k for r in results for k in r.parameters}
    for name, value in (("--x", x), ("--by", by)):
        if value is not None and value not in params:
            raise sweeps.SweepError(f"{name} {value!r} is not a parameter of these runs; "
                                    f"they have: {', '.join(sorted(params)) or '(no parameters)'}")
    x = x or default_x
    if by is None:  # the first other parameter that varies
        by = next((k for k in (default_x, default_by) if k is not None and k != x), None)
    figures = {k for r in results for k in r.records}
    unknown = [y for y in ys if y not in figures]
    if unknown:
        raise sweeps.SweepError(f"--y {unknown[0]!r} was not recorded by these runs; they recorded: "
                                f"{', '.join(sorted(figures)) or '(nothing)'}")
    print(table)
    if x is None:
        print("\nno parameter takes more than one value here: nothing to plot (name one with --x)")
        return []
    ys = list(ys) or sweeps.default_figures(results)
    written = []
    for y in ys:
        print(f"\n{y} by {x}" + (f" and {by}" if by else "") + ":")
        print(sweeps.format_points(sweeps.aggregate(results, y, x, by), y, x))
        if plots:
            path = sweeps.plot_figure(results, y, x, by, folder / "plots" / f"{sweeps.run_name(y.replace('*', '_' + x), {})}.png")
            print(f"plot: {_shown(path)}")
            written.append(path)
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionlib", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="execute notebooks (what `make run` does) and print a summary")
    p_run.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    p_run.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a parameter; the value is YAML: -p seed=1 -p model_names='[\"resnet18\"]'")
    p_run.add_argument("-o", "--out", default=None, help="output folder (default: runs/<timestamp>)")
    p_run.add_argument("--workers", type=int, default=1, help="notebooks at a time (default 1: steady timings)")
    p_run.add_argument("--timeout", type=float, default=None, help="seconds one cell may run (papermill)")

    p_sweep = sub.add_parser("sweep", help="run a grid of notebooks x parameters from a YAML file")
    p_sweep.add_argument("grid", metavar="GRID.yaml")
    p_sweep.add_argument("-o", "--out", default=None, help="output folder (default: runs/<timestamp>)")
    p_sweep.add_argument("--workers", type=int, default=None,
                         help=f"runs at a time (default: the cores, {sweeps.default_workers()} here)")
    p_sweep.add_argument("--resume", action="store_true", help="continue the sweep in --out: skip runs already ok")
    p_sweep.add_argument("--executor", choices=["local", "dask"], default="local",
                         help="local: a process pool; dask: a Dask cluster (pip install 'fusionlib[dask]')")
    p_sweep.add_argument("--scheduler", default=None, metavar="ADDRESS",
                         help="Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a LocalCluster of --workers)")
    p_sweep.add_argument("--timeout", type=float, default=None,
                         help="seconds one cell may run; the run is then stopped and recorded as timeout")

    p_report = sub.add_parser("report", help="print a run or sweep folder's table and plot a figure")
    p_report.add_argument("folder", metavar="DIR")
    p_report.add_argument("--x", default=None, help="parameter on the x axis (default: the first that varies)")
    p_report.add_argument("--y", action="append", default=[], metavar="FIGURE",
                          help="recorded figure to plot, repeatable (default: up to 3 headline figures); "
                               "one pattern such as 'speedup_fold_resnet18_b*' plots a family, '*' named by --x")
    p_report.add_argument("--by", default=None, help="one line per value of this parameter "
                                                     "(default: the second that varies)")
    p_report.add_argument("--no-plots", action="store_true", help="print the tables only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_notebooks(args.notebooks, parse_parameters(args.param), args.out, args.workers, args.timeout)
        if args.command == "sweep":
            if args.scheduler and args.executor != "dask":
                raise sweeps.SweepError("--scheduler needs --executor dask")
            return run_grid(args.grid, args.out, args.workers, args.executor, args.scheduler, args.resume,
                            args.timeout)
        report(args.folder, args.x, args.y, args.by, plots=not args.no_plots)
        return 0
    except (sweeps.SweepError, ValueError) as exc:
        print(f"fusionlib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except sweeps.SweepInterrupted as exc:
        again = (f"`fusionlib sweep {args.grid} --out {_shown(exc.out)} --resume` continues it"
                 if args.command == "sweep" else "run them again into a new --out")
        print(f"\nfusionlib {args.command}: {exc}; summary.csv in {_shown(exc.out)}/; {again}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before any run started
        print(f"\nfusionlib {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
