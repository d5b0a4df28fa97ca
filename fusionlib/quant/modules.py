r"""Quantized drop-in modules: a float layer with a TensorQuantizer on its input and one on its weight (notebook 08).

Each class here subclasses the float module it replaces, so
``isinstance(QuantConv2d(...), nn.Conv2d)`` is True and code that inspects a
model (torchvision's weight initialization, fusion recipes, MAC counters)
keeps working. It adds two child modules and changes only ``forward``::

    QuantConv2d(x)  = conv2d(input_quantizer(x), weight_quantizer(W), b)       (bias stays float)
    QuantLinear(x)  = linear(input_quantizer(x), weight_quantizer(W), b)
    QuantAvgPool2d(x) = avg_pool2d(input_quantizer(x))                         (no weight, no weight_quantizer)

With both quantizers in fake-quant mode this is what an integer engine
computes, up to the float rounding of the accumulation: ``x̂ = q_x · Δ_x`` and
``Ŵ = q_W · Δ_W`` (``Δ = amax / qmax``, :func:`~fusionlib.quant.step_size`),
so ``Ŵ * x̂ = Δ_W Δ_x (q_W * q_x)`` — an integer convolution rescaled once.
With both quantizers disabled (``quantizer.disable()``) the module *is* its
float parent, bit for bit.

Descriptors (how each tensor is quantized) come from, in order: the
constructor's ``quant_desc_input=`` / ``quant_desc_weight=`` keywords, else
the class attributes ``default_quant_desc_input`` /
``default_quant_desc_weight``, which :meth:`QuantMixin.set_default_quant_desc_input`
/ ``..._weight`` change for every later construction of that class — the hook
:func:`fusionlib.quant.initialize` relies on, since torchvision builds its
layers without knowing about quantization. Defaults, as pytorch-quantization's:
inputs 8-bit per tensor; conv weights 8-bit per output channel (axis 0;
axis 1 for ConvTranspose2d, whose weight is ``[C_in, C_out/groups, k, k]``);
linear weights 8-bit per row.

**Float state dicts load strictly.** A quantizer's ``amax`` is a buffer, so a
calibrated module's state dict has ``input_quantizer._amax`` /
``weight_quantizer._amax`` keys a float checkpoint lacks. When a state dict
holds *no* key of a module's quantizers (a float checkpoint), those keys are
not reported missing and the quantizers keep their amax; when it holds some,
loading is checked as usual.

Public names: :class:`QuantMixin`, :class:`QuantConv1d`, :class:`QuantConv2d`,
:class:`QuantConv3d`, :class:`QuantConvTranspose2d`, :class:`QuantLinear`,
:class:`QuantAvgPool2d`, :class:`QuantAdaptiveAvgPool2d`, ``QUANT_MODULES``
(float class -> quant class) and :func:`is_quant_module`.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fusionlib.quant.descriptor import (
    QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW,
    QUANT_DESC_8BIT_PER_TENSOR,
    QuantDescriptor,
)
from fusionlib.quant.tensor_quantizer import TensorQuantizer

__all__ = [
    "QuantMixin",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose2d",
    "QuantLinear",
    "QuantAvgPool2d",
    "QuantAdaptiveAvgPool2d",
    "QUANT_MODULES",
    "is_quant_module",
]


def _check_descriptor(value: Any, what: str) -> QuantDescriptor:
    if not isinstance(value, QuantDescriptor):
        raise TypeError(f"{what} must be a QuantDescriptor, got {type(value).__name__} {value!r}")
    return value


def _tolerate_float_state_dict(module: nn.Module, incompatible_keys) -> None:
    """Load-state-dict post-hook: forget the quantizer keys a float checkpoint cannot have (see the module docstring)."""
    tolerated = getattr(module, "_missing_quantizer_keys", ())
    for key in tolerated:
        while key in incompatible_keys.missing_keys:
            incompatible_keys.missing_keys.remove(key)
    module._missing_quantizer_keys = ()


class QuantMixin:
    """What every quant module shares: descriptors, quantizer construction, float state dicts, ``from_float``.

    Subclasses set ``_float_module`` (the float class they replace),
    ``_float_args`` (the attributes that rebuild it) and the two default
    descriptors (``default_quant_desc_weight = None`` for modules without a weight).
    """

    _float_module: ClassVar[type[nn.Module]]
    _float_args: ClassVar[tuple[str, ...]] = ()
    default_quant_desc_input: ClassVar[QuantDescriptor] = QUANT_DESC_8BIT_PER_TENSOR
    default_quant_desc_weight: ClassVar[QuantDescriptor | None] = None

    # ------------------------------------------------------------------ class-wide defaults
    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor) -> None:
        """Descriptor for the input quantizer of every *later* construction of this class."""
        cls.default_quant_desc_input = _check_descriptor(value, f"{cls.__name__}.default_quant_desc_input")

    @classmethod
    def set_default_quant_desc_weight(cls, value: QuantDescriptor) -> None:
        """Descriptor for the weight quantizer of every *later* construction of this class."""
        if cls.default_quant_desc_weight is None:
            raise TypeError(f"{cls.__name__} has no weight, so it has no weight quantizer to describe")
        cls.default_quant_desc_weight = _check_descriptor(value, f"{cls.__name__}.default_quant_desc_weight")

    # ------------------------------------------------------------------ construction
    def _init_quantizers(self, quant_desc_input: QuantDescriptor | None, quant_desc_weight: QuantDescriptor | None) -> None:
        desc_input = self.default_quant_desc_input if quant_desc_input is None else quant_desc_input
        self.input_quantizer = TensorQuantizer(_check_descriptor(desc_input, "quant_desc_input"))
        if self.default_quant_desc_weight is not None:
            desc_weight = self.default_quant_desc_weight if quant_desc_weight is None else quant_desc_weight
            self.weight_quantizer = TensorQuantizer(_check_descriptor(desc_weight, "quant_desc_weight"))
        elif quant_desc_weight is not None:
            raise TypeError(f"{type(self).__name__} has no weight; it takes quant_desc_input only")
        self._missing_quantizer_keys: tuple[str, ...] = ()
        self.register_load_state_dict_post_hook(_tolerate_float_state_dict)

    @property
    def quantizer_names(self) -> tuple[str, ...]:
        """``("input_quantizer", "weight_quantizer")``, or ``("input_quantizer",)`` without a weight."""
        return ("input_quantizer", "weight_quantizer") if hasattr(self, "weight_quantizer") else ("input_quantizer",)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Runs before the quantizers load theirs: note whether this is a float checkpoint for this module.
        quantizer_prefixes = tuple(f"{prefix}{name}." for name in self.quantizer_names)
        float_checkpoint = not any(key.startswith(quantizer_prefixes) for key in state_dict)
        self._missing_quantizer_keys = tuple(
            f"{prefix}{name}.{key}" for name in self.quantizer_names for key in getattr(self, name).state_dict()
        ) if float_checkpoint else ()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        quant_desc_input: QuantDescriptor | None = None,
        quant_desc_weight: QuantDescriptor | None = None,
    ):
        """A new quant module with ``module``'s hyperparameters and a copy of its parameters and buffers.

        ``module`` must be exactly ``cls``'s float class (not a subclass: its
        own ``forward`` would be lost). ``module`` is not modified, shares no
        tensor with the result, and the global random state is left as it
        was (the constructor's random initialization runs on a forked RNG).
        """
        if type(module) is not cls._float_module:
            raise TypeError(
                f"{cls.__name__}.from_float takes an nn.{cls._float_module.__name__}, got "
                f"{type(module).__module__}.{type(module).__qualname__}"
                + (" (already quantized)" if isinstance(module, QuantMixin) else "")
            )
        kwargs = {name: getattr(module, name) for name in cls._float_args}
        weight = getattr(module, "weight", None)
        if weight is not None:
            kwargs.update(bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
        extra = {} if cls.default_quant_desc_weight is None else {"quant_desc_weight": quant_desc_weight}
        with torch.random.fork_rng(devices=[]):
            new = cls(**kwargs, quant_desc_input=quant_desc_input, **extra)
        new.load_state_dict(module.state_dict(), strict=True)
        for name, param in module.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(param.requires_grad)
        return new.train(module.training)


# ---------------------------------------------------------------------- convolutions
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


class _QuantConvMixin(QuantMixin):
    _float_args = _CONV_ARGS

    def __init__(self, *args: Any, quant_desc_input: QuantDescriptor | None = None,
                 quant_desc_weight: QuantDescriptor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizers(quant_desc_input, quant_desc_weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(input), self.weight_quantizer(self.weight), self.bias)


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with ``input_quantizer`` (8-bit per tensor) and ``weight_quantizer`` (8-bit per output channel)."""

    _float_module = nn.Conv1d
    default_quant_desc_weight = QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with ``input_quantizer`` (8-bit per tensor) and ``weight_quantizer`` (8-bit per output channel)."""

    _float_module = nn.Conv2d
    default_quant_desc_weight = QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL


class QuantConv3d(_QuantConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with ``input_quantizer`` (8-bit per tensor) and ``weight_quantizer`` (8-bit per output channel)."""

    _float_module = nn.Conv3d
    default_quant_desc_weight = QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL


class QuantConvTranspose2d(_QuantConvMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with ``input_quantizer`` and ``weight_quantizer`` (per channel along axis 1).

    The weight is ``[C_in, C_out/groups, k, k]``, so its output channels are axis 1.
    """

    _float_module = nn.ConvTranspose2d
    _float_args = _CONV_ARGS + ("output_padding",)
    default_quant_desc_weight = QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported for ConvTranspose2d, got {self.padding_mode!r}")
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            self.input_quantizer(input), self.weight_quantizer(self.weight), self.bias,
            self.stride, self.padding, output_padding, self.groups, self.dilation,
        )


# ---------------------------------------------------------------------- linear
class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with ``input_quantizer`` (8-bit per tensor) and ``weight_quantizer`` (8-bit per row, axis 0)."""

    _float_module = nn.Linear
    _float_args = ("in_features", "out_features")
    default_quant_desc_weight = QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW

    def __init__(self, *args: Any, quant_desc_input: QuantDescriptor | None = None,
                 quant_desc_weight: QuantDescriptor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizers(quant_desc_input, quant_desc_weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(input), self.weight_quantizer(self.weight), self.bias)


# ---------------------------------------------------------------------- pooling (input quantizer only)
class _QuantPoolMixin(QuantMixin):
    def __init__(self, *args: Any, quant_desc_input: QuantDescriptor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_quantizers(quant_desc_input, None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quantizer(input))


class QuantAvgPool2d(_QuantPoolMixin, nn.AvgPool2d):
    """``nn.AvgPool2d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module = nn.AvgPool2d
    _float_args = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


class QuantAdaptiveAvgPool2d(_QuantPoolMixin, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module = nn.AdaptiveAvgPool2d
    _float_args = ("output_size",)


#: Float class -> its quant class (the original torch classes, captured when this module was imported).
QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    cls._float_module: cls
    for cls in (QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose2d, QuantLinear, QuantAvgPool2d,
                QuantAdaptiveAvgPool2d)
}


def is_quant_module(module: nn.Module) -> bool:
    """True for modules built from :class:`QuantMixin` (they own ``input_quantizer``)."""
    return isinstance(module, QuantMixin)
