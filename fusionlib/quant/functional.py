r"""Fake quantization: the integer grid, the two "scales", and the straight-through gradient (notebook 07).

Symmetric linear quantization with ``num_bits`` bits maps a float ``x`` to an
integer ``q`` on a grid that is symmetric around zero (zero point 0)::

    qmax = 2^(num_bits − 1 + unsigned) − 1                       (127 for signed 8 bit, 255 unsigned)
    qmin = 0 (unsigned);   −qmax (narrow_range);   −qmax − 1 (full range)

    q = clamp(round(x · qmax / amax), qmin, qmax)               (:func:`quantize`)
    x̂ = q / quant_scale = q · step_size                          (:func:`dequantize`)
    fake_quantize(x) = x̂                                         (:func:`fake_quantize`)

``amax`` is the largest magnitude kept: values beyond it are clipped. It is a
scalar (per tensor) or a tensor that broadcasts against ``x`` with 1s
everywhere except along the channel axis (per channel, e.g. ``[C, 1, 1, 1]``
for a conv weight; :func:`amax_shape_for`). Given ``axis``, a flat list or
1-d tensor of one amax per channel is placed along that axis
(:func:`check_amax`, the one amax validator). An ``amax <= 2^-24`` (fp16's
smallest subnormal) counts as zero, as in pytorch-quantization: the
quantizer outputs 0 there (``qmax / amax`` would overflow to inf, and
``0 · inf`` is NaN).

**Precision.** The scale, product, rounding and clamp run in float32 (float64
for float64 inputs) and the result is cast back to ``x``'s dtype. fp16 and
bf16 cannot hold ``x · qmax / amax`` exactly: bf16's 8-bit significand alone
moves about one integer in eight to its neighbour. pytorch-quantization
upcasts fp16 the same way; doing it for bf16 too is this library's choice.
:func:`quantize` returns its integers in that compute dtype (fp16 and bf16
cannot hold every integer of a 16-bit grid).

**Two names, never "scale" alone.** The literature uses "scale" for two
reciprocal numbers; this module names them apart:

* :func:`quant_scale` ``= qmax / amax`` — pytorch-quantization's ``scale``:
  *multiply* ``x`` by it to get (unrounded) integers.
* :func:`step_size` ``= amax / qmax`` — torch's and ONNX's ``scale``
  (``torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ...)``,
  ``QuantizeLinear``): one integer step in ``x``'s units, so
  ``x̂ = q · step_size``. Inside the range the rounding error is at most
  half a step: ``|x − x̂| <= step_size / 2``.

torch computes ``round(x · (1 / step_size))`` where we compute
``round(x · quant_scale)``; the two products can differ in the last bit, so
a value within an ulp of a rounding tie (``k + ½`` steps) may land on the
neighbouring integer. :func:`dequantize` multiplies by ``step_size`` as torch
does (rather than dividing by ``quant_scale``, equal in exact arithmetic), so
results agree with torch's kernels within one step everywhere and are
bit-identical almost everywhere (the tests demand >= 99.9 %).

**Gradients** (:class:`FakeQuantizeFunction`). ``round`` has zero derivative
almost everywhere, so training through it uses the straight-through
estimator (STE): treat ``round(u)`` as ``u`` in the backward pass. For ``x``::

    ∂x̂/∂x = 1   if −amax <= x <= amax      (0 <= x <= amax when unsigned)
            0   otherwise (clipped)

as pytorch-quantization (with full range, the sliver below −amax that still
rounds to −qmax − 1 gets 0 too; torch's kernels pass the gradient wherever the
rounded integer is in range).

For a learnable ``amax`` (LSQ, Esser et al. 2020, with ``u = x · qmax/amax``
and the STE on ``round``)::

    ∂x̂/∂amax = ∂/∂amax [round(u) · amax/qmax] = round(u)/qmax + (amax/qmax) · (−x·qmax/amax²)
             = (q − x · quant_scale) / qmax     if qmin <= u <= qmax   (the rounding residual, in steps / qmax)
             = q / qmax                           if u is clipped          (±1, or −(qmax+1)/qmax, or 0)

summed over the elements that share one ``amax`` entry. The clipped case is
the true derivative (``q`` is constant there); the inside case is the STE's.
LSQ also scales this gradient by ``1/√(N·qmax)``; that factor is left to the
optimizer's learning rate here.

Public names: :func:`quant_max`, :func:`quant_min`, :func:`quant_scale`,
:func:`step_size`, :func:`quantize`, :func:`dequantize`,
:func:`fake_quantize`, :class:`FakeQuantizeFunction`, :func:`amax_shape_for`,
:func:`reduce_amax`, :func:`amax_along`, and the checks :func:`check_num_bits`, :func:`check_amax`, :func:`check_axis`.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

__all__ = [
    "quant_max",
    "quant_min",
    "quant_scale",
    "step_size",
    "quantize",
    "dequantize",
    "fake_quantize",
    "FakeQuantizeFunction",
    "amax_shape_for",
    "check_num_bits",
    "check_amax",
    "check_axis",
    "reduce_amax",
    "amax_along",
    "as_amax_tensor",
    "compute_dtype",
    "AMAX_EPSILON",
]

AmaxLike = Union[float, int, Sequence[float], torch.Tensor]
MIN_BITS, MAX_BITS = 2, 16
#: amax at or below this (fp16's smallest subnormal, 2^-24) counts as zero: those outputs are 0.
AMAX_EPSILON = 2.0 ** -24


# --------------------------------------------------------------------------
# Argument checks (each error names the bad value and says what would work)
# --------------------------------------------------------------------------
def check_num_bits(num_bits: int) -> int:
    """Return ``num_bits`` if it is an int in 2..16, else raise ValueError naming it."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(
            f"num_bits must be an int in {MIN_BITS}..{MAX_BITS}, got {num_bits!r}: 1 bit leaves no signed grid "
            "(qmax = 0) and more than 16 bits is no longer a quantization worth simulating"
        )
    return num_bits


