r"""Exercise checks of notebook 16 (deployment to ONNX Runtime).

* :func:`exercise_1`: ``quantize_linear(x, scale, zero_point, dtype)``, ONNX's
  ``QuantizeLinear``: :math:`q = \mathrm{saturate}(\mathrm{round}(x / s) + z)`,
  ties to even, saturated to ``dtype``'s range (``torch.int8`` or ``torch.uint8``).
* :func:`exercise_2`: ``onnx_qparams(quantizer)``, the ``(scale, zero_point)``
  that ``deploy.export_onnx`` writes for a calibrated 8-bit ``TensorQuantizer``:
  ``scale = amax / quant_max`` in float32 (0-d per tensor, ``[C]`` per channel),
  ``zero_point`` zeros of the same shape, int8 for signed and uint8 for unsigned
  quantizers.

Each wrong answer gets a message that says what is wrong and which way, never
the expected values.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fusionlib import exercises, quant
from fusionlib.checks import direction

__all__ = ["exercise_1", "exercise_2"]

# ---------------------------------------------------------------------- 16.1
_SCALE = 0.5
# x / 0.5 has ties at +-0.5, 1.5, 2.5; 200 and -200 lie far outside every 8-bit grid
_X = (0.0, 0.25, 0.75, 1.25, -0.25, -0.75, 3.0, 200.0, -200.0, 0.2, -0.3)
_CASES_1 = ((torch.int8, 0), (torch.uint8, 0), (torch.uint8, 128))


def _quantize(x: torch.Tensor, zero_point: int, dtype: torch.dtype, *, rounding: Callable = torch.round,
              bounds: tuple[int, int] | None = None) -> torch.Tensor:
    """``clamp(rounding(x / s) + z, *bounds).to(dtype)`` as int64; ``bounds=None``: no clamp (the cast wraps)."""
    v = rounding(x / _SCALE) + zero_point
    if bounds is not None:
        v = torch.clamp(v, *bounds)
    return v.to(dtype).to(torch.int64)


def _diagnose_1(got: torch.Tensor, x: torch.Tensor, zero_point: int, dtype: torch.dtype) -> str:
    """The likeliest mistake behind a wrong ``quantize_linear`` result, in words."""
    info = torch.iinfo(dtype)
    bounds = (info.min, info.max)
    want = _quantize(x, zero_point, dtype, bounds=bounds)
    wrong = got != want
    v = x / _SCALE
    ties = (v - torch.floor(v)) == 0.5
    outside = ((torch.round(v) + zero_point) < info.min) | ((torch.round(v) + zero_point) > info.max)
    if bool(wrong[~ties].eq(False).all()) and bool(wrong[ties].any()):
        return ("Ties go to the even integer (0.5 -> 0, 1.5 -> 2, 2.5 -> 2): torch.round does that, "
                "floor(v + 0.5) and rounding away from zero do not.")
    if torch.equal(got, _quantize(x, zero_point, dtype, rounding=torch.trunc, bounds=bounds)):
        return "Round to the nearest integer: converting with .to(dtype) alone cuts toward zero."
    for other in (torch.int8, torch.uint8):
        o = torch.iinfo(other)
        if other != dtype and torch.equal(got, _quantize(x, zero_point, dtype, bounds=(o.min, o.max))):
            return (f"You saturate to the range of {other}, but this result is {dtype}: take the range of the "
                    "dtype you are given (torch.iinfo(dtype)).")
    if zero_point and torch.equal(got, _quantize(x, 0, dtype, bounds=bounds)):
        return "The zero point is missing: add zero_point after rounding, before saturating."
    if zero_point and torch.equal(got, _quantize(x, -zero_point, dtype, bounds=bounds)):
        return "The zero point has the wrong sign: q = round(x / scale) + zero_point."
    if bool(wrong[~outside].eq(False).all()):
        return (f"Saturate: clamp to the dtype's range (here the range of {dtype}, torch.iinfo(dtype)) before "
                "converting: a value beyond it stops at the nearest end instead of wrapping around.")
    high, low = int((got > want).sum()), int((got < want).sum())
    return (f"{high} value(s) too large and {low} too small: q = saturate(round(x / scale) + zero_point), "
            "rounded half to even.")


def exercise_1(quantize_linear: Callable[..., Any]) -> str:
    """Check ``quantize_linear`` on int8, uint8 and uint8 with zero point 128, at ties and far out of range."""
    exercises.expect(callable(quantize_linear), "quantize_linear should be a function")
    for dtype, zero_point in _CASES_1:
        x = torch.tensor(_X)
        call = f"quantize_linear(x, {_SCALE}, {zero_point}, {dtype})"
        mine = quantize_linear(x.clone(), _SCALE, zero_point, dtype)
        exercises.expect_type(mine, torch.Tensor, name=call)
        exercises.expect(mine.dtype == dtype, f"quantize_linear(..., {dtype}).dtype is {mine.dtype}: return a tensor "
                                              "of the dtype you are given (.to(dtype))")
        exercises.expect(tuple(mine.shape) == tuple(x.shape),
                         f"{call} has shape {tuple(mine.shape)}, x has shape {tuple(x.shape)}: one integer per "
                         "element of x")
        got = mine.to(torch.int64)
        want = _quantize(x, zero_point, dtype, bounds=(torch.iinfo(dtype).min, torch.iinfo(dtype).max))
        if not torch.equal(got, want):
            exercises.fail(f"{call} is wrong at {int((got != want).sum())} of {x.numel()} elements. "
                           + _diagnose_1(got, x, zero_point, dtype))
    return "QuantizeLinear: divide, round half to even, add the zero point, saturate"


# ---------------------------------------------------------------------- 16.2
def _quantizers_2() -> dict[str, quant.TensorQuantizer]:
    quantizers = {"signed, per tensor": quant.TensorQuantizer(quant.QuantDescriptor(amax=2.54)),
                  "unsigned, per tensor": quant.TensorQuantizer(quant.QuantDescriptor(amax=6.0, unsigned=True)),
                  "signed, per channel": quant.TensorQuantizer(quant.QuantDescriptor(axis=0))}
    quantizers["signed, per channel"].amax = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1, 1)
    return quantizers


def _check_scale(scale: Any, q: quant.TensorQuantizer, label: str) -> None:
    per_channel = q.amax.numel() > 1
    want = (q.amax.detach().double() / q.quant_max).flatten()
    exercises.expect_type(scale, torch.Tensor, name=f"scale ({label})")
    exercises.expect(scale.dtype == torch.float32,
                     f"scale ({label}) is {scale.dtype}: ONNX's QuantizeLinear takes a float32 scale (.float())")
    exercises.expect(scale.numel() == want.numel(),
                     f"scale.numel() ({label}) is {scale.numel()}: one scale per channel for a per-channel "
                     "quantizer, one in all otherwise")
    shape_rule = ("a per-channel scale has one dimension, one value per channel (quantizer.amax has shape "
                  "[C, 1, 1, 1]: flatten it)" if per_channel else "a per-tensor scale is a 0-d tensor (shape ())")
    exercises.expect(scale.dim() == (1 if per_channel else 0), f"scale ({label}) has shape {tuple(scale.shape)}: "
                                                               f"{shape_rule}")
    mine = scale.detach().double().flatten()
    if torch.allclose(mine, want, rtol=1e-6, atol=0):
        return
    if torch.allclose(mine, 1 / want, rtol=1e-5, atol=0):
        exercises.fail(f"scale ({label}) is off. That is qmax / amax (quant_scale); ONNX's scale is the step, "
                       "amax / qmax.")
    worst = int((mine / want - 1).abs().argmax())
    off = direction(float(mine[worst]), float(want[worst]), name=f"scale ({label})", rtol=1e-6)
    exercises.fail(f"{off}: scale = quantizer.amax / quantizer.quant_max (quant_max depends on whether the "
                   "quantizer is unsigned).")


def _check_zero_point(zero_point: Any, scale: torch.Tensor, q: quant.TensorQuantizer, label: str) -> None:
    exercises.expect_type(zero_point, torch.Tensor, name=f"zero_point ({label})")
    exercises.expect(tuple(zero_point.shape) == tuple(scale.shape),
                     f"zero_point ({label}) has shape {tuple(zero_point.shape)} and scale {tuple(scale.shape)}: "
                     "one zero point per scale, same shape")
    exercises.expect(not bool((zero_point.to(torch.int64) != 0).any()),
                     f"zero_point ({label}) is not 0 everywhere. Symmetric quantization in ONNX's int8 needs no "
                     "shift (the 128 of notebook 11 is torch's quint8 storing signed values).")
    want = torch.uint8 if q.unsigned else torch.int8
    exercises.expect(zero_point.dtype == want,
                     f"zero_point.dtype ({label}) is {zero_point.dtype}: it sets the integer type of the graph. "
                     "ONNX has int8 and uint8: a signed quantizer keeps int8, an unsigned one uint8.")


def exercise_2(onnx_qparams: Callable[[quant.TensorQuantizer], Any]) -> str:
    """Check ``onnx_qparams`` on a signed and an unsigned per-tensor quantizer and a signed per-channel one."""
    exercises.expect(callable(onnx_qparams), "onnx_qparams should be a function")
    for label, q in _quantizers_2().items():
        mine = onnx_qparams(q)
        exercises.expect(isinstance(mine, tuple) and len(mine) == 2, "onnx_qparams should return (scale, zero_point)")
        scale, zero_point = mine
        _check_scale(scale, q, label)
        _check_zero_point(zero_point, scale, q, label)
    return "scale = amax / qmax per channel, zero point 0 as int8 (signed) or uint8 (unsigned)"
