"""The editions: students get stubs and prompts and never lose work; facilitators get every answer."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from fusionlib import editions
from fusionlib.editions import (
    ANSWERS_FILE,
    PLACEHOLDER,
    EditedNotebooksError,
    answer_prompt,
    facilitator_edition,
    main,
    sources_fingerprint,
    student_edition,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "notebooks"
FIXTURE = "00_exercise_fixture.ipynb"


def _tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def _uses_helper(nb) -> bool:
    return any("exercises." in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("src", [NOTEBOOKS, FIXTURES], ids=["course", "fixture"])
def test_student_edition_replaces_solutions_and_answers_only(src, tmp_path):
    counts = student_edition(src, tmp_path)
    assert set(counts) == {p.name for p in src.glob("[0-9]*.ipynb")}
    for name, replaced in counts.items():
        original = nbformat.read(src / name, as_version=4)
        student = nbformat.read(tmp_path / name, as_version=4)
        tags = [_tags(c) for c in original.cells]
        n_solutions = sum("solution" in t for t in tags)
        n_answers = sum("answer" in t and c.cell_type == "markdown" for t, c in zip(tags, original.cells))
        assert replaced == n_solutions + n_answers and n_solutions >= 2, f"{name}: every notebook has exercises"
        assert sum("check" in t for t in tags) >= n_solutions, f"{name}: each solution needs a check cell"
        assert len(student.cells) == len(original.cells)
        for before, after, t in zip(original.cells, student.cells, tags):
            if "solution" in t:
                assert after.source == (editions.stub_of(before) or PLACEHOLDER)
                assert after.source != before.source, f"{name}: a stub must not be the solution"
            elif "answer" in t and before.cell_type == "markdown":
                assert after.source == answer_prompt(before)
            else:
                assert after.source == before.source
            if after.cell_type == "code":
                assert after.outputs == [] and after.execution_count is None
        stamp = student.metadata["fusionlib"]["edition"]
        assert stamp == {"kind": "student", "source": f"notebooks/{name}", "sources_sha256": sources_fingerprint(student)}


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("[0-9]*.ipynb")) + [FIXTURES / FIXTURE], ids=lambda p: p.stem)
def test_every_solution_of_a_notebook_using_the_helper_has_a_safe_stub(path):
    """Notebooks written for fusionlib.exercises give each solution cell an exercise id and a stub.

    A stub compiles, names what the check reads, and raises nothing at top level
    (a stub's function may raise NotImplementedError when called).
    """
    nb = nbformat.read(path, as_version=4)
    if not _uses_helper(nb):
        pytest.skip(f"{path.name} does not use fusionlib.exercises yet")
    for i, cell in enumerate(nb.cells):
        if "solution" not in _tags(cell):
            continue
        stub = editions.stub_of(cell)
        assert stub is not None, f"{path.name} cell {i}: solution cell without metadata.fusionlib.stub"
        assert re.fullmatch(r"\d\d\.\d+", editions.exercise_of(cell) or ""), \
            f"{path.name} cell {i}: metadata.fusionlib.exercise should be like '02.1'"
        tree = ast.parse(stub, filename=f"{path.name} cell {i} stub")
        raising = [n.lineno for n in tree.body if isinstance(n, ast.Raise)]
        assert not raising, f"{path.name} cell {i}: the stub raises at top level (line {raising}); Run All would stop"
    for i, cell in enumerate(nb.cells):
        if "answer" in _tags(cell):
            assert cell.cell_type == "markdown", f"{path.name} cell {i}: written answers are markdown cells"


def _run(path: Path) -> list[str]:
    """Execute a notebook in a fresh kernel; return the text of its outputs (errors as 'ERROR ...')."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute(cwd=str(path.parent))
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                texts.append(f"ERROR {out.ename}: {out.evalue}")
            elif out.output_type == "stream":
                texts.append(out.text)
    return texts


def test_an_unsolved_student_notebook_runs_to_the_end_and_the_full_one_passes(tmp_path):
    student_edition(FIXTURES, tmp_path / "student")
    student = "".join(_run(tmp_path / "student" / FIXTURE))
    assert "ERROR" not in student, student
    assert "Exercise 00.1: not attempted yet — set answer_value to 6 x 7 in the cell above (answer_value is still exercises.TODO)" in student
    assert "Exercise 00.2: not attempted yet — write double(t) in the cell above\n" in student
    assert "PASS end of notebook reached" in student

    full_copy = tmp_path / "full" / FIXTURE
    full_copy.parent.mkdir()
    shutil.copy(FIXTURES / FIXTURE, full_copy)
    full = "".join(_run(full_copy))
    assert "ERROR" not in full and full.count(": correct — ") == 2, full


# --- student work is never lost ------------------------------------------------------------------


def _course_copy(tmp_path: Path) -> Path:
    src = tmp_path / "notebooks"
    src.mkdir()
    shutil.copy(FIXTURES / FIXTURE, src / FIXTURE)
    shutil.copy(FIXTURES / FIXTURE, src / "01_second.ipynb")
    return src


def _edit(path: Path, cell: int, text: str) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.cells[cell].source = text
    nbformat.write(nb, path)


def test_regenerating_never_loses_student_work(tmp_path):
    src, out = _course_copy(tmp_path), tmp_path / "student"
    student_edition(src, out)
    edited = out / FIXTURE
    # running cells adds outputs: that is not an edit
    nb = nbformat.read(out / "01_second.ipynb", as_version=4)
    nb.cells[4].outputs = [nbformat.v4.new_output("stream", text="Exercise 00.1: not attempted yet\n")]
    nbformat.write(nb, out / "01_second.ipynb")
    _edit(edited, 3, "answer_value = 42  # mine")
    mine = edited.read_text()

    student_edition(src, out)  # same course version: the edited notebook is kept, the other left alone
    assert edited.read_text() == mine
    assert nbformat.read(out / "01_second.ipynb", as_version=4).cells[4].outputs

    _edit(src / FIXTURE, 0, "# 00 · a new version of the course")
    _edit(src / "01_second.ipynb", 0, "# 01 · a new version too")
    with pytest.raises(EditedNotebooksError) as info:
        student_edition(src, out)
    message = str(info.value)
    assert FIXTURE in message and "01_second" not in message
    assert "make student FORCE=1" in message and "--force" in message and "Nothing was written" in message
    assert edited.read_text() == mine
    assert "a new version too" not in (out / "01_second.ipynb").read_text(), "nothing is half-written"

    student_edition(src, out, force=True)
    backups = list((out / editions.BACKUP_DIR).glob("00_exercise_fixture-*.ipynb"))
    assert len(backups) == 1 and backups[0].read_text() == mine
    assert "a new version of the course" in edited.read_text()
    assert "a new version too" in (out / "01_second.ipynb").read_text()


def test_a_notebook_of_unknown_origin_is_protected(tmp_path):
    src, out = _course_copy(tmp_path), tmp_path / "student"
    out.mkdir()
    (out / FIXTURE).write_text("{ not a notebook")
    shutil.copy(FIXTURES / FIXTURE, out / "01_second.ipynb")  # no fingerprint: made by someone else
    with pytest.raises(EditedNotebooksError, match=f"2 notebook.*{FIXTURE}, 01_second.ipynb"):
        student_edition(src, out)
    assert (out / FIXTURE).read_text() == "{ not a notebook"


# --- the facilitators' edition ---------------------------------------------------------------------


def test_facilitator_edition_has_full_notebooks_and_every_answer(tmp_path):
    counts = facilitator_edition(FIXTURES, tmp_path)
    assert counts == {FIXTURE: 2}
    full = nbformat.read(tmp_path / FIXTURE, as_version=4)
    original = nbformat.read(FIXTURES / FIXTURE, as_version=4)
    assert [c.source for c in full.cells] == [c.source for c in original.cells]
    assert [c.get("outputs") for c in full.cells] == [c.get("outputs") for c in original.cells]
    sheet = (tmp_path / ANSWERS_FILE).read_text()
    assert "## 00_exercise_fixture: 00 · Exercise fixture" in sheet
    assert sheet.index("### Exercise 00.1") < sheet.index("answer_value = 6 * 7") < sheet.index("### Exercise 00.2")
    assert "> **Exercise 2.** Write `double(t)`" in sheet
    assert "**Written answer:**\n\nA convolution is linear" in sheet


def test_facilitator_sheet_of_the_course_lists_every_solution(tmp_path):
    counts = facilitator_edition(NOTEBOOKS, tmp_path)
    sheet = (tmp_path / ANSWERS_FILE).read_text()
    for name, n in counts.items():
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert n == len(editions.exercises_of(nb)) >= 2
        for cell in nb.cells:
            if "solution" in _tags(cell) or ("answer" in _tags(cell) and cell.cell_type == "markdown"):
                assert cell.source.strip() in sheet, f"{name}: a solution or answer is missing from {ANSWERS_FILE}"


def test_exercises_without_ids_are_numbered_in_order():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("a = 1", metadata={"tags": ["solution"]}),
        nbformat.v4.new_markdown_cell("because", metadata={"tags": ["answer"]}),
        nbformat.v4.new_code_cell("b = 2", metadata={"tags": ["solution"]}),
    ])
    found = editions.exercises_of(nb, "07")
    assert [(e["exercise"], e["solutions"], e["answers"]) for e in found] == [
        ("07.1", ["a = 1"], ["because"]), ("07.2", ["b = 2"], [])]


