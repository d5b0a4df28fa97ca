r"""Conv -> BatchNorm (-> ReLU) fusion for models torch.fx cannot trace (notebook 14).

Detection models (``fasterrcnn_*``) iterate over lists of images and branch on
their sizes, so ``torch.fx`` stops with "Proxy object cannot be iterated", and
the only route left is :func:`fusionlib.fusion.fuse_modules` with name lists
written by hand. :func:`auto_fuse` writes the lists from one *real* forward
pass on example inputs:

1. **Record the dataflow.** A forward pre-hook and a forward hook on every
   module record which tensors each module call reads and returns; a
   ``TorchFunctionMode`` sees every torch function and tensor method, so it
   also catches the functional uses that hooks miss (``y = conv(x);
   z = bn(y) + y``, a reader of ``conv.weight``). Each use is stamped with the
   module calls running at that moment.
2. **Pick the groups.** A BatchNorm (or FrozenBatchNorm2d) call whose input is
   the output of a conv / linear call is a candidate ``[conv, bn]`` when that
   output has no consumer other than the BatchNorm (uses inside the
   BatchNorm's own call are its own), both modules ran once and have one name,
   nothing outside their calls read their parameters or buffers, and fusion
   keeps their hooks: the conv's forward pre-hooks and the group's last
   module's forward hooks move to the fused module (the hook policy,
   :func:`fusionlib.modules.carry_forward_hooks`); any other hook (a forward
   hook on the conv reads an output that no longer exists) leaves the group
   unfused, named in the report. ``[conv, bn, relu]`` when the BatchNorm output likewise goes only
   to an ``nn.ReLU``. Folding is the usual ``W' = W·γ/√(σ²+ε)``,
   ``b' = (b−μ)·γ/√(σ²+ε) + β`` (:mod:`fusionlib.folding`).
3. **Fuse and verify.** :func:`~fusionlib.fusion.fuse_modules` fuses every
   group; the fused model runs on the same inputs and its outputs are compared
   with the original ones (:func:`fusionlib.verify.compare_outputs`). If they
   differ, each group is tried alone, the ones that change the outputs are
   undone and reported, and the rest is verified again. The check runs on a
   float64 copy of both models: there the fold is exact to ~1e-16, so an
   output that is discontinuous in its inputs (a detector's NMS, top-k and
   score threshold) cannot flip on rounding, while a wrong fold still shows.
   The float32 rounding of the folded weights is the usual half-ulp of
   :mod:`fusionlib.folding`; ``report.as_run`` compares the returned model as
   it runs, for information.

What this does *not* prove: the recorded dataflow is **one control-flow path**,
the one these example inputs took; verification covers **these inputs only**.
A branch the inputs did not take may read a conv's output elsewhere. BatchNorms
that did not run are reported as "not called". torch considered and rejected
such a helper (pytorch PR 51557) because dataflow seen on one run is unsound
without a check; the verification step is what makes it safe to offer here,
and the report states its limits.

Refused: a model with modules in training mode (BatchNorm would normalize
with batch statistics and dropout is random, while folding uses the running
statistics), and a model whose two runs on the same inputs differ (nothing
could be verified). Every intermediate tensor of the recorded run is kept
alive until the end of the recording: use small example inputs.
"""
from __future__ import annotations

import copy
import math
import inspect
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from fusionlib.folding import FusionError, is_batchnorm, stock_forward_base
from fusionlib.fusion import UnsupportedFusionError, fuse_modules, get_fuser_method
from fusionlib.fx.fusion import BatchNormFoldReport, FusedPair, SkippedBatchNorm
from fusionlib.modules import HOOK_KINDS, hook_names, set_submodule
from fusionlib.verify import Comparison, compare_outputs

__all__ = ["auto_fuse", "AutoFuseReport", "AutoFuseError", "record_dataflow"]


class AutoFuseError(ValueError):
    """:func:`auto_fuse` cannot work on this model / these inputs; the message says why and what to do."""


# --------------------------------------------------------------------------- recording

