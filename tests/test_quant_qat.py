"""QAT Conv+BN (folded fake-quantized weights, batch statistics with the running-statistics correction) and prepare_qat."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionlib import models
from fusionlib.fx import FxTraceError
from fusionlib.quant import QuantDescriptor, calibrate, disabled_quantizers, fake_quantize, quantizers
from fusionlib.quant.qat import (
    ACTIVATION_QUANTIZERS,
    QAT_LAYERS,
    QATConvBn2d,
    export_folded,
    freeze_bn_stats,
    is_avgpool,
    is_tensor_add,
    keeps_grid,
    prepare_qat,
)
from fusionlib.fx.tracing import modules_by_name


def _conv_bn(seed: int = 0, bias: bool = False):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return conv, bn


def _qat(relu=False, bias=False, bits=8):
    conv, bn = _conv_bn(bias=bias)
    m = QATConvBn2d(copy.deepcopy(conv), copy.deepcopy(bn), relu=relu,
                    quant_desc_weight=QuantDescriptor(num_bits=bits, axis=0))
    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        m.weight_quantizer.amax = (conv.weight * s.reshape(-1, 1, 1, 1)).abs().amax(dim=(1, 2, 3), keepdim=True)
    return conv, bn, m


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_train_forward_matches_the_corrected_formula(relu, bias):
    conv, bn, m = _qat(relu=relu, bias=bias)
    x = torch.randn(5, 4, 8, 8)
    m.train()
    out = m(x)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    wq = fake_quantize(conv.weight * s.reshape(-1, 1, 1, 1), m.weight_quantizer.amax, 8, narrow_range=False)
    z = F.conv2d(x, wq, None, 1, 1)                            # conv(x, fq(W s))
    y_conv = z / s.reshape(1, -1, 1, 1) + (conv.bias.reshape(1, -1, 1, 1) if bias else 0)
    mu = y_conv.mean(dim=(0, 2, 3))
    var = y_conv.var(dim=(0, 2, 3), unbiased=False)
    sigma_b = torch.sqrt(var + bn.eps)
    ref = bn.weight.reshape(1, -1, 1, 1) * (y_conv - mu.reshape(1, -1, 1, 1)) / sigma_b.reshape(1, -1, 1, 1) \
        + bn.bias.reshape(1, -1, 1, 1)
    if relu:
        ref = F.relu(ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # running statistics updated from the batch, as BatchNorm does
    n = y_conv.numel() / y_conv.shape[1]
    expect_mean = 0.9 * bn.running_mean + 0.1 * mu
    expect_var = 0.9 * bn.running_var + 0.1 * var * n / (n - 1)
    torch.testing.assert_close(m.bn.running_mean, expect_mean.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.bn.running_var, expect_var.detach(), atol=1e-6, rtol=1e-5)


def test_correction_form_equals_batchnorm_form():
    """conv(x, fq(W s)) · σ_run/σ_B + β − γ μ_B/σ_B  ==  the forward (no conv bias)."""
    conv, bn, m = _qat()
    x = torch.randn(4, 4, 8, 8)
    wq = m.quantized_weight().detach()  # before the forward updates the running statistics
    out = m.train()(x)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    z = F.conv2d(x, wq, None, 1, 1)
    y_conv = z / s.reshape(1, -1, 1, 1)
    mu, var = y_conv.mean(dim=(0, 2, 3)), y_conv.var(dim=(0, 2, 3), unbiased=False)
    sigma_b, sigma_run = torch.sqrt(var + bn.eps), torch.sqrt(bn.running_var + bn.eps)
    ref = z * (sigma_run / sigma_b).reshape(1, -1, 1, 1) + (bn.bias - bn.weight * mu / sigma_b).reshape(1, -1, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
def test_eval_mode_is_exactly_the_folded_deployed_conv(relu):
    _, _, m = _qat(relu=relu, bias=True)
    x = torch.randn(3, 4, 8, 8)
    m.eval()
    folded = m.folded()
    ref = folded(x)
    torch.testing.assert_close(m(x), F.relu(ref) if relu else ref, atol=0, rtol=0)
    # the deployed weight is on the per-channel grid: W'/step is an integer
    step = m.weight_quantizer.amax / 127
    ints = folded.weight / step
    torch.testing.assert_close(ints, ints.round(), atol=1e-3, rtol=0)


def test_freeze_bn_stats_uses_and_keeps_the_running_statistics():
    _, _, m = _qat()
    x = torch.randn(4, 4, 8, 8)
    before = (m.bn.running_mean.clone(), m.bn.running_var.clone())
    m.freeze_bn_stats()
    m.train()
    out = m(x)
    torch.testing.assert_close(m.bn.running_mean, before[0], atol=0, rtol=0)
    torch.testing.assert_close(m.bn.running_var, before[1], atol=0, rtol=0)
    torch.testing.assert_close(out, m.eval()(x), atol=0, rtol=0)
    m.unfreeze_bn_stats().train()
    m(x)
    assert not torch.equal(m.bn.running_mean, before[0])


def test_gradients_reach_weight_gamma_beta_and_bias():
    _, _, m = _qat(bias=True)
    m.train()
    x = torch.randn(4, 4, 8, 8, requires_grad=True)
    (m(x) ** 2).sum().backward()
    for name, p in [("weight", m.conv.weight), ("bias", m.conv.bias), ("gamma", m.bn.weight), ("beta", m.bn.bias), ("x", x)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_weights_outside_amax_get_no_gradient():
    _, _, m = _qat()
    with torch.no_grad():
        m.weight_quantizer.amax = m.weight_quantizer.amax * 0.3  # clip most weights
    m.train()
    (m(torch.randn(2, 4, 8, 8)) ** 2).sum().backward()
    s = m.scale_factor().detach().reshape(-1, 1, 1, 1)
    clipped = (m.conv.weight.detach() * s).abs() > m.weight_quantizer.amax
    assert clipped.any()
    assert torch.all(m.conv.weight.grad[clipped] == 0)


BAD_MODULES = [
    (lambda: QATConvBn2d(nn.Linear(2, 2), nn.BatchNorm2d(2)), TypeError, "nn.Conv2d"),
    (lambda: QATConvBn2d(nn.Conv2d(2, 3, 1), nn.BatchNorm1d(3)), TypeError, "BatchNorm2d"),
    (lambda: QATConvBn2d(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(4)), ValueError, "4 features"),
    (lambda: QATConvBn2d(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, affine=False)), ValueError, "affine"),
    (lambda: QATConvBn2d(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), quant_desc_weight="8bit"), TypeError, "QuantDescriptor"),
]


@pytest.mark.parametrize("make, error, match", BAD_MODULES)
def test_bad_qat_module_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---------------------------------------------------------------------- prepare_qat on real models
def _fingerprint(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _reaches_quantizer(node, modules):
    while True:
        if node.op == "call_module" and node.target.startswith(ACTIVATION_QUANTIZERS + "."):
            return True
        if not (keeps_grid(node, modules) or is_avgpool(node, modules)):
            return False
        node = node.args[0]


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def prepared(request):
    torch.manual_seed(0)
    model = models.build(request.param, num_classes=10, small_input=True).eval()
    before = _fingerprint(model)
    x = torch.randn(4, 3, 32, 32)
    gm = prepare_qat(model, x)
    return request.param, model, before, gm, x


def test_prepare_qat_fuses_every_conv_bn_and_leaves_no_batchnorm(prepared):
    name, model, _, gm, _ = prepared
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    report = gm.qat_report
    assert len(report.fused) == n_bn
    modules = modules_by_name(gm)
    assert not any(n.op == "call_module" and isinstance(modules[n.target], nn.BatchNorm2d) for n in gm.graph.nodes)
    assert not [s for s in report.skipped if "BatchNorm" in s[1]]
    if name == "resnet18":
        assert sum(r is not None for *_, r in report.fused) > 0  # Conv+BN+ReLU chains


def test_prepare_qat_quantizes_every_conv_linear_and_add_input(prepared):
    _, _, _, gm, _ = prepared
    modules = modules_by_name(gm)
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], QAT_LAYERS)]
    adds = [n for n in gm.graph.nodes if is_tensor_add(n)]
    assert layers and adds
    for n in layers:
        assert _reaches_quantizer(n.args[0], modules), n.name
    for n in adds:
        assert all(_reaches_quantizer(a, modules) for a in n.args[:2]), n.name
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in gm.modules() if not isinstance(m, QATConvBn2d)
                   and m not in [c.conv for c in gm.modules() if isinstance(c, QATConvBn2d)])


def test_prepare_qat_leaves_the_float_model_alone_and_matches_it_without_quantizers(prepared):
    _, model, before, gm, x = prepared
    after = _fingerprint(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    from fusionlib.quant import disabled_quantizers
    with torch.no_grad(), disabled_quantizers(gm):
        torch.testing.assert_close(gm.eval()(x), model(x), atol=1e-4, rtol=1e-4)


def test_calibrated_qat_model_is_close_to_float_and_trains(prepared):
    _, model, _, gm, x = prepared
    gm = copy.deepcopy(gm)
    calibrate(gm, [x, torch.randn(4, 3, 32, 32)])
    assert all(q.amax is not None for q in quantizers(gm).values())
    with torch.no_grad():
        ref, out = model(x), gm.eval()(x)
    assert (out - ref).abs().max() <= 0.2 * ref.abs().max() + 1e-6
    gm.train()
    loss = F.cross_entropy(gm(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in gm.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert freeze_bn_stats(gm) == sum(isinstance(m, QATConvBn2d) for m in gm.modules()) > 0


def test_export_folded_equals_the_qat_model_in_eval_mode(prepared):
    _, _, _, gm, x = prepared
    gm = copy.deepcopy(gm)
    calibrate(gm, [x])
    folded = export_folded(gm)
    assert not any(isinstance(m, (nn.BatchNorm2d,) + QAT_LAYERS) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), gm.eval()(x), atol=0, rtol=0)  # the same ops on the same weights
    plain = export_folded(gm, keep_activation_quantizers=False)
    assert not quantizers(plain)


def test_four_bit_weights():
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=10, small_input=True).eval()
    gm = prepare_qat(model, quant_desc_weight=QuantDescriptor(num_bits=4, axis=0))
    calibrate(gm, [torch.randn(2, 3, 32, 32)])
    layer = next(m for m in gm.modules() if isinstance(m, QATConvBn2d))
    w = layer.quantized_weight()
    step = layer.weight_quantizer.amax / 7
    assert int((w / step).round().unique().numel()) <= 16


def test_untraceable_model_gives_the_fx_trace_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return x

    with pytest.raises(FxTraceError, match="ways out"):
        prepare_qat(Branchy())


def test_op_without_kernel_is_reported_and_its_output_quantized():
    class WithSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)))

    gm = prepare_qat(WithSigmoid())
    assert any("sigmoid" in node for node, _ in gm.qat_report.skipped)
    modules = modules_by_name(gm)
    b = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "b")
    assert _reaches_quantizer(b.args[0], modules)


BAD_PREPARE = [
    (lambda: prepare_qat("resnet18"), TypeError, "nn.Module"),
    (lambda: prepare_qat(nn.Conv2d(3, 3, 1), quant_desc_weight=8), TypeError, "quant_desc_weight"),
    (lambda: prepare_qat(nn.Conv2d(3, 3, 1), quant_desc_input=QuantDescriptor(axis=0)), ValueError, "per tensor"),
    (lambda: prepare_qat(nn.Conv2d(3, 3, 1), quant_desc_weight=QuantDescriptor(axis=1)), ValueError, "axis=0"),
    (lambda: prepare_qat(prepare_qat(nn.Sequential(nn.Conv2d(3, 3, 1)))), ValueError, "already"),
]


@pytest.mark.parametrize("call, error, match", BAD_PREPARE)
def test_bad_prepare_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_qat_run_without_epochs_is_the_calibrated_ptq_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    from fusionlib import zoo
    monkeypatch.setattr(zoo, "trained_model", _cached_fp32)
    gm, metrics = zoo.trained_model("resnet18", "qat", epochs=0, progress=False)
    assert metrics["ptq_accuracy"] == metrics["test_accuracy"] and not metrics["cached"]
    again, metrics2 = zoo.trained_model("resnet18", "qat", epochs=0, progress=False)
    assert metrics2["cached"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), gm(x))
    with pytest.raises(ValueError, match="freeze_bn_epoch"):
        zoo.trained_model("resnet18", "qat", epochs=1, freeze_bn_epoch=-1, progress=False)


def _cached_fp32(name, technique="plain", **kwargs):
    """The plain model from the real cache (the test's FUSIONLIB_CACHE only holds the QAT entries); QAT as it is."""
    import os
    if technique != "plain":
        return _ORIGINAL_TRAINED_MODEL(name, technique, **kwargs)
    saved = os.environ.pop("FUSIONLIB_CACHE")
    try:
        return _ORIGINAL_TRAINED_MODEL(name, **kwargs)
    finally:
        os.environ["FUSIONLIB_CACHE"] = saved


from fusionlib.zoo import trained_model as _ORIGINAL_TRAINED_MODEL  # noqa: E402


# ----------------------------------------------------------------------------- edges (issue: no silent wrong answers)
class _SmallNet(nn.Module):
    """conv-bn-relu, a residual add, a functional dropout, a linear head: the edges prepare_qat meets."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        y = y + self.conv2(y)
        y = F.dropout(self.pool(y).flatten(1), 0.5, self.training)
        return self.fc(y)


def test_functional_dropout_in_a_train_mode_model_is_traced_inactive_and_named():
    torch.manual_seed(0)
    model = _SmallNet().train()
    with pytest.warns(UserWarning, match=r"functional dropout at \['dropout'\]"):
        gm = prepare_qat(model)
    assert gm.training and any(node == "dropout" for node, _ in gm.qat_report.skipped)
    calibrate(gm, [torch.randn(8, 3, 8, 8)])
    x = torch.randn(4, 3, 8, 8)
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))  # nothing dropped in eval mode
        with disabled_quantizers(gm):
            torch.testing.assert_close(gm(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    from fusionlib.quant.int8 import convert_int8

    convert_int8(gm, x)  # no bernoulli_ on quantized tensors


def test_model_input_has_its_own_descriptor_and_other_activations_stay_signed():
    torch.manual_seed(0)
    model = _SmallNet().eval()
    with pytest.raises(ValueError, match="quant_desc_input must be signed.*quant_desc_model_input"):
        prepare_qat(model, quant_desc_input=QuantDescriptor(unsigned=True))
    gm = prepare_qat(model, quant_desc_model_input=QuantDescriptor(unsigned=True))
    named = quantizers(gm)
    assert named[f"{ACTIVATION_QUANTIZERS}.x"].unsigned
    assert named[f"{ACTIVATION_QUANTIZERS}.conv"].unsigned  # after the fused ReLU
    assert not named[f"{ACTIVATION_QUANTIZERS}.add"].unsigned and not named[f"{ACTIVATION_QUANTIZERS}.fc"].unsigned
    x = torch.rand(16, 3, 8, 8)
    calibrate(gm, [x])
    with torch.no_grad():
        logits, reference = gm(x), model(x)
    assert float(reference.min()) < 0 and float(logits.min()) < 0  # logits below 0 survive


def test_zero_gamma_channel_gives_finite_outputs_and_running_statistics():
    conv, bn, m = _qat()
    with torch.no_grad():
        m.bn.weight[2] = 0.0  # a pruned channel
    m.weight_quantizer.amax = (conv.weight * m.scale_factor().reshape(-1, 1, 1, 1)).abs().amax(
        dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    x = torch.randn(5, 4, 8, 8)
    out = m.train()(x)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(m.bn.running_mean).all())
    assert bool(torch.isfinite(m.bn.running_var).all())
    torch.testing.assert_close(out[:, 2], torch.full_like(out[:, 2], float(m.bn.bias[2])))  # γ = 0: y = β
    # the pruned channel's running statistics are those of the float conv output, as BatchNorm would keep
    y = F.conv2d(x, conv.weight, None, 1, 1)[:, 2]
    expect_mean = 0.9 * bn.running_mean[2] + 0.1 * y.mean()
    torch.testing.assert_close(m.bn.running_mean[2], expect_mean.detach(), rtol=1e-5, atol=1e-6)


def test_freeze_bn_survives_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = _SmallNet().eval()
    gm = prepare_qat(model)
    calibrate(gm, [torch.randn(8, 3, 8, 8)])
    assert freeze_bn_stats(gm) == 1
    fresh = prepare_qat(model)
    result = fresh.load_state_dict(gm.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.conv.freeze_bn
    x = torch.randn(4, 3, 8, 8)
    gm.train(), fresh.train()
    with torch.no_grad():
        assert torch.equal(gm(x), fresh(x))  # train mode with running statistics in both


def test_prepare_qat_moves_hooks_by_the_policy():
    torch.manual_seed(0)
    model = _SmallNet().eval()
    calls = []
    model.conv.register_forward_pre_hook(lambda m, a: calls.append("conv pre"))
    model.relu.register_forward_hook(lambda m, a, out: calls.append(("relu out", float(out.min()))))
    model.fc.register_forward_hook(lambda m, a, out: calls.append("fc out"))

    def inspect_bn(m, a, out):
        calls.append("bn")

    model.bn.register_forward_hook(inspect_bn)
    with pytest.warns(UserWarning, match=r"inspect_bn.*'bn' \(BatchNorm2d\) is dropped"):
        gm = prepare_qat(model)
    with torch.no_grad(), disabled_quantizers(gm):
        gm(torch.randn(2, 3, 8, 8))
    assert calls == ["conv pre", ("relu out", 0.0), "fc out"]  # the fused layer's output is the ReLU's


def test_old_descriptor_names_are_a_clear_error():
    with pytest.raises(TypeError, match="quant_desc_weight, quant_desc_input and quant_desc_model_input"):
        prepare_qat(nn.Conv2d(3, 3, 1), weight_desc=QuantDescriptor())


# ---------------------------------------------------------------------- zoo: the QAT run's cache key and descriptors
def test_qat_run_weight_granularity_and_activation_bits_key_and_build():
    """Defaults keep the key they had before the two options; each option changes the key and the quantizers."""
    from fusionlib import zoo
    from fusionlib.quant import TensorQuantizer

    base = dict(name="resnet18", weight_bits=4, epochs=1, lr=0.005, freeze_bn_epoch=None, calib_batches=4,
                learn_amax=False, seed=0, fp32_epochs=3, image_size=32)
    legacy_key = zoo.cache_key({**base, "weight_bits": 4, "qat_version": zoo.QAT_CACHE_VERSION})
    default = zoo.qat_run(**base, progress=False)
    assert default.path.name == f"qat-resnet18-{legacy_key}.pt"
    per_tensor = zoo.qat_run(**base, weight_per_channel=False, progress=False)
    act4 = zoo.qat_run(**base, activation_bits=4, progress=False)
    assert len({default.path, per_tensor.path, act4.path}) == 3

    def descriptors(run):
        gm = run.fresh_model()
        weights = {q.axis for n, q in gm.named_modules() if isinstance(q, TensorQuantizer) and n.endswith("weight_quantizer")}
        acts = {q.num_bits for n, q in gm.named_modules() if isinstance(q, TensorQuantizer) and "act_quant" in n}
        return weights, acts

    assert descriptors(default) == ({(0,)}, {8})
    assert descriptors(per_tensor) == ({None}, {8})
    assert descriptors(act4)[1] == {4}
