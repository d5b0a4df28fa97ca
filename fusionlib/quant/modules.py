r"""Quantized drop-in modules: a float layer with a TensorQuantizer on its input and one on its weight (notebook 08).

Each class here subclasses the float module it replaces, so
``isinstance(QuantConv2d(...), nn.Conv2d)`` is True and code that inspects a
model (torchvision's weight initialization, fusion recipes, MAC counters)
keeps working. It adds two child modules and changes only ``forward``::

    QuantConv2d(x)  = conv2d(input_quantizer(x), weight_quantizer(W), b)       (bias stays float)
    QuantLinear(x)  = linear(input_quantizer(x), weight_quantizer(W), b)
    QuantAvgPool2d(x) = avg_pool2d(input_quantizer(x))                         (no weight, no weight_quantizer)

Convolutions (1d/2d/3d), transposed convolutions (1d/2d/3d), linear, and
max / average / adaptive average pooling (1d/2d/3d), as pytorch-quantization.
Its RNN layers (``QuantLSTM``) are left out: this is a course on CNNs.

**Fake quantization only.** A quant layer computes on ``x̂`` and ``Ŵ``,
values in the float's units; a descriptor with ``fake_quant=False`` (the
integers themselves) would make a conv of unscaled integers, so quant
layers refuse it ("only fake quantization is supported"), as the original does.

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

**Rebuilding a conv.** :func:`conv_kwargs` is the one list of the
constructor arguments that rebuild a conv from its attributes (``padding``
``'same'`` / ``'valid'`` resolved to integers on request, for kernels that
take only numbers) and :func:`float_conv` the one float ``nn.Conv2d`` built
from another conv and new tensors; the QAT and int8 passes use both.

Public names: :class:`QuantMixin`, ``QuantConv{1,2,3}d``, ``QuantConvTranspose{1,2,3}d``,
:class:`QuantLinear`, ``QuantMaxPool{1,2,3}d``, ``QuantAvgPool{1,2,3}d``,
``QuantAdaptiveAvgPool{1,2,3}d``, ``QUANT_MODULES``
(float class -> quant class), :func:`is_quant_module`, :func:`conv_kwargs`, :func:`float_conv`.
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
    QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL,
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
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantLinear",
    "QuantMaxPool1d",
    "QuantMaxPool2d",
    "QuantMaxPool3d",
    "QuantAvgPool1d",
    "QuantAvgPool2d",
    "QuantAvgPool3d",
    "QuantAdaptiveAvgPool1d",
    "QuantAdaptiveAvgPool2d",
    "QuantAdaptiveAvgPool3d",
    "QUANT_MODULES",
    "is_quant_module",
    "conv_kwargs",
    "float_conv",
]


def _check_descriptor(value: Any, what: str) -> QuantDescriptor:
    """``value`` if it is a fake-quant QuantDescriptor (see "Fake quantization only"), else an error naming ``what``."""
    if not isinstance(value, QuantDescriptor):
        raise TypeError(f"{what} must be a QuantDescriptor, got {type(value).__name__} {value!r}")
    if not value.fake_quant:
        raise ValueError(f"{what} has fake_quant=False: only fake quantization is supported in quantized layers "
                         "(a layer computing on the integers would be off by the scales); use fake_quant=True")
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
    descriptors (``default_quant_desc_weight = None`` for modules without a
    weight; ``default_quant_desc_input = None`` for layers whose input is
    quantized elsewhere, the QAT layers of :mod:`fusionlib.quant.qat`).
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
        for role, given, default in (("input", quant_desc_input, self.default_quant_desc_input),
                                     ("weight", quant_desc_weight, self.default_quant_desc_weight)):
            if default is not None:
                desc = _check_descriptor(default if given is None else given, f"quant_desc_{role}")
                setattr(self, f"{role}_quantizer", TensorQuantizer(desc))
            elif given is not None:
                raise TypeError(f"{type(self).__name__} has no {role} quantizer, so it takes no quant_desc_{role}")
        self._missing_quantizer_keys: tuple[str, ...] = ()
        self.register_load_state_dict_post_hook(_tolerate_float_state_dict)

    @property
    def quantizer_names(self) -> tuple[str, ...]:
        """The quantizers this layer owns, of ``("input_quantizer", "weight_quantizer")``."""
        return tuple(name for name in ("input_quantizer", "weight_quantizer") if name in self._modules)

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
        for role, given in (("input", quant_desc_input), ("weight", quant_desc_weight)):
            if getattr(cls, f"default_quant_desc_{role}") is not None:
                kwargs[f"quant_desc_{role}"] = given
            elif given is not None:
                raise TypeError(f"{cls.__name__} has no {role} quantizer, so it takes no quant_desc_{role}")
        with torch.random.fork_rng(devices=[]):
            new = cls(**kwargs)
        new.load_state_dict(module.state_dict(), strict=True)
        for name, param in module.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(param.requires_grad)
        return new.train(module.training)


# ---------------------------------------------------------------------- convolutions
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def conv_kwargs(conv: nn.modules.conv._ConvNd, *, integer_padding: bool = False) -> dict[str, Any]:
    """The constructor arguments that rebuild ``conv`` (not its tensors): ``in_channels`` ... ``padding_mode``.

    ``integer_padding=True`` resolves ``padding='valid'`` to 0 and
    ``'same'`` to ``dilation·(k − 1)/2`` per dim, for kernels that take only
    numbers (torch's int8 convs); ``'same'`` with an odd total
    ``dilation·(k − 1)`` pads one more on the right than on the left, which
    no symmetric padding reproduces: a ValueError says so.
    """
    kwargs = {name: getattr(conv, name) for name in _CONV_ARGS}
    if conv.transposed:
        kwargs["output_padding"] = conv.output_padding
    if integer_padding and isinstance(conv.padding, str):
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if conv.padding == "same" and any(t % 2 for t in total):
            raise ValueError(f"padding='same' on a {type(conv).__name__} with kernel_size={conv.kernel_size}, "
                             f"dilation={conv.dilation} pads {total} in all, one more on the right than the left; "
                             "no symmetric integer padding computes the same: use an odd kernel or explicit padding")
        kwargs["padding"] = tuple(t // 2 for t in total) if conv.padding == "same" else (0,) * len(total)
    return kwargs


def float_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A new eval-mode ``nn.Conv2d`` with ``conv``'s hyperparameters (:func:`conv_kwargs`) holding copies of these tensors."""
    new = nn.Conv2d(**conv_kwargs(conv), bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.eval()


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


class _QuantConvTransposeMixin(_QuantConvMixin):
    """A transposed conv: weight ``[C_in, C_out/groups, k...]``, so its output channels are axis 1."""

    _float_args = _CONV_ARGS + ("output_padding",)
    _dims: ClassVar[int]

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported for {type(self).__name__}, got {self.padding_mode!r}")
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, self._dims, self.dilation
        )
        conv_transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self._dims - 1]
        return conv_transpose(
            self.input_quantizer(input), self.weight_quantizer(self.weight), self.bias,
            self.stride, self.padding, output_padding, self.groups, self.dilation,
        )


