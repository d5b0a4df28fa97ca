r"""Reduced precision without quantization: bfloat16 and float16 inference on CPU (notebook 15).

**The formats.** A binary floating-point number is ``(-1)^s · 1.f · 2^(e - bias)``
with ``t`` stored fraction bits (the leading 1 is implicit)::

    format    sign  exponent  fraction t   unit roundoff u = 2^-(t+1)   largest finite
    float32    1       8         23            2^-24 ≈ 6.0e-8              ≈ 3.4e38
    float16    1       5         10            2^-11 ≈ 4.9e-4              65504
    bfloat16   1       8          7            2^-8  ≈ 3.9e-3              ≈ 3.4e38

bfloat16 is float32 with the last 16 fraction bits cut off: the same exponent,
hence the same range, and about 2-3 significant decimal digits. float16 spends
more bits on the fraction (a unit roundoff 8x smaller) and fewer on the exponent:
anything above 65504 becomes ``inf``.

**Rounding one number.** Round-to-nearest gives ``fl(x) = x (1 + δ)`` with
``|δ| <= u`` (:func:`unit_roundoff`).

**A dot product of length K** (one output of a convolution or linear layer,
``K = C_in · k · k``), summed left to right in precision ``u``: every partial sum
is rounded once, so (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1)::

    |fl(xᵀy) − xᵀy| <= γ_K · Σ|x_i y_i|,      γ_K = K u / (1 − K u)

(:func:`dot_product_error_bound`). The bound is a worst case, with every rounding
error the same sign; rounding errors behave like independent zero-mean noise, so
the typical error grows like ``√K · u`` (:func:`dot_product_typical_error`).
With ``K = 4608`` (a 3x3 conv over 512 channels) and bf16 accumulation, ``K u = 18``:
the bound says nothing, and even ``√K u ≈ 0.27`` is useless. That is why
accumulation stays in float32 (u = 2^-24) on AMX, AVX512-BF16 and in oneDNN:
bf16 inputs, products exact in fp32, fp32 sums, **one** bf16 rounding of the
output. The error of a layer is then about ``u_bf16`` from rounding its weights
and its output, independent of ``K``.

**Through a network of depth L.** Each layer adds a relative error of about
``u`` (its weights and its output are rounded once each); if the layers neither
amplify nor damp errors, the relative errors add up, at worst linearly::

    worst case (first order)   ε_L ≈ L · u        (:func:`worst_case_relative_error`)
    typical (independent)      ε_L ≈ √L · u       (:func:`typical_relative_error`)

A layer with gain > 1 (a poorly conditioned layer) multiplies what came before;
:func:`fusionlib.verify.layer_report` shows layer by layer where error enters and
whether it grows.

**Folding before casting.** Fold BatchNorm in float64 and round once to bf16
(:func:`fold_then_cast`): each folded weight is then the nearest bf16 number to
the exact fold. Casting first and folding afterwards (:func:`cast_then_fold`)
rounds the weights, the BatchNorm statistics and the folded result: up to three
roundings, never closer to the exact fold.

**Fast paths.** bf16 and fp16 are only faster than fp32 where the CPU has
instructions for them: AMX (Sapphire Rapids and later: ``amx_bf16``,
``amx_fp16``), AVX512-BF16 (``avx512_bf16``) or AVX512-FP16 (``avx512_fp16``).
Elsewhere oneDNN or ATen convert to fp32 and back, and reduced precision is
*slower*. :func:`fast_path` says which path a dtype takes;
:func:`check_fast_path` measures the slow-down and warns (never raises).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arguments import check_positive_int
from .folding import round_to_nearest
from .modules import eval_mode

__all__ = [
    "FloatFormat",
    "FORMATS",
    "float_format",
    "mantissa_bits",
    "unit_roundoff",
    "max_finite",
    "bit_fields",
    "dot_product_error_bound",
    "dot_product_typical_error",
    "worst_case_relative_error",
    "typical_relative_error",
    "round_to_nearest",
    "cast_model",
    "autocast",
    "AutocastModel",
    "autocast_model",
    "fold_then_cast",
    "PRECISIONS",
    "variant",
    "cast_then_fold",
    "FastPath",
    "fast_path",
    "check_fast_path",
    "SlowPrecisionWarning",
    "cpu_flags",
]

REDUCED = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------
# The numerics
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: sign, exponent and stored fraction bits."""

    name: str
    dtype: torch.dtype
    exponent_bits: int
    fraction_bits: int  #: stored mantissa bits t (the leading 1 is implicit)

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.fraction_bits

    @property
    def unit_roundoff(self) -> float:
        """u = 2^-(t+1): the largest relative error of rounding to nearest."""
        return 2.0 ** -(self.fraction_bits + 1)

    @property
    def max_finite(self) -> float:
        """(2 − 2^-t) · 2^(2^(e−1) − 1): the largest finite number."""
        return (2.0 - 2.0 ** -self.fraction_bits) * 2.0 ** (2 ** (self.exponent_bits - 1) - 1)


