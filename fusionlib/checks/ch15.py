r"""Exercise checks of notebook 15 (reduced precision).

* 15.1 ``exercise_1(round_to_bf16, seed)``: fp32 -> the nearest bf16 value
  (ties to even), widened back to fp32, by integer arithmetic on the bit
  pattern. The prompt's rule, "not by converting to bf16", is enforced by
  :func:`bf16_conversions`: tensor methods are C functions that
  :func:`fusionlib.checks.forbid_calls` cannot see, so a
  ``torch.overrides.TorchFunctionMode`` watches every torch function and
  tensor method the answer runs.
* 15.2 ``exercise_2(gate_tolerance, fp16_gate)``: ``(1 + u)^L − 1`` with
  ``u = 2^-(t+1)``, written without calling :mod:`fusionlib.precision`.
* 15.3 ``exercise_3(first_bad_layer, bf16_is_finite, model, inputs)``: the
  first layer whose fp16 output holds inf/NaN, and whether bf16 stays finite.

Messages say what is wrong and in which direction, never the expected value.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fusionlib import exercises, precision, verify
from fusionlib.checks import direction, forbid_calls

__all__ = ["bf16_conversions", "exercise_1", "exercise_2", "exercise_3"]

#: reinterpreting a bit pattern as bf16 (the rounding was done on integers) and allocating are not conversions
_NOT_CONVERSIONS = {torch.Tensor.view, torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _name(func: Any) -> str:
    owner = "Tensor." if getattr(func, "__objclass__", None) is torch._C.TensorBase or \
        getattr(func, "__qualname__", "").startswith(("Tensor.", "TensorBase.")) else "torch."
    name = getattr(func, "__name__", None) or repr(func)
    return name if "." in name else owner + name


class _Bf16Watch(TorchFunctionMode):
    """Records the torch functions / tensor methods that turn a non-bf16 tensor into a bf16 one."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in _NOT_CONVERSIONS and any(t.dtype == torch.bfloat16 for t in _tensors(out)):
            inputs = _tensors(list(args)) + _tensors(kwargs or {})
            if any(t.dtype != torch.bfloat16 for t in inputs):
                name = _name(func)
                if name not in self.calls:
                    self.calls.append(name)
        return out


