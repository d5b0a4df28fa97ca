"""Memory-layout passes: run convolutions in oneDNN's preferred layouts (CPU, float32).

A 4-D activation is stored NCHW by default ("contiguous"). oneDNN, the library behind
PyTorch's CPU convolutions, prefers other layouts and converts to them inside every call
when it is handed NCHW tensors and plain weights. Two ways to stop paying that per call:

* :func:`to_channels_last` stores activations NHWC (``torch.channels_last``) and conv
  weights the same way; ordinary eager ops keep that layout end to end. One conversion at
  each graph input, one at each output. Pays most for depthwise / grouped convolutions.
* :func:`to_mkldnn` moves *regions* of the graph (connected Conv2d / BatchNorm2d / ReLU /
  pooling / residual add nodes) to MKLDNN tensors (oneDNN's blocked layout, opaque to the
  rest of PyTorch) with the conv weights *re-ordered once* ahead of time
  (:class:`MkldnnConv2d`). A ``to_mkldnn`` node enters a region, a ``to_dense`` node leaves
  it; a region is converted only if it pays: it contains a convolution and at least
  :data:`MIN_REGION_NODES` nodes, otherwise the two conversions cost more than they save.
  The weight re-ordering is a *private* torch op, ``torch._C._nn.mkldnn_reorder_conv2d_weight``
  (the one torch's own ``torch.fx.experimental.optimization.optimize_for_inference`` uses);
  it may change or disappear in a torch release without notice.

This is the idea of ``torch.fx.experimental.optimization.optimize_for_inference``, written
again to be read (and without TorchScript modules). Unlike it, a multiply never enters a
region (MKLDNN has no broadcasting; torch's pass fails on RegNetY's squeeze-excitation),
nor does an in-place op whose input has other readers, nor an add whose operands' shapes
are not known to be equal (oneDNN's sum has no broadcasting either: ``y + pool(y)`` fails
with "could not create a primitive descriptor for the sum primitive"; shapes are known
after ``torch.fx.passes.shape_prop.ShapeProp``, which :func:`to_mkldnn` runs when given
example inputs). :func:`choose_layout` picks one of the two layouts by a static rule (how
many convolutions MKLDNN regions would hold and how many conversions they would need), or,
with ``timed=True``, by measuring both on example inputs.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fusionlib.bench import compare_latency
from fusionlib.fx.tracing import modules_by_name, propagate_shapes  # propagate_shapes re-exported
from fusionlib.modules import set_submodule

__all__ = [
    "MkldnnConv2d",
    "MkldnnRegion",
    "MIN_REGION_NODES",
    "mkldnn_regions",
    "to_mkldnn",
    "to_channels_last",
    "choose_layout",
    "propagate_shapes",
    "LAYOUTS",
]

#: A region of fewer nodes (or without a convolution) stays dense.
MIN_REGION_NODES = 3


def _repack_after_load(module: MkldnnConv2d, incompatible_keys: Any) -> None:
    module._pack()


class MkldnnConv2d(nn.Module):
    """``Conv2d`` on MKLDNN tensors, weight re-ordered once into oneDNN's blocked layout.

    ``y = conv2d(x, W, b)`` exactly as the dense layer; ``x`` and ``y`` are MKLDNN tensors.
    The dense weight stays a buffer (``state_dict``, ``deepcopy`` and pickling work); the
    packed copy is rebuilt from it after a copy and after ``load_state_dict``.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.dilation, self.groups = tuple(conv.dilation), conv.groups
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self._pack()
        self.register_load_state_dict_post_hook(_repack_after_load)

    def _pack(self) -> None:
        self.packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
            self.weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("packed_weight", None)  # opaque MKLDNN storage cannot be copied or pickled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mkldnn_convolution(x, self.packed_weight, self.bias,
                                        self.padding, self.stride, self.dilation, self.groups)

    def extra_repr(self) -> str:
        out_channels, in_per_group, kh, kw = self.weight.shape
        return (f"{in_per_group * self.groups}, {out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


# --------------------------------------------------------------------------- which nodes can run in MKLDNN

def _is_float_cpu(module: nn.Module) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())  # BatchNorm's counter is an int64
    return all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
               for t in tensors)


