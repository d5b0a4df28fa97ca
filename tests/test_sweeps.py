"""Sweeps: grid checks before anything runs, a two-run sweep end to end (process pool and Dask),
resume, a failed run, a timed-out run, a killed worker, the folder lock, and the report.

The notebooks are tiny ones written into tmp_path (a parameters cell, a record call, a
cell that raises or sleeps or kills its worker), so a run costs about a kernel start.
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import nbformat
import pytest

from fusionlib import cli, sweeps
from fusionlib.experiments import read_records

WORK = """\
import os
from fusionlib.experiments import record
with open(calls_file, "a") as f:
    f.write(f"{x}\\n")
print(f"working on x={x}")
record("speedup_twice_x", 2 * x)
record("threads", int(os.environ.get("OMP_NUM_THREADS", "0")))
if fail:
    raise RuntimeError(f"boom {x}")
"""


def _notebook(path: Path, code_cells, parameters: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    param_cell = nbformat.v4.new_code_cell(parameters)
    param_cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# a test notebook"), param_cell]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in code_cells]
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def work(tmp_path):
    """work.ipynb: appends x to calls_file (to count executions), records 2x and its threads, raises if fail."""
    calls = tmp_path / "calls.txt"
    nb = _notebook(tmp_path / "work.ipynb", [WORK],
                   f"x = 1\nfail = False\nseed = 0\ncalls_file = {str(calls)!r}\nratio = 0.5\nnames = ['a']\nanything = None")
    return nb, calls


def _grid(tmp_path, text: str, name="grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _calls(calls: Path) -> list[str]:
    return calls.read_text().split() if calls.exists() else []


def _summary(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


# ------------------------------------------------------------------------------------- checks before anything runs

BAD_GRIDS = [
    # (grid text, the error it must give)
    ("notebooks: [work.ipynb]\nparameters: {x: [1, 2]\n", r"not valid YAML at line \d+"),
    ("- work.ipynb\n", r"must be a mapping"),
    ("notebooks: [work.ipynb]\nparams: {x: [1]}\n", r"unknown key\(s\) \['params'\]"),
    ("parameters: {x: [1]}\n", r"needs 'notebooks:'"),
    ("notebooks: [missing.ipynb]\n", r"notebook\(s\) not found: .*missing.ipynb"),
    ("notebooks: [work.ipynb]\nparameters: {x: [1]}\nruns: [{x: 2}]\n", r"both 'parameters:'.*and 'runs:'"),
    ("notebooks: [work.ipynb]\nparameters: {x: 1}\n", r"'x' must be a non-empty list of values"),
    ("notebooks: [work.ipynb]\nparameters: {x: []}\n", r"'x' must be a non-empty list"),
    ("notebooks: [work.ipynb]\nruns: {x: 1}\n", r"'runs:' must be a list of parameter mappings"),
    ("notebooks: [work.ipynb]\nparameters: {seed: [0, 1]}\nrepeat: 2\n", r"seed.*cannot be listed"),
    ("notebooks: [work.ipynb]\nrepeat: 0\n", r"'repeat:' must be a positive integer"),
    ("notebooks: [work.ipynb]\nparameters: {y: [1], x: [1]}\n",
     r"work.ipynb has no parameter 'y'; its parameters are: x, fail, seed, calls_file, ratio, names, anything"),
    ("notebooks: [work.ipynb]\nparameters: {x: ['1']}\n", r"'x' = '1' is a str, but its default 1 is an int"),
    ("notebooks: [work.ipynb]\nparameters: {x: [true]}\n", r"'x' = True is a bool"),
    ("notebooks: [work.ipynb]\nparameters: {fail: [0]}\n", r"'fail' = 0 is an int, but its default False is a bool"),
    ("notebooks: [work.ipynb]\nparameters: {names: [b]}\n", r"'names' = 'b' is a str, but its default \['a'\] is a list"),
    ("notebooks: [work.ipynb]\nparameters: {names: [[1]]}\n", r"'names' = \[1\] is a list"),
    ("notebooks: [work.ipynb]\nruns: [{x: 1}, {x: 1}]\n", r"listed twice"),
    # element types are named; the hint for a bare value shows both fixes
    ("notebooks: [work.ipynb]\nparameters: {names: [[1, b]]}\n",
     r"'names' = \[1, 'b'\] is a list of int and str, but its default \['a'\] is a list of str"),
    ("notebooks: [work.ipynb]\nparameters: {ratio: 0.01}\n", r"\(one value: \[0.01\]; a list value: \[\[0.01\]\]\)"),
    # YAML 1.2: no / on are words; a date or NaN is not JSON, refused when planned, by name
    ("notebooks: [work.ipynb]\nparameters: {x: [no]}\n", r"'x' = 'no' is a str, but its default 1 is an int"),
    ("notebooks: [work.ipynb]\nparameters: {anything: [2024-01-01]}\n",
     r"'anything' = datetime.date\(2024, 1, 1\) is a date, which a run cannot take"),
    ("notebooks: [work.ipynb]\nparameters: {ratio: [.nan]}\n", r"'ratio' = nan is a non-finite number"),
]


@pytest.mark.parametrize("text, message", BAD_GRIDS, ids=[m for _, m in BAD_GRIDS])
def test_a_bad_grid_is_refused_before_anything_runs(tmp_path, work, capsys, text, message):
    out = tmp_path / "out"
    code = cli.main(["sweep", str(_grid(tmp_path, text)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fusionlib sweep: error: ")
    assert __import__("re").search(message, err), err
    assert not out.exists() and not _calls(work[1])  # nothing ran, no folder made


def test_run_checks_every_notebook_and_value(tmp_path, work, capsys):
    other = _notebook(tmp_path / "other.ipynb", ["pass"], "seed = 0")
    assert cli.main(["run", str(work[0]), str(other), "-p", "x=2", "--out", str(tmp_path / "o")]) == 2
    assert "other.ipynb has no parameter 'x'; its parameters are: seed" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "nope.ipynb")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["run", str(work[0]), "-p", "names=resnet18"]) == 2  # a str where a list is expected
    assert "'names' = 'resnet18' is a str" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_accepted_values_and_the_plan(tmp_path, work):
    grid = _grid(tmp_path, "notebooks: [work.ipynb]\nparameters:\n  x: [1, 2]\n  ratio: [1]\n"
                           "  names: [[a, b]]\n  anything: [[1, x]]\nrepeat: 2\n")
    runs = sweeps.plan_sweep(grid)  # an int for a float, a list of str, anything where the default is None
    assert [(r.parameters["x"], r.parameters["seed"]) for r in runs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(Path(r.notebook) == work[0].resolve() for r in runs) and len({r.name for r in runs}) == 4
    assert sweeps.plan_sweep(grid) == runs  # names are deterministic: --resume finds the same folders


def test_values_are_yaml_1_2_everywhere(tmp_path, work):
    """-p, grids, run names and figure families read values with one YAML 1.2 loader."""
    assert sweeps.parse_parameters(["ratio=1e-3", "a=no", "b=on", "c=yes", "names=[x, 'y']", "s=1:30"]) == \
        {"ratio": 0.001, "a": "no", "b": "on", "c": "yes", "names": ["x", "y"], "s": "1:30"}
    sweeps.check_parameters(work[0], {"ratio": 1e-3})  # a float for a float: no "'1e-3' is a str"
    grid = _grid(tmp_path, "notebooks: [work.ipynb]\nparameters: {ratio: [1e-3], anything: [no, off]}\n")
    assert [r.parameters for r in sweeps.plan_sweep(grid)] == [{"ratio": 0.001, "anything": "no"},
                                                               {"ratio": 0.001, "anything": "off"}]
    assert sweeps.run_name("03.ipynb", {"tag": "no"}) == "03__tag=no"  # a word, not a bool in disguise: no hash
    assert sweeps.run_name("03.ipynb", {"tag": "1e-3"}) != sweeps.run_name("03.ipynb", {"tag": 1e-3})
    result = sweeps.RunResult("nb.ipynb", "r/nb.ipynb", "ok", 1.0, {}, {"err_lr1e-3": 2.0, "err_lrno": 3.0})
    assert [r.parameters["lr"] for r in sweeps.expand_wildcard([result], "err_lr*", "lr")] == [0.001, "no"]


def test_bad_values_on_the_command_line(tmp_path, work, capsys):
    out = str(tmp_path / "o")
    assert cli.main(["run", str(work[0]), "-p", "anything=2024-01-01", "--out", out]) == 2
    assert "parameter 'anything' = datetime.date(2024, 1, 1) is a date" in capsys.readouterr().err
    for bad in ("nan", "inf", "0", "-1"):
        assert cli.main(["run", str(work[0]), "--timeout", bad, "--out", out]) == 2
        assert "timeout must be a finite positive number of seconds" in capsys.readouterr().err
        assert cli.main(["sweep", str(_grid(tmp_path, "notebooks: [work.ipynb]\n")), "--timeout", bad]) == 2
        assert "timeout must be a finite positive number" in capsys.readouterr().err
    assert not _calls(work[1]) and not (tmp_path / "o").exists()
    assert [sweeps.check_timeout(t) for t in (2.5, 2, 0.1, None)] == [3, 2, 1, None]  # whole seconds, rounded up
    with pytest.raises(sweeps.SweepError, match="got True"):
        sweeps.check_timeout(True)


def test_run_into_a_folder_that_holds_runs_says_what_run_can_do(tmp_path, work, capsys):
    out = tmp_path / "o"
    assert cli.main(["run", str(work[0]), "-p", "x=5", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(work[0]), "-p", "x=6", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "give `fusionlib run` a new --out" in err and "fusionlib sweep GRID.yaml --out" in err
    assert "pass --resume" not in err and _calls(work[1]) == ["5"]


def test_run_names_are_safe_and_distinct():
    name = sweeps.run_name("nb/03_fuse.ipynb", {"model": "a/b", "batch": 8})
    assert "/" not in name and name.startswith("03_fuse__model=a_b__batch=8-")
    assert sweeps.run_name("03.ipynb", {"batch": 8, "seed": 1}) == "03__batch=8__seed=1"  # plain values: no hash
    assert sweeps.run_name("03.ipynb", {"model": "a/b"}) != sweeps.run_name("03.ipynb", {"model": "a_b"})
    assert sweeps.run_name("03.ipynb", {"v": "1"}) != sweeps.run_name("03.ipynb", {"v": 1})
    long = sweeps.run_name("03.ipynb", {"names": ["resnet18"] * 40})
    assert len(long) <= sweeps.plan.MAX_NAME and long != sweeps.run_name("03.ipynb", {"names": ["resnet18"] * 41})
    assert sweeps.run_name("03.ipynb", {}) == "03"


def test_threads_are_split_between_workers():
    assert sweeps.threads_per_run(2, cores=16) == 8 and sweeps.threads_per_run(3, cores=2) == 1
    with pytest.raises(sweeps.SweepError, match="positive integer, got 0"):
        sweeps.threads_per_run(0)


def test_a_second_sweep_on_a_locked_folder_is_refused(tmp_path, work):
    from filelock import FileLock

    runs = sweeps.plan_runs([work[0]], [{"x": 1}])
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / sweeps.LOCK_FILE)):  # another sweep, in this process or another
        with pytest.raises(sweeps.SweepError, match=r"another sweep is writing to .*sweep.lock"):
            sweeps.run_sweep(runs, out, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == [sweeps.LOCK_FILE] and not _calls(work[1])


# ------------------------------------------------------------------------------------- sweeps that run


def test_local_sweep_failed_run_resume_and_summary(tmp_path, work, capsys):
    nb, calls = work
    grid = _grid(tmp_path, "notebooks: [work.ipynb]\nruns:\n  - {x: 1}\n  - {x: 2, fail: true}\n  - {x: 3}\n")
    out = tmp_path / "sweep"
    assert cli.main(["sweep", str(grid), "--out", str(out), "--workers", "2"]) == 1  # a run failed
    assert sorted(_calls(calls)) == ["1", "2", "3"]
    header, rows = _summary(out)
    assert header == ["notebook", "x", "fail", "status", "seconds", "error", "speedup_twice_x", "threads"]
    assert [(r["x"], r["status"], r["speedup_twice_x"]) for r in rows] == [
        ("1", "ok", "2"), ("2", "failed", "4"), ("3", "ok", "6")]
    assert rows[1]["error"] == "RuntimeError: boom 2" and rows[1]["fail"] == "True"
    assert {r["threads"] for r in rows} == {str(sweeps.threads_per_run(2))}  # OMP_NUM_THREADS in each kernel
    printed = capsys.readouterr()
    assert "FAILED (RuntimeError:" in printed.out and "1 of 3 notebook run(s) FAILED" in printed.err

    run1, run2, run3 = (out / r.name for r in sweeps.plan_sweep(grid))
    status = json.loads((run2 / "status.json").read_text())
    assert (status["status"], status["ename"], status["evalue"]) == ("failed", "RuntimeError", "boom 2")
    assert status["seconds"] > 0 and status["cell"] == status["cells"] == 4  # markdown, injected, parameters, code
    assert json.loads((run1 / "parameters.json").read_text())["parameters"] == {"x": 1}
    assert read_records(run1 / "work.ipynb")["speedup_twice_x"] == 2
    assert "working on x=1" in (run1 / "log.txt").read_text()
    assert not list(out.glob("*/*.partial.ipynb")) and not list(out.glob("**/.*.tmp"))
    assert "boom 2" in (out / "summary.md").read_text()

    # the same folder again without --resume: refused, nothing runs
    assert cli.main(["sweep", str(grid), "--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err and len(_calls(calls)) == 3

    # run 3 stopped mid-run (a killed sweep leaves status "running"): the summary says it did not run
    (run3 / "status.json").write_text(json.dumps({"status": "running", "cell": 2, "cells": 4}))
    assert [r.status for r in sweeps.load_results(out)] == ["ok", "failed", "pending"]
    # --resume skips the finished run 1; reruns the failed run 2 and the unfinished run 3
    runs = sweeps.plan_sweep(grid)
    results = sweeps.run_sweep(runs, out, workers=2, resume=True, show_progress=False)
    assert sorted(_calls(calls)) == ["1", "2", "2", "3", "3"]
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert [r["status"] for r in _summary(out)[1]] == ["ok", "failed", "ok"]


def test_a_cell_past_the_timeout_is_stopped_and_recorded(tmp_path, capsys):
    nb = _notebook(tmp_path / "slow.ipynb", ["import time\ntime.sleep(seconds)"], "seconds = 0.1")
    out = tmp_path / "out"
    start = time.perf_counter()
    assert cli.main(["run", str(nb), "-p", "seconds=60", "--timeout", "2", "--out", str(out)]) == 1
    assert time.perf_counter() - start < 40
    (row,) = _summary(out)[1]
    assert row["status"] == "timeout" and row["error"].startswith("CellTimeoutError: A cell timed out")
    assert "TIMED OUT" in capsys.readouterr().out


KILL = """\
import os, signal, pathlib
marker = pathlib.Path(marker_file)
if always or not marker.exists():
    marker.write_text("killed once")
    os.kill(os.getppid(), signal.SIGKILL)  # the kernel's parent: the worker process running this notebook
