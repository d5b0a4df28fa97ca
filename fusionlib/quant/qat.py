r"""Quantization-aware training: Conv+BN folded *while training*, and an FX pass that prepares a model (notebook 10).

**Why fold before quantizing.** At deployment a Conv+BN pair is one conv with
``W' = W·γ/σ`` and ``b' = β + (b − μ)·γ/σ`` (``σ = √(σ²_run + ε)``,
:mod:`fusionlib.folding`). The integers that run are those of ``W'``, not of
``W``: quantizing ``W`` and folding afterwards multiplies every channel's grid
by ``γ/σ`` and the result is no longer on an int8 grid. So QAT must quantize
the *folded* weight.

**Batch statistics with the running-statistics correction** (Jacob et al. 2018,
Krishnamoorthi 2018 §3.2, torch's ``nniqat.ConvBn2d``). While training, BN
normalizes with the batch's ``μ_B, σ_B``, which jump from batch to batch; folding
them into the quantized weight would make the weight grid jitter. Instead the
weight is folded with the *running* ``σ_run`` and the output is corrected::

    s        = γ / σ_run                                   (per output channel)
    y_conv   = conv(x, fq(W·s)) / s  (+ b)                 fq = the weight quantizer
    y        = BN_batch(y_conv) = γ·(y_conv − μ_B)/σ_B + β

which equals ``conv(x, fq(W·s)) · σ_run/σ_B + (β − γ·μ_B/σ_B)`` (the paper's
correction factor ``c = σ_B/σ_run`` undone on the output), trains the batch
statistics and updates the running ones. In eval mode, or after
:meth:`QATConvBn2d.freeze_bn_stats`, BN uses the running statistics and the
same formula is exactly the deployed layer ``conv(x, fq(W')) + b'``
(:meth:`QATConvBn2d.folded`). Freezing the statistics for the last epochs removes
the train / deploy mismatch (Krishnamoorthi's recipe). With running
statistics the layer computes ``conv(x, fq(W')) + b'`` directly, the
deployed arithmetic (no division by ``s``, which would amplify float
rounding in channels with a tiny ``γ``).

**Gradients.** ``round`` is handled by the straight-through estimator of
:class:`~fusionlib.quant.FakeQuantizeFunction`: ``∂fq(w)/∂w = 1`` inside
``[−amax, amax]``, 0 outside. ``W``, ``b``, ``γ``, ``β`` all get gradients through
``W·s`` and the BN.

**prepare_qat** (:func:`prepare_qat`) traces a model with
:func:`fusionlib.fx.symbolic_trace`, decides everything first, then rewrites:

1. every ``Conv2d → BatchNorm2d (→ ReLU)`` chain whose intermediate outputs have
   one user becomes a :class:`QATConvBn2d` (``relu=True`` with the ReLU); any
   other Conv2d / Linear becomes :class:`QATConv2d` / :class:`QATLinear`
   (weight quantizer only); every BatchNorm left is a skip with its reason;
2. one activation :class:`~fusionlib.quant.TensorQuantizer` per *tensor* that an
   int8 kernel produces: the model input, each QAT layer's output and each
   tensor ``add`` (residual adds). When that output's only user is a ReLU /
   ReLU6 the quantizer goes after the activation and is unsigned (the grid
   ``[0, 255]``). Max pooling, ReLU, flatten, dropout keep values on the grid;
   average pools re-apply their input's quantizer (the int8 kernel keeps the
   input's scale). So every conv, linear and add input is quantized, and each
   tensor has exactly one scale — what :func:`fusionlib.quant.int8.convert_int8`
   needs to run the same arithmetic in integers.

The result is a trainable ``torch.fx.GraphModule`` whose report
(:class:`QATReport`) is ``gm.qat_report``. Initialize amax with
:func:`fusionlib.quant.calibrate`, then train with :func:`fusionlib.train.fit`.
"""
from __future__ import annotations

import copy
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fusionlib.fx.tracing import modules_by_name, symbolic_trace
from fusionlib.quant.descriptor import (
    QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_PER_TENSOR,
    QuantDescriptor,
)
from fusionlib.quant.modules import _CONV_ARGS, QuantMixin, _check_descriptor
from fusionlib.quant.tensor_quantizer import TensorQuantizer

