"""fusionlib.deploy's OpenVINO path: fp32 and int8 parity, the precision it reports, deepcopy and bench, bad input.

Skipping without openvino is tested in tests/test_deploy.py (it needs only onnx and onnxruntime).
"""
from __future__ import annotations

import copy

import pytest
import torch

from fusionlib import data, deploy, zoo
from fusionlib.quant import calibrate
from fusionlib.quant.int8 import int8_sums_exact
from fusionlib.quant.qat import prepare_qat
from fusionlib.verify import compare_outputs

pytest.importorskip("onnx", reason="the deploy extra is not installed")
pytest.importorskip("onnxruntime", reason="the deploy extra is not installed")
pytest.importorskip("openvino", reason="openvino (the deploy extra) is not installed")

MODELS = ["resnet18", "mobilenet_v2"]
#: OpenVINO fp32 (precision hint f32) vs PyTorch: the issue's bound
FP32_RTOL = 1e-4
#: int8 top-1 agreement with fake quant: 99% (360 images: at most 3 differ) where uint8 x int8 sums are exact (VNNI);
#: without VNNI, x86 int8 kernels drift (fusionlib.quant.int8), and notebook 16's floor applies. Measured on an AVX2
#: CPU: 96-98% (resnet18) and 90-91% (mobilenet_v2) for OpenVINO, 95% and 87-88% for ONNX Runtime on the same file.
INT8_FLOOR = 0.99 if int8_sums_exact() else 0.8


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """64 train images for calibration, and the whole digits test split (360 images)."""
    x_train, _, x_test, _ = data.digits_tensors()
    return x_train[:64], x_test


@pytest.fixture(scope="module", params=MODELS)
def exported(request, digits, tmp_path_factory):
    """A trained model and its fp32 export (dynamic batch and image size)."""
    name = request.param
    model, _ = zoo.trained_model(name, progress=False)
    model.eval()
    path = deploy.export_onnx(model, digits[1][:1], tmp_path_factory.mktemp(name) / "fp32.onnx",
                              dynamic_image_size=True).path
    return name, model, path


def test_fp32_matches_pytorch_and_reads_f32(exported, digits, photo_batch):
    name, model, fp32 = exported
    ov = deploy.ov_compile(fp32, threads=1, precision="f32")
    assert ov.precision == "f32"  # asked and granted on any CPU
    assert set(ov.runtime_precisions()["Convolution"]) == {"f32"}
    for x in (digits[1], photo_batch):   # the digits test split, and 224x224 photos
        with torch.no_grad():
            reference = model(x)
        result = compare_outputs(reference, ov(x), rtol=FP32_RTOL, name=f"{name}: OpenVINO f32 vs PyTorch")
        assert result.passed, result


def test_int8_agrees_with_fake_quant_on_the_digits_test_split(digits, tmp_path):
    """MobileNetV2, the model whose signed residual stream makes int8 hardest (notebook 16, section 3)."""
    calib, test = digits
    model, _ = zoo.trained_model("mobilenet_v2", progress=False)
    fake_quant = prepare_qat(model.eval(), calib[:4])
    calibrate(fake_quant, [calib[:32], calib[32:]])
    fake_quant.eval()
    qdq = deploy.compact_qdq(deploy.export_onnx(fake_quant, test[:1], tmp_path / "qdq.onnx", activations="uint8").path)
    ov = deploy.ov_compile(qdq)
    with torch.no_grad():
        reference = fake_quant(test)
    agreement = deploy.top1_agreement(reference, ov(test))
    assert agreement >= INT8_FLOOR, agreement
    convs = ov.runtime_precisions()["Convolution"]
    assert convs == {"u8": 52}, convs   # every convolution on integer kernels


def test_precision_reported_is_the_one_compiled(exported):
    name, _, fp32 = exported
    if name != MODELS[0]:
        pytest.skip("the same for every model")
    plugin = deploy.ov_cpu_plugin()
    assert plugin["default_precision"] in deploy.OV_PRECISIONS and "FP32" in plugin["capabilities"]
    default = deploy.ov_compile(fp32, precision=None)
    assert default.requested_precision is None and default.precision == plugin["default_precision"]
    asked_bf16 = deploy.ov_compile(fp32, precision="bf16")
    # a hint the CPU has no bf16 kernels for falls back to f32; the compiled model says which
    assert asked_bf16.precision == ("bf16" if "BF16" in plugin["capabilities"] else "f32")
    assert "runs in" in repr(asked_bf16)


def test_deepcopy_compiles_anew_and_bench_uses_it(exported, digits, tmp_path):
    from fusionlib import bench

    name, model, fp32 = exported
    if name != MODELS[0]:
        pytest.skip("the mechanics are the same for every model")
    ov = deploy.ov_compile(fp32)
    clone = copy.deepcopy(ov)
    assert clone.compiled is not ov.compiled and clone.request is not ov.request
    assert (clone.threads, clone.requested_precision, clone.precision) == (1, "f32", "f32")
    assert torch.equal(clone(digits[1][:4]), ov(digits[1][:4]))
    table = bench.compare_models_latency({"torch": model, "openvino": ov}, digits[1][:2], warmup=1, repeats=2)
    assert [row.name for row in table.rows] == ["torch", "openvino"]
    with pytest.raises(ValueError, match="takes 1 input"):
        ov(digits[1], digits[1])
    fixed = deploy.ov_compile(deploy.export_onnx(model, digits[1][:1], tmp_path / "fixed.onnx").path)
    with pytest.raises(ValueError, match=r"input 'input' takes shape \[\?, 3, 32, 32\], got \[1, 3, 64, 64\]"):
        fixed(torch.zeros(1, 3, 64, 64))   # OpenVINO itself would return the last output of the right shape
    with pytest.raises(TypeError, match="takes float32, got float64"):
        fixed(digits[1][:1].double())
    with pytest.raises(ValueError, match=r"precision must be one of \['f32', 'bf16', 'f16'\] or None"):
        deploy.ov_compile(fp32, precision="int8")
    with pytest.raises(ValueError, match="threads"):
        deploy.ov_compile(fp32, threads=0)
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        deploy.ov_compile(tmp_path / "missing.onnx")
