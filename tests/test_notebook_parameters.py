"""Every parameters cell parses cleanly, and every notebook runs with non-default values.

The smoke run executes each notebook under papermill with the values in
``smoke_parameters.yaml`` (one model, the smallest sizes, one epoch): it must
finish (the notebook's own asserts included), record its figures under glossary
names, and record nothing about a model it was told not to use.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from fusionlib.sweeps import run_notebook
from fusionlib.glossary import check_records

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
SMOKE = yaml.safe_load((Path(__file__).parent / "smoke_parameters.yaml").read_text())
COURSE_MODELS = ("resnet18", "mobilenet_v2")
IDS = [p.stem for p in NOTEBOOKS]


def _parameters(notebook: Path, caplog) -> dict:
    import papermill as pm

    with caplog.at_level(logging.WARNING, logger="papermill"):
        params = pm.inspect_notebook(str(notebook))
    unparsed = [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert not unparsed, f"{notebook.name}: papermill cannot parse its parameters cell: {unparsed}"
    return params


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=IDS)
def test_parameters_cell_parses_and_offers_the_common_knobs(notebook, caplog):
    params = _parameters(notebook, caplog)
    assert {"seed", "num_threads"} <= set(params), f"{notebook.name}: every notebook takes seed and num_threads"
    smoke = SMOKE.get(notebook.stem)
    assert smoke, f"tests/smoke_parameters.yaml has no section for {notebook.stem}"
    unknown = sorted(set(smoke) - set(params))
    assert not unknown, f"{notebook.stem}: smoke parameters {unknown} are not in its parameters cell"


def _runs_with_non_default_parameters(notebook: Path, tmp_path: Path) -> None:
    smoke = SMOKE[notebook.stem]
    result = run_notebook(notebook, tmp_path / notebook.name, parameters=smoke)
    assert result.status == "ok", f"{notebook.name} with {smoke} failed: {result.error} (see {result.output})"
    assert result.records, f"{notebook.name} recorded no figures with {smoke}"
    problems = check_records(result.records)
    assert not problems, f"{notebook.name} with {smoke}:\n" + "\n".join(problems)
    chosen = smoke.get("model_names") or ([smoke["model_name"]] if "model_name" in smoke else None)
    if chosen:
        others = [m for m in COURSE_MODELS if m not in chosen]
        stray = [name for name in result.records if any(name.endswith("_" + m) or f"_{m}_" in name for m in others)]
        assert not stray, f"{notebook.name} was run with {chosen} but recorded {stray}: a model name is hard-coded"


# One test class per notebook: `make test` (pytest-xdist, --dist loadscope) schedules a class as one unit,
# so the smoke runs spread over the workers instead of queueing on the one that takes this module.
for _notebook in NOTEBOOKS:
    _name = "TestSmoke_" + _notebook.stem
    globals()[_name] = type(_name, (), {
        "test_runs_with_non_default_parameters":
            lambda self, tmp_path, _notebook=_notebook: _runs_with_non_default_parameters(_notebook, tmp_path),
        "__doc__": f"{_notebook.name} under papermill with its smoke parameters.",
    })
