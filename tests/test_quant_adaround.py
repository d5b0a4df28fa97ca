"""fusionlib.quant.adaround: learned rounding on the quantizer's grid, frozen amax, bad inputs (notebook 17)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fusionlib.quant import (
    QuantDescriptor,
    calibrate,
    calibrate_weights,
    quant_layers,
    quantize_model,
)
from fusionlib.quant.adaround import (
    FrozenAmaxQuantizer,
    adaround,
    freeze_amax,
    rectified_sigmoid,
    rounding_regularizer,
)
from fusionlib.quant.qat import prepare_qat


def small(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.ReLU(), nn.Conv2d(8, 6, 1), nn.MaxPool2d(1), nn.Flatten(), nn.Linear(6 * 6 * 6, 4)).eval()


def quantized(float_model: nn.Module, bits: int = 4, per_channel: bool = True) -> nn.Module:
    q = quantize_model(float_model, quant_desc_input=QuantDescriptor(num_bits=8),
                       quant_desc_weight=QuantDescriptor(num_bits=bits, axis=0 if per_channel else None))
    calibrate_weights(q, "max", perchannel=per_channel)
    for m in quant_layers(q).values():
        m.input_quantizer.disable()          # weights alone, as the paper rounds before calibrating activations
    return q


BATCHES = [torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def test_the_relaxation_and_its_regularizer():
    v = torch.tensor([-50.0, 0.0, 50.0])
    assert rectified_sigmoid(v).tolist() == [0.0, 0.5, 1.0]    # corners reached at finite V; V = 0 is the fence
    assert float(rounding_regularizer(torch.tensor([0.0, 1.0]), 2.0)) == 0.0
    assert float(rounding_regularizer(torch.tensor([0.5]), 2.0)) == 1.0


@pytest.mark.parametrize("per_channel", [True, False])
def test_weights_end_on_the_grid_the_loss_falls_and_the_amax_is_frozen(per_channel):
    float_model = small()
    q = quantized(float_model, 4, per_channel)
    weighted = {n: m for n, m in quant_layers(q).items() if hasattr(m, "weight_quantizer")}
    amax = {n: m.weight_quantizer.amax.clone() for n, m in weighted.items()}
    nearest = {n: m.weight_quantizer(m.weight).detach().clone() for n, m in weighted.items()}
    report = adaround(q, float_model, BATCHES, num_iterations=80, progress=False)
    weighted = {n: m for n, m in quant_layers(q).items() if hasattr(m, "weight_quantizer")}   # the pool has none
    assert [r.layer for r in report.layers] == list(weighted) and len(weighted) == 4
    for name, m in weighted.items():
        wq = m.weight_quantizer
        assert isinstance(wq, FrozenAmaxQuantizer) and torch.equal(wq.amax, amax[name])
        assert torch.equal(wq(m.weight), m.weight), name                       # exactly on the grid
        step = (amax[name] / wq.quant_max).reshape(-1, *[1] * (m.weight.dim() - 1)) if per_channel else amax[name] / wq.quant_max
        assert float((m.weight - nearest[name]).detach().abs().div(step).max()) <= 1 + 1e-4   # one step from nearest at most
    for row in report.layers:
        assert row.loss_last < row.loss_first, row
    assert sum(r.mse_adaround <= r.mse_nearest * 1.001 for r in report.layers) >= len(report.layers) - 1
    # a later calibration cannot move the grid
    for m in quant_layers(q).values():
        m.input_quantizer.enable()
    calibrate(q, BATCHES)
    calibrate_weights(q, "max", perchannel=per_channel)
    assert all(torch.equal(m.weight_quantizer.amax, amax[n]) for n, m in weighted.items())


def test_zero_iterations_is_nearest_rounding():
    float_model = small(1)
    q = quantized(float_model)
    weighted = {n: m for n, m in quant_layers(q).items() if hasattr(m, "weight_quantizer")}
    nearest = {n: m.weight_quantizer(m.weight).detach().clone() for n, m in weighted.items()}
    adaround(q, float_model, BATCHES, num_iterations=0, progress=False)
    differ = sum(int((m.weight != nearest[n]).sum()) for n, m in weighted.items())
    total = sum(m.weight.numel() for m in weighted.values())
    assert differ <= 1e-3 * total    # V starts at h(V) = the fraction: hard-rounded, that is nearest (ties aside)


def test_freeze_amax_needs_an_amax():
    q = quantize_model(small())
    with pytest.raises(ValueError, match="no amax"):
        freeze_amax(q[0].weight_quantizer)


def test_bad_inputs():
    float_model = small()
    q = quantized(float_model)
    with pytest.raises(ValueError, match="batches is empty"):
        adaround(q, float_model, [], progress=False)
    with pytest.raises(ValueError, match="training mode"):
        adaround(copy.deepcopy(q).train(), float_model, BATCHES, progress=False)
    with pytest.raises(ValueError, match="float_model is in training mode"):
        adaround(q, copy.deepcopy(float_model).train(), BATCHES, progress=False)
    with pytest.raises(ValueError, match=r"num_bits=8.*has 4 bits"):
        adaround(q, float_model, BATCHES, num_bits=8, progress=False)
    with pytest.raises(ValueError, match="num_bits must be an int in 2..16"):
        adaround(q, float_model, BATCHES, num_bits=1, progress=False)
    with pytest.raises(ValueError, match="no amax"):
        adaround(quantize_model(float_model), float_model, BATCHES, progress=False)
    qat = prepare_qat(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval(), BATCHES[0]).eval()
    with pytest.raises(ValueError, match="prepare_qat"):
        adaround(qat, float_model, BATCHES, progress=False)
    with pytest.raises(ValueError, match="float_model has no layer"):
        adaround(q, nn.Sequential(nn.Identity()).eval(), BATCHES, progress=False)


def test_an_8_bit_adaround_model_exports_to_onnx_unchanged(tmp_path):
    pytest.importorskip("onnx", reason="the deploy extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the deploy extra is not installed")  # noqa: F841
    from fusionlib import deploy

    float_model = small(2)
    q = quantized(float_model, 8)
    adaround(q, float_model, BATCHES, num_iterations=20, progress=False)
    for m in quant_layers(q).values():
        m.input_quantizer.enable()
    calibrate(q, BATCHES)
    report = deploy.export_onnx(q, BATCHES[0][:1], tmp_path / "adaround.onnx")
    assert report.qdq_pairs == sum(len(m.quantizer_names) for m in quant_layers(q).values())
    session = deploy.ort_session(report.path)
    with torch.no_grad():
        ours = q(BATCHES[1])
    theirs = session(BATCHES[1])
    assert float((ours - theirs).abs().max() / ours.abs().max()) < 0.05