__all__ = [
    "QATConvBn2d",
    "QATConv2d",
    "QATLinear",
    "QAT_LAYERS",
    "QATReport",
    "prepare_qat",
    "freeze_bn_stats",
    "export_folded",
    "ACTIVATION_QUANTIZERS",
    "trained_qat_model",
]

#: Where prepare_qat puts the activation quantizers it inserts (``gm.act_quant.<node name>``).
ACTIVATION_QUANTIZERS = "act_quant"


# ---------------------------------------------------------------------- QAT layers
class QATConvBn2d(QuantMixin, nn.Module):
    """Conv2d + BatchNorm2d (+ ReLU) trained with the folded weight fake-quantized (see the module docstring).

    Holds the float ``conv`` and ``bn`` (so the BN keeps training) and one
    ``weight_quantizer`` (per output channel by default). Its activation
    quantizers live in the graph (:func:`prepare_qat`).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = False,
                 weight_desc: QuantDescriptor = QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL) -> None:
        super().__init__()
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"QATConvBn2d takes an nn.Conv2d, got {type(conv).__name__}")
        if type(bn) is not nn.BatchNorm2d:
            raise TypeError(f"QATConvBn2d takes an nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"BatchNorm2d has {bn.num_features} features but the conv has {conv.out_channels} output channels")
        if not (bn.affine and bn.track_running_stats):
            raise ValueError("QATConvBn2d needs a BatchNorm2d with affine=True and track_running_stats=True "
                             f"(got affine={bn.affine}, track_running_stats={bn.track_running_stats})")
        if conv.padding_mode != "zeros":
            raise ValueError(f"QATConvBn2d supports padding_mode='zeros', got {conv.padding_mode!r}")
        self.conv = conv
        self.bn = bn
        self.relu = bool(relu)
        self.freeze_bn = False
        self.weight_quantizer = TensorQuantizer(_check_descriptor(weight_desc, "weight_desc"))
        self._missing_quantizer_keys = ()
        self.training = conv.training

    quantizer_names = ("weight_quantizer",)

    def freeze_bn_stats(self) -> "QATConvBn2d":
        """From now on normalize with the running statistics and stop updating them (also in train mode)."""
        self.freeze_bn = True
        return self

    def unfreeze_bn_stats(self) -> "QATConvBn2d":
        self.freeze_bn = False
        return self

    def scale_factor(self) -> torch.Tensor:
        """``s = γ / √(σ²_run + ε)``, one per output channel."""
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)

    def quantized_weight(self) -> torch.Tensor:
        """``fq(W · s)``: the folded weight on the integer grid (what int8 runs)."""
        s = self.scale_factor()
        return self.weight_quantizer(self.conv.weight * s.reshape(-1, 1, 1, 1))

    def folded_bias(self) -> torch.Tensor:
        """``b' = β + (b − μ_run)·s``: the deployed bias."""
        s = self.scale_factor()
        b = self.conv.bias if self.conv.bias is not None else torch.zeros_like(self.bn.running_mean)
        return self.bn.bias + (b - self.bn.running_mean) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        s = self.scale_factor()
        w = self.weight_quantizer(self.conv.weight * s.reshape(-1, 1, 1, 1))
        if not self.training or self.freeze_bn:
            # running statistics: BN(conv(x, w)/s + b) = conv(x, w) + b', computed as deployed (no division by s)
            y = self.conv._conv_forward(x, w, self.folded_bias())
            return F.relu(y) if self.relu else y
        y = self.conv._conv_forward(x, w, None) / s.reshape(1, -1, 1, 1)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(1, -1, 1, 1)
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)
        return F.relu(y) if self.relu else y

    def folded(self) -> nn.Conv2d:
        """The deployed float conv: weight ``fq(W')``, bias ``b'`` (equal to this layer in eval mode, up to rounding)."""
        c = self.conv
        out = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                        bias=True, device=c.weight.device, dtype=c.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.quantized_weight())
            out.bias.copy_(self.folded_bias())
        return out.train(False)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, freeze_bn={self.freeze_bn}"