def check_axis(axis: int | Sequence[int] | None, ndim: int | None = None) -> tuple[int, ...] | None:
    """The one axis validator: ``axis`` (None, an int or a non-empty tuple of ints) as a tuple, or None.

    With ``ndim`` (the tensor's number of dims) negatives are resolved and the
    result is sorted; an axis out of range is a ValueError naming it and
    ``ndim``. Without ``ndim`` (a descriptor, before any tensor is seen) the
    axes are returned as given. A repeated axis is always an error.
    """
    if axis is None:
        return None
    is_int = lambda a: isinstance(a, int) and not isinstance(a, bool)
    axes = (axis,) if is_int(axis) else tuple(axis) if isinstance(axis, (tuple, list)) else ()
    if not axes or not all(is_int(a) for a in axes):
        raise ValueError(f"axis must be None, an int or a non-empty tuple of ints, got {axis!r}")
    if ndim is not None:
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"axis {a} is out of range for a tensor with {ndim} dims (valid: {-ndim}..{ndim - 1}); "
                    "a conv weight [C_out, C_in, k, k] is quantized per channel with axis=0"
                )
        axes = tuple(sorted(a % ndim for a in axes))
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis {axis!r} repeats a dimension")
    return axes


def amax_shape_for(x_shape: Sequence[int], axis: int | Sequence[int] | None) -> tuple[int, ...]:
    """The shape of an ``amax`` that keeps ``axis`` and broadcasts against ``x_shape``.

    ``amax_shape_for((64, 3, 7, 7), 0) == (64, 1, 1, 1)``; ``axis=None`` gives ``()``
    (one amax for the whole tensor).
    """
    x_shape = tuple(int(s) for s in x_shape)
    axes = check_axis(axis, len(x_shape))
    if axes is None:
        return ()
    return tuple(s if d in axes else 1 for d, s in enumerate(x_shape))


