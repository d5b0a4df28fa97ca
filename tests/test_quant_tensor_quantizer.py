"""fusionlib.quant: QuantDescriptor and TensorQuantizer (switches, calibration, export mode, state_dict, repr)."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from fusionlib import zoo
from fusionlib.quant import (
    QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW,
    QUANT_DESC_8BIT_PER_TENSOR,
    QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR,
    QuantDescriptor,
    TensorQuantizer,
    fake_quantize,
    quant_max,
    quantize,
)


# ----------------------------------------------------------------------------- descriptor
def test_descriptor_defaults_and_normalized_axis():
    d = QuantDescriptor()
    assert (d.num_bits, d.axis, d.unsigned, d.narrow_range, d.amax, d.learn_amax, d.calib_method, d.fake_quant) == (
        8, None, False, False, None, False, "max", True)
    assert QuantDescriptor(axis=0).axis == (0,) and QuantDescriptor(axis=[0, 2]).axis == (0, 2)
    assert QuantDescriptor(**QuantDescriptor(num_bits=4, axis=1, amax=[1, 2]).dict()) == QuantDescriptor(num_bits=4, axis=(1,), amax=(1.0, 2.0))
    assert QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL.axis == (0,) and QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW.axis == (0,)
    assert QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL.axis == (1,)
    assert QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR.unsigned and QUANT_DESC_8BIT_PER_TENSOR.axis is None
    assert "8bit" in repr(d) and "axis=(0,)" in repr(QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL)
    with pytest.raises(Exception):
        d.num_bits = 4  # frozen
    assert d.replace(num_bits=4).num_bits == 4 and d.num_bits == 8


DESCRIPTOR_BAD_INPUTS = {
    "one_bit": (dict(num_bits=1), r"num_bits must be an int in 2\.\.16, got 1"),
    "too_many_bits": (dict(num_bits=32), r"num_bits must be an int in 2\.\.16, got 32"),
    "calib_method": (dict(calib_method="kl"), r"calib_method must be one of \('max', 'histogram'\), got 'kl'"),
    "histogram_per_channel": (dict(calib_method="histogram", axis=0), r"calib_method='histogram'.*axis=\(0,\)"),
    "axis_string": (dict(axis="0"), r"axis must be None, an int or a non-empty tuple of ints, got '0'"),
    "axis_repeated": (dict(axis=(1, 1)), r"repeats a dimension"),
    "zero_amax": (dict(amax=0.0), r"amax must be positive and finite everywhere, got \[0\.0\]"),
    "nan_amax": (dict(amax=[1.0, float("nan")]), r"amax must be positive and finite everywhere, got \[nan\]"),
    "unsigned_not_bool": (dict(unsigned=1), r"unsigned must be True or False, got 1"),
}


@pytest.mark.parametrize("case", list(DESCRIPTOR_BAD_INPUTS))
def test_descriptor_rejects_bad_arguments(case):
    kwargs, pattern = DESCRIPTOR_BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        QuantDescriptor(**kwargs)


# ----------------------------------------------------------------------------- quantizer
def test_quantizer_properties_follow_the_descriptor():
    tq = TensorQuantizer(QuantDescriptor(num_bits=6, axis=1, unsigned=True, narrow_range=True, name="act"))
    assert (tq.num_bits, tq.axis, tq.unsigned, tq.narrow_range, tq.fake_quant, tq.learn_amax) == (6, (1,), True, True, True, False)
    assert tq.quant_max == 63 and tq.quant_min == 0 and tq.amax is None


def test_forward_fake_quantizes_with_amax():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    tq = TensorQuantizer(QuantDescriptor(num_bits=8, amax=1.5))
    assert torch.equal(tq(x), fake_quantize(x, 1.5, 8, narrow_range=False))
    per_channel = TensorQuantizer(QuantDescriptor(num_bits=4, axis=1, narrow_range=True))
    per_channel.amax = torch.linspace(0.5, 2, 8).reshape(1, 8, 1, 1)
    assert torch.equal(per_channel(x), fake_quantize(x, per_channel.amax, 4))
    real = TensorQuantizer(QuantDescriptor(amax=1.5, fake_quant=False))
    assert torch.equal(real(x), quantize(x, 1.5, 8, narrow_range=False))


def test_switches():
    x = torch.linspace(-3, 3, 50)
    tq = TensorQuantizer(QuantDescriptor(amax=1.0))
    assert not torch.equal(tq(x), x)
    tq.disable()
    assert tq(x) is x
    tq.enable()
    tq.disable_quant()
    assert tq(x) is x
    tq.enable_calib()
    tq(x * 2)
    assert float(tq.calibrator.compute_amax()) == 6.0 and tq(x) is x  # calibrates, passes through
    tq.enable_quant()
    out = tq(x)
    assert float(out.max()) == 1.0  # still the old amax until load_calib_amax
    tq.disable_calib()
    tq.load_calib_amax()
    assert float(tq.amax) == 6.0
    tq.disable()
    tq.enable_calib()
    tq(x * 100)  # disabled: no calibration either
    assert float(tq.calibrator.compute_amax()) == 6.0
    tq.reset_calib()
    with pytest.raises(RuntimeError, match=r"calibrator saw no data"):
        tq.load_calib_amax()


def test_quantize_without_amax_is_a_clear_error():
    tq = TensorQuantizer(QuantDescriptor(name="layer1.0.conv1.input"))
    with pytest.raises(RuntimeError, match=r"'layer1\.0\.conv1\.input' has no amax: calibrate first or set amax"):
        tq(torch.ones(3))


def test_quantizing_while_collecting_statistics_says_disable_quant():
    tq = TensorQuantizer(QuantDescriptor(name="layer1.0.conv1.input"))
    tq.enable_calib()  # calibration on, quantization left on: the forgotten disable_quant()
    with pytest.raises(RuntimeError, match=r"'layer1\.0\.conv1\.input' is collecting calibration statistics with "
                                           r"quantization on.*disable_quant\(\)"):
        tq(torch.ones(3))
    tq.disable_quant()
    assert torch.equal(tq(torch.ones(3)), torch.ones(3))  # the same quantizer, calibrating as it should
    tq.load_calib_amax()
    tq.disable_calib()
    tq.enable_quant()
    assert float(tq.amax) == 1.0


def test_calibrate_per_channel_weights_of_a_real_model():
    model, _ = zoo.trained_model("resnet18", epochs=3, image_size=32, seed=0, progress=False)
    w = model.layer1[0].conv1.weight.detach()
    tq = TensorQuantizer(QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL, if_quant=False, if_calib=True)
    assert tq(w) is w
    tq.load_calib_amax()
    tq.disable_calib()
    tq.enable_quant()
    assert tq.amax.shape == (w.shape[0], 1, 1, 1)
    assert torch.equal(tq(w), fake_quantize(w, w.abs().amax(dim=(1, 2, 3), keepdim=True), 8, narrow_range=False))


@pytest.mark.parametrize("method, kwargs", [("percentile", dict(percentile=99.9)), ("mse", {}), ("entropy", {})])
def test_histogram_quantizer_loads_each_method(method, kwargs):
    torch.manual_seed(0)
    tq = TensorQuantizer(QuantDescriptor(calib_method="histogram", unsigned=True), if_calib=True, if_quant=False)
    for _ in range(3):
        tq(torch.randn(1000).relu())
    amax = tq.load_calib_amax(method, **kwargs)
    assert amax.shape == () and 0 < float(amax) <= float(tq.calibrator.range_max)
    with pytest.raises(ValueError, match=r"histogram calibrator: pass method="):
        tq.load_calib_amax()


def test_load_calib_amax_bad_method_for_max():
    tq = TensorQuantizer(if_calib=True, if_quant=False)
    tq(torch.randn(10))
    with pytest.raises(ValueError, match=r"max calibrator; method must be None or 'max', got 'entropy'"):
        tq.load_calib_amax("entropy")


def test_all_zero_channel_gets_amax_one_with_a_warning():
    tq = TensorQuantizer(QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL, if_calib=True, if_quant=False)
    w = torch.randn(3, 2, 3, 3)
    w[1] = 0
    tq(w)
    with pytest.warns(UserWarning, match=r"1 amax entries are <= 2\^-24"):
        tq.load_calib_amax()
    tq.enable_quant()
    out = tq(w)
    assert float(tq.amax[1]) == 1.0 and not out[1].any()


AMAX_BAD_INPUTS = {
    "zero": (0.0, r"amax must be positive and finite everywhere, got \[0\.0\]"),
    "negative": (torch.tensor([1.0, -2.0]), r"got \[-2\.0\]"),
    "nan": (float("nan"), r"got \[nan\]"),
    "none": (None, r"amax cannot be set to None"),
}


@pytest.mark.parametrize("case", list(AMAX_BAD_INPUTS))
def test_setting_a_bad_amax_fails_and_keeps_the_old_one(case):
    value, pattern = AMAX_BAD_INPUTS[case]
    tq = TensorQuantizer(QuantDescriptor(amax=2.0))
    with pytest.raises(ValueError, match=pattern):
        tq.amax = value
    assert float(tq.amax) == 2.0


def test_amax_of_the_wrong_shape_is_caught_at_forward():
    tq = TensorQuantizer(QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL)
    tq.amax = torch.ones(5, 1, 1, 1)
    with pytest.raises(ValueError, match=r"amax of shape \(5, 1, 1, 1\) does not match axis=\(0,\) of x \(4, 2, 3, 3\): want \(4, 1, 1, 1\)"):
        tq(torch.ones(4, 2, 3, 3))


def test_axis_out_of_range_is_a_clear_error():
    tq = TensorQuantizer(QuantDescriptor(axis=3), if_calib=True, if_quant=False)
    with pytest.raises(ValueError, match=r"axis 3 is out of range for a tensor with 2 dims"):
        tq(torch.ones(4, 5))


# ----------------------------------------------------------------------------- export mode
@pytest.mark.parametrize(
    "desc",
    [QuantDescriptor(num_bits=8, amax=1.2), QuantDescriptor(num_bits=4, unsigned=True, amax=2.0),
     QuantDescriptor(num_bits=6, narrow_range=True, amax=0.7), QuantDescriptor(num_bits=8, axis=0),
     QuantDescriptor(num_bits=5, axis=1, narrow_range=True)],
    ids=repr,
)
def test_export_mode_uses_torch_kernels_and_agrees(desc, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5)
    if desc.unsigned:
        x = x.relu()
    tq = TensorQuantizer(desc)
    if desc.amax is None:
        tq.amax = x.abs().amax(dim=tuple(d for d in range(4) if d not in desc.axis), keepdim=True) * 0.9
    ours = tq(x)
    calls = []
    for op in ("fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine"):
        original = getattr(torch, op)
        monkeypatch.setattr(torch, op, lambda *a, _o=original, _n=op, **k: calls.append(_n) or _o(*a, **k))
    tq.export_mode = True
    exported = tq(x)
    expected_op = "fake_quantize_per_tensor_affine" if desc.axis is None else "fake_quantize_per_channel_affine"
    assert calls == [expected_op]
    step = (tq.amax / quant_max(desc.num_bits, desc.unsigned))
    assert float(((ours - exported).abs() / step).max()) <= 1 + 1e-5
    assert float((ours == exported).float().mean()) >= 0.999
    assert "export" in repr(tq)
    assert TensorQuantizer.export_mode is False  # the instance attribute did not change the class default


def test_export_mode_gradient_is_torch_ste():
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True)
    tq = TensorQuantizer(QuantDescriptor(amax=1.0))
    tq.export_mode = True
    tq(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))


# ----------------------------------------------------------------------------- state dict, learn_amax, repr
def test_amax_is_in_the_state_dict_and_round_trips():
    src = TensorQuantizer(QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL)
    assert "_amax" not in src.state_dict()  # unset: nothing to save
    src.amax = torch.linspace(0.1, 1.0, 16).reshape(16, 1, 1, 1)
    state = src.state_dict()
    assert torch.equal(state["_amax"], src.amax)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = TensorQuantizer(QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL)
    fresh.load_state_dict(torch.load(buffer))  # strict, into a quantizer whose amax is still unset
    assert torch.equal(fresh.amax, src.amax)
    x = torch.randn(16, 3, 3, 3)
    assert torch.equal(fresh(x), src(x))
    # inside a module, under its prefix, and moving with .to()
    holder = nn.Sequential(nn.Identity(), fresh)
    assert "1._amax" in holder.state_dict()
    holder.to(torch.float64)
    assert holder[1].amax.dtype == torch.float64


def test_learn_amax_makes_amax_a_parameter_that_trains():
    tq = TensorQuantizer(QuantDescriptor(amax=0.5, learn_amax=True))
    params = dict(tq.named_parameters())
    assert list(params) == ["_amax"] and params["_amax"].requires_grad
    x = torch.linspace(-2, 2, 101)
    optimizer = torch.optim.SGD(tq.parameters(), lr=0.1)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = ((tq(x) - x) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 4 and float(tq.amax.detach()) > 1.0  # amax grew to stop clipping
    state = tq.state_dict()
    fresh = TensorQuantizer(QuantDescriptor(learn_amax=True))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.amax, tq.amax) and isinstance(fresh.amax, nn.Parameter)


def test_repr_shows_bits_axis_and_amax():
    tq = TensorQuantizer(QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL)
    assert "8bit" in repr(tq) and "axis=(0,)" in repr(tq) and "amax=unset" in repr(tq)
    tq.amax = torch.tensor([0.0123, 0.5, 1.2345]).reshape(3, 1, 1, 1)
    assert "amax=[0.0123, 1.2345](3)" in repr(tq)
    assert "amax=1.5000" in repr(TensorQuantizer(QuantDescriptor(amax=1.5, narrow_range=True)))
    assert "narrow" in repr(TensorQuantizer(QuantDescriptor(narrow_range=True)))
    tq.disable()
    assert "disabled" in repr(tq)


def test_export_uint8_shift_gives_the_same_values_on_a_uint8_grid():
    """zero point 128 on [0, 255] is the signed grid [-128, 127] shifted: identical fake-quant values."""
    from fusionlib.quant import QuantDescriptor, TensorQuantizer

    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    q = TensorQuantizer(QuantDescriptor(num_bits=8, amax=2.0))
    q.export_mode = True
    signed = q(x)
    q.export_uint8_shift = True
    shifted = q(x)
    assert torch.equal(signed, shifted)
    assert abs(float(shifted.min()) + 128 * 2.0 / 127) < 1e-6 and float(shifted.max()) == 2.0  # full signed range
    unsigned = TensorQuantizer(QuantDescriptor(num_bits=8, amax=2.0, unsigned=True))
    unsigned.export_mode = True
    unsigned.export_uint8_shift = True  # already unsigned: nothing to shift
    assert float(unsigned(x).min()) == 0.0


# ----------------------------------------------------------------------------- edges
@pytest.mark.parametrize("form", ["list", "flat tensor", "column tensor"])
def test_per_channel_amax_in_every_accepted_form_goes_along_axis(form):
    torch.manual_seed(0)
    w = torch.randn(4, 4)
    rows = w.abs().amax(1)
    amax = {"list": rows.tolist(), "flat tensor": rows, "column tensor": rows.reshape(4, 1)}[form]
    tq = TensorQuantizer(QuantDescriptor(axis=0, amax=amax))
    ref = fake_quantize(w, rows.reshape(4, 1), narrow_range=False)
    assert torch.equal(tq(w), ref)
    assert float((tq(w) - w).abs().max()) <= float(rows.max()) / 127 / 2 * (1 + 1e-6)  # half a step at most
    tq.export_mode = True  # torch's kernel (what ONNX gets) uses the same axis
    assert float((tq(w) - ref).abs().max()) <= float(rows.max()) / 127 * (1 + 1e-6)
    setter = TensorQuantizer(QuantDescriptor(axis=0))
    setter.amax = amax
    assert torch.equal(setter(w), ref)


def test_disabled_switch_and_amax_survive_a_state_dict_round_trip():
    src = TensorQuantizer(QuantDescriptor(amax=2.0))
    src.disable()
    fresh = TensorQuantizer()
    result = fresh.load_state_dict(src.state_dict())
    assert fresh.disabled and float(fresh.amax) == 2.0 and not result.missing_keys
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(fresh(x), x)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 0.0])
def test_a_bad_amax_in_a_state_dict_is_refused_by_name(bad):
    state = TensorQuantizer(QuantDescriptor(amax=2.0)).state_dict()
    state["_amax"] = torch.tensor(bad)
    fresh = TensorQuantizer(QuantDescriptor(amax=1.0))
    with pytest.raises(RuntimeError, match=r"_amax: amax must be positive and finite"):
        fresh.load_state_dict(state)
    assert float(fresh.amax) == 1.0


def test_learned_amax_is_a_parameter_from_construction_so_an_early_optimizer_trains_it():
    tq = TensorQuantizer(QuantDescriptor(learn_amax=True))
    assert tq.amax is None and "_amax" in dict(tq.named_parameters())
    optimizer = torch.optim.SGD(tq.parameters(), lr=0.1)  # built before calibration
    tq.amax = 0.5
    x = torch.linspace(-2, 2, 101)
    for _ in range(5):
        optimizer.zero_grad()
        ((tq(x) - x) ** 2).mean().backward()
        optimizer.step()
    assert float(tq.amax.detach()) > 0.5  # the optimizer's parameter is the quantizer's amax


# ----------------------------------------------------------------------------- pytorch-quantization's behaviour and names
def test_dynamic_amax_is_opt_in_and_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(64)
    with pytest.raises(RuntimeError, match=r"has no amax: calibrate first"):
        TensorQuantizer()(x)  # the default stays: a forgotten calibration is an error
    dynamic = TensorQuantizer(QuantDescriptor(dynamic_amax=True))
    want = torch.fake_quantize_per_tensor_affine(x, float(x.abs().max() / 127), 0, -128, 127)
    assert torch.equal(dynamic(x), want) and dynamic.amax is None  # nothing stored
    w = torch.randn(4, 3, 3, 3)
    per_channel = TensorQuantizer(QuantDescriptor(axis=0, dynamic_amax=True))
    step = w.abs().amax(dim=(1, 2, 3)) / 127
    want = torch.fake_quantize_per_channel_affine(w, step, torch.zeros(4, dtype=torch.int32), 0, -128, 127)
    assert torch.equal(per_channel(w), want)
    assert torch.equal(dynamic(torch.zeros(3)), torch.zeros(3))  # all-zero data quantizes to 0, no NaN
    dynamic.amax = 1.0  # a stored amax wins, as in the original
    assert float(dynamic(torch.tensor([3.0]))) == 1.0
    for bad in (dict(learn_amax=True), dict(amax=1.0)):
        with pytest.raises(ValueError, match=r"dynamic_amax=True takes amax from each tensor"):
            QuantDescriptor(dynamic_amax=True, **bad)


def test_scale_amax_multiplies_amax_where_it_is_used():
    x = torch.linspace(-3, 3, 41)
    q = TensorQuantizer(QuantDescriptor(amax=1.0, scale_amax=2.0))
    assert torch.equal(q(x), fake_quantize(x, 2.0, narrow_range=False)) and float(q.amax) == 1.0
    dynamic = TensorQuantizer(QuantDescriptor(dynamic_amax=True, scale_amax=0.5))
    assert torch.equal(dynamic(x), fake_quantize(x, 1.5, narrow_range=False))
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match=r"scale_amax must be None or a positive finite number"):
            QuantDescriptor(scale_amax=bad)


@pytest.mark.parametrize("desc", [
    QuantDescriptor(),
    QuantDescriptor(num_bits=4, axis=(0, 2), unsigned=True, narrow_range=True, calib_method="max", name="w"),
    QuantDescriptor(axis=0, amax=[0.1, 0.25, 3.0]),
    QuantDescriptor(amax=[[0.5], [1.5]], learn_amax=True, fake_quant=False, scale_amax=1.25),
    QuantDescriptor(calib_method="histogram", dynamic_amax=True),
])
def test_descriptor_yaml_round_trip(desc):
    text = desc.to_yaml()
    assert isinstance(text, str) and QuantDescriptor.from_yaml(text) == desc
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bits'\]"):
        QuantDescriptor.from_yaml(text + "bits: 8\n")


def test_grid_setters_reset_the_calibrator_and_ask_for_calibration():
    q = TensorQuantizer(QuantDescriptor(calib_method="histogram", name="act"))
    q.calibrator = q.new_calibrator(histogram=True, num_bins=64)
    q.calibrator.collect(torch.randn(100))
    q.amax = 2.0
    with pytest.warns(UserWarning, match=r"'act': num_bits=4 changes the grid from \[-128, 127\] to \[-8, 7\].*calibrate again"):
        q.num_bits = 4
    assert (q.num_bits, q.quant_desc.num_bits, q.quant_max) == (4, 4, 7)
    assert q.calibrator.counts is None and q.calibrator.num_bins == 64 and q.calibrator.num_bits == 4
    with pytest.warns(UserWarning, match=r"unsigned=True changes the grid"):
        q.unsigned = True
    assert q.calibrator.unsigned and q.quant_desc.unsigned and q.quant_min == 0
    q.calibrator.collect(torch.rand(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.narrow_range = True  # unsigned: the grid [0, 15] does not change, so no warning
    assert q.calibrator.counts is None and q.quant_desc.narrow_range
    with pytest.raises(ValueError, match=r"num_bits must be an int in 2\.\.16, got 1"):
        q.num_bits = 1
    with pytest.raises(ValueError, match=r"'act': unsigned must be True or False, got 1"):
        q.unsigned = 1
    assert q.num_bits == 4 and q.unsigned is True


def test_load_calib_amax_strict_false_skips_a_calibrator_without_data():
    q = TensorQuantizer(QuantDescriptor(name="spare"))
    with pytest.raises(RuntimeError, match=r"'spare': its calibrator saw no data"):
        q.load_calib_amax()
    with pytest.warns(UserWarning, match=r"saw no data.*amax left as it was"):
        assert q.load_calib_amax(strict=False) is None
    q.amax = 3.0
    with pytest.warns(UserWarning):
        assert float(q.load_calib_amax(strict=False)) == 3.0
