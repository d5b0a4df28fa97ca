"""Where does the time go? Run a traced model node by node and time every node.

``torch.fx.Interpreter`` executes a graph one node at a time (``run_node``); timing that
call gives each node's cost, including its share of Python overhead. The sum over nodes is
a little more than a plain forward pass, so read the *shares*, not the absolute times.

    interp = ProfilingInterpreter(model)
    interp.profile(x, runs=5)              # or call interp.run(x) yourself, several times
    print(interp.summary(top=10))          # op type, node, mean seconds, % of total
    print(interp.summary_by_op_type())     # Conv2d vs BatchNorm2d vs ReLU ...
    interp.plot(top=10)
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from fusionlib.display import format_table
from fusionlib.fx.tracing import modules_by_name, node_op_type, symbolic_trace

__all__ = ["ProfileRow", "ProfileTable", "ProfilingInterpreter"]


@dataclass
class ProfileRow:
    op_type: str
    node: str
    mean_seconds: float
    percent: float
    count: int = 1  # nodes aggregated in this row (1 per node; more in the by-op-type table)


@dataclass
class ProfileTable:
    """Rows of (op type, node, mean seconds, % of total), printable and plottable."""

    rows: list[ProfileRow] = field(default_factory=list)
    total_seconds: float = 0.0
    runs: int = 0
    by_op_type: bool = False
    hidden_rows: int = 0

    def __iter__(self) -> Iterator[ProfileRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [vars(r).copy() for r in self.rows]

    def __str__(self) -> str:
        first = "nodes" if self.by_op_type else "node"
        body = [[r.op_type, r.count if self.by_op_type else r.node, r.mean_seconds * 1e3, r.percent]
                for r in self.rows]
        table = format_table(["op type", first, "mean ms", "% total"], body, floatfmt=("", "", ".3f", ".1f"),
                             colalign=("left", "right" if self.by_op_type else "left", "right", "right"))
        lines = table.splitlines()
        if self.hidden_rows:
            lines.append(f"... {self.hidden_rows} more rows")
        lines.append(f"total {self.total_seconds * 1e3:.3f} ms per run (sum over nodes, mean of {self.runs} run(s))")
        return "\n".join(line.rstrip() for line in lines)

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Horizontal bars of % of total, largest on top; returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 0.3 * len(self.rows) + 1))
        labels = [r.op_type if self.by_op_type else f"{r.node} ({r.op_type})" for r in self.rows]
        ax.barh(labels[::-1], [r.percent for r in self.rows][::-1])
        ax.set_xlabel("% of total time")
        ax.set_title(title or ("time by op type" if self.by_op_type else "time by node"))
        return ax


class ProfilingInterpreter(fx.Interpreter):
    """A ``torch.fx.Interpreter`` that records the wall time of every node, run after run.

    ``model`` is a GraphModule or any traceable module (traced with
    :func:`fusionlib.fx.symbolic_trace`). Each :meth:`run` returns the model's output and
    appends one time per node; :meth:`summary` averages them.
    """

    def __init__(self, model: nn.Module, **trace_kwargs: Any) -> None:
        gm = model if isinstance(model, fx.GraphModule) else symbolic_trace(model, **trace_kwargs)
        super().__init__(gm)
        self._modules_by_name = modules_by_name(gm)
        self.node_seconds: dict[str, list[float]] = defaultdict(list)
        self.runs = 0
        self.recording = True

    def run_node(self, n: fx.Node) -> Any:
        if not self.recording:
            return super().run_node(n)
        start = time.perf_counter()
        result = super().run_node(n)
        self.node_seconds[n.name].append(time.perf_counter() - start)
        return result

    def run(self, *args: Any, **kwargs: Any) -> Any:
        out = super().run(*args, **kwargs)
        if self.recording:
            self.runs += 1
        return out

    def profile(self, *args: Any, runs: int = 5, warmup: int = 1) -> ProfileTable:
        """``warmup`` untimed runs, then ``runs`` timed ones (no autograd); returns :meth:`summary`."""
        with torch.inference_mode():
            self.recording = False
            try:
                for _ in range(warmup):
                    self.run(*args)
            finally:
                self.recording = True
            for _ in range(runs):
                self.run(*args)
        return self.summary()

    def reset(self) -> None:
        self.node_seconds.clear()
        self.runs = 0

    def _mean_seconds(self) -> list[tuple[fx.Node, float]]:
        if not self.node_seconds:
            raise RuntimeError("no timings yet: call run(...) or profile(...) first")
        return [(n, sum(self.node_seconds[n.name]) / len(self.node_seconds[n.name]))
                for n in self.module.graph.nodes if n.name in self.node_seconds]

    def summary(self, sort: bool = True, top: int | None = None) -> ProfileTable:
        """One row per node: op type, node name, mean seconds, % of the total (largest first if ``sort``)."""
        means = self._mean_seconds()
        total = sum(s for _, s in means)
        rows = [ProfileRow(node_op_type(n, self._modules_by_name), n.name, s, 100 * s / total if total else 0.0)
                for n, s in means]
        return self._table(rows, total, sort, top, by_op_type=False)

    def summary_by_op_type(self, sort: bool = True, top: int | None = None) -> ProfileTable:
        """Per-node means summed by op type (``Conv2d``, ``BatchNorm2d``, ``operator.add`` ...)."""
        node_rows = self.summary(sort=False).rows
        totals: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for r in node_rows:
            totals[r.op_type] += r.mean_seconds
            counts[r.op_type] += 1
        total = sum(totals.values())
        rows = [ProfileRow(k, k, s, 100 * s / total if total else 0.0, counts[k]) for k, s in totals.items()]
        return self._table(rows, total, sort, top, by_op_type=True)

    def _table(self, rows: list[ProfileRow], total: float, sort: bool, top: int | None,
               by_op_type: bool) -> ProfileTable:
        if sort:
            rows = sorted(rows, key=lambda r: r.mean_seconds, reverse=True)
        hidden = 0
        if top is not None and len(rows) > top:
            hidden = len(rows) - top
            rows = rows[:top]
        return ProfileTable(rows, total, self.runs, by_op_type, hidden)

    def plot(self, top: int | None = 15, ax: Any = None, by: str = "node") -> Any:
        """Bar plot of the ``top`` rows, ``by="node"`` or ``by="op_type"``; returns the Axes."""
        if by not in ("node", "op_type"):
            raise ValueError(f"by must be 'node' or 'op_type', got {by!r}")
        table = self.summary(top=top) if by == "node" else self.summary_by_op_type(top=top)
        return table.plot(ax=ax)