FORMATS: dict[torch.dtype, FloatFormat] = {
    torch.float32: FloatFormat("float32", torch.float32, 8, 23),
    torch.float16: FloatFormat("float16", torch.float16, 5, 10),
    torch.bfloat16: FloatFormat("bfloat16", torch.bfloat16, 8, 7),
    torch.float64: FloatFormat("float64", torch.float64, 11, 52),
}


def float_format(dtype: torch.dtype) -> FloatFormat:
    """The :class:`FloatFormat` of ``dtype`` (float64, float32, float16 or bfloat16)."""
    if dtype not in FORMATS:
        raise ValueError(f"dtype must be one of {[f.name for f in FORMATS.values()]}, got {dtype!r}")
    return FORMATS[dtype]


def mantissa_bits(dtype: torch.dtype) -> int:
    """Stored fraction bits t: 23 (fp32), 10 (fp16), 7 (bf16); precision is t + 1 bits with the implicit 1."""
    return float_format(dtype).fraction_bits


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-(t+1): ``fl(x) = x(1 + δ)``, ``|δ| <= u``. 2^-8 for bf16, 2^-11 for fp16, 2^-24 for fp32."""
    return float_format(dtype).unit_roundoff


def max_finite(dtype: torch.dtype) -> float:
    """The largest finite value: 65504 for fp16, ≈ 3.39e38 for bf16 and fp32 (same exponent width)."""
    return float_format(dtype).max_finite


def bit_fields(value: float, dtype: torch.dtype) -> tuple[str, str, str]:
    """``(sign, exponent, fraction)`` bit strings of ``value`` rounded to ``dtype`` (float32, float16, bfloat16)."""
    fmt = float_format(dtype)
    if dtype == torch.float64:
        raise ValueError("bit_fields draws float32, float16 and bfloat16, got torch.float64")
    int_dtype = torch.int32 if fmt.bits == 32 else torch.int16
    raw = int(torch.tensor([value], dtype=dtype).view(int_dtype).item()) & ((1 << fmt.bits) - 1)
    text = format(raw, f"0{fmt.bits}b")
    return text[0], text[1:1 + fmt.exponent_bits], text[1 + fmt.exponent_bits:]


def dot_product_error_bound(k: int, dtype: torch.dtype) -> float:
    """γ_K = K u / (1 − K u): ``|fl(xᵀy) − xᵀy| <= γ_K Σ|x_i y_i|`` for a length-K sum in ``dtype``.

    ``inf`` once ``K u >= 1`` (the bound says nothing).
    """
    check_positive_int("k", k)
    ku = k * unit_roundoff(dtype)
    return ku / (1.0 - ku) if ku < 1.0 else math.inf


def dot_product_typical_error(k: int, dtype: torch.dtype) -> float:
    """√K · u: the typical relative error of a length-K sum when rounding errors are independent."""
    check_positive_int("k", k)
    return math.sqrt(k) * unit_roundoff(dtype)


def worst_case_relative_error(depth: int, dtype: torch.dtype) -> float:
    """(1 + u)^L − 1 ≈ L u: L layers, each rounding once with |δ| <= u, errors all the same sign, gain 1."""
    check_positive_int("depth", depth)
    return (1.0 + unit_roundoff(dtype)) ** depth - 1.0


def typical_relative_error(depth: int, dtype: torch.dtype) -> float:
    """√L · u: L layers with independent zero-mean rounding errors of size u, gain 1."""
    check_positive_int("depth", depth)
    return math.sqrt(depth) * unit_roundoff(dtype)


# --------------------------------------------------------------------------
# Casting
# --------------------------------------------------------------------------
def _check_reduced(dtype: Any) -> None:
    if dtype not in (*REDUCED, torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16, torch.float32 or torch.float64, "
                         f"got {dtype!r}")


class _CastInputs:
    """Forward pre-hook (``with_kwargs=True``): floating-point tensor inputs, positional or keyword, to
    ``dtype`` (and channels_last for 4-D)."""

    def __init__(self, dtype: torch.dtype, channels_last: bool) -> None:
        self.dtype, self.channels_last = dtype, channels_last

    def cast(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.to(self.dtype)
            if self.channels_last and a.dim() == 4:
                a = a.contiguous(memory_format=torch.channels_last)
        return a

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return tuple(map(self.cast, args)), {key: self.cast(value) for key, value in kwargs.items()}


class _CastOutputs:
    """Forward hook: floating-point tensor outputs back to ``dtype`` (float32)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.to(self.dtype)
        return output