@dataclass
class _Call:
    """One module call of the recorded forward."""

    index: int
    module: nn.Module
    name: str
    inputs: list[torch.Tensor]
    start: int  #: event counter at the pre-hook
    parents: tuple[int, ...] = ()  #: indices of the module calls this one runs inside
    end: int = -1  #: event counter at the forward hook
    outputs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Use:
    """A read of a tensor: by a module call (``callee``) or by a torch function (``what``)."""

    seq: int
    context: tuple[int, ...]  #: indices of the module calls running at that moment
    callee: int | None = None
    what: str = ""


# Reading these tells nothing about a tensor's values: not a consumer.
_METADATA = {"size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
             "__len__", "shape", "dtype", "device", "ndim", "is_contiguous", "stride", "element_size",
             "requires_grad", "is_sparse", "layout", "data_ptr", "get_device", "is_cuda", "__format__"}


def _function_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a property such as Tensor.shape
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name or repr(func)


class Dataflow(TorchFunctionMode):
    """The dataflow of one forward pass: module calls, and every use of every tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = {id(m): name for name, m in model.named_modules()}
        self.calls: list[_Call] = []
        self.uses: dict[int, list[_Use]] = defaultdict(list)
        self.produced_by_call: dict[int, int] = {}
        self.produced_by_function: dict[int, str] = {}
        self.calls_of: dict[int, list[int]] = defaultdict(list)
        self._stack: list[int] = []
        self._seq = 0
        self._alive: list[Any] = []  # keeps every recorded tensor alive, so ids stay unique
        self._handles: list[Any] = []

    # events ---------------------------------------------------------------
    def _tick(self) -> int:
        self._seq += 1
        return self._seq

    def _use(self, tensor: torch.Tensor, **kwargs: Any) -> None:
        self._alive.append(tensor)
        self.uses[id(tensor)].append(_Use(self._tick(), tuple(self._stack), **kwargs))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        kwargs = kwargs or {}
        name = _function_name(func)
        if name not in _METADATA:
            for leaf in tree_flatten((args, kwargs))[0]:
                if isinstance(leaf, torch.Tensor):
                    self._use(leaf, what=name)
        out = func(*args, **kwargs)
        if name not in _METADATA:
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor) and id(leaf) not in self.produced_by_function:
                    self._alive.append(leaf)
                    self.produced_by_function[id(leaf)] = name
        return out

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        index = len(self.calls)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        for t in tensors:
            self._use(t, callee=index, what=type(module).__name__)
        self.calls.append(_Call(index, module, self.names.get(id(module), "?"), tensors, self._tick(),
                                tuple(self._stack)))
        self.calls_of[id(module)].append(index)
        self._stack.append(index)

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._stack:
            return
        call = self.calls[self._stack.pop()]
        call.end = self._tick()
        call.outputs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        for t in call.outputs:
            self._alive.append(t)
            self.produced_by_call.setdefault(id(t), call.index)  # the innermost module that returned it
        if module is self.model:  # the model's output is read by the caller: a use outside every call
            for t in call.outputs:
                self.uses[id(t)].append(_Use(self._tick(), (), None, "the model's output"))

    # running --------------------------------------------------------------
    def run(self, args: tuple[Any, ...]) -> Any:
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._hook, always_call=True))
        try:
            with torch.no_grad(), self:
                return self.model(*args)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._stack.clear()

    # questions ------------------------------------------------------------
    def other_consumers(self, tensor: torch.Tensor, consumer: _Call, after: int | None = None) -> list[str]:
        """Uses of ``tensor`` other than the call ``consumer`` (and what runs inside it).

        ``after``: uses later than this event are allowed (the tensor was changed in place
        by ``consumer`` and is its output from then on).
        """
        others = []
        for use in self.uses.get(id(tensor), []):
            if use.callee == consumer.index or consumer.index in use.context:
                continue
            if after is not None and use.seq > after:
                continue
            if use.callee is not None and use.callee in consumer.parents:
                continue  # handed to a container that passes it on to ``consumer``
            if use.callee is not None:
                others.append(f"'{self.calls[use.callee].name}' ({use.what})")
            else:
                inside = f" in '{self.calls[use.context[-1]].name}'" if use.context else ""
                others.append(f"{use.what}{inside}")
        return list(dict.fromkeys(others))

    def outside_readers(self, module: nn.Module) -> list[str]:
        """Uses of ``module``'s parameters / buffers outside its own calls."""
        own = set(self.calls_of.get(id(module), []))
        readers = []
        for t in [*module.parameters(), *module.buffers()]:
            for use in self.uses.get(id(t), []):
                if not own.intersection(use.context):
                    where = f" in '{self.calls[use.context[-1]].name}'" if use.context else ""
                    readers.append(f"{use.what}{where}")
        return list(dict.fromkeys(readers))


