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
:func:`fusionlib.fx.symbolic_trace` *in eval mode* (the graph int8 will run:
a functional ``F.dropout(x, p, self.training)`` is recorded inactive, and the
report says so), decides everything first, then rewrites:

1. every ``Conv2d → BatchNorm2d (→ ReLU)`` chain whose intermediate outputs have
   one user becomes a :class:`QATConvBn2d` (``relu=True`` with the ReLU); any
   other Conv2d / Linear becomes :class:`QATConv2d` / :class:`QATLinear`
   (weight quantizer only); every BatchNorm left is a skip with its reason;
2. one activation :class:`~fusionlib.quant.TensorQuantizer` per *tensor* that an
   int8 kernel produces: the model input, each QAT layer's output and each
   tensor ``add`` (residual adds). Activations are signed, unless the
   output's only user is a ReLU / ReLU6: then the quantizer goes after the
   activation and is unsigned (the grid ``[0, 255]``). The model input has
   its own descriptor (``quant_desc_model_input``: unsigned for images in
   ``[0, 1]``). Max pooling, ReLU, flatten, dropout keep values on the grid;
   average pools re-apply their input's quantizer (the int8 kernel keeps the
   input's scale). So every conv, linear and add input is quantized, and each
   tensor has exactly one scale — what :func:`fusionlib.quant.int8.convert_int8`
   needs to run the same arithmetic in integers.

Hooks follow the library's policy (:func:`fusionlib.modules.carry_forward_hooks`):
a converted layer keeps its forward hooks; a fused chain takes the conv's
forward pre-hooks and the last module's forward hooks, and every other hook
of the chain is named in a warning.

