"""fusionlib.fusion: BatchNorm folding and fuse_modules.

References: torch.nn.utils.fusion / torch.ao.quantization namesakes (where
they work) and, always, the unfused module's own output. Errors are relative
to the output's scale: max|a - b| / max|a|.
"""
from __future__ import annotations

import copy
import inspect
import math
import re

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_sample_images
from torch import nn
from torch.ao import quantization as torch_quantization
from torch.ao.nn import intrinsic as torch_intrinsic
from torch.nn.utils import fusion as torch_fusion

from fusionlib import folding, fused_modules
from fusionlib import fusion as F
from model_fingerprint import assert_unchanged, fingerprint


def max_rel(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return ((candidate - reference).abs().max() / reference.abs().max()).item()


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so folding changes the weights."""
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen, dtype=bn.running_mean.dtype) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=gen, dtype=bn.running_var.dtype) * 1.5 + 0.3)
        if bn.affine:
            bn.weight.copy_(torch.rand(n, generator=gen, dtype=bn.weight.dtype) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=gen, dtype=bn.bias.dtype) * 0.3)


def randomize_all_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            randomize_bn(module, gen)
    return model


# --------------------------------------------------------------------------
# fuse_conv_bn_eval / fuse_conv_bn_weights
# --------------------------------------------------------------------------
CONV_CASES = {
    # name: (conv class, kwargs, spatial input size)
    "conv1d_groups_dilation_stride": (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, dilation=2, stride=2), 17),
    "conv1d_nobias": (nn.Conv1d, dict(in_channels=3, out_channels=5, kernel_size=3, bias=False), 12),
    "conv2d_nobias": (nn.Conv2d, dict(in_channels=3, out_channels=8, kernel_size=3, padding=1, bias=False), 9),
    "conv2d_groups3_dilation2_stride2": (nn.Conv2d, dict(in_channels=6, out_channels=9, kernel_size=3, groups=3, dilation=2, stride=2, padding=2), 11),
    "conv2d_depthwise": (nn.Conv2d, dict(in_channels=8, out_channels=8, kernel_size=3, groups=8, padding=1), 8),
    "conv3d_groups2": (nn.Conv3d, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1), 5),
    "convT1d_stride2": (nn.ConvTranspose1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2), 7),
    "convT2d_dilation_nobias": (nn.ConvTranspose2d, dict(in_channels=5, out_channels=7, kernel_size=3, dilation=2, bias=False), 6),
    "convT3d_stride2": (nn.ConvTranspose3d, dict(in_channels=3, out_channels=4, kernel_size=2, stride=2), 4),
}
BN_FOR_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def make_conv_bn(case: str, seed: int, dtype: torch.dtype = torch.float32):
    conv_class, kwargs, size = CONV_CASES[case]
    torch.manual_seed(seed)
    conv = conv_class(**kwargs)
    dim = len(conv.kernel_size)
    eps = (1e-5, 1e-3, 0.1)[seed % 3]
    bn = BN_FOR_DIM[dim](kwargs["out_channels"], eps=eps)
    randomize_bn(bn, torch.Generator().manual_seed(seed + 100))
    conv, bn = conv.to(dtype).eval(), bn.to(dtype).eval()
    x = torch.randn(2, kwargs["in_channels"], *([size] * dim), dtype=dtype)
    return conv, bn, x


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_bn_eval_matches_torch_and_unfused(case, seed):
    conv, bn, x = make_conv_bn(case, seed)
    transpose = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    weight_before = conv.weight.detach().clone()
    ours = F.fuse_conv_bn_eval(conv, bn, transpose=transpose)
    theirs = torch_fusion.fuse_conv_bn_eval(conv, bn, transpose=transpose)
    with torch.no_grad():
        unfused = bn(conv(x))
        out = ours(x)
        assert max_rel(theirs.weight, ours.weight) <= 1e-6
        assert max_rel(theirs.bias, ours.bias) <= 1e-6
        assert max_rel(theirs(x), out) <= 1e-6
        assert max_rel(unfused, out) <= 1e-5
    assert type(ours) is type(conv) and ours is not conv
    assert torch.equal(conv.weight, weight_before), "the input conv must not change"
    assert isinstance(ours.weight, nn.Parameter) and isinstance(ours.bias, nn.Parameter)
    assert ours.weight.dtype == torch.float32 and ours.bias.shape == (bn.num_features,)
    # folding did something: the weights differ from the conv's
    assert not torch.allclose(ours.weight, conv.weight)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_bn_eval_float64_is_exact_to_1e12(case):
    conv, bn, x = make_conv_bn(case, seed=2, dtype=torch.float64)
    ours = F.fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd))
    with torch.no_grad():
        assert ours.weight.dtype == torch.float64
        assert max_rel(bn(conv(x)), ours(x)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "conv_class, in_channels, out_channels, groups, size",
    [
        (nn.ConvTranspose1d, 6, 9, 3, 7),
        (nn.ConvTranspose2d, 4, 6, 2, 6),
        (nn.ConvTranspose2d, 8, 8, 8, 5),  # depthwise transposed
        (nn.ConvTranspose3d, 6, 4, 2, 4),
    ],
)
def test_grouped_conv_transpose_folds_correctly(conv_class, in_channels, out_channels, groups, size, dtype):
    """torch.nn.utils.fusion raises a shape error here; compare with the unfused module."""
    torch.manual_seed(groups)
    conv = conv_class(in_channels, out_channels, 3, groups=groups, stride=2, dilation=1).to(dtype).eval()
    dim = len(conv.kernel_size)
    bn = BN_FOR_DIM[dim](out_channels).to(dtype).eval()
    randomize_bn(bn, torch.Generator().manual_seed(7))
    x = torch.randn(2, in_channels, *([size] * dim), dtype=dtype)
    fused = F.fuse_conv_bn_eval(conv, bn, transpose=True)
    with torch.no_grad():
        err = max_rel(bn(conv(x)), fused(x))
    assert err <= (1e-5 if dtype == torch.float32 else 1e-12)
    # Through fuse_modules too (ConvTranspose + BN is a supported sequence).
    model = nn.Sequential(conv, bn).eval()
    fused_model = F.fuse_modules(model, ["0", "1"])
    with torch.no_grad():
        assert max_rel(model(x), fused_model(x)) <= (1e-5 if dtype == torch.float32 else 1e-12)


def test_fuse_conv_bn_weights_formula_on_hand_numbers():
    # W=2, b=1; mu=3, var=3, eps=1 -> sqrt(var+eps)=2; gamma=4 -> s=2; beta=5
    # W' = 2*2 = 4 ; b' = (1-3)*2 + 5 = 1
    w, b = F.fuse_conv_bn_weights(
        torch.full((1, 1, 1), 2.0), torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([3.0]),
        1.0, torch.tensor([4.0]), torch.tensor([5.0]),
    )
    assert isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter)
    assert w.item() == 4.0 and b.item() == 1.0
    # No conv bias, no BN affine: W' = W/sqrt(var+eps), b' = -mu/sqrt(var+eps)
    w, b = F.fuse_conv_bn_weights(
        torch.full((1, 1, 1), 2.0, requires_grad=True), None, torch.tensor([3.0]),
        torch.tensor([3.0]), 1.0, None, None,
    )
    assert w.item() == 1.0 and b.item() == -1.5
    # Deliberate difference from torch: the new bias trains like the weight.
    assert w.requires_grad and b.requires_grad and w.is_leaf


def test_fp32_folding_is_within_one_ulp_of_exact():
    """Our fp32 fold is the float64 result rounded once (<= 1 ulp, in practice 0.5)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, 3, 3, generator=gen)
    bias = torch.randn(64, generator=gen)
    bn = nn.BatchNorm2d(64, eps=1e-5).eval()
    randomize_bn(bn, gen)
    w, b = F.fuse_conv_bn_weights(weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    exact_w = weight.double() * scale[:, None, None, None]
    exact_b = (bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
    ulp_w = (w.double() - exact_w).abs() / (exact_w.abs() * 2.0**-23)
    ulp_b = (b.double() - exact_b).abs() / (exact_b.abs() * 2.0**-23)
    assert ulp_w.max().item() <= 1.0 and ulp_b.max().item() <= 1.0
    assert ulp_w.max().item() <= 0.51  # rounded once: half an ulp


# --------------------------------------------------------------------------
# fuse_linear_bn_eval
# --------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_bn_eval_matches_torch_and_unfused(bias, dtype):
    torch.manual_seed(3)
    linear = nn.Linear(10, 7, bias=bias).to(dtype).eval()
    bn = nn.BatchNorm1d(7, eps=1e-3).to(dtype).eval()
    randomize_bn(bn, torch.Generator().manual_seed(4))
    x = torch.randn(5, 10, dtype=dtype)
    ours = F.fuse_linear_bn_eval(linear, bn)
    theirs = torch_fusion.fuse_linear_bn_eval(linear, bn)
    with torch.no_grad():
        assert max_rel(theirs(x), ours(x)) <= 1e-6
        assert max_rel(bn(linear(x)), ours(x)) <= (1e-5 if dtype == torch.float32 else 1e-12)
    assert type(ours) is nn.Linear and ours.bias.shape == (7,)


def test_linear_bn_with_one_feature_broadcasts():
    """BatchNorm1d(1) after a Linear on [N, 1, L] inputs: one scale for every feature."""
    torch.manual_seed(5)
    linear, bn = nn.Linear(6, 4, bias=False).eval(), nn.BatchNorm1d(1).eval()
    randomize_bn(bn, torch.Generator().manual_seed(5))
    x = torch.randn(3, 1, 6)
    ours = F.fuse_linear_bn_eval(linear, bn)
    with torch.no_grad():
        assert max_rel(bn(linear(x)), ours(x)) <= 1e-5
        assert max_rel(torch_fusion.fuse_linear_bn_eval(linear, bn)(x), ours(x)) <= 1e-6
    assert ours.bias.shape == (4,)


# --------------------------------------------------------------------------
# BatchNorm without affine parameters, low-precision weights, channels_last
# --------------------------------------------------------------------------
def exact_fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold in float64 from the layer's and BN's stored values: W·s and (b − μ)·s + β, s = γ/√(σ²+ε).

    Output channels are dim 0 of a Conv / Linear weight and dim 1 of an
    (ungrouped) ConvTranspose weight.
    """
    variance, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = torch.ones_like(variance) if bn.weight is None else bn.weight.detach().double()
    beta = torch.zeros_like(variance) if bn.bias is None else bn.bias.detach().double()
    scale = gamma / torch.sqrt(variance + bn.eps)
    weight = layer.weight.detach().double()
    out_dim = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    bias = torch.zeros_like(mean) if layer.bias is None else layer.bias.detach().double()
    return weight * scale.view(shape), (bias - mean) * scale + beta


def ulp_errors(candidate: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Worst |candidate − exact| in units of one correct rounding to ``dtype``.

    A value rounded once to nearest is within u·|exact| (u = eps/2, half an
    ulp) of it, or within half the subnormal spacing near zero; the result is
    the largest error divided by that bound, so <= 1 means "rounded once".
    """
    info = torch.finfo(dtype)
    bound = (info.eps / 2) * exact.abs() + info.smallest_normal * info.eps / 2
    return ((candidate.double() - exact).abs() / bound).max().item()


FOLD_LAYERS = {
    # name: (layer, BN class, input shape without the batch dimension)
    "conv2d": (lambda: nn.Conv2d(16, 32, 3), nn.BatchNorm2d, (16, 9, 9)),
    "conv2d_nobias": (lambda: nn.Conv2d(16, 32, 3, bias=False), nn.BatchNorm2d, (16, 9, 9)),
    "convT2d": (lambda: nn.ConvTranspose2d(16, 32, 3, stride=2), nn.BatchNorm2d, (16, 5, 5)),
    "linear": (lambda: nn.Linear(48, 64), nn.BatchNorm1d, (48,)),
}


def fold_in_dtype(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype):
    """The naive fold: every tensor cast to ``dtype`` first and each operation rounded to it."""
    scale = bn.weight.detach().to(dtype) * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    shape = [1] * layer.weight.dim()
    shape[1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0] = -1
    bias = torch.zeros_like(scale) if layer.bias is None else layer.bias.detach().to(dtype)
    weight = layer.weight.detach().to(dtype) * scale.view(shape)
    return weight, (bias - bn.running_mean.to(dtype)) * scale + bn.bias.detach().to(dtype)


def fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, library=F) -> nn.Module:
    """``fuse_linear_bn_eval`` or ``fuse_conv_bn_eval`` (with the right ``transpose``) from ``library``."""
    if isinstance(layer, nn.Linear):
        return library.fuse_linear_bn_eval(layer, bn)
    return library.fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, nn.modules.conv._ConvTransposeNd))


