"""Exercise checks of notebook 07 (fake quantization).

Each ``exercise_k`` receives the student's answer, tests it and returns what
it verified; a wrong answer raises :class:`fusionlib.exercises.ExerciseError`
with a message that says what is wrong and in which direction, never the
expected value (see :mod:`fusionlib.checks`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from fusionlib import exercises
from fusionlib import quant
from fusionlib.checks import direction, forbid_calls
from fusionlib.quant import calibrators
from fusionlib.quant import functional as qf

__all__ = ["exercise_1", "exercise_2", "exercise_3"]


def _plain_number(value: Any, name: str, kind: str = "number") -> float:
    """``value`` as a float, after rejecting tensors, bools and non-numbers with a message naming ``name``."""
    exercises.expect(not isinstance(value, torch.Tensor), f"{name} should be a plain Python {kind}, not a tensor.")
    exercises.expect(not isinstance(value, bool), f"{name} should be a plain Python {kind}, not a bool.")
    exercises.expect_type(value, (float, int), name=name)
    return float(value)


def _off(value: float, want: float, name: str, rtol: float = 1e-6) -> str:
    """``"step is 0.25: it is too small."``, or ``""`` when ``value`` is right: the direction, never ``want``."""
    word = direction(value, want, name=name, rtol=rtol)
    if not word:
        return ""
    word = word[len(name) + 1:]
    if want < 0 and word.startswith("is too"):
        word += " in magnitude"
    return f"{name} is {value!r}: it {word}."


# --- 07.1 -------------------------------------------------------------------------------------------

def exercise_1(step: Any, q_0_9: Any, x_hat_minus_3: Any) -> str:
    """07.1: the 4-bit signed narrow-range grid with amax 2: its step, the integer of 0.9, the value of -3."""
    amax, bits = 2.0, 4
    step_v = _plain_number(step, "step")
    q_v = _plain_number(q_0_9, "q_0_9", "int")
    x_v = _plain_number(x_hat_minus_3, "x_hat_minus_3")
    want_step = float(quant.step_size(amax, bits))
    want_q = int(quant.quantize(torch.tensor(0.9), amax, bits))
    want_x = float(quant.fake_quantize(torch.tensor(-3.0), amax, bits))

    off = _off(step_v, want_step, "step")
    if off:
        if any(abs(step_v - amax / n) < 1e-9 for n in (8, 15, 16)):
            hint = "qmax for b signed bits is 2^(b-1) - 1: one bit is the sign, and narrow range drops -2^(b-1)."
        elif abs(step_v * want_step - 1) < 1e-6:
            hint = "That is quant_scale = qmax / amax; torch's scale, step_size, is its reciprocal."
        else:
            hint = "step_size = amax / qmax, with qmax = 2^(b-1) - 1 for b signed bits."
        exercises.fail(f"{off} {hint}")

    exercises.expect(q_v == int(q_v), f"q_0_9 is {q_0_9!r}: the quantized value is an integer on the grid; "
                                      "round x / step to the nearest integer.")
    off = _off(q_v, want_q, "q_0_9")
    exercises.expect(not off, f"{off} q = round(x / step): how many steps of size amax / qmax is 0.9?")

    off = _off(x_v, want_x, "x_hat_minus_3")
    if off:
        if abs(x_v + 3) < 1e-6 or abs(x_v - round(-3 / want_step) * want_step) < 1e-6:
            hint = "-3 is outside [-amax, amax]: it is clipped to qmin = -7, so x_hat = qmin * step."
        elif abs(x_v + 8 * want_step) < 1e-6:
            hint = "Full range would allow -8, but this quantizer is narrow range: qmin = -qmax."
        elif abs(x_v - round(x_v)) < 1e-9 and abs(x_v) > abs(amax):
            hint = "x_hat is a value in x's units (an integer times step), not the integer itself."
        else:
            hint = "x_hat = clamp(round(x / step), qmin, qmax) * step."
        exercises.fail(f"{off} {hint}")
    return "step = amax / qmax, 0.9 rounds to its nearest step, and -3 is clipped to -amax"


# --- 07.2 -------------------------------------------------------------------------------------------

#: The library functions that compute a per-channel amax: the exercise is to compute it yourself.
AMAX_HELPERS: tuple[Callable, ...] = (
    qf.reduce_amax,
    qf.amax_along,
    calibrators.MaxCalibrator.collect,
    calibrators.MaxCalibrator.compute_amax,
    calibrators.HistogramCalibrator.collect,
)
AMAX_RULE = "compute the per-channel amax yourself, with tensor operations (not quant's calibrators or amax helpers)"


def _reference(weight: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Per-channel fake quantization along ``axis``: amax = max |w| over every other dim, narrow range."""
    dims = tuple(d for d in range(weight.dim()) if d != axis)
    return quant.fake_quantize(weight, weight.abs().amax(dim=dims, keepdim=True), bits)


