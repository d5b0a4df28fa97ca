"""A shared, read-only model cache (FUSIONLIB_CACHE): served when it has the entry, a private cache when it lacks it.

The runs here are tiny (a Linear layer "trained" by setting its weight), so the
tests exercise zoo.cached_training's cache logic, not training.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from fusionlib import zoo


def tiny_run(folder: Path, calls: list[int], name: str = "tiny-0123456789abcdef.pt") -> zoo.Run:
    def train(model: nn.Module) -> dict:
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(0.5)
            model.bias.fill_(-1.0)
        return {"test_accuracy": 1.0}

    return zoo.Run(folder / name, lambda: nn.Linear(2, 1), train)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """``(shared, private)``: FUSIONLIB_CACHE -> shared, XDG_CACHE_HOME -> the private one's parent."""
    shared, home = tmp_path / "shared", tmp_path / "home"
    shared.mkdir()
    monkeypatch.setenv("FUSIONLIB_CACHE", str(shared))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return shared, home / "fusionlib"


def fill_shared(shared: Path) -> None:
    calls: list[int] = []
    zoo.cached_training(tiny_run(shared, calls))
    assert calls == [1] and (shared / "tiny-0123456789abcdef.pt").exists()


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only for real: chmod for a normal user; as root (which ignores permission bits),
    the immutable attribute (chattr +i). Skips when neither is possible here."""
    made: list[Path] = []

    def make(folder: Path) -> None:
        if os.geteuid() != 0:
            folder.chmod(0o555)
        else:
            done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip("running as root, which writes through permission bits, and `chattr +i` is refused "
                            f"here ({done.stderr.strip() or done.returncode}): no read-only folder to test with")
        made.append(folder)
        assert not zoo.writable_dir(folder)

    yield make
    for folder in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=False)
        else:
            folder.chmod(0o755)


def test_read_only_cache_with_the_entry_serves_it_and_writes_nothing(caches, read_only, capsys):
    shared, private = caches
    fill_shared(shared)
    read_only(shared)
    before = sorted(p.name for p in shared.iterdir())
    calls: list[int] = []
    model, metrics = zoo.cached_training(tiny_run(shared, calls))
    assert calls == [] and metrics["cached"] and metrics["path"] == str(shared / "tiny-0123456789abcdef.pt")
    assert float(model.weight.detach().sum()) == 1.0
    assert sorted(p.name for p in shared.iterdir()) == before
    assert not private.exists()
    assert "read-only" not in capsys.readouterr().out


def test_read_only_cache_without_the_entry_trains_into_the_private_cache(caches, read_only, capsys):
    shared, private = caches
    read_only(shared)
    calls: list[int] = []
    model, metrics = zoo.cached_training(tiny_run(shared, calls))
    out = capsys.readouterr().out
    assert calls == [1] and not metrics["cached"]
    assert f"The model cache {shared} is read-only" in out and str(private) in out
    assert metrics["path"] == str(private / "tiny-0123456789abcdef.pt") and Path(metrics["path"]).exists()
    assert list(shared.iterdir()) == []
    # the second call is served from the private cache, silently
    model2, metrics2 = zoo.cached_training(tiny_run(shared, calls))
    assert calls == [1] and metrics2["cached"] and metrics2["path"] == metrics["path"]
    assert torch.equal(model2.weight, model.weight)
    assert "read-only" not in capsys.readouterr().out


def test_fallback_logic_without_a_real_read_only_folder(caches, monkeypatch, capsys):
    """The same fallback with the write probe answering "read-only" (runs everywhere, root or not)."""
    shared, private = caches
    monkeypatch.setattr(zoo, "writable_dir", lambda folder: Path(folder) != shared)
    calls: list[int] = []
    _, metrics = zoo.cached_training(tiny_run(shared, calls))
    assert calls == [1] and metrics["path"] == str(private / "tiny-0123456789abcdef.pt")
    assert list(shared.iterdir()) == [] and "private cache" in capsys.readouterr().out
    _, metrics = zoo.cached_training(tiny_run(shared, calls))
    assert calls == [1] and metrics["cached"]


def test_writable_cache_is_used_as_before(caches):
    shared, private = caches
    fill_shared(shared)
    assert not private.exists()


def test_private_cache_is_never_the_shared_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path / "fusionlib"))
    private = zoo.private_cache_dir()
    assert private != zoo.cache_dir() and private.name.startswith("fusionlib-cache-")
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path / "elsewhere"))
    assert zoo.private_cache_dir() == tmp_path / "fusionlib"


def test_a_corrupt_entry_in_a_read_only_cache_is_trained_privately(caches, read_only, capsys):
    shared, private = caches
    (shared / "tiny-0123456789abcdef.pt").write_bytes(b"not a checkpoint")
    read_only(shared)
    calls: list[int] = []
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        _, metrics = zoo.cached_training(tiny_run(shared, calls))
    assert calls == [1] and metrics["path"].startswith(str(private))
    assert (shared / "tiny-0123456789abcdef.pt").read_bytes() == b"not a checkpoint"


def test_make_cache_runs_every_notebook_into_the_named_cache():
    """`make cache` (dry run): every notebook once with FUSIONLIB_CACHE set, its runs under runs/cache-* (which
    `make guide` does not read: they train)."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("make") is None:
        pytest.skip("no make here")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", "-n", "cache", "CACHE=/srv/room-cache"], cwd=root, capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    run = next(line for line in done.stdout.splitlines() if "fusionlib run" in line)
    assert run.startswith('FUSIONLIB_CACHE="/srv/room-cache" ') and "--out runs/cache-" in run
    assert all(f"notebooks/{p.name}" in run for p in (root / "notebooks").glob("[0-9]*.ipynb"))
    assert 'chmod -R a+rX "/srv/room-cache"' in done.stdout
