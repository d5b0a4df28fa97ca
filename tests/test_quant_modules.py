"""fusionlib.quant.modules: quant layers are their float parents plus two quantizers, and load float checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fusionlib import data, zoo
from fusionlib.quant import (
    QUANT_DESC_8BIT_PER_TENSOR,
    QUANT_MODULES,
    QuantAdaptiveAvgPool1d,
    QuantAdaptiveAvgPool2d,
    QuantAdaptiveAvgPool3d,
    QuantAvgPool1d,
    QuantAvgPool2d,
    QuantAvgPool3d,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantDescriptor,
    QuantLinear,
    QuantMaxPool1d,
    QuantMaxPool2d,
    QuantMaxPool3d,
    TensorQuantizer,
    calibrate,
    disabled_quantizers,
    enable_quantization,
    fake_quantize,
    quantizers,
)
from fusionlib.verify import compare_outputs

# (quant class, constructor args, constructor kwargs, input shape, weight axis or None)
CASES = [
    (QuantConv1d, (4, 6, 3), dict(stride=2, padding=1, bias=True), (2, 4, 11), 0),
    (QuantConv2d, (4, 6, 3), dict(padding=1, groups=2, bias=False), (2, 4, 9, 9), 0),
    (QuantConv2d, (6, 6, 3), dict(padding="same", groups=6, dilation=2, padding_mode="reflect"), (1, 6, 8, 8), 0),
    (QuantConv3d, (3, 5, (1, 3, 3)), dict(padding=(0, 1, 1)), (1, 3, 4, 6, 6), 0),
    (QuantConvTranspose2d, (4, 6, 3), dict(stride=2, padding=1, output_padding=1, groups=2), (2, 4, 5, 5), 1),
    (QuantLinear, (12, 7), dict(), (3, 5, 12), 0),
    (QuantAvgPool2d, (3,), dict(stride=2, padding=1, ceil_mode=True, count_include_pad=False), (2, 3, 9, 9), None),
    (QuantAdaptiveAvgPool2d, ((2, 3),), dict(), (2, 3, 9, 7), None),
    # pytorch-quantization's other CNN layers
    (QuantConvTranspose1d, (4, 6, 3), dict(stride=2, padding=1, output_padding=1), (2, 4, 7), 1),
    (QuantConvTranspose3d, (3, 4, (1, 3, 3)), dict(stride=(1, 2, 2)), (1, 3, 2, 4, 4), 1),
    (QuantMaxPool1d, (3,), dict(stride=2, padding=1), (2, 3, 11), None),
    (QuantMaxPool2d, (3,), dict(stride=2, padding=1, ceil_mode=True), (2, 3, 9, 9), None),
    (QuantMaxPool3d, (2,), dict(dilation=1), (1, 2, 4, 6, 6), None),
    (QuantAvgPool1d, (3,), dict(stride=2, count_include_pad=False), (2, 3, 11), None),
    (QuantAvgPool3d, (2,), dict(divisor_override=3), (1, 2, 4, 6, 6), None),
    (QuantAdaptiveAvgPool1d, (4,), dict(), (2, 3, 11), None),
    (QuantAdaptiveAvgPool3d, ((1, 2, 3),), dict(), (1, 2, 4, 6, 6), None),
]
IDS = [f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)]


def float_twin(quant_class, args, kwargs):
    """The float module built with the same arguments and the same random initialization."""
    torch.manual_seed(0)
    quant = quant_class(*args, **kwargs)
    torch.manual_seed(0)
    plain = quant_class._float_module(*args, **kwargs)
    return quant, plain


@pytest.mark.parametrize("quant_class, args, kwargs, shape, axis", CASES, ids=IDS)
def test_quant_module_is_its_float_parent_with_quantizers(quant_class, args, kwargs, shape, axis):
    quant, plain = float_twin(quant_class, args, kwargs)
    assert isinstance(quant, quant_class._float_module) and QUANT_MODULES[quant_class._float_module] is quant_class
    assert isinstance(quant.input_quantizer, TensorQuantizer) and quant.input_quantizer.axis is None
    if axis is None:
        assert not hasattr(quant, "weight_quantizer") and quant.quantizer_names == ("input_quantizer",)
    else:
        assert quant.weight_quantizer.axis == (axis,)
    assert quant.extra_repr() == plain.extra_repr()  # same hyperparameters
    # Float state dicts load strictly both ways while nothing is calibrated.
    quant.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(quant.state_dict(), strict=True)
    x = torch.randn(shape)
    with disabled_quantizers(quant):  # quantizers off: the float module, bit for bit
        assert torch.equal(quant(x), plain(x))


@pytest.mark.parametrize("quant_class, args, kwargs, shape, axis", CASES, ids=IDS)
def test_quant_forward_is_the_float_op_on_fake_quantized_tensors(quant_class, args, kwargs, shape, axis):
    quant, plain = float_twin(quant_class, args, kwargs)
    torch.manual_seed(1)
    x = torch.randn(shape)
    quant.input_quantizer.amax = 1.5  # clips some of x: both rounding and clipping are exercised
    reference = copy.deepcopy(plain)
    with torch.no_grad():
        x_hat = fake_quantize(x, 1.5, 8, narrow_range=False)  # descriptors default to narrow_range=False
        if axis is not None:
            w = plain.weight
            dims = [d for d in range(w.dim()) if d != axis]
            amax_w = w.abs().amax(dim=dims, keepdim=True)
            quant.weight_quantizer.amax = amax_w
            reference.weight.copy_(fake_quantize(w, amax_w, 8, narrow_range=False))
        expected = reference(x_hat)
        assert torch.equal(quant(x), expected)
        assert not torch.equal(quant(x), plain(x))  # and quantization did change something


def test_conv_transpose_output_size_is_honoured():
    quant, plain = float_twin(QuantConvTranspose2d, (3, 4, 3), dict(stride=2, padding=1))
    x = torch.randn(1, 3, 5, 5)
    with disabled_quantizers(quant):
        out = quant(x, output_size=[10, 10])
    assert out.shape[-2:] == (10, 10) and torch.equal(out, plain(x, output_size=[10, 10]))


def test_descriptors_come_from_keywords_then_class_defaults():
    six_bit = QuantDescriptor(num_bits=6, axis=0)
    unsigned = QuantDescriptor(num_bits=8, unsigned=True)
    conv = QuantConv2d(2, 3, 1, quant_desc_input=unsigned, quant_desc_weight=six_bit)
    assert conv.input_quantizer.unsigned and conv.weight_quantizer.num_bits == 6
    default = QuantConv2d(2, 3, 1)
    assert default.input_quantizer.num_bits == 8 and not default.input_quantizer.unsigned
    assert default.weight_quantizer.axis == (0,)
    saved = QuantConv2d.default_quant_desc_input
    try:
        QuantConv2d.set_default_quant_desc_input(unsigned)
        assert QuantConv2d(2, 3, 1).input_quantizer.unsigned  # later constructions
        assert not default.input_quantizer.unsigned  # earlier ones keep theirs
        assert not QuantLinear(2, 3).input_quantizer.unsigned  # other classes keep theirs
    finally:
        QuantConv2d.default_quant_desc_input = saved
    assert QuantConv2d.default_quant_desc_input is QUANT_DESC_8BIT_PER_TENSOR


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: QuantConv2d(2, 3, 1, quant_desc_input=8), TypeError, r"quant_desc_input must be a QuantDescriptor, got int"),
    (lambda: QuantLinear(2, 3, quant_desc_weight="per-row"), TypeError, r"quant_desc_weight must be a QuantDescriptor"),
    (lambda: QuantAvgPool2d(2, quant_desc_weight=QUANT_DESC_8BIT_PER_TENSOR), TypeError, r"unexpected keyword"),
    (lambda: QuantConv2d.set_default_quant_desc_weight(None), TypeError, r"must be a QuantDescriptor, got NoneType"),
    (lambda: QuantAvgPool2d.set_default_quant_desc_weight(QUANT_DESC_8BIT_PER_TENSOR), TypeError, r"has no weight"),
    (lambda: QuantConv2d.from_float(nn.Conv1d(2, 3, 1)), TypeError, r"takes an nn.Conv2d, got torch.nn.modules.conv.Conv1d"),
    (lambda: QuantConv2d.from_float(QuantConv2d(2, 3, 1)), TypeError, r"got .*QuantConv2d \(already quantized\)"),
    (lambda: QuantConv2d.from_float(nn.LazyConv2d(3, 1)), TypeError, r"takes an nn.Conv2d"),
])
def test_bad_arguments_are_named(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
    assert QuantConv2d.default_quant_desc_weight.axis == (0,)  # nothing half-set


@pytest.mark.parametrize("quant_class, args, kwargs, shape, axis", CASES, ids=IDS)
def test_from_float_copies_and_leaves_the_float_module_and_rng_alone(quant_class, args, kwargs, shape, axis):
    torch.manual_seed(3)
    plain = quant_class._float_module(*args, **kwargs).eval()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    rng = torch.get_rng_state()
    quant = quant_class.from_float(plain)
    assert torch.equal(torch.get_rng_state(), rng)  # the constructor's random init ran on a forked RNG
    assert type(quant) is quant_class and not quant.training and quant.extra_repr() == plain.extra_repr()
    for key, value in plain.state_dict().items():
        assert torch.equal(quant.state_dict()[key], value) and torch.equal(before[key], value)
    for p_new, p_old in zip(quant.parameters(), plain.parameters()):
        assert p_new.data_ptr() != p_old.data_ptr()  # copies, not shared storage
    x = torch.randn(shape)
    with disabled_quantizers(quant):
        assert torch.equal(quant(x), plain(x))


def test_from_float_takes_descriptors_dtype_and_requires_grad():
    plain = nn.Linear(4, 3).double()
    plain.bias.requires_grad_(False)
    quant = QuantLinear.from_float(plain, quant_desc_weight=QuantDescriptor(num_bits=4, axis=0))
    assert quant.weight.dtype == torch.float64 and quant.weight_quantizer.num_bits == 4
    assert quant.weight.requires_grad and not quant.bias.requires_grad


def calibrated_conv() -> QuantConv2d:
    conv = QuantConv2d(3, 4, 3)
    calibrate(conv, [torch.randn(2, 3, 6, 6)])
    return conv


def test_float_state_dict_loads_strictly_into_a_calibrated_module_and_keeps_amax():
    conv = calibrated_conv()
    amax_in, amax_w = conv.input_quantizer.amax.clone(), conv.weight_quantizer.amax.clone()
    assert {"input_quantizer._amax", "weight_quantizer._amax"} <= set(conv.state_dict())
    plain = nn.Conv2d(3, 4, 3)
    result = conv.load_state_dict(plain.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(conv.weight, plain.weight)
    assert torch.equal(conv.input_quantizer.amax, amax_in) and torch.equal(conv.weight_quantizer.amax, amax_w)


def test_quant_state_dict_round_trip_and_partial_quantizer_keys_are_still_checked():
    conv = calibrated_conv()
    fresh = QuantConv2d(3, 4, 3)
    fresh.load_state_dict(conv.state_dict(), strict=True)  # amax buffers created on load
    assert torch.equal(fresh.weight_quantizer.amax, conv.weight_quantizer.amax)
    partial = {k: v for k, v in conv.state_dict().items() if k != "weight_quantizer._amax"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight_quantizer._amax"'):
        calibrated_conv().load_state_dict(partial, strict=True)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight"'):
        calibrated_conv().load_state_dict({"bias": conv.bias}, strict=True)  # float keys are still required


# ----------------------------------------------------------------------------- a real model on the digits
@pytest.fixture(scope="module")
def resnet18_digits():
    float_model, metrics = zoo.trained_model("resnet18", epochs=3, image_size=32, seed=0, progress=False)
    with enable_quantization():
        quant_model = torchvision.models.resnet18(weights=None, num_classes=10)
    return float_model, quant_model.eval(), metrics


def test_resnet18_built_under_initialize_loads_the_float_checkpoint_and_matches_it(resnet18_digits):
    float_model, quant_model, _ = resnet18_digits
    kinds = {type(m) for m in quant_model.modules()}
    assert {QuantConv2d, QuantLinear, QuantAdaptiveAvgPool2d} <= kinds and nn.Conv2d not in kinds
    quant_model.load_state_dict(float_model.state_dict(), strict=True)
    _, test_loader = data.digits_loaders(batch_size=120, seed=0)
    with disabled_quantizers(quant_model), torch.no_grad():
        for x, _ in test_loader:
            assert torch.equal(quant_model(x), float_model(x))


def test_resnet18_8bit_per_channel_ptq_is_close_to_fp32(resnet18_digits):
    float_model, quant_model, metrics = resnet18_digits
    quant_model.load_state_dict(float_model.state_dict(), strict=True)
    train_loader, test_loader = data.digits_loaders(batch_size=64, seed=0)
    calibrate(quant_model, train_loader, "max", num_batches=8)
    assert all(q.amax is not None and q.quant_enabled and not q.calib_enabled for q in quantizers(quant_model).values())
    assert all(q.axis == (0,) for n, q in quantizers(quant_model).items() if n.endswith("weight_quantizer"))
    agree, total, worst = 0, 0, 0.0
    with torch.no_grad():
        for x, _ in test_loader:
            ref, out = float_model(x), quant_model(x)
            worst = max(worst, compare_outputs(ref, out).max_rel)
            agree += int((ref.argmax(1) == out.argmax(1)).sum())
            total += len(x)
    # Measured: max rel error about 0.01-0.02, top-1 agreement >= 99% (360 test digits).
    assert 0 < worst < 0.05, worst
    assert agree / total >= 0.97, agree / total


def test_quant_layers_refuse_integer_output_descriptors():
    """A layer computing on unscaled integers is wrong by the scales: fake_quant=False is refused everywhere."""
    integers = QuantDescriptor(fake_quant=False)
    calls = [lambda: QuantLinear(3, 2, quant_desc_input=integers),
             lambda: QuantConv2d(3, 2, 1, quant_desc_weight=integers.replace(axis=0)),
             lambda: QuantMaxPool2d(2, quant_desc_input=integers),
             lambda: QuantLinear.from_float(nn.Linear(3, 2), quant_desc_weight=integers),
             lambda: QuantConv2d.set_default_quant_desc_input(integers)]
    for call in calls:
        with pytest.raises(ValueError, match=r"quant_desc_(input|weight).* fake_quant=False: only fake quantization "
                                             r"is supported"):
            call()
    assert QuantConv2d.default_quant_desc_input.fake_quant
    TensorQuantizer(integers)  # a bare quantizer may still output integers
