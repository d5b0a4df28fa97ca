"""The students' edition keeps the exercises and checks, and drops the solutions."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from fusionlib.editions import PLACEHOLDER, main, student_edition

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_student_edition_of_the_course(tmp_path):
    counts = student_edition(NOTEBOOKS, tmp_path)
    assert set(counts) == {p.name for p in NOTEBOOKS.glob("[0-9]*.ipynb")}
    for name, emptied in counts.items():
        original = nbformat.read(NOTEBOOKS / name, as_version=4)
        student = nbformat.read(tmp_path / name, as_version=4)
        tags = [c.metadata.get("tags", []) for c in original.cells]
        n_solutions = sum("solution" in t for t in tags)
        assert emptied == n_solutions >= 2, f"{name}: every notebook has exercises with solution cells"
        assert sum("check" in t for t in tags) >= n_solutions, f"{name}: each solution needs a check cell"
        assert len(student.cells) == len(original.cells)
        for before, after, t in zip(original.cells, student.cells, tags):
            if "solution" in t:
                assert after.source == PLACEHOLDER
            else:
                assert after.source == before.source
            if after.cell_type == "code":
                assert after.outputs == [] and after.execution_count is None


def test_student_edition_errors_and_cli(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no numbered notebooks"):
        student_edition(tmp_path, tmp_path / "out")
    assert main(["only-one-arg"]) == 2
    assert main([str(NOTEBOOKS), str(tmp_path / "student")]) == 0
    assert "solution cell(s) emptied" in capsys.readouterr().out