class _WeightQuantized(QuantMixin):
    """A float layer whose weight alone is fake-quantized; its activation quantizers live in the graph."""

    quantizer_names = ("weight_quantizer",)

    @classmethod
    def from_layer(cls, layer: nn.Module, weight_desc: QuantDescriptor = QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL):
        """A copy of ``layer`` (its hyperparameters ``_float_args``, parameters and train flag) with a weight quantizer."""
        kwargs = {name: getattr(layer, name) for name in cls._float_args}
        with torch.random.fork_rng(devices=[]):
            new = cls(**kwargs, bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)
        new.weight_quantizer = TensorQuantizer(_check_descriptor(weight_desc, "weight_desc"))
        new.load_state_dict(layer.state_dict(), strict=False)
        new._missing_quantizer_keys = ()
        for name, param in layer.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(param.requires_grad)
        return new.train(layer.training)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)


class QATConv2d(_WeightQuantized, nn.Conv2d):
    """A Conv2d whose weight is fake-quantized (a conv without a BatchNorm after it); activations are quantized in the graph."""

    _float_args = _CONV_ARGS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QATLinear(_WeightQuantized, nn.Linear):
    """A Linear whose weight is fake-quantized (per row by default); activations are quantized in the graph."""

    _float_args = ("in_features", "out_features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


QAT_LAYERS: tuple[type[nn.Module], ...] = (QATConvBn2d, QATConv2d, QATLinear)


# ---------------------------------------------------------------------- graph vocabulary
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {F.relu, torch.relu, F.relu6}
#: Ops that keep values on their input's grid (the int8 kernel keeps the scale).
_GRID_MODULES = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.Dropout, nn.Identity, nn.Flatten)
_GRID_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.flatten, F.max_pool2d, F.dropout}
_GRID_METHODS = {"flatten", "view", "reshape", "relu"}
_AVGPOOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_AVGPOOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d}
_ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}


def _is_module(node: fx.Node, modules: dict[str, nn.Module], types: tuple[type, ...]) -> bool:
    return node.op == "call_module" and type(modules[node.target]) in types


def is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if _is_module(node, modules, _RELU_MODULES):
        return True
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target == "relu"


def is_tensor_add(node: fx.Node) -> bool:
    """``a + b`` with two graph tensors (a residual add), not ``x + 1``."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        args = node.args
    elif node.op == "call_method" and node.target == "add":
        args = node.args
    else:
        return False
    return len(args) >= 2 and all(isinstance(a, fx.Node) for a in args[:2]) and not node.kwargs.get("alpha")


def keeps_grid(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if _is_module(node, modules, _GRID_MODULES):
        return True
    if node.op == "call_function" and node.target in _GRID_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in _GRID_METHODS


def is_avgpool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return _is_module(node, modules, _AVGPOOL_MODULES) or (node.op == "call_function" and node.target in _AVGPOOL_FUNCTIONS)


# ---------------------------------------------------------------------- the report
@dataclass
class QATReport:
    """What :func:`prepare_qat` did: fused chains, converted layers, quantizers inserted, and every skip with its reason."""

    model_name: str
    fused: list[tuple[str, str, str | None]] = field(default_factory=list)   # (conv, bn, relu or None)
    converted: list[str] = field(default_factory=list)                      # Conv2d / Linear without BN
    quantizers: dict[str, str] = field(default_factory=dict)                 # quantizer name -> node it quantizes
    reapplied: list[str] = field(default_factory=list)                       # avg pools re-using their input's quantizer
    skipped: list[tuple[str, str]] = field(default_factory=list)             # (node, reason)

    def __str__(self) -> str:
        lines = [f"QATReport({self.model_name}): {len(self.fused)} Conv+BN chain(s) fused for QAT "
                 f"({sum(r is not None for *_, r in self.fused)} with ReLU), {len(self.converted)} layer(s) with "
                 f"weight quantizer only, {len(self.quantizers)} activation quantizer(s), "
                 f"{len(self.reapplied)} average pool(s) re-using their input's quantizer"]
        for node, reason in self.skipped[:8]:
            lines.append(f"  skipped {node}: {reason}")
        if len(self.skipped) > 8:
            lines.append(f"  ... {len(self.skipped) - 8} more skip(s)")
        return "\n".join(lines)


# ---------------------------------------------------------------------- prepare_qat
def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _plan_fusion(gm: fx.GraphModule, modules: dict[str, nn.Module], report: QATReport):
    """[(conv node, bn node, relu node or None)], every BN not taken noted in ``report.skipped``."""
    calls: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[id(modules[node.target])] = calls.get(id(modules[node.target]), 0) + 1
    chains = []
    for node in gm.graph.nodes:
        if not _is_module(node, modules, (nn.BatchNorm2d,)):
            continue
        conv = node.args[0] if node.args else None
        if not (isinstance(conv, fx.Node) and _is_module(conv, modules, (nn.Conv2d,))):
            report.skipped.append((node.name, "BatchNorm2d not right after an nn.Conv2d call; left in float"))
            continue
        bn_mod, conv_mod = modules[node.target], modules[conv.target]
        if len(conv.users) != 1:
            reason = f"the conv output {conv.name} has {len(conv.users)} users (the others would see the BN output)"
        elif calls[id(conv_mod)] > 1 or calls[id(bn_mod)] > 1:
            reason = "the conv or BatchNorm module is called more than once (folding would change every call)"
        elif not (bn_mod.affine and bn_mod.track_running_stats):
            reason = "the BatchNorm has no affine parameters or no running statistics"
        elif conv_mod.padding_mode != "zeros":
            reason = f"padding_mode={conv_mod.padding_mode!r} (only 'zeros')"
        elif bn_mod.num_features != conv_mod.out_channels:
            reason = "channel counts differ"
        else:
            relu = _single_user(node)
            relu = relu if relu is not None and _is_module(relu, modules, (nn.ReLU,)) else None
            chains.append((conv, node, relu))
            continue
        report.skipped.append((node.name, reason))
    return chains


def _output_anchor(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, bool]:
    """Where a quantized op's output quantizer goes: after its only-user ReLU / ReLU6 (unsigned), else right after it."""
    user = _single_user(node)
    if user is not None and is_relu(user, modules):
        return user, True
    return node, False


