"""Every record of every committed notebook is a scalar whose name is in the glossary."""
from __future__ import annotations

from pathlib import Path

import pytest

from fusionlib.experiments import read_records
from fusionlib.glossary import GLOSSARY, check_records, lookup

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))


def test_lookup_takes_the_longest_prefix():
    assert lookup("speedup_fold_resnet18_b8").prefix == "speedup"
    assert lookup("ideal_speedup_separable").prefix == "ideal_speedup"
    assert lookup("max_rel_error_photos_mobilenet_v2").unit == "dimensionless"
    assert lookup("speedupish") is None
    assert lookup("bn_time_share_resnet18") is None


def test_check_records_names_each_problem():
    problems = check_records({
        "speedup_fold_resnet18": 1.2,           # no interval
        "speedup_x_lo": 0.9,                    # bound without estimate
        "nodes_by_opcode_resnet18": {"a": 1},   # not a scalar
        "BN_share": 0.1,                        # bad name, unknown prefix
    })
    text = "\n".join(problems)
    assert "'speedup_fold_resnet18': a speed-up without its interval" in text
    assert "'speedup_x_lo': an interval bound without its estimate 'speedup_x'" in text
    assert "'nodes_by_opcode_resnet18': records are scalars, got a dict" in text
    assert "'BN_share': names are lower_snake_case" in text and "'BN_share': no glossary prefix" in text
    assert check_records({"speedup_a": 1.1, "speedup_a_lo": 1.0, "speedup_a_hi": 1.2, "test_accuracy": 0.97}) == []


def test_glossary_prefixes_are_unique_and_documented():
    prefixes = [q.prefix for q in GLOSSARY]
    assert len(prefixes) == len(set(prefixes))
    assert all(q.meaning and q.unit for q in GLOSSARY)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_records_follow_the_glossary(notebook):
    records = read_records(notebook)
    assert records, f"{notebook.name} records no figures: is it committed executed?"
    problems = check_records(records)
    assert not problems, f"{notebook.name}:\n" + "\n".join(problems)