@pytest.mark.parametrize("case", ["conv2d", "conv2d_nobias", "convT2d", "linear"])
def test_batchnorm_without_affine_folds_with_unit_gamma_and_zero_beta(case):
    make, bn_class, shape = FOLD_LAYERS[case]
    torch.manual_seed(21)
    layer = make().double().eval()
    bn = bn_class(layer.weight.shape[1 if case == "convT2d" else 0], eps=1e-3, affine=False).double().eval()
    randomize_bn(bn, torch.Generator().manual_seed(22))
    assert bn.weight is None and bn.bias is None
    x = torch.randn(2, *shape, dtype=torch.float64)
    fused = fold(layer, bn)
    exact_w, exact_b = exact_fold(layer, bn)
    with torch.no_grad():
        assert max_rel(exact_w, fused.weight) <= 1e-15 and max_rel(exact_b, fused.bias) <= 1e-15
        assert max_rel(bn(layer(x)), fused(x)) <= 1e-12
        # The fold changed the layer: a mix-up of gamma/beta defaults would show here.
        assert max_rel(exact_w, layer.weight.double()) > 0.1
    # float32, against torch's namesake where it takes gamma/beta = None (its Linear fold does not)
    layer32, bn32 = copy.deepcopy(layer).float(), copy.deepcopy(bn).float()
    ours = fold(layer32, bn32)
    with torch.no_grad():
        assert max_rel(bn32(layer32(x.float())), ours(x.float())) <= 1e-5
        if case != "linear":
            theirs = fold(layer32, bn32, library=torch_fusion)
            assert max_rel(theirs.weight, ours.weight) <= 1e-6 and max_rel(theirs.bias, ours.bias) <= 1e-6
    # Through fuse_modules too; fuse_modules_qat needs a BatchNorm it can train, and says so.
    model = nn.Sequential(layer, bn).eval()
    with torch.no_grad():
        assert max_rel(model(x), F.fuse_modules(model, ["0", "1"])(x)) <= 1e-12
    if case != "convT2d":
        with pytest.raises(F.FusionError, match=r"needs affine=True .*got affine=False"):
            F.fuse_modules_qat(model.train(), ["0", "1"])