def cast_model(model: nn.Module, dtype: torch.dtype, channels_last: bool = False, *,
               inplace: bool = False, cast_io: bool = True) -> nn.Module:
    """``model`` with every floating-point parameter and buffer in ``dtype`` (BatchNorm statistics too).

    ``channels_last=True`` also stores 4-D weights NHWC. With ``cast_io=True`` the model takes and returns
    float32 as before: a forward pre-hook casts floating-point inputs to ``dtype`` (and to channels_last),
    a forward hook casts a tensor output back to float32, so it drops in wherever the fp32 model ran and
    keeps its module names (``verify.layer_report`` matches layers by name). ``inplace=False`` (default)
    casts a deep copy. The returned model is in the caller's training mode.
    """
    _check_reduced(dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model.to(dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cast_io:
        model.register_forward_pre_hook(_CastInputs(dtype, channels_last), with_kwargs=True)
        model.register_forward_hook(_CastOutputs(torch.float32))
    return model


def autocast(dtype: torch.dtype = torch.bfloat16, enabled: bool = True) -> torch.autocast:
    """``torch.autocast("cpu", dtype)``: matmuls and convolutions in ``dtype``, weights stay fp32.

    Each call casts the fp32 weights to ``dtype`` again (a cost per forward pass that bf16 weights do not pay),
    and reductions / normalizations stay fp32.
    """
    if dtype not in REDUCED:
        raise ValueError(f"autocast dtype must be torch.bfloat16 or torch.float16, got {dtype!r}")
    return torch.autocast("cpu", dtype=dtype, enabled=enabled)


class AutocastModel(nn.Module):
    """Runs ``module`` under :func:`autocast` and returns a float32 output (to time and compare it).

    ``verify.layer_report`` names its layers by ``module``'s names (``layer_names_from``), so it compares
    with the fp32 model without a mapping.
    """

    layer_names_from = "module"  #: the submodule whose names are this model's layer names

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16, channels_last: bool = False) -> None:
        super().__init__()
        if dtype not in REDUCED:
            raise ValueError(f"AutocastModel dtype must be torch.bfloat16 or torch.float16, got {dtype!r}")
        self.module, self.dtype, self.channels_last = module, dtype, channels_last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.channels_last:
            def nhwc(a: Any) -> Any:
                return a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
            args, kwargs = tuple(map(nhwc, args)), {key: nhwc(value) for key, value in kwargs.items()}
        with autocast(self.dtype):
            out = self.module(*args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def autocast_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16, channels_last: bool = False) -> nn.Module:
    """An :class:`AutocastModel` around a deep copy of ``model`` (channels_last: weights and inputs NHWC)."""
    model = copy.deepcopy(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return AutocastModel(model, dtype, channels_last)


def fold_then_cast(model: nn.Module, dtype: torch.dtype = torch.bfloat16, channels_last: bool = False,
                   **fuse_kwargs: Any) -> nn.Module:
    """Fold every BatchNorm in float64, then round once to ``dtype``: each folded weight is the nearest
    ``dtype`` number to the exact fold of the fp32 model's values.

    The model is copied to float64, folded with :func:`fusionlib.fx.fuse_conv_bn` (``fuse_kwargs`` go to it),
    rounded with :func:`round_to_nearest` (torch's own float64 -> bf16 conversion rounds twice), then
    :func:`cast_model` (inputs and outputs stay float32). Eval mode only.
    """
    from fusionlib.fx import fuse_conv_bn

    _check_reduced(dtype)
    folded = fuse_conv_bn(copy.deepcopy(model).double(), inplace=True, **fuse_kwargs)
    with torch.no_grad():
        rounded = {key: round_to_nearest(value, dtype) if value.is_floating_point() else value
                   for key, value in folded.state_dict().items()}
        folded.to(dtype)
        folded.load_state_dict(rounded)
    return cast_model(folded, dtype, channels_last, inplace=True)


def cast_then_fold(model: nn.Module, dtype: torch.dtype = torch.bfloat16, channels_last: bool = False,
                   **fuse_kwargs: Any) -> nn.Module:
    """The other order, to compare: cast to ``dtype`` first (weights and BatchNorm statistics rounded), then
    fold the rounded values (the fold rounds once more). Never closer to the exact fold than
    :func:`fold_then_cast`.
    """
    from fusionlib.fx import fuse_conv_bn

    _check_reduced(dtype)
    cast = cast_model(model, dtype, channels_last=False, cast_io=False)
    folded = fuse_conv_bn(cast, inplace=True, **fuse_kwargs)
    return cast_model(folded, dtype, channels_last=channels_last, inplace=True)


PRECISIONS = ("fp32", "autocast_bf16", "autocast_fp16", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def variant(model: nn.Module, spec: str) -> nn.Module:
    """A copy of ``model`` as ``spec`` says: ``"<precision>[+fold][+cl]"``, e.g. ``"bf16+fold+cl"``.

    precision: ``fp32``, ``autocast_bf16`` / ``autocast_fp16`` (:func:`autocast_model`), ``bf16`` / ``fp16``
    (weights and activations, :func:`cast_model`); ``+fold``: BatchNorm folded first (float64, rounded once:
    :func:`fold_then_cast`); ``+cl``: channels_last weights and inputs. Inputs and outputs stay float32.
    """
    from fusionlib.fx import fuse_conv_bn

    parts = spec.split("+") if isinstance(spec, str) else []
    precision, options = (parts[0], set(parts[1:])) if parts else ("", set())
    if precision not in PRECISIONS or not options <= {"fold", "cl"} or len(options) != len(parts) - 1:
        raise ValueError(f"variant spec must be '<precision>[+fold][+cl]' with precision one of {PRECISIONS}, "
                         f"got {spec!r}")
    fold, channels_last = "fold" in options, "cl" in options
    if precision in _DTYPES:
        dtype = _DTYPES[precision]
        return fold_then_cast(model, dtype, channels_last) if fold else cast_model(model, dtype, channels_last)
    base = fuse_conv_bn(model) if fold else copy.deepcopy(model)
    if precision == "fp32":
        return cast_model(base, torch.float32, channels_last, inplace=True) if channels_last else base
    return AutocastModel(base.to(memory_format=torch.channels_last) if channels_last else base,
                         _DTYPES[precision.split("_")[1]], channels_last)


# --------------------------------------------------------------------------
# Fast paths
# --------------------------------------------------------------------------
class SlowPrecisionWarning(UserWarning):
    """A reduced-precision dtype without a fast path on this CPU: it runs, slower than fp32."""


@dataclass(frozen=True)
class FastPath:
    """Which instructions a dtype's convolutions and matmuls can use on this CPU."""

    dtype: torch.dtype
    path: str  #: "AMX", "AVX512-BF16", "AVX512-FP16", "fp32" (float32 itself) or "none"
    capability: str  #: torch.backends.cpu.get_cpu_capability()
    flags: tuple[str, ...]  #: the relevant CPU flags found

    @property
    def fast(self) -> bool:
        return self.path != "none"

    def describe(self) -> str:
        name = float_format(self.dtype).name
        if self.path == "fp32":
            return f"float32: the baseline (ATen capability {self.capability})"
        if self.fast:
            return f"{name}: fast path {self.path} (ATen capability {self.capability}; flags {', '.join(self.flags)})"
        return (f"{name}: no fast path on this CPU (ATen capability {self.capability}; no "
                f"{'amx_bf16 / avx512_bf16' if self.dtype == torch.bfloat16 else 'amx_fp16 / avx512_fp16'}): "
                "converted to fp32 and back, expect it slower than fp32")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (an empty set where it cannot be read, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - report, never fail
        return "unknown"


def fast_path(dtype: torch.dtype = torch.bfloat16, flags: set[str] | None = None) -> FastPath:
    """The fast path ``dtype`` takes on this CPU: AMX, AVX512-BF16 / AVX512-FP16, or none.

    From the CPU flags (``/proc/cpuinfo``, or ``flags`` to override) and
    ``torch.backends.cpu.get_cpu_capability()``; where flags cannot be read, oneDNN's own check
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) decides. Never raises for a known dtype.
    """
    float_format(dtype)
    capability = _capability()
    if dtype in (torch.float32, torch.float64):
        return FastPath(dtype, "fp32", capability, ())
    flags = cpu_flags() if flags is None else set(flags)
    kind = "bf16" if dtype == torch.bfloat16 else "fp16"
    found = tuple(sorted(f for f in flags if f in (f"amx_{kind}", f"avx512_{kind}", "amx_tile")))
    if f"amx_{kind}" in flags:
        path = "AMX"
    elif f"avx512_{kind}" in flags:
        path = f"AVX512-{kind.upper()}"
    elif not flags:
        try:
            supported = (torch.ops.mkldnn._is_mkldnn_bf16_supported() if kind == "bf16"
                         else torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except Exception:  # noqa: BLE001
            supported = False
        path = "oneDNN" if supported else "none"
    else:
        path = "none"
    return FastPath(dtype, path, capability, found)


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def check_fast_path(model: nn.Module, inputs: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                    repeats: int = 3, flags: set[str] | None = None) -> tuple[FastPath, float | None]:
    """:func:`fast_path` of ``dtype``; where there is none, measure ``fp32 time / dtype time`` of ``model``
    (one thread, median of ``repeats`` after a warm-up) and warn with it (:class:`SlowPrecisionWarning`).

    Both run in eval mode (:func:`fusionlib.modules.eval_mode`: no dropout, BatchNorm statistics untouched;
    every training flag restored). Returns ``(path, ratio)``; ``ratio`` is ``None`` when there is a fast path
    (nothing measured) or the measurement itself failed (then the warning says so). Never raises: the
    notebooks run on any CPU.
    """
    path = fast_path(dtype, flags)
    if path.fast:
        return path, None
    ratio = None
    try:
        cast = cast_model(model, dtype)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with eval_mode(model, cast), torch.inference_mode():
                model(inputs), cast(inputs)  # warm-up
                base = _median_ms(lambda: model(inputs), repeats)
                slow = _median_ms(lambda: cast(inputs), repeats)
        finally:
            torch.set_num_threads(previous)
        ratio = base / slow
        what = f"measured {1 / ratio:.2f}x the fp32 time ({slow:.1f} ms vs {base:.1f} ms, one thread)"
    except Exception as error:  # noqa: BLE001 - a warning, never a failure
        what = f"the measurement failed ({type(error).__name__}: {error})"
    warnings.warn(f"{path.describe()}; {what}.", SlowPrecisionWarning, stacklevel=2)
    return path, ratio
