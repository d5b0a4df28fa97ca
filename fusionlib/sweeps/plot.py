"""Plot a recorded figure of a sweep against a parameter: one line per series, error bars over seeds."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from fusionlib.sweeps.plan import _label
from fusionlib.sweeps.results import RunResult, aggregate

__all__ = ["plot_figure"]


def plot_figure(results: Sequence[RunResult], y: str, x: str, by: str | None, path: str | Path) -> Path:
    """A PNG of figure ``y`` against parameter ``x``, one line per series; error bars are the standard
    deviation over seeds where seeds repeat, else the recorded interval (``<y>_lo`` / ``<y>_hi``) if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = aggregate(results, y, x, by)
    xs = list(dict.fromkeys(p.x for p in points))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    if numeric:
        xs = sorted(xs)
    position = {v: (v if numeric else i) for i, v in enumerate(xs)}
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=80)
    uses_sd = uses_interval = False
    for series in dict.fromkeys(p.series for p in points):
        pts = sorted((p for p in points if p.series == series), key=lambda p: xs.index(p.x))
        px = [position[p.x] for p in pts]
        py = [p.mean for p in pts]
        lower, upper = [], []
        for p in pts:
            if p.n > 1:
                lower.append(p.sd), upper.append(p.sd)
                uses_sd = True
            elif not math.isnan(p.lo):
                lower.append(max(0.0, p.mean - p.lo)), upper.append(max(0.0, p.hi - p.mean))
                uses_interval = True
            else:
                lower.append(0.0), upper.append(0.0)
        ax.errorbar(px, py, yerr=[lower, upper], marker="o", capsize=3, label=series)
    if not numeric:
        ax.set_xticks(range(len(xs)), [_label(v) for v in xs])
    else:
        if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [_label(v) for v in xs])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    bars = " and ".join(t for t, used in (("± sd over seeds", uses_sd), ("recorded interval", uses_interval)) if used)
    n = max(p.n for p in points)
    ax.set_title(f"{y} vs {x}" + (f" (mean of {n} seeds)" if n > 1 else "") + (f"\nerror bars: {bars}" if bars else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    if y.startswith("speedup"):
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)  # no difference
    if len({p.series for p in points}) > 1 or points[0].series != y:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
