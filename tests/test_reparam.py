"""fusionlib.reparam: the branch algebra, RepBlock in every configuration, whole models against the multi-branch model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusionlib import anatomy, fx, models, recipes
from fusionlib.fusion import fuse_modules
from fusionlib.reparam import (
    RepBlock,
    count_rep_blocks,
    fold_bn,
    identity_kernel,
    merge_branches,
    merge_conv_branches,
    pad_kernel_to,
    reparameterize_model,
)
from fusionlib.verify import compare_outputs
from batchnorm_stats import randomize_batchnorm
from model_fingerprint import assert_unchanged, fingerprint

RTOL = 1e-5  # deployed vs multi-branch (eval), fp32, relative to the largest output


# ----------------------------------------------------------------------------- the algebra
@pytest.mark.parametrize("k0, k", [(1, 3), (3, 5), (1, 7), (3, 3)])
def test_pad_kernel_to_puts_the_kernel_at_the_centre(k0, k):
    torch.manual_seed(0)
    kernel = torch.randn(4, 2, k0, k0)
    padded = pad_kernel_to(kernel, k)
    p = (k - k0) // 2
    assert padded.shape == (4, 2, k, k) and padded.dtype == kernel.dtype
    assert torch.equal(padded[:, :, p:p + k0, p:p + k0], kernel)
    outside = padded.clone()
    outside[:, :, p:p + k0, p:p + k0] = 0
    assert not outside.any()  # zeros everywhere else
    # As a convolution: k0 x k0 with padding k0//2 == k x k with padding k//2, any stride.
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    for stride in (1, 2):
        small = F.conv2d(x, kernel.double(), stride=stride, padding=k0 // 2)
        big = F.conv2d(x, padded.double(), stride=stride, padding=k // 2)
        torch.testing.assert_close(small, big, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel, k, pattern", [
    (torch.zeros(2, 2, 1, 1), 4, r"k must be a positive odd int, got 4"),
    (torch.zeros(2, 2, 2, 2), 4, r"the kernel's size k0 must be a positive odd int, got 2"),
    (torch.zeros(2, 2, 5, 5), 3, r"cannot pad a 5x5 kernel to the smaller size k=3"),
    (torch.zeros(2, 2, 3), 3, r"square \[O, I, k0, k0\] kernel, got shape \(2, 2, 3\)"),
    (torch.zeros(2, 2, 1, 3), 3, r"got shape \(2, 2, 1, 3\)"),
])
def test_pad_kernel_to_rejects_bad_sizes(kernel, k, pattern):
    with pytest.raises(ValueError, match=pattern):
        pad_kernel_to(kernel, k)


@pytest.mark.parametrize("channels, groups, k", [(6, 1, 3), (6, 3, 3), (6, 6, 3), (4, 2, 5), (5, 1, 1)])
def test_identity_kernel_is_the_identity_convolution(channels, groups, k):
    kernel = identity_kernel(channels, k, groups, dtype=torch.float64)
    per_group = channels // groups
    assert kernel.shape == (channels, per_group, k, k) and kernel.dtype == torch.float64
    assert kernel.sum() == channels  # exactly one 1 per filter
    for o in range(channels):
        assert kernel[o, o % per_group, k // 2, k // 2] == 1
    x = torch.randn(2, channels, 7, 7, dtype=torch.float64)
    assert torch.equal(F.conv2d(x, kernel, padding=k // 2, groups=groups), x)


def test_identity_kernel_by_hand():
    assert identity_kernel(2, 3).tolist() == [
        [[[0, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0], [0, 0, 0]]],
        [[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 1, 0], [0, 0, 0]]],
    ]
    # grouped, C=4, g=2: filter o sees channels of its group; o % 2 picks the one it copies
    assert identity_kernel(4, 1, groups=2)[:, :, 0, 0].tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]
    assert identity_kernel(3, 1, groups=3)[:, :, 0, 0].tolist() == [[1], [1], [1]]  # depthwise


@pytest.mark.parametrize("args, pattern", [
    ((6, 4), r"kernel_size must be a positive odd int, got 4"),
    ((6, 3, 4), r"groups=4 must divide channels=6"),
    ((0, 3), r"channels must be a positive int, got 0"),
])
def test_identity_kernel_rejects_bad_arguments(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        identity_kernel(*args)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_bn_is_bn_of_conv_in_float64(with_bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=with_bias)
    bn = randomize_batchnorm(nn.BatchNorm2d(6), seed=1, random_eps=True).eval()
    weight, bias = fold_bn(conv.weight, conv.bias, bn)
    assert weight.dtype == bias.dtype == torch.float64 and not isinstance(weight, nn.Parameter)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        reference = bn.double()(conv.double()(x))
        torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), reference, rtol=1e-12, atol=1e-12)


def test_fold_bn_refuses_training_mode_and_wrong_channels():
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match="training mode"):
        fold_bn(conv.weight, None, nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=r"3 output channels but the BatchNorm has num_features=4"):
        fold_bn(conv.weight, None, nn.BatchNorm2d(4).eval())


def test_merge_branches_sums_in_float64_and_rounds_once():
    generator = torch.Generator().manual_seed(2)
    branches = [(torch.randn(8, 4, 3, 3, generator=generator, dtype=torch.float64),
                 torch.randn(8, generator=generator, dtype=torch.float64)),
                (torch.randn(8, 4, 1, 1, generator=generator, dtype=torch.float64), None),
                (identity_kernel(8, 3, groups=2, dtype=torch.float64),
                 torch.randn(8, generator=generator, dtype=torch.float64))]
    weight, bias = merge_branches(branches, 3, torch.float32)
    exact_w = branches[0][0] + pad_kernel_to(branches[1][0], 3) + branches[2][0]
    exact_b = branches[0][1] + branches[2][1]
    assert weight.dtype == bias.dtype == torch.float32
    assert torch.equal(weight, exact_w.float()) and torch.equal(bias, exact_b.float())  # one rounding
    with pytest.raises(ValueError, match=r"same \[out_channels, in_channels/groups\]"):
        merge_branches([branches[0], (torch.zeros(8, 2, 1, 1), None)], 3, torch.float32)
    with pytest.raises(ValueError, match="at least one"):
        merge_branches([], 3, torch.float32)


# ----------------------------------------------------------------------------- the seed example, no BatchNorm
def test_seed_example_matches_a_hand_written_kernel():
    """conv3x3(x) + conv1x1(x) + x on 2 channels: W = W3 + centre(W1) + I, b = b3 + b1."""
    torch.manual_seed(3)
    conv3, conv1 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)
    before3, before1 = fingerprint(conv3), fingerprint(conv1)
    merged = merge_conv_branches(conv3, conv1, identity=True)
    with torch.no_grad():
        expected_w = conv3.weight.detach().clone()
        expected_w[:, :, 1, 1] += conv1.weight[:, :, 0, 0]  # the 1x1 kernel lands on the centre tap
        expected_w[0, 0, 1, 1] += 1  # identity: output channel 0 copies input channel 0
        expected_w[1, 1, 1, 1] += 1  # ... and 1 copies 1
        expected_b = conv3.bias + conv1.bias
    torch.testing.assert_close(merged.weight, expected_w, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged.bias, expected_b, rtol=0, atol=1e-7)
    assert (merged.kernel_size, merged.padding, merged.stride) == ((3, 3), (1, 1), (1, 1))
    x = torch.randn(4, 2, 6, 6)
    with torch.no_grad():
        result = compare_outputs(conv3(x) + conv1(x) + x, merged(x), rtol=RTOL, name="seed example")
    assert result.passed, str(result)
    assert_unchanged(conv3, before3)
    assert_unchanged(conv1, before1)
    assert merged.weight.data_ptr() not in (conv3.weight.data_ptr(), conv1.weight.data_ptr())


@pytest.mark.parametrize("stride, groups, in_channels, out_channels, with_1x1, identity", [
    (2, 1, 4, 6, True, False), (1, 2, 4, 4, True, True), (1, 4, 4, 4, False, True), (1, 1, 3, 3, True, False),
])
def test_merge_conv_branches_configurations(stride, groups, in_channels, out_channels, with_1x1, identity):
    torch.manual_seed(4)
    conv3 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=False)
    conv1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups) if with_1x1 else None
    merged = merge_conv_branches(conv3, conv1, identity)
    x = torch.randn(2, in_channels, 9, 9)
    with torch.no_grad():
        reference = conv3(x) + (conv1(x) if conv1 is not None else 0) + (x if identity else 0)
        result = compare_outputs(reference, merged(x), rtol=RTOL)
    assert result.passed, str(result)


MERGE_BAD_INPUTS = {
    # name: (conv_kxk, conv_1x1, identity, exception, message pattern)
    "mismatched_strides": (nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 1, 2), False, ValueError,
                           r"conv_kxk has stride=\(1, 1\) but conv_1x1 has stride=\(2, 2\)"),
    "misaligned_1x1_padding": (nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 1, padding=1), False, ValueError,
                               r"conv_1x1 has padding=\(1, 1\).*use padding=0"),
    "misaligned_kxk_padding": (nn.Conv2d(4, 4, 3, 1, 0), nn.Conv2d(4, 4, 1), False, ValueError,
                               r"conv_kxk has padding=\(0, 0\), but only padding=1 \(k//2\)"),
    "even_kernel": (nn.Conv2d(4, 4, 4, 1, 2), None, False, ValueError,
                    r"conv_kxk's kernel size must be a positive odd int, got 4"),
    "mismatched_groups": (nn.Conv2d(4, 4, 3, 1, 1, groups=2), nn.Conv2d(4, 4, 1), False, ValueError,
                          r"conv_kxk has groups=2 but conv_1x1 has groups=1"),
    "mismatched_out_channels": (nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 6, 1), False, ValueError,
                                r"out_channels=4 but conv_1x1 has out_channels=6"),
    "identity_with_other_channels": (nn.Conv2d(4, 6, 3, 1, 1), None, True, ValueError,
                                     r"identity=True needs in_channels == out_channels, got in_channels=4, out_channels=6"),
    "identity_with_stride_2": (nn.Conv2d(4, 4, 3, 2, 1), None, True, ValueError,
                               r"identity=True needs stride 1.*stride=\(2, 2\)"),
    "not_a_conv": (nn.Linear(4, 4), None, False, TypeError, r"conv_kxk must be an nn.Conv2d, got Linear"),
}


@pytest.mark.parametrize("case", list(MERGE_BAD_INPUTS))
def test_merge_conv_branches_bad_input_is_rejected_and_nothing_changes(case):
    conv_kxk, conv_1x1, identity, error, pattern = MERGE_BAD_INPUTS[case]
    before = [fingerprint(m) for m in (conv_kxk, conv_1x1) if m is not None]
    with pytest.raises(error, match=pattern):
        merge_conv_branches(conv_kxk, conv_1x1, identity)
    for module, fp in zip([m for m in (conv_kxk, conv_1x1) if m is not None], before):
        assert_unchanged(module, fp)


# ----------------------------------------------------------------------------- RepBlock
BLOCK_CONFIGS = {
    # name: (in_channels, out_channels, stride, groups, extra kwargs) -- identity present iff in == out and stride 1
    "dense_same_s1": (6, 6, 1, 1, {}),
    "dense_same_s2": (6, 6, 2, 1, {}),
    "dense_wider_s1": (6, 12, 1, 1, {}),
    "dense_wider_s2": (6, 12, 2, 1, {}),
    "groups3_same_s1": (6, 6, 1, 3, {}),
    "groups3_same_s2": (6, 6, 2, 3, {}),
    "groups3_wider_s1": (6, 9, 1, 3, {}),
    "groups3_wider_s2": (6, 12, 2, 3, {}),
    "depthwise_s1": (6, 6, 1, 6, {}),
    "depthwise_s2": (6, 6, 2, 6, {}),
    "depthwise_multiplier2_s1": (6, 12, 1, 6, {}),
    "dense_5x5_s1": (4, 4, 1, 1, {"kernel_size": 5}),
    "depthwise_5x5_s2": (4, 4, 2, 4, {"kernel_size": 5}),
    "no_1x1_s1": (6, 6, 1, 3, {"use_1x1": False}),
    "no_identity_s1": (6, 6, 1, 1, {"use_identity": False}),
    "only_kxk_1x1": (6, 6, 1, 6, {"kernel_size": 1}),
}


def make_block(case: str, seed: int = 0) -> RepBlock:
    in_channels, out_channels, stride, groups, kwargs = BLOCK_CONFIGS[case]
    torch.manual_seed(seed)
    block = RepBlock(in_channels, out_channels, stride=stride, groups=groups, **kwargs)
    return randomize_batchnorm(block, seed, random_eps=True).eval()


@pytest.mark.parametrize("case", list(BLOCK_CONFIGS))
def test_deployed_block_equals_multi_branch_with_random_batchnorm(case):
    block = make_block(case)
    in_channels, out_channels, stride, groups, kwargs = BLOCK_CONFIGS[case]
    k = kwargs.get("kernel_size", 3)
    expect_identity = kwargs.get("use_identity", in_channels == out_channels and stride == 1)
    assert (block.identity is not None) == expect_identity
    assert (block.conv_1x1 is not None) == kwargs.get("use_1x1", True)
    x = torch.randn(3, in_channels, 9, 9)  # odd size: stride 2 rounds down the same way in every branch
    with torch.no_grad():
        reference = block(x)
        assert block.reparameterize() is block
        result = compare_outputs(reference, block(x), rtol=RTOL, name=case)
    assert result.passed, str(result)
    assert block.is_deployed and block.conv_kxk is None and block.conv_1x1 is None and block.identity is None
    conv = block.deployed
    assert type(conv) is nn.Conv2d and conv.bias is not None
    assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == ((k, k), (stride, stride), (k // 2,) * 2, groups)
    assert [type(m) for m in block.modules()] == [RepBlock, nn.Conv2d]
    assert set(block.state_dict()) == {"deployed.weight", "deployed.bias"}


@pytest.mark.parametrize("case", ["dense_same_s1", "groups3_same_s1", "depthwise_s1"])
def test_deployed_block_in_float64_is_exact_to_1e12(case):
    block = make_block(case, seed=1).double()
    x = torch.randn(2, block.in_channels, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        reference = block(x)
        block.reparameterize()
        assert block.deployed.weight.dtype == torch.float64
        assert compare_outputs(reference, block(x), rtol=1e-12).passed


def test_block_branch_names_and_forward_is_the_sum():
    block = make_block("dense_same_s1")
    assert isinstance(block.conv_kxk, nn.Sequential) and isinstance(block.conv_kxk[0], nn.Conv2d)
    assert isinstance(block.conv_kxk[1], nn.BatchNorm2d) and isinstance(block.conv_1x1[1], nn.BatchNorm2d)
    assert block.conv_kxk[0].bias is None and block.conv_1x1[0].kernel_size == (1, 1)
    assert isinstance(block.identity, nn.BatchNorm2d)
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        assert torch.equal(block(x), block.conv_kxk(x) + block.conv_1x1(x) + block.identity(x))


BLOCK_BAD_INPUTS = {
    # name: (kwargs, message pattern) -- all ValueError at construction
    "even_kernel": (dict(in_channels=4, out_channels=4, kernel_size=4), r"kernel_size must be a positive odd int, got 4"),
    "zero_kernel": (dict(in_channels=4, out_channels=4, kernel_size=0), r"kernel_size must be a positive odd int, got 0"),
    "misaligned_padding": (dict(in_channels=4, out_channels=4, kernel_size=3, padding=0),
                           r"padding=0 would misalign the branches.*padding=k//2=1"),
    "misaligned_padding_5x5": (dict(in_channels=4, out_channels=4, kernel_size=5, padding=1),
                               r"padding=1 would misalign the branches.*padding=k//2=2"),
    "groups_not_dividing": (dict(in_channels=6, out_channels=8, groups=4),
                            r"groups=4 must divide in_channels and out_channels.*in_channels=6"),
    "identity_with_stride_2": (dict(in_channels=4, out_channels=4, stride=2, use_identity=True),
                               r"use_identity=True needs .*stride == 1.*stride=2"),
    "identity_with_other_channels": (dict(in_channels=4, out_channels=8, use_identity=True),
                                     r"use_identity=True needs in_channels == out_channels.*out_channels=8"),
    "zero_stride": (dict(in_channels=4, out_channels=4, stride=0), r"stride must be a positive int, got 0"),
}


@pytest.mark.parametrize("case", list(BLOCK_BAD_INPUTS))
def test_bad_block_arguments_fail_at_construction(case):
    kwargs, pattern = BLOCK_BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        RepBlock(**kwargs)


def test_reparameterize_in_training_mode_is_an_error_and_changes_nothing():
    block = make_block("dense_same_s1").train()
    before = fingerprint(block)
    with pytest.raises(ValueError, match=r"needs eval mode.*batch's statistics.*call model.eval\(\)"):
        block.reparameterize()
    assert_unchanged(block, before)
    block.eval()
    block.identity.train()  # one branch left in training mode is named
    with pytest.raises(ValueError, match=r"'identity'"):
        block.reparameterize()
    assert not block.is_deployed


def test_converting_twice_is_harmless():
    block = make_block("groups3_same_s1")
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        reference = block(x)
        deployed = block.reparameterize().deployed
        first = block(x)
        block.reparameterize()
        assert block.deployed is deployed and torch.equal(block(x), first)
    assert compare_outputs(reference, first, rtol=RTOL).passed
    model = nn.Sequential(block, make_block("dense_wider_s2")).eval()
    once = reparameterize_model(model)
    twice = reparameterize_model(once)
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))
    assert all(b.is_deployed for b in twice.modules() if isinstance(b, RepBlock))


def toy_model() -> nn.Sequential:
    torch.manual_seed(5)
    model = nn.Sequential(
        RepBlock(3, 8, stride=2), nn.ReLU(),
        RepBlock(8, 8, groups=8), nn.ReLU(),
        nn.Sequential(RepBlock(8, 8, groups=2), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    return randomize_batchnorm(model, seed=5, random_eps=True).eval()


def test_reparameterize_model_inplace_false_never_touches_the_callers_model():
    model = toy_model()
    before = fingerprint(model)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        reference = model(x)
    deployed = reparameterize_model(model)
    assert deployed is not model and count_rep_blocks(deployed) == count_rep_blocks(model) == 3
    assert_unchanged(model, before)
    assert not any(b.is_deployed for b in model.modules() if isinstance(b, RepBlock))
    with torch.no_grad():
        result = compare_outputs(reference, deployed(x), rtol=RTOL, name="toy model")
    assert result.passed, str(result)
    assert reparameterize_model(model, inplace=True) is model and model[0].is_deployed


def test_reparameterize_model_in_training_mode_names_the_modules_and_changes_nothing():
    model = toy_model()
    model[4][0].train()
    before = fingerprint(model)
    for inplace in (False, True):
        with pytest.raises(ValueError, match=r"'4\.0'.*'4\.0\.conv_kxk'.*call model\.eval\(\) first"):
            reparameterize_model(model, inplace=inplace)
        assert_unchanged(model, before)


def test_reparameterize_model_after_fuse_model_folded_the_branches():
    """fuse_model (fusion_groups) also folds a RepBlock's own (conv, bn) branch pairs; reparameterizing still works."""
    block = make_block("depthwise_s1")
    wrapped = nn.Sequential(block)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        reference = block(x)
        wrapped = fuse_modules(wrapped, [["0.conv_kxk.0", "0.conv_kxk.1"]])
        deployed = reparameterize_model(wrapped)
        assert compare_outputs(reference, deployed(x), rtol=RTOL).passed


