r"""Real int8 inference on CPU: a QAT / PTQ fake-quant model converted to torch's quantized kernels (notebook 11).

This is the one module of fusionlib that imports ``torch.ao.quantization`` /
``torch.ao.nn.quantized`` (``tests/test_quant_int8.py`` checks it): everything
else stays in float and fake quantization.

**From amax to torch's quantization parameters.** A quantizer with ``amax`` and
``num_bits`` has ``step_size = amax / qmax`` (torch's "scale") and zero point 0
on the *signed* grid ``[−qmax−1, qmax]``. torch's x86 kernels take activations
as ``quint8`` (0..255) and weights as ``qint8``; so

* an unsigned activation quantizer (after a ReLU): ``scale = amax/255``, ``zero_point = 0``;
* a signed activation quantizer: ``scale = amax/127`` and the same integers
  shifted by 128 into ``quint8`` (``zero_point = 128``, i.e. zero point 0 on the signed grid);
* a weight quantizer: ``qint8`` per output channel (or per tensor), ``scale = amax/qmax``,
  ``zero_point = 0``; 4-bit weights are int8 integers in ``[−8, 7]``.

**Conversion** (:func:`convert_int8`) walks the graph made by
:func:`fusionlib.quant.qat.prepare_qat` (one activation quantizer per tensor):
the input quantizer becomes ``quantize_per_tensor``; a :class:`QATConvBn2d`
becomes ``nnq.Conv2d`` / ``nniq.ConvReLU2d`` holding the integers of
``fq(W')`` and the float bias ``b'``, with the output scale of the quantizer
that follows it; :class:`QATLinear` becomes ``nnq.Linear``; a residual add
``torch.ops.quantized.add`` (``add_relu`` when a ReLU follows); pooling, ReLU6,
flatten and dropout run on the quantized tensors; every other quantizer is then
the identity (its producer already wrote that grid). An op with no int8 kernel
runs in float between ``dequantize`` and the next quantizer, with a warning
listing it. The output is dequantized. Which quantizers the kernels can
reproduce (8-bit activations on the full grid, signed weights of at most 8
bits, ...) is decided by :func:`fusionlib.quant.lowering.lowering_problem`,
the rule ONNX export asks too; every quantizer that cannot is named before
anything is built. ``padding='same'`` is resolved to integers (the kernels
take numbers); hooks on the QAT layers are named in a warning (the int8
modules take and return quantized tensors).

The fake-quant model and the int8 model then compute the same integers up to
rounding ties and accumulation order: the tests ask for top-1 agreement
>= 99 % on the digits and a small relative error.

**Only on CPUs with VNNI** (AVX-512 VNNI, AVX-VNNI or AMX; :func:`int8_sums_exact`).
Without it, torch's x86 int8 kernels multiply uint8 by int8 with ``vpmaddubsw``,
which adds two products into a *saturating 16-bit* integer (2 x 255 x 127 =
64,770 > 32,767), so activations that use the whole uint8 range clip inside the
kernel. Measured on a 2-core AVX2 EPYC: top-1 agreement with fake quant 95 %
(ResNet18) and 87 % (MobileNetV2), relative error 0.24 and 0.40. torch's own x86
recipe (``reduce_range=True``) keeps activations on 7 bits for this reason.
:func:`convert_int8` warns on such a CPU, and the course's gates say so.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fusionlib.display import listing
from fusionlib.fx.tracing import modules_by_name
from fusionlib.modules import warn_dropped_hooks
from fusionlib.quant.functional import quantize
from fusionlib.quant.lowering import lowering_problem
from fusionlib.quant.modules import conv_kwargs
from fusionlib.quant.ptq import weight_quantizer_ids
from fusionlib.quant.qat import (
    ACTIVATION_QUANTIZERS,
    QATConv2d,
    QATConvBn2d,
    QATLinear,
    _output_anchor,
    is_relu,
    is_tensor_add,
    keeps_grid,
    is_avgpool,
)
from fusionlib.quant.tensor_quantizer import TensorQuantizer

__all__ = ["activation_qparams", "quantized_weight", "convert_int8", "torch_int8", "model_size_bytes", "missing_amax",
           "conv_layers", "has_relu"]

ENGINE = "x86"
#: torch 2.10+ warns that creating quantized tensors is deprecated; the x86 kernels are what this module measures.
_DEPRECATION = ".*quantized tensor creation functions.*"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        yield


def _require_int8(q: TensorQuantizer, *, weight: bool) -> None:
    problem = lowering_problem(q, "int8", weight=weight)
    if problem is not None:
        raise ValueError(f"{q._who()}: {problem}")


def activation_qparams(q: TensorQuantizer) -> tuple[float, int]:
    """``(scale, zero_point)`` of ``quint8`` holding ``q``'s grid (see the module docstring)."""
    _require_int8(q, weight=False)
    amax = float(q.amax.detach().reshape(()))
    return (amax / 255.0, 0) if q.unsigned else (amax / 127.0, 128)


