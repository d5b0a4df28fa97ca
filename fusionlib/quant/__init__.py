r"""fusionlib.quant: a quantization toolkit rebuilt from NVIDIA's pytorch-quantization (notebooks 07-09).

* :mod:`~fusionlib.quant.functional` — the integer grid, ``quant_scale`` (qmax/amax)
  versus ``step_size`` (amax/qmax), ``quantize`` / ``dequantize`` / ``fake_quantize``
  with the straight-through and LSQ gradients.
* :mod:`~fusionlib.quant.descriptor` — ``QuantDescriptor`` and ready-made descriptors.
* :mod:`~fusionlib.quant.calibrators` — ``MaxCalibrator``, ``HistogramCalibrator``.
* :mod:`~fusionlib.quant.tensor_quantizer` — ``TensorQuantizer`` (with torch's kernels in export mode).
* :mod:`~fusionlib.quant.modules` — ``QuantConv2d``, ``QuantLinear``, ... (float subclasses with input / weight quantizers).
* :mod:`~fusionlib.quant.patching` — ``initialize`` / ``deactivate`` / ``enable_quantization`` (monkey patching torch.nn).
* :mod:`~fusionlib.quant.ptq` — ``calibrate``, ``calibrate_weights``, ``layer_sensitivity``, ``quantize_model`` (post-training quantization).
* :mod:`~fusionlib.quant.qat` — ``QATConvBn2d``, ``prepare_qat``, ``export_folded`` (quantization-aware training).
* :mod:`~fusionlib.quant.lowering` — ``lowering_problem``: whether a quantizer can become int8 kernels or ONNX Q/DQ.
* :mod:`~fusionlib.quant.equalize` — ``cross_layer_equalization``, ``absorb_high_bias``, ``bias_correction``
  (notebook 17: data-free weight fixes before quantization).
* :mod:`~fusionlib.quant.adaround` — ``adaround``: learned up-or-down rounding of each weight (notebook 17).
* :mod:`~fusionlib.quant.int8` — ``convert_int8`` to torch's int8 CPU kernels; import it explicitly
  (``from fusionlib.quant import int8``): it is the one module that imports ``torch.ao``.
"""
from fusionlib.quant.calibrators import HISTOGRAM_METHODS, HistogramCalibrator, MaxCalibrator
from fusionlib.quant.descriptor import (
    CALIB_METHODS,
    QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW,
    QUANT_DESC_8BIT_PER_TENSOR,
    QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR,
    QuantDescriptor,
)
from fusionlib.quant.functional import (
    FakeQuantizeFunction,
    amax_along,
    amax_shape_for,
    check_amax,
    check_axis,
    check_num_bits,
    dequantize,
    fake_quantize,
    quant_max,
    quant_min,
    quant_scale,
    quantize,
    reduce_amax,
    step_size,
)
from fusionlib.quant.tensor_quantizer import TensorQuantizer
from fusionlib.quant.modules import (
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
    QuantLinear,
    QuantMaxPool1d,
    QuantMaxPool2d,
    QuantMaxPool3d,
    QuantMixin,
    is_quant_module,
)
from fusionlib.quant.patching import (
    QUANT_MODULE_MAPPING,
    QUANT_MODULE_NAMES,
    QuantModuleEntry,
    deactivate,
    enable_quantization,
    initialize,
    is_active,
    saved_originals,
)
from fusionlib.quant.ptq import (
    CALIBRATE_METHODS,
    LayerSensitivity,
    SensitivityReport,
    calibrate,
    calibrate_weights,
    disabled_quantizers,
    keep_float,
    layer_sensitivity,
    load_calib_amax,
    quant_layers,
    quantize_model,
    quantizers,
)
from fusionlib.quant.lowering import lowering_problem
from fusionlib.quant.qat import QATConvBn2d, QATConv2d, QATLinear, QATReport, export_folded, freeze_bn_stats, prepare_qat
from fusionlib.quant.equalize import (
    BiasCorrectionReport,
    EqualizationReport,
    absorb_high_bias,
    bias_correction,
    channel_ranges,
    clipped_normal_mean,
    cross_layer_equalization,
    equalize_pair,
    fold_and_swap_relu6,
)
from fusionlib.quant.adaround import AdaRoundReport, FrozenAmaxQuantizer, adaround, freeze_amax

__all__ = [
    # functional
    "quant_max",
    "quant_min",
    "quant_scale",
    "step_size",
    "quantize",
    "dequantize",
    "fake_quantize",
    "FakeQuantizeFunction",
    "amax_shape_for",
    "amax_along",
    "reduce_amax",
    "check_num_bits",
    "check_amax",
    "check_axis",
    # descriptor
    "QuantDescriptor",
    "CALIB_METHODS",
    "QUANT_DESC_8BIT_PER_TENSOR",
    "QUANT_DESC_UNSIGNED_8BIT_PER_TENSOR",
    "QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW",
    "QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL",
    "QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL",
    # calibrators
    "MaxCalibrator",
    "HistogramCalibrator",
    "HISTOGRAM_METHODS",
    # tensor quantizer
    "TensorQuantizer",
    # quant modules
    "QuantMixin",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantLinear",
    "QuantMaxPool1d",
    "QuantMaxPool2d",
    "QuantMaxPool3d",
    "QuantAvgPool1d",
    "QuantAvgPool2d",
    "QuantAvgPool3d",
    "QuantAdaptiveAvgPool1d",
    "QuantAdaptiveAvgPool2d",
    "QuantAdaptiveAvgPool3d",
    "QUANT_MODULES",
    "is_quant_module",
    # monkey patching
    "QuantModuleEntry",
    "QUANT_MODULE_MAPPING",
    "QUANT_MODULE_NAMES",
    "initialize",
    "deactivate",
    "enable_quantization",
    "is_active",
    "saved_originals",
    # post-training quantization
    "CALIBRATE_METHODS",
    "quantizers",
    "quant_layers",
    "disabled_quantizers",
    "keep_float",
    "calibrate",
    "calibrate_weights",
    "load_calib_amax",
    "LayerSensitivity",
    "SensitivityReport",
    "layer_sensitivity",
    "quantize_model",
    # what a quantizer can become
    "lowering_problem",
    # quantization-aware training
    "QATConvBn2d",
    "QATConv2d",
    "QATLinear",
    "QATReport",
    "prepare_qat",
    "freeze_bn_stats",
    "export_folded",
    # weight fixes before quantization (notebook 17)
    "cross_layer_equalization",
    "fold_and_swap_relu6",
    "equalize_pair",
    "channel_ranges",
    "EqualizationReport",
    "absorb_high_bias",
    "clipped_normal_mean",
    "bias_correction",
    "BiasCorrectionReport",
    "adaround",
    "AdaRoundReport",
    "freeze_amax",
    "FrozenAmaxQuantizer",
]
