r"""Folding BatchNorm into the convolution or linear layer before it (notebook 02).

In eval mode BatchNorm is a fixed per-channel affine map of its input ``y``::

    BN(y) = γ · (y − μ) / √(σ² + ε) + β          μ, σ²: running mean / variance

Write ``s = γ / √(σ² + ε)``, one scale per output channel. For a layer
``y = W·x + b`` (convolution or linear) the composition is again such a layer::

    W' = W · γ / √(σ² + ε)  = W · s        (each output channel's filter times its scale)
    b' = (b − μ) · γ / √(σ² + ε) + β  = (b − μ) · s + β

``b = 0`` when the layer has no bias; ``γ = 1, β = 0`` when BatchNorm has
``affine=False``.

Precision: ``s`` and both products are computed in float64 and rounded to the
layer's dtype once, at the end (float32 on devices without float64, e.g.
Apple's MPS), so each folded fp32 / fp16 / bf16 value is within half an ulp of
the exact fold of its inputs (:func:`round_to_nearest`: torch's own float64 ->
bf16 / fp16 conversion goes through float32 and rounds twice). torch computes in the weights' dtype and rounds
three times. The folded weight keeps the layer weight's dtype and memory
format (``channels_last`` stays ``channels_last``).

BatchNorm *before* a convolution (MaxViT's ``pre_norm``). Write the BatchNorm as
``BN(x) = a·x + c`` per input channel, ``a = γ/√(σ²+ε)``, ``c = β − μ·a``. Then::

    conv(BN(x))[o] = Σ_i W[o,i] ⋆ (a[i]·x[i] + c[i]) + b[o]
                   = Σ_i (W[o,i]·a[i]) ⋆ x[i] + (b[o] + Σ_i Σ_k W[o,i,k]·c[i])

so ``W'[o,i] = W[o,i]·a[i]`` and ``b'[o] = b[o] + Σ_{i,k} W[o,i,k]·c[i]``
(:func:`fuse_bn_conv_weights`; ``i`` runs over the input channels of ``o``'s
group). The second step assumes every kernel tap sees ``a·x + c``; a zero
that padding adds at the border never went through the BatchNorm, so the fold
is exact only for ``padding=0`` (:func:`fuse_bn_conv_eval` requires it). A conv
may absorb a BatchNorm on each side: ``fuse_bn_conv_eval(bn, conv, bn_after)``
does both folds in one float64 computation, rounded once.

torchvision's ``FrozenBatchNorm2d`` (the norm layer of pretrained detection
backbones) is the same affine map with fixed buffers and its own ``eps``; every
function here takes it wherever it takes a BatchNorm.

Public names, with the signatures of their ``torch.nn.utils.fusion``
namesakes: :func:`fuse_conv_bn_weights`, :func:`fuse_linear_bn_weights`
(tensors in, Parameters out), :func:`fuse_conv_bn_eval`,
:func:`fuse_linear_bn_eval` (modules in, a new folded module out). Where they
deliberately differ from torch: grouped ``ConvTranspose`` + BN folds correctly
(torch raises a shape error); Linear + BatchNorm1d(affine=False) folds (torch
raises a TypeError); a folded layer that had no bias gets a bias with
the weight's ``requires_grad``; ``fuse_conv_bn_eval`` checks that ``transpose``
matches the layer type; bad input raises :class:`FusionError` naming the modules.
"""
from __future__ import annotations

import copy
import functools
import math
import sys
from contextvars import ContextVar
from typing import Any, Callable, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.parametrize import type_before_parametrizations

__all__ = [
    "FusionError",
    "fuse_conv_bn_weights",
    "fuse_conv_bn_eval",
    "fuse_linear_bn_weights",
    "fuse_linear_bn_eval",
    "fuse_bn_conv_weights",
    "fuse_bn_conv_eval",
    "is_batchnorm",
    "stock_forward_base",
    "frozen_batchnorm_class",
]

ConvT = TypeVar("ConvT", bound=_ConvNd)
LinearT = TypeVar("LinearT", bound=nn.Linear)