"""


def test_a_killed_worker_loses_only_its_run(tmp_path, work):
    killer = _notebook(tmp_path / "killer.ipynb", [KILL], f"always = False\nmarker_file = {str(tmp_path / 'm')!r}")
    runs = sweeps.plan_runs([killer], [{}]) + sweeps.plan_runs([work[0]], [{"x": 1}, {"x": 2}])
    out = tmp_path / "out"
    results = sweeps.run_sweep(runs, out, workers=2, show_progress=False)
    assert [r.status for r in results] == ["ok", "ok", "ok"]  # the killed run ran again; the others finished
    assert json.loads((out / runs[0].name / "status.json").read_text())["attempt"] == 2
    # a run that kills its worker every time is recorded as failed, and the summary stays valid
    always = sweeps.plan_runs([killer], [{"always": True}])
    (result,) = sweeps.run_sweep(always, tmp_path / "out2", workers=2, show_progress=False)
    assert result.status == "failed" and result.ename == "WorkerDied"
    assert _summary(tmp_path / "out2")[1][0]["status"] == "failed"


def test_dask_local_cluster_sweep(tmp_path, work):
    pytest.importorskip("dask.distributed")

    # a run on this (main) thread first: Dask's threads copy its context, and must not share its event loop
    from fusionlib.sweeps import run_notebook

    assert run_notebook(work[0], tmp_path / "main_thread.ipynb", {"x": 0}).status == "ok"
    grid = _grid(tmp_path, "notebooks: [work.ipynb]\nruns:\n  - {x: 1}\n  - {x: 2, fail: true}\n")
    out = tmp_path / "dask"
    assert cli.main(["sweep", str(grid), "--out", str(out), "--executor", "dask", "--workers", "2"]) == 1
    rows = _summary(out)[1]
    assert [(r["x"], r["status"], r["error"]) for r in rows] == [("1", "ok", ""), ("2", "failed", "RuntimeError: boom 2")]
    assert sorted(_calls(work[1])) == ["0", "1", "2"]
    results = sweeps.run_sweep(sweeps.plan_sweep(grid), out, executor="dask", workers=2, resume=True,
                               show_progress=False)
    assert sorted(_calls(work[1])) == ["0", "1", "2", "2"] and [r.status for r in results] == ["ok", "failed"]


# ------------------------------------------------------------------------------------- report


def _fake_sweep(out: Path) -> None:
    """A finished sweep folder: batch x model x 3 seeds, figure = batch + model offset + seed noise."""
    runs = []
    for batch in (1, 8):
        for model in ("resnet18", "mobilenet_v2"):
            for seed in range(3):
                params = {"batch": batch, "model_names": [model], "seed": seed}
                spec = sweeps.RunSpec("/x/03_fuse.ipynb", params, sweeps.run_name("03_fuse.ipynb", params))
                runs.append(spec)
                value = batch / 8 + (1 if model == "resnet18" else 2) + 0.1 * seed
                (out / spec.name).mkdir(parents=True)
                sweeps.results.write_json(out / spec.name / "status.json", {
                    "status": "ok", "seconds": 1.0, "records": {"speedup_x": value, "speedup_x_lo": value - 0.1,
                                                                "speedup_x_hi": value + 0.1, "nodes": 3}})
    sweeps.results.write_json(out / sweeps.PLAN_FILE, {"runs": [r.as_dict() for r in runs]})


def test_report_prints_the_table_and_plots_mean_and_sd_over_seeds(tmp_path, capsys):
    _fake_sweep(tmp_path)
    results = sweeps.load_results(tmp_path)
    assert sweeps.default_axes(results) == ("batch", "model_names")
    assert sweeps.default_figures(results) == ["speedup_x"]
    points = sweeps.aggregate(results, "speedup_x", "batch", "model_names")
    p = next(p for p in points if p.series == "model_names=resnet18" and p.x == 8)
    assert (p.n, p.mean, p.sd) == (3, pytest.approx(2.1), pytest.approx(0.1))
    (png,) = cli.report(tmp_path)
    assert png == tmp_path / "plots" / "speedup_x.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert png.stat().st_size < 60_000
    out = capsys.readouterr().out
    assert "speedup_x by batch and model_names" in out and "model_names=mobilenet_v2" in out
    assert cli.main(["report", str(tmp_path), "--y", "nodes", "--x", "seed", "--by", "batch", "--no-plots"]) == 0
    assert "nodes by seed and batch" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path), "--y", "missing"]) == 2
    assert "they recorded: nodes, speedup_x" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path), "--x", "epochs"]) == 2
    assert "they have: batch, model_names, seed" in capsys.readouterr().err
    single = sweeps.aggregate(results[:1], "speedup_x", "batch")  # one run: the recorded interval
    assert math.isnan(single[0].sd) and single[0].lo == pytest.approx(single[0].mean - 0.1)


def test_report_of_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a run or sweep folder" in capsys.readouterr().err


def test_report_turns_a_family_of_figures_into_a_parameter(tmp_path, capsys):
    """A notebook that loops over batch sizes records speedup_fuse_resnet18_b1, _b8: '*' becomes --x."""
    runs = []
    for threads in (1, 2):
        for seed in range(2):
            params = {"num_threads": threads, "seed": seed}
            spec = sweeps.RunSpec("/x/05.ipynb", params, sweeps.run_name("05.ipynb", params))
            runs.append(spec)
            records = {f"speedup_fuse_resnet18_b{b}": b + threads + seed for b in (1, 8)}
            records["speedup_fuse_resnet18_b1_lo"] = 0.5
            (tmp_path / spec.name).mkdir()
            sweeps.results.write_json(tmp_path / spec.name / "status.json", {"status": "ok", "records": records})
    sweeps.results.write_json(tmp_path / sweeps.PLAN_FILE, {"runs": [r.as_dict() for r in runs]})
    expanded = sweeps.expand_wildcard(sweeps.load_results(tmp_path), "speedup_fuse_resnet18_b*", "batch")
    assert len(expanded) == 8 and {r.parameters["batch"] for r in expanded} == {1, 8}
    assert all(set(r.records) <= {"speedup_fuse_resnet18_b*", "speedup_fuse_resnet18_b*_lo"} for r in expanded)
    (png,) = cli.report(tmp_path, x="batch", ys=["speedup_fuse_resnet18_b*"])
    assert png.name == "speedup_fuse_resnet18_b_batch.png" and png.exists()
    assert "speedup_fuse_resnet18_b* by batch and num_threads" in capsys.readouterr().out
    pts = sweeps.aggregate(expanded, "speedup_fuse_resnet18_b*", "batch", "num_threads")
    assert {(p.series, p.x, p.mean) for p in pts} >= {("num_threads=2", 8, 10.5)}
    assert cli.main(["report", str(tmp_path), "--y", "speedup_*_b*", "--x", "batch"]) == 2
    assert cli.main(["report", str(tmp_path), "--y", "speedup_fuse_resnet18_b*"]) == 2
    assert "needs --x NAME" in capsys.readouterr().err


@pytest.mark.parametrize("grid", sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_shipped_grids_pass_the_checks(grid):
    runs = sweeps.plan_sweep(grid)
    assert runs and all(Path(r.notebook).is_file() and "seed" in r.parameters for r in runs)


def test_python_dash_m_fusionlib_is_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fusionlib", "sweep", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for option in ("--workers", "--resume", "--executor {local,dask}", "--scheduler ADDRESS", "--timeout"):
        assert option in done.stdout, option

