"""The install story stays consistent: pyproject.toml, environment.yml, Makefile, CI."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _runtime_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _environment_pip_requirements() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip section"
    return pip_sections[0]


def test_every_runtime_dependency_is_in_environment_yml():
    env_reqs = {_name(r): r.replace(" ", "") for r in _environment_pip_requirements() if not r.startswith("-")}
    missing = [r for r in _runtime_requirements() if _name(r) not in env_reqs]
    assert not missing, f"environment.yml lacks {missing}"
    differing = [r for r in _runtime_requirements() if env_reqs[_name(r)] != r.replace(" ", "")]
    assert not differing, f"environment.yml has other bounds than pyproject.toml for {differing}"


def test_environment_yml_installs_this_package_with_dev_extra():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    assert any(str(d).startswith("python") for d in env["dependencies"])
    assert "-e .[dev]" in _environment_pip_requirements()


def test_torch_bounds_exclude_the_broken_cpu_pair():
    """torch 2.13.0 (+cpu) beside a torchvision built for another torch fails to import."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    reqs = {Requirement(r).name: Requirement(r) for r in _runtime_requirements()}
    assert "torch" in reqs and "torchvision" in reqs
    assert not reqs["torch"].specifier.contains(Version("2.13.0+cpu"), prereleases=True)
    assert reqs["torch"].specifier.contains(Version("2.14.1"))
    assert reqs["torchvision"].specifier.contains(Version("0.29.1"))
    assert not any(s.operator == "==" for r in reqs.values() for s in r.specifier), "use lower bounds, not pins"


def test_readme_commands_are_the_make_targets_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test", "lab"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no '{target}' target"
    assert re.search(r"^\s*make test\b", (ROOT / ".ci" / "run").read_text(), re.M)


def test_make_test_checks_torchvision_first():
    makefile = (ROOT / "Makefile").read_text()
    test_rule = re.search(r"^test: (.*)$", makefile, re.M).group(1)
    assert "check-env" in test_rule
    assert "fusionlib.env --check" in makefile


def test_environment_check_passes_here():
    from fusionlib.env import check_torchvision, environment_info

    assert "OK" in check_torchvision()
    info = environment_info()
    assert int(info["threads"]) >= 1 and info["torch"]
