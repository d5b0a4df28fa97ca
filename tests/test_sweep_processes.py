"""Sweeps whose processes are stopped, killed, or share a machine: nothing mixed, lost or run twice.

- Dask: two notebooks with the same file name in two folders, each reading the file beside it;
- logs: a run's log.txt holds all its cell output (Dask, and a serial sweep from inside a kernel);
- ``--resume`` with a changed grid, or while a run of the sweep is still alive, is refused;
- ``kill -9`` of the ``fusionlib`` process takes its workers and kernels with it; ``--resume`` then
  runs every run to completion exactly once;
- Ctrl-C: one line, runs in flight recorded ``interrupted``, queued runs never start, the lock removed.

The kill and Ctrl-C tests are deterministic: their notebook blocks until the test creates a file.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from fusionlib import sweeps


def _notebook(path: Path, code: str, parameters: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    param_cell = nbformat.v4.new_code_cell(parameters)
    param_cell.metadata["tags"] = ["parameters"]
    nb.cells = [param_cell, nbformat.v4.new_code_cell(code)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _status(out: Path, run: str) -> dict:
    path = out / run / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds} s for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------- folders and logs

READ_BESIDE = """\
import time
marker = open("marker.txt").read().strip()  # the file beside this notebook
print(f"read {marker}")
time.sleep(pause)
print(f"done {marker}")
from fusionlib.experiments import record
record("marker", marker)
"""


def test_dask_runs_read_their_own_folders_and_keep_whole_logs(tmp_path):
    pytest.importorskip("dask.distributed")
    for folder, pause in (("dA", 0.2), ("dB", 3.0)):  # dB's run goes on after dA's ends
        _notebook(tmp_path / folder / "nb.ipynb", READ_BESIDE, f"pause = {pause}")
        (tmp_path / folder / "marker.txt").write_text(folder)
    grid = tmp_path / "grid.yaml"
    grid.write_text("notebooks: [dA/nb.ipynb, dB/nb.ipynb]\n")  # the same file name: told apart by folder
    out = tmp_path / "out"
    results = sweeps.run_sweep(sweeps.plan_sweep(grid), out, executor="dask", workers=2, show_progress=False)
    assert [(r.run, r.status, r.records.get("marker")) for r in results] == [("dA-nb", "ok", "dA"),
                                                                            ("dB-nb", "ok", "dB")]
    for folder in ("dA", "dB"):
        log = (out / f"{folder}-nb" / "log.txt").read_text()
        assert f"read {folder}" in log and f"done {folder}" in log, log


def test_same_stem_notebooks_are_named_by_their_shortest_distinct_folder(tmp_path):
    paths = [_notebook(tmp_path / p, "pass", "x = 1") for p in ("a/x/nb.ipynb", "b/x/nb.ipynb", "other.ipynb")]
    runs = sweeps.plan_runs(paths, [{"x": 1}])
    assert [r.name for r in runs] == ["a-x-nb__x=1", "b-x-nb__x=1", "other__x=1"]


def test_a_serial_sweep_from_inside_a_kernel_logs_every_cell(tmp_path):
    inner = _notebook(tmp_path / "inner.ipynb", "for i in range(3):\n    print(f'inner line {i}')", "x = 1")
    outer = _notebook(tmp_path / "outer.ipynb", (
        "from fusionlib import sweeps\n"
        f"runs = sweeps.plan_runs([{str(inner)!r}], [{{'x': 2}}])\n"
        f"(result,) = sweeps.run_sweep(runs, {str(tmp_path / 'out')!r}, executor='serial', show_progress=False)\n"
        "assert result.status == 'ok', result.error"), "x = 0")
    assert sweeps.run_notebook(outer, tmp_path / "outer.out.ipynb").status == "ok"  # a kernel: a running event loop
    log = (tmp_path / "out" / "inner__x=2" / "log.txt").read_text()
    assert all(f"inner line {i}" in log for i in range(3)), log


# ------------------------------------------------------------------------------------- --resume

def test_resume_refuses_a_changed_grid(tmp_path):
    for folder in ("dA", "dB"):
        _notebook(tmp_path / folder / "nb.ipynb", "pass", "x = 1")
    out = tmp_path / "out"
    first = sweeps.plan_runs([tmp_path / "dA" / "nb.ipynb"], [{"x": 1}, {"x": 2}])
    sweeps.run_sweep(first, out, executor="serial", show_progress=False)
    other = sweeps.plan_runs([tmp_path / "dB" / "nb.ipynb"], [{"x": 1}, {"x": 3}])  # same file name, other folder
    with pytest.raises(sweeps.SweepError, match=r"differs from the sweep.*nb__x=1 \(notebook .*dB/nb.ipynb, was "
                                                r".*dA/nb.ipynb\).*nb__x=3 \(not in the stored plan\)"):
        sweeps.run_sweep(other, out, resume=True, executor="serial", show_progress=False)
    assert [r.status for r in sweeps.load_results(out)] == ["ok", "ok"]  # the folder as it was


def test_resume_refuses_while_a_run_is_alive(tmp_path):
    nb = _notebook(tmp_path / "nb.ipynb", "pass", "x = 1")
    runs = sweeps.plan_runs([nb], [{"x": 1}])
    out = tmp_path / "out"
    sweeps.run_sweep(runs, out, executor="serial", show_progress=False)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status = _status(out, runs[0].name)
        sweeps.results.write_json(out / runs[0].name / "status.json", {**status, "status": "running", "pid": alive.pid})
        with pytest.raises(sweeps.SweepError, match=rf"run nb__x=1 is still running \(process {alive.pid}\)"):
            sweeps.run_sweep(runs, out, resume=True, executor="serial", show_progress=False)
    finally:
        alive.kill()
        alive.wait()
    assert sweeps.run_sweep(runs, out, resume=True, executor="serial", show_progress=False)[0].status == "ok"


# ------------------------------------------------------------------------------------- kill -9 and Ctrl-C

BLOCK = """\
import os, pathlib, time
gate = pathlib.Path(gate_dir)
(gate / f"pid-{x}").write_text(str(os.getpid()))
(gate / f"started-{x}").touch()
while not (gate / "release").exists():
    time.sleep(0.05)