@pytest.mark.parametrize("bn_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(FOLD_LAYERS))
def test_low_precision_weights_are_folded_in_float64_and_rounded_once(case, dtype, bn_dtype):
    """fp16 / bf16 layers: the folded weights keep the layer's dtype and are the float64 fold rounded once.

    Tolerance: half an ulp of the dtype per element (see ``ulp_errors``). The
    naive fold, computed in the layer's dtype and rounded at every step (what
    torch does when BatchNorm has the layer's dtype), misses that bound on
    these sizes, which shows the check can fail.
    """
    make, bn_class, shape = FOLD_LAYERS[case]
    torch.manual_seed(23)
    layer = make().to(dtype).eval()
    bn = bn_class(layer.weight.shape[1 if case == "convT2d" else 0])
    randomize_bn(bn, torch.Generator().manual_seed(24))
    bn = bn.to(dtype if bn_dtype == "same" else torch.float32).eval()

    fused = fold(layer, bn)
    assert fused.weight.dtype == dtype and fused.bias.dtype == dtype
    exact_w, exact_b = exact_fold(layer, bn)
    assert ulp_errors(fused.weight, exact_w, dtype) <= 1.0
    assert ulp_errors(fused.bias, exact_b, dtype) <= 1.0

    naive_w, naive_b = fold_in_dtype(layer, bn, dtype)
    assert max(ulp_errors(naive_w, exact_w, dtype), ulp_errors(naive_b, exact_b, dtype)) > 1.0

    # The fused layer's output, against the exact fold applied in float64 to the same input.
    x = torch.randn(2, *shape).to(dtype)
    exact_layer = copy.deepcopy(layer).double()
    with torch.no_grad():
        exact_layer.weight.copy_(exact_w)
        exact_layer.bias = nn.Parameter(exact_b)
        reference = exact_layer(x.double())
        error = max_rel(reference, fused(x).double())
    assert error <= 2 * torch.finfo(dtype).eps, error  # the output's own rounding and the weights', a few u



def test_low_precision_fold_rounds_once_even_where_torchs_conversion_rounds_twice():
    """bf16: every folded weight is the nearest bf16 to the float64 fold, exactly.

    torch's float64 -> bf16 conversion goes through float32 and rounds twice, so
    about one value in 2^16 lands one ulp off; on these 590k weights plain
    ``.to(torch.bfloat16)`` of the exact fold misses somewhere (asserted, so
    the check can fail), while the fold's ``round_to_nearest`` never does.
    """
    torch.manual_seed(5)
    conv = nn.Conv2d(256, 256, 3, bias=False).to(torch.bfloat16).eval()
    bn = nn.BatchNorm2d(256)
    randomize_bn(bn, torch.Generator().manual_seed(6))
    bn = bn.eval()
    fused = fold(conv, bn)
    exact_w, _ = exact_fold(conv, bn)
    nearest = exact_w.double()
    below = torch.nextafter(fused.weight, torch.full_like(fused.weight, -math.inf)).double()
    above = torch.nextafter(fused.weight, torch.full_like(fused.weight, math.inf)).double()
    error = (fused.weight.double() - nearest).abs()
    assert bool(((below - nearest).abs() >= error).all() and ((above - nearest).abs() >= error).all())
    assert int((exact_w.to(torch.bfloat16) != fused.weight).sum()) > 0


CHANNELS_LAST_CASES = {
    # name: (layer, BN class, input shape without batch, memory format)
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d, (6, 7, 7), torch.channels_last),
    "conv2d_depthwise": (lambda: nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d, (8, 7, 7), torch.channels_last),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d, (6, 5, 5), torch.channels_last),
    "convT2d_groups2": (lambda: nn.ConvTranspose2d(6, 8, 3, groups=2, stride=2), nn.BatchNorm2d, (6, 4, 4),
                        torch.channels_last),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3), nn.BatchNorm3d, (4, 5, 5, 5), torch.channels_last_3d),
}


