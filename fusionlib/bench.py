"""Latency measurement: paired rounds, the median of per-round ratios, and its interval.

How :func:`compare_latency` measures, and why:

* **one thread** -- by default the measurement runs with
  ``torch.set_num_threads(1)`` (the previous count is restored afterwards):
  one thread gives the steadiest times on a shared laptop and the same
  setting on every machine. ``num_threads=None`` measures at the current
  setting. The table's environment line states the count used.
* **warm-up** -- each callable runs ``warmup`` times first, untimed
  (allocator, oneDNN primitive caches, lazy initialization).
* **paired rounds** -- then ``repeats`` rounds; each round calls every
  callable once, in the order :func:`round_order` gives: a rotation within
  each cycle of ``len(fns)`` rounds (every callable takes every position),
  and a seeded reshuffle between cycles (no callable always follows the same
  neighbour). The callables of one round run within milliseconds of each
  other, under the same machine load.
* **paired ratio** -- for every callable ``c`` and round ``r``,
  ``ratio_r = t_baseline[r] / t_c[r]``; the speed-up is the **median of the
  per-round ratios** (> 1: faster than the baseline). A burst of load that
  slows one round slows both members of the pair and leaves their ratio
  nearly unchanged, which a ratio of two separately taken medians would not.
* **interval** -- a distribution-free confidence interval for that median
  (the sign-test interval): with ``n`` rounds and ratios sorted,
  ``[ratio_(k), ratio_(n+1-k)]`` for the largest ``k`` with
  ``2 * P(Binomial(n, 1/2) <= k - 1) <= 0.05``. It covers the true median
  ratio with probability >= 95% (:attr:`Speedup.confidence` holds the exact
  figure), needs no random numbers and no assumption about the shape of the
  noise. It needs at least 6 rounds; with fewer, ``[lo, hi]`` is the full
  range of the ratios and :meth:`Speedup.describe` says the rounds were too
  few. An interval that contains 1.0 reads "no measurable difference".
  The interval covers the round-to-round noise only, not systematic
  effects (a variant that warms the caches for the next one, allocator
  state): timing one callable against an identical copy of itself (an A/A
  comparison) shows the resolution on your machine, often a few percent.
* **per-callable times** -- the median and interquartile range (IQR, 75th -
  25th percentile) of each callable's times, in milliseconds. Absolute
  times describe this machine only; compare ratios measured in one process.
* **GPU** -- work on a CUDA device runs asynchronously; ``synchronize`` is
  called before the clock starts and before it stops, so each timed call
  includes its kernels. :func:`compare_models_latency` picks
  ``torch.cuda.synchronize`` itself when a model or input lives on a GPU;
  :func:`compare_latency` does when CUDA has been initialized in this
  process.

Everything runs under ``torch.inference_mode()``. In a notebook::

    table = bench.compare_models_latency({"eager": model, "fused": fused}, x)
    print(table)                      # medians, IQRs, speed-ups and their intervals
    print(table.describe("fused"))    # "fused vs eager: 1.44x faster (95% interval 1.40-1.49)"
    experiments.record_speedup("speedup_fused_resnet18", table, "fused")  # <name>, <name>_lo, <name>_hi
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fusionlib.arguments import check_positive_int
from fusionlib.display import format_table
from fusionlib.modules import eval_mode

__all__ = [
    "LatencyRow",
    "LatencyTable",
    "Speedup",
    "compare_latency",
    "compare_models_latency",
    "num_threads",
    "paired_speedup",
    "round_order",
    "sign_test_interval",
    "MIN_ROUNDS",
]

#: The fewest rounds for which a 95% sign-test interval of the median exists.
MIN_ROUNDS = 6


@dataclass(frozen=True)
class Speedup:
    """A paired speed-up: the median of per-round ratios and its confidence interval.

    ``ratio`` > 1 means faster than the baseline. ``[lo, hi]`` covers the true
    median ratio with probability ``confidence`` (>= 0.95 from ``MIN_ROUNDS``
    rounds on). ``float(speedup)`` is ``ratio``.
    """

    ratio: float
    lo: float
    hi: float
    confidence: float
    rounds: int

    @property
    def measurable(self) -> bool:
        """True when the 95% interval excludes 1.0 (and there were enough rounds for one)."""
        return self.rounds >= MIN_ROUNDS and not (self.lo <= 1.0 <= self.hi)

    def describe(self) -> str:
        """``"1.44x faster (95% interval 1.40-1.49)"``, ``"1.25x slower (...)"`` or
        ``"no measurable difference (1.01x, 95% interval 0.97-1.03)"``; slower
        figures and their interval are stated as slow-downs (1 / ratio)."""
        if self.rounds < MIN_ROUNDS:
            return (f"{self.ratio:.2f}x (only {self.rounds} round(s): too few for a 95% interval, "
                    f"use repeats >= {MIN_ROUNDS}; range {self.lo:.2f}-{self.hi:.2f})")
        if self.lo <= 1.0 <= self.hi:
            return f"no measurable difference ({self.ratio:.2f}x, 95% interval {self.lo:.2f}-{self.hi:.2f})"
        if self.lo > 1.0:
            return f"{self.ratio:.2f}x faster (95% interval {self.lo:.2f}-{self.hi:.2f})"
        return f"{1 / self.ratio:.2f}x slower (95% interval {1 / self.hi:.2f}-{1 / self.lo:.2f})"

    def __str__(self) -> str:
        return self.describe()

    def __float__(self) -> float:
        return float(self.ratio)


@dataclass(frozen=True)
class LatencyRow:
    """One measured callable: its times in milliseconds and its paired speed-up vs the baseline.

    ``speedup`` is the median of the per-round ratios ``baseline / this``
    (``ratios``, one per round); ``[speedup_lo, speedup_hi]`` is its interval.
    """

    name: str
    median_ms: float
    iqr_ms: float
    speedup: float
    times_ms: tuple[float, ...] = field(repr=False, default=())
    speedup_lo: float = math.nan
    speedup_hi: float = math.nan
    ratios: tuple[float, ...] = field(repr=False, default=())

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "speedup": self.speedup,
                "speedup_lo": self.speedup_lo, "speedup_hi": self.speedup_hi}


@dataclass
class LatencyTable:
    """Result of :func:`compare_latency`: one :class:`LatencyRow` per callable, in input order."""

    rows: list[LatencyRow]
    baseline: str
    warmup: int
    repeats: int
    environment: str = ""
    num_threads: int | None = None  #: torch threads during the measurement

    def __getitem__(self, name: str) -> LatencyRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No row named {name!r}; rows are {[r.name for r in self.rows]}.")

    def speedup(self, name: str) -> float:
        """The paired speed-up of ``name``: median over rounds of ``baseline time / time`` (> 1: faster)."""
        return self[name].speedup

    def interval(self, name: str) -> Speedup:
        """The speed-up of ``name`` with its interval, as a :class:`Speedup`."""
        row = self[name]
        return Speedup(row.speedup, row.speedup_lo, row.speedup_hi, _coverage(len(row.ratios))[1], len(row.ratios))

    def describe(self, name: str) -> str:
        """``"<name> vs <baseline>: 1.44x faster (95% interval 1.40-1.49)"``."""
        return f"{name} vs {self.baseline}: {self.interval(name).describe()}"

    def as_dicts(self) -> list[dict[str, Any]]:
        """Rows as plain dicts (name, median_ms, iqr_ms, speedup, speedup_lo, speedup_hi), e.g. for a DataFrame."""
        return [row.as_dict() for row in self.rows]

    def __str__(self) -> str:
        confidence = _coverage(self.repeats)[1]
        label = "95% interval" if self.repeats >= MIN_ROUNDS else f"range ({self.repeats} rounds)"
        threads = f" on {self.num_threads} thread(s)" if self.num_threads else ""
        rows = [[row.name, row.median_ms, row.iqr_ms, f"{row.speedup:.2f}x",
                 "(baseline)" if row.name == self.baseline else f"{row.speedup_lo:.2f}-{row.speedup_hi:.2f}"]
                for row in self.rows]
        lines = [
            self.environment,
            f"{self.repeats} paired rounds after {self.warmup} warm-up calls{threads}; "
            f"speed-up = median over rounds of time({self.baseline}) / time"
            + (f", with its sign-test interval (coverage {confidence:.1%})" if self.repeats >= MIN_ROUNDS else
               f"; fewer than {MIN_ROUNDS} rounds: no 95% interval, the range of the ratios instead"),
            format_table(["name", "median ms", "IQR ms", "speed-up", label], rows,
                         floatfmt=("", ".3f", ".3f", "", ""), colalign=("left", "right", "right", "right", "right")),
        ]
        return "\n".join(line for line in lines if line)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows str()
        printer.text(str(self))

    def plot(self, ax=None):
        """Bar chart of median ms (error bars: 25th to 75th percentile).

        Each bar is labelled with its speed-up; every bar but the baseline's also
        with the speed-up's interval on a second line.
        """
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
        labels = [f"{row.speedup:.2f}x" if row.name == self.baseline
                  else f"{row.speedup:.2f}x\n{row.speedup_lo:.2f}-{row.speedup_hi:.2f}" for row in self.rows]
        ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"speed-up vs {self.baseline} (median of paired ratios, interval)", fontsize=9)
        tops = [m + h for m, h in zip(medians, high)]  # error bars included, so labels sit above them
        ax.set_ylim(0, max(tops) * 1.35 if tops and max(tops) > 0 else 1)
        return ax


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles (linear interpolation, like numpy's default)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _coverage(n: int, level: float = 0.95) -> tuple[int, float]:
    """``(k, coverage)`` of the sign-test interval ``[x_(k), x_(n+1-k)]`` of the median of ``n`` values.

    ``k`` is the largest with ``coverage = 1 - 2 * P(Binomial(n, 1/2) <= k - 1) >= level``;
    when no ``k`` reaches ``level`` (``n < MIN_ROUNDS``), ``k = 1`` (the full range).
    """
    if n < 1:
        return 1, 0.0

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return k, coverage(k)


def sign_test_interval(values: list[float] | tuple[float, ...], level: float = 0.95) -> tuple[float, float, float]:
    """``(lo, hi, coverage)``: a distribution-free confidence interval for the median of ``values``.

    With the values sorted, ``[x_(k), x_(n+1-k)]`` (1-based) covers the true
    median with probability ``coverage = 1 - 2 P(Binomial(n, 1/2) <= k - 1)``,
    for the largest ``k`` with ``coverage >= level``. Fewer than
    :data:`MIN_ROUNDS` values give the full range (coverage ``1 - 2 / 2**n``).
    """
    if not values:
        raise ValueError("sign_test_interval needs at least one value")
    ordered = sorted(values)
    k, coverage = _coverage(len(ordered), level)
    return ordered[k - 1], ordered[len(ordered) - k], coverage


def _ratio(base: float, other: float) -> float:
    if other > 0:
        return base / other
    return 1.0 if base == other else math.inf


def paired_speedup(baseline_ms: list[float] | tuple[float, ...], times_ms: list[float] | tuple[float, ...]) -> Speedup:
    """The median over rounds of ``baseline_ms[r] / times_ms[r]``, with its sign-test interval."""
    if len(baseline_ms) != len(times_ms) or not times_ms:
        raise ValueError(f"paired_speedup needs two equally long, non-empty lists of times, "
                         f"got {len(baseline_ms)} and {len(times_ms)}")
    ratios = [_ratio(b, t) for b, t in zip(baseline_ms, times_ms)]
    lo, hi, coverage = sign_test_interval(ratios)
    return Speedup(statistics.median(ratios), lo, hi, coverage, len(ratios))


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


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block, the previous count restored afterwards (``None``: unchanged)."""
    if n is None:
        yield
        return
    check_positive_int("num_threads", n, "or None (leave the count as it is)")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_thread_count = num_threads  # compare_latency's argument of the same name shadows this context manager


