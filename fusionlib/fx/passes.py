"""Graph passes: rewrite ops, drop no-ops, and a small optimize-for-inference pipeline.

A *pass* takes a ``torch.fx.GraphModule``, rewrites its graph in place and returns a
one-line summary of what it changed. :func:`optimize_for_inference` runs a list of them on
a traced copy of a model, then checks the result against the eager model:

==================  ==============================================================
``fold_batchnorm``  Conv/Linear + BatchNorm -> one layer (:func:`fuse_conv_bn`)
``remove_dropout``  Dropout modules / ``F.dropout(training=False)`` / eval-mode
                    stochastic depth -> their input (they are identities in eval)
``remove_identity`` ``nn.Identity`` modules -> their input
``mkldnn``          run conv regions on MKLDNN tensors (:func:`~fusionlib.fx.layout.to_mkldnn`;
                    private torch ops, see there)
``channels_last``   NHWC activations and weights (:func:`~fusionlib.fx.layout.to_channels_last`)
``auto_layout``     one of the two by a static rule, nothing timed
                    (:func:`~fusionlib.fx.layout.choose_layout`)
``timed_layout``    the faster of the two *measured* on the example inputs (opt-in: the
                    result depends on the machine and its load at that moment)
==================  ==============================================================

:data:`DEFAULT_PASSES` ends with ``channels_last``: deterministic (the same graph on every
run and machine), public torch ops only, and as fast as the timed choice on ResNet18 and
MobileNetV2 (which picked channels-last in most runs anyway). ``passes=`` takes names or
your own ``fn(gm) -> str`` callables, so each pass's share of the speed-up can be measured
one by one.
"""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fusionlib.display import format_table
from fusionlib.fx.fusion import fuse_conv_bn
from fusionlib.fx.layout import choose_layout, propagate_shapes, to_channels_last, to_mkldnn
from fusionlib.fx.tracing import callable_name, modules_by_name, symbolic_trace
from fusionlib.modules import require_eval_mode, set_submodule
from fusionlib.verify import compare_outputs

__all__ = [
    "replace_ops",
    "fold_batchnorm",
    "remove_dropout",
    "remove_identity",
    "PASSES",
    "DEFAULT_PASSES",
    "PassStep",
    "OptimizationReport",
    "optimize_for_inference",
    "max_relative_error",
    "timed_layout",
]


# --------------------------------------------------------------------------- replace_ops

def _tensor_method_name(fn: Any) -> str | None:
    """``"add"`` for ``torch.Tensor.add`` (a method of Tensor), else ``None``."""
    owner = getattr(fn, "__objclass__", None)
    if owner is not None and isinstance(owner, type) and issubclass(owner, torch._C.TensorBase):
        return fn.__name__
    if getattr(torch.Tensor, getattr(fn, "__name__", ""), None) is fn:  # Python-level Tensor methods
        return fn.__name__
    return None


def _new_module(replacement: Any, old: nn.Module) -> nn.Module:
    if isinstance(replacement, type) and issubclass(replacement, nn.Module):
        return replacement()
    if isinstance(replacement, nn.Module):
        return copy.deepcopy(replacement)
    if callable(replacement):
        new = replacement(old)
        if isinstance(new, nn.Module):
            return new
    raise TypeError(f"replace_ops: the replacement for a {type(old).__name__} module must be an nn.Module "
                    f"class, an nn.Module, or a factory old_module -> nn.Module; got {replacement!r}")


def _retarget_call(node: fx.Node, replacement: Any) -> None:
    """Point a call_function / call_method node at ``replacement`` (a function or a method name)."""
    method = replacement if isinstance(replacement, str) else _tensor_method_name(replacement)
    if method is not None:
        node.op, node.target = "call_method", method  # args[0] becomes ``self``
    elif callable(replacement):
        node.op, node.target = "call_function", replacement
    else:
        raise TypeError(f"replace_ops: the replacement for node '{node.name}' must be a function or a "
                        f"method name, got {replacement!r}")