def quantized_weight(weight: torch.Tensor, q: TensorQuantizer) -> torch.Tensor:
    """``weight`` on ``q``'s grid as a torch ``qint8`` tensor (per channel along axis 0, or per tensor)."""
    _require_int8(q, weight=True)
    w = weight.detach().float()
    amax = q.amax.detach().float()
    ints = quantize(w, amax, q.num_bits, False, q.narrow_range, q.axis).to(torch.int8)
    step = (amax / q.quant_max).double()
    with _quiet():
        if amax.numel() == 1:
            return torch._make_per_tensor_quantized_tensor(ints, float(step.reshape(())), 0)
        step = step.flatten()
        return torch._make_per_channel_quantized_tensor(ints, step, torch.zeros_like(step, dtype=torch.long), 0)


def missing_amax(model: nn.Module) -> list[str]:
    """Names of the enabled quantizers of ``model`` that have no amax (never calibrated)."""
    return [name for name, m in model.named_modules() if isinstance(m, TensorQuantizer) and not m.disabled and m.amax is None]


def _int8_layer(m: nn.Module, scale: float, zero_point: int) -> nn.Module:
    with torch.no_grad(), _quiet():
        if isinstance(m, QATConvBn2d):
            cls = nniq.ConvReLU2d if m.relu else nnq.Conv2d
            new = cls(**conv_kwargs(m.conv, integer_padding=True), bias=True)
            new.set_weight_bias(quantized_weight(m.conv.weight * m.scale_factor().reshape(-1, 1, 1, 1), m.weight_quantizer),
                                m.folded_bias().detach().float())
        elif isinstance(m, QATConv2d):
            new = nnq.Conv2d(**conv_kwargs(m, integer_padding=True), bias=True)
            bias = m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_channels)
            new.set_weight_bias(quantized_weight(m.weight, m.weight_quantizer), bias)
        elif isinstance(m, QATLinear):
            new = nnq.Linear(m.in_features, m.out_features, bias_=True)
            bias = m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
            new.set_weight_bias(quantized_weight(m.weight, m.weight_quantizer), bias)
        else:  # pragma: no cover - guarded by the caller
            raise TypeError(type(m).__name__)
    new.scale = float(scale)
    new.zero_point = int(zero_point)
    return new


def _check_convertible(qat_model: nn.Module) -> None:
    """Every quantizer must be one the int8 kernels reproduce (:func:`lowering_problem`); all problems named at once."""
    if not isinstance(qat_model, fx.GraphModule) or not hasattr(qat_model, ACTIVATION_QUANTIZERS):
        raise TypeError("convert_int8 takes the GraphModule made by fusionlib.quant.prepare_qat (then calibrated / "
                        f"trained), got {type(qat_model).__name__}")
    weights = weight_quantizer_ids(qat_model)
    problems: dict[str, list[str]] = {}
    for name, q in qat_model.named_modules():
        if isinstance(q, TensorQuantizer):
            problem = lowering_problem(q, "int8", weight=id(q) in weights)
            if problem is not None:
                problems.setdefault(problem, []).append(name)
    if problems:
        raise ValueError("convert_int8 cannot run these quantizers on int8 kernels: " + "; ".join(
            f"{problem}: {listing(names)}" for problem, names in problems.items()))


