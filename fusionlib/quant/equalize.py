r"""Data-free weight fixes before quantization: cross-layer equalization, high-bias absorption, bias correction (notebook 17).

Nagel et al. 2019, "Data-Free Quantization through Weight Equalization and Bias Correction".

**Cross-layer equalization (CLE).** Two layers in a row, ``y = W2 · f(W1 x + b1) + b2``
with ``f`` positively homogeneous (``f(s·z) = s·f(z)`` for ``s > 0``: ReLU, identity,
leaky ReLU). For any positive ``s_i``, one per channel ``i`` between them::

    W1[i, ...] / s_i,   b1[i] / s_i,   W2[:, i, ...] · s_i      computes exactly the same function,

because ``f(z_i / s_i) · s_i = f(z_i)``. The per-channel weight ranges
``r1_i = max |W1[i, ...]|`` (output channel ``i`` of the first layer) and
``r2_i = max |W2[:, i, ...]|`` (input channel ``i`` of the second) become
``r1_i / s_i`` and ``r2_i · s_i``. The choice::

    s_i = sqrt(r1_i / r2_i)     =>     both ranges equal sqrt(r1_i · r2_i)

maximizes the product of the two layers' per-tensor precisions
(each channel's range over its tensor's largest range): it lifts the small
channels that a single per-tensor range would otherwise crush to a few levels.
A channel with a zero range keeps ``s_i = 1``. Chains (``conv -> conv -> conv``)
share layers, so :func:`cross_layer_equalization` sweeps every pair again
until ``max |s − 1| < tolerance`` or ``max_iterations``.

ReLU6 is not positively homogeneous (``ReLU6(s·x) ≠ s·ReLU6(x)``): as in the paper,
the library replaces ReLU6 by ReLU first (:func:`fold_and_swap_relu6`), and the
exactness gate compares with that model. (Per-channel clip thresholds ``6·s_i``
would keep CLE exact, but no int8 or ONNX kernel takes them.)

**High-bias absorption.** After CLE a channel may have a large bias. Where the
pre-activation ``z_i`` of a ReLU stays above ``c_i >= 0``,
``ReLU(z_i) = ReLU(z_i − c_i) + c_i``, and the constant ``c_i`` passes through
the next layer as ``W2 · c``::

    b1 <- b1 − c,    b2 <- b2 + Σ_{i,k} W2[:, i, k] · c_i,     c = max(0, β − n_sigma · |γ|)

with ``β``, ``γ`` the folded BatchNorm's shift and scale (the pre-activation is
taken as ``N(β, γ²)``). It is exact only where ``z_i >= c_i`` (and away from a
zero-padded border of the next conv): :func:`absorb_high_bias` is measured, never gated.

**Bias correction.** A quantized weight ``W̃ = W + ε`` shifts the mean output
of a layer: ``E[W̃x] − E[Wx] = ε · E[x]``. Subtracting that from the bias
removes the shift (:func:`bias_correction`), layer by layer in depth order::

    b <- b − Σ_{i,k} ε[:, i, k] · E[x_i]

* empirical (``batches`` given): ``E[conv(x̃, ε)]`` over the batches, with ``x̃``
  the layer's (quantized) input in the quantized model, earlier layers already corrected;
* analytic (``batches=None``): ``E[x_i]`` from the preceding folded BatchNorm
  through the ReLU, the mean of a clipped normal (:func:`clipped_normal_mean`)::

      E[max(0, z)] = β Φ(β/γ) + γ φ(β/γ),    z ~ N(β, γ²)

  and ``E[x_i] = β_i`` when no activation sits between. Layers whose input is
  not such a BatchNorm output (the stem, residual adds) are skipped with the reason.

**Which models.** :func:`cross_layer_equalization` takes a float model in eval
mode (never a quantized one) that torch.fx can trace and returns a
``GraphModule``. :func:`bias_correction` (and
:func:`fusionlib.quant.adaround.adaround`) take models built by
:func:`~fusionlib.quant.quantize_model` (``QuantConv*d`` / ``QuantLinear``
layers, weights quantized as they are stored); a ``prepare_qat`` graph
(``QATConvBn2d`` quantizes a BatchNorm-folded weight it computes on the fly) is
refused with the reason.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from fusionlib.fx.fusion import fuse_conv_bn
from fusionlib.fx.tracing import modules_by_name
from fusionlib.modules import require_eval_mode
from fusionlib.quant.modules import QuantMixin
from fusionlib.quant.ptq import quant_layers
from fusionlib.quant.qat import QATConv2d, QATConvBn2d, QATLinear

__all__ = [
    "BatchNormStats",
    "EqualizedPair",
    "SkippedLayer",
    "LayerInput",
    "EqualizationReport",
    "BiasCorrectionReport",
    "channel_ranges",
    "equalize_pair",
    "fold_and_swap_relu6",
    "cross_layer_equalization",
    "absorb_high_bias",
    "clipped_normal_mean",
    "bias_correction",
]

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: Modules that commute with a positive per-channel scale: f(s·x) = s·f(x).
HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)
HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.dropout)


# ---------------------------------------------------------------------- reports
@dataclass
class BatchNormStats:
    """The folded BatchNorm after ``layer``: its pre-activation is taken as ``N(beta, gamma²)`` per channel."""

    layer: str
    bn: str
    beta: torch.Tensor
    gamma: torch.Tensor


@dataclass
class EqualizedPair:
    """``first -> (activation) -> second``, with the ranges ``(r1, r2)`` before and after and the total scale ``s``."""

    first: str
    second: str
    activation: str
    ranges_before: tuple[torch.Tensor, torch.Tensor]
    ranges_after: tuple[torch.Tensor, torch.Tensor] | None = None
    scale: torch.Tensor | None = None

    def __str__(self) -> str:
        spread = lambda r: float(r.max() / r.clamp_min(1e-12).min())  # noqa: E731
        text = f"{self.first} -> {self.activation} -> {self.second}: range spread of the first {spread(self.ranges_before[0]):.1f}x"
        if self.ranges_after is not None:
            text += f" -> {spread(self.ranges_after[0]):.1f}x"
        return text


@dataclass
class SkippedLayer:
    """A layer that starts no equalized pair (or gets no correction), and why."""

    layer: str
    reason: str

    def __str__(self) -> str:
        return f"{self.layer}: {self.reason}"


@dataclass
class LayerInput:
    """What feeds ``layer``: the folded layer ``source`` through ``activation`` ("relu" / "identity"), or a ``reason`` why not."""

    layer: str
    source: str | None = None
    activation: str | None = None
    reason: str | None = None


@dataclass
class EqualizationReport:
    """What :func:`cross_layer_equalization` (and :func:`absorb_high_bias`) did; ``str()`` is a summary."""

    model_name: str
    pairs: list[EqualizedPair] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    batchnorm: dict[str, BatchNormStats] = field(default_factory=dict)
    inputs: dict[str, LayerInput] = field(default_factory=dict)
    relu6_replaced: list[str] = field(default_factory=list)
    iterations: int = 0
    last_change: float = float("nan")       #: max |s − 1| of the last sweep
    converged: bool = False
    absorbed: dict[str, torch.Tensor] = field(default_factory=dict)   #: first layer -> c moved to the next layer

    def __str__(self) -> str:
        lines = [f"EqualizationReport({self.model_name}): {len(self.pairs)} pair(s) equalized in {self.iterations} "
                 f"sweep(s) (last max|s-1| = {self.last_change:.2e}, "
                 f"{'converged' if self.converged else 'not converged'}); {len(self.relu6_replaced)} ReLU6 -> ReLU"]
        lines += [f"    {p}" for p in self.pairs[:6]] + ([f"    ... and {len(self.pairs) - 6} more"] if len(self.pairs) > 6 else [])
        if self.skipped:
            lines.append(f"  {len(self.skipped)} layer(s) start no pair:")
            lines += [f"    {s}" for s in self.skipped[:6]] + ([f"    ..."] if len(self.skipped) > 6 else [])
        if self.absorbed:
            lines.append(f"  high bias absorbed after {len(self.absorbed)} layer(s)")
        return "\n".join(lines)


@dataclass
class BiasCorrectionReport:
    """What :func:`bias_correction` did: per corrected layer the largest |correction|, and every layer skipped with its reason."""

    mode: str
    corrected: dict[str, float] = field(default_factory=dict)
    skipped: list[SkippedLayer] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"BiasCorrectionReport({self.mode}): {len(self.corrected)} layer(s) corrected, {len(self.skipped)} skipped"]
        lines += [f"    skipped {s}" for s in self.skipped[:6]]
        return "\n".join(lines)


# ---------------------------------------------------------------------- one pair
def _weight(layer: nn.Module, who: str) -> torch.Tensor:
    if not isinstance(layer, LAYER_TYPES):
        raise TypeError(f"{who} must be a Conv1d/2d/3d or Linear layer, got {type(layer).__name__}")
    return layer.weight


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def _per_input_channel(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``w`` [out, in/groups, ...] as rows per input channel: [in, out/groups · k] (input channel ``g·cpg + j``)."""
    out, cpg = w.shape[0], w.shape[1]
    return w.reshape(groups, out // groups, cpg, -1).permute(0, 2, 1, 3).reshape(groups * cpg, -1)


def _in_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _check_lined_up(first: nn.Module, second: nn.Module, names: tuple[str, str]) -> None:
    if _out_features(first) != _in_features(second):
        raise ValueError(f"channels do not line up: {names[0]} ({type(first).__name__}) has {_out_features(first)} output "
                         f"channels, {names[1]} ({type(second).__name__}) takes {_in_features(second)} input channels")


def channel_ranges(first: nn.Module, second: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r1, r2)``: ``r1_i = max |W1[i, ...]|`` and ``r2_i = max |W2[:, i, ...]|`` (grouped convs: the rows reading channel i)."""
    w1, w2 = _weight(first, "first").detach(), _weight(second, "second").detach()
    _check_lined_up(first, second, ("first", "second"))
    r1 = w1.abs().reshape(w1.shape[0], -1).amax(1)
    r2 = _per_input_channel(w2.abs(), _groups(second)).amax(1)
    return r1, r2


@torch.no_grad()
def equalize_pair(first: nn.Module, second: nn.Module, names: tuple[str, str] = ("first", "second")) -> torch.Tensor:
    """Equalize one pair in place and return ``s`` ([C]): ``W1[i] /= s_i``, ``b1[i] /= s_i``, ``W2[:, i] *= s_i``.

    ``s_i = sqrt(r1_i / r2_i)`` (:func:`channel_ranges`), 1 where either range is 0;
    computed in float64 and rounded once to the weights' dtype. Afterwards both
    ranges equal ``sqrt(r1_i · r2_i)``. Raises ``ValueError`` (naming both layers)
    when the first layer's output channels are not the second's input channels.
    """
    _weight(first, names[0]), _weight(second, names[1])
    _check_lined_up(first, second, names)
    r1, r2 = (r.double() for r in channel_ranges(first, second))
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-300)), torch.ones_like(r1))
    w1 = first.weight
    shape1 = (-1,) + (1,) * (w1.dim() - 1)
    w1.copy_((w1.double() / s.reshape(shape1)).to(w1.dtype))
    if first.bias is not None:
        first.bias.copy_((first.bias.double() / s).to(first.bias.dtype))
    w2, g = second.weight, _groups(second)
    out, cpg = w2.shape[0], w2.shape[1]
    scaled = w2.double().reshape(g, out // g, cpg, -1) * s.reshape(g, 1, cpg, 1)
    w2.copy_(scaled.reshape(w2.shape).to(w2.dtype))
    return s.to(torch.float32)


# ---------------------------------------------------------------------- the graph
def _module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return type(_module(node, modules)) in LAYER_TYPES


def _is_add(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add))
        or (node.op == "call_method" and node.target in ("add", "add_")))


def _is_relu(node: Any, modules: dict[str, nn.Module]) -> bool:
    return isinstance(node, fx.Node) and (type(_module(node, modules)) is nn.ReLU
                                          or (node.op == "call_function" and node.target in (F.relu, torch.relu))
                                          or (node.op == "call_method" and node.target in ("relu", "relu_")))


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Positively homogeneous and channel-wise: ReLU, leaky ReLU, identity, dropout (eval)."""
    m = _module(node, modules)
    if m is not None:
        return type(m) in HOMOGENEOUS_MODULES
    return node.op == "call_function" and node.target in HOMOGENEOUS_FUNCTIONS or (
        node.op == "call_method" and node.target in ("relu", "relu_"))


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    m = _module(node, modules)
    if m is not None:
        return f"{type(m).__name__} ({node.target})"
    return getattr(node.target, "__name__", str(node.target))


def fold_and_swap_relu6(model: nn.Module, inplace: bool = False) -> tuple[fx.GraphModule, list[str], dict[str, BatchNormStats]]:
    """The model CLE starts from: BatchNorm folded (:func:`fusionlib.fx.fuse_conv_bn`) and every ReLU6 replaced by ReLU.

    Returns ``(graph module, names of the ReLU6 replaced, {layer: BatchNormStats of the BN folded into it})``.
    The model must be in eval mode (folding uses the running statistics).
    """
    require_eval_mode(model, "cross_layer_equalization", "it folds BatchNorm with its running statistics")
    if any(isinstance(m, QuantMixin) for m in model.modules()):
        raise ValueError(f"cross_layer_equalization takes a float model; {type(model).__name__} already has quant layers: "
                         "equalize the float model, then quantize_model")
    original = dict(model.named_modules())
    gm = fuse_conv_bn(model, inplace=inplace)
    stats = {}
    for pair in gm.fusion_report.fused:
        bn = original.get(pair.bn)
        if pair.direction == "after" and bn is not None and bn.affine:
            stats[pair.layer] = BatchNormStats(pair.layer, pair.bn, bn.bias.detach().clone().float(),
                                               bn.weight.detach().clone().float())
    replaced = []
    modules = modules_by_name(gm)
    for node in gm.graph.nodes:
        if type(_module(node, modules)) is nn.ReLU6:
            gm.set_submodule(node.target, nn.ReLU().train(modules[node.target].training))
            replaced.append(node.target)
        elif node.op == "call_function" and node.target is F.relu6:
            node.target = F.relu
            node.kwargs = {k: v for k, v in node.kwargs.items() if k == "inplace"}
            replaced.append(node.name)
    gm.recompile()
    gm.eval()   # the containers fx creates start in training mode; the model was in eval mode
    return gm, replaced, stats


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def _find_pair(node: fx.Node, modules: dict[str, nn.Module], counts: dict[str, int]) -> tuple[fx.Node, str] | str:
    """The layer node after ``node`` through homogeneous ops, with the activation's name; else the reason why not."""
    if counts[node.target] > 1:
        return f"called at {counts[node.target]} places (a shared module)"
    current, activation = node, "none"
    while True:
        users = list(current.users)
        if not users:
            return "its output is the model's output"
        if len(users) > 1:
            readers = ", ".join(u.name for u in users)
            kind = "a residual add between the layers" if any(_is_add(u) for u in users) else "several readers"
            return f"{kind}: its output is read by {len(users)} nodes ({readers})"
        nxt = users[0]
        if nxt.op == "output":
            return "its output is the model's output"
        if _is_layer(nxt, modules):
            if counts[nxt.target] > 1:
                return f"the next layer {nxt.target} is called at {counts[nxt.target]} places"
            return nxt, activation
        if _is_add(nxt):
            return f"a residual add between the layers ({nxt.name})"
        if _is_passthrough(nxt, modules):
            activation = "relu" if _is_relu(nxt, modules) else (activation if activation != "none" else _describe(nxt, modules))
            current = nxt
            continue
        m = _module(nxt, modules)
        if m is not None and not isinstance(m, (nn.Dropout, nn.Identity)) and not list(m.parameters()) and \
                type(m).__module__.startswith("torch.nn.modules.activation"):
            return f"{type(m).__name__} is not positively homogeneous (f(s·x) ≠ s·f(x))"
        return f"{_describe(nxt, modules)} between the layers"


def _input_of(node: fx.Node, modules: dict[str, nn.Module], stats: dict[str, BatchNormStats]) -> LayerInput:
    """Where ``node``'s input comes from, for the analytic bias correction."""
    source = node.args[0] if node.args else None
    activation = "identity"
    if _is_relu(source, modules):
        activation, source = "relu", source.args[0]
    if not isinstance(source, fx.Node):
        return LayerInput(node.target, reason="its input is not a graph value")
    if source.op == "placeholder":
        return LayerInput(node.target, reason="its input is the model's input (no BatchNorm statistics)")
    if _is_add(source):
        return LayerInput(node.target, reason="its input is a residual add (no BatchNorm statistics)")
    if _is_layer(source, modules) and source.target in stats:
        return LayerInput(node.target, source=source.target, activation=activation)
    return LayerInput(node.target, reason=f"its input comes from {_describe(source, modules)}, not from BatchNorm (then ReLU)")


def cross_layer_equalization(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    inplace: bool = False,
    max_iterations: int = 20,
    tolerance: float = 1e-6,
) -> tuple[fx.GraphModule, EqualizationReport]:
    """Fold BatchNorm, swap ReLU6 for ReLU, and equalize every ``layer -> (ReLU) -> layer`` pair; see the module docstring.

    ``cross_layer_equalization(model, example_inputs, inplace=False, max_iterations=20, tolerance=1e-6)
    -> (GraphModule, EqualizationReport)``. Per sweep, every pair (graph order)
    gets ``s_i = sqrt(r1_i / r2_i)`` (:func:`equalize_pair`); sweeps stop when
    ``max |s − 1| < tolerance`` or after ``max_iterations`` (0: fold and swap only,
    the report still lists pairs, BatchNorm statistics and layer inputs). The report
    keeps each folded BatchNorm's ``β``, ``γ`` divided by the same ``s`` (the
    pre-activation is divided by it), for :func:`absorb_high_bias` and the analytic
    :func:`bias_correction`; the returned module carries it as ``equalization_report``.
    ``example_inputs`` (optional) are run once through the result as a smoke check.
    Pairs between which sit a residual add, a non-homogeneous activation or any
    other op are skipped with the reason. The result equals ``fold_and_swap_relu6(model)``
    up to float rounding. ``inplace=False`` never touches the caller's model.
    """
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"max_iterations must be an int >= 0, got {max_iterations!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    gm, replaced, stats = fold_and_swap_relu6(model, inplace=inplace)
    # a half-precision model is equalized in float32 and rounded back once, not at every sweep
    half = next((p.dtype for p in gm.parameters() if p.dtype in (torch.float16, torch.bfloat16)), None)
    if half is not None:
        gm.float()
    modules = modules_by_name(gm)
    counts = _call_counts(gm)
    report = EqualizationReport(type(model).__name__, batchnorm=stats, relu6_replaced=replaced)
    layer_nodes = [n for n in gm.graph.nodes if _is_layer(n, modules)]
    for node in layer_nodes:
        report.inputs[node.target] = _input_of(node, modules, stats)
        found = _find_pair(node, modules, counts)
        if isinstance(found, str):
            report.skipped.append(SkippedLayer(node.target, found))
            continue
        nxt, activation = found
        first, second = modules[node.target], modules[nxt.target]
        if _out_features(first) != _in_features(second):
            report.skipped.append(SkippedLayer(node.target, f"channels do not line up with {nxt.target}"))
            continue
        if isinstance(first, nn.Linear) != isinstance(second, nn.Linear):
            report.skipped.append(SkippedLayer(node.target, f"{type(first).__name__} -> {type(second).__name__}: "
                                               "channels do not line up one to one"))
            continue
        report.pairs.append(EqualizedPair(node.target, nxt.target, activation, channel_ranges(first, second)))
    total = {p.first: torch.ones(_out_features(modules[p.first]), device=modules[p.first].weight.device)
             for p in report.pairs}
    for sweep in range(max_iterations):
        change = 0.0
        for p in report.pairs:
            s = equalize_pair(modules[p.first], modules[p.second], (p.first, p.second))
            total[p.first] *= s
            change = max(change, float((s - 1).abs().max()))
        report.iterations, report.last_change = sweep + 1, change
        if change < tolerance:
            report.converged = True
            break
    for p in report.pairs:
        p.ranges_after, p.scale = channel_ranges(modules[p.first], modules[p.second]), total[p.first]
        if p.first in stats:
            st = stats[p.first]
            stats[p.first] = BatchNormStats(st.layer, st.bn, st.beta / p.scale, st.gamma / p.scale)
    if half is not None:
        gm.to(half)
    gm.equalization_report = report
    if example_inputs is not None:
        with torch.no_grad():
            gm(*(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
    return gm, report


# ---------------------------------------------------------------------- high-bias absorption
@torch.no_grad()
def absorb_high_bias(model: fx.GraphModule, report: EqualizationReport, n_sigma: float = 3.0,
                     inplace: bool = False) -> tuple[fx.GraphModule, EqualizationReport]:
    """Move ``c = max(0, β − n_sigma·|γ|)`` from each equalized pair's first bias into the second, through the ReLU.

    ``absorb_high_bias(model, report, n_sigma=3) -> (model, report)``:
    ``b1 <- b1 − c``, ``b2 <- b2 + Σ_{i,k} W2[:, i, k]·c_i`` for pairs with a ReLU
    (or no activation) between them whose first layer has BatchNorm statistics;
    ``β`` of the report drops by ``c``. Exact only where the pre-activation stays
    above ``c`` and away from the second conv's zero padding: measure its error.
    ``inplace=False`` works on copies of the model and the report.
    """
    if not n_sigma >= 0:
        raise ValueError(f"n_sigma must be >= 0, got {n_sigma!r}")
    if not inplace:
        model, report = copy.deepcopy(model), copy.deepcopy(report)
    modules = dict(model.named_modules())
    for p in report.pairs:
        st = report.batchnorm.get(p.first)
        if st is None or p.activation not in ("relu", "none"):
            continue
        c = (st.beta - n_sigma * st.gamma.abs()).clamp_min(0)
        if not bool((c > 0).any()):
            continue
        first, second = modules[p.first], modules[p.second]
        if first.bias is None:
            continue
        w2 = second.weight.double()
        flow = _per_input_channel(w2, _groups(second))            # [in, out/g · k]
        g, out = _groups(second), w2.shape[0]
        k = flow.shape[1] // (out // g)
        per_out = (flow.reshape(-1, out // g, k).sum(2) * c.double()[:, None])   # [in, out/g]
        per_out = per_out.reshape(g, -1, out // g).sum(1).reshape(out)
        if second.bias is None:
            second.bias = nn.Parameter(torch.zeros(out, dtype=second.weight.dtype))
        second.bias.copy_((second.bias.double() + per_out).to(second.bias.dtype))
        first.bias.copy_((first.bias.double() - c.double()).to(first.bias.dtype))
        report.batchnorm[p.first] = BatchNormStats(st.layer, st.bn, st.beta - c, st.gamma)
        report.absorbed[p.first] = c
    model.equalization_report = report
    return model, report


# ---------------------------------------------------------------------- bias correction
def clipped_normal_mean(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``E[max(0, z)]`` for ``z ~ N(mu, sigma²)``: ``mu·Φ(mu/sigma) + sigma·φ(mu/sigma)`` (``max(0, mu)`` where sigma = 0)."""
    mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64).abs()
    safe = sigma.clamp_min(1e-30)
    t = mu / safe
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    return torch.where(sigma > 0, mu * cdf + sigma * pdf, mu.clamp_min(0))


def _check_quant_layers(model: nn.Module, what: str) -> dict[str, nn.Module]:
    """The quant layers with an enabled, calibrated weight quantizer; prepare_qat layers refused."""
    layers = quant_layers(model)
    qat = [n for n, m in layers.items() if isinstance(m, (QATConvBn2d, QATConv2d, QATLinear))]
    if qat:
        raise ValueError(f"{what} takes models built by quantize_model; {qat[:3]} ({type(layers[qat[0]]).__name__}) "
                         "come from prepare_qat, whose weight is folded on the fly: export_folded(model) first")
    chosen = {n: m for n, m in layers.items() if "weight_quantizer" in m.quantizer_names and not m.weight_quantizer.disabled}
    if not chosen:
        raise ValueError(f"{what}: {type(model).__name__} has no quant layer with an enabled weight quantizer "
                         "(build it with quant.quantize_model)")
    missing = [n for n, m in chosen.items() if m.weight_quantizer.amax is None]
    if missing:
        raise ValueError(f"{what}: the weight quantizers of {missing[:3]} have no amax; calibrate first "
                         "(quant.calibrate_weights(model, 'max') needs no data)")
    return chosen


def _check_batches(batches: Iterable[Any] | None, what: str) -> list[torch.Tensor] | None:
    if batches is None:
        return None
    out = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not out:
        raise ValueError(f"{what}: batches is empty; pass at least one batch of inputs (or None for the analytic correction)")
    return out


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def layer_inputs(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """What ``layer`` receives (its raw input) when ``model`` runs each batch; the forward stops at the layer."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0].detach())
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(seen) != len(batches):
        raise ValueError(f"the layer {type(layer).__name__} is not called by {type(model).__name__}.forward")
    return seen


def execution_order(model: nn.Module, names: Iterable[str], batch: torch.Tensor) -> list[str]:
    """``names`` (layers of ``model``) sorted by when forward first calls them on ``batch``."""
    names = list(names)
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            model(batch[:1])
    finally:
        for h in handles:
            h.remove()
    first = list(dict.fromkeys(order))
    return first + [n for n in names if n not in first]


def _layer_op(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


def _reduce_dims(y: torch.Tensor) -> tuple[int, ...]:
    return tuple(d for d in range(y.dim()) if d != 1) if y.dim() > 2 else (0,)


def _require_eval(model: nn.Module, name: str, what: str) -> None:
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"{what}: {name} is in training mode ({training[:3]}); call .eval() first")


@torch.no_grad()
def bias_correction(quant_model: nn.Module, float_model: nn.Module,
                    batches: Iterable[Any] | None = None) -> BiasCorrectionReport:
    """Subtract each quantized layer's expected output shift ``ε·E[x]`` from its bias, in depth order; see the module docstring.

    ``bias_correction(quant_model, float_model, batches=None) -> BiasCorrectionReport``,
    in place on ``quant_model`` (a :func:`quantize_model` copy of ``float_model``
    with calibrated weight quantizers; ``ε = weight_quantizer(W) − W``).
    Empirical when ``batches`` is given (inputs, or ``(inputs, labels)``): the mean of
    ``conv(x̃, ε)`` per output channel, ``x̃`` the layer's quantized input with the
    earlier layers already corrected. Analytic when ``batches=None``: ``E[x]`` from
    ``float_model.equalization_report`` (the model :func:`cross_layer_equalization`
    returns; ``max_iterations=0`` folds without equalizing), the stem and layers
    after residual adds skipped. A layer without a bias gets one.
    """
    _require_eval(quant_model, "quant_model", "bias_correction")
    _require_eval(float_model, "float_model", "bias_correction")
    layers = _check_quant_layers(quant_model, "bias_correction")
    data = _check_batches(batches, "bias_correction")
    report = BiasCorrectionReport("empirical" if data is not None else "analytic")
    eq = getattr(float_model, "equalization_report", None)
    if data is None and eq is None:
        raise ValueError("analytic bias_correction (batches=None) needs the BatchNorm statistics: pass as float_model "
                         "the model cross_layer_equalization returned (max_iterations=0 folds BatchNorm without "
                         "equalizing), or pass batches for the empirical correction")
    order = execution_order(quant_model, layers, data[0]) if data is not None else list(layers)
    for name in order:
        layer = layers[name]
        w = layer.weight
        eps = layer.weight_quantizer(w.detach()) - w.detach()
        if data is not None:
            xs = [layer.input_quantizer(x) for x in layer_inputs(quant_model, layer, data)]
            total, count = torch.zeros(eps.shape[0], dtype=torch.float64), 0
            for x in xs:
                y = _layer_op(layer, x, eps, None)
                total, count = total + y.double().sum(_reduce_dims(y)).cpu(), count + y.numel() // y.shape[1]
            shift = total / count
        else:
            source = eq.inputs.get(name)
            if source is None or source.reason is not None:
                report.skipped.append(SkippedLayer(name, source.reason if source else "not in the equalization report"))
                continue
            st = eq.batchnorm[source.source]
            mean = clipped_normal_mean(st.beta, st.gamma) if source.activation == "relu" else st.beta.double()
            g = _groups(layer)
            per_in = eps.double().reshape(eps.shape[0], eps.shape[1], -1).sum(2)        # [out, in/g]
            out = eps.shape[0]
            shift = (per_in.reshape(g, out // g, -1) * mean.reshape(g, 1, -1)).sum(2).reshape(out)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        layer.bias.copy_((layer.bias.double() - shift.to(layer.bias.device)).to(layer.bias.dtype))
        report.corrected[name] = float(shift.abs().max())
    return report