# --------------------------------------------------------------------------
# The arithmetic: tensors in, Parameters out
# --------------------------------------------------------------------------
def fuse_conv_bn_weights(
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
    transpose: bool = False,
) -> tuple[nn.Parameter, nn.Parameter]:
    r"""Fold BatchNorm statistics into convolution weights.

    With ``s = γ/√(σ² + ε)`` per output channel::

        W' = W · s            b' = (b − μ) · s + β

    (``b = 0`` when the conv has no bias; ``γ = 1, β = 0`` when BN is not
    affine). ``transpose=True`` for ConvTranspose weights ``[in, out/groups,
    k...]``, grouped ones included. Arithmetic in float64, rounded once to
    the input dtypes. Returns new Parameters (dtype, memory format and
    ``requires_grad`` of ``conv_w``; bias dtype of ``conv_b``, or of the
    weight when there was no bias).
    """
    return _rounded_fold(_fold_bn_after, conv_w, conv_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b, transpose)


def _rounded_fold(fold: Callable[..., tuple[torch.Tensor, torch.Tensor]], conv_w: torch.Tensor,
                  conv_b: torch.Tensor | None, *args: Any) -> tuple[nn.Parameter, nn.Parameter]:
    """``fold(weight, bias, *args)`` in the compute dtype (float64 except on MPS), rounded once as Parameters."""
    with torch.no_grad():
        dtype = _compute_dtype(conv_w)
        bias = None if conv_b is None else conv_b.detach().to(dtype)
        fused_w, fused_b = fold(conv_w.detach().to(dtype), bias, *args)
    return _as_parameters(fused_w, fused_b, conv_w, conv_b)