def _module_runs_on_mkldnn(m: nn.Module) -> bool:
    """Module configurations oneDNN's MKLDNN-tensor kernels support (checked one by one)."""
    t = type(m)
    if t is nn.Conv2d:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str) and _is_float_cpu(m)
    if t is nn.BatchNorm2d:  # eval mode, affine, running statistics
        return m.affine and m.track_running_stats and not m.training and _is_float_cpu(m)
    if t is nn.ReLU:
        return True
    if t is nn.MaxPool2d:
        return m.dilation in (1, (1, 1)) and not m.return_indices
    if t is nn.AvgPool2d:
        return m.divisor_override is None
    if t is nn.AdaptiveAvgPool2d:  # other sizes fail unless they divide the input
        return m.output_size in (1, (1, 1))
    return False


_ALWAYS_FUNCTIONS = {torch.relu, F.relu}
_BINARY_FUNCTIONS = {operator.add, torch.add}  # only between two MKLDNN tensors of equal shape


def _same_shapes(a: fx.Node, b: fx.Node) -> bool:
    """Both shapes known (``ShapeProp`` ran) and equal.

    oneDNN's sum primitive has no broadcasting: ``y + pool(y)`` (``[N, C, H, W] + [N, C, 1, 1]``)
    on MKLDNN tensors raises "could not create a primitive descriptor for the sum primitive".
    Unknown shapes are *not* assumed equal, so without shapes no binary op enters a region.
    """
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    shapes = [getattr(m, "shape", None) for m in (ma, mb)]
    return all(isinstance(sh, torch.Size) for sh in shapes) and tuple(shapes[0]) == tuple(shapes[1])


def _hidden_mutation(node: fx.Node, in_place: bool) -> bool:
    """An in-place op on a converted copy would be invisible to other readers of the dense original."""
    source = node.args[0] if node.args else None
    return in_place and isinstance(source, fx.Node) and len(source.users) > 1


def _runs_on_mkldnn(n: fx.Node, modules: dict[str, nn.Module], call_counts: dict[int, int],
                    on: set[fx.Node]) -> bool:
    """Can node ``n`` take and return MKLDNN tensors? (``on``: the earlier nodes that can.)"""
    takes_one_node = len(n.args) >= 1 and isinstance(n.args[0], fx.Node)
    if n.op == "call_module":
        m = modules[n.target]
        if type(m) is nn.Conv2d and call_counts[id(m)] > 1:
            return False  # a shared conv (under any of its names) would be converted for every call site
        return (_module_runs_on_mkldnn(m) and takes_one_node and len(n.args) == 1 and not n.kwargs
                and not _hidden_mutation(n, getattr(m, "inplace", False)))
    if n.op == "call_function" and n.target in _ALWAYS_FUNCTIONS:
        in_place = n.kwargs.get("inplace", False) or (len(n.args) > 1 and n.args[1] is True)
        return takes_one_node and not _hidden_mutation(n, in_place)
    if n.op == "call_function" and n.target in _BINARY_FUNCTIONS:
        return (len(n.args) == 2 and not n.kwargs
                and all(isinstance(a, fx.Node) and a in on for a in n.args) and _same_shapes(*n.args))
    return False