def replace_ops(gm: fx.GraphModule | nn.Module, mapping: Mapping[Any, Any], inplace: bool = False
                ) -> tuple[fx.GraphModule, int]:
    """Rewrite call targets by ``mapping``; return ``(graph_module, number_of_nodes_changed)``.

    Keys select nodes, values say what they call instead:

    * a function (``operator.add``, ``torch.add``) -> ``call_function`` nodes calling it;
    * a method name (``"add"``) or a Tensor method (``torch.Tensor.add``) -> ``call_method``
      nodes of that name (a Tensor method also matches ``call_function`` nodes calling it);
    * an ``nn.Module`` class -> ``call_module`` nodes running an instance of it; the value is
      a module class (built with no arguments), a module (copied) or a factory
      ``old_module -> new_module``.

    Values for function / method keys may be functions or method names
    (``{operator.add: operator.mul, torch.add: torch.mul, "add": "mul"}``). Arguments are kept
    as they are: the new target must accept them. A plain ``nn.Module`` is traced first;
    ``inplace=False`` rewrites a copy of a GraphModule. The graph is linted and recompiled.
    """
    if isinstance(gm, fx.GraphModule):
        gm = gm if inplace else copy.deepcopy(gm)
    else:
        gm = symbolic_trace(gm if inplace else copy.deepcopy(gm))
    functions: dict[Any, Any] = {}
    methods: dict[str, Any] = {}
    module_types: dict[type, Any] = {}
    for key, value in mapping.items():
        if isinstance(key, str):
            methods[key] = value
        elif isinstance(key, type) and issubclass(key, nn.Module):
            module_types[key] = value
        elif _tensor_method_name(key) is not None:
            methods[_tensor_method_name(key)] = value
            functions[key] = value
        elif callable(key):
            functions[key] = value
        else:
            raise TypeError(f"replace_ops: mapping key {key!r} is neither a function, a method name "
                            "nor an nn.Module class")
    for key, value in [*functions.items(), *methods.items()]:
        if not (isinstance(value, str) or callable(value)):
            raise TypeError(f"replace_ops: the replacement for {callable_name(key)} must be a function or "
                            f"a method name, got {value!r}")
    modules = modules_by_name(gm)
    # 1. build every new module first: a failing factory leaves the graph as it was
    replaced_modules = {n.target: _new_module(module_types[type(modules[n.target])], modules[n.target])
                        for n in gm.graph.nodes
                        if n.op == "call_module" and type(modules[n.target]) in module_types}
    # 2. rewrite
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in functions:
            _retarget_call(node, functions[node.target])
        elif node.op == "call_method" and node.target in methods:
            _retarget_call(node, methods[node.target])
        elif not (node.op == "call_module" and node.target in replaced_modules):
            continue
        changed += 1
    for name, new in replaced_modules.items():  # a shared module is replaced once, for all its calls
        set_submodule(gm, name, new)
    gm.graph.lint()
    gm.recompile()
    return gm, changed


# --------------------------------------------------------------------------- removing no-ops

_DROPOUT_FUNCTIONS = {  # function -> (position, name) of its "training" argument
    F.dropout: (2, "training"), F.dropout1d: (2, "training"), F.dropout2d: (2, "training"),
    F.dropout3d: (2, "training"), F.alpha_dropout: (2, "training"),
    F.feature_alpha_dropout: (2, "training"), torch.dropout: (2, "train"),
}