def prepare_qat(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    weight_desc: QuantDescriptor = QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    input_desc: QuantDescriptor = QUANT_DESC_8BIT_PER_TENSOR,
    *,
    inplace: bool = False,
    **trace_kwargs: Any,
) -> fx.GraphModule:
    """Trace ``model``, fuse Conv+BN(+ReLU) for QAT, insert quantizers; return a trainable fake-quant GraphModule.

    ``weight_desc``: the weight quantizers' descriptor (per output channel,
    ``axis=0``, by default; ``num_bits=4`` for 4-bit weights). ``input_desc``:
    the activation quantizers' (per tensor); after a ReLU / ReLU6 the same
    descriptor with ``unsigned=True`` is used. ``example_inputs`` (optional)
    are run once through the result to check it computes. Every quantizer
    starts without amax: call :func:`fusionlib.quant.calibrate` next.
    The model is deep-copied unless ``inplace=True``; its train / eval mode is
    kept. The report is ``gm.qat_report``. Raises
    :class:`fusionlib.fx.FxTraceError` (with its ways out) for an untraceable model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat takes an nn.Module, got {type(model).__name__}")
    _check_descriptor(weight_desc, "weight_desc")
    _check_descriptor(input_desc, "input_desc")
    if input_desc.axis is not None:
        raise ValueError(f"input_desc must be per tensor (axis=None), got axis={input_desc.axis}: "
                         "an int8 activation has one scale")
    if weight_desc.axis not in (None, (0,)):
        raise ValueError(f"weight_desc must be per tensor or per output channel (axis=0), got axis={weight_desc.axis}")
    if any(isinstance(m, (TensorQuantizer,) + QAT_LAYERS) for m in model.modules()):
        raise ValueError("prepare_qat: the model already has quantizers / QAT layers; pass the float model")
    name = type(model).__name__
    training = model.training
    if not inplace:
        model = copy.deepcopy(model)
    gm = model if isinstance(model, fx.GraphModule) else symbolic_trace(model, **trace_kwargs)
    modules = modules_by_name(gm)
    report = QATReport(name)

    # ---- decide everything first
    chains = _plan_fusion(gm, modules, report)
    in_chain = {id(n) for chain in chains for n in chain if n is not None}
    lone = [n for n in gm.graph.nodes if id(n) not in in_chain and _is_module(n, modules, (nn.Conv2d, nn.Linear))]
    calls: dict[int, int] = {}
    for n in lone:
        calls[id(modules[n.target])] = calls.get(id(modules[n.target]), 0) + 1
    for n in list(lone):
        if calls[id(modules[n.target])] > 1:
            report.skipped.append((n.name, "module called more than once; left in float"))
            lone.remove(n)
        elif isinstance(modules[n.target], nn.Conv2d) and modules[n.target].padding_mode != "zeros":
            report.skipped.append((n.name, "padding_mode is not 'zeros'; left in float"))
            lone.remove(n)
    new_modules = {}
    for conv, bn, relu in chains:
        new_modules[conv.target] = QATConvBn2d(modules[conv.target], modules[bn.target], relu is not None, weight_desc)
    for n in lone:
        m = modules[n.target]
        new_modules[n.target] = (QATConv2d if isinstance(m, nn.Conv2d) else QATLinear).from_layer(m, weight_desc)
    unsigned_desc = input_desc.replace(unsigned=True)
    for n in gm.graph.nodes:  # other ops that have no int8 kernel here are noted, not failed
        if n.op in ("call_module", "call_function", "call_method") and id(n) not in in_chain and n not in lone:
            known = (keeps_grid(n, modules) or is_avgpool(n, modules) or is_tensor_add(n)
                     or _is_module(n, modules, (nn.BatchNorm2d,)))
            if not known:
                report.skipped.append((n.name, "no int8 kernel for this op; it runs in float (convert_int8 dequantizes around it)"))

    # ---- rewrite
    for conv, bn, relu in chains:
        last = relu if relu is not None else bn
        last.replace_all_uses_with(conv)
        gm.graph.erase_node(last)
        if relu is not None:
            gm.graph.erase_node(bn)
        report.fused.append((conv.target, bn.target, None if relu is None else relu.target))
    for target, new in new_modules.items():
        gm.add_submodule(target, new)
    report.converted = [n.target for n in lone]
    modules = modules_by_name(gm)
    gm.add_submodule(ACTIVATION_QUANTIZERS, nn.Module())
    holder = gm.get_submodule(ACTIVATION_QUANTIZERS)

    def insert_after(anchor: fx.Node, desc: QuantDescriptor) -> fx.Node:
        qname = anchor.name
        holder.add_module(qname, TensorQuantizer(desc.replace(name=qname)))
        with gm.graph.inserting_after(anchor):
            qnode = gm.graph.call_module(f"{ACTIVATION_QUANTIZERS}.{qname}", (anchor,))
        anchor.replace_all_uses_with(qnode, delete_user_cb=lambda u: u is not qnode)
        report.quantizers[f"{ACTIVATION_QUANTIZERS}.{qname}"] = anchor.name
        return qnode

    producers = [n for n in gm.graph.nodes
                 if n.op == "placeholder" or (n.op == "call_module" and isinstance(modules[n.target], QAT_LAYERS))
                 or is_tensor_add(n)]
    quantizer_of: dict[fx.Node, fx.Node] = {}
    for n in producers:
        if n.op == "placeholder":
            quantizer_of[n] = insert_after(n, input_desc)
            continue
        anchor, after_relu = _output_anchor(n, modules)
        fused_relu = n.op == "call_module" and isinstance(modules[n.target], QATConvBn2d) and modules[n.target].relu
        quantizer_of[n] = insert_after(anchor, unsigned_desc if (after_relu or fused_relu) else input_desc)
    # inputs of quantized ops that come from a float op (no int8 kernel): quantize them there
    modules = modules_by_name(gm)

    def reaches_quantizer(v: fx.Node) -> bool:
        while isinstance(v, fx.Node):
            if v.op == "call_module" and v.target.startswith(ACTIVATION_QUANTIZERS + "."):
                return True
            if not (keeps_grid(v, modules) or is_avgpool(v, modules)) or not v.args:
                return False
            v = v.args[0]
        return False

    for n in list(gm.graph.nodes):
        quantized_op = (n.op == "call_module" and isinstance(modules[n.target], QAT_LAYERS)) or is_tensor_add(n)
        if not quantized_op:
            continue
        for a in n.args[:2] if is_tensor_add(n) else n.args[:1]:
            if isinstance(a, fx.Node) and not reaches_quantizer(a):
                insert_after(a, input_desc)
                modules = modules_by_name(gm)
    # average pools: re-apply the quantizer their input carries
    modules = modules_by_name(gm)
    for n in list(gm.graph.nodes):
        if not is_avgpool(n, modules):
            continue
        src = n.args[0]
        while isinstance(src, fx.Node) and not (src.op == "call_module" and src.target.startswith(ACTIVATION_QUANTIZERS + ".")):
            if not keeps_grid(src, modules):
                src = None
                break
            src = src.args[0]
        if src is None:
            report.skipped.append((n.name, "average pool whose input is not on a quantizer's grid; left as is"))
            continue
        with gm.graph.inserting_after(n):
            qnode = gm.graph.call_module(src.target, (n,))
        n.replace_all_uses_with(qnode, delete_user_cb=lambda u: u is not qnode)
        report.reapplied.append(n.name)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.train(training)
    gm.qat_report = report
    if example_inputs is not None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        with torch.no_grad():
            from fusionlib.quant.ptq import disabled_quantizers
            with disabled_quantizers(gm):
                was = gm.training
                gm.eval()
                try:
                    gm(*args)
                finally:
                    gm.train(was)
    return gm


def freeze_bn_stats(model: nn.Module) -> int:
    """:meth:`QATConvBn2d.freeze_bn_stats` on every QAT Conv+BN of ``model``; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, QATConvBn2d):
            m.freeze_bn_stats()
            count += 1
    return count