def _fold_bn_after(weight: torch.Tensor, bias: torch.Tensor | None, bn_rm: torch.Tensor, bn_rv: torch.Tensor,
                   bn_eps: float, bn_w: torch.Tensor | None, bn_b: torch.Tensor | None, transpose: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``W·s``, ``(b − μ)·s + β`` in the dtype of ``weight`` (no rounding back)."""
    dtype = weight.dtype
    scale, beta = _batchnorm_scale_and_shift(bn_rm, bn_rv, bn_eps, bn_w, bn_b, dtype)
    bias = torch.zeros_like(scale) if bias is None else bias
    fused_w = _scale_output_channels(weight, scale, transpose)
    fused_b = (bias - bn_rm.to(dtype)) * scale + beta
    return fused_w, fused_b


def fuse_bn_conv_weights(
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    groups: int = 1,
) -> tuple[nn.Parameter, nn.Parameter]:
    r"""Fold a BatchNorm that comes *before* a convolution into the convolution's weights.

    With ``a = γ/√(σ²+ε)`` and ``c = β − μ·a`` per *input* channel::

        W'[o,i] = W[o,i] · a[i]          b'[o] = b[o] + Σ_{i,k} W[o,i,k] · c[i]

    ``i`` runs over the input channels of output channel ``o``'s group (``groups``, as
    in the conv). Exact only when the conv adds no padding (see the module docstring).
    Arithmetic in float64, rounded once to the input dtypes.
    """
    return _rounded_fold(_fold_bn_before, conv_w, conv_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b, groups)


def _fold_bn_before(weight: torch.Tensor, bias: torch.Tensor | None, bn_rm: torch.Tensor, bn_rv: torch.Tensor,
                    bn_eps: float, bn_w: torch.Tensor | None, bn_b: torch.Tensor | None, groups: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``W[o,i]·a[i]``, ``b + Σ W[o,i,k]·c[i]`` in the dtype of ``weight`` (no rounding back)."""
    dtype = weight.dtype
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    in_channels = bn_rm.numel()
    if groups < 1 or out_channels % groups or in_channels != in_per_group * groups:
        raise FusionError(
            f"Conv weight of shape {tuple(weight.shape)} with groups={groups} takes "
            f"{in_per_group * groups} input channels, but the BatchNorm before it has {in_channels} features."
        )
    scale, beta = _batchnorm_scale_and_shift(bn_rm, bn_rv, bn_eps, bn_w, bn_b, dtype)
    shift = beta - bn_rm.to(dtype) * scale  # BN(x) = scale·x + shift
    kernel_ones = [1] * (weight.dim() - 2)
    # input channel i of output channel o: i = group(o)·in_per_group + j, j = weight's dim 1
    per_output = lambda v: v.reshape(groups, 1, in_per_group).expand(  # noqa: E731
        groups, out_channels // groups, in_per_group).reshape(out_channels, in_per_group)
    fused_w = weight * per_output(scale).reshape(out_channels, in_per_group, *kernel_ones)
    taps = weight.reshape(out_channels, in_per_group, -1).sum(-1)  # Σ_k W[o,j,k]
    bias = torch.zeros(out_channels, dtype=dtype, device=weight.device) if bias is None else bias
    fused_b = bias + (taps * per_output(shift)).sum(1)
    return fused_w, fused_b


def fuse_linear_bn_weights(
    linear_w: torch.Tensor,
    linear_b: torch.Tensor | None,
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
) -> tuple[nn.Parameter, nn.Parameter]:
    r"""Fold BatchNorm1d statistics into linear weights.

    With ``s = γ/√(σ² + ε)`` per output feature (or one shared value when BN
    has a single feature)::

        W' = W · s[:, None]    b' = (b − μ) · s + β

    Arithmetic in float64, rounded once to the input dtypes.
    """
    out_features = linear_w.shape[0]
    if bn_rm.numel() not in (out_features, 1):
        raise FusionError(
            f"Linear weight has {out_features} output features but BatchNorm has "
            f"{bn_rm.numel()}; they must be equal (or BatchNorm must have 1 feature)."
        )
    with torch.no_grad():
        dtype = _compute_dtype(linear_w)
        scale, beta = _batchnorm_scale_and_shift(bn_rm, bn_rv, bn_eps, bn_w, bn_b, dtype)
        weight = linear_w.detach().to(dtype)
        bias = weight.new_zeros(out_features) if linear_b is None else linear_b.detach().to(dtype)
        fused_w = weight * scale.unsqueeze(-1)
        fused_b = (bias - bn_rm.to(dtype)) * scale + beta
    return _as_parameters(fused_w, fused_b, linear_w, linear_b)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for the folding arithmetic, except on devices without it."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def _batchnorm_scale_and_shift(
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``s = γ/√(σ²+ε)`` and ``β`` in ``dtype`` (γ=1, β=0 when BN is not affine)."""
    variance = bn_rv.to(dtype)
    gamma = torch.ones_like(variance) if bn_w is None else bn_w.detach().to(dtype)
    beta = torch.zeros_like(variance) if bn_b is None else bn_b.detach().to(dtype)
    scale = gamma * torch.rsqrt(variance + bn_eps)
    return scale, beta


def _scale_output_channels(weight: torch.Tensor, scale: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Multiply each output channel's slice of ``weight`` by its entry of ``scale``.

    Conv weight: ``[out, in/groups, k...]`` -> scale laid out as ``[out, 1, 1...]``.
    ConvTranspose weight: ``[in, out/groups, k...]``. Output channel
    ``c = g·(out/groups) + j`` lives at ``weight[g·(in/groups) + i, j]``, so
    view it as ``[groups, in/groups, out/groups, k...]`` and lay the scale out
    as ``[groups, 1, out/groups, 1...]``. ``groups`` follows from the shapes:
    ``out / (out/groups)``.
    """
    kernel_ones = [1] * (weight.dim() - 2)
    out_channels = scale.numel()
    if not transpose:
        if weight.shape[0] != out_channels:
            raise FusionError(
                f"Conv weight has {weight.shape[0]} output channels but BatchNorm has "
                f"{out_channels} features (weight shape {tuple(weight.shape)})."
            )
        return weight * scale.reshape(out_channels, 1, *kernel_ones)
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    groups = out_channels // out_per_group if out_per_group else 0
    if groups == 0 or out_channels % out_per_group or in_channels % groups:
        raise FusionError(
            f"ConvTranspose weight of shape {tuple(weight.shape)} ([in, out/groups, k...]) "
            f"does not fit a BatchNorm with {out_channels} features."
        )
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *weight.shape[2:])
    grouped_scale = scale.reshape(groups, 1, out_per_group, *kernel_ones)
    return (grouped * grouped_scale).reshape(weight.shape)