@pytest.mark.parametrize("case", list(CHANNELS_LAST_CASES))
def test_channels_last_weights_fold_correctly_and_keep_their_memory_format(case):
    make, bn_class, shape, memory_format = CHANNELS_LAST_CASES[case]
    torch.manual_seed(25)
    layer = make().double().eval()
    bn = bn_class(layer.out_channels).double().eval()
    randomize_bn(bn, torch.Generator().manual_seed(26))
    transpose = case.startswith("convT")
    contiguous_fused = F.fuse_conv_bn_eval(layer, bn, transpose=transpose)

    layer_cl = copy.deepcopy(layer).to(memory_format=memory_format)
    assert layer_cl.weight.is_contiguous(memory_format=memory_format)
    if layer_cl.weight.shape[-1] > 1 and layer_cl.weight.shape[1] > 1:
        assert not layer_cl.weight.is_contiguous()  # the strides really differ from the default
    fused = F.fuse_conv_bn_eval(layer_cl, bn, transpose=transpose)
    # Same values as folding the contiguous weight (the layout must not change the arithmetic) ...
    assert torch.equal(fused.weight, contiguous_fused.weight) and torch.equal(fused.bias, contiguous_fused.bias)
    # ... and the layout of the layer's weight.
    assert fused.weight.stride() == layer_cl.weight.stride(), (fused.weight.stride(), layer_cl.weight.stride())
    x = torch.randn(2, *shape, dtype=torch.float64).contiguous(memory_format=memory_format)
    with torch.no_grad():
        assert max_rel(bn(layer_cl(x)), fused(x)) <= 1e-12

    # A channels_last model through fuse_modules: the folded conv (inside ConvReLU) stays channels_last.
    model = nn.Sequential(copy.deepcopy(layer), copy.deepcopy(bn), nn.ReLU()).to(memory_format=memory_format).eval()
    group = ["0", "1"] if transpose else ["0", "1", "2"]  # no fuser takes ConvTranspose+BN+ReLU (as in torch)
    fused_model = F.fuse_modules(model, group)
    folded = fused_model[0] if transpose else fused_model[0][0]
    assert folded.weight.is_contiguous(memory_format=memory_format)
    with torch.no_grad():
        assert max_rel(model(x), fused_model(x)) <= 1e-12


def test_fuse_eval_rejects_bad_pairs_with_clear_messages():
    conv, bn = nn.Conv2d(3, 8, 3).eval(), nn.BatchNorm2d(6).eval()
    with pytest.raises(F.FusionError, match=r"Conv2d \(out_channels=8\) with BatchNorm2d \(num_features=6\)"):
        F.fuse_conv_bn_eval(conv, bn)
    with pytest.raises(F.FusionError, match=r"transpose=True"):
        F.fuse_conv_bn_eval(nn.ConvTranspose2d(3, 8, 3).eval(), nn.BatchNorm2d(8).eval())
    with pytest.raises(F.FusionError, match=r"(?i)call model.eval\(\) first, or use fuse_modules_qat"):
        F.fuse_conv_bn_eval(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(F.FusionError, match="track_running_stats=False"):
        F.fuse_conv_bn_eval(nn.Conv2d(3, 8, 3).eval(), nn.BatchNorm2d(8, track_running_stats=False).eval())
    with pytest.raises(F.FusionError, match=r"out_features=7\) with BatchNorm1d \(num_features=5\)"):
        F.fuse_linear_bn_eval(nn.Linear(3, 7).eval(), nn.BatchNorm1d(5).eval())
    # Code written against torch catches AssertionError; that still works.
    with pytest.raises(AssertionError):
        F.fuse_conv_bn_eval(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))


# --------------------------------------------------------------------------
# fuse_modules on every supported sequence, against torch.ao.quantization
# --------------------------------------------------------------------------
SEQUENCES = {
    "conv1d_bn": (lambda: [nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)], (2, 3, 10)),
    "conv1d_bn_relu": (lambda: [nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()], (2, 3, 10)),
    "conv1d_relu": (lambda: [nn.Conv1d(3, 4, 3), nn.ReLU()], (2, 3, 10)),
    "conv2d_bn": (lambda: [nn.Conv2d(3, 6, 3, groups=3), nn.BatchNorm2d(6)], (2, 3, 8, 8)),
    "conv2d_bn_relu": (lambda: [nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()], (2, 3, 8, 8)),
    "conv2d_relu": (lambda: [nn.Conv2d(3, 4, 3), nn.ReLU()], (2, 3, 8, 8)),
    "conv3d_bn": (lambda: [nn.Conv3d(3, 4, 2), nn.BatchNorm3d(4)], (2, 3, 5, 5, 5)),
    "conv3d_bn_relu": (lambda: [nn.Conv3d(3, 4, 2), nn.BatchNorm3d(4), nn.ReLU()], (2, 3, 5, 5, 5)),
    "conv3d_relu": (lambda: [nn.Conv3d(3, 4, 2), nn.ReLU()], (2, 3, 5, 5, 5)),
    "convT1d_bn": (lambda: [nn.ConvTranspose1d(3, 4, 3, stride=2), nn.BatchNorm1d(4)], (2, 3, 6)),
    "convT2d_bn": (lambda: [nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)], (2, 3, 5, 5)),
    "convT3d_bn": (lambda: [nn.ConvTranspose3d(3, 4, 2), nn.BatchNorm3d(4)], (2, 3, 3, 3, 3)),
    "linear_bn": (lambda: [nn.Linear(5, 6), nn.BatchNorm1d(6)], (4, 5)),
    "linear_relu": (lambda: [nn.Linear(5, 6), nn.ReLU()], (4, 5)),
    "bn2d_relu": (lambda: [nn.BatchNorm2d(3), nn.ReLU()], (2, 3, 4, 4)),
    "bn3d_relu": (lambda: [nn.BatchNorm3d(3), nn.ReLU()], (2, 3, 3, 3, 3)),
}


