"""Comparing outputs: max absolute / relative error and a PASS/FAIL verdict.

For a reference output ``a`` and a candidate ``b`` (same shape)::

    max_abs = max |a - b|
    max_rel = max |a - b| / max |a|        (error relative to the output's scale)
    passed  = max_rel <= rtol

``max_rel`` divides by the largest reference magnitude, not element-wise:
logits near zero would make an element-wise ratio meaningless. Both numbers
are computed in float64. NaN anywhere in ``a - b`` fails the check.

Outputs may be tensors or nested tuples / lists / dicts of tensors (a
detector's dict of boxes and scores, a tuple of logits and features): every
leaf tensor is compared and the worst leaf (largest ``max_rel``) is reported.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from fusionlib.display import format_table
from fusionlib.modules import eval_mode


@dataclass(frozen=True)
class Comparison:
    """The verdict of one comparison; ``str()`` reads ``PASS name: max abs ..., max rel ... (tol ...)``."""

    max_abs: float
    max_rel: float
    rtol: float
    passed: bool
    name: str = ""
    worst: str = ""  #: path of the worst leaf in a nested output ("" for a single tensor)
    leaves: int = 1  #: number of leaf tensors compared

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        label = f"{status} {self.name}:" if self.name else f"{status}:"
        text = f"{label} max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} (tol {self.rtol:.0e})"
        if self.worst:
            text += f", worst of {self.leaves} leaves: {self.worst}"
        return text

    def _repr_html_(self) -> str:
        color = "#1a7f37" if self.passed else "#cf222e"
        return f'<pre style="color:{color}; margin:0">{html.escape(str(self))}</pre>'

    def check(self) -> "Comparison":
        """Raise ``AssertionError(str(self))`` unless passed; return self (for chaining)."""
        if not self.passed:
            raise AssertionError(str(self))
        return self


def _leaves(output: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a nested tuple / list / dict, in order ("out[0]['boxes']" style)."""
    if isinstance(output, dict):
        return [pair for key in sorted(output, key=repr) for pair in _leaves(output[key], f"{path}[{key!r}]")]
    if isinstance(output, (tuple, list)):
        return [pair for i, item in enumerate(output) for pair in _leaves(item, f"{path}[{i}]")]
    return [(path, output)]


def _structure(output: Any) -> Any:
    """The nesting of an output with leaves erased, to check that two outputs match."""
    if isinstance(output, dict):
        return ("dict", tuple((repr(key), _structure(output[key])) for key in sorted(output, key=repr)))
    if isinstance(output, (tuple, list)):
        return ("seq", tuple(_structure(item) for item in output))
    return "leaf"


def _leaf_errors(path: str, a: Any, b: Any) -> tuple[float, float]:
    """``(max_abs, max_rel)`` of one pair of leaves (tensors or numbers)."""
    where = f" at {path}" if path else ""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            a, b = torch.tensor(float(a)), torch.tensor(float(b))
        elif a is None and b is None:
            return 0.0, 0.0
        else:
            raise ValueError(f"Cannot compare {type(a).__name__} with {type(b).__name__}{where}: expected tensors.")
    a, b = (t.to_dense() if t.is_mkldnn else t for t in (a, b))  # MKLDNN layout: compare values
    if a.shape != b.shape:
        raise ValueError(f"Shape mismatch{where}: reference {tuple(a.shape)} vs candidate {tuple(b.shape)}.")
    if a.numel() == 0:
        return 0.0, 0.0
    a64 = a.detach().to("cpu", torch.float64)
    b64 = b.detach().to("cpu", torch.float64)
    diff = (a64 - b64).abs()
    diff = torch.where(a64 == b64, torch.zeros_like(diff), diff)  # equal infinities: no error
    max_abs = float(diff.max())
    scale = float(a64.abs().max())
    if math.isnan(max_abs):
        return max_abs, math.nan
    if max_abs == 0.0:
        return 0.0, 0.0
    return max_abs, (max_abs / scale if scale > 0 and math.isfinite(scale) else math.inf)


def compare_outputs(reference: Any, candidate: Any, rtol: float = 1e-4, name: str = "") -> Comparison:
    """Compare two outputs (tensors or nested tuple / list / dict of tensors); see the module docstring.

    Raises ``ValueError`` when the nesting differs or two leaves differ in shape
    (the message names both shapes and the leaf's path).
    """
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")
    if _structure(reference) != _structure(candidate):
        raise ValueError(
            f"Output structures differ{f' ({name})' if name else ''}: reference {_describe(reference)} "
            f"vs candidate {_describe(candidate)}."
        )
    pairs = [(path, a, b) for (path, a), (_, b) in zip(_leaves(reference), _leaves(candidate))]
    if not pairs:
        raise ValueError("Nothing to compare: the outputs contain no tensors.")
    worst_path, worst_abs, worst_rel = "", 0.0, -1.0
    for path, a, b in pairs:
        max_abs, max_rel = _leaf_errors(path, a, b)
        if math.isnan(max_rel) or (not math.isnan(worst_rel) and max_rel > worst_rel):
            worst_path, worst_abs, worst_rel = path, max_abs, max_rel
    passed = not math.isnan(worst_rel) and worst_rel <= rtol
    return Comparison(worst_abs, worst_rel, rtol, passed, name, worst_path if len(pairs) > 1 else "", len(pairs))


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"Tensor{tuple(output.shape)}"
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in output.items()) + "}"
    if isinstance(output, (tuple, list)):
        open_, close = ("[", "]") if isinstance(output, list) else ("(", ")")
        return open_ + ", ".join(_describe(v) for v in output) + close
    return type(output).__name__


def compare_models(
    reference: nn.Module, candidate: nn.Module, inputs: Any, rtol: float = 1e-4, name: str = ""
) -> Comparison:
    """Run both models on ``inputs`` and :func:`compare_outputs` the results.

    ``inputs`` is one tensor or a tuple of positional arguments. Both models run
    in eval mode under ``torch.inference_mode()``; every module's training flag
    is restored afterwards.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with eval_mode(reference, candidate), torch.inference_mode():
        expected = reference(*args)
        actual = candidate(*args)
    return compare_outputs(expected, actual, rtol=rtol, name=name)


def _flatten(items: Iterable[Any]) -> list[Comparison]:
    out: list[Comparison] = []
    for item in items:
        if isinstance(item, Comparison):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        else:
            raise TypeError(f"report takes Comparison objects, got {type(item).__name__}")
    return out


def format_report(*comparisons: Comparison | Iterable[Comparison]) -> str:
    """A small table: status, name, max abs, max rel, tolerance; then ``k/n checks passed``."""
    rows = _flatten(comparisons)
    table = format_table(
        ["", "name", "max abs", "max rel", "tol"],
        [["PASS" if c.passed else "FAIL", c.name, c.max_abs, c.max_rel, c.rtol] for c in rows],
        floatfmt=("", "", ".2e", ".2e", ".0e"), colalign=("left", "left", "right", "right", "right"))
    failed = sum(not c.passed for c in rows)
    return f"{table}\n{len(rows) - failed}/{len(rows)} checks passed"


def report(*comparisons: Comparison | Iterable[Comparison]) -> None:
    """Print :func:`format_report` of the comparisons (lists of them are flattened)."""
    print(format_report(*comparisons))