class _Int8Graph:
    """The int8 graph, built node by node from the QAT graph: each ``_*`` method converts one kind of node."""

    def __init__(self, root: fx.GraphModule):
        self.root, self.modules, self.graph = root, modules_by_name(root), fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.qparams: dict[fx.Node, tuple[float, int]] = {}  # new node -> (scale, zero point) when quantized
        self.floated: list[str] = []
        self.fused_relu: set[fx.Node] = set()
        self.quantizer_after: dict[str, fx.Node] = {}
        for n in root.graph.nodes:
            if n.op == "call_module" and n.target.startswith(ACTIVATION_QUANTIZERS + ".") and isinstance(n.args[0], fx.Node):
                self.quantizer_after.setdefault(n.args[0].name, n)

    def convert(self, n: fx.Node) -> None:
        for step in (self._io, self._quantizer, self._qat_layer, self._add, self._relu6, self._grid_op):
            if step(n):
                return
        self._float_op(n)

    def output_quantizer(self, n: fx.Node) -> tuple[TensorQuantizer, fx.Node | None]:
        anchor, _ = _output_anchor(n, self.modules)  # where prepare_qat put it: after an only-user ReLU, else after n
        if anchor.name not in self.quantizer_after:
            raise ValueError(f"convert_int8: {n.name} has no output quantizer; was the graph made by prepare_qat?")
        return self.modules[self.quantizer_after[anchor.name].target], (anchor if anchor is not n else None)

    def quantized(self, n: fx.Node) -> bool:
        return isinstance(n, fx.Node) and self.env[n] in self.qparams

    def as_float(self, v: Any) -> Any:
        return self.graph.call_method("dequantize", (v,)) if isinstance(v, fx.Node) and v in self.qparams else v

    def _module(self, n: fx.Node) -> nn.Module | None:
        return self.modules.get(n.target) if n.op == "call_module" else None

    def _io(self, n: fx.Node) -> bool:
        if n.op == "placeholder":
            self.env[n] = self.graph.placeholder(n.name)
        elif n.op == "output":
            self.graph.output(fx.map_arg(n.args[0], lambda x: self.as_float(self.env[x])))
        else:
            return False
        return True

    def _quantizer(self, n: fx.Node) -> bool:
        """An activation quantizer: quantize_per_tensor, or nothing where the producer already wrote this grid."""
        m = self._module(n)
        if not isinstance(m, TensorQuantizer):
            return False
        src = self.env[n.args[0]]
        if src in self.qparams:
            self.env[n] = src
        else:
            scale, zp = activation_qparams(m)
            self.env[n] = self.graph.call_function(torch.quantize_per_tensor, (src, scale, zp, torch.quint8))
            self.qparams[self.env[n]] = (scale, zp)
        return True

    def _qat_layer(self, n: fx.Node) -> bool:
        m = self._module(n)
        if not isinstance(m, (QATConvBn2d, QATConv2d, QATLinear)):
            return False
        scale, zp = activation_qparams(self.output_quantizer(n)[0])
        warn_dropped_hooks(m, n.target, "int8 modules take and return quantized tensors, which a float hook misreads")
        self.root.add_submodule(n.target, _int8_layer(m, scale, zp))
        if not self.quantized(n.args[0]):
            raise ValueError(f"convert_int8: the input of {n.name} is not quantized")
        self.env[n] = self.graph.call_module(n.target, (self.env[n.args[0]],))
        self.qparams[self.env[n]] = (scale, zp)
        return True

    def _add(self, n: fx.Node) -> bool:
        """A residual add of two quantized tensors: quantized.add (add_relu when a ReLU follows)."""
        if not (is_tensor_add(n) and all(self.quantized(a) for a in n.args[:2])):
            return False
        q, relu = self.output_quantizer(n)
        scale, zp = activation_qparams(q)
        if relu is not None:
            self.fused_relu.add(relu)
        op = torch.ops.quantized.add_relu if relu is not None else torch.ops.quantized.add
        self.env[n] = self.graph.call_function(op, (self.env[n.args[0]], self.env[n.args[1]], scale, zp))
        self.qparams[self.env[n]] = (scale, zp)
        return True

    def _relu6(self, n: fx.Node) -> bool:
        """A ReLU6 module on a quantized tensor: torch's quantized kernel (float ReLU6 goes through hardtanh)."""
        if not (isinstance(self._module(n), nn.ReLU6) and self.quantized(n.args[0])):
            return False
        self.root.add_submodule(n.target, nnq.ReLU6())
        self.env[n] = self.graph.call_module(n.target, (self.env[n.args[0]],))
        self.qparams[self.env[n]] = self.qparams[self.env[n.args[0]]]
        return True

    def _grid_op(self, n: fx.Node) -> bool:
        """Ops that keep the grid (pools, flatten, dropout, ReLU) run on the quantized tensor as they are."""
        if n in self.fused_relu:
            self.env[n] = self.env[n.args[0]]
            return True
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if src is None or not self.quantized(src) or not (keeps_grid(n, self.modules) or is_avgpool(n, self.modules)):
            return False
        if is_relu(n, self.modules) and self.qparams[self.env[src]][1] == 0 and n.target is not F.relu6:
            self.env[n] = self.env[src]  # relu on a grid starting at 0 is the identity
            return True
        self.env[n] = self.graph.node_copy(n, lambda x: self.env[x])
        self.qparams[self.env[n]] = self.qparams[self.env[src]]
        return True

    def _float_op(self, n: fx.Node) -> None:
        """No int8 kernel: run in float between dequantize and the next quantizer."""
        if n.op in ("call_module", "call_function", "call_method"):
            self.floated.append(n.name)
        self.env[n] = self.graph.node_copy(n, lambda x: self.as_float(self.env[x]))