def round_to_nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded once, to the nearest ``dtype`` number (ties: the one torch picks).

    torch converts float64 to bfloat16 / float16 through float32, which rounds twice: a value just past a
    bf16 midpoint can land exactly on it in float32, then round the wrong way (off by one ulp, about once
    in 2^16 values). This checks each result's two neighbours (``torch.nextafter``) and keeps the nearest.
    """
    y = x.to(dtype)
    if dtype not in (torch.bfloat16, torch.float16) or x.dtype != torch.float64:
        return y
    x64 = x.detach()
    for direction in (math.inf, -math.inf):
        neighbour = torch.nextafter(y, torch.full_like(y, direction))
        closer = (neighbour.double() - x64).abs() < (y.double() - x64).abs()
        y = torch.where(closer, neighbour, y)
    return y


def _as_parameters(
    fused_w: torch.Tensor, fused_b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[nn.Parameter, nn.Parameter]:
    """Round the folded tensors back to the layer's dtypes, once, as Parameters.

    The weight is rounded into a tensor laid out like ``weight`` (same dtype,
    strides, hence memory format) and keeps its ``requires_grad``; the bias
    takes the dtype and ``requires_grad`` of ``bias``, or of the weight when
    the layer had no bias.
    """
    like = weight if bias is None else bias
    with torch.no_grad():
        rounded_w = torch.empty_like(weight.detach()).copy_(round_to_nearest(fused_w, weight.dtype))
        rounded_b = round_to_nearest(fused_b, like.dtype)
    return nn.Parameter(rounded_w, weight.requires_grad), nn.Parameter(rounded_b, like.requires_grad)


# --------------------------------------------------------------------------
# Whole modules: a new layer equal to bn(layer(x)) in eval mode
# --------------------------------------------------------------------------
def fuse_conv_bn_eval(conv: ConvT, bn: _BatchNorm, transpose: bool = False) -> ConvT:
    r"""Return a new conv layer equal to ``bn(conv(x))`` in eval mode.

    ``W' = W·γ/√(σ²+ε)``, ``b' = (b−μ)·γ/√(σ²+ε) + β`` (see
    :func:`fuse_conv_bn_weights`). Works for Conv1d/2d/3d and (with
    ``transpose=True``) ConvTranspose1d/2d/3d, any groups, dilation, stride,
    with or without bias. ``conv`` and ``bn`` are not modified; the result is
    a deep copy of ``conv`` (hooks included, as in torch) with new weights.
    """
    _check_foldable(conv, bn)
    is_transposed = isinstance(conv, _ConvTransposeNd)
    if is_transposed != transpose:
        raise FusionError(
            f"{_describe(conv)} is {'a transposed' if is_transposed else 'not a transposed'} "
            f"convolution: call fuse_conv_bn_eval(conv, bn, transpose={is_transposed})."
        )
    _check_channels(conv, conv.out_channels, bn, "out_channels")
    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias, transpose
    )
    return fused


def _has_no_padding(conv: _ConvNd) -> bool:
    """True when the conv reads only real input values (``padding`` 0 or ``'valid'``)."""
    padding = conv.padding
    if isinstance(padding, str):
        return padding == "valid" or all(k == 1 for k in conv.kernel_size)
    return all(p == 0 for p in padding)


def why_not_bn_before_conv(bn: nn.Module, conv: nn.Module) -> str | None:
    """``None`` if ``conv(bn(x))`` folds into one conv exactly, else the reason (a sentence)."""
    if isinstance(conv, _ConvTransposeNd) or not isinstance(conv, _ConvNd):
        return (f"{_describe(conv)} is not a Conv1d/2d/3d (a transposed conv spreads the BatchNorm shift "
                "unevenly at the border)")
    if not _has_no_padding(conv):
        return (f"{_describe(conv)} has padding={conv.padding}: the zeros it adds at the border never went "
                "through the BatchNorm, so folding would change the border outputs")
    if bn.running_mean is None or bn.running_var is None:
        return f"{_describe(bn)} has track_running_stats=False: it is not a fixed affine map"
    if _num_features(bn) != conv.in_channels:
        return (f"{_describe(bn)} has {_num_features(bn)} features but {_describe(conv)} takes "
                f"in_channels={conv.in_channels}")
    return None


def fuse_bn_conv_eval(bn: nn.Module, conv: ConvT, bn_after: nn.Module | None = None) -> ConvT:
    r"""Return a new conv equal to ``conv(bn(x))`` (or ``bn_after(conv(bn(x)))``) in eval mode.

    ``W'[o,i] = W[o,i]·a[i]``, ``b'[o] = b[o] + Σ_{i,k} W[o,i,k]·c[i]`` with
    ``a = γ/√(σ²+ε)``, ``c = β − μ·a`` (see :func:`fuse_bn_conv_weights`); then, if
    ``bn_after`` is given, the usual ``W'' = W'·s``, ``b'' = (b' − μ)·s + β`` of
    :func:`fuse_conv_bn_weights`, all in float64 and rounded once. Requires a
    Conv1d/2d/3d with ``padding=0`` (exactness; the module docstring says why).
    ``bn``, ``conv`` and ``bn_after`` are not modified.
    """
    _check_foldable(conv, bn)
    why_not = why_not_bn_before_conv(bn, conv)
    if why_not is not None:
        raise FusionError(f"Cannot fold {_describe(bn)} into the conv after it: {why_not}.")
    if bn_after is not None:
        _check_foldable(conv, bn_after)
        _check_channels(conv, conv.out_channels, bn_after, "out_channels")
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        dtype = _compute_dtype(conv.weight)
        bias = None if conv.bias is None else conv.bias.detach().to(dtype)
        weight, bias = _fold_bn_before(conv.weight.detach().to(dtype), bias, bn.running_mean, bn.running_var,
                                       bn.eps, bn.weight, bn.bias, conv.groups)
        if bn_after is not None:
            weight, bias = _fold_bn_after(weight, bias, bn_after.running_mean, bn_after.running_var,
                                          bn_after.eps, bn_after.weight, bn_after.bias, False)
    fused.weight, fused.bias = _as_parameters(weight, bias, conv.weight, conv.bias)
    return fused


def fuse_linear_bn_eval(linear: LinearT, bn: _BatchNorm) -> LinearT:
    r"""Return a new linear layer equal to ``bn(linear(x))`` in eval mode.

    ``W' = W·γ/√(σ²+ε)`` (row-wise), ``b' = (b−μ)·γ/√(σ²+ε) + β``. BatchNorm
    must have ``out_features`` features, or one feature (then broadcast).
    """
    _check_foldable(linear, bn)
    if _num_features(bn) != 1:
        _check_channels(linear, linear.out_features, bn, "out_features")
    fused = copy.deepcopy(linear)
    fused.weight, fused.bias = fuse_linear_bn_weights(
        linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    return fused


# --------------------------------------------------------------------------
# Checks (shared with the fuse_modules machinery in fusionlib.fusion)
# --------------------------------------------------------------------------
class FusionError(ValueError, AssertionError):
    """Bad input to a fusion function.

    Also an ``AssertionError`` because torch's fusers signal the same
    conditions with asserts, so code written against torch keeps working.
    """


def _check_same_mode(layer: nn.Module, bn: nn.Module) -> None:
    if layer.training != bn.training:
        raise FusionError(
            f"{_describe(layer)} is in {'training' if layer.training else 'eval'} mode but "
            f"{_describe(bn)} is in {'training' if bn.training else 'eval'} mode; both must be in "
            "the same mode: call model.eval() (to fold BatchNorm) or model.train() "
            "(for fuse_modules_qat) first."
        )


def is_batchnorm(module: nn.Module) -> bool:
    """A torch BatchNorm (any ``_BatchNorm``) or torchvision's ``FrozenBatchNorm2d``."""
    if isinstance(module, _BatchNorm):
        return True
    frozen = frozen_batchnorm_class()
    return frozen is not None and isinstance(module, frozen)


