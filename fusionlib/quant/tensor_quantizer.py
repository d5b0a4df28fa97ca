r"""TensorQuantizer: an nn.Module that fake-quantizes, quantizes or calibrates one tensor.

Built from a :class:`~fusionlib.quant.QuantDescriptor`. ``forward(x)``::

    disabled            -> x
    calibration enabled -> calibrator.collect(x.detach())     (then, if quantization is off, x)
    quantization on     -> fake_quantize(x, amax, ...)        (fake_quant=True, the default)
                           quantize(x, amax, ...)             (fake_quant=False: the integers)

where ``amax`` is the calibrated (or set) amax, times ``scale_amax`` when the
descriptor gives one. Without an amax, forward raises "calibrate first",
unless the descriptor says ``dynamic_amax=True``: then each tensor's own
``reduce_amax(x)`` over the dimensions not in ``axis`` is used (as
pytorch-quantization does), and nothing can lower such a quantizer to int8
or Q/DQ (:func:`~fusionlib.quant.lowering.lowering_problem`).

**Changing the grid.** ``num_bits``, ``unsigned`` and ``narrow_range`` have
setters. Each validates, updates ``quant_desc``, installs a fresh calibrator
of the same kind (its statistics belong to the old grid), and, where the
grid ``[qmin, qmax]`` changes while an amax is set, warns that amax must be
calibrated again.

``amax`` lives in the buffer ``_amax``, so ``state_dict()`` saves it and
``load_state_dict`` restores it (checked like any amax), even into a fresh
quantizer whose amax is still unset. With ``learn_amax=True`` it is an
``nn.Parameter`` from construction on (empty until calibrated), so an
optimizer built before calibration trains it. A flat per-channel amax (a
list) is placed along ``axis`` (:func:`~fusionlib.quant.check_amax`).

**State.** A disabled quantizer saves a ``_disabled`` key too, so a layer kept
float (:func:`~fusionlib.quant.keep_float`) stays float after a
``state_dict`` round trip; an enabled one saves no such key, so an
uncalibrated quant layer's state still loads into its float layer. A state
with ``_amax`` and no ``_disabled`` enables the quantizer it is loaded into.
The calibration / quantization switches are working state and are not saved.

**Export mode.** With ``export_mode = True`` (on the class or an instance)
forward calls torch's own kernels with torch's parameters::

    torch.fake_quantize_per_tensor_affine(x, step_size, 0, qmin, qmax)         axis None
    torch.fake_quantize_per_channel_affine(x, step_size[C], zeros[C], axis, qmin, qmax)

where ``step_size = amax / qmax`` (torch's "scale"), so ``torch.onnx.export``
emits QuantizeLinear / DequantizeLinear pairs, as pytorch-quantization's
``use_fb_fake_quant``. The results agree with the default path within one step
(ties can round differently; see :mod:`fusionlib.quant.functional`).
``export_uint8_shift = True`` (an instance attribute, for a signed 8-bit
per-tensor quantizer) writes the same grid as unsigned integers shifted by
128, ``fake_quantize_per_tensor_affine(x, step_size, 128, 0, 255)``:
``(clamp(round(x/Δ) + 128, 0, 255) − 128)·Δ = clamp(round(x/Δ), −128, 127)·Δ``,
so the values are identical and the exported pair is uint8 with zero point 128
(the storage torch's ``quint8`` uses, and the activation type x86 int8 kernels take).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from fusionlib.quant.calibrators import HistogramCalibrator, MaxCalibrator
from fusionlib.quant.descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor
from fusionlib.quant.functional import (
    AMAX_EPSILON,
    amax_along,
    check_amax,
    check_axis,
    check_num_bits,
    fake_quantize,
    quant_max,
    quant_min,
    quantize,
)

__all__ = ["TensorQuantizer"]


class TensorQuantizer(nn.Module):
    """Fake-quantize (or quantize, or calibrate on) the tensors passing through; see the module docstring."""

    export_mode: bool = False
    export_uint8_shift: bool = False

    def __init__(
        self,
        quant_desc: QuantDescriptor = QUANT_DESC_8BIT_PER_TENSOR,
        disabled: bool = False,
        if_quant: bool = True,
        if_calib: bool = False,
    ):
        super().__init__()
        if not isinstance(quant_desc, QuantDescriptor):
            raise TypeError(f"quant_desc must be a QuantDescriptor, got {type(quant_desc).__name__}")
        self.quant_desc = quant_desc
        self._num_bits = quant_desc.num_bits
        self._axis = quant_desc.axis
        self._unsigned = quant_desc.unsigned
        self._narrow_range = quant_desc.narrow_range
        self._learn_amax = quant_desc.learn_amax
        self._fake_quant = quant_desc.fake_quant
        self._dynamic_amax = quant_desc.dynamic_amax
        self._scale_amax = quant_desc.scale_amax
        self.name = quant_desc.name
        self._disabled = bool(disabled)
        self._if_quant = bool(if_quant)
        self._if_calib = bool(if_calib)
        self.calibrator = self.new_calibrator(histogram=quant_desc.calib_method == "histogram")
        if self._learn_amax:  # a parameter now (empty: unset), so an optimizer built before calibration sees it
            self._amax = nn.Parameter(torch.empty(0))
        else:
            self.register_buffer("_amax", None)
        if quant_desc.amax is not None:
            self.amax = quant_desc.amax

    def new_calibrator(self, histogram: bool, num_bins: int = 2048) -> MaxCalibrator | HistogramCalibrator:
        """An empty calibrator for this quantizer's grid: a histogram (per tensor) or a max (along ``axis``)."""
        if histogram:
            return HistogramCalibrator(self._num_bits, None, self._unsigned, num_bins=num_bins)
        return MaxCalibrator(self._num_bits, self._axis, self._unsigned)

    # ---- views of the descriptor; the grid's three have setters --------------------------
    num_bits = property(lambda self: self._num_bits,
                        lambda self, value: self._change_grid("num_bits", check_num_bits(value)))
    unsigned = property(lambda self: self._unsigned, lambda self, value: self._change_grid("unsigned", value))
    narrow_range = property(lambda self: self._narrow_range,
                            lambda self, value: self._change_grid("narrow_range", value))
    axis = property(lambda self: self._axis)
    learn_amax = property(lambda self: self._learn_amax)
    dynamic_amax = property(lambda self: self._dynamic_amax)
    scale_amax = property(lambda self: self._scale_amax)
    fake_quant = property(lambda self: self._fake_quant)
    disabled = property(lambda self: self._disabled)
    quant_enabled = property(lambda self: self._if_quant)
    calib_enabled = property(lambda self: self._if_calib)

    def _change_grid(self, field: str, value) -> None:
        """Set ``num_bits`` / ``unsigned`` / ``narrow_range``: new descriptor, fresh calibrator, a warning if amax is stale."""
        if field != "num_bits" and not isinstance(value, bool):
            raise ValueError(f"{self._who()}: {field} must be True or False, got {value!r}")
        old_grid = (self.quant_min, self.quant_max)
        self.quant_desc = self.quant_desc.replace(**{field: value})
        setattr(self, f"_{field}", value)
        old = self.calibrator
        self.calibrator = self.new_calibrator(isinstance(old, HistogramCalibrator), getattr(old, "num_bins", 2048))
        if (self.quant_min, self.quant_max) != old_grid and self.amax is not None:
            warnings.warn(f"{self._who()}: {field}={value!r} changes the grid from [{old_grid[0]}, {old_grid[1]}] "
                          f"to [{self.quant_min}, {self.quant_max}]; amax was chosen for the old grid: calibrate "
                          "again", stacklevel=4)

    @property
    def quant_max(self) -> int:
        return quant_max(self._num_bits, self._unsigned)

    @property
    def quant_min(self) -> int:
        return quant_min(self._num_bits, self._unsigned, self._narrow_range)

    @property
    def amax(self) -> torch.Tensor | None:
        """The amax as set (None until calibrated or set); placed along ``axis`` when used."""
        amax = self._amax
        return None if amax is None or amax.numel() == 0 else amax

    @amax.setter
    def amax(self, value) -> None:
        if value is None:
            raise ValueError(f"{self._who()}: amax cannot be set to None; use reset_calib() to clear calibration")
        t = check_amax(value).detach().to(torch.float32)
        old = self._amax
        if old is not None:
            t = t.to(old.device)
        if isinstance(old, nn.Parameter):  # learn_amax: keep the parameter object the optimizer holds
            with torch.no_grad():
                old.data = t.clone()
        else:
            self._amax = t.clone()

    def clear_amax(self) -> None:
        """Back to "no amax" (the setter refuses None); a learned amax keeps its (now empty) parameter."""
        if isinstance(self._amax, nn.Parameter):
            self._amax.data = torch.empty(0, device=self._amax.device)
        else:
            self._amax = None

    def _who(self) -> str:
        return f"TensorQuantizer {self.name!r}" if self.name else "TensorQuantizer"

    # ---- switches ------------------------------------------------------------------------
    def enable(self) -> None:
        self._disabled = False

    def disable(self) -> None:
        """Pass tensors through untouched (no calibration, no quantization)."""
        self._disabled = True

    def enable_quant(self) -> None:
        self._if_quant = True

    def disable_quant(self) -> None:
        self._if_quant = False

    def enable_calib(self) -> None:
        self._if_calib = True

    def disable_calib(self) -> None:
        self._if_calib = False

    def reset_calib(self) -> None:
        self.calibrator.reset()

    def load_calib_amax(self, method: str | None = None, strict: bool = True, **kwargs) -> torch.Tensor | None:
        """Set amax from the calibrator: ``method`` None (or "max") for max, "percentile"/"mse"/"entropy" for histogram.

        A calibrator that saw no data is a RuntimeError, or with
        ``strict=False`` a warning, the amax left as it was. An all-zero
        channel (amax <= 2^-24, ``AMAX_EPSILON``, as in ``check_amax``) gets amax 1: its data
        then quantizes to zero, as an amax that small would. Returns the (new) amax.
        """
        try:
            if isinstance(self.calibrator, MaxCalibrator):
                if method not in (None, "max"):
                    raise ValueError(
                        f"{self._who()} has a max calibrator; method must be None or 'max', got {method!r} "
                        "(build it with calib_method='histogram' for percentile / mse / entropy)"
                    )
                if kwargs:
                    raise ValueError(f"the max calibrator takes no options, got {sorted(kwargs)}")
                amax = self.calibrator.compute_amax()
            else:
                if method is None:
                    raise ValueError(f"{self._who()} has a histogram calibrator: pass method='percentile', 'mse' or 'entropy'")
                amax = self.calibrator.compute_amax(method, **kwargs)
        except RuntimeError as err:
            raise RuntimeError(f"{self._who()}: {err}") from None
        if amax is None:
            message = f"{self._who()}: its calibrator saw no data (enable_calib() and run batches first)"
            if strict:
                raise RuntimeError(message)
            warnings.warn(message + "; amax left as it was (strict=False)", stacklevel=2)
            return self.amax
        self.load_amax(amax)
        return self.amax

    def load_amax(self, amax: torch.Tensor) -> None:
        """Set a calibrated amax; entries <= 2^-24 (all-zero data) become 1.0, with a warning naming how many."""
        zero = amax <= AMAX_EPSILON
        if bool(zero.any()):
            warnings.warn(f"{self._who()}: {int(zero.sum())} amax entries are <= 2^-24 (all-zero data); using 1.0 "
                          "there", stacklevel=2)
            amax = torch.where(zero, torch.ones_like(amax), amax)
        self.amax = amax

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._disabled:
            return x
        if self._if_calib:
            self.calibrator.collect(x.detach())
        if not self._if_quant:
            return x
        amax = self.amax_for(x)
        if self.export_mode:
            return self._torch_fake_quant(x, amax)
        if self._fake_quant:
            return fake_quantize(x, amax, self._num_bits, self._unsigned, self._narrow_range, self._learn_amax,
                                 self._axis)
        return quantize(x, amax, self._num_bits, self._unsigned, self._narrow_range, self._axis)

    def amax_for(self, x: torch.Tensor) -> torch.Tensor:
        """The amax ``forward(x)`` uses: the stored one, else (``dynamic_amax``) ``x``'s own; times ``scale_amax``.

        Dynamic: ``amax_along(x, axis)``: ``max |x|`` over the dimensions not in ``axis``
        (detached, at least ``2^-24``, so all-zero data quantizes to 0).
        Without either, RuntimeError "calibrate first" (or, while calibration is on, "disable_quant()").
        """
        amax = self.amax
        if amax is None:
            if not self._dynamic_amax and self._if_calib:
                raise RuntimeError(
                    f"{self._who()} is collecting calibration statistics with quantization on, and has no amax yet: "
                    "call disable_quant() while calibrating, then load_calib_amax() and enable_quant()"
                )
            if not self._dynamic_amax:
                raise RuntimeError(
                    f"{self._who()} has no amax: calibrate first or set amax (quantizer.amax = ...) before quantizing"
                    " (or build it with dynamic_amax=True to use each tensor's own max |x|)"
                )
            amax = amax_along(x, self._axis).float().clamp_min(AMAX_EPSILON)
            if not bool(torch.isfinite(amax).all()):
                raise ValueError(f"{self._who()}: dynamic amax of a tensor with NaN or inf values is not finite")
        return amax if self._scale_amax is None else amax * self._scale_amax

    def _torch_fake_quant(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        amax = check_amax(amax, x, self._axis).to(device=x.device, dtype=torch.float32)
        qmax, qmin = self.quant_max, self.quant_min
        step = amax / qmax  # torch's "scale"
        axes = check_axis(self._axis, x.dim())
        if not self._unsigned and (qmin, qmax) != (-128, 127):
            # a signed grid narrower than int8 (a weight of fewer bits, lowering.py's (*)): clamp to its ends first,
            # then QuantizeLinear's int8 rounding lands on it; the exporter folds the clamp of a constant weight
            shape = [1] * x.dim()
            if amax.numel() > 1 and axes is not None and len(axes) == 1:
                shape[axes[0]] = -1
            ends = step.detach().reshape(shape) if amax.numel() > 1 else step.detach().reshape(())
            x = torch.maximum(torch.minimum(x, ends * qmax), ends * qmin)
            qmin, qmax = -128, 127
        if amax.numel() == 1:
            if self.export_uint8_shift and not self._unsigned and self._num_bits == 8 and not self._narrow_range:
                return torch.fake_quantize_per_tensor_affine(x, float(step.reshape(())), 128, 0, 255)
            return torch.fake_quantize_per_tensor_affine(x, float(step.reshape(())), 0, qmin, qmax)
        if axes is None or len(axes) != 1:
            raise ValueError(
                f"{self._who()}: export mode quantizes per tensor or along one axis; got axis={self._axis} "
                f"with amax of shape {tuple(amax.shape)}"
            )
        step = step.detach().flatten()
        zero_point = torch.zeros(step.numel(), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_channel_affine(x, step, zero_point, axes[0], qmin, qmax)

    # ---- state dict: _amax checked, accepted even when ours is unset; a "_disabled" key while disabled
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._disabled:  # only then: an enabled quantizer's state stays loadable into its float module
            destination[prefix + "_disabled"] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "_amax"
        value = state_dict.get(key)
        if value is not None and value.numel() > 0:
            try:
                check_amax(value)
            except ValueError as err:
                error_msgs.append(f"{key}: {err}")
                return
        if value is not None and (self.amax is None or value.shape != self._amax.shape):
            if value.numel() == 0:
                self.clear_amax()
            else:  # unset, or another calibration shape: take it as is
                self.amax = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        flag = prefix + "_disabled"
        if flag in state_dict:
            self._disabled = bool(state_dict[flag])
            while flag in unexpected_keys:
                unexpected_keys.remove(flag)
        elif value is not None:  # a quantizer's state saved while enabled
            self._disabled = False

    # ---- repr ------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        if self._disabled:
            return "disabled"
        parts = [f"{self._num_bits}bit"]
        if self._narrow_range:
            parts.append("narrow")
        if self._unsigned:
            parts.append("unsigned")
        parts.append("per-tensor" if self._axis is None else f"per-channel axis={self._axis}")
        amax = self.amax
        if amax is None:
            parts.append("amax=dynamic" if self._dynamic_amax else "amax=unset")
        elif amax.numel() == 1:
            parts.append(f"amax={float(amax.detach().reshape(())):.4f}")
        else:
            a = amax.detach()
            parts.append(f"amax=[{float(a.min()):.4f}, {float(a.max()):.4f}]({a.numel()})")
        if self._learn_amax:
            parts.append("learn_amax")
        if self._scale_amax is not None:
            parts.append(f"scale_amax={self._scale_amax}")
        if not self._if_quant:
            parts.append("quant off")
        else:
            parts.append("fake" if self._fake_quant else "real")
        if self._if_calib:
            parts.append(f"calib={type(self.calibrator).__name__}")
        if self.export_mode:
            parts.append("export")
        if self.name:
            parts.append(f"name={self.name!r}")
        return " ".join(parts)