def _argument(node: fx.Node, position: int, name: str, default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _is_eval_dropout(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A dropout-like node that returns its input: eval-mode module, or ``training=False``."""
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.modules.dropout._DropoutNd) and not m.training
    if node.op != "call_function":
        return False
    if node.target in _DROPOUT_FUNCTIONS:
        position, name = _DROPOUT_FUNCTIONS[node.target]
        return _argument(node, position, name, True) is False
    is_stochastic_depth = (getattr(node.target, "__name__", "") == "stochastic_depth"
                           and getattr(node.target, "__module__", "").startswith("torchvision"))
    return is_stochastic_depth and _argument(node, 3, "training", True) is False


def _bypass(gm: fx.GraphModule, should_bypass: Callable[[fx.Node], bool]) -> int:
    """Replace each selected node by its first argument; return how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if should_bypass(node) and node.args and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return removed


def remove_dropout(gm: fx.GraphModule) -> str:
    """Dropout in eval mode is the identity: ``dropout(x) = x``; remove those nodes (in place)."""
    modules = modules_by_name(gm)
    removed = _bypass(gm, lambda n: _is_eval_dropout(n, modules))
    return f"removed {removed} dropout node(s)"


def remove_identity(gm: fx.GraphModule) -> str:
    """``nn.Identity()(x) = x``: remove those nodes (in place)."""
    modules = modules_by_name(gm)
    removed = _bypass(gm, lambda n: n.op == "call_module" and type(modules[n.target]) is nn.Identity
                      and len(n.args) == 1 and not n.kwargs)
    return f"removed {removed} Identity node(s)"


def fold_batchnorm(gm: fx.GraphModule) -> str:
    """:func:`fusionlib.fx.fuse_conv_bn` as a pass (in place)."""
    report = fuse_conv_bn(gm, inplace=True).fusion_report
    return (f"folded {report.num_fused} Conv/Linear+BatchNorm pair(s); "
            f"{report.batchnorm_calls_after} BatchNorm call(s) left")


def timed_layout(gm: fx.GraphModule, example_inputs: Sequence[Any] | torch.Tensor | None = None) -> str:
    """:func:`~fusionlib.fx.layout.choose_layout` with ``timed=True``: measure, keep the fastest (in place)."""
    return choose_layout(gm, example_inputs, timed=True)


#: Passes by name. "mkldnn", "auto_layout" and "timed_layout" get the example inputs
#: (shapes; timing) bound in optimize_for_inference.
PASSES: dict[str, Callable[[fx.GraphModule], str]] = {
    "fold_batchnorm": fold_batchnorm,
    "remove_dropout": remove_dropout,
    "remove_identity": remove_identity,
    "mkldnn": to_mkldnn,
    "channels_last": to_channels_last,
    "auto_layout": choose_layout,
    "timed_layout": timed_layout,
}
#: Deterministic: no pass here times anything, so the graph does not depend on timing noise.
DEFAULT_PASSES: tuple[str, ...] = ("fold_batchnorm", "remove_dropout", "remove_identity", "channels_last")
_NEEDS_INPUTS = {"mkldnn", "auto_layout", "timed_layout"}


# --------------------------------------------------------------------------- the pipeline

@dataclass
class PassStep:
    name: str
    summary: str
    seconds: float


@dataclass
class OptimizationReport:
    """What each pass did, how long it took, and the measured error against eager."""

    model_name: str
    steps: list[PassStep] = field(default_factory=list)
    max_rel_error: float | None = None
    rtol: float = 1e-4

    def __str__(self) -> str:
        rows = [[s.name, s.seconds * 1e3, s.summary] for s in self.steps]
        table = format_table(["pass", "ms", "what it did"], rows, floatfmt=("", ".1f", ""),
                             colalign=("left", "right", "left"), maxcolwidths=[None, None, 90])
        lines = [f"optimize_for_inference({self.model_name}):"]
        lines += [f"  {line}".rstrip() for line in table.splitlines()]
        if self.max_rel_error is not None:
            lines.append(f"  check vs eager: max rel error {self.max_rel_error:.2e} (tol {self.rtol:.0e})")
        else:
            lines.append("  check vs eager: not run (no example_inputs)")
        return "\n".join(lines)


def max_relative_error(reference: Any, candidate: Any) -> float:
    """``max|a − b| / max|a|`` of the worst tensor of two (nested) outputs (:func:`fusionlib.verify.compare_outputs`)."""
    return compare_outputs(reference, candidate).max_rel


def _resolve_pass(p: str | Callable[[fx.GraphModule], Any], example_inputs: tuple[Any, ...] | None
                  ) -> tuple[str, Callable[[fx.GraphModule], Any]]:
    if callable(p):
        return getattr(p, "__name__", callable_name(p)), p
    if p not in PASSES:
        raise ValueError(f"unknown pass {p!r}; choose from {sorted(PASSES)} or pass a callable fn(gm) -> str")
    if p == "timed_layout" and example_inputs is None:
        raise ValueError("pass 'timed_layout' times the layouts on example_inputs: give "
                         "optimize_for_inference(model, example_inputs, ...), or use the static 'auto_layout'")
    if p in _NEEDS_INPUTS and example_inputs is not None:
        return p, functools.partial(PASSES[p], example_inputs=example_inputs)
    return p, PASSES[p]


def optimize_for_inference(model: nn.Module,
                           example_inputs: Sequence[Any] | torch.Tensor | None = None,
                           passes: Sequence[str | Callable[[fx.GraphModule], Any]] = DEFAULT_PASSES,
                           *, inplace: bool = False, check: bool = True, rtol: float = 1e-4,
                           **trace_kwargs: Any) -> fx.GraphModule:
    """Trace ``model`` (eval mode) and run ``passes`` on the graph; ``gm.optimization_report`` says what each did.

    ``passes`` defaults to :data:`DEFAULT_PASSES` (fold BatchNorm, drop Dropout / Identity,
    channels-last): the same graph on every run. ``example_inputs`` (a tensor or a tuple of
    arguments) are optional; with them, shapes are propagated (a Linear -> BatchNorm1d pair
    folds only on 2-D outputs, residual adds of equal shapes may join MKLDNN regions), the
    opt-in ``timed_layout`` pass times its candidates on them, and with ``check=True`` the
    result is compared to ``model(*example_inputs)``: a max relative error above ``rtol``
    raises ``RuntimeError``. The model is deep-copied unless ``inplace=True``.
    """
    require_eval_mode(model, "optimize_for_inference", "it folds BatchNorm's running statistics and "
                      "drops Dropout, which is what they do in eval mode only")
    inputs = None
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    resolved = [_resolve_pass(p, inputs) for p in passes]  # bad names fail before any work
    reference = None
    if inputs is not None and check:
        with torch.no_grad():
            reference = model(*inputs)
    source = model if inplace else copy.deepcopy(model)
    gm = source if isinstance(source, fx.GraphModule) else symbolic_trace(source, **trace_kwargs)
    report = OptimizationReport(type(model).__name__, rtol=rtol)
    if inputs is not None:
        propagate_shapes(gm, inputs)
    for name, run_pass in resolved:
        start = time.perf_counter()
        summary = run_pass(gm)
        report.steps.append(PassStep(name, str(summary) if summary is not None else "", time.perf_counter() - start))
    if reference is not None:
        with torch.no_grad():
            report.max_rel_error = max_relative_error(reference, gm(*inputs))
        if not report.max_rel_error <= rtol:
            raise RuntimeError(f"optimize_for_inference changed the output of {report.model_name}: max relative "
                               f"error {report.max_rel_error:.3e} > rtol {rtol:.0e} after passes "
                               f"{[s.name for s in report.steps]}.\n{report}")
    gm.optimization_report = report
    return gm
