"""fusionlib.quant.equalize: cross-layer equalization, high-bias absorption, bias correction (notebook 17)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fusionlib import zoo
from fusionlib.quant import (
    QuantDescriptor,
    calibrate,
    calibrate_weights,
    quant_layers,
    quantize_model,
)
from fusionlib.quant.equalize import (
    absorb_high_bias,
    bias_correction,
    channel_ranges,
    clipped_normal_mean,
    cross_layer_equalization,
    equalize_pair,
    fold_and_swap_relu6,
)
from fusionlib.quant.qat import prepare_qat
from model_fingerprint import assert_unchanged, fingerprint


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


class Chain(nn.Module):
    """conv -> BN -> ReLU6 -> depthwise -> BN -> ReLU -> pointwise -> BN -> mean -> linear, with very uneven channels."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.b1 = nn.BatchNorm2d(8)
        self.r1 = nn.ReLU6()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=bias)
        self.b2 = nn.BatchNorm2d(8)
        self.r2 = nn.ReLU()
        self.c3 = nn.Conv2d(8, 16, 1, bias=bias)
        self.b3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x)))
        x = self.r2(self.b2(self.c2(x)))
        return self.fc(self.b3(self.c3(x)).mean((2, 3)))


def chain(seed: int = 0, bias: bool = False, high_bias: bool = False) -> Chain:
    torch.manual_seed(seed)
    m = Chain(bias)
    with torch.no_grad():
        for bn in (m.b1, m.b2, m.b3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.1, 2)
            bn.bias.uniform_(3, 6) if high_bias else bn.bias.uniform_(-1, 1)
        m.c1.weight.mul_(torch.logspace(-2, 1, 8)[:, None, None, None])
    return m.eval()


# ---------------------------------------------------------------------- one pair
@pytest.mark.parametrize("kind", ["dense", "depthwise->pointwise", "pointwise->depthwise", "linear"])
@pytest.mark.parametrize("bias", [True, False])
def test_equalize_pair_is_exact_and_ranges_meet_at_the_geometric_mean(kind, bias):
    torch.manual_seed(1)
    if kind == "dense":
        first, second = nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.Conv2d(6, 5, 3, padding=1, bias=bias)
    elif kind == "depthwise->pointwise":
        first, second = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=bias), nn.Conv2d(6, 5, 1, bias=bias)
    elif kind == "pointwise->depthwise":
        first, second = nn.Conv2d(3, 6, 1, bias=bias), nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=bias)
    else:
        first, second = nn.Linear(7, 6, bias=bias), nn.Linear(6, 3, bias=bias)
    with torch.no_grad():
        first.weight.mul_(torch.logspace(-2, 1, 6).reshape((-1,) + (1,) * (first.weight.dim() - 1)))
    x = torch.randn(2, 7) if kind == "linear" else torch.randn(2, first.in_channels, 6, 6)
    net = nn.Sequential(first, nn.ReLU(), second).eval()
    before = net(x)
    r1, r2 = channel_ranges(first, second)
    s = equalize_pair(first, second)
    assert _rel(net(x), before) < 1e-5
    a1, a2 = channel_ranges(first, second)
    expected = torch.sqrt(r1.double() * r2.double()).float()
    torch.testing.assert_close(a1, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(a2, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(s, torch.sqrt(r1 / r2), rtol=1e-5, atol=0)


def test_equalize_pair_agrees_with_torch_private_cle_up_to_its_range_definition():
    """torch's channel range is max - min; with every channel symmetric (max = -min) it is twice ours: the same s."""
    from torch.ao.quantization import _equalize

    torch.manual_seed(2)
    ours = [nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 1)]
    with torch.no_grad():  # make each output channel of the first, and each input channel of the second, symmetric
        w1 = torch.randn(4, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 5.0])[:, None, None, None]
        w1[:, :, 0, 0] = -w1.abs().flatten(1).amax(1)[:, None]
        w1[:, :, 0, 1] = w1.abs().flatten(1).amax(1)[:, None]
        ours[0].weight.copy_(w1)
        w2 = torch.randn(5, 4, 1, 1)
        w2[0] = -w2.abs().amax(0)
        w2[1] = w2.abs().amax(0)
        ours[1].weight.copy_(w2)
    theirs = copy.deepcopy(ours)
    equalize_pair(*ours)
    _equalize.cross_layer_equalization(theirs[0], theirs[1])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-5, atol=1e-7)


def test_channels_that_do_not_line_up_are_an_error_naming_both_layers():
    with pytest.raises(ValueError, match=r"convA.*6 output.*convB.*takes 5"):
        equalize_pair(nn.Conv2d(3, 6, 1), nn.Conv2d(5, 2, 1), ("convA", "convB"))