def int8_sums_exact() -> bool:
    """Does this CPU add uint8 x int8 products in 32 bits (AVX-512 VNNI, AVX-VNNI or AMX)?

    Without VNNI, torch's x86 int8 kernels add pairs of products in saturating
    16-bit integers and drift from fake quant (module docstring). Read from the
    CPU flags (``/proc/cpuinfo``); ``True`` where they cannot be read (not Linux
    on x86), where torch's kernels take other paths.
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    if flags is None:
        return True
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def convert_int8(qat_model: fx.GraphModule, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> fx.GraphModule:
    """An eval-mode GraphModule running ``qat_model``'s arithmetic on torch's int8 CPU kernels (see the module docstring).

    ``qat_model``: made by :func:`fusionlib.quant.qat.prepare_qat` and calibrated
    or trained (every quantizer has amax). ``example_inputs`` (optional) are run
    once through a copy of the result. The QAT model is not modified.

    Timing note: the x86 engine's oneDNN convolutions cache a primitive built
    for the first input they see; calls with another spatial size can then be
    many times slower. Warm the model (or a ``copy.deepcopy`` of it) at the
    shape it will serve, as torch's own int8 models need too. Raises ValueError
    naming every quantizer the int8 kernels cannot reproduce (no amax,
    disabled, narrow-range activations, ...).
    """
    _check_convertible(qat_model)
    wide = [name for name, m in qat_model.named_modules()
            if isinstance(m, (QATConv2d, QATConvBn2d, QATLinear)) and m.weight_quantizer.num_bits > 7]
    if wide and not int8_sums_exact():   # 7-bit weights: a pair of products, 2·255·64, fits a 16-bit sum
        warnings.warn(f"convert_int8: this CPU has no VNNI, so torch's x86 int8 kernels add pairs of products in "
                      f"saturating 16-bit sums: with the 8-bit weights of {len(wide)} layer(s) results can drift from "
                      "fake quant; 7-bit weights (QuantDescriptor(num_bits=7)) keep every sum exact (see "
                      "fusionlib.quant.int8.int8_sums_exact)", stacklevel=2)
    torch.backends.quantized.engine = ENGINE
    root = copy.deepcopy(qat_model).eval()
    build = _Int8Graph(root)
    for n in root.graph.nodes:
        build.convert(n)
    if build.floated:
        warnings.warn(f"convert_int8: no int8 kernel for {build.floated}; they run in float between dequantize and "
                      "the next quantizer", stacklevel=2)
    gm = fx.GraphModule(root, build.graph, "Int8" + type(qat_model).__name__)
    gm.delete_all_unused_submodules()
    gm.int8_floated = build.floated
    gm.eval()
    if example_inputs is not None:  # run on a copy: oneDNN caches a conv primitive for the first input shape it sees
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        with torch.no_grad(), _quiet():
            copy.deepcopy(gm)(*args)
    return gm


def torch_int8(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
               batches: Iterable[Any]) -> nn.Module:
    """torch's own FX int8 flow on a float model (``prepare_fx`` / ``convert_fx`` with the x86 qconfig), calibrated on ``batches``.

    The reference that :func:`convert_int8` is timed against. ``model`` is deep-copied and put in eval mode.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = ENGINE
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with _quiet():
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(ENGINE), args)
        seen = 0
        with torch.no_grad():
            for batch in batches:
                prepared(batch[0] if isinstance(batch, (tuple, list)) else batch)
                seen += 1
        if seen == 0:
            raise ValueError("torch_int8: batches yielded nothing")
        return convert_fx(prepared).eval()


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every int8 convolution of ``model`` (``nnq.Conv2d``, fused ReLU or not), in order.

    Each holds ``weight()`` (a ``qint8`` tensor: ``int_repr()``, per-channel
    scales), ``bias()`` (float), ``scale`` / ``zero_point`` of its output, and
    ``stride``, ``padding``, ``dilation``, ``groups``; ``has_relu`` says
    whether a ReLU is fused (the output clamps at its zero point).
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nnq.Conv2d)]


def has_relu(conv: nn.Module) -> bool:
    """Whether an int8 convolution of :func:`conv_layers` has a fused ReLU (``ConvReLU2d``)."""
    return isinstance(conv, nniq.ConvReLU2d)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` (packed int8 weights count as int8)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
