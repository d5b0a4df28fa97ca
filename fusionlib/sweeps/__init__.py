"""The sweep runner: notebooks x parameters, checked first, run in parallel, resumable, reported.

One module per job, each importing only those before it:

- :mod:`~fusionlib.sweeps.plan` — values (one YAML 1.2 loader), grids, parameter checks, run names;
- :mod:`~fusionlib.sweeps.results` — a sweep folder: statuses, ``summary.csv`` / ``summary.md``,
  figures aggregated over seeds;
- :mod:`~fusionlib.sweeps.execute` — one notebook (papermill), one run into its folder, a sweep on a
  process pool or Dask; Ctrl-C, killed workers, ``--resume``;
- :mod:`~fusionlib.sweeps.plot` — a figure against a parameter, as PNG.

The ``fusionlib`` command (:mod:`fusionlib.cli`) sits on top; notebooks record their
figures with :mod:`fusionlib.experiments`, which this package reads back.
"""
from fusionlib.sweeps.plan import (FolderInUse, RunSpec, SweepError, check_parameters, check_timeout, load_grid,
                                   load_yaml, notebook_parameters, notebook_stems, parse_parameters, parse_value,
                                   plan_runs, plan_sweep, run_name)
from fusionlib.sweeps.results import (FINAL_STATES, PLAN_FILE, STATUS_FILE, Point, RunResult, aggregate,
                                      default_axes, default_figures, expand_wildcard, format_full_summary,
                                      format_points, format_summary, headline_figures, load_results,
                                      results_table, write_summary)
from fusionlib.sweeps.execute import (LOCK_FILE, SweepInterrupted, dask_executor, default_workers, execute_run,
                                      local_executor, new_run_dir, run_notebook, run_sweep, threads_per_run)
from fusionlib.sweeps.plot import plot_figure

__all__ = [
    "SweepError", "FolderInUse", "SweepInterrupted", "RunSpec", "RunResult", "Point",
    "load_yaml", "parse_value", "parse_parameters", "load_grid", "notebook_parameters", "check_parameters",
    "check_timeout", "run_name", "notebook_stems", "plan_runs", "plan_sweep",
    "load_results", "write_summary", "results_table", "format_summary", "format_full_summary", "headline_figures",
    "expand_wildcard", "default_figures", "default_axes", "aggregate", "format_points",
    "run_notebook", "execute_run", "run_sweep", "local_executor", "dask_executor", "default_workers",
    "threads_per_run", "new_run_dir", "plot_figure", "STATUS_FILE", "PLAN_FILE", "LOCK_FILE", "FINAL_STATES",
]
