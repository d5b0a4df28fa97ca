"""Automatic Conv/Linear + BatchNorm folding on a traced graph (no name lists).

In eval mode ``BN(y) = γ·(y − μ)/√(σ²+ε) + β`` is a per-channel affine map, so
``BN(conv(x))`` is one convolution with ``W' = W·s``, ``b' = (b − μ)·s + β``,
``s = γ/√(σ²+ε)`` (:func:`fusionlib.fusion.fuse_conv_bn_eval`). With a graph we no
longer need the names of the pairs: every ``call_module`` BatchNorm node whose input is a
``call_module`` Conv / ConvTranspose / Linear node is a candidate. A candidate is folded
only when that is exact:

* the conv's output has no other user (another user would see ``BN(conv(x))`` instead of
  ``conv(x)`` once the conv holds the folded weights);
* every call site of a *shared* conv module is followed by the same BatchNorm module (the
  conv module is replaced, so all its call sites change). A BatchNorm module may be shared
  freely: folding copies its statistics and never changes it;
* the BatchNorm has running statistics (``track_running_stats=True``) and matching types /
  channel counts, and both modules are torch's own classes (a subclass may override
  ``forward``);
* no forward hook would change meaning (a hook on the conv would see the BatchNorm output,
  hooks on the BatchNorm would be lost);
* nothing else in the graph reads the two modules: no ``get_attr`` node reads one of their
  parameters or buffers (``x + self.conv.weight.sum()`` would see ``W'`` instead of ``W``
  once folded; BatchNorm's tensors are frozen into the layer, out of such a reader's
  sight), and no other module call contains them (a leaf module holding the conv).

Modules are told apart by *identity*, not by name: one module can sit under two names
(``self.conv2 = self.conv``, see ``named_modules(remove_duplicate=False)``); calls through
either name are call sites of the same module.

Beyond torch's own pass (``torch.fx.experimental.optimization.fuse``):

* **Subclasses.** A subclass of a torch conv / linear / BatchNorm class that keeps its
  parent's ``forward`` stays a leaf while tracing and folds like its parent (torchvision's
  ``Conv3DSimple`` in ``r3d_18``, a user's ``class MyConv(nn.Conv2d)``). A subclass that
  overrides ``forward`` is traced through and never folded as its parent; the report names
  it (``FusionReport.overridden``) and says why.
* **FrozenBatchNorm2d** (torchvision's frozen norm layer of detection backbones) folds like
  ``BatchNorm2d``, with its own eps.
* **BatchNorm before a convolution** (MaxViT's ``pre_norm``). ``BN(x) = a·x + c`` per input
  channel, so ``conv(BN(x))`` is one conv with ``W'[o,i] = W[o,i]·a[i]`` and
  ``b'[o] = b[o] + Σ_{i,k} W[o,i,k]·c[i]`` (:func:`fusionlib.folding.fuse_bn_conv_eval`,
  float64, rounded once). It is exact only if the conv adds no padding (a padded zero never
  went through the BatchNorm), so it needs ``padding=0``; the BatchNorm's output must have
  no other user, every call of the conv must follow the same BatchNorm, and the same
  hook / reader rules apply. A BatchNorm after a conv is folded that way first; a conv may
  absorb one BatchNorm on each side. :attr:`FusedPair.direction` says which way each went.

Everything else is left as it was; :class:`FusionReport` says what was folded and why the
rest was skipped. Functional ``F.batch_norm`` calls are out of scope (left untouched).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from fusionlib.folding import (
    _num_features,
    frozen_batchnorm_class,
    fuse_bn_conv_eval,
    is_batchnorm,
    stock_forward_base,
    why_not_bn_before_conv,
)
from fusionlib.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from fusionlib.fx.tracing import modules_by_name, propagate_shapes, symbolic_trace
from fusionlib.modules import require_eval_mode, set_submodule

__all__ = ["FusedPair", "SkippedBatchNorm", "FusionReport", "fuse_conv_bn", "BATCHNORM_TYPES",
           "count_batchnorm_nodes"]

#: BatchNorm classes this pass folds, by the dimensionality of the layer before it.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: Layer type -> the BatchNorm type that may follow it.
FOLDABLE_PAIRS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.ConvTranspose1d: nn.BatchNorm1d,
    nn.ConvTranspose2d: nn.BatchNorm2d,
    nn.ConvTranspose3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}

def _computes_as(module: nn.Module) -> type[nn.Module] | None:
    """The torch class ``module`` computes as (itself, or the parent whose forward it keeps)."""
    return stock_forward_base(type(module))


def _bn_pairs_with(layer_type: type[nn.Module], bn_type: type[nn.Module]) -> bool:
    wanted = FOLDABLE_PAIRS[layer_type]
    # torchvision's FrozenBatchNorm2d (detection backbones) pairs like BatchNorm2d
    return bn_type is wanted or (bn_type is frozen_batchnorm_class() and wanted is nn.BatchNorm2d)


def _is_foldable_bn_type(bn_type: type[nn.Module] | None) -> bool:
    return bn_type in BATCHNORM_TYPES or (bn_type is not None and bn_type is frozen_batchnorm_class())


@dataclass
class FusedPair:
    """One folded pair: ``layer`` now holds ``bn``'s affine map (at ``call_sites`` call sites).

    ``direction``: ``"after"`` when the BatchNorm followed the layer (``W·s``), ``"before"``
    when it came before a conv (``W[o,i]·a[i]``).
    """

    layer: str
    bn: str
    kind: str
    call_sites: int = 1
    direction: str = "after"

    def __str__(self) -> str:
        sites = f"  [{self.call_sites} call sites]" if self.call_sites > 1 else ""
        if self.direction == "before":
            return f"{self.bn} -> {self.layer}  ({self.kind}, BN before the conv){sites}"
        return f"{self.layer} + {self.bn}  ({self.kind}){sites}"


@dataclass
class SkippedBatchNorm:
    """A BatchNorm call that stays in the graph: the layer before it (if any), why (``kind``:
    a short category, ``detail``: the specifics)."""

    bn: str
    node: str
    kind: str
    detail: str
    layer: str | None = None

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"

    def __str__(self) -> str:
        pair = f"{self.layer} + {self.bn}" if self.layer else self.bn
        return f"{pair} (node '{self.node}'): {self.reason}"


@dataclass
class BatchNormFoldReport:
    """What a BatchNorm-folding pass folded, and every BatchNorm it left, with the reason.

    The common part of :class:`FusionReport` (the graph pass, which counts BatchNorm
    *calls* in the graph) and ``auto_fuse.AutoFuseReport`` (which counts BatchNorm *modules*).
    """

    model_name: str
    fused: list[FusedPair] = field(default_factory=list)
    skipped: list[SkippedBatchNorm] = field(default_factory=list)
    #: Subclasses of conv / linear / BatchNorm that override ``forward``: never folded as their parent.
    overridden: list[str] = field(default_factory=list)

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    def directions(self) -> dict[str, int]:
        """How many BatchNorms were folded into the layer before them (``after``) / after them (``before``)."""
        counts: dict[str, int] = defaultdict(int)
        for p in self.fused:
            counts[p.direction] += 1
        return dict(counts)

    def reasons(self) -> dict[str, int]:
        """How many BatchNorm calls were left, by kind of reason."""
        counts: dict[str, int] = defaultdict(int)
        for s in self.skipped:
            counts[s.kind] += 1
        return dict(counts)

    def __str__(self) -> str:
        return self.format()


@dataclass
class FusionReport(BatchNormFoldReport):
    """What :func:`fuse_conv_bn` folded, and every BatchNorm call it left, with the reason."""

    batchnorm_calls_before: int = 0  #: BatchNorm calls in the graph before the pass
    batchnorm_calls_after: int = 0  #: and after it

    def format(self, max_lines: int = 8) -> str:
        """The report, listing at most ``max_lines`` fused and skipped entries."""
        if self.batchnorm_calls_before == 0 and not self.overridden:
            return f"FusionReport({self.model_name}): no BatchNorm modules in the graph, nothing to fuse."
        lines = [f"FusionReport({self.model_name}): fused {self.num_fused} pair(s); "
                 f"BatchNorm calls {self.batchnorm_calls_before} -> {self.batchnorm_calls_after}"]
        kinds: dict[str, int] = defaultdict(int)
        for p in self.fused:
            kinds[p.kind if p.direction == "after" else f"{p.kind} (BN before conv)"] += 1
        if kinds:
            lines.append("  fused: " + ", ".join(f"{n} x {k}" for k, n in kinds.items()))
        for p in self.fused[:max_lines]:
            lines.append(f"    {p}")
        if len(self.fused) > max_lines:
            lines.append(f"    ... and {len(self.fused) - max_lines} more")
        if self.skipped:
            lines.append(f"  left unfused: {len(self.skipped)}")
            for s in self.skipped[:max_lines]:
                lines.append(f"    {s}")
            if len(self.skipped) > max_lines:
                lines.append(f"    ... and {len(self.skipped) - max_lines} more "
                             f"(by reason: {self.reasons()})")
        if self.overridden:
            lines.append("  subclasses that override forward (traced through, never folded as their parent):")
            lines.extend(f"    {o}" for o in self.overridden[:max_lines])
        return "\n".join(lines)


# --------------------------------------------------------------------------- finding pairs

def count_batchnorm_nodes(gm: fx.GraphModule) -> int:
    """Number of ``call_module`` nodes that run a BatchNorm module (any ``_BatchNorm``, or FrozenBatchNorm2d)."""
    modules = modules_by_name(gm)
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and is_batchnorm(modules[n.target]))


def _call_sites(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[int, list[fx.Node]]:
    """``id(module)`` -> the ``call_module`` nodes that run it, under any of its names."""
    sites: dict[int, list[fx.Node]] = defaultdict(list)
    for n in graph.nodes:
        if n.op == "call_module":
            sites[id(modules[n.target])].append(n)
    return sites


def _resolve_attr(root: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` node reads: ``root.<target>`` for a dotted name."""
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


