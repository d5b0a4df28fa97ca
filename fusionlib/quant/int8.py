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
listing it. The output is dequantized.

The fake-quant model and the int8 model then compute the same integers up to
rounding ties and accumulation order: the tests ask for top-1 agreement
>= 99 % on the digits and a small relative error.
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
from torch import nn

from fusionlib.fx.tracing import modules_by_name
from fusionlib.quant.functional import quantize
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

__all__ = ["activation_qparams", "quantized_weight", "convert_int8", "torch_int8", "model_size_bytes", "missing_amax"]

ENGINE = "x86"
#: torch 2.10+ warns that creating quantized tensors is deprecated; the x86 kernels are what this module measures.
_DEPRECATION = ".*quantized tensor creation functions.*"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        yield


def activation_qparams(q: TensorQuantizer) -> tuple[float, int]:
    """``(scale, zero_point)`` of ``quint8`` holding ``q``'s grid (see the module docstring)."""
    if q.amax is None:
        raise ValueError(f"{q._who()} has no amax")
    if q.amax.numel() != 1:
        raise ValueError(f"{q._who()}: an activation needs one amax (per tensor), got {q.amax.numel()}")
    if q.num_bits != 8:
        raise ValueError(f"{q._who()}: int8 activations need num_bits=8, got {q.num_bits}")
    amax = float(q.amax.detach().reshape(()))
    return (amax / 255.0, 0) if q.unsigned else (amax / 127.0, 128)


def quantized_weight(weight: torch.Tensor, q: TensorQuantizer) -> torch.Tensor:
    """``weight`` on ``q``'s grid as a torch ``qint8`` tensor (per channel along axis 0, or per tensor)."""
    if q.amax is None:
        raise ValueError(f"{q._who()} has no amax")
    if q.unsigned or q.num_bits > 8:
        raise ValueError(f"{q._who()}: int8 weights need a signed grid of at most 8 bits")
    w = weight.detach().float()
    amax = q.amax.detach().float()
    ints = quantize(w, amax, q.num_bits, False, q.narrow_range).to(torch.int8)
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
            c = m.conv
            cls = nniq.ConvReLU2d if m.relu else nnq.Conv2d
            new = cls(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups, bias=True)
            new.set_weight_bias(quantized_weight(m.conv.weight * m.scale_factor().reshape(-1, 1, 1, 1), m.weight_quantizer),
                                m.folded_bias().detach().float())
        elif isinstance(m, QATConv2d):
            new = nnq.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, bias=True)
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