def export_folded(qat_model: fx.GraphModule, keep_activation_quantizers: bool = True) -> fx.GraphModule:
    """The deployed float model: every QAT layer replaced by a float layer holding its fake-quantized folded weight.

    :class:`QATConvBn2d` becomes ``nn.Conv2d(fq(W'), b')`` (+ ``nn.ReLU``),
    :class:`QATConv2d` / :class:`QATLinear` their float class with ``fq(W)``.
    With ``keep_activation_quantizers`` the activation quantizers stay (the
    result equals the QAT model in eval mode, up to float rounding); without,
    it is the fp32 model whose weights are the int8 ones. Returns a new eval-mode GraphModule.
    """
    if not isinstance(qat_model, fx.GraphModule) or not hasattr(qat_model, ACTIVATION_QUANTIZERS):
        raise TypeError(f"export_folded takes the GraphModule made by prepare_qat, got {type(qat_model).__name__}")
    gm = copy.deepcopy(qat_model).eval()
    modules = modules_by_name(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = modules[node.target]
        with torch.no_grad():
            if isinstance(m, QATConvBn2d):
                new: nn.Module = m.folded()
                if m.relu:
                    new = nn.Sequential(new, nn.ReLU())
            elif isinstance(m, QATConv2d):
                new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                m.groups, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype).eval()
                new.weight.copy_(m.quantized_weight())
                if m.bias is not None:
                    new.bias.copy_(m.bias)
            elif isinstance(m, QATLinear):
                new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                device=m.weight.device, dtype=m.weight.dtype).eval()
                new.weight.copy_(m.quantized_weight())
                if m.bias is not None:
                    new.bias.copy_(m.bias)
            elif isinstance(m, TensorQuantizer) and not keep_activation_quantizers:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                continue
            else:
                continue
        gm.add_submodule(node.target, new)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval()


