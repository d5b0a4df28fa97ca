"""The offline wheelhouse procedure of docs/workshop.md, on fusionlib plus one small pure-Python dependency.

1. ``pip download`` a dependency (tabulate: pure Python, no dependencies of its
   own) into a folder, and ``pip wheel`` fusionlib itself into the same folder;
2. in a fresh virtual environment, ``pip install --no-index --find-links`` that
   folder, with the user's pip configuration switched off (so no other index or
   find-links folder can help), and import both.

fusionlib is installed with ``--no-deps`` here: its other dependencies (torch
and torchvision among them) are the several GB the full wheelhouse holds,
which this test does not build. Skips, saying why, when the package index
cannot be reached.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCY = "tabulate"  # in fusionlib's dependencies; pure Python, nothing of its own
UNREACHABLE = ("connection", "resolve", "network", "timed out", "timeout", "no matching distribution",
               "could not find a version", "temporary failure", "proxy", "ssl")


def pip(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def isolated_env() -> dict:
    """The environment with pip's configuration off: no config files, no PIP_* variables (find-links, index)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def test_wheelhouse_install_without_an_index(tmp_path):
    house = tmp_path / "wheelhouse"
    try:
        download = pip("download", "--dest", str(house), "--only-binary", ":all:", DEPENDENCY, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip(f"`pip download {DEPENDENCY}` did not finish in 60 s: the package index is not reachable")
    if download.returncode != 0:
        reason = (download.stderr.strip().splitlines() or ["(no message)"])[-1]
        if any(word in download.stderr.lower() for word in UNREACHABLE):
            pytest.skip(f"the package index is not reachable: `pip download {DEPENDENCY}` says: {reason}")
        pytest.fail(f"`pip download {DEPENDENCY}` failed: {download.stderr}")

    # fusionlib's own wheel, built from a copy of the sources (no build/ or egg-info left in the checkout)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(ROOT / "fusionlib", src / "fusionlib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    build = pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(house), str(src),
                env=isolated_env())
    assert build.returncode == 0, build.stderr
    wheels = sorted(p.name for p in house.glob("*.whl"))
    assert any(w.startswith("fusionlib-") for w in wheels) and any(w.startswith(DEPENDENCY) for w in wheels), wheels

    target = tmp_path / "fresh-venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    offline = isolated_env()
    for args in ([DEPENDENCY], ["--no-deps", "fusionlib"]):
        done = pip("--python", str(python), "install", "--no-index", "--find-links", str(house), *args, env=offline)
        assert done.returncode == 0, done.stderr
    check = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, tabulate; "
         "print(m.version('fusionlib'), m.version('tabulate'), tabulate.tabulate([[1, 2]]).splitlines()[1])"],
        capture_output=True, text=True, cwd=tmp_path, env=offline, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split()[0] == "0.1.0" and check.stdout.split()[-2:] == ["1", "2"]
    # the fusionlib it found is the installed wheel, not this checkout
    where = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('fusionlib').origin)"],
                           capture_output=True, text=True, cwd=tmp_path, env=offline, timeout=60)
    assert str(target) in where.stdout, where.stdout + where.stderr
