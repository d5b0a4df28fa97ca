"""The facilitator's guide (docs/workshop.md): its generated blocks are what `make guide` writes.

The measured block is checked against the figures recorded in it (no runs/
folder needed); the mistakes block against the wrong-answer fixtures.
Reading run folders is tested on small summaries written here.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from fusionlib import guide
from fusionlib.editions import facilitator_edition

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "workshop.md"
NOTEBOOKS = ROOT / "notebooks"
ANSWERS = ROOT / "tests" / "exercise_answers"
FIXTURE_NOTEBOOKS = ROOT / "tests" / "fixtures" / "notebooks"


def test_measured_block_is_what_make_guide_writes_from_its_figures():
    document = DOC.read_text(encoding="utf-8")
    assert guide.check_document(document) == []
    figures = guide.recorded_figures(document)
    assert guide.read_block(document, "measured") == guide.render_measured(figures)


def test_measured_block_covers_every_notebook():
    recorded = [f.notebook for f in guide.recorded_figures(DOC.read_text(encoding="utf-8"))]
    assert recorded == sorted(p.name for p in NOTEBOOKS.glob("[0-9]*.ipynb")), (
        "docs/workshop.md lists other notebooks than notebooks/: run `make guide`")


def test_mistakes_block_is_what_make_guide_writes_from_the_fixtures():
    names = sorted(p.name for p in NOTEBOOKS.glob("[0-9]*.ipynb"))
    assert guide.read_block(DOC.read_text(encoding="utf-8"), "mistakes") == guide.render_mistakes(ANSWERS, names), (
        "the typical mistakes in docs/workshop.md differ from tests/exercise_answers/: run `make guide`")


def test_a_hand_edit_of_the_measured_block_is_caught():
    document = DOC.read_text(encoding="utf-8")
    first = guide.recorded_figures(document)[0]
    edited = document.replace(f"| {first.notebook[:-6]} |", f"| {first.notebook[:-6]} (edited) |", 1)
    assert edited != document and guide.check_document(edited)


def write_run(runs: Path, name: str, written: str, rows: list[tuple], params: tuple[str, ...] = (),
              folder: str = "notebooks") -> None:
    run = runs / name
    run.mkdir(parents=True)
    with open(run / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["notebook", *params, "status", "seconds", "error", "speedup_x"])
        for row in rows:
            writer.writerow(row)
    plan = {"runs": [{"notebook": f"/somewhere/{folder}/{row[0]}", "parameters": {}, "name": row[0][:-6]}
                     for row in rows], "written": written}
    (run / "plan.json").write_text(json.dumps(plan))


def test_latest_ok_default_run_per_notebook(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "20261206-100000", "2026-12-06T10:00:00",
              [("00_a.ipynb", "ok", 10.0, "", 1.0), ("01_b.ipynb", "ok", 20.0, "", "")])
    write_run(runs, "20261206-120000", "2026-12-06T12:00:00",
              [("00_a.ipynb", "ok", 12.5, "", ""), ("01_b.ipynb", "failed", 3.0, "ValueError: x", "")])
    write_run(runs, "sweep", "2026-12-06T13:00:00", [("00_a.ipynb", "2", "ok", 99.0, "", "")], params=("seed",))
    write_run(runs, "student-run", "2026-12-06T14:00:00", [("00_a.ipynb", "ok", 1.0, "", "")], folder="student")
    write_run(runs, "cache-20261206-150000", "2026-12-06T15:00:00", [("00_a.ipynb", "ok", 300.0, "", "")])
    timings = guide.latest_timings(runs)
    assert timings == {"00_a.ipynb": guide.Timing(12.5, "20261206-120000"),
                       "01_b.ipynb": guide.Timing(20.0, "20261206-100000")}


def test_unmeasured_notebooks_say_so_and_are_budgeted():
    figures = [guide.NotebookFigures("00_a.ipynb", "00 · A", 30.0, "r1", 1200, 2),
               guide.NotebookFigures("01_b.ipynb", "01 · B", None, "", 600, 1)]
    text = guide.render_measured(figures)
    assert "| 01_b | not measured yet |" in text and "Not measured yet: 01_b" in text
    # 0.5 + 10 + 16 = 26.5 -> 30; 1.5 (budget) + 5 + 8 = 14.5 -> 15
    assert [f.slot_minutes for f in figures] == [30, 15]
    assert "estimate" in text and "warm model cache" in text
    assert guide.parse_figures(guide.figures_csv(figures)) == figures


def test_agenda_runs_over_breaks_and_leaves_what_does_not_fit():
    long = [guide.NotebookFigures(f"{i:02d}_n.ipynb", f"{i:02d} · N", 0.0, "r", 120 * 115, 0) for i in range(5)]
    placed, left = guide._lay_out(long, days=1)  # 115-minute slots: 15 + 3 * 115 = 360 fits, the fourth does not
    assert [(day, guide._clock(start)) for day, start, _ in placed] == [(1, "09:15"), (1, "11:25"), (1, "14:20")]
    assert len(left) == 2
    text = "\n".join(guide._agenda("A day", long, days=1))
    assert "The last slot ends at 16:30 on day 1." in text and "take-home work: 03_n, 04_n." in text


def test_update_document_from_runs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "r1", "2026-12-06T10:00:00", [("00_exercise_fixture.ipynb", "ok", 42.0, "", "")])
    document = "intro\n" + "\n".join(f"{guide.BEGIN.format(name=n)}\nold\n{guide.END.format(name=n)}"
                                     for n in ("measured", "mistakes")) + "\noutro\n"
    new = guide.update_document(document, runs, FIXTURE_NOTEBOOKS, ANSWERS)
    assert new.startswith("intro\n") and new.endswith("outro\n") and "\nold\n" not in new
    assert guide.check_document(new) == []
    (figures,) = guide.recorded_figures(new)
    assert figures.run_seconds == 42.0 and figures.run == "r1"
    # without runs, the recorded times stay
    assert guide.recorded_figures(guide.update_document(new, tmp_path / "none", FIXTURE_NOTEBOOKS, ANSWERS)) == [figures]
    with pytest.raises(ValueError, match="no 'measured' block"):
        guide.replace_block("no markers", "measured", "x")


def test_readable_pattern():
    assert guide.readable_pattern(r"bias is off by .*\(weight matches\)") == "bias is off by …(weight matches)"
    assert guide.readable_pattern(r"up to [0-9.]+: values") == "up to …: values"
    assert guide.readable_pattern(r"second reader|another reader") == "second reader / another reader"


def test_facilitator_edition_holds_the_guide(tmp_path):
    src = tmp_path / "course" / "notebooks"
    shutil.copytree(FIXTURE_NOTEBOOKS, src)
    (tmp_path / "course" / "docs").mkdir()
    (tmp_path / "course" / "docs" / "workshop.md").write_text("# guide\n")
    facilitator_edition(src, tmp_path / "facilitator")
    assert (tmp_path / "facilitator" / "workshop.md").read_text() == "# guide\n"