def reduce_amax(x: torch.Tensor, axis: int | Sequence[int] | None = None, keepdims: bool = True) -> torch.Tensor:
    """``max |x|`` over the dimensions ``axis`` (pytorch-quantization's ``reduce_amax``), without gradient.

    ``axis`` names the dimensions *reduced* (not kept, unlike a descriptor's
    ``axis``); None reduces all of them to a 0-d tensor, as the original does.
    ``keepdims=True`` keeps each reduced dimension as a 1, so the result
    broadcasts against ``x``: ``reduce_amax(w, axis=(1, 2, 3))`` is ``[C, 1, 1, 1]``.
    """
    with torch.no_grad():
        if axis is None:
            return x.abs().amax()
        return x.abs().amax(dim=check_axis(axis, x.dim()), keepdim=keepdims)


def amax_along(x: torch.Tensor, axis: int | Sequence[int] | None) -> torch.Tensor:
    """``max |x|`` per index along ``axis`` (a descriptor's axis: kept), shaped ``amax_shape_for(x.shape, axis)``.

    ``axis=None``: one 0-d amax for the whole tensor. The reduction a max
    calibrator and a dynamic-amax quantizer share.
    """
    axes = check_axis(axis, x.dim())
    if axes is None:
        return reduce_amax(x)
    reduce = tuple(d for d in range(x.dim()) if d not in axes)
    return reduce_amax(x, reduce) if reduce else x.detach().abs()


