"""The generated parts of the facilitator's guide, ``docs/workshop.md``: measured agendas and typical mistakes.

``make guide`` (``python -m fusionlib.guide --runs runs``) rewrites two marked
blocks of the guide and leaves the hand-written text around them alone:

* **measured** — per notebook, the run time from the latest ``fusionlib run``
  summary that ran it (``runs/*/summary.csv``: the newest folder by its
  ``plan.json`` ``written`` time, else the file's modification time; only
  ``ok`` rows at the default parameters of the full edition in ``notebooks/``
  count), plus reading and exercise time *estimated* from the notebook:
  ``reading = words of markdown / READING_WORDS_PER_MINUTE`` and
  ``exercises = count * EXERCISE_MINUTES``. A notebook without a measurement
  is "not measured yet" and its run time is budgeted at
  ``UNMEASURED_SECONDS``; one the runs folder lacks keeps the time the
  guide already recorded for it. Each slot is ``run + reading + exercises`` rounded
  up to 5 minutes; the one-day and two-day agendas lay the slots into
  days of :data:`SESSIONS` in teaching order.
  The figures the block was rendered from are written into it (a ``csv``
  fence), so :func:`check_document` can render the block again from them
  and compare, with no ``runs/`` folder at hand (``tests/test_guide.py``).
* **mistakes** — per notebook and exercise, each wrong-answer fixture of
  ``tests/exercise_answers/`` (``NN_k_<mistake>.py``): the mistake (the
  fixture's first inline comment, else its name) and what the check says,
  read from the fixture's ``# expect:`` pattern.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from fusionlib.editions import _title, exercises_of

#: Words of notebook markdown a learner reads per minute (technical text beside code: slower than prose).
READING_WORDS_PER_MINUTE = 120
#: Minutes per exercise (write, run the check, read its message, try again once).
EXERCISE_MINUTES = 8
#: Run time budgeted for a notebook without a measurement (the course's per-notebook target).
UNMEASURED_SECONDS = 90
#: Every slot is rounded up to this many minutes.
SLOT_ROUNDING = 5
#: One day: (start, end) of each teaching session, minutes after midnight (breaks between them).
SESSIONS = ((9 * 60, 10 * 60 + 30), (10 * 60 + 45, 12 * 60 + 15), (13 * 60 + 15, 14 * 60 + 45),
            (15 * 60, 16 * 60 + 30))
#: Minutes at the start of day 1 for setup and the environment check (`make check-env`).
SETUP_MINUTES = 15
#: The one-day workshop: folding and fusion (each of these notebooks is a prerequisite of the next).
ONE_DAY = ("00", "01", "02", "03", "04", "05")

#: Run folders of `make cache` (cold model cache: they train): not measurements of the notebooks.
COLD_RUN_PREFIX = "cache-"

BEGIN = "<!-- BEGIN generated {name}: `make guide` writes this block; edit fusionlib/guide.py instead -->"
END = "<!-- END generated {name} -->"
FIGURES_FENCE = "```csv guide-figures"
FIELDS = ("notebook", "title", "run_seconds", "run", "words", "exercises")


@dataclass(frozen=True)
class Timing:
    """A notebook's measured run time: seconds and the run folder it comes from."""

    seconds: float
    run: str


@dataclass(frozen=True)
class NotebookFigures:
    """What one notebook's slot is computed from (a row of the figures block)."""

    notebook: str  # "02_batchnorm_folding.ipynb"
    title: str
    run_seconds: float | None  # None: not measured yet
    run: str  # the run folder the time comes from ("" when not measured)
    words: int
    exercises: int

    @property
    def number(self) -> str:
        return self.notebook.split("_", 1)[0]

    @property
    def run_minutes(self) -> float:
        return (UNMEASURED_SECONDS if self.run_seconds is None else self.run_seconds) / 60

    @property
    def reading_minutes(self) -> float:
        return self.words / READING_WORDS_PER_MINUTE

    @property
    def exercise_minutes(self) -> int:
        return self.exercises * EXERCISE_MINUTES

    @property
    def slot_minutes(self) -> int:
        """``run + reading + exercises``, rounded up to :data:`SLOT_ROUNDING` minutes."""
        total = self.run_minutes + self.reading_minutes + self.exercise_minutes
        return max(SLOT_ROUNDING, SLOT_ROUNDING * math.ceil(total / SLOT_ROUNDING - 1e-9))


# ---------------------------------------------------------------------------------------- reading inputs


