r"""The integer arithmetic of one int8 convolution, written out with integer tensors (notebook 11).

An affine quantized tensor stores integers ``q`` with a real value
``r = s (q - z)``: scale ``s`` (the step), zero point ``z`` (the integer that
stands for real 0). A convolution ``y = b + sum_k w_k x_k`` with
``x = s_x (q_x - z_x)`` (``quint8``), per-output-channel weights
``w = s_w[c] q_w`` (``qint8``, zero point 0) and output ``y = s_y (q_y - z_y)``
becomes

.. math::

    s_y (q_y - z_y) = s_x s_w[c] \Big(\underbrace{\textstyle\sum_k (q_{x,k} - z_x)\, q_{w,k}}_{\text{acc, int32}}
                      + \underbrace{\mathrm{round}(b_c / (s_x s_w[c]))}_{\text{bias, int32}}\Big)

so

.. math::

    q_y = \mathrm{clamp}\big(z_y + \mathrm{round}(M_c \cdot (\mathrm{acc} + b^{int}_c)),\ 0,\ 255\big),
    \qquad M_c = s_x s_w[c] / s_y .

* **Accumulation** (:func:`accumulate_conv2d`): products of 8-bit integers,
  summed in 32 bits. Each product is at most ``255 * 128`` in magnitude, so
  ``K`` products need ``|acc| <= K * 32,640 < 2^31`` (``K < 65,793``).
  Padding adds ``q_x = z_x``, i.e. zero after subtracting the zero point.
* **Bias** (:func:`quantize_bias`): stored as int32 at the accumulator's
  scale ``s_x s_w[c]``, so it adds to ``acc`` directly.
* **Requantization** (:func:`fixed_point_multiplier`, :func:`requantize`): the
  real ``M`` is written as ``M0 * 2^(-n)`` with an integer
  ``2^30 <= M0 < 2^31``; ``round(M * acc)`` is then ``(acc * M0 + 2^(n-1)) >> n``,
  one 64-bit multiply and one shift (round half up), no float at run time.
* A fused ReLU is ``q_y >= z_y`` (real 0), another clamp.

Everything here runs in int64 tensors (exact); :func:`quantized_conv2d` chains
the steps. torch's kernels requantize with a float multiplier and round half
to even, so the two may differ by one step (LSB) where ``M * acc`` falls
within rounding distance of a half.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "fixed_point_multiplier",
    "rounding_right_shift",
    "quantize_bias",
    "accumulate_conv2d",
    "requantize",
    "quantized_conv2d",
]

INT32_MAX = 2**31 - 1


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def fixed_point_multiplier(m: float) -> tuple[int, int]:
    """``(M0, n)`` with ``m ≈ M0 * 2**-n`` and ``2**30 <= M0 < 2**31`` (a 31-bit mantissa).

    ``m = f * 2**e`` with ``0.5 <= f < 1`` (``math.frexp``); ``M0 = round(f * 2**31)``,
    ``n = 31 - e``. The relative error of ``M0 * 2**-n`` is at most ``2**-31``.
    ``m`` must be positive and finite.
    """
    m = float(m)
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"fixed_point_multiplier: m must be positive and finite, got {m!r}")
    f, e = math.frexp(m)
    m0, n = round(f * 2**31), 31 - e
    if m0 == 2**31:  # f rounded up to 1.0
        m0, n = m0 // 2, n - 1
    return m0, n


def rounding_right_shift(x: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """``round(x / 2**n)``, ties up, in integers: ``(x + 2**(n-1)) >> n`` (``>>`` floors). ``n >= 1``."""
    n = torch.as_tensor(n, dtype=torch.int64)
    if bool((n < 1).any()):
        raise ValueError("rounding_right_shift: n must be >= 1")
    half = torch.bitwise_left_shift(torch.ones_like(n), n - 1)
    return torch.bitwise_right_shift(x + half, n)


def quantize_bias(bias: torch.Tensor, x_scale: float, w_scales: torch.Tensor) -> torch.Tensor:
    """The bias as int32 at the accumulator's scale: ``round(b_c / (s_x * s_w[c]))``."""
    q = torch.round(bias.double() / (float(x_scale) * w_scales.double()))
    if bool((q.abs() > INT32_MAX).any()):
        raise ValueError("quantize_bias: a bias does not fit int32 at scale s_x * s_w")
    return q.to(torch.int32)


