"""Checks of notebook 08's exercises (quantized modules, monkey patching, calibration by hand).

Each ``exercise_k`` takes the student's answer and what it needs from the
notebook as arguments, raises :class:`fusionlib.exercises.ExerciseError` with a
message that says what is wrong (never the expected value), and returns what it
verified.
"""
from __future__ import annotations

import copy
import types
from typing import Callable

import torch
from torch import nn

from fusionlib import exercises, quant
from fusionlib.checks import forbid_calls

__all__ = ["exercise_1", "exercise_2", "exercise_3"]

_FLOAT_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _toy_module() -> types.ModuleType:
    """A fresh module ``lab`` with a class ``Layer`` and a builder ``build()`` that looks ``Layer`` up when it runs."""
    lab = types.ModuleType("lab")
    exec("class Layer:\n    pass\n\ndef build():\n    return Layer()\n", vars(lab))
    return lab


def exercise_1(swap_class: Callable) -> str:
    """08.1: ``swap_class(module, name, replacement)`` rebinds the name and returns ``restore()``, which puts
    back the very same class object."""
    lab = _toy_module()
    original = lab.Layer

    class Replacement(original):
        pass

    early = lab.build()
    restore = swap_class(lab, "Layer", Replacement)
    exercises.expect(callable(restore), f"swap_class should return a function restore(), got {type(restore).__name__}.")
    exercises.expect(lab.Layer is Replacement, f"after swap_class, lab.Layer is {lab.Layer.__name__}, not the "
                     "replacement: rebind it with setattr(module, name, replacement).")
    exercises.expect(type(lab.build()) is Replacement, "lab.build() should build the replacement while swapped.")
    restore()
    exercises.expect(lab.Layer is original, f"after restore(), lab.Layer is {lab.Layer.__name__}, not the original "
                     "class object: save getattr(module, name) *before* you rebind the name.")
    exercises.expect(type(early) is original, "an object built before the swap keeps its class.")
    return "the name is rebound, later builds get the replacement, and restore() puts back the very same class"


def exercise_2(build_conv_only: Callable, model_name: str) -> str:
    """08.2: ``build_conv_only(name)`` quantizes every convolution and nothing else, and leaves torch.nn restored."""
    try:
        model = build_conv_only(model_name)
        still_patched = quant.is_active()
    finally:
        quant.deactivate()  # whatever the answer did, leave torch.nn as it was
    exercises.expect(isinstance(model, nn.Module), f"build_conv_only should return the model, got {type(model).__name__}.")
    exercises.expect(not still_patched, "torch.nn is still patched after build_conv_only returned: build inside "
                     "`with quant.enable_quantization(...):`, or call quant.deactivate().")
    float_convs = [n for n, m in model.named_modules() if type(m) in _FLOAT_CONVS]
    exercises.expect(not float_convs, f"{len(float_convs)} convolution(s) are still float, e.g. {float_convs[:2]}: "
                     "do not list Conv2d in float_module_list.")
    others = sorted({type(m).__name__ for m in model.modules() if quant.is_quant_module(m)
                     and not isinstance(m, _FLOAT_CONVS)})
    exercises.expect(not others, f"only convolutions should be quantized, but the model has {others}: add their "
                     "float class names to float_module_list.")
    n_conv = sum(isinstance(m, quant.QuantConv2d) for m in model.modules())
    return f"{n_conv} QuantConv2d, every other layer float, and torch.nn restored"


def _amax_message(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float) -> str:
    """Which way an amax is off (every entry too small, too large, or mixed); empty when within rtol."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        return f"{name} has shape {tuple(actual.shape)}, but this quantizer needs shape {tuple(expected.shape)}"
    off = (actual - expected).abs() > rtol * expected.abs().clamp_min(1e-30)
    if not bool(off.any()):
        return ""
    if bool((actual[off] < expected[off]).all()):
        return f"{name} is too small"
    if bool((actual[off] > expected[off]).all()):
        return f"{name} is too large"
    return f"{name} is off (some entries too small, some too large)"


def _quantized_while_collecting(error: RuntimeError) -> bool:
    return "has no amax" in str(error) or "calibration statistics" in str(error)


def exercise_3(calibrate_max: Callable, seed: int) -> str:
    """08.3: ``calibrate_max(model, batches)`` max-calibrates every quantizer by hand, as ``quant.calibrate`` does."""
    torch.manual_seed(seed + 3)
    model = nn.Sequential(quant.QuantConv2d(3, 4, 3, padding=1), nn.ReLU(), quant.QuantConv2d(4, 2, 3),
                          nn.Flatten(), quant.QuantLinear(2 * 6 * 6, 3)).eval()
    reference = copy.deepcopy(model)
    batches = [torch.randn(4, 3, 8, 8) * (1 + i) for i in range(3)]  # the last batch holds the largest values
    quant.calibrate(reference, batches, "max")
    try:
        forbid_calls([quant.calibrate], "drive each quantizer's calibration yourself", calibrate_max, model, batches)
    except RuntimeError as error:
        if not _quantized_while_collecting(error):
            raise
        exercises.fail("a quantizer quantized while it was collecting statistics, before it had an amax: turn "
                       "quantization off (disable_quant()) on every quantizer before running the batches, and back "
                       "on after load_calib_amax().")
    mine, theirs = quant.quantizers(model), quant.quantizers(reference)
    for name, q in mine.items():
        exercises.expect(q.amax is not None, f"{name} has no amax: call load_calib_amax() on every quantizer.")
        message = _amax_message(q.amax, theirs[name].amax, f"{name}.amax", rtol=1e-6)
        exercises.expect(not message, f"{message}: amax is max|x| over *all* the batches: run every batch before "
                                      "loading amax.")
        exercises.expect(q.quant_enabled, f"{name}: quantization is still off; enable_quant() after loading amax.")
        exercises.expect(not q.calib_enabled, f"{name}: calibration is still on; disable_calib() after loading amax.")
    return f"all {len(mine)} amax values match quant.calibrate, quantization back on"
