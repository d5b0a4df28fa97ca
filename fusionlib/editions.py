"""The students' edition of the notebooks: solutions removed, checks kept.

Exercise cells tagged ``solution`` hold a worked answer; the cell after them,
tagged ``check``, asserts it. :func:`student_edition` replaces every solution
cell by a ``# your code here`` placeholder and clears all outputs, so students
start from a clean page and the check cells tell them when they got it right.

Command line (what ``make student`` calls)::

    python -m fusionlib.editions notebooks student
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

PLACEHOLDER = "# Exercise: your code here (the check cell below tells you when it is right)\n"


def strip_solutions(nb: nbformat.NotebookNode) -> int:
    """Empty every cell tagged ``solution`` and clear every output; returns how many were emptied."""
    emptied = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if "solution" in cell.get("metadata", {}).get("tags", []):
            cell.source = PLACEHOLDER
            emptied += 1
        cell.outputs = []
        cell.execution_count = None
    return emptied


def student_edition(src_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write a solution-free copy of every ``NN_*.ipynb`` in ``src_dir`` to ``out_dir``."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    notebooks = sorted(src_dir.glob("[0-9]*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_*.ipynb) in {src_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        counts[path.name] = strip_solutions(nb)
        nbformat.write(nb, out_dir / path.name)
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m fusionlib.editions SOURCE_DIR OUTPUT_DIR", file=sys.stderr)
        return 2
    for name, n in student_edition(argv[0], argv[1]).items():
        print(f"{name}: {n} solution cell(s) emptied")
    print(f"students' edition in {argv[1]}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
