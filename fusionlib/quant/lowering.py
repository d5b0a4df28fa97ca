r"""What a fake quantizer can become: torch's int8 kernels, an ONNX Q/DQ pair, or neither (notebooks 11, 16).

A :class:`~fusionlib.quant.TensorQuantizer` computes ``x̂ = clamp(round(x · qmax/amax), qmin, qmax) · amax/qmax``.
A backend reproduces that only when its integer type holds the grid
``[qmin, qmax]`` and its scale layout matches ``amax``. :func:`lowering_problem`
is the one place that decides; :func:`fusionlib.quant.int8.convert_int8` and
:func:`fusionlib.deploy.export_onnx` both ask it, before anything is built:

=============================  ===========================================  ==================================
quantizer                      ``"int8"``: torch's x86 kernels               ``"qdq"``: ONNX (opset 17)
=============================  ===========================================  ==================================
disabled / quantization off    no: an int8 model quantizes every tensor      yes: exported as the identity
dynamic amax (none stored)     no: kernels take a scale fixed in advance     no: the scale is a constant
``scale_amax`` given           no: amax · scale_amax is an experiment        no
no amax, or still calibrating  no                                            no
``fake_quant=False``           no: it outputs integers, not ``x̂``            no
bits                           activations 8; weights 2..8                  activations 8; weights 2..8 (*)
unsigned (``[0, 2^b − 1]``)    activations (quint8); not weights (qint8)     yes (uint8)
signed narrow range            weights ([−127, 127] ⊂ qint8); not            no: QuantizeLinear saturates to
(``[−qmax, qmax]``)            activations (requantized outputs reach −128)  [−128, 127]
unsigned narrow range          the same grid as full range (qmin = 0)        the same grid as full range
per channel                    weights, along axis 0; activations no         one axis
=============================  ===========================================  ==================================

(*) A signed weight grid narrower than int8 (``num_bits < 8``, e.g. 7-bit weights, whose pairs of
uint8 x int8 products cannot saturate a 16-bit sum on CPUs without VNNI) is written as int8: export mode
clamps the constant weight to ``[qmin, qmax] · step`` first, so QuantizeLinear's rounding lands on the
narrower grid, exactly the fake quantizer's values. Activations are not constants and keep 8 bits.
"""
from __future__ import annotations

from typing import Literal

from fusionlib.quant.tensor_quantizer import TensorQuantizer

__all__ = ["TARGETS", "lowering_problem"]

Target = Literal["int8", "qdq"]
#: What a quantizer can be lowered to.
TARGETS: tuple[str, ...] = ("int8", "qdq")


def _is_narrow(q: TensorQuantizer) -> bool:
    """A narrow grid that differs from the full one: signed only (unsigned qmin is 0 either way)."""
    return q.narrow_range and not q.unsigned


def _one_axis(q: TensorQuantizer) -> bool:
    return q.amax is None or q.amax.numel() == 1 or (q.axis is not None and len(q.axis) == 1)


def lowering_problem(q: TensorQuantizer, target: Target, *, weight: bool) -> str | None:
    """Why ``q`` cannot become ``target`` (``"int8"`` or ``"qdq"``), in a few words; None when it can.

    ``weight``: ``q`` quantizes a layer's weight (constants; per channel
    allowed) rather than an activation. See the table in the module docstring.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if q.disabled or not q.quant_enabled:
        return "disabled or not quantizing (an int8 model quantizes every tensor)" if target == "int8" else None
    if q.dynamic_amax and q.amax is None:
        return "dynamic amax (each batch's own max |x|; calibrate to fix amax)"
    if q.scale_amax is not None:
        return "scale_amax set (an experiment's factor; set amax = amax * scale_amax and drop scale_amax)"
    if q.amax is None:
        return "no amax (calibrate first)"
    if q.calib_enabled:
        return "still calibrating (call disable_calib())"
    if not q.fake_quant:
        return "fake_quant=False: it outputs the integers, not their values"
    if target == "qdq":
        narrower_weight = weight and not q.unsigned and q.num_bits < 8   # written as int8 on its own grid: (*)
        if q.num_bits != 8 and not narrower_weight:
            return f"{q.num_bits} bits (QuantizeLinear holds 8-bit integers; only weights, constants, take a narrower grid)"
        if _is_narrow(q) and not narrower_weight:
            return "narrow range [-127, 127] (ONNX's int8 grid is [-128, 127]; use narrow_range=False)"
        if not _one_axis(q):
            return f"amax along several axes {q.axis} (Q/DQ takes one)"
        return None
    if weight:
        if q.unsigned or q.num_bits > 8:
            return f"{'unsigned' if q.unsigned else f'{q.num_bits}-bit'} weight (int8 weights are signed, at most 8 bits)"
        if q.amax.numel() > 1 and q.axis != (0,):
            return f"per-channel amax along axis={q.axis} (int8 weights: per tensor or axis 0)"
        return None
    if q.num_bits != 8:
        return f"{q.num_bits}-bit activation (int8 activations need num_bits=8)"
    if q.amax.numel() != 1:
        return f"{q.amax.numel()} amax values (an int8 activation has one scale)"
    if _is_narrow(q):
        return "narrow-range activation (the int8 kernels' outputs reach -128; use narrow_range=False)"
    return None
