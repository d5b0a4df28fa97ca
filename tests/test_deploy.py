"""fusionlib.deploy: ONNX export of every kind of course model, ONNX Runtime parity, Q/DQ graphs, bad inputs."""
from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm_stats import randomize_batchnorm
from model_fingerprint import assert_unchanged, fingerprint
from fusionlib import deploy, lora, models, reparam
from fusionlib.fx import fuse_conv_bn, optimize_for_inference
from fusionlib.quant import QuantDescriptor, TensorQuantizer, calibrate, calibrate_weights, quantize_model, quantizers
from fusionlib.quant.ptq import weight_quantizer_ids
from fusionlib.quant import qat
from fusionlib.quant.qat import prepare_qat
from fusionlib.verify import compare_outputs

onnx = pytest.importorskip("onnx", reason="the deploy extra is not installed")
pytest.importorskip("onnxruntime", reason="the deploy extra is not installed")

MODELS = ["resnet18", "mobilenet_v2"]
#: fp32 ONNX Runtime vs PyTorch: the issue's bound (measured 3e-7 - 7e-7 on these models)
FP32_RTOL = 1e-4


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(models.build(name), seed=seed).eval()


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    from fusionlib import data

    return data.digits_tensors()[2][:64]


@pytest.mark.parametrize("name", MODELS)
def test_fp32_eager_folded_and_optimized_match_pytorch(name, digits, photo_batch, tmp_path):
    model = _model(name)
    variants = {"eager": (model, False), "eager, BatchNormalization kept": (model, True),
                "folded": (fuse_conv_bn(model), False), "optimize_for_inference": (optimize_for_inference(model), False)}
    for label, (variant, keep_bn) in variants.items():
        report = deploy.export_onnx(variant, digits[:1], tmp_path / f"{label}.onnx", keep_batchnorm=keep_bn,
                                    dynamic_image_size=True)
        session = deploy.ort_session(report.path)
        for x in (digits, photo_batch):  # dynamic batch; the digits models take any image size
            result = compare_outputs(_run(model, x), session(x), rtol=FP32_RTOL, name=f"{name} {label}")
            assert result.passed, result
        bn_nodes = report.op_counts.get("BatchNormalization", 0)
        assert bn_nodes == (sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) if keep_bn else 0), label
        assert report.opset == deploy.OPSET and "dynamo=False" in report.exporter
        assert report.op_counts["Conv"] == sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_export_leaves_the_model_unchanged_and_writes_nothing_on_failure(digits, tmp_path):
    model = quantize_model(fuse_conv_bn(_model("resnet18")))
    calibrate(model, [digits[:16]])
    before = fingerprint(model)
    out_before = _run(model, digits[:8])
    deploy.export_onnx(model, digits[:1], tmp_path / "q.onnx")
    assert_unchanged(model, before)
    assert all("export_mode" not in q.__dict__ and not q.export_mode for q in quantizers(model).values())
    assert torch.equal(_run(model, digits[:8]), out_before)
    next(iter(quantizers(model).values())).disable_calib()
    model.layer1.train()
    with pytest.raises(ValueError, match=r"training mode: layer1"):
        deploy.export_onnx(model, digits[:1], tmp_path / "t.onnx")
    assert not (tmp_path / "t.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]  # no temporary file left behind


def test_reparameterized_and_lora_merged_models_export(digits, tmp_path):
    rep = randomize_batchnorm(models.rep_resnet18(), seed=1).eval()
    deployed = reparam.reparameterize_model(rep)
    session = deploy.ort_session(deploy.export_onnx(deployed, digits[:1], tmp_path / "rep.onnx").path)
    result = compare_outputs(_run(rep, digits), session(digits), rtol=FP32_RTOL)
    assert result.passed, result

    base = _model("mobilenet_v2")
    adapted = lora.inject_lora(base, lora.dense_layer_names(base)[:4], r=4, alpha=8)
    with torch.no_grad():
        for m in adapted.modules():
            if isinstance(m, (lora.LoRALinear, lora.LoRAConv2d)):
                m.lora_B.normal_(0, 0.05)  # a trained-looking, non-zero update
    merged = lora.merge_and_unload(adapted.eval())
    session = deploy.ort_session(deploy.export_onnx(merged, digits[:1], tmp_path / "lora.onnx").path)
    result = compare_outputs(_run(adapted, digits), session(digits), rtol=FP32_RTOL)
    assert result.passed, result


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("weights", ["per_tensor", "per_channel"])
def test_qdq_export_matches_fake_quant_model(name, weights, digits, tmp_path):
    weight_desc = QuantDescriptor(num_bits=8, axis=None if weights == "per_tensor" else 0)
    model = quantize_model(fuse_conv_bn(_model(name)), quant_desc_weight=weight_desc)
    calibrate(model, [digits[:32], digits[32:]])
    report = deploy.export_onnx(model, digits[:1], tmp_path / "q.onnx")
    assert len(report.quantizers) == len(quantizers(model))
    # one Q/DQ pair per quantizer (weights and inputs); the exporter may not merge or drop any
    assert report.qdq_pairs == len(quantizers(model)), report

    proto = onnx.load(str(report.path))
    values = deploy.constant_values(proto)
    scales = []
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = values[node.input[2]]
            assert not zero_point.any(), "symmetric: zero point 0"
            assert zero_point.dtype == np.int8  # signed quantizers throughout quantize_model's defaults
            scales.append(values[node.input[1]])
    per_channel = [s for s in scales if s.size > 1]
    assert len(per_channel) == (len(weight_quantizer_ids(model)) if weights == "per_channel" else 0)
    # scale = amax / qmax, quantizer by quantizer (same multiset of values)
    expected = sorted(float(s) for q in quantizers(model).values() for s in (q.amax / q.quant_max).flatten())
    got = sorted(float(s) for s in np.concatenate([np.atleast_1d(s) for s in scales]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)

    session = deploy.ort_session(report.path)
    reference = _run(model, digits)
    ours = session(digits)
    agreement = float((reference.argmax(1) == ours.argmax(1)).float().mean())
    assert agreement >= 0.99, agreement  # the bound: top-1 agreement >= 99%
    # Same arithmetic; the differences are rounding flips: ONNX divides by the scale where torch multiplies by its
    # reciprocal, so a value within an ulp of a tie can land one step apart, and a flip moves every later layer.
    # Measured (random-init models, 64 digits): max rel error 0.002 - 0.036; layer by layer the graphs agree to 1e-6
    # (test_qdq_export_of_unsigned_and_per_channel_axes).
    result = compare_outputs(reference, ours, rtol=0.1, name=f"{name} {weights}: ONNX Runtime int8 vs fake quant")
    assert result.passed, result


def test_qdq_export_of_unsigned_and_per_channel_axes(tmp_path):
    layer = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    model = quantize_model(layer, quant_desc_weight=QuantDescriptor(num_bits=8, axis=0))
    model[3].input_quantizer = TensorQuantizer(QuantDescriptor(num_bits=8, unsigned=True))
    x = torch.randn(16, 3, 8, 8)
    calibrate(model, [x])
    report = deploy.export_onnx(model, x[:1], tmp_path / "small.onnx")
    proto = onnx.load(str(report.path))
    values = deploy.constant_values(proto)
    zps = {n.name: values[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert sorted(str(z.dtype) for z in zps.values()) == ["int8", "int8", "int8", "uint8"]
    axes = sorted(a.i for n in proto.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis")
    assert axes == [0, 0]  # conv weight [C_out, ...] and linear weight [out, in] quantized per row
    with deploy._export_mode(model):
        torch_qdq = _run(model, x)  # torch's own Q/DQ kernels: the arithmetic the ONNX graph must reproduce exactly
    reference_qdq = deploy.ort_session(report.path, optimization="disable")(x)  # ONNX's Q/DQ operators as defined
    assert float((reference_qdq - torch_qdq).abs().max()) <= 1e-5 * float(torch_qdq.abs().max())
    session = deploy.ort_session(report.path)
    reference = _run(model, x)
    step = float(model[3].input_quantizer.amax) / 255 * float(model[3].weight.detach().abs().sum(1).max())
    assert float((session(x) - reference).abs().max()) <= 2 * step  # one activation step through the linear, at most


def test_optimized_graph_shows_folding_fusion_and_int8_kernels(digits, tmp_path):
    model = _model("resnet18")
    kept = deploy.export_onnx(model, digits[:1], tmp_path / "bn.onnx", keep_batchnorm=True)
    optimized = deploy.op_counts(deploy.optimized_graph(kept.path))
    assert kept.op_counts["BatchNormalization"] == 20 and "BatchNormalization" not in optimized
    assert "Relu" not in optimized  # fused into the convolutions
    assert sum(n for op, n in optimized.items() if op.endswith("Conv")) == 20

    q = quantize_model(model)
    calibrate(q, [digits[:16]])
    with pytest.warns(UserWarning, match="20 BatchNorm layer.*bn1.*Fold first"):
        unfolded = deploy.export_onnx(q, digits[:1], tmp_path / "unfolded.onnx")
    assert unfolded.op_counts["BatchNormalization"] == 20  # the exporter cannot fold into a quantized weight
    # prepare_qat folds each Conv+BN and quantizes a ReLU's output unsigned, the graph ONNX Runtime's int8 kernels take
    q = prepare_qat(model, digits[:4])
    calibrate(q, [digits[:16]])
    qdq = deploy.export_onnx(q.eval(), digits[:1], tmp_path / "q.onnx")
    int8_ops = deploy.op_counts(deploy.optimized_graph(qdq.path, tmp_path / "q_opt.onnx", optimization="extended"))
    assert int8_ops.get("com.microsoft.QLinearConv", 0) + int8_ops.get("QLinearConv", 0) == 20, int8_ops
    assert "Conv" not in int8_ops and "BatchNormalization" not in qdq.op_counts
    header, rows = deploy.op_count_table({"exported": qdq.op_counts, "optimized": int8_ops})
    assert header == ["op type", "exported", "optimized"] and rows[-1][0] == "total"
    assert rows[-1][1] == sum(qdq.op_counts.values())


def test_ort_module_works_with_bench_and_deepcopy(digits, tmp_path):
    from fusionlib import bench

    model = _model("mobilenet_v2")
    session = deploy.ort_session(deploy.export_onnx(model, digits[:1], tmp_path / "m.onnx").path, threads=1)
    clone = copy.deepcopy(session)
    assert clone.session is not session.session and torch.equal(clone(digits[:4]), session(digits[:4]))
    table = bench.compare_models_latency({"torch": model, "ort": session}, digits[:2], warmup=1, repeats=2)
    assert [row.name for row in table.rows] == ["torch", "ort"]
    with pytest.raises(ValueError, match="takes 1 input"):
        session(digits, digits)
    with pytest.raises(ValueError, match="optimization must be one of"):
        deploy.ort_session(session.path, optimization="fast")
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        deploy.ort_session(tmp_path / "missing.onnx")


# ---------------------------------------------------------------------- bad input
class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.special.erfcx(self.conv(x))


def test_unsupported_op_names_the_op_and_the_module(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(_Odd())).eval()
    with pytest.raises(deploy.ONNXExportError, match=r"'aten::special_erfcx' in 1\.0 \(_Odd\)"):
        deploy.export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "odd.onnx")
    assert list(tmp_path.iterdir()) == []


def test_quantizer_problems_are_named_before_anything_is_written(digits, tmp_path):
    model = quantize_model(fuse_conv_bn(_model("resnet18")))
    with pytest.raises(ValueError, match=r"no amax \(calibrate first\): conv1.input_quantizer, conv1.weight_quantizer"):
        deploy.export_onnx(model, digits[:1], tmp_path / "x.onnx")
    calibrate(model, [digits[:16]])
    model.fc.input_quantizer = TensorQuantizer(QuantDescriptor(num_bits=4, amax=1.0))   # an activation: 8 bits only
    model.conv1.input_quantizer = TensorQuantizer(QuantDescriptor(num_bits=8, narrow_range=True, amax=2.0))
    with pytest.raises(ValueError) as info:
        deploy.export_onnx(model, digits[:1], tmp_path / "x.onnx")
    message = str(info.value)
    assert "4 bits" in message and "fc.input_quantizer" in message and "narrow range" in message and "conv1.input_quantizer" in message
    model.fc.input_quantizer.disable()  # a disabled quantizer is the identity: nothing to export
    model.conv1.input_quantizer.disable_quant()
    deploy.export_onnx(model, digits[:1], tmp_path / "x.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["x.onnx"]


def test_missing_extra_gives_a_one_line_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert not deploy.available()
    with pytest.raises(deploy.DeployUnavailable) as info:
        deploy.ort_session("model.onnx")
    assert str(info.value) == f"fusionlib.deploy needs onnxruntime: {deploy.INSTALL_HINT}"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_uint8_activations_store_the_same_values_and_give_mobilenet_v2_int8_kernels(digits, tmp_path):
    """Signed activations shifted onto uint8 (zero point 128): same Q/DQ values, and ONNX Runtime's x86 int8 ops."""
    model = prepare_qat(_model("mobilenet_v2"), digits[:4])
    calibrate(model, [digits[:16]])
    model.eval()
    files = {act: deploy.compact_qdq(deploy.export_onnx(model, digits[:1], tmp_path / f"{act}.onnx", activations=act).path)
             for act in ("int8", "uint8")}
    proto = onnx.load(str(files["uint8"]))
    values = deploy.constant_values(proto)
    zero_points = [(values[n.input[2]].dtype.name, int(values[n.input[2]].flatten()[0]))
                   for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert ("uint8", 128) in zero_points and ("uint8", 0) in zero_points   # shifted signed, and ReLU6 outputs
    assert ("int8", 0) in zero_points                                      # weights stay int8
    reference = {act: deploy.ort_session(f, optimization="disable")(digits) for act, f in files.items()}
    assert torch.equal(reference["int8"], reference["uint8"])              # the same dequantized values
    counts = {act: deploy.op_counts(deploy.optimized_graph(f, optimization="all")) for act, f in files.items()}
    assert counts["uint8"].get("com.microsoft.QLinearConv", 0) == 52 and "Conv" not in counts["uint8"], counts["uint8"]
    assert counts["int8"].get("Conv", 0) > 0, "signed activations were expected to keep some convs in float"
    with pytest.raises(ValueError, match="activations must be 'int8' or 'uint8'"):
        deploy.export_onnx(model, digits[:1], tmp_path / "bad.onnx", activations="int16")
    assert not (tmp_path / "bad.onnx").exists()


def test_onnx_cell_magic_runs_cells_reports_errors_and_skips_without_the_extra(monkeypatch, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    if InteractiveShell.initialized():
        pytest.skip("an IPython shell already exists in this process")
    assert deploy.register_notebook_magic() is False  # outside IPython: nothing to register
    shell = InteractiveShell.instance()
    try:
        assert deploy.register_notebook_magic() is True
        shell.run_cell("%%onnx\nvalue = 41 + 1")
        assert shell.user_ns["value"] == 42
        result = shell.run_cell("%%onnx\nx = 1\nraise ValueError('boom')")
        assert isinstance(result.error_in_exec, ValueError)
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
        capsys.readouterr()
        shell.run_cell("%%onnx\nvalue = 0")
        assert shell.user_ns["value"] == 42
        assert "(cell skipped) onnx not installed, so the ONNX cells are skipped" in capsys.readouterr().out
        assert deploy.INSTALL_HINT in deploy.status_line()
    finally:
        InteractiveShell.clear_instance()


def test_without_openvino_only_the_openvino_cells_and_calls_are_skipped(monkeypatch, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    if InteractiveShell.initialized():
        pytest.skip("an IPython shell already exists in this process")
    shell = InteractiveShell.instance()
    try:
        assert deploy.register_notebook_magic() is True
        if deploy.openvino_available():   # installed here: the cell runs
            shell.run_cell("%%openvino\nov_value = 1")
            assert shell.user_ns["ov_value"] == 1
            assert deploy.openvino_status_line().endswith("the OpenVINO cells run")
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
        assert deploy.available() and not deploy.openvino_available()
        with pytest.raises(deploy.DeployUnavailable) as info:
            deploy.ov_compile("model.onnx")
        assert str(info.value) == f"fusionlib.deploy's OpenVINO path needs openvino: {deploy.OV_INSTALL_HINT}"
        assert info.value.__cause__ is None and info.value.__suppress_context__
        with pytest.raises(deploy.DeployUnavailable, match="needs openvino"):
            deploy.ov_cpu_plugin()
        capsys.readouterr()
        shell.run_cell("%%openvino\nov_value = 2")
        shell.run_cell("%%onnx\nonnx_value = 3")
        assert shell.user_ns.get("ov_value") != 2 and shell.user_ns["onnx_value"] == 3   # the ONNX cells still run
        assert (f"(cell skipped) openvino not installed, so the OpenVINO cells are skipped; install the deploy extra: "
                f"{deploy.OV_INSTALL_HINT}") in capsys.readouterr().out
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("onnx", "openvino")
                            else real(name, *a))
        assert deploy.openvino_status_line().startswith("onnx and openvino not installed")
    finally:
        InteractiveShell.clear_instance()


def test_integer_output_quantizers_are_refused_and_unsigned_narrow_range_is_not(tmp_path):
    x = torch.rand(1, 3, 8, 8)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 2, 3)).eval())  # quant layers refuse fake_quant=False ...
    calibrate(model, [x])
    model[0].input_quantizer = TensorQuantizer(QuantDescriptor(fake_quant=False, amax=1.0))  # ... a bare one can
    with pytest.raises(ValueError, match=r"fake_quant=False: it outputs the integers.*: 0.input_quantizer"):
        deploy.export_onnx(model, x, tmp_path / "ints.onnx")
    assert list(tmp_path.iterdir()) == []
    unsigned_narrow = quantize_model(nn.Sequential(nn.Conv2d(3, 2, 3)).eval(),
                                     quant_desc_input=QuantDescriptor(unsigned=True, narrow_range=True))
    calibrate(unsigned_narrow, [x])
    report = deploy.export_onnx(unsigned_narrow, x, tmp_path / "unsigned.onnx")  # the grid is [0, 255] either way
    result = compare_outputs(_run(unsigned_narrow, x), deploy.ort_session(report.path)(x), rtol=1e-4, name="uint8")
    assert result.passed, result


def test_dynamic_and_scaled_amax_are_refused_by_name(tmp_path):
    x = torch.rand(1, 3, 8, 8)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Conv2d(2, 2, 1)).eval(),
                           quant_desc_input=QuantDescriptor(dynamic_amax=True))
    calibrate_weights(model, "max")
    model(x)  # runs on each batch's own range
    with pytest.raises(ValueError, match=r"2 quantizer\(s\) with dynamic amax .*: 0.input_quantizer, 1.input_quantizer"):
        deploy.export_onnx(model, x, tmp_path / "dynamic.onnx")
    model[1].input_quantizer = TensorQuantizer(QuantDescriptor(amax=1.0, scale_amax=2.0))
    with pytest.raises(ValueError, match=r"scale_amax set .*: 1.input_quantizer"):
        deploy.export_onnx(model, x, tmp_path / "scaled.onnx")
    assert list(tmp_path.iterdir()) == []


def test_top1_agreement_counts_rows_with_the_same_class_and_refuses_other_shapes():
    a = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    b = torch.tensor([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6], [0.5, 0.5]])   # rows 0 and 2 agree; row 3 ties -> class 0
    assert deploy.top1_agreement(a, b) == pytest.approx(0.75)
    assert deploy.top1_agreement(a, a.clone()) == 1.0
    with pytest.raises(ValueError, match=r"same shape \[N, classes\]"):
        deploy.top1_agreement(a, b[:3])
    with pytest.raises(ValueError, match="N > 0"):
        deploy.top1_agreement(a[:0], b[:0])
    with pytest.raises(ValueError, match=r"\(8,\)"):
        deploy.top1_agreement(a.flatten(), b.flatten())
    with pytest.raises(TypeError, match="two tensors"):
        deploy.top1_agreement(a, b.tolist())


def test_compact_qdq_stores_every_weight_as_int8_when_two_quantizers_share_a_scale(digits, tmp_path):
    """Two weight quantizers with equal amax (as CLE leaves a RepVGG block's two convs): the exporter writes one scale
    initializer and an Identity; compact_qdq must still read it, or that weight stays float (30 MB instead of 11)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    twin = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        twin.weight.copy_(conv.weight.flip(-1))              # other values, the same per-channel max |W|
    model = prepare_qat(nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 3, 1), twin).eval(), digits[:2])
    calibrate(model, [digits[:8]])
    model.eval()
    exported = deploy.export_onnx(model, digits[:1], tmp_path / "shared.onnx")
    assert exported.op_counts.get("Identity", 0) >= 1, "the exporter no longer shares equal scales: test needs another case"
    compact = onnx.load(str(deploy.compact_qdq(exported.path)))
    weights = [t for t in compact.graph.initializer if len(t.dims) == 4]
    assert len(weights) == 3 and all(t.data_type == onnx.TensorProto.INT8 for t in weights), \
        [(t.name, t.data_type) for t in weights]
    session = deploy.ort_session(tmp_path / "shared.int8.onnx", optimization="disable")
    assert torch.equal(session(digits), deploy.ort_session(exported.path, optimization="disable")(digits))


@pytest.mark.parametrize("weight_bits", [7, 4])
def test_weights_of_fewer_bits_export_as_int8_on_their_own_grid(weight_bits, digits, tmp_path):
    """7-bit weights (no 16-bit saturation without VNNI) and 4-bit ones: int8 initializers within the narrower grid,
    and ONNX Runtime computes the fake-quant model's values up to a quantization step, as it does for 8-bit weights."""
    model = prepare_qat(fuse_conv_bn(_model("mobilenet_v2")), digits[:4],   # folded first: QATConv2d, as in notebook 18
                        quant_desc_weight=QuantDescriptor(num_bits=weight_bits, axis=0))
    calibrate(model, [digits[:16]])
    model.eval()
    layer = next(m for m in model.modules() if isinstance(m, qat.QAT_LAYERS))
    with torch.no_grad():                      # weights past their calibrated amax must clamp, as fake quant does
        layer.weight.mul_(1.5)
    report = deploy.export_onnx(model, digits[:1], tmp_path / f"w{weight_bits}.onnx")
    compact = onnx.load(str(deploy.compact_qdq(report.path)))
    values = deploy.constant_values(compact)
    weights = [values[t.name] for t in compact.graph.initializer if len(t.dims) == 4]
    low, high = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
    assert weights and all(w.dtype.name == "int8" and w.min() >= low and w.max() <= high for w in weights)
    assert any(w.min() == low or w.max() == high for w in weights)
    session = deploy.ort_session(tmp_path / f"w{weight_bits}.int8.onnx", optimization="disable")
    reference, runtime = _run(model, digits), session(digits)
    result = compare_outputs(reference, runtime, rtol=0.05, name=f"{weight_bits}-bit weights")   # as with 8 bits:
    assert result.passed, result              # float rounding flips an activation step here and there (measured 1.6%)
    assert deploy.top1_agreement(reference, runtime) == 1.0


def test_top1_agreement_with_a_tolerance_counts_ties_at_the_output_resolution():
    reference = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.5, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.5]])
    other = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert deploy.top1_agreement(reference, other) == 0.25                     # strict argmax equality: row 1 only
    # row 0: other picks 1.0, one below the best; row 3: an exact tie (argmax takes the first class)
    assert deploy.top1_agreement(reference, other, tolerance=1.0) == 0.75
    assert deploy.top1_agreement(reference, other, tolerance=0.5) == 0.5
    for bad in (-0.1, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
            deploy.top1_agreement(reference, other, tolerance=bad)
