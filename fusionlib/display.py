"""Plain-text tables and progress bars: one implementation for the whole library.

Tables go through `tabulate <https://pypi.org/project/tabulate/>`_ (what torch.fx's
``print_tabular`` uses); progress bars are plain-text ``tqdm`` bars, which need no
ipywidgets and stay readable in saved notebooks.
"""
from __future__ import annotations

from numbers import Real
from typing import Any, Iterable, Sequence

__all__ = ["format_table", "listing", "progress"]


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]], floatfmt: str | Sequence[str] = ".4g",
                 colalign: Sequence[str] | None = None, maxcolwidths: int | Sequence[int | None] | None = None) -> str:
    """A plain-text table: a header row, a rule, then ``rows``.

    Floats are printed with ``floatfmt`` (one format, or one per column); strings
    are printed as they are (a layer named ``"01"`` stays ``01``). Columns holding
    only numbers are right-aligned unless ``colalign`` says otherwise.
    ``maxcolwidths`` wraps long cells (one width, or one per column; ``None`` = no limit).
    """
    from tabulate import tabulate

    rows = [list(row) for row in rows]
    n_cols = max([len(header)] + [len(row) for row in rows])
    formats = [floatfmt] * n_cols if isinstance(floatfmt, str) else list(floatfmt)
    cells = [[format(v, formats[i]) if isinstance(v, float) else ("" if v is None else str(v))
              for i, v in enumerate(row)] for row in rows]
    if colalign is None:
        numeric = [all(_is_number(row[i]) for row in rows if i < len(row) and row[i] is not None) and
                   any(i < len(row) for row in rows) for i in range(n_cols)]
        colalign = ["right" if is_num else "left" for is_num in numeric]
    return tabulate(cells, headers=list(header), tablefmt="simple", colalign=colalign,
                    maxcolwidths=maxcolwidths, disable_numparse=True)


def listing(names: Sequence[str], limit: int | None = 8) -> str:
    """``"a, b, c"``, or the first ``limit`` names and ``"... and N more"`` (``None``: all)."""
    names = list(names)
    if limit is None or len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... and {len(names) - limit} more"


def progress(iterable: Iterable, total: int | None = None, desc: str = "", enabled: bool = True,
             leave: bool = True, unit: str = "it"):
    """A plain-text tqdm bar over ``iterable`` (``enabled=False`` hides it)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=leave, unit=unit, dynamic_ncols=True)