def _mkldnn_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that can run on MKLDNN tensors, in one topological sweep."""
    modules = modules_by_name(gm)
    call_counts: dict[int, int] = {}  # by module identity: one module may have several names
    for n in gm.graph.nodes:
        if n.op == "call_module":
            key = id(modules[n.target])
            call_counts[key] = call_counts.get(key, 0) + 1
    on: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if _runs_on_mkldnn(n, modules, call_counts, on):
            on.add(n)
    return on


@dataclass
class MkldnnRegion:
    """Connected nodes that would run on MKLDNN tensors."""

    nodes: list[fx.Node] = field(default_factory=list)
    num_convs: int = 0

    def inputs(self) -> list[fx.Node]:
        """Outside nodes the region reads: each needs one ``to_mkldnn``."""
        inside = set(self.nodes)
        return list(dict.fromkeys(a for n in self.nodes for a in n.all_input_nodes if a not in inside))

    def outputs(self) -> list[fx.Node]:
        """Region nodes read outside it: each needs one ``to_dense``."""
        inside = set(self.nodes)
        return [n for n in self.nodes if any(u not in inside for u in n.users)]

    def conversions(self) -> int:
        return len(self.inputs()) + len(self.outputs())

    def pays(self) -> bool:
        """The cost heuristic: a convolution, and enough work to amortize the conversions."""
        return self.num_convs > 0 and len(self.nodes) >= MIN_REGION_NODES


def mkldnn_regions(gm: fx.GraphModule) -> list[MkldnnRegion]:
    """Group MKLDNN-capable nodes into connected regions (union-find over graph edges)."""
    on = _mkldnn_nodes(gm)
    parent = {n: n for n in on}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in on:
        for a in n.all_input_nodes:
            if a in on:
                parent[root(a)] = root(n)
    modules = modules_by_name(gm)
    regions: dict[fx.Node, MkldnnRegion] = {}
    for n in gm.graph.nodes:  # graph order keeps each region's nodes topologically sorted
        if n in on:
            region = regions.setdefault(root(n), MkldnnRegion())
            region.nodes.append(n)
            if n.op == "call_module" and type(modules[n.target]) is nn.Conv2d:
                region.num_convs += 1
    return list(regions.values())


def _convert_region(gm: fx.GraphModule, region: MkldnnRegion, modules: dict[str, nn.Module]) -> int:
    """Swap in MKLDNN modules, add ``to_mkldnn`` at the region's inputs and ``to_dense`` at its outputs.

    Returns the number of conversion nodes added.
    """
    graph, inside = gm.graph, set(region.nodes)
    inputs, outputs = region.inputs(), region.outputs()
    for a in inputs:  # one to_mkldnn per outside tensor, before its first consumer in the region
        first_consumer = next(n for n in region.nodes if a in n.all_input_nodes)
        with graph.inserting_before(first_consumer):
            entered = graph.call_method("to_mkldnn", (a,))
        for n in region.nodes:
            n.replace_input_with(a, entered)
    for n in outputs:  # one to_dense per region output, read by every outside user
        outside_users = [u for u in n.users if u not in inside]
        with graph.inserting_after(n):
            dense = graph.call_method("to_dense", (n,))
        for u in outside_users:
            u.replace_input_with(n, dense)
    for n in region.nodes:
        if n.op == "call_module" and type(modules[n.target]) is nn.Conv2d:
            set_submodule(gm, n.target, MkldnnConv2d(modules[n.target]))
    return len(inputs) + len(outputs)


def to_mkldnn(gm: fx.GraphModule, region_pays: Callable[[MkldnnRegion], bool] = MkldnnRegion.pays,
              example_inputs: Sequence[Any] | torch.Tensor | None = None) -> str:
    """Run every region that pays on MKLDNN tensors (in place); return a one-line summary.

    ``example_inputs``: if given, shapes are propagated first (``ShapeProp``), so residual
    adds of equal shapes can join a region; without them (and without shapes recorded
    earlier) no add enters a region, since oneDNN cannot broadcast.

    Relies on private torch ops: :class:`MkldnnConv2d` re-orders its weight with
    ``torch._C._nn.mkldnn_reorder_conv2d_weight`` and runs ``torch.mkldnn_convolution``, as
    torch's own ``torch.fx.experimental.optimization.optimize_for_inference`` does. They are
    not a public API and may change with a torch release.
    """
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    modules = modules_by_name(gm)
    regions = mkldnn_regions(gm)
    kept = [r for r in regions if region_pays(r)]
    conversions = sum(_convert_region(gm, r, modules) for r in kept)
    gm.graph.lint()
    gm.recompile()
    total_convs = sum(1 for n in gm.graph.nodes if n.op == "call_module"
                      and isinstance(gm.get_submodule(n.target), (nn.Conv2d, MkldnnConv2d)))
    return (f"{len(kept)} of {len(regions)} MKLDNN-capable regions converted "
            f"({sum(len(r.nodes) for r in kept)} nodes, {sum(r.num_convs for r in kept)}/{total_convs} convs), "
            f"{conversions} layout conversions")


# --------------------------------------------------------------------------- channels_last

def channels_last_input(x: Any) -> Any:
    """NCHW -> NHWC storage for 4-D tensors (values unchanged); anything else passes."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def contiguous_output(x: Any) -> Any:
    """Back to the default (NCHW) storage for 4-D tensors, so callers see the usual layout."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous()
    return x


def to_channels_last(gm: fx.GraphModule) -> str:
    """Store 4-D conv weights and activations channels-last (in place); return a summary."""
    converted = 0
    for m in gm.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.dim() == 4:
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
            converted += 1
    if converted == 0:
        return "no 4-D convolutions: nothing to convert"
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    for p in inputs:
        with graph.inserting_after(p):
            converted_input = graph.call_function(channels_last_input, (p,))
        p.replace_all_uses_with(converted_input)
        converted_input.args = (p,)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        output.args = fx.node.map_arg(output.args, lambda n: graph.call_function(contiguous_output, (n,)))
    graph.lint()
    gm.recompile()
    return f"{converted} conv weights and {len(inputs)} input(s) stored channels-last"


# --------------------------------------------------------------------------- choosing

#: Layout name -> pass. "dense" leaves the graph as it is.
LAYOUTS: dict[str, Callable[[fx.GraphModule], str]] = {
    "mkldnn": to_mkldnn,
    "channels_last": to_channels_last,
    "dense": lambda gm: "kept the default (NCHW) layout",
}


def _mkldnn_pays_statically(gm: fx.GraphModule) -> tuple[bool, str]:
    """Without measurements: MKLDNN when its regions hold (nearly) every convolution and few
    conversions, i.e. long Conv-ReLU-add chains as in ResNets; else channels-last.

    Depthwise-separable nets (MobileNets, EfficientNets) break the regions at every ReLU6 /
    SiLU / Hardswish / SE multiply: many short regions, one pair of conversions each. Without
    shapes, residual adds cannot join a region either (see :func:`_same_shapes`).
    """
    modules = modules_by_name(gm)
    convs = sum(1 for n in gm.graph.nodes if n.op == "call_module" and type(modules[n.target]) is nn.Conv2d)
    paying = [r for r in mkldnn_regions(gm) if r.pays()]
    covered = sum(r.num_convs for r in paying)
    conversions = sum(r.conversions() for r in paying)
    share = covered / convs if convs else 0.0
    pays = share >= 0.9 and conversions <= covered / 4
    return pays, (f"static rule: MKLDNN regions would hold {covered}/{convs} convolutions "
                  f"with {conversions} layout conversions")


def _time_layouts(gm: fx.GraphModule, example_inputs: tuple[Any, ...], candidates: Sequence[str],
                  warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of ``gm(*example_inputs)`` with each layout applied to a copy
    (alternating rounds, :func:`fusionlib.bench.compare_latency`)."""
    versions = {}
    for name in candidates:
        version = copy.deepcopy(gm)  # keeps the shapes recorded in node.meta
        LAYOUTS[name](version)
        versions[name] = version
    table = compare_latency({k: (lambda v=v: v(*example_inputs)) for k, v in versions.items()},
                            warmup=warmup, repeats=repeats)
    return {row.name: row.median_ms for row in table.rows}