# --------------------------------------------------------------------------
# Which classes compute as a torch conv / linear / BatchNorm (the leaf rule)
# --------------------------------------------------------------------------
def frozen_batchnorm_class() -> type[nn.Module] | None:
    """``torchvision.ops.misc.FrozenBatchNorm2d`` once torchvision's ops are imported, else ``None``.

    Not imported here (it costs seconds): a model that holds a FrozenBatchNorm2d
    has imported its module already.
    """
    return getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)


def _foldable_bases() -> tuple[type[nn.Module], ...]:
    frozen = frozen_batchnorm_class()
    bases: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
    return bases + ((frozen,) if frozen is not None else ())


def _is_stock_class(cls: type) -> bool:
    """A class of torch.nn (or FrozenBatchNorm2d) itself, not a user's subclass."""
    if cls.__module__ == "torch.nn.utils.parametrize":  # Parametrized<Class>: look further up
        return False
    return cls.__module__.startswith(("torch.nn.", "torch.ao.nn.")) or cls is frozen_batchnorm_class()


def stock_forward_base(cls: type) -> type[nn.Module] | None:
    """The torch conv / linear / BatchNorm class (or FrozenBatchNorm2d) that ``cls`` computes as.

    ``cls`` itself when it is one of those classes; its nearest such parent when ``cls`` is
    a subclass that keeps the parent's ``forward`` (and ``_conv_forward``) -- it computes
    exactly what the parent computes; ``None`` for any other class, in particular a subclass
    that overrides ``forward``: it may compute anything.
    """
    if not isinstance(cls, type) or not issubclass(cls, _foldable_bases()):
        return None
    base = next((c for c in cls.__mro__ if _is_stock_class(c)), None)
    if base is None or not issubclass(base, _foldable_bases()):
        return None
    for method in ("forward", "_conv_forward"):
        if getattr(cls, method, None) is not getattr(base, method, None):
            return None
    return base