with open(gate / "finished.txt", "a") as f:
    f.write(f"{x}\\n")
print(f"finished x={x}")
"""


def _blocking_sweep(tmp_path: Path, runs: int) -> tuple[Path, Path]:
    gate = tmp_path / "gate"
    gate.mkdir()
    _notebook(tmp_path / "block.ipynb", BLOCK, f"x = 0\ngate_dir = {str(gate)!r}")
    grid = tmp_path / "grid.yaml"
    grid.write_text("notebooks: [block.ipynb]\nparameters:\n  x: [" + ", ".join(map(str, range(1, runs + 1))) + "]\n")
    return grid, gate


def _foreground_signals() -> None:
    """What a shell does for a foreground job: Ctrl-C back to its default. A test run started in the
    background (``make test &``, some CI runners) hands its children SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(grid: Path, workers: int, *extra: str) -> subprocess.Popen:
    """``fusionlib sweep`` in its own session, as a terminal would run it (Ctrl-C reaches its process group)."""
    return subprocess.Popen([sys.executable, "-m", "fusionlib", "sweep", grid.name, "--out", "out",
                             "--workers", str(workers), *extra], cwd=grid.parent, start_new_session=True,
                            preexec_fn=_foreground_signals, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _started(gate: Path) -> list[str]:
    return sorted(p.name.split("-")[1] for p in gate.glob("started-*"))


def _session_processes(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):  # fields: state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


def test_kill_9_takes_the_workers_along_and_resume_runs_each_run_once(tmp_path):
    grid, gate = _blocking_sweep(tmp_path, runs=3)
    proc = _start(grid, 2)
    try:
        _wait_for(lambda: _started(gate) == ["1", "2"], 120, "two runs to start")
        kernels = [int((gate / f"pid-{x}").read_text()) for x in ("1", "2")]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not _session_processes(proc.pid), 15, "the pool's workers to die")
        _wait_for(lambda: not any(_alive(p) for p in kernels), 15, "the kernels to exit")
        time.sleep(1.0)
        assert _started(gate) == ["1", "2"]  # the queued run never started
    finally:
        for pid in _session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
    (gate / "release").touch()
    again = _start(grid, 2, "--resume")
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert sorted((gate / "finished.txt").read_text().split()) == ["1", "2", "3"]  # each ran to the end once
    out = tmp_path / "out"
    for x in ("1", "2", "3"):
        log = (out / f"block__x={x}" / "log.txt").read_text()
        assert log.count("attempt") == 1 and log.count(f"finished x={x}") == 1, log
    assert [r["status"] for r in _rows(out)] == ["ok", "ok", "ok"]


@pytest.mark.parametrize("workers", [2, 1], ids=["pool", "serial"])
def test_ctrl_c_stops_the_sweep_in_one_line(tmp_path, workers):
    grid, gate = _blocking_sweep(tmp_path, runs=3)
    proc = _start(grid, workers)
    expected = ["1", "2"][:workers]
    _wait_for(lambda: _started(gate) == expected, 120, f"{workers} run(s) to start")
    kernels = [int((gate / f"pid-{x}").read_text()) for x in expected]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    message = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(message) == 1 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert f"{workers} run(s) stopped and recorded as interrupted, {3 - workers} not started" in message[0]
    assert "fusionlib sweep grid.yaml --out out --resume" in message[0]
    time.sleep(1.0)
    assert _started(gate) == expected  # queued runs never started
    _wait_for(lambda: not any(_alive(p) for p in kernels), 15, "the kernels to exit")
    out = tmp_path / "out"
    statuses = [_status(out, f"block__x={x}").get("status") for x in ("1", "2", "3")]
    assert statuses == ["interrupted"] * workers + [None] * (3 - workers)
    assert [r["status"] for r in _rows(out)] == ["interrupted"] * workers + ["pending"] * (3 - workers)
    assert not (out / sweeps.LOCK_FILE).exists()
    if workers > 1:
        return  # resuming after a kill is tested above; serially below
    (gate / "release").touch()
    again = _start(grid, workers, "--resume")
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert sorted((gate / "finished.txt").read_text().split()) == ["1", "2", "3"]
