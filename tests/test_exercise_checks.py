"""Every exercise check accepts its solution, reports its stub as not attempted, and rejects typical mistakes.

Runs each check cell outside the notebook, in a namespace built from the
notebook's ``parameters`` cell and its cells tagged ``setup`` (see
``tests/exercise_answers/README.md``). A check that depends on another
exercise's answer fails here, since only its own answer is defined.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from fusionlib import exercises
from fusionlib.editions import exercise_of, stub_of

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
ANSWERS = Path(__file__).parent / "exercise_answers"


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _exercises(path: Path) -> list[dict]:
    """One dict per exercise with a solution cell: its id, solution, stub and check sources."""
    nb = nbformat.read(path, as_version=4)
    context = [c.source for c in nb.cells if c.cell_type == "code" and ("parameters" in _tags(c) or "setup" in _tags(c))]
    found = []
    for cell in nb.cells:
        if cell.cell_type == "code" and "solution" in _tags(cell):
            ex = exercise_of(cell)
            checks = [c for c in nb.cells if "check" in _tags(c) and exercise_of(c) == ex]
            found.append({"notebook": path.stem, "id": ex, "solution": cell.source, "checks": checks,
                          "stub": stub_of(cell), "context": context})
    return found


def _uses_helper(path: Path) -> bool:
    return "exercises." in path.read_text()


EXERCISES = [ex for path in NOTEBOOKS if _uses_helper(path) for ex in _exercises(path)]
WRONG = sorted(ANSWERS.glob("[0-9][0-9]_*.py"))


def _run(ex: dict, answer: str) -> exercises.Result:
    namespace: dict = {"__name__": "__exercise__"}
    for source in ex["context"]:
        exec(compile(source, f"<{ex['notebook']} setup>", "exec"), namespace)
    exec(compile(answer, f"<answer {ex['id']}>", "exec"), namespace)
    for check in ex["checks"]:
        exec(compile(check.source, f"<check {ex['id']}>", "exec"), namespace)
    results = [v for v in namespace.values() if isinstance(v, exercises.Result) and v.exercise == ex["id"]]
    result = results[-1] if results else None
    assert result is not None, f"exercise {ex['id']}: the check cell produced no exercises.Result"
    return result


def _find(exercise_id: str) -> dict:
    matches = [ex for ex in EXERCISES if ex["id"] == exercise_id]
    assert matches, f"no exercise {exercise_id!r} in a notebook that uses fusionlib.exercises"
    return matches[0]


@pytest.fixture(autouse=True)
def _raise_mode():
    exercises.set_mode("raise")
    yield
    exercises.set_mode(None)


def test_every_notebook_uses_the_helper_and_names_its_exercises():
    for path in NOTEBOOKS:
        assert _uses_helper(path), f"{path.name}: exercises are not built with fusionlib.exercises yet"
        for ex in _exercises(path):
            assert ex["id"] and ex["id"].startswith(path.stem[:2] + "."), \
                f"{path.name}: a solution cell has exercise id {ex['id']!r}; use '{path.stem[:2]}.k'"
            assert len(ex["checks"]) == 1, f"{path.name}: exercise {ex['id']} needs exactly one check cell " \
                                           f"with metadata fusionlib.exercise = {ex['id']!r}"
            assert ex["stub"], f"{path.name}: exercise {ex['id']} has no stub in metadata.fusionlib.stub"
            assert any(f.name.startswith(ex["id"].replace(".", "_") + "_") for f in WRONG), \
                f"{path.name}: exercise {ex['id']} has no wrong-answer file in tests/exercise_answers/"


@pytest.mark.parametrize("ex", EXERCISES, ids=[ex["id"] for ex in EXERCISES])
def test_solution_is_correct_and_stub_is_not_attempted(ex, capsys):
    assert _run(ex, ex["solution"]).status == "correct"
    result = _run(ex, ex["stub"])
    assert result.status == "not attempted yet", f"exercise {ex['id']}: the stub gave {result}"
    assert f"Exercise {ex['id']}: not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize("answer", WRONG, ids=[p.stem for p in WRONG])
def test_typical_mistake_is_rejected_with_its_message(answer):
    source = answer.read_text()
    first = source.splitlines()[0]
    assert first.startswith("# expect:"), f"{answer.name}: the first line must be '# expect: <regex>'"
    expected = first.removeprefix("# expect:").strip()
    exercise_id = ".".join(answer.stem.split("_")[:2])
    ex = _find(exercise_id)
    with pytest.raises(exercises.ExerciseError) as caught:
        _run(ex, source)
    assert re.search(expected, str(caught.value)), \
        f"{answer.name}: the check said {str(caught.value)!r}, expected a match for {expected!r}"