def record_dataflow(model: nn.Module, example_inputs: Any) -> tuple[Dataflow, Any]:
    """Run ``model`` once on ``example_inputs`` (see :func:`auto_fuse`) and return the dataflow and output."""
    flow = Dataflow(model)
    output = flow.run(_as_args(example_inputs))
    return flow, output


# --------------------------------------------------------------------------- the report

@dataclass
class AutoFuseReport(BatchNormFoldReport):
    """What :func:`auto_fuse` fused, what it left and why, and the verification.

    ``fused``: one :class:`FusedPair` per folded BatchNorm (``kind`` names the group's
    types); ``groups``: the name lists given to ``fuse_modules``; ``skipped``: every
    BatchNorm left, with the reason; ``undone``: groups fused and then undone because they
    changed the outputs (with the comparison); ``comparison``: original vs fused outputs on
    the example inputs, in ``precision`` (float64 unless the model cannot run in it); ``as_run``: the
    returned model vs the original in the model's own dtype (informational: a detector's discrete
    outputs may flip on float32 rounding); ``seconds``: wall time of the whole call.
    ``batchnorm_modules_before / after`` count BatchNorm *modules* in the model.
    """

    batchnorm_modules_before: int = 0
    batchnorm_modules_after: int = 0

    groups: list[list[str]] = field(default_factory=list)
    undone: list[tuple[list[str], str]] = field(default_factory=list)
    comparison: Comparison | None = None
    precision: str = "float64"  #: the precision ``comparison`` was computed in
    as_run: Comparison | None = None  #: the returned model vs the original, in the model's own dtype
    seconds: float = 0.0
    module_calls: int = 0

    def format(self, max_lines: int = 8) -> str:
        lines = [f"AutoFuseReport({self.model_name}): fused {self.num_fused} BatchNorm(s) in {len(self.groups)} "
                 f"group(s); BatchNorm modules {self.batchnorm_modules_before} -> {self.batchnorm_modules_after}; "
                 f"{self.seconds:.2f} s, {self.module_calls} module calls recorded"]
        kinds: dict[str, int] = defaultdict(int)
        for p in self.fused:
            kinds[p.kind] += 1
        if kinds:
            lines.append("  fused: " + ", ".join(f"{n} x {k}" for k, n in kinds.items()))
        for group in self.groups[:max_lines]:
            lines.append(f"    {' + '.join(group)}")
        if len(self.groups) > max_lines:
            lines.append(f"    ... and {len(self.groups) - max_lines} more")
        if self.skipped:
            lines.append(f"  left unfused: {len(self.skipped)} (by reason: {self.reasons()})")
            for s in self.skipped[:max_lines]:
                pair = f"{s.layer} + {s.bn}" if s.layer else s.bn
                lines.append(f"    {pair}: {s.reason}")
            if len(self.skipped) > max_lines:
                lines.append(f"    ... and {len(self.skipped) - max_lines} more")
        for group, why in self.undone:
            lines.append(f"  undone (changed the outputs): {' + '.join(group)}: {why}")
        if self.comparison is not None:
            lines.append(f"  verified in {self.precision} on the example inputs: {self.comparison}")
        if self.as_run is not None:
            worst = f", worst leaf {self.as_run.worst}" if self.as_run.worst else ""
            lines.append(f"  the returned model as it runs (its own rounding; for information): max abs "
                         f"{self.as_run.max_abs:.3g}, max rel {self.as_run.max_rel:.3g}{worst}")
        lines.append("  note: the dataflow is the one control-flow path these inputs took; "
                     "verification covers these inputs only")
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks

