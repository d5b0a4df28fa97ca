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
the exact fold of its inputs. torch computes in the weights' dtype and rounds
three times. The folded weight keeps the layer weight's dtype and memory
format (``channels_last`` stays ``channels_last``).

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
from contextvars import ContextVar
from typing import TypeVar

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
    with torch.no_grad():
        dtype = _compute_dtype(conv_w)
        scale, beta = _batchnorm_scale_and_shift(bn_rm, bn_rv, bn_eps, bn_w, bn_b, dtype)
        bias = torch.zeros_like(scale) if conv_b is None else conv_b.detach().to(dtype)
        fused_w = _scale_output_channels(conv_w.detach().to(dtype), scale, transpose)
        fused_b = (bias - bn_rm.to(dtype)) * scale + beta
    return _as_parameters(fused_w, fused_b, conv_w, conv_b)


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
        rounded_w = torch.empty_like(weight.detach()).copy_(fused_w)
        rounded_b = fused_b.to(like.dtype)
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


def fuse_linear_bn_eval(linear: LinearT, bn: _BatchNorm) -> LinearT:
    r"""Return a new linear layer equal to ``bn(linear(x))`` in eval mode.

    ``W' = W·γ/√(σ²+ε)`` (row-wise), ``b' = (b−μ)·γ/√(σ²+ε) + β``. BatchNorm
    must have ``out_features`` features, or one feature (then broadcast).
    """
    _check_foldable(linear, bn)
    if bn.num_features != 1:
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


def _check_foldable(layer: nn.Module, bn: _BatchNorm) -> None:
    """Eval folding needs eval mode and running statistics."""
    _check_same_mode(layer, bn)
    if bn.training:
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
    if bn.num_features != out_channels:
        raise FusionError(
            f"Cannot fuse {_describe(layer)} ({what}={out_channels}) with {_describe(bn)} "
            f"(num_features={bn.num_features}): the numbers must be equal."
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
