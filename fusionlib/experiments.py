"""Key figures a notebook records, read back from executed notebooks and run folders.

A notebook publishes a figure with :func:`record` (``record("max_rel_error", 3e-7)``).
The figure is stored as a notebook output with its own MIME type (the way
scrapbook's ``glue`` does it), so any executed notebook can be read back with
:func:`read_records`. Records are scalars. A speed-up is recorded with
:func:`record_speedup` as three sibling scalars: ``<name>`` (the paired ratio),
``<name>_lo`` and ``<name>_hi`` (its interval). A non-finite float (NaN, inf)
is stored as JSON ``null`` with a ``"nonfinite"`` tag (JSON has no NaN) and read
back as the float it was.

Notebooks are run, swept and summarised by :mod:`fusionlib.sweeps` (the ``fusionlib``
command, :mod:`fusionlib.cli`), which reads these records back; :func:`load_summary`
reads a run folder's ``summary.csv``. This module is what a notebook imports.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

MIMETYPE = "application/vnd.fusionlib.record+json"

#: Figures recorded outside a notebook kernel (plain Python), by name.
RECORDED: dict[str, Any] = {}


def _in_notebook_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _plain(value: Any) -> Any:
    """Turn numpy / torch scalars into JSON-friendly Python numbers."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    return value


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"record() needs a non-empty string name, got {name!r}")


def _encode(name: str, value: Any) -> dict[str, Any]:
    """The MIME payload of one record; a non-finite float becomes ``null`` plus a ``nonfinite`` tag."""
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return {"name": name, "value": None, "nonfinite": repr(value)}  # 'nan', 'inf', '-inf'
    try:
        json.dumps(value, allow_nan=False)  # fail here, not when the notebook is saved
    except ValueError as exc:
        raise ValueError(f"record {name!r}: {value!r} holds a non-finite number; record scalars") from exc
    except TypeError as exc:
        raise TypeError(f"record {name!r}: a {type(value).__name__} is not JSON-serializable; "
                        "record a number, a string or a bool") from exc
    return {"name": name, "value": value}


def _decode(item: dict[str, Any]) -> Any:
    if item.get("nonfinite"):
        return float(item["nonfinite"])
    return item.get("value")


def _text(name: str, value: Any) -> str:
    return f"{name} = {value:.6g}" if isinstance(value, float) else f"{name} = {value}"


def _publish(items: list[dict[str, Any]], text: str) -> None:
    """Keep the records in ``RECORDED``; show them as one output (a notebook) or print ``text``."""
    for item in items:
        RECORDED[item["name"]] = _decode(item)
    if _in_notebook_kernel():
        from IPython.display import display

        payload = items[0] if len(items) == 1 else items
        display({MIMETYPE: payload, "text/plain": text}, raw=True)
    else:
        print(text)


def record(name: str, value: Any) -> None:
    """Publish a key figure of this notebook (an error, a ratio, an accuracy).

    In a notebook it becomes an output with MIME type ``MIMETYPE`` (read back by
    :func:`read_records`) and shows as ``name = value``; elsewhere it is printed
    and kept in ``RECORDED``. NaN and infinities are stored as JSON ``null``
    tagged ``"nonfinite": "nan"`` (or ``"inf"``, ``"-inf"``) and read back as
    floats; a value JSON cannot hold raises ``TypeError`` naming the record.
    """
    _check_name(name)
    item = _encode(name, value)
    _publish([item], _text(name, _decode(item)))


def record_speedup(name: str, speedup: Any, row: str | None = None) -> None:
    """Record a speed-up and its interval as the scalars ``<name>``, ``<name>_lo`` and ``<name>_hi``.

    ``speedup`` is a :class:`fusionlib.bench.LatencyTable` with ``row`` the
    name of the measured row (``record_speedup("speedup_resnet18", table,
    "resnet18 folded")``), or a :class:`fusionlib.bench.Speedup` (no ``row``).
    Shows as one line: ``speedup_resnet18 = 1.44 (interval 1.40-1.49)``.
    """
    _check_name(name)
    if hasattr(speedup, "interval") and callable(speedup.interval):  # a LatencyTable
        if row is None:
            raise ValueError(f"record_speedup({name!r}, table): name the table row to record, "
                             f"e.g. row={speedup.rows[-1].name!r}")
        speedup = speedup.interval(row)
    elif row is not None:
        raise ValueError(f"record_speedup({name!r}): row={row!r} needs a LatencyTable, got {type(speedup).__name__}")
    if not all(hasattr(speedup, attr) for attr in ("ratio", "lo", "hi")):
        raise TypeError(f"record_speedup({name!r}) takes a LatencyTable and a row name, or a Speedup; "
                        f"got {type(speedup).__name__}")
    items = [_encode(name, speedup.ratio), _encode(f"{name}_lo", speedup.lo), _encode(f"{name}_hi", speedup.hi)]
    ratio, lo, hi = (_decode(item) for item in items)
    _publish(items, f"{name} = {ratio:.4g} (interval {lo:.4g}-{hi:.4g})")


def read_records(notebook: str | Path | dict) -> dict[str, Any]:
    """The figures a notebook recorded, in order (a later record of a name wins).

    Non-finite figures come back as ``float("nan")`` / ``float("inf")``.
    """
    nb = notebook if isinstance(notebook, dict) else json.loads(Path(notebook).read_text())
    found: dict[str, Any] = {}
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if MIMETYPE in data:
                payload = data[MIMETYPE]
                for item in payload if isinstance(payload, list) else [payload]:
                    found[item["name"]] = _decode(item)
    return found


def load_summary(run_dir: str | Path) -> list[dict[str, str]]:
    """Read ``summary.csv`` of a run folder back as a list of dicts."""
    with open(Path(run_dir) / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))