@dataclass
class _OtherUses:
    """Uses of modules and tensors other than calling the module itself.

    ``modules``: ``id(module)`` -> nodes that reach it without calling it (a ``get_attr`` of
    it or of a module containing it, a call of a module containing it). ``tensors``:
    ``id(tensor)`` -> ``get_attr`` nodes that read it.
    """

    modules: dict[int, list[fx.Node]] = field(default_factory=lambda: defaultdict(list))
    tensors: dict[int, list[fx.Node]] = field(default_factory=lambda: defaultdict(list))

    def of(self, module: nn.Module) -> list[fx.Node]:
        """Nodes that use ``module`` (or one of its parameters / buffers) other than by calling it."""
        readers = dict.fromkeys(self.modules.get(id(module), []))
        for t in [*module.parameters(), *module.buffers()]:
            readers.update(dict.fromkeys(self.tensors.get(id(t), [])))
        return list(readers)


def _other_uses(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> _OtherUses:
    uses = _OtherUses()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            called = modules[n.target]
            for inner in called.modules():
                if inner is not called:
                    uses.modules[id(inner)].append(n)
        elif n.op == "get_attr":
            obj = _resolve_attr(gm, n.target)
            if isinstance(obj, nn.Module):
                for inner in obj.modules():
                    uses.modules[id(inner)].append(n)
            elif isinstance(obj, torch.Tensor):
                uses.tensors[id(obj)].append(n)
    return uses


def _why_not_foldable(bn_node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
    """``None`` if ``layer -> bn`` at this node is a foldable pattern, else ``(kind, detail)``."""
    bn = modules[bn_node.target]
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "extra arguments", "BatchNorm is called with more than its input"
    producer = bn_node.args[0]
    if not isinstance(producer, fx.Node) or producer.op != "call_module":
        what = producer.op if isinstance(producer, fx.Node) else type(producer).__name__
        target = getattr(producer, "target", "")
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        overriding = _overriding_subclass(producer) if isinstance(producer, fx.Node) else None
        if overriding is not None:
            path, cls, parent = overriding
            return "subclass", (f"its input comes from '{path}' ({cls.__name__}), a subclass of {parent.__name__} "
                                "that overrides forward: it was traced through and is never folded as a "
                                f"{parent.__name__}")
        return "no Conv/Linear before it", f"its input comes from {what} '{name}'"
    layer = modules[producer.target]
    layer_type = _computes_as(layer)
    if layer_type not in FOLDABLE_PAIRS:
        base = next((t for t in FOLDABLE_PAIRS if isinstance(layer, t)), None)
        if base is not None:
            return "subclass", (f"'{producer.target}' is a {type(layer).__name__}, a subclass of {base.__name__} "
                                "that overrides forward, so it may compute something else")
        return "no Conv/Linear before it", f"its input comes from '{producer.target}' ({type(layer).__name__})"
    bn_type = _computes_as(bn)
    if not _is_foldable_bn_type(bn_type):
        return "subclass", (f"{type(bn).__name__} is not BatchNorm1d/2d/3d or FrozenBatchNorm2d; it overrides "
                            "forward, so it may compute something else")
    if not _bn_pairs_with(layer_type, bn_type):
        return "type mismatch", f"{layer_type.__name__} is followed by {bn_type.__name__}"
    if bn.running_mean is None or bn.running_var is None:
        return "batch statistics", ("track_running_stats=False: BatchNorm normalizes with batch statistics "
                                    "in eval mode too")
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    features = _num_features(bn)
    if features != out_channels and not (isinstance(layer, nn.Linear) and features == 1):
        return "channel mismatch", f"{out_channels} outputs vs BatchNorm num_features={features}"
    if layer._forward_hooks or bn._forward_hooks or bn._forward_pre_hooks:
        return "hooks", (f"a forward hook on '{producer.target}' would see the BatchNorm output, and hooks "
                         f"on '{bn_node.target}' would be lost")
    other_users = [u.name for u in producer.users if u is not bn_node]
    if other_users:
        return "output has other users", (f"the output of '{producer.target}' is also used by {other_users}; "
                                          "folding would change what they see")
    return None


def _overriding_subclass(node: fx.Node) -> tuple[str, type, type] | None:
    """``(path, class, torch parent)`` if ``node`` was traced inside a conv / linear / BatchNorm
    subclass that overrides ``forward`` (read from ``node.meta["nn_module_stack"]``)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed([v for v in stack.values() if isinstance(v, tuple) and len(v) == 2]):
        if isinstance(cls, type) and (issubclass(cls, tuple(FOLDABLE_PAIRS)) or is_batchnorm_type(cls)):
            if stock_forward_base(cls) is None:
                parent = next((c for c in cls.__mro__[1:] if stock_forward_base(c) is c), cls.__mro__[1])
                return str(path), cls, parent
    return None


def is_batchnorm_type(cls: type) -> bool:
    frozen = frozen_batchnorm_class()
    return issubclass(cls, nn.modules.batchnorm._BatchNorm) or (frozen is not None and issubclass(cls, frozen))


def _overriding_subclasses(gm: fx.GraphModule) -> list[str]:
    """One line per conv / linear / BatchNorm subclass instance the tracer went into (it overrides forward)."""
    found: dict[str, str] = {}
    for n in gm.graph.nodes:
        hit = _overriding_subclass(n)
        if hit is not None and hit[0] not in found:
            path, cls, parent = hit
            found[path] = (f"'{path}' ({cls.__name__}): subclasses {parent.__name__} but overrides forward, so it "
                           f"may compute something else; left as traced, never folded as a {parent.__name__}")
    return list(found.values())


def _linear_output_not_2d(bn_node: fx.Node) -> bool:
    """With shapes known (ShapeProp), a Linear -> BatchNorm1d pair folds only on [N, F] outputs.

    BatchNorm1d normalizes dim 1; Linear writes its features to the last dim. The two agree
    only for 2-D outputs.
    """
    meta = bn_node.args[0].meta.get("tensor_meta")
    return meta is not None and len(meta.shape) != 2


@dataclass
class _Candidate:
    layer_node: fx.Node
    bn_node: fx.Node


def _plan(gm: fx.GraphModule, modules: dict[str, nn.Module], report: FusionReport
          ) -> dict[int, list[_Candidate]]:
    """Group foldable candidates by layer module (``id``); record the rest in ``report.skipped``."""
    by_layer: dict[int, list[_Candidate]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op != "call_module" or not is_batchnorm(modules[n.target]):
            continue
        report.batchnorm_calls_before += 1
        why_not = _why_not_foldable(n, modules)
        layer_node = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        layer_name = layer_node.target if layer_node is not None and layer_node.op == "call_module" else None
        if why_not is None and isinstance(modules[layer_name], nn.Linear) and _linear_output_not_2d(n):
            why_not = ("Linear output not 2-D",
                       "BatchNorm1d normalizes dim 1, but Linear's features are the last dim")
        if why_not is not None:
            report.skipped.append(SkippedBatchNorm(n.target, n.name, *why_not, layer=layer_name))
            continue
        by_layer[id(modules[layer_name])].append(_Candidate(layer_node, n))
    return by_layer


def _why_not_shareable(candidates: list[_Candidate], sites: list[fx.Node], modules: dict[str, nn.Module]
                       ) -> tuple[str, str] | None:
    """A layer module called at several sites folds only if every site feeds the same BatchNorm.

    ``sites`` are all calls of the layer module, under any of its names (an alias such as
    ``self.conv2 = self.conv`` is the same module: replacing it changes every call).
    """
    layer_name = candidates[0].layer_node.target
    other_names = [name for name in dict.fromkeys(s.target for s in sites) if name != layer_name]
    aliases = f" (also named {other_names}: one module under several names)" if other_names else ""
    bns = {id(modules[c.bn_node.target]): c.bn_node.target for c in candidates}
    if len(bns) > 1:
        return "shared layer", (f"'{layer_name}'{aliases} is called at sites followed by different BatchNorms "
                                f"{sorted(bns.values())}; one module can hold only one folded BatchNorm")
    folded_sites = {c.layer_node for c in candidates}
    others = [s.name for s in sites if s not in folded_sites]
    if others:
        return "shared layer", (f"'{layer_name}'{aliases} is also called at {others} without this BatchNorm "
                                "after it; folding would change that call")
    return None


def _describe_readers(readers: list[fx.Node]) -> str:
    shown = [f"'{r.target}' (node '{r.name}')" for r in readers[:3]]
    more = f" and {len(readers) - 3} more" if len(readers) > 3 else ""
    return ", ".join(shown) + more


def _why_not_unread(layer: nn.Module, bn: nn.Module, layer_name: str, bn_name: str, uses: _OtherUses
                    ) -> tuple[str, str] | None:
    """Folding is exact only if the graph uses ``layer`` and ``bn`` nowhere but in their calls.

    A reader of the layer's weight or bias would see the folded ``W·s`` / ``(b − μ)·s + β``
    instead of ``W`` / ``b``. BatchNorm's tensors are copied into the folded layer once, at
    fuse time: the graph would then hold two copies that must agree, and a reader that
    updates them in place would no longer reach the output. Both are left, conservatively.
    """
    layer_readers, bn_readers = uses.of(layer), uses.of(bn)
    if layer_readers:
        return "read elsewhere", (f"the graph also reads {_describe_readers(layer_readers)} of '{layer_name}'; "
                                  "folding rewrites its weight and bias, so that reader would see the "
                                  "folded values")
    if bn_readers:
        return "read elsewhere", (f"the graph also reads {_describe_readers(bn_readers)} of '{bn_name}'; "
                                  f"folding freezes those tensors into '{layer_name}', out of that reader's sight")
    return None


def _fold(layer: nn.Module, bn_after: nn.Module | None, bn_before: nn.Module | None = None) -> nn.Module:
    """The layer with ``bn_before`` (input side) and ``bn_after`` (output side) folded in, rounded once."""
    if bn_before is not None:
        return fuse_bn_conv_eval(bn_before, layer, bn_after)
    if isinstance(layer, nn.Linear):
        return fuse_linear_bn_eval(layer, bn_after)
    transpose = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    return fuse_conv_bn_eval(layer, bn_after, transpose=transpose)


_CONV_DIM = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _why_not_before(bn_node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node | None, str | None]:
    """``(conv node, None)`` if the BatchNorm at ``bn_node`` folds into the conv after it;
    ``(conv node or None, reason)`` otherwise (``None`` conv: there is no conv after it)."""
    users = list(bn_node.users)
    convs = [u for u in users if u.op == "call_module" and _computes_as(modules[u.target]) in _CONV_DIM]
    if not convs:
        return None, None
    conv_node = convs[0]
    conv, bn = modules[conv_node.target], modules[bn_node.target]
    if len(users) > 1:
        return conv_node, f"its output also feeds {[u.name for u in users if u is not conv_node]}"
    if len(bn_node.args) != 1 or bn_node.kwargs or len(conv_node.args) != 1 or conv_node.kwargs:
        return conv_node, "a call has more arguments than its input"
    bn_type = _computes_as(bn)
    if not _is_foldable_bn_type(bn_type) or not _bn_pairs_with(_computes_as(conv), bn_type):
        return conv_node, f"{type(bn).__name__} does not pair with {type(conv).__name__}"
    why = why_not_bn_before_conv(bn, conv)
    if why is not None:
        return conv_node, why
    if bn._forward_hooks or bn._forward_pre_hooks or conv._forward_hooks or conv._forward_pre_hooks:
        return conv_node, "a hook on one of them would see different tensors"
    return conv_node, None


def _plan_before(gm: fx.GraphModule, modules: dict[str, nn.Module], report: FusionReport,
                 sites: dict[int, list[fx.Node]], uses: _OtherUses
                 ) -> dict[int, list[_Candidate]]:
    """BatchNorms left by the conv-then-BN pass that fold into the conv *after* them.

    Folded ones leave ``report.skipped``; for the others with a conv after them, the reason
    that conv cannot absorb them is appended to the entry's detail.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    by_conv: dict[int, list[_Candidate]] = defaultdict(list)
    why_not: dict[str, str] = {}
    for entry in report.skipped:
        bn_node = nodes[entry.node]
        conv_node, reason = _why_not_before(bn_node, modules)
        if conv_node is None:
            continue
        if reason is not None:
            why_not[entry.node] = f"{conv_node.target} after it cannot absorb it: {reason}"
            continue
        by_conv[id(modules[conv_node.target])].append(_Candidate(conv_node, bn_node))
    planned: dict[int, list[_Candidate]] = {}
    for conv_id, candidates in by_conv.items():
        conv_name, bn_name = candidates[0].layer_node.target, candidates[0].bn_node.target
        bns = {id(modules[c.bn_node.target]) for c in candidates}
        folded = {c.layer_node for c in candidates}
        others = [site.name for site in sites[conv_id] if site not in folded]
        if len(bns) > 1 or others:
            reason = (f"'{conv_name}' is also called at {others} without this BatchNorm before it" if others
                      else f"'{conv_name}' is called after different BatchNorms")
        else:
            unread = _why_not_unread(modules[conv_name], modules[bn_name], conv_name, bn_name, uses)
            reason = None if unread is None else unread[1]
        if reason is None:
            planned[conv_id] = candidates
        else:
            for c in candidates:
                why_not[c.bn_node.name] = f"{conv_name} after it cannot absorb it: {reason}"
    folded_nodes = {c.bn_node.name for cs in planned.values() for c in cs}
    report.skipped = [s for s in report.skipped if s.node not in folded_nodes]
    for s in report.skipped:
        if s.node in why_not:
            s.detail = f"{s.detail}; {why_not[s.node]}"
    return planned


def fuse_conv_bn(model: nn.Module, inplace: bool = False, *,
                 example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
                 **trace_kwargs: Any) -> fx.GraphModule:
    """Trace ``model`` and fold every safe Conv/ConvTranspose/Linear <-> BatchNorm pair.

    Returns a ``torch.fx.GraphModule`` computing the same function in eval mode, with the
    report in ``gm.fusion_report`` (:class:`FusionReport`). Pairs:
    Conv{1,2,3}d / ConvTranspose{1,2,3}d -> BatchNorm{1,2,3}d and Linear -> BatchNorm1d
    (FrozenBatchNorm2d where BatchNorm2d is; subclasses that keep their parent's forward as
    their parent); then BatchNorm{1,2,3}d -> Conv{1,2,3}d with ``padding=0`` (BN before the
    conv; see the module docstring).

    ``inplace=False`` (default) deep-copies ``model`` first, so the caller's model is never
    touched. ``inplace=True`` skips the copy: a GraphModule is rewritten in place; another
    model is traced as is (its structure is not changed, but the result shares the unfused
    submodules with it). ``example_inputs``: optional; if given, shapes are propagated and a
    Linear -> BatchNorm1d pair is folded only when the Linear output is 2-D (without them
    that is assumed, as torch does). ``trace_kwargs`` go to
    :func:`fusionlib.fx.symbolic_trace` (``concrete_args``, ``leaf_modules``, ...).

    Raises ``ValueError`` for a model in training mode and :class:`FxTraceError` when it
    cannot be traced. Nothing is half-applied: all folded modules are computed before the
    graph is changed.
    """
    require_eval_mode(model, "fuse_conv_bn", "folding uses BatchNorm's running statistics, which "
                      "describe the model in eval mode only")
    name = type(model).__name__
    if not inplace:
        model = copy.deepcopy(model)
    gm = model if isinstance(model, fx.GraphModule) else symbolic_trace(model, **trace_kwargs)
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    modules = modules_by_name(gm)  # every name, aliases included
    report = FusionReport(name)
    report.overridden = _overriding_subclasses(gm)
    sites = _call_sites(gm.graph, modules)
    uses = _other_uses(gm, modules)

    # 1. decide every fold before touching the graph: BN after a layer, then BN before a conv
    after: dict[int, list[_Candidate]] = {}
    for layer_id, candidates in _plan(gm, modules, report).items():
        layer_name, bn_name = candidates[0].layer_node.target, candidates[0].bn_node.target
        layer, bn = modules[layer_name], modules[bn_name]
        why_not = (_why_not_shareable(candidates, sites[layer_id], modules)
                   or _why_not_unread(layer, bn, layer_name, bn_name, uses))
        if why_not is not None:
            report.skipped.extend(SkippedBatchNorm(c.bn_node.target, c.bn_node.name, *why_not,
                                                   layer=c.layer_node.target) for c in candidates)
            continue
        after[layer_id] = candidates
        report.fused.append(FusedPair(layer_name, bn_name, f"{type(layer).__name__}+{type(bn).__name__}",
                                      len(candidates)))
    before = _plan_before(gm, modules, report, sites, uses)
    for candidates in before.values():
        conv_name, bn_name = candidates[0].layer_node.target, candidates[0].bn_node.target
        report.fused.append(FusedPair(conv_name, bn_name,
                                      f"{type(modules[bn_name]).__name__}+{type(modules[conv_name]).__name__}",
                                      len(candidates), direction="before"))

    # 2. compute every folded layer (one per layer module, both sides at once)
    planned: list[tuple[list[str], nn.Module]] = []
    for layer_id in dict.fromkeys([*after, *before]):
        some = (after.get(layer_id) or before[layer_id])[0].layer_node.target
        bn_after = modules[after[layer_id][0].bn_node.target] if layer_id in after else None
        bn_before = modules[before[layer_id][0].bn_node.target] if layer_id in before else None
        fused = _fold(modules[some], bn_after, bn_before)
        names = [s.target for s in sites[layer_id]]
        planned.append((list(dict.fromkeys(names)), fused))

    # 3. rewrite: the layer (under each name it is called by) holds the folded weights,
    #    the BatchNorm nodes disappear
    for names, fused in planned:
        for layer_name in names:
            set_submodule(gm, layer_name, fused)
    for candidates in after.values():
        for c in candidates:
            c.bn_node.replace_all_uses_with(c.layer_node)
            gm.graph.erase_node(c.bn_node)
    for candidates in before.values():
        for c in candidates:
            c.bn_node.replace_all_uses_with(c.bn_node.args[0])
            gm.graph.erase_node(c.bn_node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    report.batchnorm_calls_after = count_batchnorm_nodes(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    report.skipped.sort(key=lambda s: order.get(s.node, -1))
    gm.fusion_report = report
    return gm
