"""The README's commands, run as a user types them: subprocesses from the repository root, relative
paths, default options.

Each command writes into its own relative folder under ``runs/`` (``make run`` into its default
``runs/<timestamp>/``, read back from what it prints) and the test deletes exactly that folder,
so a user's own ``runs/`` is never touched and two test workers never collide. A command added
to the README's ``bash`` blocks must join ``RUN_HERE`` or ``RUN_ELSEWHERE``, or
:func:`test_every_readme_command_is_tested_here_or_elsewhere` fails.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fusionlib import cli, sweeps

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GRID = "tests/fixtures/readme_sweep.yaml"  # experiments/quick.yaml's shape, small parameters
IN_PROJECT_VENV = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()

#: README commands this module runs (first two words).
RUN_HERE = {"make run", "fusionlib run", "fusionlib sweep", "fusionlib report"}
#: README commands tested elsewhere, and where.
RUN_ELSEWHERE = {
    "make test": "CI runs it (.ci/run); this module is part of it",
    "make lab": "starts JupyterLab: tests/test_browser.py drives it in Chromium",
    "make lab-student": "starts JupyterLab: tests/test_browser.py opens a student notebook",
    "make student": "tests/test_editions.py builds the students' edition",
    "make facilitator": "tests/test_editions.py builds the facilitator's edition",
    "make clean": "deletes .venv: not run inside the test run that uses it",
    "make setup": "every make target runs it first",
}


def _fusionlib() -> list[str]:
    """The ``fusionlib`` command of this environment (``.venv/bin/fusionlib``), as the README types it."""
    script = Path(sys.executable).parent / "fusionlib"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fusionlib"]


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def out_dir():
    """A unique relative folder under runs/, removed afterwards (runs/ too, when this test made it)."""
    runs_existed = (ROOT / "runs").exists()
    relative = f"runs/test-readme-{uuid.uuid4().hex[:8]}"
    yield relative
    shutil.rmtree(ROOT / relative, ignore_errors=True)
    if not runs_existed:
        with __import__("contextlib").suppress(OSError):
            (ROOT / "runs").rmdir()  # only when empty


def _summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _readme_commands() -> list[str]:
    """Every ``make`` / ``fusionlib`` line of the README's ``bash`` blocks, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(("make ", "fusionlib "))]


def test_every_readme_command_is_tested_here_or_elsewhere():
    commands = _readme_commands()
    assert commands, "no make / fusionlib commands found in README.md's bash blocks"
    untested = [c for c in commands if " ".join(c.split()[:2]) not in RUN_HERE | set(RUN_ELSEWHERE)]
    assert not untested, f"README commands no test runs: {untested}; add them to tests/test_readme_commands.py"


def test_readme_run_and_sweep_commands_plan_as_written(monkeypatch):
    """The README's own ``fusionlib run`` / ``sweep`` lines name real notebooks, parameters and types."""
    monkeypatch.chdir(ROOT)
    checked = 0
    for command in [c for c in _readme_commands() if c.startswith("fusionlib ")]:
        argv = shlex.split(command)[1:]
        if argv[0] == "run":
            args = cli._parser().parse_args(argv)
            sweeps.plan_runs([Path(n) for n in args.notebooks], [sweeps.parse_parameters(args.param)])
            checked += 1
        elif argv[0] == "sweep":
            sweeps.plan_sweep(cli._parser().parse_args(argv).grid)
            checked += 1
    assert checked >= 2


@pytest.mark.skipif(not IN_PROJECT_VENV, reason="make run uses the project's .venv; this is another environment")
def test_make_run_with_the_default_folder():
    completed = _run(["make", "run", "NOTEBOOKS=notebooks/00_start_here.ipynb"])
    folder = re.search(r"summary\.csv / summary\.md in (runs/\S+?)/?$", completed.stdout, flags=re.M)
    try:
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        assert folder, completed.stdout[-2000:]
        (row,) = _summary(ROOT / folder.group(1))
        assert row["status"] == "ok" and float(row["test_accuracy_resnet18"]) > 0.5, row
    finally:
        if folder and re.fullmatch(r"runs/\d{8}-\d{6}(-\d+)?", folder.group(1)):
            shutil.rmtree(ROOT / folder.group(1), ignore_errors=True)


def test_fusionlib_run_with_a_relative_folder(out_dir):
    completed = _run(_fusionlib() + ["run", "notebooks/00_start_here.ipynb", "-p", "seed=0", "--out", out_dir])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert f"summary.csv / summary.md in {out_dir}/" in completed.stdout  # shown as typed
    (row,) = _summary(ROOT / out_dir)
    assert row["status"] == "ok" and row["seed"] == "0" and float(row["test_accuracy_resnet18"]) > 0.5, row
    status = json.loads((ROOT / out_dir / "00_start_here__seed=0" / "status.json").read_text())
    assert status["status"] == "ok"
    assert status["output"] == "00_start_here__seed=0/00_start_here.ipynb"  # relative: the folder can move
    assert not (ROOT / "notebooks" / "runs").exists()


def test_fusionlib_sweep_then_report(out_dir):
    completed = _run(_fusionlib() + ["sweep", GRID, "--out", out_dir])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = _summary(ROOT / out_dir)
    assert [(r["bench_batch"], r["status"]) for r in rows] == [("1", "ok"), ("2", "ok")], rows
    assert all(float(r["speedup_fold_resnet18"]) > 0 and float(r["max_rel_error_fold_fp32_var1"]) < 1e-4
               for r in rows), rows
    assert str(ROOT) not in (ROOT / out_dir / "summary.md").read_text()  # paths relative to the folder

    report = _run(_fusionlib() + ["report", out_dir, "--x", "bench_batch", "--y", "speedup_fold_resnet18"])
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    plot = f"{out_dir}/plots/speedup_fold_resnet18.png"
    assert f"plot: {plot}" in report.stdout and (ROOT / plot).stat().st_size > 1000
