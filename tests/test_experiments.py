"""Key figures and papermill runs: record -> notebook output -> read back -> summary."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nbformat
import pytest

from fusionlib import bench
from fusionlib import cli, sweeps
from fusionlib import experiments as ex
from fusionlib.display import format_table


def _strict_json(text):
    """json.loads that refuses NaN / Infinity (not JSON; Jupyter's JavaScript cannot read them)."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def in_kernel(monkeypatch):
    """Pretend to run in a notebook kernel; collect what record() displays."""
    import IPython.display

    shown = []
    monkeypatch.setattr(ex, "_in_notebook_kernel", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append(obj))
    return shown


def _as_notebook(shown):
    return {"cells": [{"outputs": [{"output_type": "display_data", "data": obj} for obj in shown]}]}


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
    with pytest.raises(TypeError, match="'obj'"):
        ex.record("obj", object())
    with pytest.raises(ValueError, match="'counts'.*non-finite"):
        ex.record("counts", {"a": float("nan")})


def test_non_finite_records_are_standard_json_and_read_back(in_kernel):
    ex.record("max_rel_error_zero_reference", float("inf"))
    ex.record("loss", float("nan"))
    ex.record("ok", 0.25)
    text = json.dumps(_as_notebook(in_kernel))  # what nbformat writes
    records = ex.read_records(_strict_json(text))
    assert records["max_rel_error_zero_reference"] == math.inf and math.isnan(records["loss"])
    assert records["ok"] == 0.25
    assert in_kernel[1][ex.MIMETYPE] == {"name": "loss", "value": None, "nonfinite": "nan"}
    assert in_kernel[1]["text/plain"] == "loss = nan"
    assert math.isnan(ex.RECORDED["loss"])


def _speedup_table():
    """A measured table with a fake clock: per-round ratios 1.1 ... 2.0 (median 1.55, interval 1.2-1.9)."""
    now = [0.0]
    costs = {"base": iter([10.0] * 10), "fused": iter(10 / r for r in [1.3, 1.9, 1.1, 1.6, 2.0, 1.2, 1.5, 1.8, 1.4, 1.7])}

    def advance(name):
        now[0] += next(costs[name]) / 1e3

    fns = {name: (lambda name=name: advance(name)) for name in costs}
    return bench.compare_latency(fns, warmup=0, repeats=10, clock=lambda: now[0])


def test_record_speedup_records_three_sibling_scalars(in_kernel, capsys, monkeypatch):
    table = _speedup_table()
    ex.record_speedup("speedup_fused", table, "fused")
    assert len(in_kernel) == 1 and in_kernel[0]["text/plain"] == "speedup_fused = 1.55 (interval 1.2-1.9)"
    records = ex.read_records(_strict_json(json.dumps(_as_notebook(in_kernel))))
    assert records == {"speedup_fused": pytest.approx(1.55), "speedup_fused_lo": pytest.approx(1.2),
                       "speedup_fused_hi": pytest.approx(1.9)}
    assert all(isinstance(v, float) for v in records.values())
    monkeypatch.setattr(ex, "_in_notebook_kernel", lambda: False)
    ex.record_speedup("speedup_again", table.interval("fused"))
    assert ex.RECORDED["speedup_again_lo"] == pytest.approx(1.2)
    assert "speedup_again = 1.55 (interval 1.2-1.9)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="row="):
        ex.record_speedup("s", table)
    with pytest.raises(ValueError, match="needs a LatencyTable"):
        ex.record_speedup("s", table.interval("fused"), "fused")
    with pytest.raises(TypeError, match="'s'"):
        ex.record_speedup("s", 1.5)


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


def test_parse_parameters():
    assert sweeps.parse_parameters(["seed=1", "model=resnet18", "lr=0.1"]) == {"seed": 1, "model": "resnet18",
                                                                               "lr": 0.1}
    with pytest.raises(ValueError, match="'seed'"):
        sweeps.parse_parameters(["seed"])
    with pytest.raises(ValueError, match="not a Python identifier"):
        sweeps.parse_parameters(["bad-name=1"])


def test_format_table_aligns_columns():
    text = format_table(["name", "value"], [["a", 1.23456789], ["long name", 2]])
    lines = text.splitlines()
    assert lines[0].startswith("name") and set(lines[1]) <= {"-", " "}
    assert "1.235" in lines[2] and lines[3].startswith("long name")


def _result(notebook, records, status="ok", error="", parameters=None):
    return sweeps.RunResult(notebook, f"runs/x/{notebook}", status, 12.345, parameters or {}, records, error)


def test_summary_fits_120_columns_and_shows_headline_figures(tmp_path):
    long = "speedup_ours_optimize_for_inference_with_every_pass_and_layout_mobilenet_v2_b8"
    results = [
        _result("05_fx_fusion_with_a_rather_long_notebook_name.ipynb",
                {"nodes_resnet18": 71, long: 1.44, f"{long}_lo": 1.40, f"{long}_hi": 1.49,
                 "max_rel_error_photos_resnet18": 3.2e-7, "fused_count_resnet18": 20,
                 "test_accuracy": 0.97, "speedup_resnet18_b1": 1.1},
                parameters={"model_names": ["resnet18", "mobilenet_v2"], "batch_sizes": [1, 8]}),
        _result("bad.ipynb", {}, "failed", "PapermillExecutionError: " + "x" * 150),
        _result("01_conv2d_anatomy.ipynb", {"resnet18_mparams": 11.2, "resnet18_gmacs": 1.8}),
    ]
    text = sweeps.format_summary(results)
    assert max(len(line) for line in text.splitlines()) <= 120, text
    flat = " ".join(text.split())
    # speed-ups first, then errors, then accuracies: 3 headline figures
    assert "1.44 [1.4-1.49]" in flat and "speedup_resnet18_b1 = 1.1" in flat and "3.2e-07" in flat
    assert "test_accuracy" not in flat and "(+3 more in summary.csv)" in flat
    assert "nodes_resnet18" not in flat and "resnet18_mparams = 11.2" in flat  # no headline names: the first ones
    assert "FAILED" in text and "12.3" in text
    sweeps.write_summary(results, tmp_path)
    md = (tmp_path / "summary.md").read_text()
    for r in results:
        for name, value in r.records.items():
            assert any(line.split()[:1] == [name] and sweeps.results._cell(value) in line for line in md.splitlines()), name
    assert "x" * 150 in md.replace("\n", "")
    header = next(csv.reader(open(tmp_path / "summary.csv")))
    assert long in header and f"{long}_hi" in header and "nodes_resnet18" in header


def test_run_and_sweep_real_notebooks_with_papermill(tmp_path, monkeypatch):
    """A parameterized run records its figures; a failing notebook is reported, the rest still run."""
    good = _notebook(tmp_path / "good.ipynb", [
        "from fusionlib.experiments import record\nrecord('twice_x', 2 * x)",
        # where the kernel's IPC sockets are, and whether any landed in the notebook's folder
        "import json, os, ipykernel.connect\n"
        "info = json.loads(ipykernel.connect.get_connection_info())\n"
        "record('ipc_dir', os.path.dirname(info['ip']))\n"
        "record('ipc_files_here', sum(f.startswith('kernel-ipc') for f in os.listdir('.')))",
        "from fusionlib.bench import Speedup\nfrom fusionlib.experiments import record_speedup\n"
        "record_speedup('speedup_x', Speedup(1.5, 1.4, 1.6, 0.96, 15))\nrecord('nan_x', float('nan'))",
    ])
    bad = _notebook(tmp_path / "bad.ipynb", ["raise RuntimeError('boom')"])
    out = tmp_path / "out"
    code = cli.main(["run", str(bad), str(good), "-p", "x=3", "-o", str(out)])
    assert code == 1
    rows = {r["notebook"]: r for r in ex.load_summary(out)}
    assert rows["good.ipynb"]["status"] == "ok" and rows["good.ipynb"]["twice_x"] == "6"
    assert rows["bad.ipynb"]["status"] == "failed"
    assert "RuntimeError" in (out / "summary.md").read_text()
    # one folder per run: parameters, executed notebook, log, status
    assert sorted(p.name for p in (out / "good__x=3").iterdir()) == ["good.ipynb", "log.txt", "parameters.json",
                                                                      "status.json"]
    status = json.loads((out / "good__x=3" / "status.json").read_text())
    assert status["output"] == "good__x=3/good.ipynb"  # relative to the folder: it can be moved
    records = ex.read_records(_strict_json((out / "good__x=3" / "good.ipynb").read_text()))  # standard JSON, NaN
    assert records["twice_x"] == 6 and records["ipc_files_here"] == 0 and math.isnan(records["nan_x"])
    assert (records["speedup_x"], records["speedup_x_lo"], records["speedup_x_hi"]) == (1.5, 1.4, 1.6)
    assert "speedup_x_lo" in rows["good.ipynb"] and rows["good.ipynb"]["nan_x"] == "nan"
    ipc_dir = Path(records["ipc_dir"])
    assert ipc_dir.is_absolute() and ipc_dir != tmp_path and not ipc_dir.exists()  # private, removed after the run
    assert not list(tmp_path.glob("kernel-ipc*"))

    sweep_out = tmp_path / "sweep"
    assert cli.run_grid({"notebooks": [str(good)], "parameters": {"x": [1, 2]}}, out=str(sweep_out)) == 0
    with open(sweep_out / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["x"], r["twice_x"]) for r in table] == [("1", "2"), ("2", "4")]
    assert len({r["ipc_dir"] for r in table}) == 2  # one socket folder per run
    executed = json.loads((sweep_out / "good__x=2" / "good.ipynb").read_text())
    assert any("x = 2" in "".join(c["source"]) for c in executed["cells"])