class QuantConvTranspose1d(_QuantConvTransposeMixin, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with ``input_quantizer`` and ``weight_quantizer`` (per channel along axis 1)."""

    _float_module, _dims = nn.ConvTranspose1d, 1
    default_quant_desc_weight = QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL


class QuantConvTranspose2d(_QuantConvTransposeMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with ``input_quantizer`` and ``weight_quantizer`` (per channel along axis 1)."""

    _float_module, _dims = nn.ConvTranspose2d, 2
    default_quant_desc_weight = QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL


class QuantConvTranspose3d(_QuantConvTransposeMixin, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with ``input_quantizer`` and ``weight_quantizer`` (per channel along axis 1)."""

    _float_module, _dims = nn.ConvTranspose3d, 3
    default_quant_desc_weight = QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL


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


_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")


class QuantMaxPool1d(_QuantPoolMixin, nn.MaxPool1d):
    """``nn.MaxPool1d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module, _float_args = nn.MaxPool1d, _MAX_POOL_ARGS


class QuantMaxPool2d(_QuantPoolMixin, nn.MaxPool2d):
    """``nn.MaxPool2d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module, _float_args = nn.MaxPool2d, _MAX_POOL_ARGS


class QuantMaxPool3d(_QuantPoolMixin, nn.MaxPool3d):
    """``nn.MaxPool3d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module, _float_args = nn.MaxPool3d, _MAX_POOL_ARGS


class QuantAvgPool1d(_QuantPoolMixin, nn.AvgPool1d):
    """``nn.AvgPool1d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module, _float_args = nn.AvgPool1d, _AVG_POOL_ARGS


class QuantAvgPool2d(_QuantPoolMixin, nn.AvgPool2d):
    """``nn.AvgPool2d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module, _float_args = nn.AvgPool2d, _AVG_POOL_ARGS + ("divisor_override",)


class QuantAvgPool3d(_QuantPoolMixin, nn.AvgPool3d):
    """``nn.AvgPool3d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module, _float_args = nn.AvgPool3d, _AVG_POOL_ARGS + ("divisor_override",)


class QuantAdaptiveAvgPool1d(_QuantPoolMixin, nn.AdaptiveAvgPool1d):
    """``nn.AdaptiveAvgPool1d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module, _float_args = nn.AdaptiveAvgPool1d, ("output_size",)


class QuantAdaptiveAvgPool2d(_QuantPoolMixin, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module, _float_args = nn.AdaptiveAvgPool2d, ("output_size",)


class QuantAdaptiveAvgPool3d(_QuantPoolMixin, nn.AdaptiveAvgPool3d):
    """``nn.AdaptiveAvgPool3d`` with an ``input_quantizer`` (8-bit per tensor)."""

    _float_module, _float_args = nn.AdaptiveAvgPool3d, ("output_size",)


#: Float class -> its quant class (the original torch classes, captured when this module was imported).
QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    cls._float_module: cls
    for cls in (QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d,
                QuantConvTranspose3d, QuantLinear, QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d, QuantAvgPool1d,
                QuantAvgPool2d, QuantAvgPool3d, QuantAdaptiveAvgPool1d, QuantAdaptiveAvgPool2d, QuantAdaptiveAvgPool3d)
}


def is_quant_module(module: nn.Module) -> bool:
    """True for modules built from :class:`QuantMixin` (they own ``input_quantizer``)."""
    return isinstance(module, QuantMixin)