def convert_int8(qat_model: fx.GraphModule, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> fx.GraphModule:
    """An eval-mode GraphModule running ``qat_model``'s arithmetic on torch's int8 CPU kernels (see the module docstring).

    ``qat_model``: made by :func:`fusionlib.quant.qat.prepare_qat` and calibrated
    or trained (every quantizer has amax). ``example_inputs`` (optional) are run
    once through a copy of the result. The QAT model is not modified.

    Timing note: the x86 engine's oneDNN convolutions cache a primitive built
    for the first input they see; calls with another spatial size can then be
    many times slower. Warm the model (or a ``copy.deepcopy`` of it) at the
    shape it will serve, as torch's own int8 models need too. Raises ValueError
    naming the quantizers without amax, and for disabled quantizers.
    """
    if not isinstance(qat_model, fx.GraphModule) or not hasattr(qat_model, ACTIVATION_QUANTIZERS):
        raise TypeError("convert_int8 takes the GraphModule made by fusionlib.quant.prepare_qat (then calibrated / "
                        f"trained), got {type(qat_model).__name__}")
    quants = {name: m for name, m in qat_model.named_modules() if isinstance(m, TensorQuantizer)}
    disabled = [name for name, q in quants.items() if q.disabled or not q.quant_enabled]
    if disabled:
        raise ValueError(f"convert_int8: quantizers {disabled[:6]} are disabled or not quantizing; an int8 model "
                         "quantizes every tensor (enable them, calibrate, then convert)")
    missing = missing_amax(qat_model)
    if missing:
        shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
        raise ValueError(f"convert_int8: quantizers without amax: {shown}. Calibrate first "
                         "(fusionlib.quant.calibrate(model, batches)) or train with amax set")
    torch.backends.quantized.engine = ENGINE
    root = copy.deepcopy(qat_model).eval()
    modules = modules_by_name(root)
    old = root.graph
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    qparams: dict[fx.Node, tuple[float, int]] = {}  # new node -> (scale, zero point) when quantized
    quantizer_after: dict[str, fx.Node] = {}
    for n in old.nodes:
        if n.op == "call_module" and n.target.startswith(ACTIVATION_QUANTIZERS + ".") and isinstance(n.args[0], fx.Node):
            quantizer_after.setdefault(n.args[0].name, n)
    floated: list[str] = []
    fused_relu: set[fx.Node] = set()

    def output_quantizer(n: fx.Node) -> tuple[TensorQuantizer, fx.Node | None]:
        anchor, _ = _output_anchor(n, modules)  # where prepare_qat put it: after an only-user ReLU, else after n
        if anchor.name not in quantizer_after:
            raise ValueError(f"convert_int8: {n.name} has no output quantizer; was the graph made by prepare_qat?")
        return modules[quantizer_after[anchor.name].target], (anchor if anchor is not n else None)

    def as_float(v: Any) -> Any:
        if isinstance(v, fx.Node) and v in qparams:
            return graph.call_method("dequantize", (v,))
        return v

    def mapped(a: Any) -> Any:
        return fx.map_arg(a, lambda x: env[x])

    for n in old.nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            continue
        if n.op == "output":
            graph.output(fx.map_arg(n.args[0], lambda x: as_float(env[x])))
            continue
        m = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, TensorQuantizer):
            src = env[n.args[0]]
            scale, zp = activation_qparams(m)
            if src in qparams:
                env[n] = src  # the producer already wrote this grid
            else:
                s_node = graph.call_function(torch.quantize_per_tensor, (src, scale, zp, torch.quint8))
                qparams[s_node] = (scale, zp)
                env[n] = s_node
            continue
        if isinstance(m, (QATConvBn2d, QATConv2d, QATLinear)):
            q, _ = output_quantizer(n)
            scale, zp = activation_qparams(q)
            root.add_submodule(n.target, _int8_layer(m, scale, zp))
            x = env[n.args[0]]
            if x not in qparams:
                raise ValueError(f"convert_int8: the input of {n.name} is not quantized")
            env[n] = graph.call_module(n.target, (x,))
            qparams[env[n]] = (scale, zp)
            continue
        if is_tensor_add(n) and all(env[a] in qparams for a in n.args[:2]):
            q, relu = output_quantizer(n)
            scale, zp = activation_qparams(q)
            op = torch.ops.quantized.add_relu if relu is not None else torch.ops.quantized.add
            if relu is not None:
                fused_relu.add(relu)
            env[n] = graph.call_function(op, (env[n.args[0]], env[n.args[1]], scale, zp))
            qparams[env[n]] = (scale, zp)
            continue
        if n in fused_relu:
            env[n] = env[n.args[0]]
            continue
        src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if src is not None and env[src] in qparams and isinstance(m, nn.ReLU6):
            root.add_submodule(n.target, nnq.ReLU6())  # torch's quantized relu6 kernel (float ReLU6 goes through hardtanh)
            env[n] = graph.call_module(n.target, (env[src],))
            qparams[env[n]] = qparams[env[src]]
            continue
        if src is not None and env[src] in qparams and (keeps_grid(n, modules) or is_avgpool(n, modules)):
            if is_relu(n, modules) and qparams[env[src]][1] == 0 and not (m is not None and isinstance(m, nn.ReLU6)) \
                    and n.target is not torch.nn.functional.relu6:
                env[n] = env[src]  # relu on a grid starting at 0 is the identity
                continue
            env[n] = graph.node_copy(n, lambda x: env[x])
            qparams[env[n]] = qparams[env[src]]
            continue
        # no int8 kernel: run in float
        if n.op in ("call_module", "call_function", "call_method"):
            floated.append(n.name)
        env[n] = graph.node_copy(n, lambda x: as_float(env[x]))
    if floated:
        warnings.warn(f"convert_int8: no int8 kernel for {floated}; they run in float between dequantize and the next "
                      "quantizer", stacklevel=2)
    gm = fx.GraphModule(root, graph, "Int8" + type(qat_model).__name__)
    gm.delete_all_unused_submodules()
    gm.int8_floated = floated
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


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` (packed int8 weights count as int8)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