def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    """A tuple is the positional arguments; anything else (a tensor, a list of images) is the one argument."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _check_inputs(model: nn.Module, args: tuple[Any, ...]) -> None:
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    try:
        signature.bind(*args)
    except TypeError as error:
        raise AutoFuseError(
            f"{type(model).__name__}.forward{signature} cannot run on the example inputs given "
            f"({len(args)} positional argument(s)): {error}. auto_fuse runs the model once: pass a tuple with "
            "one entry per argument the forward needs (a single tensor or list is taken as the only argument)."
        ) from None


def _check_eval_mode(model: nn.Module) -> None:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if not training:
        return
    dropout = [name for name, m in model.named_modules()
               if m.training and isinstance(m, nn.modules.dropout._DropoutNd)]
    what = (f"its dropout ({', '.join(repr(n) for n in dropout[:3])}) is random in training mode, "
            if dropout else "")
    shown = ", ".join(repr(n) for n in training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
    raise AutoFuseError(
        f"auto_fuse refuses '{type(model).__name__}': it has modules in training mode ({shown}); "
        f"{what}BatchNorm normalizes with batch statistics there, while folding uses the running "
        "statistics, so the outputs could not be verified. Call model.eval() first."
    )


def _compare(reference: Any, candidate: Any, rtol: float, name: str) -> Comparison:
    try:
        return compare_outputs(reference, candidate, rtol=rtol, name=name)
    except ValueError as error:  # the structure or a shape changed: as failed as it gets
        return Comparison(float("inf"), float("inf"), rtol, False, f"{name} ({error})")


# --------------------------------------------------------------------------- planning

def _hooks_lost(flow: Dataflow, group: list[nn.Module]) -> list[str]:
    """The hooks fusing ``group`` would drop: all but the first module's forward pre-hooks and the last
    module's forward hooks, which move to the fused module with their meaning (the hook policy,
    :func:`fusionlib.modules.carry_forward_hooks`)."""
    lost = []
    for position, module in enumerate(group):
        kept = {"forward_pre"} if position == 0 else set()
        if position == len(group) - 1:
            kept.add("forward")
        lost += [f"{hook} on '{flow.names[id(module)]}'"
                 for hook in hook_names(module, [kind for kind in HOOK_KINDS if kind not in kept])]
    return lost


def _plan(flow: Dataflow, model: nn.Module, report: AutoFuseReport) -> list[list[nn.Module]]:
    """The groups to fuse, one per BatchNorm that can be folded; every other BatchNorm goes to ``report.skipped``."""
    names_of: dict[int, list[str]] = defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        names_of[id(m)].append(name)

    def why_not_single(module: nn.Module) -> str | None:
        """Why ``module`` is not used exactly once, under one name, by itself only (None when it is)."""
        name = flow.names[id(module)]
        if len(flow.calls_of[id(module)]) != 1:
            return f"'{name}' ran {len(flow.calls_of[id(module)])} times in the recorded forward"
        if len(names_of[id(module)]) != 1:
            return f"'{name}' sits under several names {names_of[id(module)]}"
        readers = flow.outside_readers(module)
        if readers:
            return f"its parameters / buffers are also read by {readers[:3]}, which would see folded values"
        return None

    groups: list[list[nn.Module]] = []
    for bn in [m for m in model.modules() if is_batchnorm(m)]:
        found = _group_for(bn, flow, model, why_not_single)
        if isinstance(found, SkippedBatchNorm):
            report.skipped.append(found)
        else:
            groups.append(found)
    return groups


def _producer_layer(bn: nn.Module, flow: Dataflow, model: nn.Module) -> tuple[_Call, _Call] | SkippedBatchNorm:
    """``(bn_call, layer_call)``: the BatchNorm's one call and the call of the Conv / Linear that fed it."""
    bn_name = flow.names[id(bn)]
    calls = flow.calls_of.get(id(bn), [])
    if not calls:
        return SkippedBatchNorm(bn_name, "", "not called",
                                "it did not run on these example inputs (another control-flow path)")
    bn_call = flow.calls[calls[0]]
    if len(bn_call.inputs) != 1:
        return SkippedBatchNorm(bn_name, "", "extra arguments", "BatchNorm is called with more than its input")
    producer = flow.produced_by_call.get(id(bn_call.inputs[0]))
    layer_call = flow.calls[producer] if producer is not None else None
    if layer_call is None or layer_call.module is model:
        source = flow.produced_by_function.get(id(bn_call.inputs[0]))
        return SkippedBatchNorm(bn_name, "", "no Conv/Linear before it", f"its input comes from torch function "
                                f"'{source}'" if source else "its input is a model input")
    layer, layer_name = layer_call.module, layer_call.name
    try:
        get_fuser_method((type(layer), type(bn)))
    except UnsupportedFusionError:
        base = next((t for t in (nn.modules.conv._ConvNd, nn.Linear) if isinstance(layer, t)), None)
        if base is not None and stock_forward_base(type(layer)) is None:
            return SkippedBatchNorm(bn_name, "", "subclass", f"'{layer_name}' is a {type(layer).__name__}, a "
                                    f"subclass of {base.__name__} that overrides forward, so it may compute "
                                    "something else", layer_name)
        return SkippedBatchNorm(bn_name, "", "no Conv/Linear before it",
                                f"its input comes from '{layer_name}' ({type(layer).__name__})", layer_name)
    return bn_call, layer_call


