"""Key figures and papermill runs: record -> notebook output -> read back -> summary."""
from __future__ import annotations

import csv
import json

import nbformat
import pytest

from fusionlib import experiments as ex


def _notebook(path, code_cells, parameters="x = 1"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    param_cell = nbformat.v4.new_code_cell(parameters)
    param_cell.metadata["tags"] = ["parameters"]
    nb.cells = [param_cell] + [nbformat.v4.new_code_cell(c) for c in code_cells]
    nbformat.write(nb, str(path))
    return path


def test_record_outside_a_kernel_prints_and_keeps(capsys):
    ex.record("max_rel_error", 2.5e-7)
    assert ex.RECORDED["max_rel_error"] == 2.5e-7
    assert "max_rel_error = 2.5e-07" in capsys.readouterr().out


def test_record_rejects_bad_names_and_values():
    with pytest.raises(ValueError, match="non-empty string"):
        ex.record("", 1)
    with pytest.raises(TypeError):
        ex.record("obj", object())


def test_record_turns_tensor_scalars_into_numbers():
    import torch

    ex.record("acc", torch.tensor(0.5))
    assert ex.RECORDED["acc"] == 0.5 and isinstance(ex.RECORDED["acc"], float)


def test_read_records_finds_the_mimetype_outputs_last_one_wins():
    nb = {"cells": [
        {"outputs": [{"output_type": "display_data", "data": {ex.MIMETYPE: {"name": "a", "value": 1}}}]},
        {"outputs": [{"output_type": "stream", "text": "a = 5"}]},
        {"outputs": [{"output_type": "display_data", "data": {ex.MIMETYPE: {"name": "a", "value": 2}}}]},
    ]}
    assert ex.read_records(nb) == {"a": 2}


def test_parse_parameters_and_grid():
    assert ex.parse_parameters(["seed=1", "model=resnet18", "lr=0.1"]) == {"seed": 1, "model": "resnet18", "lr": 0.1}
    grid = ex.parse_parameters(["b=1,8", "m=a,b"], sweep_lists=True)
    assert grid == {"b": [1, 8], "m": ["a", "b"]}
    assert ex.sweep_grid(grid) == [{"b": 1, "m": "a"}, {"b": 1, "m": "b"}, {"b": 8, "m": "a"}, {"b": 8, "m": "b"}]
    with pytest.raises(ValueError, match="'seed'"):
        ex.parse_parameters(["seed"])
    with pytest.raises(ValueError, match="not a Python identifier"):
        ex.parse_parameters(["bad-name=1"])


def test_format_table_aligns_columns():
    text = ex.format_table(["name", "value"], [["a", 1.23456789], ["long name", 2]])
    lines = text.splitlines()
    assert lines[0].startswith("name") and set(lines[1]) <= {"-", " "}
    assert "1.235" in lines[2] and lines[3].startswith("long name")
    assert lines[2].index("1.235") == lines[3].index("2")


def test_run_and_sweep_real_notebooks_with_papermill(tmp_path, monkeypatch):
    """A parameterized run records its figures; a failing notebook is reported, the rest still run."""
    good = _notebook(tmp_path / "good.ipynb", ["from fusionlib.experiments import record\nrecord('twice_x', 2 * x)"])
    bad = _notebook(tmp_path / "bad.ipynb", ["raise RuntimeError('boom')"])
    out = tmp_path / "out"
    code = ex.main(["run", str(bad), str(good), "-p", "x=3", "-o", str(out)])
    assert code == 1
    rows = {r["notebook"]: r for r in ex.load_summary(out)}
    assert rows["good.ipynb"]["status"] == "ok" and rows["good.ipynb"]["twice_x"] == "6"
    assert rows["bad.ipynb"]["status"] == "failed"
    assert "RuntimeError" in (out / "summary.md").read_text()
    assert ex.read_records(out / "good.ipynb") == {"twice_x": 6}

    sweep_out = tmp_path / "sweep"
    assert ex.main(["sweep", str(good), "-p", "x=1,2", "-o", str(sweep_out)]) == 0
    with open(sweep_out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["x"], r["twice_x"]) for r in table] == [("1", "2"), ("2", "4")]
    executed = json.loads((sweep_out / "good__x=2.ipynb").read_text())
    assert any("x = 2" in "".join(c["source"]) for c in executed["cells"])