@pytest.mark.parametrize("case", list(SEQUENCES))
def test_fuse_modules_matches_torch_on_every_sequence(case):
    make, shape = SEQUENCES[case]
    torch.manual_seed(11)
    model = randomize_all_bn(nn.Sequential(*make(), nn.Identity()), seed=12).eval()
    names = [str(i) for i in range(len(model) - 1)]
    x = torch.randn(*shape)
    ours = F.fuse_modules(model, names)
    theirs = torch_quantization.fuse_modules(model, names)
    assert repr(ours) == repr(theirs)
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in theirs]
    assert all(type(m) is nn.Identity and not m.training for m in ours[1:-1])
    assert not ours[0].training  # (torch's fused containers come out with training=True)
    with torch.no_grad():
        assert max_rel(theirs(x), ours(x)) <= 1e-6
        assert max_rel(model(x), ours(x)) <= 1e-5
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ours.modules())
    assert has_bn == case.startswith("bn")  # folded everywhere except BN+ReLU


def test_bn1d_relu_fuses_too():
    """(BatchNorm1d, ReLU) -> BNReLU1d (torch has no 1d form)."""
    model = randomize_all_bn(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())).eval()
    fused = F.fuse_modules(model, [0, 1])
    assert type(fused[0]) is F.BNReLU1d and type(fused[1]) is nn.Identity
    assert repr(fused[0]).startswith("BNReLU1d(\n  (0): BatchNorm1d(4")
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        assert torch.equal(model(x), fused(x))


def test_method_two_sequential_indices_str_and_int():
    torch.manual_seed(0)
    model = randomize_all_bn(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    by_str = F.fuse_modules(model, [["0", "1", "2"], ["3", "4"]])
    by_int = F.fuse_modules(model, [[0, 1, 2], [3, 4]])
    theirs = torch_quantization.fuse_modules(model, [["0", "1", "2"], ["3", "4"]])
    assert repr(by_str) == repr(by_int) == repr(theirs)
    assert [type(m) for m in by_str] == [F.ConvReLU2d, nn.Identity, nn.Identity, nn.Conv2d, nn.Identity]
    assert repr(by_str[0]).startswith("ConvReLU2d(\n  (0): Conv2d(3, 8, kernel_size=(3, 3)")
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(by_str(x), by_int(x))
        assert max_rel(reference, by_str(x)) <= 1e-5
    # A single group given as one flat list (method one on a flat list) also works.
    single = F.fuse_modules(model, ["3", "4"])
    assert type(single[3]) is nn.Conv2d and type(single[4]) is nn.Identity


def test_fuse_known_modules_returns_fused_then_identities():
    conv, bn, relu = nn.Conv2d(3, 4, 3).eval(), nn.BatchNorm2d(4).eval(), nn.ReLU().eval()
    randomize_all_bn(bn)
    out = F.fuse_known_modules([conv, bn, relu])
    assert [type(m) for m in out] == [F.ConvReLU2d, nn.Identity, nn.Identity]
    assert all(not m.training for m in out)
    assert F.get_fuser_method((nn.Conv2d, nn.BatchNorm2d)) is F.fuse_conv_bn
    with pytest.raises(NotImplementedError, match=r"Cannot fuse the module types \(Conv2d, ReLU6\).*Supported sequences: .*\(Conv2d, BatchNorm2d, ReLU\)"):
        F.get_fuser_method((nn.Conv2d, nn.ReLU6))


# --------------------------------------------------------------------------
# Real models: torchvision resnet18 / mobilenet_v2, random BN statistics
# --------------------------------------------------------------------------
def resnet18_groups(model: nn.Module) -> list[list[str]]:
    """Stem conv-bn-relu; conv-bn pairs in blocks (BasicBlock reuses its relu twice)."""
    groups = [["conv1", "bn1", "relu"]]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(model, layer)):
            prefix = f"{layer}.{index}"
            groups += [[f"{prefix}.conv1", f"{prefix}.bn1"], [f"{prefix}.conv2", f"{prefix}.bn2"]]
            if block.downsample is not None:
                groups.append([f"{prefix}.downsample.0", f"{prefix}.downsample.1"])
    return groups