def accumulate_conv2d(x_q: torch.Tensor, x_zero_point: int, w_q: torch.Tensor, *, stride=1, padding=0,
                      dilation=1, groups: int = 1) -> torch.Tensor:
    """``acc[n, c, i, j] = sum_k (q_x - z_x)[patch k of (i, j)] * q_w[c, k]``: int64 tensor ``[N, O, H', W']``.

    ``x_q`` ``[N, C, H, W]`` and ``w_q`` ``[O, C/groups, kh, kw]`` hold integers
    (any dtype). The patches come from ``F.unfold`` of ``q_x - z_x`` in float64
    (integers below 2**53 are exact; zero padding is ``q_x = z_x``); the sum is
    an int64 matrix product, group by group.
    """
    n, c, h, w = x_q.shape
    o, cg, kh, kw = w_q.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"accumulate_conv2d: {c} input channels, weight {tuple(w_q.shape)}, groups={groups}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    centred = x_q.to(torch.float64) - float(x_zero_point)
    cols = F.unfold(centred, (kh, kw), dilation=dilation, padding=padding, stride=stride).to(torch.int64)
    cols = cols.reshape(n, groups, cg * kh * kw, -1)                       # [N, G, K, L]
    weights = w_q.to(torch.int64).reshape(groups, o // groups, cg * kh * kw)  # [G, O/G, K]
    acc = torch.cat([weights[g] @ cols[:, g] for g in range(groups)], dim=1)  # [N, O, L]
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return acc.reshape(n, o, out_h, out_w)


def requantize(acc: torch.Tensor, m0: torch.Tensor, n: torch.Tensor, zero_point: int, *,
               qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    """``clamp(z_y + ((acc * M0 + 2**(n-1)) >> n), qmin, qmax)`` per output channel (axis 1), in int64.

    ``m0`` and ``n`` hold one fixed-point multiplier per channel
    (:func:`fixed_point_multiplier`); ``|acc| < 2**31`` and ``M0 < 2**31`` keep
    ``acc * M0`` inside int64.
    """
    if bool((acc.abs() > INT32_MAX).any()):
        raise ValueError("requantize: the accumulator left int32")
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    m0 = torch.as_tensor(m0, dtype=torch.int64).reshape(shape)
    n = torch.as_tensor(n, dtype=torch.int64).reshape(shape)
    return torch.clamp(int(zero_point) + rounding_right_shift(acc.to(torch.int64) * m0, n), qmin, qmax)


def quantized_conv2d(x_q: torch.Tensor, x_scale: float, x_zero_point: int, w_q: torch.Tensor,
                     w_scales: torch.Tensor, bias: torch.Tensor | None, y_scale: float, y_zero_point: int, *,
                     stride=1, padding=0, dilation=1, groups: int = 1, relu: bool = False) -> torch.Tensor:
    """One int8 convolution in integers (module docstring): ``quint8`` integers of the output, as int64.

    ``w_scales``: one scale per output channel (or one for all). ``relu``: the
    fused ReLU, ``q_y >= z_y``.
    """
    out_channels = w_q.shape[0]
    w_scales = torch.as_tensor(w_scales, dtype=torch.float64).flatten().expand(out_channels)
    acc = accumulate_conv2d(x_q, x_zero_point, w_q, stride=stride, padding=padding, dilation=dilation, groups=groups)
    if bias is not None:
        acc = acc + quantize_bias(bias, x_scale, w_scales).to(torch.int64).reshape(1, -1, 1, 1)
    pairs = [fixed_point_multiplier(float(x_scale) * float(s) / float(y_scale)) for s in w_scales]
    m0 = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    n = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    return requantize(acc, m0, n, y_zero_point, qmin=int(y_zero_point) if relu else 0, qmax=255)