The result is a trainable ``torch.fx.GraphModule`` whose report
(:class:`QATReport`) is ``gm.qat_report``. Initialize amax with
:func:`fusionlib.quant.calibrate`, then train with :func:`fusionlib.train.fit`.
"""
from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fusionlib.fx.tracing import modules_by_name, symbolic_trace
from fusionlib.modules import carry_forward_hooks, eval_mode, warn_dropped_hooks
from fusionlib.quant.descriptor import (
    QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW,
    QUANT_DESC_8BIT_PER_TENSOR,
    QuantDescriptor,
)
from fusionlib.quant.modules import _CONV_ARGS, QuantMixin, _check_descriptor, float_conv
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
                 quant_desc_weight: QuantDescriptor = QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL) -> None:
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
        self.weight_quantizer = TensorQuantizer(_check_descriptor(quant_desc_weight, "quant_desc_weight"))
        self._missing_quantizer_keys = ()
        self.training = conv.training

    # freeze_bn is state: it survives a state_dict round trip (a one-element tensor, like every other value)
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.freeze_bn])

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.freeze_bn = bool(state.reshape(-1)[0])

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
        y = self.conv._conv_forward(x, w, None) / self._nonzero(s).reshape(1, -1, 1, 1)
        pruned = (s == 0).reshape(1, -1, 1, 1)
        if bool(pruned.any()):  # γ = 0: fq(W·0) says nothing of conv(x, W), which the batch statistics need
            y = torch.where(pruned, self.conv._conv_forward(x, self.conv.weight, None), y)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(1, -1, 1, 1)
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)
        return F.relu(y) if self.relu else y

    @staticmethod
    def _nonzero(s: torch.Tensor) -> torch.Tensor:
        """``s`` with its zeros (pruned channels, γ = 0) replaced by 1, so dividing by it never gives 0/0."""
        return torch.where(s == 0, torch.ones_like(s), s)

    def folded(self) -> nn.Conv2d:
        """The deployed float conv: weight ``fq(W')``, bias ``b'`` (equal to this layer in eval mode, up to rounding)."""
        with torch.no_grad():
            return float_conv(self.conv, self.quantized_weight(), self.folded_bias())

    def extra_repr(self) -> str:
        return f"relu={self.relu}, freeze_bn={self.freeze_bn}"


class _WeightOnlyQuantized(QuantMixin):
    """A float layer whose weight alone is fake-quantized; its input quantizer lives in the graph (built by ``from_float``)."""

    default_quant_desc_input = None

    def __init__(self, *args: Any, quant_desc_weight: QuantDescriptor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizers(None, quant_desc_weight)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)


class QATConv2d(_WeightOnlyQuantized, nn.Conv2d):
    """A Conv2d whose weight is fake-quantized (a conv without a BatchNorm after it); activations are quantized in the graph.

    Built with ``QATConv2d.from_float(conv, quant_desc_weight=...)``.
    """

    _float_module = nn.Conv2d
    _float_args = _CONV_ARGS
    default_quant_desc_weight = QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QATLinear(_WeightOnlyQuantized, nn.Linear):
    """A Linear whose weight is fake-quantized (per row by default); activations are quantized in the graph."""

    _float_module = nn.Linear
    _float_args = ("in_features", "out_features")
    default_quant_desc_weight = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW

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


def _call_counts(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> dict[int, int]:
    """``{id(module): how many call_module nodes call it}``."""
    calls: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[id(modules[node.target])] = calls.get(id(modules[node.target]), 0) + 1
    return calls


def _plan_fusion(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[int, int], report: QATReport):
    """[(conv node, bn node, relu node or None)], every BN not taken noted in ``report.skipped``."""
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


def _plan_lone_layers(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[int, int], in_chain: set[int],
                      report: QATReport) -> list[fx.Node]:
    """The Conv2d / Linear calls outside the chains that become QATConv2d / QATLinear; the others noted."""
    lone = []
    for n in gm.graph.nodes:
        if id(n) in in_chain or not _is_module(n, modules, (nn.Conv2d, nn.Linear)):
            continue
        if calls[id(modules[n.target])] > 1:
            report.skipped.append((n.name, "module called more than once; left in float"))
        elif isinstance(modules[n.target], nn.Conv2d) and modules[n.target].padding_mode != "zeros":
            report.skipped.append((n.name, "padding_mode is not 'zeros'; left in float"))
        else:
            lone.append(n)
    return lone


_FUNCTIONAL_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


def _note_float_ops(gm: fx.GraphModule, modules: dict[str, nn.Module], handled: set[int], report: QATReport) -> None:
    """Report the ops with no int8 kernel here (they run in float) and functional dropouts (traced inactive)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _FUNCTIONAL_DROPOUTS:
            report.skipped.append((n.name, "functional dropout, traced in eval mode: it does not drop in training "
                                           "either (use an nn.Dropout module to train with dropout)"))
        elif n.op in ("call_module", "call_function", "call_method") and id(n) not in handled:
            known = (keeps_grid(n, modules) or is_avgpool(n, modules) or is_tensor_add(n)
                     or _is_module(n, modules, (nn.BatchNorm2d,)))
            if not known:
                report.skipped.append((n.name, "no int8 kernel for this op; it runs in float "
                                               "(convert_int8 dequantizes around it)"))


def _build_qat_layers(modules: dict[str, nn.Module], calls: dict[int, int], chains, lone: list[fx.Node],
                      quant_desc_weight: QuantDescriptor) -> dict[str, nn.Module]:
    """``{conv target: its QAT layer}``; hooks moved by the policy (a chain: conv's pre-hooks, last module's forward hooks)."""
    new_modules: dict[str, nn.Module] = {}
    for conv, bn, relu in chains:
        new = QATConvBn2d(modules[conv.target], modules[bn.target], relu is not None, quant_desc_weight)
        carry_forward_hooks(modules[conv.target], new, conv.target, kinds=("forward_pre",))
        last = relu if relu is not None and calls[id(modules[relu.target])] == 1 else bn
        if relu is not None and last is bn:
            warn_dropped_hooks(modules[relu.target], relu.target, f"one of its calls is fused into '{conv.target}' "
                               "(QATConvBn2d), which does not call it")
        if last is not bn:
            warn_dropped_hooks(modules[bn.target], bn.target, f"it is fused into '{conv.target}' (QATConvBn2d)")
        carry_forward_hooks(modules[last.target], new, last.target, kinds=("forward",))
        new_modules[conv.target] = new
    for n in lone:
        old = modules[n.target]
        new_modules[n.target] = (QATConv2d if isinstance(old, nn.Conv2d) else QATLinear).from_float(
            old, quant_desc_weight=quant_desc_weight)
        carry_forward_hooks(old, new_modules[n.target], n.target)
    return new_modules


def _fuse_chains(gm: fx.GraphModule, chains, new_modules: dict[str, nn.Module], report: QATReport) -> None:
    """Rewrite: each chain's last node's users read the conv node (now the QAT layer); the BN / ReLU nodes go."""
    for conv, bn, relu in chains:
        last = relu if relu is not None else bn
        last.replace_all_uses_with(conv)
        gm.graph.erase_node(last)
        if relu is not None:
            gm.graph.erase_node(bn)
        report.fused.append((conv.target, bn.target, None if relu is None else relu.target))
    for target, new in new_modules.items():
        gm.add_submodule(target, new)


def _insert_activation_quantizers(gm: fx.GraphModule, report: QATReport, quant_desc_input: QuantDescriptor,
                                  quant_desc_model_input: QuantDescriptor) -> None:
    """One quantizer per tensor an int8 kernel produces (signed; unsigned after a ReLU), and before float-fed inputs."""
    gm.add_submodule(ACTIVATION_QUANTIZERS, nn.Module())
    holder = gm.get_submodule(ACTIVATION_QUANTIZERS)
    signed, unsigned = quant_desc_input, quant_desc_input.replace(unsigned=True)

    def insert_after(anchor: fx.Node, desc: QuantDescriptor) -> fx.Node:
        qname = anchor.name
        holder.add_module(qname, TensorQuantizer(desc.replace(name=qname)))
        with gm.graph.inserting_after(anchor):
            qnode = gm.graph.call_module(f"{ACTIVATION_QUANTIZERS}.{qname}", (anchor,))
        anchor.replace_all_uses_with(qnode, delete_user_cb=lambda u: u is not qnode)
        report.quantizers[f"{ACTIVATION_QUANTIZERS}.{qname}"] = anchor.name
        return qnode

    modules = modules_by_name(gm)
    producers = [n for n in gm.graph.nodes
                 if n.op == "placeholder" or (n.op == "call_module" and isinstance(modules[n.target], QAT_LAYERS))
                 or is_tensor_add(n)]
    for n in producers:
        if n.op == "placeholder":
            insert_after(n, quant_desc_model_input)
            continue
        anchor, after_relu = _output_anchor(n, modules)
        fused_relu = n.op == "call_module" and isinstance(modules[n.target], QATConvBn2d) and modules[n.target].relu
        insert_after(anchor, unsigned if (after_relu or fused_relu) else signed)

    # inputs of quantized ops that come from a float op (no int8 kernel): quantize them there
    def reaches_quantizer(v: fx.Node) -> bool:
        while isinstance(v, fx.Node):
            if _is_activation_quantizer(v):
                return True
            if not (keeps_grid(v, modules) or is_avgpool(v, modules)) or not v.args:
                return False
            v = v.args[0]
        return False

    modules = modules_by_name(gm)
    for n in list(gm.graph.nodes):
        quantized_op = (n.op == "call_module" and isinstance(modules[n.target], QAT_LAYERS)) or is_tensor_add(n)
        if not quantized_op:
            continue
        for a in n.args[:2] if is_tensor_add(n) else n.args[:1]:
            if isinstance(a, fx.Node) and not reaches_quantizer(a):
                insert_after(a, signed)
                modules = modules_by_name(gm)


def _is_activation_quantizer(node: fx.Node) -> bool:
    return node.op == "call_module" and node.target.startswith(ACTIVATION_QUANTIZERS + ".")


def _reapply_on_avg_pools(gm: fx.GraphModule, report: QATReport) -> None:
    """Average pools re-apply the quantizer their input carries (the int8 kernel keeps the input's scale)."""
    modules = modules_by_name(gm)
    for n in list(gm.graph.nodes):
        if not is_avgpool(n, modules):
            continue
        src = n.args[0]
        while isinstance(src, fx.Node) and not _is_activation_quantizer(src):
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


def _check_qat_descriptors(quant_desc_weight: Any, quant_desc_input: Any, quant_desc_model_input: Any) -> None:
    _check_descriptor(quant_desc_weight, "quant_desc_weight")
    for what, desc in (("quant_desc_input", quant_desc_input), ("quant_desc_model_input", quant_desc_model_input)):
        _check_descriptor(desc, what)
        if desc.axis is not None:
            raise ValueError(f"{what} must be per tensor (axis=None), got axis={desc.axis}: an int8 activation has one scale")
    if quant_desc_input.unsigned:
        raise ValueError("quant_desc_input must be signed: prepare_qat makes an activation unsigned only after a "
                         "ReLU (anything else can be negative: residual sums, logits). For non-negative model "
                         "inputs pass quant_desc_model_input=QuantDescriptor(unsigned=True)")
    if quant_desc_weight.axis not in (None, (0,)):
        raise ValueError(f"quant_desc_weight must be per tensor or per output channel (axis=0), "
                         f"got axis={quant_desc_weight.axis}")


def _output_anchor(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, bool]:
    """Where a quantized op's output quantizer goes: after its only-user ReLU / ReLU6 (unsigned), else right after it."""
    user = _single_user(node)
    if user is not None and is_relu(user, modules):
        return user, True
    return node, False


def prepare_qat(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    quant_desc_weight: QuantDescriptor = QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    quant_desc_input: QuantDescriptor = QUANT_DESC_8BIT_PER_TENSOR,
    *,
    quant_desc_model_input: QuantDescriptor | None = None,
    inplace: bool = False,
    **trace_kwargs: Any,
) -> fx.GraphModule:
    """Trace ``model``, fuse Conv+BN(+ReLU) for QAT, insert quantizers; return a trainable fake-quant GraphModule.

    ``quant_desc_weight``: the weight quantizers' descriptor (per output
    channel, ``axis=0``, by default; ``num_bits=4`` for 4-bit weights).
    ``quant_desc_input``: the activation quantizers' (per tensor, signed);
    after a ReLU / ReLU6 the same descriptor with ``unsigned=True`` is used.
    ``quant_desc_model_input``: the model input's (default: ``quant_desc_input``).
    ``example_inputs`` (optional) are run once through the result to check it
    computes. Every quantizer starts without amax: call
    :func:`fusionlib.quant.calibrate` next. The model is traced in eval mode
    and deep-copied unless ``inplace=True``; its train / eval mode is kept.
    The report is ``gm.qat_report``. Raises :class:`fusionlib.fx.FxTraceError`
    (with its ways out) for an untraceable model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat takes an nn.Module, got {type(model).__name__}")
    renamed = sorted({"weight_desc", "input_desc"} & set(trace_kwargs))
    if renamed:
        raise TypeError(f"prepare_qat got {renamed}: its descriptors are quant_desc_weight, quant_desc_input and "
                        "quant_desc_model_input (pytorch-quantization's names)")
    quant_desc_model_input = quant_desc_input if quant_desc_model_input is None else quant_desc_model_input
    _check_qat_descriptors(quant_desc_weight, quant_desc_input, quant_desc_model_input)
    if any(isinstance(m, (TensorQuantizer,) + QAT_LAYERS) for m in model.modules()):
        raise ValueError("prepare_qat: the model already has quantizers / QAT layers; pass the float model")
    name = type(model).__name__
    training = model.training
    if not inplace:
        model = copy.deepcopy(model)
    with eval_mode(model):  # the inference graph: flags read at trace time (F.dropout's training) are False
        gm = model if isinstance(model, fx.GraphModule) else symbolic_trace(model, **trace_kwargs)
    modules = modules_by_name(gm)
    report = QATReport(name)

    # ---- decide everything first
    calls = _call_counts(gm, modules)
    chains = _plan_fusion(gm, modules, calls, report)
    in_chain = {id(n) for chain in chains for n in chain if n is not None}
    lone = _plan_lone_layers(gm, modules, calls, in_chain, report)
    _note_float_ops(gm, modules, in_chain | {id(n) for n in lone}, report)
    new_modules = _build_qat_layers(modules, calls, chains, lone, quant_desc_weight)

    # ---- rewrite
    _fuse_chains(gm, chains, new_modules, report)
    report.converted = [n.target for n in lone]
    _insert_activation_quantizers(gm, report, quant_desc_input, quant_desc_model_input)
    _reapply_on_avg_pools(gm, report)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.train(training)
    gm.qat_report = report
    dropouts = [node for node, why in report.skipped if why.startswith("functional dropout")]
    if dropouts and training:
        warnings.warn(f"prepare_qat traced {name} in eval mode: the functional dropout at {dropouts} does not drop "
                      "during QAT training either; use an nn.Dropout module to train with dropout", stacklevel=2)
    if example_inputs is not None:
        _run_once(gm, example_inputs)
    return gm


def _run_once(gm: fx.GraphModule, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """One eval-mode forward with every quantizer off: the prepared graph computes."""
    from fusionlib.quant.ptq import disabled_quantizers

    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with torch.no_grad(), disabled_quantizers(gm), eval_mode(gm):
        gm(*args)


def freeze_bn_stats(model: nn.Module) -> int:
    """:meth:`QATConvBn2d.freeze_bn_stats` on every QAT Conv+BN of ``model``; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, QATConvBn2d):
            m.freeze_bn_stats()
            count += 1
    return count