def sequential_conv_bn_groups(model: nn.Module) -> list[list[str]]:
    """Every (Conv2d, BatchNorm2d) pair of neighbours inside an nn.Sequential."""
    groups = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (a, first), (b, second) in zip(children, children[1:]):
                if type(first) is nn.Conv2d and type(second) is nn.BatchNorm2d:
                    groups.append([f"{name}.{a}", f"{name}.{b}"])
    return groups


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """scikit-learn's two sample photos, centre-cropped to 224x224, ImageNet-normalized."""
    crops = []
    for image in load_sample_images().images:
        h, w, _ = image.shape
        top, left = (h - 224) // 2, (w - 224) // 2
        crops.append(torch.from_numpy(np.ascontiguousarray(image[top : top + 224, left : left + 224])))
    x = torch.stack(crops).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize(
    "builder, grouper, n_groups",
    [
        (torchvision.models.resnet18, resnet18_groups, 20),
        (torchvision.models.mobilenet_v2, sequential_conv_bn_groups, 52),
    ],
    ids=["resnet18", "mobilenet_v2"],
)
def test_real_models_match_unfused_and_torch(builder, grouper, n_groups, photos):
    torch.manual_seed(0)
    model = randomize_all_bn(builder(weights=None), seed=1).eval()
    groups = grouper(model)
    assert len(groups) == n_groups
    ours = F.fuse_modules(model, groups)
    theirs = torch_quantization.fuse_modules(model, groups)
    assert repr(ours) == repr(theirs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_groups  # caller's model intact
    random_inputs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for x in (random_inputs, photos):
            reference = model(x)
            assert reference.abs().max() > 0
            assert max_rel(reference, ours(x)) <= 1e-4
            assert max_rel(theirs(x), ours(x)) <= 1e-5
    # The fold is not a no-op: dropping BatchNorm instead of folding it changes the output a lot.
    dropped = F.fuse_modules(model, groups, fuser_func=lambda mods, is_qat, extra: [mods[0]] + [nn.Identity() for _ in mods[1:]])
    with torch.no_grad():
        assert max_rel(model(random_inputs), dropped(random_inputs)) > 1e-1


# --------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 5), nn.BatchNorm1d(5), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn2(self.conv2(self.block(x))))


def make_net() -> Net:
    torch.manual_seed(0)
    return randomize_all_bn(Net(), seed=3).eval()


@pytest.mark.parametrize("group", [["block.conv", "block.bn"], ["block.conv", "block.bn", "block.relu"]])
def test_first_pre_hook_runs_exactly_once_and_kwargs_hooks_survive(group):
    model = make_net()
    calls = {"pre": 0, "pre_kw": 0}

    def count_pre(module, args):
        calls["pre"] += 1

    def double_input(module, args, kwargs):  # with_kwargs pre-hook: changes the input
        calls["pre_kw"] += 1
        return (args[0] * 2,), kwargs

    model.block.conv.register_forward_pre_hook(count_pre)
    model.block.conv.register_forward_pre_hook(double_input, with_kwargs=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
    assert calls == {"pre": 1, "pre_kw": 1}
    fused = F.fuse_modules(model, group)
    calls.update(pre=0, pre_kw=0)
    with torch.no_grad():
        out = fused(x)
    assert calls == {"pre": 1, "pre_kw": 1}  # exactly once each (torch: twice)
    assert max_rel(reference, out) <= 1e-5  # input doubled once, not twice
    assert len(fused.block.conv._forward_pre_hooks) == 2
    assert len(fused.block.conv._forward_pre_hooks_with_kwargs) == 1
    for inner in fused.block.conv.modules():
        if inner is not fused.block.conv:
            assert not inner._forward_pre_hooks


def test_last_forward_hook_moves_and_handles_still_remove_hooks():
    model = make_net()
    seen = []
    seen_kw = []
    model.block.relu.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    handle = model.block.relu.register_forward_hook(
        lambda m, args, kwargs, out: seen_kw.append(out.clone()), with_kwargs=True, always_call=True
    )
    pre_handle = model.block.conv.register_forward_pre_hook(lambda m, args: None)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    reference = seen.pop()
    seen_kw.clear()
    fused = F.fuse_modules(model, [["block.conv", "block.bn", "block.relu"]], inplace=True)
    assert fused is model and type(model.block.conv) is F.ConvReLU2d
    with torch.no_grad():
        model(x)
    assert len(seen) == 1 and len(seen_kw) == 1  # each forward hook ran once, on the fused module
    assert max_rel(reference, seen[0]) <= 1e-5 and torch.equal(seen[0], seen_kw[0])
    assert model.block.conv._forward_hooks_always_called  # flag kept
    handle.remove()  # the handle from before fusion still works on the fused module
    pre_handle.remove()
    assert len(model.block.conv._forward_hooks) == 1 and not model.block.conv._forward_pre_hooks
    with torch.no_grad():
        model(x)
    assert len(seen) == 2 and len(seen_kw) == 1


def test_hooks_on_absorbed_modules_warn_with_name_and_function():
    model = make_net()
    ran = []

    def bn_middle_hook(module, args, out):
        ran.append("bn")

    def conv_forward_hook(module, args, out):
        ran.append("conv")

    def relu_pre_hook(module, args):
        ran.append("relu")

    model.block.bn.register_forward_hook(bn_middle_hook)
    model.block.conv.register_forward_hook(conv_forward_hook)
    model.block.relu.register_forward_pre_hook(relu_pre_hook)
    with pytest.warns(UserWarning) as record:
        fused = F.fuse_modules(model, ["block.conv", "block.bn", "block.relu"])
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert any("bn_middle_hook" in m and "'block.bn' (BatchNorm2d)" in m for m in messages)
    assert any("conv_forward_hook" in m and "'block.conv' (Conv2d)" in m for m in messages)
    assert any("relu_pre_hook" in m and "'block.relu' (ReLU)" in m and "pre-hook" in m for m in messages)
    with torch.no_grad():
        fused(torch.randn(2, 3, 8, 8))
    assert ran == []  # dropped, as announced
    # BN first in a BN+ReLU group: its forward hook and ReLU's pre-hook cannot survive.
    with pytest.warns(UserWarning) as record:
        F.fuse_modules(model, ["block.bn", "block.relu"])
    assert len(record) == 2
    assert re.search(r"forward hook '.*bn_middle_hook' on 'block\.bn' \(BatchNorm2d\)", str(record[0].message))
    assert re.search(r"forward pre-hook '.*relu_pre_hook' on 'block\.relu' \(ReLU\)", str(record[1].message))
    assert all(w.filename == __file__ for w in record)  # points at the caller's line
    # Without names (fuse_known_modules called directly) the type is named.
    with pytest.warns(UserWarning) as record:
        F.fuse_known_modules([copy.deepcopy(model.block.bn), copy.deepcopy(model.block.relu)])
    assert len(record) == 2 and re.search(r"bn_middle_hook' on BatchNorm2d:", str(record[0].message))
    # As the last module of Conv+BN, BN's forward hook moves instead: only conv's forward hook warns.
    with pytest.warns(UserWarning, match=r"conv_forward_hook' on 'block\.conv' \(Conv2d\)") as record:
        moved = F.fuse_modules(model, ["block.conv", "block.bn"])
    assert len(record) == 1
    with torch.no_grad():
        moved(torch.randn(2, 3, 8, 8))
    assert ran == ["bn", "relu"]


# --------------------------------------------------------------------------
# Bad input: clear messages, nothing half-applied, caller's model untouched
# --------------------------------------------------------------------------


def hooked_net() -> Net:
    model = make_net()
    model.block.conv.register_forward_pre_hook(lambda m, args: None)
    model.block.relu.register_forward_hook(lambda m, args, out: None)
    model.bn2.register_forward_hook(lambda m, args, out: None)
    return model


def _set_conv2_training(model):
    model.conv2.train()


def _train_everything(model):
    model.train()


def _shrink_bn2(model):
    model.bn2 = nn.BatchNorm2d(4).eval()


def _alias_bn2(model):
    model.bn2_alias = model.bn2


BAD_INPUTS = {
    # name: (model edit, groups, exception, message pattern)
    "unknown_name": (None, [["block.conv", "block.bn"], ["conv2", "bn_2"]], F.FusionError,
                     r"Net has no submodule named 'bn_2'\. Did you mean 'bn2'"),
    "unknown_dotted_name": (None, [["block.conv", "block.bnn"]], F.FusionError,
                            r"no submodule named 'block\.bnn'\. Did you mean 'block\.bn'"),
    "unsupported_sequence": (None, [["block.conv", "block.bn"], ["bn2", "conv2"]], NotImplementedError,
                             r"Group \['bn2', 'conv2'\]: Cannot fuse the module types \(BatchNorm2d, Conv2d\).*Supported sequences: .*\(Conv2d, BatchNorm2d\)"),
    "mixed_modes": (_set_conv2_training, [["block.conv", "block.bn"], ["conv2", "bn2"]], F.FusionError,
                    r"'conv2' \(Conv2d\) is in training mode but 'bn2' \(BatchNorm2d\) is in eval mode"),
    "training_mode": (_train_everything, [["block.conv", "block.bn", "block.relu"]], F.FusionError,
                      r"(?i)Cannot fold 'block\.bn' \(BatchNorm2d\).*call model\.eval\(\) first, or use fuse_modules_qat"),
    "num_features": (_shrink_bn2, [["block.conv", "block.bn"], ["conv2", "bn2"]], F.FusionError,
                     r"'conv2' \(Conv2d\) \(out_channels=6\) with 'bn2' \(BatchNorm2d\) \(num_features=4\)"),
    "name_in_two_groups": (None, [["block.conv", "block.bn"], ["block.bn", "block.relu"]], F.FusionError,
                           r"'block\.bn' is listed twice"),
    "alias_in_two_groups": (_alias_bn2, [["conv2", "bn2"], ["bn2_alias", "block.relu"]], F.FusionError,
                            r"'bn2_alias' is the same module as 'bn2'"),
    "mixed_list": (None, ["block.conv", ["block.bn"]], F.FusionError, r"not a mix"),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_rejected_and_nothing_changes(case, inplace):
    edit, groups, error, pattern = BAD_INPUTS[case]
    model = hooked_net()
    if edit is not None:
        edit(model)
    before = fingerprint(model)
    with pytest.raises(error, match=pattern):
        F.fuse_modules(model, groups, inplace=inplace)
    assert_unchanged(model, before)


def test_inplace_false_never_touches_the_callers_model():
    model = hooked_net()
    before = fingerprint(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
    fused = F.fuse_modules(model, [["block.conv", "block.bn", "block.relu"], ["conv2", "bn2"], ["head.1", "head.2", ]])
    assert fused is not model
    assert_unchanged(model, before)
    assert type(fused.head[1]) is nn.Linear and type(fused.head[2]) is nn.Identity
    assert len(fused.block.conv._forward_pre_hooks) == 1 and len(fused.block.conv._forward_hooks) == 1
    with torch.no_grad():
        assert max_rel(reference, fused(x)) <= 1e-5
        assert torch.equal(model(x), reference)


def test_failing_custom_fuser_restores_model_inplace():
    model = hooked_net()
    handle = model.block.conv.register_forward_pre_hook(lambda m, args: None)
    original_conv = model.block.conv
    before = fingerprint(model)
    calls = []

    def fails_on_second_group(mod_list, is_qat, additional_fuser_method_mapping):
        calls.append(len(mod_list))
        if len(calls) == 2:
            raise RuntimeError("fuser broke on group 2")
        return F.fuse_known_modules(mod_list, is_qat, additional_fuser_method_mapping)

    with pytest.raises(RuntimeError, match="fuser broke on group 2"):
        F.fuse_modules(
            model, [["block.conv", "block.bn", "block.relu"], ["conv2", "bn2"]],
            inplace=True, fuser_func=fails_on_second_group,
        )
    assert calls == [3, 2]  # the first group had been fused, then undone
    assert_unchanged(model, before)
    assert model.block.conv is original_conv
    handle.remove()  # handles still point at the restored hook dicts
    assert len(model.block.conv._forward_pre_hooks) == 1
    # and the model still fuses fine afterwards
    fused = F.fuse_modules(model, [["block.conv", "block.bn", "block.relu"], ["conv2", "bn2"]], inplace=True)
    assert type(fused.block.conv) is F.ConvReLU2d and type(fused.bn2) is nn.Identity


def test_fuser_returning_wrong_length_is_rejected_and_restored():
    model = hooked_net()
    before = fingerprint(model)
    with pytest.raises(F.FusionError, match=r"returned 1 modules for the 2 names"):
        F.fuse_modules(model, ["conv2", "bn2"], inplace=True, fuser_func=lambda mods, qat, extra: [nn.Identity()])
    assert_unchanged(model, before)


# --------------------------------------------------------------------------
# fuse_custom_config_dict / additional fuser methods
# --------------------------------------------------------------------------
class ConvReLU6(nn.Sequential):
    pass


def fuse_conv_relu6(is_qat, conv, relu6):
    return ConvReLU6(conv, relu6)


def test_additional_fuser_method_mapping():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6()).eval()
    config = {"additional_fuser_method_mapping": {(nn.Conv2d, nn.ReLU6): fuse_conv_relu6}}
    with pytest.raises(NotImplementedError, match=r"\(Conv2d, ReLU6\)"):
        F.fuse_modules(model, ["0", "1"])
    fused = F.fuse_modules(model, ["0", "1"], fuse_custom_config_dict=config)
    theirs = torch_quantization.fuse_modules(model, ["0", "1"], fuse_custom_config_dict=config)
    assert repr(fused) == repr(theirs)
    assert type(fused[0]) is ConvReLU6 and type(fused[1]) is nn.Identity
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(model(x), fused(x))
    assert F.get_fuser_method((nn.Conv2d, nn.ReLU6), config["additional_fuser_method_mapping"]) is fuse_conv_relu6
    with pytest.raises(F.FusionError, match="Unknown fuse_custom_config_dict keys"):
        F.fuse_modules(model, ["0", "1"], fuse_custom_config_dict={"additional_fuser_method_map": {}})


# --------------------------------------------------------------------------
# QAT: fuse_modules_qat keeps BatchNorm trainable
# --------------------------------------------------------------------------
def test_fuse_modules_qat_modules_train():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()),  # 0
        nn.Flatten(2),  # 1: [N, 6, 36] for the 1d layers
        nn.Conv1d(6, 6, 1),  # 2
        nn.BatchNorm1d(6),  # 3
        nn.Flatten(),  # 4
        nn.Linear(6 * 36, 4),  # 5
        nn.BatchNorm1d(4),  # 6
    ).train()
    groups = [["0.0", "0.1", "0.2"], ["2", "3"], ["5", "6"]]
    fused = F.fuse_modules_qat(model, groups)
    theirs = torch_quantization.fuse_modules_qat(model, groups)
    assert repr(fused) == repr(theirs)
    assert type(fused[0][0]) is F.ConvBnReLU2d and type(fused[2]) is F.ConvBn1d and type(fused[5]) is F.LinearBn1d
    assert fused.training and fused[0][0].training and fused[0][0][1].training
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert max_rel(copy.deepcopy(model)(x), copy.deepcopy(fused)(x)) <= 1e-6  # same math in training mode
    conv, bn = fused[0][0][0], fused[0][0][1]
    weight_before, mean_before, gamma_before = conv.weight.detach().clone(), bn.running_mean.clone(), bn.weight.detach().clone()
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.1)
    loss = fused(x).square().mean()
    loss.backward()
    optimizer.step()
    assert (conv.weight - weight_before).abs().max().item() > 1e-6
    assert (bn.weight - gamma_before).abs().max().item() > 1e-6
    assert (bn.running_mean - mean_before).abs().max().item() > 1e-4
    assert bn.num_batches_tracked.item() == 1