def choose_layout(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
                  candidates: Sequence[str] = ("mkldnn", "channels_last", "dense"),
                  warmup: int = 1, repeats: int = 5, *, timed: bool = False) -> str:
    """Apply the layout that pays (in place); return a summary naming it and why.

    Default (``timed=False``), deterministic: MKLDNN if its regions would hold at least 90%
    of the convolutions with at most one conversion per four convolutions (long
    Conv-ReLU-add chains, as in ResNets), else channels-last (MobileNets, EfficientNets:
    ReLU6 / SiLU / Hardswish / SE multiplies cut MKLDNN regions short). ``example_inputs``,
    if given, are only used to propagate shapes (residual adds join MKLDNN regions only
    with known, equal shapes); nothing is timed.

    ``timed=True`` (needs ``example_inputs``): each candidate is applied to a copy and timed
    (``warmup`` untimed rounds, then ``repeats`` alternating rounds); the smallest median
    wins, and the summary lists the median milliseconds of every candidate. The choice then
    depends on the machine and on its load at that moment: two calls may choose differently.
    """
    unknown = [c for c in candidates if c not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; choose from {sorted(LAYOUTS)}")
    if not candidates:
        raise ValueError("choose_layout needs at least one candidate layout")
    inputs = None
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if timed and inputs is None:
        raise ValueError("choose_layout(timed=True) needs example_inputs to time the candidates on")
    if inputs is not None:
        propagate_shapes(gm, inputs)
    if timed:
        medians = _time_layouts(gm, inputs, candidates, warmup, repeats)
        choice = min(medians, key=medians.get)
        detail = (f"timed, median of {repeats} alternating runs each: "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in medians.items()))
    else:
        mkldnn_pays, detail = _mkldnn_pays_statically(gm)
        preferred = ["mkldnn", "channels_last"] if mkldnn_pays else ["channels_last", "mkldnn"]
        choice = next((c for c in preferred if c in candidates), candidates[0])
    summary = LAYOUTS[choice](gm)
    return f"chose {choice} ({detail}): {summary}"