def bf16_conversions(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """Run ``fn(*args, **kwargs)``; return its result and the torch calls that converted a tensor to bfloat16.

    A call counts when it returns a bf16 tensor and reads a tensor of another dtype: ``x.to(torch.bfloat16)``,
    ``x.bfloat16()``, ``x.type(torch.bfloat16)``, ``bf16_tensor.copy_(x)``. ``t.view(torch.bfloat16)``
    reinterprets bits without rounding and does not count.
    """
    watch = _Bf16Watch()
    with watch:
        result = fn(*args, **kwargs)
    return result, watch.calls


def _values_15_1(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.cat([torch.randn(10_000, generator=g) * 100, -torch.rand(1000, generator=g)])
    ties = (torch.tensor([1.0, 1.0 + 2 ** -7, -3.0, 5.0]).view(torch.int32) + 0x8000).view(torch.float32)  # halfway
    return torch.cat([x, ties])


def exercise_1(round_to_bf16: Callable[[torch.Tensor], torch.Tensor], seed: int = 0) -> str:
    """Check ``round_to_bf16(x)`` against torch's round-to-nearest-even on 11,000 values and 4 exact ties."""
    values = _values_15_1(seed)
    mine, conversions = bf16_conversions(round_to_bf16, values.clone())
    exercises.expect(not conversions, f"your answer converts to bfloat16 ({', '.join(conversions)}): round with "
                                      "integer operations on the bit pattern instead (x.view(torch.int32)).")
    exercises.expect_type(mine, torch.Tensor, name="round_to_bf16(x)")
    exercises.expect(mine.dtype == torch.float32, f"round_to_bf16(x).dtype is {mine.dtype}: Return float32 values "
                                                  "(the bf16 numbers, widened to float32).")
    exercises.expect(mine.shape == values.shape, f"round_to_bf16(x) has shape {tuple(mine.shape)}, x has "
                                                 f"{tuple(values.shape)}: return one value per element.")
    want = values.to(torch.bfloat16).float()
    truncated = (values.view(torch.int32) & ~0xFFFF).view(torch.float32)
    differ = int((mine != want).sum())
    if differ == 0:
        return f"all {len(values)} values (ties included) match torch's round-to-nearest-even"
    if torch.equal(mine[:-4], truncated[:-4]):
        hint = "That truncates (rounds toward zero): add half of the dropped part before clearing the low 16 bits."
    elif torch.equal(mine[:-4], want[:-4]):
        hint = ("Right except on exact ties: a value halfway between two bf16 numbers goes to the one whose last "
                "kept bit is 0 (ties to even), so the amount you add must depend on the lowest kept bit.")
    elif bool(((mine.view(torch.int32) & 0xFFFF) != 0).any()):
        hint = "Some results keep low bits: a bf16 value widened to float32 has its low 16 bits zero."
    else:
        hint = "Round to the nearest bf16 value: add about half of the dropped part, then clear the low 16 bits."
    exercises.fail(f"{differ} of {len(values)} values differ from the nearest bf16 value. {hint}")


_PRECISION = (precision.worst_case_relative_error, precision.typical_relative_error, precision.unit_roundoff,
              precision.mantissa_bits, precision.float_format, precision.max_finite)


def _float(value: Any, name: str) -> float:
    exercises.require_attempted(value, name)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    exercises.expect(isinstance(value, (int, float)) and not isinstance(value, bool),
                     f"{name} is of type {type(value).__name__}: it should be a number.")
    return float(value)


def exercise_2(gate_tolerance: Callable[[int, int], float], fp16_gate: Any) -> str:
    """Check ``gate_tolerance(depth, t) = (1 + 2^-(t+1))^depth − 1`` for bf16, fp16, fp32 and depths 1, 21, 53."""
    def every_case() -> list[tuple[int, int, Any]]:
        return [(depth, t, gate_tolerance(depth, t)) for t in (7, 10, 23) for depth in (1, 21, 53)]

    cases = forbid_calls(_PRECISION, "compute u and (1 + u)^L − 1 yourself, without fusionlib.precision",
                         every_case)
    for depth, t, got in cases:
        got = _float(got, f"gate_tolerance({depth}, {t})")
        want = (1 + 2.0 ** -(t + 1)) ** depth - 1
        if math.isclose(got, want, rel_tol=1e-9):
            continue
        if math.isclose(got, (1 + 2.0 ** -t) ** depth - 1, rel_tol=1e-9):
            hint = "u is half the spacing of numbers near 1: u = 2^-(t+1), not 2^-t (that is torch.finfo(...).eps)."
        elif math.isclose(got, (1 + 2.0 ** -(t + 1)) ** (depth - 1) - 1, rel_tol=1e-9):
            hint = "Every one of the depth layers rounds once: the exponent is depth."
        elif math.isclose(got, depth * 2.0 ** -(t + 1), rel_tol=1e-9):
            hint = "That is the first-order approximation L u; the exercise asks for (1 + u)^L − 1."
        else:
            hint = "(1 + u)^L − 1 with u = 2^-(t+1)."
        exercises.fail(f"{direction(got, want, name=f'gate_tolerance({depth}, {t})', rtol=1e-9)}. {hint}")
    gate = _float(fp16_gate, "fp16_gate")
    off = direction(gate, (1 + 2.0 ** -11) ** 21 - 1, name="fp16_gate", rtol=1e-9)
    exercises.expect(not off, f"{off}: it is gate_tolerance for ResNet18's 21 weight layers in fp16; fp16 has 10 "
                              "stored fraction bits, bf16 has 7.")
    return f"(1 + u)^L - 1 for bf16, fp16 and fp32; fp16 at L = 21: {gate:.4f}"


def exercise_3(first_bad_layer: Any, bf16_is_finite: Any, model: nn.Module, inputs: torch.Tensor) -> str:
    """Check the first layer of ``model`` cast to fp16 whose output on ``inputs`` holds inf/NaN, and bf16's finiteness."""
    exercises.require_attempted(first_bad_layer, "first_bad_layer")
    exercises.expect_type(first_bad_layer, str, name="first_bad_layer")
    report = verify.layer_report(model, precision.cast_model(model, torch.float16), inputs)
    exercises.expect(report.first_nonfinite is not None, "this model does not overflow in fp16 on these inputs: "
                     "raise exercise_scale in the setup cell.")
    layers = [layer.name for layer in report.layers]
    exercises.expect(first_bad_layer in layers, f"first_bad_layer {first_bad_layer!r} is not one of the layers "
                     "layer_report compares: give a module name, as in model.named_modules().")
    position, first = layers.index(first_bad_layer), layers.index(report.first_nonfinite.name)
    if position > first:
        where = " That is the last layer: the output is NaN because of an earlier layer." \
            if first_bad_layer == layers[-1] else ""
        exercises.fail(f"first_bad_layer {first_bad_layer!r} has inf/NaN, but an earlier one already had.{where} "
                       "Take report.first_nonfinite.")
    exercises.expect(position == first, f"first_bad_layer {first_bad_layer!r}: its fp16 output is still finite; "
                                        "the overflow comes later.")
    exercises.require_attempted(bf16_is_finite, "bf16_is_finite")
    exercises.expect_type(bf16_is_finite, bool, name="bf16_is_finite")
    bf16 = verify.layer_report(model, precision.cast_model(model, torch.bfloat16), inputs)
    exercises.expect(bf16_is_finite == (bf16.first_nonfinite is None),
                     "bf16_is_finite is wrong: bf16 has fp32's 8 exponent bits: the same range, so it overflows "
                     "only where fp32 would." if not bf16_is_finite else
                     "bf16_is_finite is wrong: some bf16 activation is not finite here.")
    return f"in fp16 the first overflow is at {first_bad_layer}; bf16 stays finite"