def _is_nearest(rounded: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per element: no neighbour of ``rounded`` (in its own dtype) is closer to the float64 ``exact``."""
    error = (rounded.double() - exact).abs()
    return torch.stack([(torch.nextafter(rounded, torch.full_like(rounded, d)).double() - exact).abs() >= error
                        for d in (float("inf"), float("-inf"))]).all(0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_deployed_weights_are_the_nearest_reduced_numbers_to_the_exact_merge(dtype):
    torch.manual_seed(0)
    block = randomize_batchnorm(RepBlock(256, 256, 3)).eval().to(dtype)
    exact = copy.deepcopy(block).double().deployed_conv()  # the same values in float64: nothing to round
    deployed = block.deployed_conv()
    assert deployed.weight.dtype == dtype
    assert bool(_is_nearest(deployed.weight.detach(), exact.weight.detach()).all())
    assert bool(_is_nearest(deployed.bias.detach(), exact.bias.detach()).all())
    weight, _ = merge_branches([(w, b) for _, w, b in block.branch_kernels()], 3, dtype)
    assert torch.equal(weight, deployed.weight)


def test_reparameterize_keeps_channels_last():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(RepBlock(8, 8, 3), RepBlock(8, 16, 3, stride=2))).eval()
    model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    deployed = reparameterize_model(model)
    for block in deployed:
        assert block.deployed.weight.is_contiguous(memory_format=torch.channels_last)
    assert merge_conv_branches(model[0].conv_kxk[0], model[0].conv_1x1[0]).weight.is_contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        assert compare_outputs(model(x), deployed(x), rtol=RTOL).passed


def test_a_deployed_state_dict_loads_into_a_block_built_deployed():
    torch.manual_seed(0)
    block = randomize_batchnorm(RepBlock(8, 8, 3, groups=2)).eval()
    deployed = reparameterize_model(block)
    fresh = RepBlock(8, 8, 3, groups=2, deploy=True).eval()
    assert fresh.is_deployed and fresh.conv_kxk is None and fresh.conv_1x1 is None and fresh.identity is None
    assert repr(fresh) == repr(deployed)
    fresh.load_state_dict(deployed.state_dict())  # strict: the same keys
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        assert torch.equal(fresh(x), deployed(x))
        assert compare_outputs(block(x), fresh(x), rtol=RTOL).passed
    assert fresh.reparameterize() is fresh and reparameterize_model(fresh).is_deployed


# ----------------------------------------------------------------------------- course models
@pytest.fixture(scope="module", params=["rep_resnet18", "rep_mobilenet_v2"])
def rep_models(request):
    """(name, multi-branch eval model, deployed, deployed + fuse_model, deployed + fx.fuse_conv_bn, plain fused)."""
    name = request.param
    torch.manual_seed(0)
    multi = randomize_batchnorm(models.build(name), seed=0).eval()
    before = fingerprint(multi)
    deployed = reparameterize_model(multi)
    assert_unchanged(multi, before)
    fused = recipes.fuse_model(deployed)
    traced = fx.fuse_conv_bn(deployed)
    plain = recipes.fuse_model(randomize_batchnorm(models.build(name.removeprefix("rep_")), seed=0).eval())
    return name, multi, deployed, fused, traced, plain


def test_rep_models_have_the_expected_blocks(rep_models):
    name, multi, deployed, fused, traced, plain = rep_models
    expected = 16 if name == "rep_resnet18" else 17  # ResNet18: 8 blocks x 2 convs; MobileNetV2: 17 depthwise convs
    assert count_rep_blocks(multi) == count_rep_blocks(deployed) == expected
    assert not any(b.is_deployed for b in multi.modules() if isinstance(b, RepBlock))
    assert all(b.is_deployed for b in deployed.modules() if isinstance(b, RepBlock))
    assert traced.fusion_report.batchnorm_calls_after == 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_deployed_rep_model_has_the_plain_fused_models_layers_and_macs(rep_models):
    name, multi, deployed, fused, traced, plain = rep_models
    shape = (1, 3, 32, 32)
    reference = anatomy.layer_table(plain, shape)
    multi_table = anatomy.layer_table(multi, shape)
    for candidate in (fused, traced):
        table = anatomy.layer_table(candidate, shape)
        assert len(table) == len(reference)
        assert table.total_macs == reference.total_macs and table.total_params == reference.total_params
        assert [(r.kind, r.output_shape, r.macs, r.params) for r in table] == [
            (r.kind, r.output_shape, r.macs, r.params) for r in reference]
    assert multi_table.total_macs > reference.total_macs  # the branches cost extra until they are merged


@pytest.mark.parametrize("inputs", ["digits_batch", "photo_batch"])
def test_deployed_rep_model_equals_multi_branch(rep_models, inputs, request):
    name, multi, deployed, fused, traced, plain = rep_models
    x = request.getfixturevalue(inputs)
    with torch.inference_mode():
        reference = multi(x)
        results = [compare_outputs(reference, candidate(x), rtol=RTOL, name=f"{name} {label} {inputs}")
                   for label, candidate in (("deployed", deployed), ("fuse_model", fused), ("fx", traced))]
    assert float(reference.std()) > 0.01  # real, varied logits
    for result in results:
        print(result)
        assert result.passed, str(result)


def test_hooks_on_a_block_stay_and_hooks_on_its_branches_are_named():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(RepBlock(4, 4, 3), nn.ReLU())).eval()
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append("block"))
    model[0].conv_1x1[1].register_forward_hook(lambda m, args, out: seen.append("1x1 bn"))
    model[0].identity.register_forward_pre_hook(lambda m, args: seen.append("identity"))
    with pytest.warns(UserWarning) as caught:
        deployed = reparameterize_model(model)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "forward hook" in messages[0] and "'0.conv_1x1.1' (BatchNorm2d)" in messages[0] and "'0.deployed'" in messages[0]
    assert "forward pre-hook" in messages[1] and "'0.identity'" in messages[1]
    deployed(torch.randn(1, 4, 5, 5))
    assert seen == ["block"]
    with pytest.warns(UserWarning) as caught:  # the block alone: names inside it
        model[0].reparameterize()
    assert ["on 'conv_1x1.1'" in str(w.message) or "on 'identity'" in str(w.message) for w in caught] == [True] * 2