# --- command line and make ------------------------------------------------------------------------


def test_cli(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no numbered notebooks"):
        student_edition(tmp_path, tmp_path / "out")
    assert main(["only-one-arg"]) == 2
    assert main(["--edition", "nope", "a", "b"]) == 2
    assert main([str(tmp_path), str(tmp_path / "out")]) == 1
    assert "no numbered notebooks" in capsys.readouterr().err

    src = _course_copy(tmp_path)
    assert main([str(src), str(tmp_path / "student")]) == 0
    out = capsys.readouterr().out
    assert f"{FIXTURE}: 3 solution / answer cell(s) replaced; written" in out
    _edit(tmp_path / "student" / FIXTURE, 3, "answer_value = 1")
    assert main([str(src), str(tmp_path / "student")]) == 0
    assert "kept (you edited it" in capsys.readouterr().out
    _edit(src / FIXTURE, 0, "# new")
    assert main([str(src), str(tmp_path / "student")]) == 1
    assert "make student FORCE=1" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "student"), "--force"]) == 0
    assert "replaced (edited copy in backup/)" in capsys.readouterr().out

    assert main(["--edition", "facilitator", str(src), str(tmp_path / "facilitator")]) == 0
    assert f"{FIXTURE}: 2 exercise(s) in {ANSWERS_FILE}" in capsys.readouterr().out
    assert (tmp_path / "facilitator" / ANSWERS_FILE).exists()


def test_makefile_keeps_student_work_and_offers_both_editions():
    makefile = (ROOT / "Makefile").read_text()
    clean = re.search(r"^clean:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert not re.search(r"\bstudent\b", clean), "make clean must not delete student/"
    for target in ("student", "facilitator", "lab-student", "lab"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no '{target}' target"
    assert "FORCE" in makefile and "--edition facilitator" in makefile


@pytest.mark.parametrize("force, forced", [("0", False), ("", False), ("no", False), ("1", True), ("yes", True)])
def test_make_force_zero_does_not_force(force, forced):
    for target in ("student", "facilitator"):  # -n: print the commands; -o: never rebuild the venv
        shown = subprocess.run(["make", "-n", "-o", ".venv/.installed", target, f"FORCE={force}"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
        assert ("--force" in shown) is forced, (target, force, shown)