def _synchronize_all_cuda_devices(devices: list[int]) -> Callable[[], None]:
    def synchronize() -> None:
        for device in devices:
            torch.cuda.synchronize(device)

    return synchronize


def _auto_synchronize() -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` on every device when CUDA is initialized in this process, else None."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return _synchronize_all_cuda_devices(list(range(torch.cuda.device_count())))
    return None


def compare_latency(
    fns: dict[str, Callable[[], object]],
    warmup: int = 3,
    repeats: int = 15,
    baseline: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
    *,
    num_threads: int | None = 1,
    synchronize: Callable[[], object] | bool | None = None,
) -> LatencyTable:
    """Time each zero-argument callable in paired rounds; speed-ups are medians of per-round ratios.

    See the module docstring for the protocol. ``clock`` returns seconds
    (injectable for tests). ``baseline`` defaults to the first name.
    ``num_threads``: torch threads during the measurement (restored
    afterwards; ``None`` keeps the current count). ``synchronize``: called
    before the clock starts and before it stops; ``None`` picks
    ``torch.cuda.synchronize`` when CUDA is initialized in this process,
    ``False`` never synchronizes.
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
    check_positive_int("repeats", repeats)
    baseline = names[0] if baseline is None else baseline
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    if synchronize is None:
        synchronize = _auto_synchronize()
    elif synchronize is False:
        synchronize = None
    elif synchronize is True or not callable(synchronize):
        raise TypeError(f"synchronize must be a callable, None (automatic) or False, got {synchronize!r}")
    sync = synchronize if synchronize is not None else (lambda: None)

    times: dict[str, list[float]] = {name: [] for name in names}
    with _thread_count(num_threads):
        environment = format_environment()
        threads = torch.get_num_threads()
        with torch.inference_mode():
            for round_index in range(warmup):
                for name in round_order(names, round_index):
                    fns[name]()
            sync()
            for round_index in range(repeats):
                for name in round_order(names, round_index):
                    sync()
                    start = clock()
                    fns[name]()
                    sync()
                    times[name].append((clock() - start) * 1e3)

    rows = []
    for name in names:
        q1, median, q3 = _quartiles(times[name])
        paired = paired_speedup(times[baseline], times[name])
        ratios = tuple(_ratio(b, t) for b, t in zip(times[baseline], times[name]))
        rows.append(LatencyRow(name, median, q3 - q1, paired.ratio, tuple(times[name]), paired.lo, paired.hi, ratios))
    return LatencyTable(rows, baseline, warmup, repeats, environment, threads)


def _cuda_devices(models: dict[str, nn.Module], args: tuple) -> list[int]:
    """Indices of the CUDA devices holding any parameter, buffer or (nested) input tensor."""
    devices: set[int] = set()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_cuda:
                devices.add(value.device.index if value.device.index is not None else torch.cuda.current_device())
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    visit(args)
    for model in models.values():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            visit(tensor)
    return sorted(devices)


def compare_models_latency(
    models: dict[str, nn.Module],
    inputs: torch.Tensor | tuple,
    warmup: int = 3,
    repeats: int = 15,
    baseline: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
    *,
    num_threads: int | None = 1,
    synchronize: Callable[[], object] | bool | None = None,
) -> LatencyTable:
    """:func:`compare_latency` of ``model(inputs)`` for each model, in eval mode.

    ``inputs`` is one tensor or a tuple of positional arguments. Each model is
    switched to eval mode for the measurement and its training flag restored
    afterwards. With ``synchronize=None``, a model or input on a CUDA device
    makes every timed call synchronize those devices
    (``torch.cuda.synchronize``) before the clock starts and before it stops.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{name!r}] is a {type(model).__name__}, not an nn.Module")
    if synchronize is None:
        devices = _cuda_devices(models, args)
        if devices:
            synchronize = _synchronize_all_cuda_devices(devices)
    fns = {name: (lambda model=model: model(*args)) for name, model in models.items()}
    with eval_mode(*models.values()):
        return compare_latency(fns, warmup=warmup, repeats=repeats, baseline=baseline, clock=clock,
                               num_threads=num_threads, synchronize=synchronize)
