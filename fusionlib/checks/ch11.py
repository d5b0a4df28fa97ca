"""Exercise checks of notebook 11 (int8 deployment): torch's qparams, bytes on disk, the fixed-point multiplier.

Each ``exercise_k`` takes the student's answer, raises an
:class:`fusionlib.exercises.ExerciseError` that says what is wrong and in
which direction (never the expected value), and returns what it verified.
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Integral
from typing import Any, Callable

from fusionlib import exercises
from fusionlib.checks import direction, forbid_calls
from fusionlib.quant import integer
from fusionlib.quant.descriptor import QuantDescriptor
from fusionlib.quant.int8 import activation_qparams
from fusionlib.quant.tensor_quantizer import TensorQuantizer

__all__ = ["exercise_1", "exercise_2", "exercise_3"]

#: (amax, unsigned) pairs exercise 11.1 asks about.
QPARAM_CASES = [(2.54, False), (6.0, True), (0.5, False)]
#: multipliers exercise 11.3 asks about: ordinary ones, a power of two, and one whose mantissa rounds up to 2**31.
MULTIPLIERS = [0.0123456789, 0.000187, 0.3, 0.5, 0.7300000123, 1 - 2**-35]


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def exercise_1(torch_qparams: Callable[[float, bool], Any]) -> str:
    """``torch_qparams(amax, unsigned) -> (scale, zero_point)`` of quint8 for an 8-bit activation quantizer."""
    for amax, unsigned in QPARAM_CASES:
        scale, zero_point = activation_qparams(TensorQuantizer(QuantDescriptor(amax=amax, unsigned=unsigned)))
        mine = torch_qparams(amax, unsigned)
        exercises.expect(isinstance(mine, tuple) and len(mine) == 2, "torch_qparams should return (scale, zero_point)")
        where = f"for amax={amax}, unsigned={unsigned}"
        try:
            my_scale = float(mine[0])
        except (TypeError, ValueError):
            exercises.fail(f"scale {where} should be a number, got {type(mine[0]).__name__}")
        off = direction(my_scale, scale, name=f"scale {where}")
        if off:
            qmax = 255 if unsigned else 127
            if any(math.isclose(my_scale, qmax / amax / k, rel_tol=1e-6) for k in (1, 2, 0.5)):
                hint = "that is quant_scale (qmax / amax), the reciprocal of the step that torch calls scale."
            elif any(math.isclose(my_scale, amax / n, rel_tol=1e-6) for n in (128, 256)):
                hint = "divide by the largest integer of the grid, not by the number of levels."
            else:
                hint = "scale is the step between neighbouring integers: amax over the largest integer of the grid."
            exercises.fail(f"{off.replace(' is ', ' is off: ', 1)}. {hint}")
        exercises.expect(_is_int(mine[1]), f"zero_point {where} should be an int, got {type(mine[1]).__name__}")
        if mine[1] != zero_point:
            hint = ("an unsigned grid 0..255 is quint8 as it is: which integer stands for real 0?" if unsigned else
                    "the signed integers -128..127 are stored shifted into 0..255: which integer stands for real 0?")
            exercises.fail(f"zero_point {where} is {mine[1]}, which does not stand for real 0. {hint}")
    return "scale = amax / 255, zero point 0 after a ReLU; amax / 127 and 128 otherwise"


def _conv_bytes(out_channels: int = 64, in_channels: int = 64, k: int = 3) -> tuple[int, int, int]:
    """(weights, fp32 bytes, int8 bytes) of exercise 11.2's conv: fp32 bias, one fp32 scale per output channel."""
    weights = out_channels * in_channels * k * k
    return weights, 4 * weights + 4 * out_channels, weights + 4 * out_channels + 4 * out_channels


def exercise_2(fp32_bytes: Any, int8_bytes: Any) -> str:
    """Bytes of a 64x64x3x3 conv with bias: fp32, and int8 weights + fp32 bias + one fp32 scale per channel."""
    weights, fp32, int8 = _conv_bytes()
    exercises.expect_type(fp32_bytes, int, name="fp32_bytes")
    exercises.expect(not isinstance(fp32_bytes, bool), "fp32_bytes should be a number of bytes, not a bool")
    if fp32_bytes != fp32:
        hint = ("count the 64 biases too, 4 bytes each." if fp32_bytes == fp32 - 4 * 64 else
                "4 bytes per weight (64*64*3*3 of them) and per bias.")
        exercises.fail(f"{direction(fp32_bytes, fp32, name='fp32_bytes')}: {hint}")
    exercises.expect_type(int8_bytes, int, name="int8_bytes")
    exercises.expect(not isinstance(int8_bytes, bool), "int8_bytes should be a number of bytes, not a bool")
    if int8_bytes != int8:
        if int8_bytes == int8 - 4 * 64:
            hint = "the bias and the scales are 64 fp32 numbers each: one of them is missing."
        elif int8_bytes > int8 and int8_bytes - int8 in (weights, 2 * weights, 3 * weights):
            hint = "int8 weights take one byte each."
        else:
            hint = "one byte per weight, plus the fp32 bias and one fp32 scale per output channel."
        exercises.fail(f"{direction(int8_bytes, int8, name='int8_bytes')}: {hint}")
    return f"{fp32_bytes} bytes in fp32, {int8_bytes} in int8: {fp32_bytes / int8_bytes:.2f}x smaller"


def exercise_3(fixed_point: Callable[[float], Any]) -> str:
    """``fixed_point(m) -> (M0, n)``: integers, ``2**30 <= M0 < 2**31``, ``M0`` the nearest integer to ``m * 2**n``.

    Written without :func:`fusionlib.quant.integer.fixed_point_multiplier` (enforced).
    """
    for m in MULTIPLIERS:
        mine = forbid_calls([integer.fixed_point_multiplier], "write the arithmetic yourself", fixed_point, m)
        exercises.expect(isinstance(mine, tuple) and len(mine) == 2, "fixed_point should return (M0, n)")
        m0, n = mine
        for name, value in (("M0", m0), ("n", n)):
            exercises.expect(_is_int(value), f"{name} for m={m!r} should be a Python int, got {type(value).__name__}")
        m0, n = int(m0), int(n)
        if m0 >= 2**31:
            carry = " When rounding carries M0 up to 2^31, halve it and take n one smaller." if m0 == 2**31 else ""
            exercises.fail(f"M0 for m={m!r} is too large: it must fit 31 bits, M0 < 2^31.{carry}")
        if m0 < 2**30:
            exercises.fail(f"M0 for m={m!r} is too small: it should use all 31 bits, M0 >= 2^30 (is n too small?)")
        target = Fraction(m) * Fraction(2) ** n  # m * 2^n, exact
        if abs(Fraction(m0) - target) > Fraction(1, 2):
            if abs(Fraction(m0) - target) < 1:
                exercises.fail(f"M0 for m={m!r} is not the nearest integer to m * 2^n: round, do not truncate.")
            exercises.fail(f"M0 * 2^-n for m={m!r} is {'too large' if m0 > target else 'too small'}.")
    return "M0 * 2^-n reproduces every m to within half a unit of M0's last bit (relative error <= 2^-31)"