def test_fuse_modules_qat_conv_transpose_is_not_implemented():
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = fingerprint(model)
    with pytest.raises(NotImplementedError, match=r"ConvTranspose2d.*not supported for QAT"):
        F.fuse_modules_qat(model, ["0", "1"], inplace=True)
    assert_unchanged(model, before)
    with pytest.raises(F.FusionError, match=r"\(out_channels=4\) with BatchNorm2d \(num_features=5\)"):
        F.fuse_known_modules([nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)], is_qat=True)


def test_empty_group_list_is_a_no_op_copy():
    model = make_net()
    fused = F.fuse_modules(model, [])
    assert fused is not model and repr(fused) == repr(model)
    assert math.isclose(sum(p.sum().item() for p in fused.parameters()), sum(p.sum().item() for p in model.parameters()))


@pytest.mark.parametrize("module", [F, folding, fused_modules], ids=lambda m: m.__name__)
def test_fusionlib_fusion_does_not_use_torch_ao(module):
    source = open(module.__file__, encoding="utf-8").read()
    assert not re.search(r"^\s*(from|import)\s+torch\.ao", source, flags=re.MULTILINE)
    assert "torch.ao" not in {line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))}


def test_every_public_name_is_importable_from_fusion_and_is_the_one_object():
    assert set(F.__all__) >= set(folding.__all__) | set(fused_modules.__all__)
    for name in F.__all__:
        origin = folding if name in folding.__all__ else fused_modules if name in fused_modules.__all__ else F
        assert getattr(F, name) is getattr(origin, name), name
    assert F.fuse_conv_bn_weights.__module__ == "fusionlib.folding"