def as_amax_tensor(amax: AmaxLike, device: torch.device | None = None) -> torch.Tensor:
    """``amax`` as a float tensor (a number: 0-d float32; a (nested) list of numbers: float32 of its shape); not validated."""
    if isinstance(amax, torch.Tensor):
        if not amax.is_floating_point():
            amax = amax.float()
        return amax if device is None else amax.to(device)
    def numbers(v: object) -> bool:  # a number, or a non-empty (nested) list of numbers
        if isinstance(v, (list, tuple)):
            return bool(v) and all(numbers(e) for e in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if numbers(amax):
        try:
            return torch.tensor(amax, dtype=torch.float32, device=device)
        except ValueError:  # ragged nesting
            pass
    raise ValueError(f"amax must be a positive number, a list of them or a float tensor, got "
                     f"{type(amax).__name__} {amax!r}")


def check_amax(amax: AmaxLike, x: torch.Tensor | None = None, axis: int | Sequence[int] | None = None) -> torch.Tensor:
    """The one amax validator: check ``amax`` and return it as a float tensor, placed along ``axis``.

    * Every entry must be > 0 and finite (ValueError naming the bad values and
      how many); entries ``<= AMAX_EPSILON`` are accepted and quantize to 0.
    * With ``x``: the result broadcasts against ``x`` without growing it.
    * With ``x`` and ``axis``: a flat amax (a list, or a 1-d tensor) holds one
      value per index along ``axis`` and is reshaped to
      ``amax_shape_for(x.shape, axis)``; a one-element amax stays per tensor;
      any other shape must be that shape (leading 1s may be left out:
      ``[4, 1]`` for a ``[4, 4]`` weight along axis 0).
    """
    t = as_amax_tensor(amax)
    with torch.no_grad():
        bad = ~(t > 0) | ~torch.isfinite(t)  # catches <= 0, NaN and inf
        if bool(bad.any()):
            values = t.detach().flatten()[bad.flatten()]
            raise ValueError(
                f"amax must be positive and finite everywhere, got {values[:4].tolist()} "
                f"({int(bad.sum())} of {t.numel()} entries bad); calibrate on data that is not all zero, or "
                "set amax to the largest magnitude you want to keep"
            )
    if x is None:
        return t
    x_shape = tuple(x.shape)
    if axis is not None and t.numel() > 1:
        want = amax_shape_for(x_shape, axis)
        if t.dim() == 1 and t.numel() == math.prod(want):
            return t.reshape(want)  # a flat list of per-channel values: along axis, not the last dim
        if (1,) * (len(want) - t.dim()) + tuple(t.shape) != want:
            raise ValueError(f"amax of shape {tuple(t.shape)} does not match axis={axis!r} of x {x_shape}: want "
                             f"{want}, or a flat list of {math.prod(want)} values")
        return t.reshape(want)
    try:
        joint = torch.broadcast_shapes(x_shape, tuple(t.shape))
    except RuntimeError:
        joint = None
    if joint != x_shape:
        raise ValueError(
            f"amax of shape {tuple(t.shape)} does not broadcast against x of shape {x_shape}; per-channel "
            f"amax keeps the channel axis and has 1s elsewhere, e.g. {amax_shape_for(x_shape, 0) if x_shape else ()}"
            " for axis 0 (or pass axis= with a flat list)"
        )
    return t


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype quantization arithmetic runs in: float64 for float64 ``x``, float32 otherwise (fp16, bf16, fp32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------
def quant_max(num_bits: int, unsigned: bool = False) -> int:
    """``qmax = 2^(num_bits − 1 + unsigned) − 1``: 127 (signed 8 bit), 255 (unsigned 8 bit), 7 (signed 4 bit)."""
    check_num_bits(num_bits)
    return 2 ** (num_bits - 1 + int(bool(unsigned))) - 1


def quant_min(num_bits: int, unsigned: bool = False, narrow_range: bool = True) -> int:
    """``qmin``: 0 unsigned; ``−qmax`` with narrow_range (symmetric grid); ``−qmax − 1`` without (full two's complement)."""
    qmax = quant_max(num_bits, unsigned)
    if unsigned:
        return 0
    return -qmax if narrow_range else -qmax - 1


def quant_scale(amax: AmaxLike, num_bits: int = 8, unsigned: bool = False) -> torch.Tensor:
    """``qmax / amax`` (pytorch-quantization's ``scale``): multiply x by it to get integers."""
    return quant_max(num_bits, unsigned) / as_amax_tensor(amax)


def step_size(amax: AmaxLike, num_bits: int = 8, unsigned: bool = False) -> torch.Tensor:
    """``amax / qmax`` (torch's and ONNX's ``scale``): one integer step in x's units."""
    return as_amax_tensor(amax) / quant_max(num_bits, unsigned)


def _prepare(x: torch.Tensor, amax: AmaxLike, num_bits: int, unsigned: bool, narrow_range: bool,
             axis: int | Sequence[int] | None = None):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    qmax = quant_max(num_bits, unsigned)
    qmin = quant_min(num_bits, unsigned, narrow_range)
    amax_t = check_amax(amax, x, axis).to(device=x.device)
    return amax_t, qmin, qmax


def _scales(amax: torch.Tensor, qmax: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quant_scale, step_size)`` in ``dtype``; both 0 where ``amax <= AMAX_EPSILON`` (those outputs are 0)."""
    a = amax.to(dtype)
    zero = a <= AMAX_EPSILON
    qs = torch.where(zero, torch.zeros_like(a), qmax / torch.where(zero, torch.ones_like(a), a))
    return qs, torch.where(zero, torch.zeros_like(a), a / qmax)


def _quantize_unchecked(x: torch.Tensor, qs: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    q = x * qs
    q.round_()  # round half to even, as torch's nearbyint
    return q.clamp_(qmin, qmax)


def quantize(
    x: torch.Tensor, amax: AmaxLike, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = True,
    axis: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """The integers ``clamp(round(x · quant_scale), qmin, qmax)`` (no gradient trick).

    ``unsigned=True`` refuses negative ``x`` (ValueError "negative values
    encountered"), as pytorch-quantization does: an unsigned grid for data
    that is not would hide the mistake in the clamp. (:func:`fake_quantize`
    clamps them to 0: that is its grid.) Computed and returned in float32 (float64 for float64 ``x``): see "Precision" in the module docstring.
    ``axis``: where a flat per-channel ``amax`` goes (:func:`check_amax`).
    """
    amax_t, qmin, qmax = _prepare(x, amax, num_bits, unsigned, narrow_range, axis)
    if unsigned and bool((x < 0).any()):
        raise ValueError(f"quantize(unsigned=True): negative values encountered (min {float(x.min()):.4g}); an unsigned "
                         "grid holds only x >= 0: use unsigned=False, or fake_quantize, which clamps them to 0")
    dtype = compute_dtype(x)
    qs, _ = _scales(amax_t.detach(), qmax, dtype)
    return _quantize_unchecked(x.detach().to(dtype), qs, qmin, qmax)


def dequantize(q: torch.Tensor, amax: AmaxLike, num_bits: int = 8, unsigned: bool = False,
               axis: int | Sequence[int] | None = None) -> torch.Tensor:
    """Back to x's units: ``q / quant_scale``, computed as ``q · step_size`` (torch's and ONNX's rounding)."""
    if not isinstance(q, torch.Tensor) or not q.is_floating_point():
        q = torch.as_tensor(q, dtype=torch.float32)
    step = check_amax(amax, q, axis).to(q.device, compute_dtype(q)) / quant_max(num_bits, unsigned)
    return (q.to(step.dtype) * step).to(q.dtype)


class FakeQuantizeFunction(torch.autograd.Function):
    """``dequantize(quantize(x))`` with the STE for x and the LSQ gradient for amax (module docstring).

    Computes in :func:`compute_dtype` and returns ``x``'s dtype.
    """

    @staticmethod
    def forward(ctx, x, amax, qmin: int, qmax: int, unsigned: bool, learn_amax: bool):
        xc = x.to(compute_dtype(x))
        qs, step = _scales(amax, qmax, xc.dtype)
        q = _quantize_unchecked(xc, qs, qmin, qmax)
        ctx.qmin, ctx.qmax, ctx.unsigned, ctx.learn_amax = qmin, qmax, unsigned, learn_amax
        ctx.amax_shape = amax.shape
        ctx.save_for_backward(xc, amax, q)
        return (q * step).to(x.dtype)  # = q / quant_scale, rounded as torch's (q − 0) · scale

    @staticmethod
    def backward(ctx, grad_out):
        x, amax, q = ctx.saved_tensors
        a = amax.to(x.dtype)
        lower = torch.zeros_like(a) if ctx.unsigned else -a
        inside = (x >= lower) & (x <= a)
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_amax = None
        if ctx.learn_amax and ctx.needs_input_grad[1]:
            u = x * (ctx.qmax / a)
            not_clipped = (u >= ctx.qmin) & (u <= ctx.qmax)
            d = (q - u * not_clipped) / ctx.qmax
            g = grad_out.to(x.dtype) * d
            # sum over the dimensions amax was broadcast along
            shape = ctx.amax_shape
            lead = g.dim() - len(shape)
            g = g.sum(dim=tuple(range(lead))) if lead else g
            dims = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
            if dims:
                g = g.sum(dim=dims, keepdim=True)
            grad_amax = g.reshape(shape).to(amax.dtype)
        return grad_x, grad_amax, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    amax: AmaxLike,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = True,
    learn_amax: bool = False,
    axis: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` = ``clamp(round(x · qmax/amax), qmin, qmax) · amax/qmax``, differentiable.

    Computed in float32 (float64 for float64 ``x``), returned in ``x``'s dtype;
    0 where ``amax <= 2^-24``. ``axis``: where a flat per-channel ``amax``
    goes (:func:`check_amax`). Gradients: the STE for ``x`` (1 for
    ``|x| <= amax``, ``0 <= x <= amax`` unsigned; 0 where clipped) and, with
    ``learn_amax=True`` and ``amax`` a tensor requiring grad, the LSQ gradient
    ``(q − x·quant_scale)/qmax`` (``q/qmax`` where clipped), summed per amax entry.
    """
    amax_t, qmin, qmax = _prepare(x, amax, num_bits, unsigned, narrow_range, axis)
    if not learn_amax:
        amax_t = amax_t.detach()
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or amax_t.requires_grad)
    if not needs_graph:  # fast path: no mask to keep, everything in place on one buffer
        qs, step = _scales(amax_t, qmax, compute_dtype(x))
        out = _quantize_unchecked(x.to(qs.dtype), qs, qmin, qmax)
        return out.mul_(step).to(x.dtype)
    return FakeQuantizeFunction.apply(x, amax_t, qmin, qmax, bool(unsigned), bool(learn_amax))
