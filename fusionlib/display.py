"""Plain-text tables and progress bars: one implementation for the whole library.

Tables go through `tabulate <https://pypi.org/project/tabulate/>`_ (what torch.fx's
``print_tabular`` uses); progress bars are plain-text ``tqdm`` bars, which need no
ipywidgets and stay readable in saved notebooks.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["format_table", "progress"]


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]], floatfmt: str | Sequence[str] = ".4g",
                 colalign: Sequence[str] | None = None, maxcolwidths: int | Sequence[int | None] | None = None) -> str:
    """A plain-text table: a header row, a rule, then ``rows`` (floats printed with ``floatfmt``).

    ``maxcolwidths`` wraps long cells (one width, or one per column; ``None`` = no limit).
    """
    from tabulate import tabulate

    rows = [list(row) for row in rows]
    return tabulate(rows, headers=list(header), tablefmt="simple", floatfmt=floatfmt,
                    colalign=colalign, maxcolwidths=maxcolwidths)


def progress(iterable: Iterable, total: int | None = None, desc: str = "", enabled: bool = True,
             leave: bool = True, unit: str = "it"):
    """A plain-text tqdm bar over ``iterable`` (``enabled=False`` hides it)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=leave, unit=unit, dynamic_ncols=True)
