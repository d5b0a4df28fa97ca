"""Editions of the notebooks: the students' (no solutions) and the facilitators' (solutions collected).

An exercise is built from tagged cells (docs/design.md, "Exercises"):

* ``solution`` (code): the worked answer. Its metadata holds the *stub* the
  students get instead, ``metadata["fusionlib"]["stub"]`` (a string): the same
  names, defined but not yet working (functions raise
  ``NotImplementedError("Exercise 02.1: ...")``, values are
  ``exercises.TODO``), so the check cell below reports "not attempted yet" and
  Run All goes on. ``metadata["fusionlib"]["exercise"]`` names the exercise
  (``"02.1"``) for the facilitators' answer sheet. A solution cell without a
  stub becomes :data:`PLACEHOLDER`, a comment that defines nothing; the check
  then reports the missing name as not attempted. Notebooks must provide stubs.
* ``check`` (code): kept as it is in both editions.
* ``answer`` (markdown): a written answer. The students' edition replaces its
  text by a prompt (``metadata["fusionlib"]["prompt"]`` or
  :data:`ANSWER_PROMPT`); the facilitators' edition collects it.

Student work is never overwritten silently. Every generated notebook carries
``metadata["fusionlib"]["edition"]``: which edition and a fingerprint of its
cells' sources as generated. Regenerating compares each existing notebook with
its fingerprint (outputs do not count, only sources):

* not edited: replaced by the new version (left alone when nothing changed);
* edited, and the course version is the same: kept as it is;
* edited (or of unknown origin), and the course changed: nothing is written;
  :class:`EditedNotebooksError` names the notebooks and how to force. With
  ``force`` the edited notebook is first copied to ``backup/``.

Command line (what ``make student`` and ``make facilitator`` call)::

    python -m fusionlib.editions notebooks student [--force]
    python -m fusionlib.editions --edition facilitator notebooks facilitator [--force]

The facilitators' edition also holds ``answers.md`` (every solution and
written answer) and a copy of the guide, ``docs/workshop.md``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

SOLUTION_TAG, CHECK_TAG, ANSWER_TAG = "solution", "check", "answer"
METADATA_KEY = "fusionlib"
PLACEHOLDER = (
    "# Exercise: write your answer here (this notebook gives no starting code for it).\n"
    "# The check cell below tells you what it reads and when your answer is right.\n"
)
ANSWER_PROMPT = "**Your answer{exercise}:** *double-click here and write it.*"
EDITIONS = ("student", "facilitator")
ANSWERS_FILE = "answers.md"
#: The facilitator's guide, relative to the folder above the notebooks; the facilitators' edition holds a copy.
GUIDE_FILE = "docs/workshop.md"
BACKUP_DIR = "backup"


class EditedNotebooksError(RuntimeError):
    """Generating an edition would overwrite notebooks someone edited."""

    def __init__(self, out_dir: Path, names: list[str], edition: str):
        self.names = names
        make_hint = f"make {edition} FORCE=1" if edition in EDITIONS else "--force"
        super().__init__(
            f"Not writing the {edition} edition: {len(names)} notebook(s) in {out_dir}/ were edited since they "
            f"were generated, and the course version changed: {', '.join(names)}. Nothing was written. "
            f"To replace them anyway (each edited notebook is first copied to {out_dir}/{BACKUP_DIR}/), run "
            f"`{make_hint}` or `python -m fusionlib.editions --edition {edition} SRC {out_dir} --force`."
        )


def _meta(cell_or_nb) -> dict:
    return cell_or_nb.get("metadata", {}).get(METADATA_KEY, {}) or {}


def _tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def stub_of(cell) -> str | None:
    """The stub stored in a solution cell's metadata, or None."""
    stub = _meta(cell).get("stub")
    return None if stub is None else _text(stub)


def exercise_of(cell) -> str | None:
    """The exercise id (``"02.1"``) stored in a cell's metadata, or None."""
    exercise = _meta(cell).get("exercise")
    return None if exercise is None else str(exercise)