# ---------------------------------------------------------------------- QAT fine-tuning of the digits models, cached
#: Part of every trained_qat_model cache key: bump it when QAT's arithmetic changes.
QAT_CACHE_VERSION = 1

def trained_qat_model(
    name: str = "resnet18",
    weight_bits: int = 8,
    epochs: int = 1,
    lr: float = 0.005,
    freeze_bn_epoch: int | None = None,
    calib_batches: int = 4,
    learn_amax: bool = False,
    seed: int = 0,
    fp32_epochs: int = 3,
    image_size: int = 32,
    progress: bool = True,
    use_cache: bool = True,
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """A digits model fine-tuned with QAT from its fp32 checkpoint (:func:`fusionlib.zoo.trained_model`), cached.

    Steps: ``prepare_qat`` (per-channel ``weight_bits`` weights, 8-bit
    activations), ``calibrate`` (max, ``calib_batches`` training batches: the
    PTQ starting point), then :func:`fusionlib.train.fit` for ``epochs`` with
    peak rate ``lr``, BatchNorm training with batch statistics and the
    running-statistics correction. ``freeze_bn_epoch=k`` freezes the
    statistics after ``k`` epochs (``0``: from the start; ``None``: never in
    this run); the two parts are two :func:`fit` calls, each with its own
    one-cycle schedule. ``learn_amax``:
    the activation and weight amax are trained too (LSQ gradient). The state
    dict and metrics are cached in :func:`fusionlib.zoo.cache_dir` under
    ``qat-{name}-{key}.pt``, keyed by every parameter here except ``progress``
    / ``use_cache``, plus the torch version; written atomically.
    Returns ``(qat_model.eval(), metrics)``: ``ptq_accuracy`` (after
    calibration, before training), ``test_accuracy``, ``fp32_accuracy``,
    ``history``, ``train_seconds``, ``params``, ``cached``.
    """
    from fusionlib import zoo
    from fusionlib.data import digits_loaders
    from fusionlib.quant.ptq import calibrate
    from fusionlib.train import evaluate, fit, seed_everything

    params = {"name": name, "weight_bits": int(weight_bits), "epochs": int(epochs), "lr": float(lr),
              "freeze_bn_epoch": freeze_bn_epoch, "calib_batches": int(calib_batches), "learn_amax": bool(learn_amax),
              "seed": int(seed), "fp32_epochs": int(fp32_epochs), "image_size": int(image_size),
              "qat_version": QAT_CACHE_VERSION}
    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if freeze_bn_epoch is not None and not (isinstance(freeze_bn_epoch, int) and freeze_bn_epoch >= 0):
        raise ValueError(f"freeze_bn_epoch must be None or an int >= 0, got {freeze_bn_epoch!r}")
    key = zoo.cache_key(params)
    path = zoo.cache_dir() / f"qat-{name}-{key}.pt"
    fp32, fp32_metrics = zoo.trained_model(name, epochs=fp32_epochs, image_size=image_size, seed=seed, progress=progress)
    train_loader, test_loader = digits_loaders(image_size=image_size, seed=seed)
    example = next(iter(test_loader))[0]
    weight_desc = QuantDescriptor(num_bits=int(weight_bits), axis=0, learn_amax=bool(learn_amax))
    input_desc = QuantDescriptor(num_bits=8, learn_amax=bool(learn_amax))

    frozen = freeze_bn_epoch is not None and freeze_bn_epoch <= epochs  # BN statistics frozen by the end

    def fresh() -> fx.GraphModule:
        return prepare_qat(fp32, example, weight_desc=weight_desc, input_desc=input_desc)

    def train(gm: fx.GraphModule) -> dict[str, Any]:
        seed_everything(seed)
        calibrate(gm, train_loader, num_batches=calib_batches)
        ptq_accuracy = evaluate(gm.eval(), test_loader)
        start = time.perf_counter()
        live = epochs if freeze_bn_epoch is None else min(freeze_bn_epoch, epochs)
        history = fit(gm, train_loader, live, lr=lr, seed=seed, test_loader=test_loader, progress=progress) if live else []
        if frozen:
            freeze_bn_stats(gm)
            if epochs > live:
                more = fit(gm, train_loader, epochs - live, lr=lr, seed=seed + 1, test_loader=test_loader, progress=progress)
                history += [dict(row, epoch=row["epoch"] + live) for row in more]
        return {"ptq_accuracy": ptq_accuracy, "test_accuracy": evaluate(gm.eval(), test_loader),
                "fp32_accuracy": fp32_metrics["test_accuracy"], "history": history,
                "train_seconds": time.perf_counter() - start, "params": params, "key": key}

    # the freeze flag is not in the state dict: a cached model gets it back after loading
    return zoo.cached_training(path, fresh, train, use_cache, restored=freeze_bn_stats if frozen else None)