def _deployed_float_layer(m: nn.Module) -> nn.Module | None:
    """The float layer holding a QAT layer's fake-quantized (folded) weight; None for any other module."""
    with torch.no_grad():
        if isinstance(m, QATConvBn2d):
            return nn.Sequential(m.folded(), nn.ReLU()) if m.relu else m.folded()
        if isinstance(m, QATConv2d):
            return float_conv(m, m.quantized_weight(), m.bias)
        if isinstance(m, QATLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            device=m.weight.device, dtype=m.weight.dtype).eval()
            new.weight.copy_(m.quantized_weight())
            if m.bias is not None:
                new.bias.copy_(m.bias)
            return new
    return None


def export_folded(qat_model: fx.GraphModule, keep_activation_quantizers: bool = True) -> fx.GraphModule:
    """The deployed float model: every QAT layer replaced by a float layer holding its fake-quantized folded weight.

    :class:`QATConvBn2d` becomes ``nn.Conv2d(fq(W'), b')`` (+ ``nn.ReLU``),
    :class:`QATConv2d` / :class:`QATLinear` their float class with ``fq(W)``.
    With ``keep_activation_quantizers`` the activation quantizers stay (the
    result equals the QAT model in eval mode, up to float rounding); without,
    it is the fp32 model whose weights are the int8 ones. Each float layer
    keeps its QAT layer's forward hooks. Returns a new eval-mode GraphModule.
    """
    if not isinstance(qat_model, fx.GraphModule) or not hasattr(qat_model, ACTIVATION_QUANTIZERS):
        raise TypeError(f"export_folded takes the GraphModule made by prepare_qat, got {type(qat_model).__name__}")
    gm = copy.deepcopy(qat_model).eval()
    modules = modules_by_name(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, TensorQuantizer) and not keep_activation_quantizers:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        new = _deployed_float_layer(m)
        if new is not None:
            carry_forward_hooks(m, new, node.target)
            gm.add_submodule(node.target, new)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval()
