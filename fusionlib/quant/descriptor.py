r"""QuantDescriptor: how one tensor is quantized (bits, axis, sign, range, amax, calibration).

A descriptor is an immutable record that a :class:`~fusionlib.quant.TensorQuantizer`
is built from, as in pytorch-quantization::

    QuantDescriptor(num_bits=8, axis=None, unsigned=False, narrow_range=False, amax=None,
                    learn_amax=False, calib_method="max", fake_quant=True, name=None,
                    dynamic_amax=False, scale_amax=None)

* ``axis`` — None (one amax for the tensor) or the axis / axes kept by a
  per-channel amax (0 for the output channels of a conv or linear weight,
  1 for a ConvTranspose weight ``[C_in, C_out/groups, k, k]``). Stored as a tuple.
* ``unsigned`` — the grid ``[0, qmax]`` with ``qmax = 2^num_bits − 1``
  (activations after a ReLU).
* ``narrow_range`` — ``[−qmax, qmax]`` (symmetric) instead of
  ``[−qmax − 1, qmax]``. Defaults to False here, as pytorch-quantization's
  descriptor, while :func:`~fusionlib.quant.fake_quantize` defaults to True.
* ``amax`` — an initial amax, else calibrate: a number, a flat list of one
  value per index along ``axis``, or a tensor that broadcasts against the
  quantized tensor (``[C, 1, 1, 1]``). Checked by :func:`~fusionlib.quant.check_amax`.
* ``calib_method`` — ``"max"`` (:class:`~fusionlib.quant.MaxCalibrator`) or
  ``"histogram"`` (:class:`~fusionlib.quant.HistogramCalibrator`, per tensor only).
* ``fake_quant`` — True: output dequantized floats; False: output the integers
  (a bare TensorQuantizer only: quant layers refuse it).
* ``dynamic_amax`` — False (the default): a quantizer without amax raises
  "calibrate first". True: it uses each tensor's own ``max |x|`` (per
  ``axis``, reduced over the other dimensions), pytorch-quantization's
  behaviour. Opt-in, because a forgotten calibration would otherwise run
  silently on per-batch ranges; int8 conversion and ONNX export refuse it.
* ``scale_amax`` — None, or a factor applied to amax whenever it is used
  (``amax · scale_amax``): a quick experiment, refused by int8 conversion and export.

``to_yaml()`` / ``from_yaml(text)`` write and read the fields as YAML;
``QuantDescriptor.from_yaml(d.to_yaml()) == d``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from fusionlib.quant.functional import check_amax, check_axis, check_num_bits
from fusionlib.yaml12 import dump_yaml, load_yaml

__all__ = [
    "QuantDescriptor",
    "CALIB_METHODS",
    "QUANT_DESC_8BIT_PER_TENSOR",
    "QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR",
    "QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW",
    "QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL",
]

CALIB_METHODS = ("max", "histogram")


def _frozen_amax(amax: Any) -> float | tuple | None:
    """``amax`` checked by :func:`~fusionlib.quant.check_amax` and stored as a number or (nested) tuples of them.

    Nested tuples keep a tensor's shape (``[4, 1]`` stays a column), so the
    quantizer can still check it against the tensor it meets.
    """
    if amax is None:
        return None
    values = check_amax(amax).detach().cpu().tolist()
    freeze = lambda v: tuple(freeze(e) for e in v) if isinstance(v, list) else float(v)
    return freeze(values)


@dataclass(frozen=True)
class QuantDescriptor:
    """How to quantize one tensor; validated and immutable (see the module docstring)."""

    num_bits: int = 8
    axis: Any = None
    unsigned: bool = False
    narrow_range: bool = False
    amax: Any = None
    learn_amax: bool = False
    calib_method: str = "max"
    fake_quant: bool = True
    name: str | None = field(default=None, compare=True)
    dynamic_amax: bool = False
    scale_amax: float | None = None

    def __post_init__(self):
        check_num_bits(self.num_bits)
        object.__setattr__(self, "axis", check_axis(self.axis))
        object.__setattr__(self, "amax", _frozen_amax(self.amax))
        if self.calib_method not in CALIB_METHODS:
            raise ValueError(f"calib_method must be one of {CALIB_METHODS}, got {self.calib_method!r}")
        if self.calib_method == "histogram" and self.axis is not None:
            raise ValueError(
                f"calib_method='histogram' calibrates one amax per tensor, but axis={self.axis}; use "
                "calib_method='max' for per-channel amax"
            )
        for flag in ("unsigned", "narrow_range", "learn_amax", "fake_quant", "dynamic_amax"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.dynamic_amax and (self.learn_amax or self.amax is not None):
            raise ValueError("dynamic_amax=True takes amax from each tensor; it cannot also have "
                             f"{'learn_amax=True' if self.learn_amax else f'amax={self.amax}'}: choose one")
        scale = self.scale_amax
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"scale_amax must be None or a positive finite number, got {scale!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise ValueError(f"name must be None or a str, got {self.name!r}")

    def dict(self) -> dict[str, Any]:
        """The fields as a plain dict (``QuantDescriptor(**d.dict()) == d``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_yaml(self) -> str:
        """The fields as YAML text (tuples written as lists); :meth:`from_yaml` reads it back equal."""
        return dump_yaml(self.dict())

    @classmethod
    def from_yaml(cls, text: str) -> "QuantDescriptor":
        """A descriptor from :meth:`to_yaml`'s text (YAML 1.2; validated like any other); unknown keys are refused."""
        values = load_yaml(text)
        if not isinstance(values, dict):
            raise ValueError(f"QuantDescriptor.from_yaml takes a YAML mapping of fields, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"QuantDescriptor.from_yaml: unknown field(s) {unknown}; fields: {[f.name for f in fields(cls)]}")
        return cls(**values)

    def replace(self, **changes: Any) -> "QuantDescriptor":
        """A copy with some fields changed (validated again)."""
        return QuantDescriptor(**{**self.dict(), **changes})

    def __repr__(self) -> str:
        parts = [f"{self.num_bits}bit"]
        parts.append("per-tensor" if self.axis is None else f"axis={self.axis}")
        if self.unsigned:
            parts.append("unsigned")
        if self.narrow_range:
            parts.append("narrow")
        if self.amax is not None:
            parts.append(f"amax={self.amax}")
        if self.learn_amax:
            parts.append("learn_amax")
        if self.dynamic_amax:
            parts.append("dynamic_amax")
        if self.scale_amax is not None:
            parts.append(f"scale_amax={self.scale_amax}")
        parts.append(f"calib={self.calib_method}")
        if not self.fake_quant:
            parts.append("real-quant")
        if self.name:
            parts.append(f"name={self.name!r}")
        return f"QuantDescriptor({' '.join(parts)})"


QUANT_DESC_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8)
QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR = QuantDescriptor(num_bits=8, unsigned=True)
QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW = QuantDescriptor(num_bits=8, axis=0)
QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=1)
QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=1)
QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL = QuantDescriptor(num_bits=8, axis=1)