def _group_for(bn: nn.Module, flow: Dataflow, model: nn.Module,
               why_not_single: Callable[[nn.Module], str | None]) -> list[nn.Module] | SkippedBatchNorm:
    """``[layer, bn]`` or ``[layer, bn, relu]`` when ``bn`` can be folded, else why not."""
    found = _producer_layer(bn, flow, model)
    if isinstance(found, SkippedBatchNorm):
        return found
    bn_call, layer_call = found
    bn_name, layer, layer_name, tensor = flow.names[id(bn)], layer_call.module, layer_call.name, bn_call.inputs[0]
    why = why_not_single(layer) or why_not_single(bn)
    if why is not None:
        return SkippedBatchNorm(bn_name, "", "not exactly one use", why, layer_name)
    if isinstance(layer, nn.Linear) and tensor.dim() != 2:
        return SkippedBatchNorm(bn_name, "", "Linear output not 2-D",
                                "BatchNorm1d normalizes dim 1, but Linear's features are the last dim", layer_name)
    others = flow.other_consumers(tensor, bn_call)
    if others:
        return SkippedBatchNorm(bn_name, "", "output has other users", f"the output of '{layer_name}' is also "
                                f"used by {others[:3]}; folding would change what they see", layer_name)
    group = [layer, bn]
    relu = _following_relu(flow, bn_call, why_not_single)
    if relu is not None and not _hooks_lost(flow, [layer, bn, relu]):
        try:
            get_fuser_method((type(layer), type(bn), type(relu)))
            group.append(relu)
        except UnsupportedFusionError:
            pass
    lost = _hooks_lost(flow, group)
    if lost:
        return SkippedBatchNorm(bn_name, "", "hooks", f"fusing would drop the {', '.join(lost)}; only the first "
                                "module's forward pre-hooks and the last one's forward hooks move to the fused "
                                "module", layer_name)
    return group