# ---------------------------------------------------------------------- whole models
@pytest.mark.parametrize("bias", [True, False])
def test_cle_on_a_chain_is_exact_against_the_relu_swapped_model_and_leaves_the_input_alone(bias):
    model = chain(bias=bias)
    before = fingerprint(model)
    x = torch.randn(4, 3, 8, 8)
    gm, report = cross_layer_equalization(model, x)
    assert_unchanged(model, before)
    reference, replaced, _ = fold_and_swap_relu6(model)
    assert replaced == ["r1"] and report.relu6_replaced == ["r1"]
    assert _rel(gm(x), reference(x)) < 1e-5
    assert [(p.first, p.second) for p in report.pairs] == [("c1", "c2"), ("c2", "c3")]
    assert report.converged and report.iterations <= 20
    for p in report.pairs:  # every pair meets its geometric mean at convergence
        torch.testing.assert_close(p.ranges_after[0], p.ranges_after[1], rtol=1e-4, atol=0)
    assert {s.layer: s.reason for s in report.skipped}["fc"] == "its output is the model's output"
    assert "mean" in {s.layer: s.reason for s in report.skipped}["c3"]
    assert gm.equalization_report is report
    assert not [n for n, m in gm.named_modules() if m.training]   # eval mode throughout, fx's containers included


def test_cle_with_zero_iterations_only_folds_and_swaps():
    model = chain()
    x = torch.randn(2, 3, 8, 8)
    gm, report = cross_layer_equalization(model, x, max_iterations=0)
    reference, _, _ = fold_and_swap_relu6(model)
    assert torch.equal(gm(x), reference(x)) and report.iterations == 0 and len(report.pairs) == 2


def test_cle_skips_a_residual_add_and_a_non_homogeneous_activation_with_reasons():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Conv2d(4, 4, 1) for _ in range(4))
            self.act = nn.Hardswish()

        def forward(self, x):
            y = self.a(x)
            y = y + self.b(y)
            return self.d(self.act(self.c(y)))

    gm, report = cross_layer_equalization(Residual().eval())
    reasons = {s.layer: s.reason for s in report.skipped}
    assert "residual add" in reasons["a"] and "residual add" in reasons["b"]
    assert "Hardswish is not positively homogeneous" in reasons["c"]
    assert not report.pairs


def test_bad_inputs_training_mode_and_quantized_models():
    with pytest.raises(ValueError, match="training mode"):
        cross_layer_equalization(chain().train())
    with pytest.raises(ValueError, match="float model"):
        cross_layer_equalization(quantize_model(chain()))
    with pytest.raises(ValueError, match="max_iterations"):
        cross_layer_equalization(chain(), max_iterations=-1)


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def trained(request):
    model, _ = zoo.trained_model(request.param, epochs=3, image_size=32, seed=0, progress=False)
    return request.param, model.eval()


def test_cle_is_exact_on_both_trained_models(trained, digits_batch):
    name, model = trained
    gm, report = cross_layer_equalization(model, digits_batch)
    reference, _, _ = fold_and_swap_relu6(model)
    with torch.no_grad():
        assert _rel(gm(digits_batch), reference(digits_batch)) < 1e-5
    assert report.pairs
    if name == "mobilenet_v2":
        assert report.relu6_replaced and any(
            quant_layers(quantize_model(gm))[p.second].groups > 1 for p in report.pairs)  # depthwise pairs found
        reasons = " ".join(s.reason for s in report.skipped)
        assert "residual add" in reasons
    else:
        assert not report.relu6_replaced
        assert any("residual add" in s.reason for s in report.skipped)


# ---------------------------------------------------------------------- absorption
def test_absorb_high_bias_moves_c_and_is_exact_where_preactivations_stay_above_it():
    model = chain(high_bias=True)
    gm, report = cross_layer_equalization(model)
    x = torch.randn(4, 3, 8, 8)
    absorbed, report2 = absorb_high_bias(gm, report, n_sigma=3)
    assert report2.absorbed and not report.absorbed            # a copy of the report was changed
    for first, c in report2.absorbed.items():
        st, st0 = report2.batchnorm[first], report.batchnorm[first]
        torch.testing.assert_close(c, (st0.beta - 3 * st0.gamma.abs()).clamp_min(0))
        torch.testing.assert_close(st.beta, st0.beta - c)
    # exact on the 1x1 pointwise pair (no padding) when every pre-activation sits above c: a huge n_sigma is a no-op
    same, rep = absorb_high_bias(gm, report, n_sigma=1e6)
    assert not rep.absorbed and torch.equal(same(x), gm(x))
    err = _rel(absorbed(x), gm(x))
    assert err < 0.5                                             # measured, not exact (zero padding of the depthwise)