def _exercise_2_weight(shape: Sequence[int], axis: int, seed: int, negative: int | None) -> torch.Tensor:
    """A weight whose channels along ``axis`` span 0.01 to 3 in range; channel ``negative`` is all negative,
    every other channel's largest magnitude is positive (so max w and max |w| differ only there)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=g)
    channels = shape[axis]
    scales = torch.logspace(-2, math.log10(3.0), channels)
    view = [1] * len(shape)
    view[axis] = channels
    weight = weight * scales.reshape(view)
    moved = weight.movedim(axis, 0)                                   # a view: writes go to weight
    for c in range(channels):
        flat = moved[c].reshape(-1).clone()
        if c == negative:
            flat = -flat.abs()
        else:
            k = int(flat.abs().argmax())
            flat[k] = flat.abs().max()
        moved[c] = flat.reshape(moved[c].shape)
    return weight


def _call(fn: Callable, weight: torch.Tensor, bits: int, axis: int | None) -> Any:
    kwargs = {} if axis is None else {"axis": axis}
    try:
        return forbid_calls(AMAX_HELPERS, AMAX_RULE, fn, weight, bits, **kwargs)
    except TypeError as exc:
        if axis is not None and "axis" in str(exc):
            exercises.fail("fake_quant_per_channel takes an axis argument: "
                           "def fake_quant_per_channel(weight, num_bits, axis=0).")
        raise


def _flip(weight: torch.Tensor, axis: int, channel: int) -> torch.Tensor:
    flipped = weight.clone()
    flipped.movedim(axis, 0)[channel].neg_()
    return flipped


def _check_one(fn: Callable, shape: Sequence[int], axis: int, seed: int, label: str, what: str,
               pass_axis: bool) -> None:
    negative = 1
    weight = _exercise_2_weight(shape, axis, seed, negative)
    before = weight.clone()
    name = f"fake_quant_per_channel({label})"
    want = _reference(weight, 6, axis)
    flipped = _flip(weight, axis, negative)                           # channel 1 made all positive

    def right_on_flipped() -> bool:
        try:
            out_f = _call(fn, flipped.clone(), 6, axis if pass_axis else None)
        except exercises.ExerciseError:
            raise
        except Exception:  # noqa: BLE001 - the probe only asks whether the answer works there
            return False
        return (isinstance(out_f, torch.Tensor) and out_f.shape == flipped.shape
                and torch.allclose(out_f, _reference(flipped, 6, axis), rtol=1e-5, atol=1e-7))

    no_abs = ("Channel 1 is all negative: amax is the largest magnitude, max |w|, not max w "
              "(whose value there is negative).")
    try:
        out = _call(fn, weight, 6, axis if pass_axis else None)
    except (exercises.ExerciseError, NotImplementedError):
        raise                                                         # a wrong answer named already, or the stub
    except Exception as exc:  # noqa: BLE001 - the answer's own error, with advice
        if right_on_flipped():
            exercises.fail(f"{name} raised on a weight whose channel 1 is all negative, and is right once that "
                           f"channel is made positive. {no_abs}")
        raise exercises.ExerciseError(f"{name} raised {type(exc).__name__}: {exc}. {what}") from exc
    exercises.expect_type(out, torch.Tensor, name=name)
    exercises.expect(torch.equal(weight, before), "fake_quant_per_channel changed its input weight; work on a copy.")
    exercises.expect(tuple(out.shape) == tuple(weight.shape),
                     f"{name} has shape {tuple(out.shape)}, the weight {tuple(weight.shape)}: return the "
                     "fake-quantized weight, same shape.")
    exercises.expect(out.dtype == weight.dtype,
                     f"{name} has dtype {out.dtype}: fake quantization returns float values of the weight's dtype.")
    if torch.allclose(out, want, rtol=1e-5, atol=1e-7):
        return
    per_tensor = quant.fake_quantize(weight, weight.abs().max(), 6)
    others = [c for c in range(weight.shape[axis]) if c != negative]
    index = torch.tensor(others)
    if torch.allclose(out, per_tensor, atol=1e-7):
        hint = f"This is per-tensor: one amax for the whole weight. {what}"
    elif (torch.allclose(out.index_select(axis, index), want.index_select(axis, index), rtol=1e-5, atol=1e-7)
          or right_on_flipped()):
        hint = no_abs
    else:
        hint = what
    error = float((out - want).abs().max() / want.abs().max())
    exercises.fail(f"{name} is off (max rel error {error:.3g}). {hint}")


def exercise_2(fake_quant_per_channel: Callable[..., Any]) -> str:
    """07.2: per-channel fake quantization along any axis: a conv weight (axis 0, the default), a
    ConvTranspose2d weight (axis 1) and a Linear weight (axis 0, two dims), 6 bits, narrow range."""
    _check_one(fake_quant_per_channel, (4, 3, 3, 3), 0, 7, "conv weight [4, 3, 3, 3], 6",
               "Each output channel (dim 0) needs its own amax, reduced over the other dims (1, 2, 3) with keepdim "
               "so it broadcasts: shape [4, 1, 1, 1].", pass_axis=False)
    _check_one(fake_quant_per_channel, (3, 5, 3, 3), 1, 8, "ConvTranspose2d weight [3, 5, 3, 3], 6, axis=1",
               "A ConvTranspose2d weight is [C_in, C_out, k, k]: with axis=1 each index of dim 1 gets its own amax, "
               "reduced over every other dim; use axis instead of fixed dims.", pass_axis=True)
    _check_one(fake_quant_per_channel, (6, 10), 0, 9, "Linear weight [6, 10], 6, axis=0",
               "A Linear weight has two dims: reduce over every dim except axis, whatever the weight's rank.",
               pass_axis=True)
    return ("one amax per channel along axis, max |w| over every other dim: conv (axis 0), "
            "transposed conv (axis 1) and linear weights")


# --- 07.3 -------------------------------------------------------------------------------------------

def _mse(x: torch.Tensor, amax: float, bits: int, unsigned: bool = True) -> float:
    return float(((quant.fake_quantize(x, amax, bits, unsigned=unsigned) - x) ** 2).mean())


def _argmin(values: Sequence[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


def exercise_3(best_amax: Callable[[torch.Tensor, int, list], Any]) -> str:
    """07.3: among the candidates, the amax with the smallest MSE of 4-bit unsigned fake quantization."""
    g = torch.Generator().manual_seed(3)
    x = torch.empty(20_000).exponential_(1.0, generator=g) ** 2                # heavy tail, non-negative
    top = float(x.max())
    candidates = [top * f for f in torch.linspace(0.02, 1.0, 50).tolist()]
    chosen = best_amax(x, 4, list(candidates))
    name = "best_amax(x, 4, candidates)"
    exercises.expect(not isinstance(chosen, torch.Tensor), "best_amax should return a plain float, not a tensor.")
    exercises.expect(not isinstance(chosen, bool), "best_amax should return a plain float, not a bool.")
    exercises.expect_type(chosen, (float, int), name=name)
    errors = [_mse(x, a, 4) for a in candidates]
    k = _argmin(errors)
    want = candidates[k]
    if abs(chosen - want) <= 1e-9 * top:
        return "the candidate with the smallest MSE: at 4 bits clipping the tail beats rounding everything coarsely"

    def picks(values: Sequence[float]) -> bool:
        return abs(chosen - candidates[_argmin(values)]) <= 1e-9 * top

    if type(chosen) is int and chosen == k:
        exercises.fail("best_amax returned the right candidate's index: return the amax itself, candidates[index].")
    if abs(chosen - top) <= 1e-9 * top:
        hint = "That is max calibration (amax = max |x|): at 4 bits the rounding error of coarse steps costs more."
    elif picks([_mse(x, a, 4, unsigned=False) for a in candidates]):
        hint = ("That is the best amax on the signed grid. x is non-negative: quantize on the unsigned grid "
                "(unsigned=True), which has twice the levels on [0, amax].")
    elif picks([_mse(x, a, 8) for a in candidates]):
        hint = "That is the best amax at 8 bits: quantize with num_bits, the argument (4 here)."
    elif picks([float((quant.fake_quantize(x, a, 4, unsigned=True) - x).abs().mean()) for a in candidates]):
        hint = "That minimizes the mean absolute error; the exercise asks for the mean squared error."
    elif abs(chosen - candidates[0]) <= 1e-9 * top:
        # A probe that tells two mistakes apart: on x = 1 with these candidates the largest squared error is
        # at 25 (every element rounds up to one coarse step), the most negative signed error at 0.5 (clipped).
        probe = best_amax(torch.ones(100), 4, [0.5, 1.0, 25.0])
        if isinstance(probe, (int, float)) and abs(probe - 25.0) < 1e-9:
            hint = "That is the largest error: take the minimum."
        elif isinstance(probe, (int, float)) and abs(probe - 0.5) < 1e-9:
            hint = ("That is the smallest candidate, which clips almost everything. Square the error before "
                    "averaging: a signed mean lets clipping's negative errors look like a gain.")
        else:
            hint = "The smallest amax clips almost everything; compare the mean squared errors of all candidates."
    elif picks([-e for e in errors]):
        hint = "That is the largest error: take the minimum."
    else:
        hint = ("Fake-quantize x with each candidate (unsigned grid, num_bits), and keep the smallest "
                "mean squared error.")
    exercises.fail(f"{direction(float(chosen), want, name=name, rtol=1e-9)}: it is not the candidate with the "
                   f"smallest mean squared error. {hint}")