def missing_stubs(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of ``solution`` cells that have no stub in their metadata."""
    return [i for i, c in enumerate(nb.cells) if SOLUTION_TAG in _tags(c) and stub_of(c) is None]


def answer_prompt(cell) -> str:
    """What the students' edition shows in place of a written answer."""
    prompt = _meta(cell).get("prompt")
    if prompt is not None:
        return _text(prompt)
    exercise = exercise_of(cell)
    return ANSWER_PROMPT.format(exercise=f" (exercise {exercise})" if exercise else "")


def strip_solutions(nb: nbformat.NotebookNode) -> int:
    """Students' edition, in place: solutions become stubs, written answers become prompts, outputs go.

    Returns how many solution and answer cells were replaced.
    """
    replaced = 0
    for cell in nb.cells:
        tags = _tags(cell)
        if cell.cell_type == "code":
            if SOLUTION_TAG in tags:
                stub = stub_of(cell)
                cell.source = PLACEHOLDER if stub is None else stub
                replaced += 1
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown" and ANSWER_TAG in tags:
            cell.source = answer_prompt(cell)
            cell.pop("attachments", None)
            replaced += 1
    return replaced


def sources_fingerprint(nb: nbformat.NotebookNode) -> str:
    """SHA-256 of the cells' types and sources: what a person edits (outputs and metadata excluded)."""
    digest = hashlib.sha256()
    for cell in nb.cells:
        digest.update(json.dumps([cell.cell_type, _text(cell.source)]).encode())
    return digest.hexdigest()


def _stamp(nb: nbformat.NotebookNode, edition: str, source_name: str) -> None:
    nb.metadata.setdefault(METADATA_KEY, {})["edition"] = {
        "kind": edition,
        "source": f"notebooks/{source_name}",
        "sources_sha256": sources_fingerprint(nb),
    }


def _generated_fingerprint(nb: nbformat.NotebookNode) -> str | None:
    edition = _meta(nb).get("edition", {})
    return edition.get("sources_sha256") if isinstance(edition, dict) else None


@dataclass
class Plan:
    """What regenerating an edition does with each notebook (file names)."""

    write: list[str] = field(default_factory=list)  #: new, or unedited and changed
    unchanged: list[str] = field(default_factory=list)  #: unedited, same version: left alone
    kept: list[str] = field(default_factory=list)  #: edited, same version: left alone
    conflicts: list[str] = field(default_factory=list)  #: edited, and the version changed


def _plan(generated: dict[str, nbformat.NotebookNode], out_dir: Path) -> Plan:
    plan = Plan()
    for name, new in generated.items():
        target = out_dir / name
        if not target.exists():
            plan.write.append(name)
            continue
        try:
            existing = nbformat.read(target, as_version=4)
        except Exception:  # an unreadable file is still somebody's work
            plan.conflicts.append(name)
            continue
        stored = _generated_fingerprint(existing)
        edited = stored is None or stored != sources_fingerprint(existing)
        same_version = stored is not None and stored == _generated_fingerprint(new)
        if same_version:
            (plan.kept if edited else plan.unchanged).append(name)
        elif edited:
            plan.conflicts.append(name)
        else:
            plan.write.append(name)
    return plan


def _course(src_dir: Path) -> list[Path]:
    notebooks = sorted(src_dir.glob("[0-9]*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_*.ipynb) in {src_dir}")
    return notebooks


def _write_edition(generated: dict[str, nbformat.NotebookNode], out_dir: Path, edition: str, force: bool) -> Plan:
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(generated, out_dir)
    if plan.conflicts and not force:
        raise EditedNotebooksError(out_dir, plan.conflicts, edition)
    if plan.conflicts:
        backup = out_dir / BACKUP_DIR
        backup.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in plan.conflicts:
            shutil.copy2(out_dir / name, backup / f"{Path(name).stem}-{stamp}.ipynb")
    for name in plan.write + plan.conflicts:
        nbformat.write(generated[name], out_dir / name)
    return plan


def student_notebook(nb: nbformat.NotebookNode, source_name: str = "") -> nbformat.NotebookNode:
    """A students' copy of ``nb`` (``nb`` itself is not changed), stamped with its fingerprint."""
    student = copy.deepcopy(nb)
    strip_solutions(student)
    _stamp(student, "student", source_name)
    return student


def student_edition(src_dir: str | Path, out_dir: str | Path, force: bool = False) -> dict[str, int]:
    """Write the students' edition of every ``NN_*.ipynb`` in ``src_dir`` to ``out_dir``.

    Returns, per notebook, how many solution / answer cells were replaced.
    Raises :class:`EditedNotebooksError` (writing nothing) when it would
    overwrite edited notebooks, unless ``force``; see the module docstring.
    """
    return build_edition("student", src_dir, out_dir, force)[0]


# --- the facilitators' edition -------------------------------------------------------------------


def _title(nb: nbformat.NotebookNode, fallback: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in _text(cell.source).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


def exercises_of(nb: nbformat.NotebookNode, notebook_number: str = "") -> list[dict]:
    """The exercises of a notebook in order: ``{"exercise", "prompt", "solutions", "answers"}``.

    A solution or answer cell names its exercise in its metadata; without one, a
    solution cell starts the next exercise (numbered in order) and an answer
    cell joins the exercise before it.
    """
    found: dict[str, dict] = {}
    current: str | None = None
    for i, cell in enumerate(nb.cells):
        tags = _tags(cell)
        is_solution = cell.cell_type == "code" and SOLUTION_TAG in tags
        is_answer = cell.cell_type == "markdown" and ANSWER_TAG in tags
        if not (is_solution or is_answer):
            continue
        exercise = exercise_of(cell)
        if exercise is None:
            if is_solution or current is None:
                prefix = f"{notebook_number}." if notebook_number else ""
                exercise = f"{prefix}{len(found) + 1}"
            else:
                exercise = current
        if exercise not in found:
            previous = nb.cells[i - 1] if i > 0 else None
            prompt = ""
            if previous is not None and previous.cell_type == "markdown" and ANSWER_TAG not in _tags(previous):
                prompt = _text(previous.source)
            found[exercise] = {"exercise": exercise, "prompt": prompt, "solutions": [], "answers": []}
        found[exercise]["solutions" if is_solution else "answers"].append(_text(cell.source).strip())
        current = exercise
    return list(found.values())


def answers_markdown(notebooks: list[tuple[str, nbformat.NotebookNode]]) -> str:
    """One markdown sheet: every solution and written answer, by notebook and exercise."""
    lines = [
        "# Answers to the exercises",
        "",
        "Generated by `make facilitator` from `notebooks/`; regenerated each time, so keep notes elsewhere.",
        "Each exercise: its prompt (quoted), the solution code, and the written answer where there is one.",
        "",
    ]
    for name, nb in notebooks:
        number = name.split("_", 1)[0]
        lines += [f"## {Path(name).stem}: {_title(nb, name)}", ""]
        items = exercises_of(nb, number)
        if not items:
            lines += ["*No exercises.*", ""]
        for item in items:
            lines += [f"### Exercise {item['exercise']}", ""]
            if item["prompt"]:
                lines += ["> " + line if line else ">" for line in item["prompt"].splitlines()]
                lines.append("")
            for code in item["solutions"]:
                lines += ["```python", code, "```", ""]
            for answer in item["answers"]:
                lines += ["**Written answer:**", "", answer, ""]
    return "\n".join(lines).rstrip() + "\n"


def facilitator_edition(src_dir: str | Path, out_dir: str | Path, force: bool = False) -> dict[str, int]:
    """Copy the full notebooks (solutions, outputs) to ``out_dir``, write ``answers.md`` there, copy ``docs/workshop.md``.

    Returns, per notebook, how many exercises ``answers.md`` lists. Edited
    notebooks are protected as in :func:`student_edition`.
    """
    return build_edition("facilitator", src_dir, out_dir, force)[0]


def build_edition(edition: str, src_dir: str | Path, out_dir: str | Path, force: bool = False
                  ) -> tuple[dict[str, int], Plan]:
    """Write one edition; returns the per-notebook counts and the :class:`Plan` that was carried out."""
    if edition not in EDITIONS:
        raise ValueError(f"edition {edition!r}: use one of {', '.join(EDITIONS)}")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    counts, generated, read = {}, {}, []
    for path in _course(src_dir):
        nb = nbformat.read(path, as_version=4)
        read.append((path.name, nb))
        if edition == "student":
            counts[path.name] = strip_solutions(copy.deepcopy(nb))
            generated[path.name] = student_notebook(nb, path.name)
        else:
            counts[path.name] = len(exercises_of(nb))
            full = copy.deepcopy(nb)
            _stamp(full, "facilitator", path.name)
            generated[path.name] = full
    plan = _write_edition(generated, out_dir, edition, force)
    if edition == "facilitator":
        (out_dir / ANSWERS_FILE).write_text(answers_markdown(read), encoding="utf-8")
        guide = src_dir.parent / GUIDE_FILE
        if guide.is_file():
            shutil.copyfile(guide, out_dir / guide.name)
    return counts, plan


# --- command line -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fusionlib.editions",
        description="Write the students' edition (solutions replaced by stubs) or the facilitators' "
        "edition (full notebooks + answers.md) of the course notebooks.",
    )
    parser.add_argument("source", help="folder of the course notebooks (notebooks)")
    parser.add_argument("output", help="folder to write (student or facilitator)")
    parser.add_argument("--edition", choices=EDITIONS, default="student")
    parser.add_argument("--force", action="store_true", help="replace edited notebooks (backed up first)")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        counts, plan = build_edition(args.edition, args.source, args.output, force=args.force)
    except (EditedNotebooksError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, n in counts.items():
        if args.edition == "student":
            status = ("kept (you edited it; the course version is the same)" if name in plan.kept
                      else "up to date" if name in plan.unchanged
                      else "replaced (edited copy in backup/)" if name in plan.conflicts else "written")
            print(f"{name}: {n} solution / answer cell(s) replaced; {status}")
            missing = missing_stubs(nbformat.read(Path(args.source) / name, as_version=4))
            if missing:
                print(f"  warning: solution cell(s) {missing} have no stub (metadata.fusionlib.stub)", file=sys.stderr)
        else:
            print(f"{name}: {n} exercise(s) in {ANSWERS_FILE}")
    print(f"{args.edition}s' edition in {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