# ---------------------------------------------------------------------- bias correction
@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (1.5, 0.5), (-2.0, 1.0), (3.0, 2.0)])
def test_clipped_normal_mean_matches_monte_carlo(mu, sigma):
    g = torch.Generator().manual_seed(0)
    z = mu + sigma * torch.randn(2_000_000, generator=g, dtype=torch.float64)
    mc = z.clamp_min(0).mean()
    assert abs(float(clipped_normal_mean(torch.tensor(mu), torch.tensor(sigma))) - float(mc)) < 4e-3 * max(1, sigma)
    assert float(clipped_normal_mean(torch.tensor(mu), torch.tensor(0.0))) == max(mu, 0.0)


def _quantized(float_model, bits=4, per_channel=False):
    return quantize_model(float_model, quant_desc_input=QuantDescriptor(num_bits=8),
                          quant_desc_weight=QuantDescriptor(num_bits=bits, axis=0 if per_channel else None))


def test_empirical_bias_correction_removes_the_mean_output_shift_of_a_layer():
    gm, _ = cross_layer_equalization(chain(), max_iterations=0)
    q = _quantized(gm)
    for quantizer in [m.input_quantizer for m in quant_layers(q).values()]:
        quantizer.disable()                                      # the weight error alone
    calibrate_weights(q, "max", perchannel=False)
    x = [torch.randn(16, 3, 8, 8)]
    layer, float_layer = q.c1, gm.c1
    shift = lambda: (layer(x[0]) - float_layer(x[0])).detach().mean((0, 2, 3)).abs().max()  # noqa: E731
    before = float(shift())
    report = bias_correction(q, gm, x)
    assert report.mode == "empirical" and set(report.corrected) == {"c1", "c2", "c3", "fc"}
    assert float(shift()) < 1e-5 < before


def test_analytic_bias_correction_uses_the_folded_batchnorm_and_skips_the_stem():
    gm, _ = cross_layer_equalization(chain(seed=3))
    q = _quantized(gm)
    calibrate(q, [torch.randn(8, 3, 8, 8)])
    before = {n: m.bias.detach().clone() for n, m in quant_layers(q).items() if m.bias is not None}
    report = bias_correction(q, gm)
    assert report.mode == "analytic"
    skipped = {s.layer: s.reason for s in report.skipped}
    assert "model's input" in skipped["c1"] and "fc" in skipped and set(report.corrected) == {"c2", "c3"}
    assert torch.equal(q.c1.bias, before["c1"]) and not torch.equal(q.c2.bias, before["c2"])


def test_analytic_correction_approaches_the_empirical_one_on_gaussian_preactivations():
    """Feed c2 a ReLU of N(beta, gamma^2) per channel, as the analytic rule assumes: both corrections agree."""
    gm, report = cross_layer_equalization(chain(seed=4))
    st = report.batchnorm["c1"]
    z = st.beta[None, :, None, None] + st.gamma.abs()[None, :, None, None] * torch.randn(4000, 8, 10, 10, generator=torch.Generator().manual_seed(0))
    q = _quantized(gm)
    calibrate_weights(q, "max", perchannel=False)
    for m in quant_layers(q).values():
        m.input_quantizer.disable()
    eps = q.c2.weight_quantizer(q.c2.weight) - q.c2.weight
    with torch.no_grad():
        empirical = q.c2._conv_forward(z.clamp_min(0), eps, None)[:, :, 1:-1, 1:-1].mean((0, 2, 3))  # away from padding
    b0 = q.c2.bias.detach().clone()
    bias_correction(q, gm)
    torch.testing.assert_close(b0 - q.c2.bias.detach(), empirical, rtol=0.05, atol=0.02 * float(empirical.abs().max()))


def test_bias_correction_bad_inputs():
    gm, _ = cross_layer_equalization(chain(), max_iterations=0)
    q = _quantized(gm)
    calibrate(q, [torch.randn(2, 3, 8, 8)])
    with pytest.raises(ValueError, match="batches is empty"):
        bias_correction(q, gm, [])
    with pytest.raises(ValueError, match="training mode"):
        bias_correction(copy.deepcopy(q).train(), gm)
    with pytest.raises(ValueError, match="BatchNorm statistics"):
        bias_correction(q, chain())
    uncalibrated = _quantized(gm)
    with pytest.raises(ValueError, match="no amax"):
        bias_correction(uncalibrated, gm, [torch.randn(2, 3, 8, 8)])
    qat = prepare_qat(chain(), torch.randn(2, 3, 8, 8)).eval()
    with pytest.raises(ValueError, match="prepare_qat"):
        bias_correction(qat, gm, [torch.randn(2, 3, 8, 8)])
