"""fusionlib.quant.integer: the int8 convolution in integer tensors, against exact arithmetic and torch's kernels."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from fusionlib.quant import integer


@pytest.mark.parametrize("m", [0.0123456789, 1e-7, 0.3, 0.5, 0.999, 1 - 2**-35, 1.0, 3.75])
def test_fixed_point_multiplier_is_a_31_bit_mantissa_within_half_a_unit(m):
    m0, n = integer.fixed_point_multiplier(m)
    assert isinstance(m0, int) and isinstance(n, int)
    assert 2**30 <= m0 < 2**31
    assert abs(Fraction(m0) - Fraction(m) * Fraction(2) ** n) <= Fraction(1, 2)
    assert abs(m0 * 2.0**-n - m) <= m * 2**-31


def test_fixed_point_multiplier_carries_a_mantissa_that_rounds_up():
    assert integer.fixed_point_multiplier(1 - 2**-35) == (2**30, 30)


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan, math.inf])
def test_fixed_point_multiplier_refuses_non_positive_or_non_finite(bad):
    with pytest.raises(ValueError, match="positive and finite"):
        integer.fixed_point_multiplier(bad)


def test_rounding_right_shift_rounds_half_up_for_both_signs():
    x = torch.arange(-40, 41, dtype=torch.int64)
    for n in (1, 2, 3):
        expected = torch.tensor([math.floor(v / 2**n + 0.5) for v in x.tolist()])
        assert torch.equal(integer.rounding_right_shift(x, n), expected)
    with pytest.raises(ValueError, match="n must be >= 1"):
        integer.rounding_right_shift(x, 0)


def test_quantize_bias_rounds_at_the_accumulator_scale_and_refuses_overflow():
    bias = torch.tensor([0.1, -0.25, 0.0])
    w_scales = torch.tensor([0.01, 0.02, 0.5], dtype=torch.float64)
    q = integer.quantize_bias(bias, 0.5, w_scales)
    assert q.dtype == torch.int32
    assert q.tolist() == [round(0.1 / 0.005), round(-0.25 / 0.01), 0]
    with pytest.raises(ValueError, match="int32"):
        integer.quantize_bias(torch.tensor([1e6]), 1e-3, torch.tensor([1e-3]))


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (1, 1, 1, 4),
                                                            ((2, 1), (0, 1), 1, 2)])
def test_accumulate_conv2d_is_the_exact_conv_of_centred_integers(stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(0, 256, (2, 8, 9, 7), generator=g)
    w_q = torch.randint(-128, 128, (8, 8 // groups, 3, 3), generator=g)
    acc = integer.accumulate_conv2d(x_q, 37, w_q, stride=stride, padding=padding, dilation=dilation, groups=groups)
    reference = F.conv2d((x_q - 37).double(), w_q.double(), stride=stride, padding=padding, dilation=dilation,
                         groups=groups)
    assert acc.dtype == torch.int64
    assert torch.equal(acc, reference.long())


def test_accumulate_conv2d_names_a_channel_mismatch():
    with pytest.raises(ValueError, match="groups=2"):
        integer.accumulate_conv2d(torch.zeros(1, 3, 4, 4), 0, torch.zeros(4, 1, 1, 1), groups=2)


def test_requantize_is_round_half_up_of_the_exact_product_then_clamped():
    acc = torch.tensor([[-5000, -1, 0, 77, 12345, 2**30]], dtype=torch.int64).reshape(1, 1, 6)
    m = 0.0123456789
    m0, n = integer.fixed_point_multiplier(m)
    out = integer.requantize(acc, torch.tensor([m0]), torch.tensor([n]), 10)
    exact = [min(max(10 + math.floor(Fraction(a) * m0 / 2**n + Fraction(1, 2)), 0), 255) for a in acc.flatten().tolist()]
    assert out.flatten().tolist() == exact
    with pytest.raises(ValueError, match="left int32"):
        integer.requantize(acc * 4, torch.tensor([m0]), torch.tensor([n]), 0)


def _torch_conv(x_f, weight, bias, x_grid, y_scale, y_zp, *, groups=1, stride=1, padding=1, relu=False):
    """torch's quantized conv (x86 engine) on x_f quantized with x_grid = (scale, zero_point)."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    torch.backends.quantized.engine = "x86"
    w_scales = weight.abs().amax(dim=(1, 2, 3)).double() / 127
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_q = torch.quantize_per_channel(weight, w_scales, torch.zeros(len(w_scales), dtype=torch.long), 0, torch.qint8)
        cls = nniq.ConvReLU2d if relu else nnq.Conv2d
        conv = cls(weight.shape[1] * groups, weight.shape[0], weight.shape[2], stride=stride, padding=padding,
                   groups=groups)
        conv.set_weight_bias(w_q, bias)
        conv.scale, conv.zero_point = y_scale, y_zp
        x_q = torch.quantize_per_tensor(x_f, *x_grid, torch.quint8)
        return x_q, w_q, conv(x_q).int_repr().long()


@pytest.mark.parametrize("groups,relu,y_zp", [(1, False, 128), (1, True, 0), (8, False, 100)])
def test_quantized_conv2d_matches_torch_to_one_step_on_7_bit_inputs(groups, relu, y_zp):
    """7-bit inputs (0..127): no pair of products saturates 16 bits, so torch's kernel is exact on any x86 CPU."""
    g = torch.Generator().manual_seed(1)
    x_f = torch.randn(2, 8, 10, 10, generator=g)
    weight = torch.randn(16, 8 // groups, 3, 3, generator=g) * 0.2
    bias = torch.randn(16, generator=g) * 0.1
    low, high = float(x_f.min()), float(x_f.max())
    x_scale = (high - low) / 127
    x_grid = (x_scale, round(-low / x_scale))
    y_scale = 0.05
    x_q, w_q, theirs = _torch_conv(x_f, weight, bias, x_grid, y_scale, y_zp, groups=groups, relu=relu)
    ours = integer.quantized_conv2d(x_q.int_repr(), x_q.q_scale(), x_q.q_zero_point(), w_q.int_repr(),
                                    w_q.q_per_channel_scales(), bias, y_scale, y_zp, padding=1, groups=groups,
                                    relu=relu)
    assert ours.dtype == torch.int64 and ours.shape == theirs.shape
    assert int(ours.min()) >= (y_zp if relu else 0) and int(ours.max()) <= 255
    assert int((ours - theirs).abs().max()) <= 1
