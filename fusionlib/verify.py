"""Comparing outputs: max absolute / relative error and a PASS/FAIL verdict; layer by layer (:func:`layer_report`).

For a reference output ``a`` and a candidate ``b`` (same shape)::

    max_abs = max |a - b|
    max_rel = max |a - b| / max |a|        (error relative to the output's scale)
    passed  = max_rel <= rtol

``max_rel`` divides by the largest reference magnitude, not element-wise:
logits near zero would make an element-wise ratio meaningless. Both numbers
are computed in float64 (:func:`tensor_errors`, the one error measure). NaN
anywhere in ``a - b`` fails the check.

Outputs may be tensors or nested tuples / lists / dicts of tensors (``torch.utils._pytree``) (a
detector's dict of boxes and scores, a tuple of logits and features): every
leaf tensor is compared and the worst leaf (largest ``max_rel``) is reported.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.utils._pytree as pytree
from torch import nn

from fusionlib.display import format_table, listing
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


def tensor_errors(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float, tuple[int, ...]]:
    """``(max_abs, max_rel, index)`` of two same-shaped tensors: the one error measure of fusionlib.

    ``max_abs = max |a - b|`` and ``max_rel = max_abs / max |a|`` (``a`` the reference), in
    float64 on the CPU; ``index`` is where ``max_abs`` is reached. Equal elements (equal
    infinities too) are no error; a reference of zeros with a different candidate gives
    ``max_rel = inf``. A NaN on either side makes both errors NaN, at the first NaN's index.
    """
    a = reference.detach().to("cpu", torch.float64)
    b = candidate.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return 0.0, 0.0, ()
    diff = (a - b).abs()
    diff = torch.where(a == b, torch.zeros_like(diff), diff)  # equal infinities: no error
    nan = torch.isnan(diff)
    flat = int(nan.flatten().nonzero()[0]) if nan.any() else int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    if nan.any():
        return math.nan, math.nan, index
    max_abs = float(diff.max())
    scale = float(a.abs().max())
    if max_abs == 0.0:
        return 0.0, 0.0, index
    return max_abs, (max_abs / scale if scale > 0 and math.isfinite(scale) else math.inf), index


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
    return tensor_errors(a, b)[:2]


def _leaves_by_path(output: Any) -> dict[str, Any]:
    """Every leaf of a nested output by its path (``"[0]['boxes']"``), from ``torch.utils._pytree``."""
    return {pytree.keystr(path): leaf for path, leaf in pytree.tree_flatten_with_path(output)[0]}


def compare_outputs(reference: Any, candidate: Any, rtol: float = 1e-4, name: str = "") -> Comparison:
    """Compare two outputs (tensors or nested tuple / list / dict of tensors); see the module docstring.

    Raises ``ValueError`` when the nesting differs or two leaves differ in shape
    (the message names both shapes and the leaf's path).
    """
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")
    reference_leaves, candidate_leaves = _leaves_by_path(reference), _leaves_by_path(candidate)
    if reference_leaves.keys() != candidate_leaves.keys():  # a dict's key order and list vs tuple do not matter
        raise ValueError(
            f"Output structures differ{f' ({name})' if name else ''}: reference {_describe(reference)} "
            f"vs candidate {_describe(candidate)}."
        )
    pairs = [(path, a, candidate_leaves[path]) for path, a in reference_leaves.items()]
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


# --------------------------------------------------------------------------
# Layer by layer: where error enters and whether it grows
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerComparison:
    """One layer call compared: ``max_rel`` = max |a − b| / max |a|, ``cosine`` = ⟨a, b⟩ / (|a| |b|), in float64.

    ``a`` is the reference activation, ``b`` the candidate's. ``finite`` is False when the candidate's
    activation holds inf or NaN (``max_rel`` is then inf or NaN).
    """

    depth: int  #: position in the candidate's execution order (0 = first layer called)
    name: str  #: the candidate's module name ("name [k]" for the k-th call of a module called more than once)
    reference: str  #: the reference layer it is compared with (the same name unless mapped)
    kind: str  #: the candidate module's type name
    max_rel: float
    cosine: float
    finite: bool


@dataclass
class LayerReport:
    """What :func:`layer_report` found: one :class:`LayerComparison` per matched layer call, in depth order."""

    layers: list[LayerComparison]
    reference_only: list[str]  #: reference layers no candidate layer reproduces (a folded BatchNorm)
    candidate_only: list[str]  #: candidate layers with no reference counterpart
    output: Comparison  #: the final outputs, as compare_outputs
    mapped: dict[str, str]  #: candidate name -> reference name, where they differ
    folded_into: dict[str, str] = field(default_factory=dict)  #: folded BatchNorm -> the layer that absorbed it

    @property
    def first_nonfinite(self) -> LayerComparison | None:
        """The first layer whose candidate activation holds inf or NaN (fp16 overflow), or None."""
        return next((layer for layer in self.layers if not layer.finite), None)

    @property
    def worst(self) -> LayerComparison | None:
        """The layer with the largest max relative error (NaN counts as largest)."""
        if not self.layers:
            return None
        return max(self.layers, key=lambda l: math.inf if math.isnan(l.max_rel) else l.max_rel)

    def entry(self, threshold: float = 0.0) -> LayerComparison | None:
        """The first layer whose max relative error exceeds ``threshold``: where error enters."""
        return next((l for l in self.layers if not l.max_rel <= threshold), None)

    def growth(self) -> float:
        """Last layer's max relative error over the first non-zero one's (> 1: error grows with depth)."""
        first = self.entry()
        if first is None or not self.layers[-1].finite or not first.finite:
            return math.nan if first is not None else 1.0
        return self.layers[-1].max_rel / first.max_rel

    def summary(self) -> str:
        """One paragraph: where error enters, where it is largest, the output, the growth, inf/NaN."""
        if not self.layers:
            return "No layer of the candidate matched a reference layer."
        bad = self.first_nonfinite
        if bad is not None:
            return (f"inf/NaN first appears at layer {bad.depth} '{bad.name}' ({bad.kind}); output max rel "
                    f"{self.output.max_rel:.3g}. In fp16 this is overflow past 65504: use bf16, or scale that "
                    "layer's input down.")
        first, worst = self.entry(), self.worst
        if first is None:
            return (f"All {len(self.layers)} matched layer calls agree exactly; "
                    f"output max rel {self.output.max_rel:.3g}.")
        return (f"Error enters at layer {first.depth} '{first.name}' (max rel {first.max_rel:.3g}), is largest at "
                f"layer {worst.depth} '{worst.name}' ({worst.max_rel:.3g}, cosine {worst.cosine:.6f}); the last "
                f"layer's is {self.growth():.3g}x the first's; output max rel {self.output.max_rel:.3g}. "
                f"{len(self.layers)} layer calls compared, {len(self.reference_only)} reference layer(s) without "
                "a counterpart.")

    def format(self, max_rows: int | None = 40, max_listed: int | None = 8) -> str:
        """A table (depth, layer, compared with, type, max rel, cosine, finite), then the unmatched layers.

        With more than ``max_rows`` layer calls, every k-th row is shown (plus the first, the worst, the
        first non-finite and the last); at most ``max_listed`` unmatched layers are named (None: all).
        """
        rows = self.layers
        if max_rows is not None and len(rows) > max_rows:
            step = math.ceil(len(rows) / max_rows)
            keep = {0, len(rows) - 1, *range(0, len(rows), step)}
            for special in (self.worst, self.first_nonfinite):
                if special is not None:
                    keep.add(special.depth)
            rows = [rows[i] for i in sorted(keep)]
        table = format_table(
            ["depth", "layer", "compared with", "type", "max rel", "cosine", "finite"],
            [[l.depth, l.name, "" if l.reference == l.name.split(" [")[0] else l.reference, l.kind,
              l.max_rel, l.cosine, "yes" if l.finite else "NO"] for l in rows],
            floatfmt=("", "", "", "", ".2e", ".8f", ""))
        lines = [table]
        if len(rows) < len(self.layers):
            lines.append(f"({len(rows)} of {len(self.layers)} layer calls shown)")
        if self.reference_only:
            lines.append(f"reference layers without a counterpart ({len(self.reference_only)}): " + listing([
                f"{name} (folded into {self.folded_into[name]})" if name in self.folded_into else name
                for name in self.reference_only], max_listed))
        if self.candidate_only:
            lines.append(f"candidate layers without a counterpart ({len(self.candidate_only)}): "
                         + listing(self.candidate_only, max_listed))
        lines.append(str(self.output))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def plot(self, axes: Any = None, label: str | None = None) -> Any:
        """Max relative error and 1 − cosine against depth (log scale), on two axes (new ones if None).

        Call again with the returned axes and another ``label`` to overlay a second report. inf / NaN
        layers are marked with a red x at the top of the first panel.
        """
        import matplotlib.pyplot as plt

        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(9, 3))
        depth = [l.depth for l in self.layers]
        rel = [l.max_rel if l.finite and l.max_rel > 0 else math.nan for l in self.layers]
        one_minus_cos = [max(1.0 - l.cosine, 1e-16) if l.finite else math.nan for l in self.layers]
        axes[0].plot(depth, rel, marker=".", markersize=3, linewidth=1, label=label)
        axes[1].plot(depth, one_minus_cos, marker=".", markersize=3, linewidth=1, label=label)
        bad = [l.depth for l in self.layers if not l.finite]
        if bad:
            top = max([r for r in rel if not math.isnan(r)] or [1.0])
            axes[0].plot(bad, [top] * len(bad), "rx", label="inf/NaN")
        for ax, what in zip(axes, ["max relative error", "1 − cosine similarity"]):
            ax.set_yscale("log")
            ax.set_xlabel("depth (layer call)")
            ax.set_ylabel(what)
            if label is not None or bad:
                ax.legend(fontsize=8)
        return axes


def _fold_mapping(candidate: nn.Module) -> dict[str, str]:
    """``{layer: bn}`` for every pair a :func:`fusionlib.fx.fuse_conv_bn` model folded (its ``fusion_report``)."""
    report = getattr(candidate, "fusion_report", None)
    return {pair.layer: pair.bn for pair in getattr(report, "fused", [])}


def _layer_root(model: nn.Module) -> nn.Module:
    """The module whose names are ``model``'s layer names: ``model`` itself, or, for a wrapper that runs a
    model differently (``precision.AutocastModel``), the submodule its ``layer_names_from`` attribute names."""
    return model.get_submodule(getattr(model, "layer_names_from", ""))


def _check_not_shared(reference: nn.Module, candidate: nn.Module) -> None:
    """Refuse a candidate that shares module objects with the reference, naming the first one.

    A hook on a shared module fires in both passes, so every call would be compared with itself (error 0).
    """
    ref_names: dict[int, str] = {}
    for name, module in reference.named_modules(remove_duplicate=False):
        ref_names.setdefault(id(module), name or "<root>")
    shared = [(name or "<root>", ref_names[id(m)]) for name, m in candidate.named_modules()
              if id(m) in ref_names]
    if shared:
        cand_name, ref_name = shared[0]
        raise ValueError(
            f"The candidate shares {len(shared)} module object(s) with the reference, e.g. candidate '{cand_name}' "
            f"is reference '{ref_name}': every hook would fire in both passes and compare a layer with itself "
            "(error 0). Compare with a copy: build the candidate from copy.deepcopy(reference) (cast_model with "
            "inplace=False, precision.autocast_model).")


def _leaf_names(model: nn.Module) -> list[str]:
    """Names of the modules without children, in module order."""
    return [name for name, module in model.named_modules() if name and not any(True for _ in module.children())]


def _first_tensor(output: Any) -> torch.Tensor | None:
    leaves = [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]
    return leaves[0] if leaves else None


def _activation_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, bool]:
    """``(max_rel, cosine, finite)`` of the candidate ``b`` against the reference ``a``, in float64."""
    a64 = a.detach().to("cpu", torch.float64).reshape(-1)
    b64 = b.detach().to("cpu", torch.float64).reshape(-1)
    finite = bool(torch.isfinite(b64).all())
    _, max_rel = _leaf_errors("", a64, b64)
    if not finite:
        return max_rel, math.nan, False
    norms = float(a64.norm() * b64.norm())
    cosine = float(a64 @ b64) / norms if norms > 0 else (1.0 if float(a64.norm()) == float(b64.norm()) else 0.0)
    return max_rel, cosine, True


def layer_report(reference: nn.Module, candidate: nn.Module, inputs: Any, mapping: dict[str, str] | None = None,
                 rtol: float = 1e-4) -> LayerReport:
    """Run both models on ``inputs`` and compare every layer's activation, in the candidate's depth order.

    Layers are the reference's leaf modules (no children). A candidate module is compared with the
    reference layer of the same name, or with ``mapping[candidate_name]`` (a reference name) where a
    transform renamed it. For a model folded by :func:`fusionlib.fx.fuse_conv_bn` the mapping comes from
    its ``fusion_report``: a folded conv is compared with its BatchNorm's output, since that is what it now
    computes. Nothing is guessed: reference layers that no candidate layer of the same name (or mapped
    to them) reproduces, such as a folded BatchNorm, are listed in ``reference_only``; candidate leaves
    with no counterpart in ``candidate_only``.
    A module called several times (a shared ReLU) is compared call by call. A wrapper that runs a model
    differently and names its layers by the wrapped model's names (``layer_names_from``, as
    ``precision.AutocastModel`` has) is compared by those names. A candidate that shares module objects
    with the reference (``cast_model(..., inplace=True)``, ``AutocastModel(reference)``) raises
    ``ValueError`` naming one: every layer would be compared with itself.

    Per layer: max relative error (max |a − b| / max |a|) and cosine similarity, in float64; inf / NaN in
    the candidate's activation is flagged (``first_nonfinite`` names the layer). Both models run in eval
    mode under ``torch.inference_mode()``; hooks are removed and training flags restored afterwards.
    ``inputs``: one tensor or a tuple of positional arguments. ``rtol`` is the output check's tolerance.
    """
    for label, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{label} must be an nn.Module, got {type(model).__name__}")
    _check_not_shared(reference, candidate)
    reference_root, candidate_root = _layer_root(reference), _layer_root(candidate)  # names; forwards run the models
    folds = _fold_mapping(candidate_root)
    caller_mapping = dict(mapping or {})
    ref_modules, cand_modules = dict(reference_root.named_modules()), dict(candidate_root.named_modules())
    ref_layers, targets = _layer_targets(ref_modules, cand_modules, {**folds, **caller_mapping})
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    recorder = _ActivationRecorder(targets)
    handles = [ref_modules[name].register_forward_hook(recorder.save(name)) for name in ref_layers]
    handles += [cand_modules[name].register_forward_hook(recorder.compare(name)) for name in targets]
    try:
        with eval_mode(reference, candidate), torch.inference_mode():
            expected = reference(*args)
            actual = candidate(*args)
    finally:
        for handle in handles:
            handle.remove()
    # A reference layer without a counterpart: no candidate module of that name ran (a folded BatchNorm,
    # whether or not a stale module of that name is left behind), and the caller mapped nothing to it.
    # A folded BatchNorm is listed even though its folded conv is compared with its output.
    mapped_by_caller = {targets[name] for name in caller_mapping if name in targets}
    reference_only = [name for name in recorder.ran_reference
                      if name not in recorder.ran_candidate and name not in mapped_by_caller]
    candidate_only = [name for name in _leaf_names(candidate_root) if name not in targets]
    output = compare_outputs(expected, actual, rtol=rtol, name="output")
    mapped = {c: r for c, r in targets.items() if c != r}
    folded_into = {bn: layer for layer, bn in folds.items() if layer in recorder.ran_candidate}
    return LayerReport(recorder.layers, reference_only, candidate_only, output, mapped, folded_into)


def _layer_targets(ref_modules: dict[str, nn.Module], cand_modules: dict[str, nn.Module],
                   mapping: dict[str, str]) -> tuple[set[str], dict[str, str]]:
    """``(reference layers to record, candidate name -> reference name to compare with)``; a mapping
    naming a module either model lacks raises ``ValueError``."""
    for cand_name, ref_name in mapping.items():
        if ref_name not in ref_modules:
            raise ValueError(f"mapping[{cand_name!r}] = {ref_name!r}: the reference has no module named {ref_name!r}")
        if cand_name not in cand_modules:
            raise ValueError(f"mapping has key {cand_name!r}: the candidate has no module named {cand_name!r}")
    ref_layers = {name for name, m in ref_modules.items() if name and not list(m.children())} | set(mapping.values())
    targets = {name: mapping.get(name, name) for name in cand_modules
               if name and mapping.get(name, name) in ref_layers}
    return ref_layers, targets


class _ActivationRecorder:
    """Forward hooks for :func:`layer_report`: the reference's activations saved call by call, then each
    candidate call compared with the same call of its reference layer."""

    def __init__(self, targets: dict[str, str]) -> None:
        self.targets = targets
        self.saved: dict[str, list[torch.Tensor]] = {}
        self.ran_reference: list[str] = []
        self.ran_candidate: set[str] = set()
        self.calls: dict[str, int] = {}
        self.layers: list[LayerComparison] = []

    def save(self, name: str):
        def hook(module: nn.Module, _args: tuple, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                self.saved.setdefault(name, []).append(tensor.detach().clone())  # later inplace ops must not change it
                if name not in self.ran_reference:
                    self.ran_reference.append(name)
        return hook

    def compare(self, name: str):
        def hook(module: nn.Module, _args: tuple, output: Any) -> None:
            tensor = _first_tensor(output)
            self.ran_candidate.add(name)
            if tensor is None:
                return
            ref_name = self.targets[name]
            k = self.calls.get(name, 0)
            self.calls[name] = k + 1
            ref_calls = self.saved.get(ref_name, [])
            if k >= len(ref_calls) or ref_calls[k].shape != tensor.shape:
                return
            max_rel, cosine, finite = _activation_errors(ref_calls[k], tensor)
            label = name if k == 0 else f"{name} [{k + 1}]"
            self.layers.append(LayerComparison(len(self.layers), label, ref_name, type(module).__name__,
                                               max_rel, cosine, finite))
        return hook