def _num_features(bn: nn.Module) -> int:
    """``num_features`` of a BatchNorm; FrozenBatchNorm2d has none: its statistics' length."""
    features = getattr(bn, "num_features", None)
    return int(features) if features is not None else int(bn.running_mean.numel())


def _check_foldable(layer: nn.Module, bn: _BatchNorm) -> None:
    """Eval folding needs eval mode and running statistics."""
    _check_same_mode(layer, bn)
    if bn.training and isinstance(bn, _BatchNorm):  # FrozenBatchNorm2d uses its statistics in both modes
        raise FusionError(
            f"Cannot fold {_describe(bn)} into {_describe(layer)}: they are in training mode, "
            "where BatchNorm normalizes with batch statistics. Call model.eval() first, "
            "or use fuse_modules_qat to keep BatchNorm trainable."
        )
    if bn.running_mean is None or bn.running_var is None:
        raise FusionError(
            f"Cannot fold {_describe(bn)}: it has track_running_stats=False, so it uses batch "
            "statistics even in eval mode and is not a fixed affine map."
        )


def _check_channels(layer: nn.Module, out_channels: int, bn: _BatchNorm, what: str) -> None:
    if _num_features(bn) != out_channels:
        raise FusionError(
            f"Cannot fuse {_describe(layer)} ({what}={out_channels}) with {_describe(bn)} "
            f"(num_features={_num_features(bn)}): the numbers must be equal."
        )


# --------------------------------------------------------------------------
# Naming modules in messages
# --------------------------------------------------------------------------
# fuse_modules knows each module's dotted name; the functions it calls only
# receive modules. It publishes {id(module): name} here for the duration of
# the call, so every message and warning can say 'layer1.0.bn1'.
_MODULE_NAMES: ContextVar[dict[int, str]] = ContextVar("fusionlib_module_names", default={})


def _describe(module: nn.Module) -> str:
    """``'layer1.0.bn1' (BatchNorm2d)`` when the name is known, else ``BatchNorm2d``."""
    type_name = type_before_parametrizations(module).__name__
    name = _MODULE_NAMES.get().get(id(module))
    return f"'{name}' ({type_name})" if name is not None else type_name