def _following_relu(flow: Dataflow, bn_call: _Call, why_not_single: Any) -> nn.Module | None:
    """The ``nn.ReLU`` whose call is the only consumer of the BatchNorm's output, if any."""
    if len(bn_call.outputs) != 1:
        return None
    out = bn_call.outputs[0]
    consumers = [u.callee for u in flow.uses.get(id(out), [])
                 if u.callee is not None and bn_call.index not in u.context
                 and type(flow.calls[u.callee].module) is nn.ReLU]
    if not consumers:
        return None
    relu_call = flow.calls[consumers[0]]
    if type(relu_call.module) is not nn.ReLU or len(relu_call.inputs) != 1 or relu_call.inputs[0] is not out:
        return None
    if why_not_single(relu_call.module) is not None:
        return None
    in_place = any(t is out for t in relu_call.outputs)  # ReLU(inplace=True) returns the same tensor
    if flow.other_consumers(out, relu_call, after=relu_call.end if in_place else None):
        return None
    return relu_call.module


# --------------------------------------------------------------------------- auto_fuse

def auto_fuse(model: nn.Module, example_inputs: Any, inplace: bool = False, *,
              rtol: float = 1e-4) -> tuple[nn.Module, AutoFuseReport]:
    """Fuse the Conv -> BN (-> ReLU) chains of ``model`` found in one real forward pass.

    ``example_inputs``: a tuple holds the positional arguments of ``model.forward``;
    anything else (a tensor, a detection model's list of images) is its only argument.
    Returns ``(fused model, report)`` (:class:`AutoFuseReport`). ``inplace=False``
    (default) works on a deep copy and never touches ``model``; ``inplace=True`` fuses
    ``model`` itself. ``rtol``: how far the fused outputs may move
    (``max|a−b| / max|a|``, :func:`fusionlib.verify.compare_outputs`).

    Steps, limits and refusals: see the module docstring. In short: the dataflow is the
    one control-flow path these inputs took, and the verification covers these inputs
    only. Raises :class:`AutoFuseError` for a model in training mode, a forward that needs
    inputs it was not given or fails on them, and outputs that differ between two runs.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"auto_fuse expects an nn.Module, got {type(model).__name__}")
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")
    args = _as_args(example_inputs)
    _check_inputs(model, args)
    _check_eval_mode(model)
    work = model if inplace else copy.deepcopy(model)
    flow, reference = _record_repeatable_forward(work, args, rtol)

    report = AutoFuseReport(type(model).__name__, module_calls=len(flow.calls))
    report.batchnorm_modules_before = sum(1 for m in work.modules() if is_batchnorm(m))
    groups = _plan(flow, work, report)
    del flow  # let the recorded tensors go

    # Verify on a copy in float64, where the fold is exact to ~1e-16: outputs that are discontinuous in
    # their inputs (a detector's NMS and top-k) cannot flip on rounding there, a wrong fold still shows.
    checker, check_args, check_reference, report.precision = _verification_copy(work, args, reference)
    trial = _Trial(checker, check_args, check_reference, rtol)
    entries = trial.fuse_each(work, groups, report)
    entries, report.comparison = trial.keep_what_verifies(entries, report)
    del checker, trial

    accepted_names = [entry.names for entry in entries]
    if accepted_names:
        fuse_modules(work, accepted_names, inplace=True)
    for entry in entries:
        report.fused.append(FusedPair(entry.names[0], entry.names[1], entry.kind))
        report.groups.append(entry.names)
    with torch.no_grad():
        report.as_run = _compare(reference, work(*args), rtol, "fused vs original, as run")
    report.batchnorm_modules_after = sum(1 for m in work.modules() if is_batchnorm(m))
    report.seconds = time.perf_counter() - started
    return work, report


def _record_repeatable_forward(work: nn.Module, args: tuple[Any, ...], rtol: float) -> tuple[Dataflow, Any]:
    """The dataflow of one forward and its output; refused when the forward fails or is not deterministic."""
    name = type(work).__name__
    try:
        flow, reference = record_dataflow(work, args)
    except Exception as error:
        raise AutoFuseError(f"'{name}' failed on the example inputs: {type(error).__name__}: {error}") from error
    with torch.no_grad():
        again = work(*args)
    repeat = _compare(reference, again, rtol, "two runs of the original model")
    if not repeat.passed:
        raise AutoFuseError(
            f"auto_fuse refuses '{name}': two runs on the same inputs differ ({repeat}). The model is not "
            "deterministic (dropout or random ops in its forward), so no fusion could be verified."
        )
    return flow, reference


@dataclass
class _Entry:
    """One group fused in the verification copy, with both versions of its modules (so it can be undone)."""

    names: list[str]
    originals: list[nn.Module]
    fused: list[nn.Module]
    kind: str


@dataclass
class _Trial:
    """The float64 verification copy: fuse groups, undo them, and compare with the original's outputs."""

    checker: nn.Module
    args: tuple[Any, ...]
    reference: Any
    rtol: float

    def fuse_each(self, work: nn.Module, groups: list[list[nn.Module]], report: AutoFuseReport) -> list[_Entry]:
        """Fuse each group on its own in the copy; a group ``fuse_modules`` refuses is reported skipped."""
        entries = []
        for group in groups:
            names = [_name_of(work, m) for m in group]
            originals = [self.checker.get_submodule(n) for n in names]
            try:
                fuse_modules(self.checker, [names], inplace=True)
            except FusionError as error:
                report.skipped.append(SkippedBatchNorm(names[1], "", "fuse_modules refused", str(error), names[0]))
                continue
            entries.append(_Entry(names, originals, [self.checker.get_submodule(n) for n in names],
                                  "+".join(type(m).__name__ for m in group)))
        return entries

    def apply(self, entry: _Entry, fused: bool) -> None:
        for n, original, new in zip(entry.names, entry.originals, entry.fused):
            set_submodule(self.checker, n, new if fused else original)

    def check(self, label: str) -> Comparison:
        with torch.no_grad():
            try:
                out = self.checker(*self.args)
            except Exception as error:  # a fold the model cannot live with
                return Comparison(math.inf, math.inf, self.rtol, False, f"{label} ({type(error).__name__}: {error})")
        return _compare(self.reference, out, self.rtol, label)

    def keep_what_verifies(self, entries: list[_Entry], report: AutoFuseReport) -> tuple[list[_Entry], Comparison]:
        """All groups when the fused copy matches; else undo the groups that change the outputs: first those
        wrong alone, then, adding the rest one by one, those wrong together. Undone groups are reported."""
        comparison = self.check("fused vs original")
        if comparison.passed:
            return entries, comparison
        kept = self._keep(entries, report, together=False)
        comparison = self.check("fused vs original")
        if not comparison.passed:  # groups fine alone but not together
            kept = self._keep(kept, report, together=True)
            comparison = self.check("fused vs original")
        for names, _ in report.undone:
            report.skipped.append(SkippedBatchNorm(names[1], "", "undone",
                                                   "folding it changed the outputs on the example inputs", names[0]))
        return kept, comparison

    def _keep(self, entries: list[_Entry], report: AutoFuseReport, together: bool) -> list[_Entry]:
        """The entries that verify, each alone (``together=False``) or added one by one to those kept so far."""
        for entry in entries:
            self.apply(entry, False)
        kept = []
        for entry in entries:
            self.apply(entry, True)
            result = self.check(" + ".join(entry.names))
            if result.passed:
                kept.append(entry)
            else:
                report.undone.append((entry.names, str(result)))
            if not together or not result.passed:
                self.apply(entry, False)
        if not together:
            for entry in kept:
                self.apply(entry, True)
        return kept


def _verification_copy(model: nn.Module, args: tuple[Any, ...], reference: Any
                       ) -> tuple[nn.Module, tuple[Any, ...], Any, str]:
    """A float64 copy of the model with float64 inputs and its output; the model's own dtype if that fails."""
    to64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    if not any(p.device.type == "mps" for p in model.parameters()):
        try:
            model64 = copy.deepcopy(model).double()
            args64 = tree_map(to64, args)
            with torch.no_grad():
                return model64, args64, model64(*args64), "float64"
        except Exception:  # an op without float64 support: verify as the model runs
            pass
    return copy.deepcopy(model), args, reference, "the model's own dtype"


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
