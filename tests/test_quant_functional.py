"""fusionlib.quant.functional: the grid, agreement with torch's fake-quant kernels, STE and LSQ gradients, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fusionlib import data, models, zoo
from fusionlib.quant import (
    amax_along,
    amax_shape_for,
    check_amax,
    dequantize,
    fake_quantize,
    quant_max,
    quant_min,
    quant_scale,
    quantize,
    reduce_amax,
    step_size,
)

IDENTICAL_FRACTION = 0.999  # the bar: identical on >= 99.9 % of elements, within one step everywhere


# ----------------------------------------------------------------------------- the grid
@pytest.mark.parametrize(
    "num_bits, unsigned, narrow_range, qmin, qmax",
    [(8, False, True, -127, 127), (8, False, False, -128, 127), (8, True, True, 0, 255), (8, True, False, 0, 255),
     (4, False, True, -7, 7), (4, False, False, -8, 7), (4, True, False, 0, 15), (2, False, True, -1, 1),
     (16, False, False, -32768, 32767)],
)
def test_quant_min_and_max(num_bits, unsigned, narrow_range, qmin, qmax):
    assert quant_max(num_bits, unsigned) == qmax
    assert quant_min(num_bits, unsigned, narrow_range) == qmin


def test_quant_scale_and_step_size_are_reciprocal_and_named_apart():
    amax = torch.tensor([0.5, 2.0, 10.0])
    assert torch.allclose(quant_scale(amax, 8), 127 / amax)  # pytorch-quantization's "scale": x * it -> integers
    assert torch.allclose(step_size(amax, 8), amax / 127)  # torch's / ONNX's "scale": one step in x's units
    assert torch.allclose(quant_scale(amax, 8) * step_size(amax, 8), torch.ones(3))
    assert torch.allclose(step_size(2.0, 8, unsigned=True), torch.tensor(2.0 / 255))


def test_quantize_gives_integers_on_the_grid_and_dequantize_inverts_it():
    torch.manual_seed(0)
    x = torch.randn(1000) * 2
    for num_bits, unsigned, narrow in [(8, False, True), (8, False, False), (4, True, False), (3, False, True)]:
        xs = x.abs() if unsigned else x  # quantize refuses negatives on an unsigned grid
        q = quantize(xs, 1.5, num_bits, unsigned, narrow)
        assert q.dtype == xs.dtype and torch.equal(q, q.round())
        assert int(q.min()) == quant_min(num_bits, unsigned, narrow) and int(q.max()) == quant_max(num_bits, unsigned)
        assert torch.equal(dequantize(q, 1.5, num_bits, unsigned), fake_quantize(xs, 1.5, num_bits, unsigned, narrow))
    # inside the range the error is at most half a step
    inside = x[x.abs() <= 1.5]
    assert float((fake_quantize(inside, 1.5) - inside).abs().max()) <= float(step_size(1.5)) / 2 * (1 + 1e-6)


def test_fake_quantize_does_not_modify_its_input_and_keeps_dtype():
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    before = x.clone()
    for amax in (1.0, torch.tensor(1.0), torch.full((4, 1), 1.0)):
        out = fake_quantize(x, amax)
        assert torch.equal(x, before) and out.dtype == x.dtype and out is not x
    x64 = torch.randn(10, dtype=torch.float64)
    assert fake_quantize(x64, 1.0).dtype == torch.float64


# ----------------------------------------------------------------------------- against torch's kernels
def torch_reference(x, amax, num_bits, unsigned, narrow_range, axis=None):
    qmax, qmin = quant_max(num_bits, unsigned), quant_min(num_bits, unsigned, narrow_range)
    step = (torch.as_tensor(amax, dtype=torch.float32) / qmax)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(step), 0, qmin, qmax), step
    step = step.flatten()
    zero = torch.zeros(step.numel(), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(x, step, zero, axis, qmin, qmax), step


def assert_agrees_with_torch(x, amax, num_bits, unsigned, narrow_range, axis=None):
    ours = fake_quantize(x, amax, num_bits, unsigned, narrow_range)
    theirs, step = torch_reference(x, amax, num_bits, unsigned, narrow_range, axis)
    step_b = step.reshape(amax_shape_for(x.shape, axis)) if axis is not None else step
    steps_apart = ((ours - theirs).abs() / step_b)
    assert float(steps_apart.max()) <= 1 + 1e-5, f"more than one step apart: {float(steps_apart.max())}"
    identical = float((ours == theirs).float().mean())
    assert identical >= IDENTICAL_FRACTION, f"only {identical:.5f} identical"
    return identical


BIT_CONFIGS = [(b, u, n) for b in (4, 5, 6, 7, 8) for u in (False, True) for n in (True, False)]


@pytest.mark.parametrize("num_bits, unsigned, narrow_range", BIT_CONFIGS)
def test_per_tensor_agrees_with_torch_on_random_data(num_bits, unsigned, narrow_range):
    torch.manual_seed(num_bits)
    x = torch.randn(8, 16, 12, 12) * 3
    if unsigned:
        x = x.relu()
    for amax in (0.7, float(x.abs().max()), 2.0):  # clipping a lot, nothing, some
        assert_agrees_with_torch(x, torch.tensor(amax), num_bits, unsigned, narrow_range)


@pytest.mark.parametrize("num_bits, unsigned, narrow_range", BIT_CONFIGS)
def test_per_channel_agrees_with_torch_on_random_data(num_bits, unsigned, narrow_range):
    torch.manual_seed(100 + num_bits)
    x = torch.randn(16, 8, 3, 3) * torch.logspace(-2, 1, 16).reshape(16, 1, 1, 1)
    if unsigned:
        x = x.abs()
    for axis in (0, 1):
        amax = x.abs().amax(dim=tuple(d for d in range(4) if d != axis), keepdim=True) * 0.8
        assert_agrees_with_torch(x, amax, num_bits, unsigned, narrow_range, axis=axis)


def test_exact_ties_round_half_to_even_like_torch():
    amax = torch.tensor(127.0)  # quant_scale 1, step 1: the values are the unrounded integers
    x = torch.arange(-130, 130, dtype=torch.float32) + 0.5
    ours = fake_quantize(x, amax, 8)
    theirs, _ = torch_reference(x, amax, 8, False, True)
    assert torch.equal(ours, theirs)
    assert torch.equal(quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), amax), torch.tensor([0.0, 2, 2, -0, -2]))


@pytest.fixture(scope="module")
def digits_model_tensors():
    """Conv weights and activations (conv outputs, signed; ReLU outputs, unsigned) of the digits-trained models."""
    images = data.digits_tensors()[2][:16]
    out = {}
    for name in sorted(models.BUILDERS):
        model, _ = zoo.trained_model(name, epochs=3, image_size=32, seed=0, progress=False)
        weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)]
        acts, hooks = [], []
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ReLU, nn.ReLU6)):
                hooks.append(m.register_forward_hook(lambda mod, i, o: acts.append((isinstance(mod, nn.Conv2d), o.detach().clone()))))
        with torch.no_grad():
            model(images)
        for h in hooks:
            h.remove()
        out[name] = (weights, acts)
    return out


@pytest.mark.parametrize("num_bits", [4, 6, 8])
@pytest.mark.parametrize("narrow_range", [True, False])
def test_real_conv_weights_per_channel_and_per_tensor_agree_with_torch(digits_model_tensors, num_bits, narrow_range):
    fractions = []
    for name, (weights, _) in digits_model_tensors.items():
        for w in weights:
            amax_c = w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
            fractions.append(assert_agrees_with_torch(w, amax_c, num_bits, False, narrow_range, axis=0))
            fractions.append(assert_agrees_with_torch(w, w.abs().max(), num_bits, False, narrow_range))
    assert len(fractions) > 40


@pytest.mark.parametrize("num_bits", [4, 8])
def test_real_activations_agree_with_torch_signed_and_unsigned(digits_model_tensors, num_bits):
    for name, (_, acts) in digits_model_tensors.items():
        for is_conv, a in acts[::3]:
            amax = a.abs().max() * 0.9
            if is_conv:
                assert_agrees_with_torch(a, amax, num_bits, False, True)
                per_channel = a.abs().amax(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
                assert_agrees_with_torch(a, per_channel, num_bits, False, False, axis=1)
            else:  # after ReLU: the unsigned grid doubles the resolution
                assert_agrees_with_torch(a, amax, num_bits, True, False)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("unsigned", [False, True])
def test_ste_gradient_is_one_inside_and_zero_outside(unsigned):
    amax = 1.0
    x = torch.tensor([-2.0, -1.0, -0.99, -0.3, 0.0, 0.004, 0.5, 1.0, 1.01, 3.0], requires_grad=True)
    fake_quantize(x, amax, 8, unsigned).sum().backward()
    lower = 0.0 if unsigned else -amax
    expected = ((x.detach() >= lower) & (x.detach() <= amax)).float()
    assert torch.equal(x.grad, expected)


def test_ste_gradient_per_channel():
    x = torch.tensor([[0.5, 1.5], [0.5, 1.5]], requires_grad=True)
    amax = torch.tensor([[1.0], [2.0]])
    fake_quantize(x, amax).backward(torch.ones(2, 2))
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


def lsq_reference(x, amax, num_bits, unsigned, narrow_range):
    """The LSQ gradient by autograd (Esser et al.: clip, then round with a straight-through estimator)."""
    qmax, qmin = quant_max(num_bits, unsigned), quant_min(num_bits, unsigned, narrow_range)
    u = (x * (qmax / amax)).clamp(qmin, qmax)
    rounded = u + (u.round() - u).detach()
    return rounded * (amax / qmax)


@pytest.mark.parametrize("num_bits, unsigned, narrow_range", [(8, False, True), (4, False, False), (4, True, False), (6, True, True)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_learnable_amax_gradient_matches_the_lsq_formula(num_bits, unsigned, narrow_range, per_channel):
    torch.manual_seed(1)
    x = torch.randn(6, 5, 4, dtype=torch.float64) * 2
    init = torch.rand(6, 1, 1, dtype=torch.float64) + 0.5 if per_channel else torch.tensor(1.3, dtype=torch.float64)
    weights = torch.randn(6, 5, 4, dtype=torch.float64)  # an arbitrary upstream gradient
    amax = init.clone().requires_grad_(True)
    (fake_quantize(x, amax, num_bits, unsigned, narrow_range, learn_amax=True) * weights).sum().backward()
    ref_amax = init.clone().requires_grad_(True)
    (lsq_reference(x, ref_amax, num_bits, unsigned, narrow_range) * weights).sum().backward()
    assert amax.grad.shape == init.shape
    assert torch.allclose(amax.grad, ref_amax.grad, rtol=1e-10, atol=1e-10)
    # the closed form of the module docstring, element by element
    qmax, qmin = quant_max(num_bits, unsigned), quant_min(num_bits, unsigned, narrow_range)
    u = x * qmax / init
    q = u.round().clamp(qmin, qmax)
    inside = (u >= qmin) & (u <= qmax)
    d = torch.where(inside, (q - u) / qmax, q / qmax)
    expected = (d * weights).sum(dim=(1, 2), keepdim=True) if per_channel else (d * weights).sum()
    assert torch.allclose(amax.grad, expected, rtol=1e-10, atol=1e-10)


def test_learnable_amax_gradient_equals_finite_differences_where_clipped():
    """Where every element is clipped, q is constant and the derivative q/qmax is the true one."""
    x = torch.tensor([-5.0, -3.0, 2.5, 4.0, 7.0], dtype=torch.float64)
    amax = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    fake_quantize(x, amax, 8, learn_amax=True).sum().backward()
    h = 1e-6
    at = lambda a: fake_quantize(x, torch.tensor(a, dtype=torch.float64)).sum()  # noqa: E731
    numeric = (at(1.0 + h) - at(1.0 - h)) / (2 * h)
    assert math.isclose(float(amax.grad), float(numeric), rel_tol=1e-6)
    assert math.isclose(float(amax.grad), 1.0, rel_tol=1e-12)  # (-1 - 1 + 1 + 1 + 1)


def test_amax_gets_no_gradient_unless_learned():
    amax = torch.tensor(1.0, requires_grad=True)
    x = torch.randn(10, requires_grad=True)
    fake_quantize(x, amax).sum().backward()
    assert amax.grad is None and x.grad is not None


def test_graph_path_and_fast_path_agree():
    torch.manual_seed(0)
    x = torch.randn(32, 8, 5, 5)
    amax = x.abs().amax(dim=(1, 2, 3), keepdim=True) * 0.7
    fast = fake_quantize(x, amax, 5, narrow_range=False)
    slow = fake_quantize(x.clone().requires_grad_(True), amax.clone().requires_grad_(True), 5, narrow_range=False,
                         learn_amax=True)
    assert torch.equal(fast, slow.detach())


# ----------------------------------------------------------------------------- shapes and bad input
@pytest.mark.parametrize(
    "shape, axis, expected",
    [((64, 3, 7, 7), 0, (64, 1, 1, 1)), ((8, 16, 5, 5), 1, (1, 16, 1, 1)), ((8, 16), -1, (1, 16)),
     ((4, 5, 6), (0, 2), (4, 1, 6)), ((4, 5), None, ())],
)
def test_amax_shape_for(shape, axis, expected):
    assert amax_shape_for(shape, axis) == expected


X = torch.linspace(-2, 2, 24).reshape(2, 3, 4)

BAD_INPUTS = {
    # name: (kwargs for fake_quantize, exception, message pattern)
    "one_bit": (dict(num_bits=1), ValueError, r"num_bits must be an int in 2\.\.16, got 1"),
    "seventeen_bits": (dict(num_bits=17), ValueError, r"num_bits must be an int in 2\.\.16, got 17"),
    "float_bits": (dict(num_bits=8.0), ValueError, r"num_bits must be an int in 2\.\.16, got 8\.0"),
    "bool_bits": (dict(num_bits=True), ValueError, r"num_bits must be an int in 2\.\.16, got True"),
    "zero_amax": (dict(amax=0.0), ValueError, r"amax must be positive and finite everywhere, got \[0\.0\]"),
    "negative_amax": (dict(amax=-1.0), ValueError, r"amax must be positive.*got \[-1\.0\]"),
    "nan_amax": (dict(amax=float("nan")), ValueError, r"amax must be positive.*got \[nan\]"),
    "inf_amax": (dict(amax=float("inf")), ValueError, r"amax must be positive.*got \[inf\]"),
    "one_zero_channel": (dict(amax=torch.tensor([[[1.0]], [[0.0]]])), ValueError, r"got \[0\.0\] \(1 of 2 entries bad\)"),
    "wrong_channel_count": (dict(amax=torch.ones(3, 1, 1, 1)), ValueError,
                            r"amax of shape \(3, 1, 1, 1\) does not broadcast against x of shape \(2, 3, 4\)"),
    "not_broadcastable": (dict(amax=torch.ones(5)), ValueError, r"amax of shape \(5,\) does not broadcast"),
    "amax_grows_x": (dict(amax=torch.ones(2, 2, 3, 4)), ValueError, r"amax of shape \(2, 2, 3, 4\) does not broadcast"),
    "string_amax": (dict(amax="1.0"), ValueError, r"amax must be a positive number, a list of them or a float tensor, got str"),
    "integer_x": (dict(x=torch.ones(3, dtype=torch.int64)), ValueError, r"x must be a floating-point tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("function", [fake_quantize, quantize])
def test_bad_input_is_rejected_and_nothing_changes(case, function):
    kwargs, error, pattern = BAD_INPUTS[case]
    call = dict(x=X.clone(), amax=1.5)
    call.update(kwargs)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    with pytest.raises(error, match=pattern):
        function(**call)
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(call[key], value) or bool(value.isnan().all() and call[key].isnan().all()), key


@pytest.mark.parametrize(
    "shape, axis, pattern",
    [((4, 5), 2, r"axis 2 is out of range for a tensor with 2 dims \(valid: -2\.\.1\)"),
     ((4, 5), -3, r"axis -3 is out of range"), ((4, 5), (0, 0), r"repeats a dimension"),
     ((4, 5), "0", r"axis must be None, an int or a non-empty tuple of ints, got '0'")],
)
def test_amax_shape_for_rejects_bad_axis(shape, axis, pattern):
    with pytest.raises(ValueError, match=pattern):
        amax_shape_for(shape, axis)


def test_check_amax_with_axis_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"want \(1, 3, 1\)"):
        check_amax(torch.ones(2, 1, 1), X, axis=1)
    assert check_amax(torch.ones(1, 3, 1), X, axis=1).shape == (1, 3, 1)
    assert check_amax(2.0, X).shape == ()


# ----------------------------------------------------------------------------- edges: precision, tiny amax, flat amax
def test_fp16_and_bf16_are_quantized_in_float32_then_cast_back():
    x16 = torch.tensor([0, 5e-4, -1e-3, 1.5e-3], dtype=torch.float16)
    out = fake_quantize(x16, 1.5e-3)
    assert out.dtype == torch.float16 and not bool(out.isnan().any())
    want = fake_quantize(x16.float(), 1.5e-3).half()  # [0, 0.000496, -0.001004, 0.0015]
    assert torch.equal(out, want)
    torch.testing.assert_close(out.float(), torch.tensor([0, 0.000496, -0.001004, 0.0015]), atol=1e-6, rtol=0)
    assert float(quantize(torch.tensor([3.109375], dtype=torch.bfloat16), 4.0, narrow_range=False)) == 99  # 98.72
    torch.manual_seed(0)
    x = torch.randn(20000) * 3
    for dtype in (torch.float16, torch.bfloat16):
        xr = x.to(dtype)
        assert torch.equal(quantize(xr, 4.0, narrow_range=False), quantize(xr.float(), 4.0, narrow_range=False))
        assert torch.equal(fake_quantize(xr, 4.0), fake_quantize(xr.float(), 4.0).to(dtype))
        xg = xr.clone().requires_grad_(True)  # the autograd path computes the same
        assert torch.equal(fake_quantize(xg, 4.0).detach(), fake_quantize(xr, 4.0))


def test_amax_at_most_2_to_the_minus_24_quantizes_to_zero_not_nan():
    x = torch.tensor([0.0, 1e-38, 0.5])
    for amax in (1e-37, 2.0 ** -24):
        assert torch.equal(fake_quantize(x, amax), torch.zeros(3)), amax
        assert torch.equal(quantize(x, amax), torch.zeros(3)), amax
    per_channel = fake_quantize(torch.stack([x, x]), torch.tensor([[1e-30], [1.0]]))  # only the tiny channel is 0
    assert torch.equal(per_channel[0], torch.zeros(3)) and torch.equal(per_channel[1], fake_quantize(x, 1.0))
    xg = x.clone().requires_grad_(True)
    fake_quantize(xg, 1e-37).sum().backward()  # the autograd path too
    assert not bool(xg.grad.isnan().any())


def test_flat_per_channel_amax_is_placed_along_axis_not_the_last_dim():
    torch.manual_seed(0)
    w = torch.randn(4, 4)
    rows = w.abs().amax(1)
    ref = fake_quantize(w, rows.reshape(4, 1))
    for flat in (rows.tolist(), rows):
        assert torch.equal(fake_quantize(w, flat, axis=0), ref)
        assert torch.equal(check_amax(flat, w, axis=0), rows.reshape(4, 1))
    assert check_amax(rows.reshape(4, 1), w, axis=0).shape == (4, 1)
    conv_w = torch.randn(3, 2, 3, 3)
    assert check_amax([1.0, 2.0, 3.0], conv_w, axis=0).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError, match=r"does not match axis=0 .*want \(4, 1\), or a flat list of 4 values"):
        check_amax(torch.ones(1, 4), w, axis=0)


# ----------------------------------------------------------------------------- pytorch-quantization's names and behaviour
def test_reduce_amax_reduces_the_named_axes():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 2, 2)
    assert torch.equal(reduce_amax(w), w.abs().max()) and reduce_amax(w).shape == ()  # axis=None: a 0-d amax
    assert torch.equal(reduce_amax(w, axis=(1, 2, 3)), w.abs().amax(dim=(1, 2, 3), keepdim=True))
    assert reduce_amax(w, axis=(1, 2, 3), keepdims=False).shape == (4,)
    assert reduce_amax(w, axis=0).shape == (1, 3, 2, 2) and not reduce_amax(w.requires_grad_(), 0).requires_grad
    assert torch.equal(amax_along(w, 0), reduce_amax(w, axis=(1, 2, 3)))  # axis kept vs axes reduced


def test_quantize_unsigned_refuses_negative_values_and_fake_quantize_clamps_them():
    x = torch.tensor([-0.25, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"negative values encountered"):
        quantize(x, 1.0, 8, unsigned=True)
    assert fake_quantize(x, 1.0, 8, unsigned=True)[0] == 0.0  # fake_quantize's grid is [0, amax]
    assert torch.equal(quantize(x.abs(), 1.0, 8, unsigned=True), torch.tensor([64.0, 128.0, 255.0]))
