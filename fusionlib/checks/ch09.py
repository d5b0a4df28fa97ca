"""Checks of notebook 09's exercises (post-training quantization: percentile rule, float layers, a 4-bit step).

Each ``exercise_k`` takes the student's answer and what it needs from the
notebook as arguments, raises :class:`fusionlib.exercises.ExerciseError` with a
message that says what is wrong and in which direction (never the expected
value), and returns what it verified.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from fusionlib import exercises, quant
from fusionlib.checks import direction, forbid_calls

__all__ = ["exercise_1", "exercise_2", "exercise_3"]


def _number(value: Any, name: str) -> float:
    """A Python int or float (not a bool, not a tensor), as a float."""
    exercises.expect_type(value, (float, int), name=name)
    exercises.expect(not isinstance(value, bool), f"{name} is a bool; it should be a number.")
    return float(value)


def exercise_1(percentile_amax: Callable, seed: int) -> str:
    """09.1: ``percentile_amax(counts, edges, p)`` is the upper edge of the first bin whose cumulative share
    reaches p %, as ``HistogramCalibrator.compute_amax("percentile")`` computes it, at four percentiles."""
    torch.manual_seed(seed + 1)
    calibrator = quant.HistogramCalibrator(num_bits=8, num_bins=512)
    for n in (20000, 20011, 20022):  # 60,033 values: no percentile below lands on a bin edge
        calibrator.collect(torch.distributions.StudentT(3.0).sample((n,)))  # heavy tails, like activations
    counts, edges = calibrator.counts.clone(), calibrator.bin_edges.clone()
    width = float(edges[1])
    for p in (99.99, 99.9, 99.0, 90.0):
        name = f"percentile_amax(counts, edges, {p})"
        mine = percentile_amax(counts.clone(), edges.clone(), p)
        exercises.expect(not isinstance(mine, torch.Tensor), "percentile_amax should return a plain Python float, "
                                                             "not a tensor (float(...) converts a 0-d tensor).")
        mine = _number(mine, name)
        want = float(calibrator.compute_amax("percentile", percentile=p))
        wrong = direction(mine, want, name=name, rtol=1e-6)
        if not wrong:
            continue
        if abs(mine - (want - width)) < 1e-6 * want:
            hint = "that is the bin's lower edge: return its upper edge, edges[i + 1] for bin i."
        elif abs(mine - float(edges[-1])) < 1e-9 or abs(mine - float(edges[1])) < 1e-9:
            hint = ("percentile is in percent: compare the cumulative share (cumulative count / total) with "
                    "percentile / 100.")
        else:
            hint = "take the cumulative share (cumulative count / total), and the first bin where it reaches p / 100."
        exercises.fail(f"{wrong}: {hint}")
    return "matches HistogramCalibrator's percentile amax at 99.99, 99.9, 99 and 90 %"


def _calibrated_toy(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A small CNN, quantized at 4 bits (weights per output channel), max-calibrated; and its input."""
    torch.manual_seed(seed + 2)
    toy = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10)).eval()
    qtoy = quant.quantize_model(toy, quant_desc_input=quant.QuantDescriptor(num_bits=4),
                                quant_desc_weight=quant.QuantDescriptor(num_bits=4, axis=0))
    x = torch.randn(16, 3, 10, 10)
    quant.calibrate(qtoy, [x[:8], x[8:]], "max")
    return qtoy, x


def exercise_2(keep_in_float: Callable, seed: int) -> str:
    """09.2: ``keep_in_float(model, names)`` disables both quantizers of the named layers only, in place,
    without calling ``quant.keep_float``."""
    qtoy, x = _calibrated_toy(seed)
    reference = copy.deepcopy(qtoy)
    quant.keep_float(reference, ["2", "6"])
    forbid_calls([quant.keep_float], "disable the quantizers yourself (quantizer.disable())",
                 keep_in_float, qtoy, ["2", "6"])
    for layer_name, layer in quant.quant_layers(qtoy).items():
        for qname in layer.quantizer_names:
            off = getattr(layer, qname).disabled or not getattr(layer, qname).quant_enabled
            if layer_name in ("2", "6"):
                exercises.expect(off, f"layer {layer_name!r}: its {qname} still quantizes; a layer kept in float "
                                      "has both its input and its weight quantizer disabled.")
            else:
                exercises.expect(not off, f"layer {layer_name!r} was not named but its {qname} is off: only the named "
                                          "layers should compute in float.")
    with torch.no_grad():
        exercises.expect(torch.allclose(qtoy(x), reference(x), rtol=1e-6, atol=1e-6),
                         "the model's output differs from the same model with those two layers in float.")
    return "layers '2' and '6' compute in float, the others stay 4-bit, and the output matches quant.keep_float"


def exercise_3(step: Any, worst_rounding_error: Any, clipped_error: Any) -> str:
    """09.3: a 4-bit signed narrow-range quantizer with a = 14: its step, its worst rounding error inside the
    range, and the error of x = 14 when a = 7 (either sign: |x̂ − x| or x̂ − x)."""
    num_bits, amax, x, clip_at = 4, 14.0, 14.0, 7.0
    step = _number(step, "step")
    worst_rounding_error = _number(worst_rounding_error, "worst_rounding_error")
    clipped_error = _number(clipped_error, "clipped_error")
    want_step = amax / quant.quant_max(num_bits)
    wrong = direction(step, want_step, name="step", rtol=1e-9)
    exercises.expect(not wrong, f"{wrong}: a signed narrow-range grid of b bits has Q = 2^(b-1) - 1 levels on each "
                                "side of zero (not 2^b - 1, not 2^(b-1)), and the step is a / Q.")
    wrong = direction(worst_rounding_error, want_step / 2, name="worst_rounding_error", rtol=1e-9)
    exercises.expect(not wrong, f"{wrong}: rounding to the nearest multiple of the step is off by at most half a "
                                "step (and never by a whole one).")
    x_hat = float(quant.fake_quantize(torch.tensor(x), clip_at, num_bits=num_bits))
    wrong = direction(abs(clipped_error), abs(x_hat - x), name="clipped_error", rtol=1e-9)
    exercises.expect(not wrong, f"{wrong}: with a = 7 the value 14 is clamped to a, and that is all its error "
                                "(7 is a level of the grid, so no rounding adds to it).")
    sign = "as a magnitude" if clipped_error > 0 else "signed, x̂ − x"
    return (f"step {step:g}, rounding error at most {worst_rounding_error:g}; clipped_error {clipped_error:g} "
            f"({sign}) matches fake_quantize(14, amax=7) = {x_hat:g}")