CONTAINERS = {
    "ConvReLU1d": (nn.Conv1d, nn.ReLU), "ConvReLU2d": (nn.Conv2d, nn.ReLU), "ConvReLU3d": (nn.Conv3d, nn.ReLU),
    "LinearReLU": (nn.Linear, nn.ReLU), "BNReLU1d": (nn.BatchNorm1d, nn.ReLU),
    "BNReLU2d": (nn.BatchNorm2d, nn.ReLU), "BNReLU3d": (nn.BatchNorm3d, nn.ReLU),
    "ConvBn1d": (nn.Conv1d, nn.BatchNorm1d), "ConvBn2d": (nn.Conv2d, nn.BatchNorm2d),
    "ConvBn3d": (nn.Conv3d, nn.BatchNorm3d), "ConvBnReLU1d": (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
    "ConvBnReLU2d": (nn.Conv2d, nn.BatchNorm2d, nn.ReLU), "ConvBnReLU3d": (nn.Conv3d, nn.BatchNorm3d, nn.ReLU),
    "LinearBn1d": (nn.Linear, nn.BatchNorm1d),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONTAINERS))
def test_fused_containers_are_written_out_classes_that_check_their_modules(name):
    container = getattr(F, name)
    # A `class` statement of its own (readable, greppable, picklable), not a class built at run time.
    assert inspect.getsource(container).startswith(f"class {name}(FusedSequential):")
    assert container.module_types == CONTAINERS[name]
    with pytest.raises(F.FusionError, match=rf"{name} takes \(.*\), got \(Identity, Identity\)"):
        container(nn.Identity(), nn.Identity())
    namesake = getattr(torch_intrinsic, name, None)
    assert namesake is not None or name == "BNReLU1d"  # torch has every one but BNReLU1d
