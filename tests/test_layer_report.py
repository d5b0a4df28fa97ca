"""fusionlib.verify.layer_report: per-layer error of folded, cast and fake-quantized models, overflow, mapping."""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import matplotlib
import pytest
import torch
from torch import nn

from fusionlib import data, fx, models, zoo
from fusionlib import precision as P
from fusionlib.verify import LayerReport, layer_report

matplotlib.use("Agg")

BF16, FP16 = torch.bfloat16, torch.float16
DEPTH = {"resnet18": 21, "mobilenet_v2": 53}

try:  # the quantization toolkit's fake quantizer, where it exists
    from fusionlib.quant import fake_quantize as _library_fake_quantize
except ImportError:  # pragma: no cover - before the toolkit landed
    _library_fake_quantize = None


def fake_quantize_per_channel(w: torch.Tensor, num_bits: int = 8) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization: round(w · q / amax) · amax / q, q = 2^(b-1) − 1."""
    amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12)
    if _library_fake_quantize is not None:
        return _library_fake_quantize(w, amax, num_bits)
    q = 2 ** (num_bits - 1) - 1
    return torch.clamp(torch.round(w * q / amax), -q, q) * amax / q


def fake_quantized(model: nn.Module, num_bits: int = 8) -> nn.Module:
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(fake_quantize_per_channel(m.weight, num_bits))
    return out


def hooks(model: nn.Module) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def trained(request):
    model, _ = zoo.trained_model(request.param, epochs=3, image_size=32, seed=0, progress=False)
    return request.param, model.eval()


@pytest.fixture(scope="module")
def digits():
    return data.digits_tensors()[2][:16]


def batchnorm_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


# ----------------------------------------------------------------------------- folded
def test_folded_model_lists_every_batchnorm_and_agrees_to_fp32_rounding(trained, digits):
    name, model = trained
    folded = fx.fuse_conv_bn(model)
    before_ref, before_cand = hooks(model), hooks(folded)
    report = layer_report(model, folded, digits)
    assert hooks(model) == before_ref and hooks(folded) == before_cand       # hooks removed
    assert isinstance(report, LayerReport)
    assert sorted(report.reference_only) == sorted(batchnorm_names(model))  # listed, not guessed
    assert report.candidate_only == []
    pairs = {p.layer: p.bn for p in folded.fusion_report.fused}
    assert report.mapped == pairs                                             # a folded conv is compared with its BN
    assert {layer.reference for layer in report.layers if layer.name in pairs} == set(pairs.values())
    assert all(layer.finite for layer in report.layers)
    assert max(layer.max_rel for layer in report.layers) < 1e-5                  # fp32 rounding: ~1e-6
    assert min(layer.cosine for layer in report.layers) > 1 - 1e-9
    assert report.output.passed
    assert [layer.depth for layer in report.layers] == list(range(len(report.layers)))
    assert report.first_nonfinite is None


def test_shared_modules_are_compared_call_by_call(digits):
    model, _ = zoo.trained_model("resnet18", epochs=3, image_size=32, seed=0, progress=False)
    report = layer_report(model, P.cast_model(model, BF16), digits)
    names = [layer.name for layer in report.layers]
    assert "layer1.0.relu" in names and "layer1.0.relu [2]" in names           # BasicBlock calls its ReLU twice
    assert names.index("layer1.0.relu") < names.index("layer1.0.relu [2]")


def test_a_candidate_sharing_modules_with_the_reference_is_refused(digits):
    torch.manual_seed(0)
    model = models.build("resnet18").eval()
    for candidate in (P.AutocastModel(model), nn.Sequential(model, nn.Identity()), model):
        with pytest.raises(ValueError, match=r"shares .* module object.* is reference '<root>'.*copy"):
            layer_report(model, candidate, digits, mapping=None)
    partial = P.cast_model(model, BF16)
    partial.layer2 = model.layer2  # one block shared: its layers would read 0.0
    with pytest.raises(ValueError, match=r"candidate 'layer2' is reference 'layer2'"):
        layer_report(model, partial, digits)
    cast = P.cast_model(copy.deepcopy(model), BF16, inplace=True)   # on a copy, inplace is fine
    assert layer_report(model, cast, digits).layers[0].max_rel > 0


@pytest.mark.parametrize("spec", ["autocast_bf16", "autocast_fp16+cl", "autocast_bf16+fold"])
def test_autocast_variants_are_compared_by_the_reference_names(trained, digits, spec):
    name, model = trained
    report = layer_report(model, P.variant(model, spec), digits)   # no mapping
    assert report.candidate_only == [] and len(report.layers) >= DEPTH[name]
    first = "conv1" if name == "resnet18" else "features.0.0"
    assert report.layers[0].name == first
    if "fold" in spec:
        assert sorted(report.reference_only) == sorted(batchnorm_names(model))
    else:
        assert report.reference_only == [] and report.layers[0].reference == first
    assert 0 < report.layers[0].max_rel <= 4 * P.unit_roundoff(BF16 if "bf16" in spec else FP16)


# ----------------------------------------------------------------------------- cast
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_model_error_is_at_the_unit_roundoff_scale(trained, digits, channels_last):
    name, model = trained
    report = layer_report(model, P.cast_model(model, BF16, channels_last), digits)
    u = P.unit_roundoff(BF16)
    assert report.reference_only == [] and report.candidate_only == [] and report.mapped == {}
    assert len(report.layers) >= DEPTH[name]
    rel = [layer.max_rel for layer in report.layers]
    assert all(0 < r <= P.worst_case_relative_error(DEPTH[name], BF16) for r in rel)
    assert report.layers[0].max_rel <= 4 * u                # the first conv: weights and output rounded once
    assert min(layer.cosine for layer in report.layers) > 0.999
    assert report.entry().depth == 0
    assert "Error enters at layer 0" in report.summary()


def test_fold_then_cast_report_lists_the_folded_batchnorms(trained, digits):
    name, model = trained
    report = layer_report(model, P.fold_then_cast(model, BF16), digits)
    assert sorted(report.reference_only) == sorted(batchnorm_names(model))
    assert max(layer.max_rel for layer in report.layers) <= P.worst_case_relative_error(DEPTH[name], BF16)


# ----------------------------------------------------------------------------- fake-quantized
def test_fake_quantized_model_is_an_order_of_magnitude_past_bf16(trained, digits):
    name, model = trained
    quant = layer_report(model, fake_quantized(model, 8), digits)
    bf16 = layer_report(model, P.cast_model(model, BF16), digits)
    assert quant.reference_only == [] and all(layer.finite for layer in quant.layers)
    worst_q, worst_b = quant.worst.max_rel, bf16.worst.max_rel
    assert worst_q > worst_b                     # 8-bit weights: step amax/127 vs bf16's relative 2^-8
    assert quant.layers[0].max_rel <= 1 / 127 * 8  # the first conv: a few weight steps
    assert min(layer.cosine for layer in quant.layers) > 0.99


def test_four_bit_fake_quant_error_grows_with_fewer_bits(digits):
    model, _ = zoo.trained_model("resnet18", epochs=3, image_size=32, seed=0, progress=False)
    eight, four = (layer_report(model, fake_quantized(model, bits), digits) for bits in (8, 4))
    assert four.output.max_rel > eight.output.max_rel
    assert four.layers[0].max_rel > eight.layers[0].max_rel


# ----------------------------------------------------------------------------- fp16 overflow
def overflowing_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3), act=nn.ReLU(), amplify=nn.Conv2d(8, 8, 3), act2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(8, 4))).eval()
    with torch.no_grad():
        model.amplify.weight.mul_(3e5)  # activations ~2e5: fine in fp32 and bf16, past 65504 in fp16
    return model


def test_fp16_overflow_is_detected_and_the_layer_named():
    model = overflowing_model()
    x = torch.rand(2, 3, 12, 12) * 4
    report = layer_report(model, P.cast_model(model, FP16), x)
    bad = report.first_nonfinite
    assert bad is not None and bad.name == "amplify" and bad.kind == "Conv2d" and bad.depth == 2
    assert all(layer.finite for layer in report.layers[:2])
    assert math.isinf(bad.max_rel) or math.isnan(bad.max_rel)
    assert not report.output.passed
    assert "'amplify'" in report.summary() and "65504" in report.summary()
    assert "NO" in report.format()
    with torch.inference_mode():
        assert model.amplify(model.act(model.stem(x))).abs().max() > P.max_finite(FP16)
    bf16 = layer_report(model, P.cast_model(model, BF16), x)   # same exponent range as fp32: no overflow
    assert bf16.first_nonfinite is None and bf16.output.max_rel < P.worst_case_relative_error(4, BF16)


# ----------------------------------------------------------------------------- mapping and unmatched layers
def test_mapping_matches_renamed_layers_and_unmatched_ones_are_listed():
    torch.manual_seed(0)
    reference = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), act=nn.ReLU())).eval()
    renamed = nn.Sequential(OrderedDict(first=nn.Conv2d(3, 4, 3), norm=nn.BatchNorm2d(4), act=nn.ReLU(),
                                        extra=nn.Identity())).eval()
    renamed.load_state_dict({k.replace("conv", "first").replace("bn", "norm"): v
                             for k, v in reference.state_dict().items()})
    x = torch.randn(2, 3, 8, 8)
    unmapped = layer_report(reference, renamed, x)
    assert [layer.name for layer in unmapped.layers] == ["act"]
    assert unmapped.reference_only == ["conv", "bn"] and unmapped.candidate_only == ["first", "norm", "extra"]
    mapped = layer_report(reference, renamed, x, mapping={"first": "conv", "norm": "bn"})
    assert [(layer.name, layer.reference) for layer in mapped.layers] == [("first", "conv"), ("norm", "bn"),
                                                                          ("act", "act")]
    assert all(layer.max_rel == 0.0 and layer.cosine == pytest.approx(1.0) for layer in mapped.layers)
    assert mapped.reference_only == [] and mapped.candidate_only == ["extra"]
    assert "candidate layers without a counterpart (1): extra" in mapped.format()
    assert "All 3 matched layer calls agree exactly" in mapped.summary()


@pytest.mark.parametrize("mapping, error, pattern", [
    ({"first": "nope"}, ValueError, r"mapping\['first'\] = 'nope': the reference has no module named 'nope'"),
    ({"nope": "conv"}, ValueError, r"mapping has key 'nope': the candidate has no module named 'nope'"),
])
def test_bad_mapping_is_rejected(mapping, error, pattern):
    reference = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3)))
    candidate = nn.Sequential(OrderedDict(first=nn.Conv2d(3, 4, 3)))
    with pytest.raises(error, match=pattern):
        layer_report(reference, candidate, torch.randn(1, 3, 5, 5), mapping=mapping)


def test_not_a_module_is_rejected():
    with pytest.raises(TypeError, match=r"candidate must be an nn.Module, got str"):
        layer_report(nn.ReLU(), "model", torch.randn(2))


def test_training_flags_restored_and_inputs_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).train()
    x = torch.randn(2, 3, 6, 6)
    x_before = x.clone()
    report = layer_report(model, P.cast_model(model, BF16), x)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(x, x_before)
    # the in-place ReLU overwrote the BN output after the hook saw it: the saved activation is the BN's own
    bn = next(layer for layer in report.layers if layer.name == "1")
    assert bn.max_rel < 4 * P.unit_roundoff(BF16)


def test_table_and_plot(digits):
    model, _ = zoo.trained_model("mobilenet_v2", epochs=3, image_size=32, seed=0, progress=False)
    report = layer_report(model, P.cast_model(model, BF16), digits)
    text = report.format(max_rows=10)
    assert text.splitlines()[0].split()[:3] == ["depth", "layer", "compared"]
    assert f"of {len(report.layers)} layer calls shown" in text
    assert str(report.worst.depth) in text and "PASS" not in text.splitlines()[0]
    axes = report.plot(label="bf16")
    axes = layer_report(model, fake_quantized(model), digits).plot(axes, label="int8 weights")
    assert len(axes[0].lines) == 2 and axes[0].get_yscale() == "log"
    import matplotlib.pyplot as plt
    plt.close("all")
