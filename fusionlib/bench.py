"""Latency measurement: warm-up, alternating rounds, medians, paired ratios.

How :func:`compare_latency` measures, and why:

* **warm-up** -- each callable runs ``warmup`` times first (allocator,
  oneDNN primitive caches, lazy initialization), untimed;
* **alternating rounds** -- then ``repeats`` rounds; each round calls every
  callable once, in an order that rotates by one each round (A B C, B C A,
  C A B), so slow drift of the machine (clock boost, a neighbour's job)
  spreads over all variants instead of landing on whichever ran last; after
  each full rotation the base order is reshuffled (seeded), so no callable
  always runs right after the same neighbour (with a fixed rotation, a
  callable that warms or cools the caches for its successor biased that
  successor by 2-3%);
* **medians** -- per callable, the median and the interquartile range (IQR,
  75th - 25th percentile) of its ``repeats`` times; medians ignore the odd
  slow run that a mean would absorb;
* **ratios** -- ``speedup = baseline median / median`` (the baseline is the
  first callable unless named): > 1 means faster than the baseline. Ratios
  measured in one process are comparable across machines; absolute
  milliseconds are not.

Everything runs under ``torch.inference_mode()``.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from fusionlib.train import eval_mode


@dataclass(frozen=True)
class LatencyRow:
    """One measured callable: its times in milliseconds and its speedup vs the baseline."""

    name: str
    median_ms: float
    iqr_ms: float
    speedup: float
    times_ms: tuple[float, ...] = field(repr=False, default=())

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "speedup": self.speedup}


@dataclass
class LatencyTable:
    """Result of :func:`compare_latency`: one :class:`LatencyRow` per callable, in input order."""

    rows: list[LatencyRow]
    baseline: str
    warmup: int
    repeats: int
    environment: str = ""

    def __getitem__(self, name: str) -> LatencyRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No row named {name!r}; rows are {[r.name for r in self.rows]}.")

    def speedup(self, name: str) -> float:
        """``baseline median / median`` of ``name`` (> 1: faster than the baseline)."""
        return self[name].speedup

    def as_dicts(self) -> list[dict[str, Any]]:
        """Rows as plain dicts (name, median_ms, iqr_ms, speedup), e.g. for a DataFrame."""
        return [row.as_dict() for row in self.rows]

    def __str__(self) -> str:
        width = max([len("name")] + [len(row.name) for row in self.rows])
        lines = [
            self.environment,
            f"{self.repeats} alternating rounds after {self.warmup} warm-up calls; "
            f"speedup = median({self.baseline}) / median",
            f"{'name':<{width}}  {'median ms':>10}  {'IQR ms':>8}  {'speedup':>8}",
        ]
        for row in self.rows:
            lines.append(f"{row.name:<{width}}  {row.median_ms:>10.3f}  {row.iqr_ms:>8.3f}  {row.speedup:>7.2f}x")
        return "\n".join(line for line in lines if line)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows str()
        printer.text(str(self))

    def plot(self, ax=None):
        """Bar chart of median ms (error bars: 25th to 75th percentile), each bar labelled with its speedup."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(1.2 + 1.1 * len(self.rows), 3.2))
        names = [row.name for row in self.rows]
        medians = [row.median_ms for row in self.rows]
        low, high = [], []
        for row in self.rows:
            q1, _, q3 = _quartiles(list(row.times_ms)) if row.times_ms else (row.median_ms,) * 3
            low.append(max(row.median_ms - q1, 0.0))
            high.append(max(q3 - row.median_ms, 0.0))
        colors = ["0.6" if name == self.baseline else "tab:blue" for name in names]
        bars = ax.bar(names, medians, yerr=[low, high], capsize=4, color=colors)
        ax.bar_label(bars, labels=[f"{row.speedup:.2f}x" for row in self.rows], padding=3)
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"speedup vs {self.baseline}")
        ax.set_ylim(0, max(medians) * 1.25 if medians and max(medians) > 0 else 1)
        return ax


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles (linear interpolation, like numpy's default)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def round_order(names: list[str], round_index: int, seed: int = 0) -> list[str]:
    """The call order of round ``round_index``: a Latin square per cycle of ``len(names)`` rounds.

    Cycle ``c = round_index // n`` shuffles ``names`` with a generator seeded by
    ``(seed, c)``; its rounds are that order rotated left by ``round_index % n``.
    Within a cycle every callable takes every position once; across cycles
    its predecessor changes.
    """
    cycle, shift = divmod(round_index, len(names))
    base = list(names)
    random.Random(f"{seed}:{cycle}").shuffle(base)
    return base[shift:] + base[:shift]


def compare_latency(
    fns: dict[str, Callable[[], object]],
    warmup: int = 3,
    repeats: int = 15,
    baseline: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyTable:
    """Time each zero-argument callable; return medians, IQRs and speedups vs ``baseline``.

    See the module docstring for the protocol. ``clock`` returns seconds
    (injectable for tests). ``baseline`` defaults to the first name.
    """
    from fusionlib.env import format_environment

    if not fns:
        raise ValueError("compare_latency needs at least one callable")
    names = list(fns)
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"fns[{name!r}] is not callable: {fn!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    baseline = names[0] if baseline is None else baseline
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")

    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for round_index in range(warmup):
            for name in round_order(names, round_index):
                fns[name]()
        for round_index in range(repeats):
            for name in round_order(names, round_index):
                start = clock()
                fns[name]()
                times[name].append((clock() - start) * 1e3)

    stats = {name: _quartiles(values) for name, values in times.items()}
    base_median = stats[baseline][1]
    rows = []
    for name in names:
        q1, median, q3 = stats[name]
        speedup = base_median / median if median > 0 else float("inf")
        rows.append(LatencyRow(name, median, q3 - q1, speedup, tuple(times[name])))
    return LatencyTable(rows, baseline, warmup, repeats, format_environment())


def compare_models_latency(
    models: dict[str, nn.Module],
    inputs: torch.Tensor | tuple,
    warmup: int = 3,
    repeats: int = 15,
    baseline: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyTable:
    """:func:`compare_latency` of ``model(inputs)`` for each model, in eval mode.

    ``inputs`` is one tensor or a tuple of positional arguments. Each model is
    switched to eval mode for the measurement and its training flag restored
    afterwards.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{name!r}] is a {type(model).__name__}, not an nn.Module")
    fns = {name: (lambda model=model: model(*args)) for name, model in models.items()}
    with eval_mode(*models.values()):
        return compare_latency(fns, warmup=warmup, repeats=repeats, baseline=baseline, clock=clock)