def _run_time(folder: Path) -> str:
    """When a run folder was planned: ``plan.json``'s ``written``, else the summary's modification time."""
    plan = _read_json(folder / "plan.json")
    if isinstance(plan, dict) and plan.get("written"):
        return str(plan["written"])
    stamp = (folder / "summary.csv").stat().st_mtime
    import datetime
    return datetime.datetime.fromtimestamp(stamp).isoformat(timespec="seconds")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _full_edition(folder: Path) -> set[str] | None:
    """Notebook names the run took from a ``notebooks/`` folder (None: no plan.json, accept every row)."""
    plan = _read_json(folder / "plan.json")
    if not isinstance(plan, dict):
        return None
    return {Path(r["notebook"]).name for r in plan.get("runs", [])
            if Path(r.get("notebook", "")).parent.name == "notebooks" and not r.get("parameters")}


def latest_timings(runs_dir: str | Path) -> dict[str, Timing]:
    """Per notebook, the seconds of its newest ``ok`` run at default parameters in ``runs_dir/*/summary.csv``.

    A summary's columns are ``notebook``, one per parameter, ``status``,
    ``seconds``, ...: a row with any parameter set is a sweep point, not the
    notebook at its defaults, and is skipped; so are runs of another edition
    (``student/``), read from ``plan.json``, and the cold-cache runs of
    ``make cache`` (folders ``cache-*``).
    """
    found: dict[str, tuple[str, Timing]] = {}
    for summary in sorted(Path(runs_dir).glob("*/summary.csv")):
        folder = summary.parent
        if folder.name.startswith(COLD_RUN_PREFIX):
            continue
        when, allowed = _run_time(folder), _full_edition(folder)
        with open(summary, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "status" not in rows[0] or "seconds" not in rows[0]:
            continue
        header = rows[0]
        status_at, seconds_at = header.index("status"), header.index("seconds")
        for row in rows[1:]:
            if len(row) <= seconds_at or row[status_at] != "ok" or any(row[1:status_at]):
                continue
            name = Path(row[0]).name
            if allowed is not None and name not in allowed:
                continue
            if name not in found or when >= found[name][0]:
                found[name] = (when, Timing(float(row[seconds_at]), folder.name))
    return {name: timing for name, (_, timing) in sorted(found.items())}


def _markdown_words(nb: nbformat.NotebookNode) -> int:
    return sum(len(str(c.source).split()) for c in nb.cells if c.cell_type == "markdown")


def notebook_figures(notebooks_dir: str | Path, timings: dict[str, Timing]) -> list[NotebookFigures]:
    """One :class:`NotebookFigures` per ``NN_*.ipynb`` in ``notebooks_dir``, in teaching order."""
    figures = []
    for path in sorted(Path(notebooks_dir).glob("[0-9]*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        timing = timings.get(path.name)
        figures.append(NotebookFigures(
            path.name, _title(nb, path.stem), timing.seconds if timing else None, timing.run if timing else "",
            _markdown_words(nb), len(exercises_of(nb))))
    return figures


def figures_csv(figures: list[NotebookFigures]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    for f in figures:
        writer.writerow([f.notebook, f.title, "" if f.run_seconds is None else f"{f.run_seconds:g}", f.run,
                         f.words, f.exercises])
    return out.getvalue()


def parse_figures(text: str) -> list[NotebookFigures]:
    rows = list(csv.DictReader(io.StringIO(text)))
    return [NotebookFigures(r["notebook"], r["title"], float(r["run_seconds"]) if r["run_seconds"] else None,
                            r["run"], int(r["words"]), int(r["exercises"])) for r in rows]


# ---------------------------------------------------------------------------------------- rendering


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _clock_at(teaching_minute: int, ending: bool = False) -> int:
    """The clock time (minutes after midnight) of a minute of teaching time in a day of :data:`SESSIONS`.

    A minute at a session's end is that session's end when ``ending``, else the next session's start.
    """
    for start, end in SESSIONS:
        if teaching_minute < end - start or ending and teaching_minute == end - start:
            return start + teaching_minute
        teaching_minute -= end - start
    return SESSIONS[-1][1] + teaching_minute


def _lay_out(figures: list[NotebookFigures], days: int) -> tuple[list[tuple[int, int, NotebookFigures]], list[NotebookFigures]]:
    """``(day, start clock minute, notebook)`` for each notebook that fits ``days`` days, and the rest.

    Notebooks go in teaching order, one after the other; a break pauses the
    notebook it falls in. A notebook that does not fit what is left of a day
    starts the next day. Day 1 starts with :data:`SETUP_MINUTES`.
    """
    capacity = sum(end - start for start, end in SESSIONS)
    placed, left = [], list(figures)
    for day in range(1, days + 1):
        now = SETUP_MINUTES if day == 1 else 0
        while left and now + left[0].slot_minutes <= capacity:
            placed.append((day, _clock_at(now), left[0]))
            now += left.pop(0).slot_minutes
    return placed, left


def _short_title(title: str) -> str:
    return re.sub(r"^\d+\s*[·—-]\s*", "", title)


def _agenda(title: str, figures: list[NotebookFigures], days: int) -> list[str]:
    placed, left = _lay_out(figures, days)
    lines = [f"### {title}", "", "| day | starts | notebook | slot (min) |", "|---|---|---|---|"]
    lines += [f"| {day} | {_clock(start)} | {f.notebook[:-6]} · {_short_title(f.title)} | {f.slot_minutes} |"
              for day, start, f in placed]
    taught = [f for _, _, f in placed]
    run = sum(f.run_minutes for f in taught)
    ends = ""
    if placed:
        day = placed[-1][0]
        used = sum(f.slot_minutes for d, _, f in placed if d == day) + (SETUP_MINUTES if day == 1 else 0)
        ends = f" The last slot ends at {_clock(_clock_at(used, ending=True))} on day {day}."
    lines += ["", f"Total: {len(taught)} notebooks, {sum(f.slot_minutes for f in taught)} minutes of slots "
              f"({run:.0f} of them running cells, measured or budgeted; the rest reading and exercises, estimated)."
              + ends]
    if left:
        lines.append("Does not fit; give it as take-home work: " + ", ".join(f.notebook[:-6] for f in left) + ".")
    return lines + [""]


def render_measured(figures: list[NotebookFigures]) -> str:
    """The measured block's text (without its markers) for these figures."""
    unmeasured = [f for f in figures if f.run_seconds is None]
    runs = sorted({f.run for f in figures if f.run})
    lines = [
        "Run times come from `fusionlib run` summaries (`make run`) on a warm model cache "
        f"(the runs {', '.join(f'`{r}`' for r in runs) or 'none yet'}); each is the notebook's latest `ok` run "
        "at its default parameters, on the machine that ran it: a learner's laptop may be slower. "
        f"Reading is **estimated** at {READING_WORDS_PER_MINUTE} words of markdown a minute, exercises at "
        f"**an estimated** {EXERCISE_MINUTES} minutes each; a slot is the sum, rounded up to {SLOT_ROUNDING} minutes.",
    ]
    if unmeasured:
        lines += ["", f"Not measured yet: {', '.join(f.notebook[:-6] for f in unmeasured)} "
                     f"(budgeted at {UNMEASURED_SECONDS} s; run `make run` then `make guide`)."]
    lines += ["", "| notebook | run (min, measured) | reading (min, estimate) | exercises (min, estimate) | slot (min) |",
              "|---|---|---|---|---|"]
    for f in figures:
        run = "not measured yet" if f.run_seconds is None else f"{f.run_seconds / 60:.1f}"
        lines.append(f"| {f.notebook[:-6]} | {run} | {f.reading_minutes:.0f} | "
                     f"{f.exercise_minutes} ({f.exercises} exercises) | {f.slot_minutes} |")
    lines += ["", f"All {len(figures)} notebooks: {sum(f.slot_minutes for f in figures)} minutes of slots, "
              f"{sum(f.run_minutes for f in figures):.0f} of them running cells.", ""]
    day = ", ".join(f"{_clock(a)}-{_clock(b)}" for a, b in SESSIONS)
    lines += [f"Each day has the sessions {day} (breaks between them: a break pauses the notebook it falls in); "
              f"day 1 starts with {SETUP_MINUTES} minutes of setup (`make check-env`). Notebooks keep their teaching "
              "order; one that does not fit what is left of a day starts the next day.", ""]
    one_day = [f for f in figures if f.number in ONE_DAY]
    lines += _agenda(f"One-day workshop: folding and fusion ({ONE_DAY[0]}-{ONE_DAY[-1]})", one_day, 1)
    lines += _agenda("Two-day workshop: in teaching order, as far as two days go", figures, 2)
    lines += ["Figures this block was generated from (`make guide` writes them; the test renders the block "
              "again from them):", "", FIGURES_FENCE, figures_csv(figures).rstrip(), "```"]
    return "\n".join(lines)


_EXPECT = re.compile(r"^#\s*expect:\s*(.*)$")
_COMMENT = re.compile(r"\S\s+#\s+(.+?)\s*$")


def readable_pattern(pattern: str) -> str:
    """A ``# expect:`` regular expression as text: escapes dropped, ``.*`` / ``.+`` / ``[...]+`` as "…"."""
    text = re.sub(r"\.\*|\.\+|\[[^\]]*\][+*]", "…", pattern)
    text = re.sub(r"\\(.)", r"\1", text)
    return text.replace("|", " / ").strip()


def fixture_mistakes(answers_dir: str | Path) -> dict[str, list[tuple[str, str, str]]]:
    """Per notebook number: ``(exercise, mistake, what the check says)`` of every wrong-answer fixture."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    for path in sorted(Path(answers_dir).glob("[0-9][0-9]_[0-9]*_*.py")):
        number, k, name = path.stem.split("_", 2)
        lines = path.read_text(encoding="utf-8").splitlines()
        match = _EXPECT.match(lines[0]) if lines else None
        if not match:
            continue
        comments = [m.group(1) for line in lines[1:] if (m := _COMMENT.search(line)) and not line.lstrip().startswith("#")]
        mistake = comments[0] if comments else name.replace("_", " ")
        found.setdefault(number, []).append((f"{number}.{k}", mistake, readable_pattern(match.group(1))))
    return found


def render_mistakes(answers_dir: str | Path, notebook_names: list[str]) -> str:
    """The mistakes block's text: one table per notebook that has wrong-answer fixtures."""
    mistakes = fixture_mistakes(answers_dir)
    lines = ["Taken from the wrong-answer fixtures of the exercise tests (`tests/exercise_answers/`): each is a "
             "mistake learners make, and the check's message for it (the part the test pins; \"…\" stands for "
             "text that depends on the answer).", ""]
    for name in notebook_names:
        number = name.split("_", 1)[0]
        if number not in mistakes:
            continue
        lines += [f"#### {Path(name).stem}", "", "| exercise | mistake | the check says |", "|---|---|---|"]
        for exercise, mistake, says in mistakes[number]:
            lines.append(f"| {exercise} | {_cell(mistake)} | {_cell(says)} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ---------------------------------------------------------------------------------------- the document


def replace_block(document: str, name: str, body: str) -> str:
    """``document`` with the text between the ``name`` markers replaced by ``body``."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    start, stop = document.find(begin), document.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"the guide has no {name!r} block: add the lines\n{begin}\n{end}")
    return document[:start] + begin + "\n" + body.rstrip() + "\n" + document[stop:]


def read_block(document: str, name: str) -> str:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    start, stop = document.find(begin), document.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"the guide has no {name!r} block")
    return document[start + len(begin):stop].strip("\n")


def recorded_figures(document: str) -> list[NotebookFigures]:
    """The figures written into the measured block."""
    block = read_block(document, "measured")
    start = block.index(FIGURES_FENCE) + len(FIGURES_FENCE)
    return parse_figures(block[start:block.index("```", start)].strip("\n") + "\n")


def check_document(document: str) -> list[str]:
    """Problems of the measured block: empty when it is exactly what :func:`render_measured` writes from its figures."""
    figures = recorded_figures(document)
    if read_block(document, "measured") != render_measured(figures).rstrip():
        return ["the measured block differs from what `make guide` renders from its own figures: run `make guide`"]
    return []


def update_document(document: str, runs_dir: str | Path, notebooks_dir: str | Path,
                    answers_dir: str | Path) -> str:
    """Both blocks rewritten. A notebook ``runs_dir`` has no run of keeps the time the document recorded for it,
    so `make guide` in a checkout without runs/ (e.g. to refresh the mistakes) loses no measurement."""
    try:
        recorded = {f.notebook: Timing(f.run_seconds, f.run) for f in recorded_figures(document)
                    if f.run_seconds is not None}
    except ValueError:  # no figures recorded yet
        recorded = {}
    figures = notebook_figures(notebooks_dir, {**recorded, **latest_timings(runs_dir)})
    document = replace_block(document, "measured", render_measured(figures))
    return replace_block(document, "mistakes", render_mistakes(answers_dir, [f.notebook for f in figures]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusionlib.guide",
                                     description="Regenerate the measured parts of the facilitator's guide.")
    parser.add_argument("--runs", default="runs", help="folder of `fusionlib run` outputs (default: runs)")
    parser.add_argument("--doc", default="docs/workshop.md")
    parser.add_argument("--notebooks", default="notebooks")
    parser.add_argument("--answers", default="tests/exercise_answers", help="wrong-answer fixtures")
    parser.add_argument("--check", action="store_true", help="only check the measured block against its figures")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    doc = Path(args.doc)
    text = doc.read_text(encoding="utf-8")
    if args.check:
        problems = check_document(text)
        for p in problems:
            print(f"{doc}: {p}", file=sys.stderr)
        return 1 if problems else 0
    if not Path(args.runs).is_dir():
        print(f"note: no runs folder {args.runs}/: the times recorded in the guide stay (run `make run` to measure again)",
              file=sys.stderr)
    new = update_document(text, args.runs, args.notebooks, args.answers)
    timings = latest_timings(args.runs) if Path(args.runs).is_dir() else {}
    doc.write_text(new, encoding="utf-8")
    print(f"{doc}: {'updated' if new != text else 'up to date'}; {len(timings)} notebook(s) measured in {args.runs}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
