"""Fusion everywhere (issue 16): every torchvision family, user subclasses, FrozenBatchNorm2d,
BatchNorm before a conv, and models torch.fx cannot trace (auto_fuse).

Numerical checks compare with the unmodified eager model, max|a - b| / max|a| <= 1e-4
(fp32); BatchNorm statistics are randomized so that folding is not the identity. All
torchvision models are built with weights=None (no downloads) and run on small inputs.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import fusionlib.fusion as F
from fusionlib.auto_fuse import AutoFuseError, AutoFuseReport
from fusionlib.folding import FusionError, fuse_bn_conv_eval, fuse_bn_conv_weights, is_batchnorm, stock_forward_base
from fusionlib.auto_fuse import auto_fuse
from fusionlib.fusion import fuse_known_modules, fuse_modules
from fusionlib.fx import count_batchnorm_nodes, fuse_conv_bn, max_relative_error, symbolic_trace
from fusionlib.verify import compare_outputs
from batchnorm_stats import randomize_batchnorm
from model_fingerprint import assert_unchanged, fingerprint

RTOL = 1e-4


# --------------------------------------------------------------------------- helpers

def randomize_all_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """randomize_batchnorm, FrozenBatchNorm2d included (its buffers), eps 1e-2 to make eps matter."""
    randomize_batchnorm(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = 1e-2
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.2 + 0.01)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def close(reference: nn.Module, candidate: nn.Module, *inputs: torch.Tensor) -> float:
    with torch.no_grad():
        err = max_relative_error(reference(*inputs), candidate(*inputs))
    assert err <= RTOL, f"max rel error {err:.3e} > {RTOL}"
    return err


class MyConv(nn.Conv2d):
    """A user's conv with the stock forward: it only adds a method."""

    def describe(self) -> str:
        return f"{self.in_channels}->{self.out_channels}"


class ScaledConv(nn.Conv2d):
    """A user's conv that overrides forward: it is not a Conv2d any more."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class MyBatchNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


class Block(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


# --------------------------------------------------------------------------- the leaf rule

def test_stock_forward_base() -> None:
    from torchvision.models.video.resnet import Conv2Plus1D, Conv3DNoTemporal, Conv3DSimple

    assert stock_forward_base(MyConv) is nn.Conv2d
    assert stock_forward_base(Conv3DSimple) is nn.Conv3d and stock_forward_base(Conv3DNoTemporal) is nn.Conv3d
    assert stock_forward_base(nn.BatchNorm2d) is nn.BatchNorm2d
    assert stock_forward_base(FrozenBatchNorm2d) is FrozenBatchNorm2d
    assert stock_forward_base(ScaledConv) is None and stock_forward_base(MyBatchNorm) is None
    assert stock_forward_base(Conv2Plus1D) is None  # a Sequential
    assert stock_forward_base(nn.ReLU) is None


def test_a_conv2d_subclass_with_the_stock_forward_stays_a_leaf_and_folds() -> None:
    model = randomize_all_batchnorms(Block(MyConv(3, 6, 3, padding=1), nn.BatchNorm2d(6)))
    traced = symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["conv", "bn", "relu"]
    gm = fuse_conv_bn(model)
    assert gm.fusion_report.num_fused == 1 and count_batchnorm_nodes(gm) == 0, str(gm.fusion_report)
    assert type(gm.conv) is MyConv and gm.conv.describe() == "3->6"
    close(model, gm, torch.randn(2, 3, 8, 8))
    # eager: fuse_modules and fuse_known_modules fuse it like a Conv2d
    fused = fuse_modules(model, [["conv", "bn", "relu"]])
    assert isinstance(fused.conv, F.ConvReLU2d) and type(fused.conv[0]) is MyConv
    close(model, fused, torch.randn(2, 3, 8, 8))
    assert isinstance(fuse_known_modules([model.conv, model.bn])[0], MyConv)


def test_a_forward_overriding_subclass_is_left_alone_with_a_reason() -> None:
    model = randomize_all_batchnorms(Block(ScaledConv(3, 6, 3, padding=1), nn.BatchNorm2d(6)))
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert report.num_fused == 0 and count_batchnorm_nodes(gm) == 1
    assert report.reasons() == {"subclass": 1}, str(report)
    assert re.search(r"'conv' \(ScaledConv\), a subclass of Conv2d that overrides forward", report.skipped[0].detail)
    assert report.overridden and "'conv' (ScaledConv)" in report.overridden[0]
    assert "override forward" in str(report)
    close(model, gm, torch.randn(2, 3, 8, 8))
    # eager: never fused as a Conv2d, and the error says why
    with pytest.raises(F.UnsupportedFusionError, match="ScaledConv subclasses Conv2d but overrides forward"):
        fuse_modules(model, [["conv", "bn"]])
    # auto_fuse: left, with the reason
    fused, auto_report = auto_fuse(model, torch.randn(1, 3, 8, 8))
    assert auto_report.num_fused == 0 and auto_report.reasons() == {"subclass": 1}, str(auto_report)
    assert "overrides forward" in auto_report.skipped[0].detail


def test_a_forward_overriding_batchnorm_subclass_is_left_with_a_reason() -> None:
    # BatchNorm's forward branches on self.training, so tracing through it fails: make it a leaf
    model = randomize_all_batchnorms(Block(nn.Conv2d(3, 6, 3), MyBatchNorm(6)))
    gm = fuse_conv_bn(model, leaf_modules=[MyBatchNorm])
    report = gm.fusion_report
    assert report.num_fused == 0 and report.reasons() == {"subclass": 1}, str(report)
    assert "MyBatchNorm is not BatchNorm1d/2d/3d or FrozenBatchNorm2d; it overrides forward" in report.skipped[0].detail
    close(model, gm, torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------- torchvision families

@pytest.mark.parametrize("name", ["r3d_18", "mc3_18"])
def test_video_resnets_are_fully_folded(name: str) -> None:
    model = randomize_all_batchnorms(torchvision.models.get_model(name, weights=None, num_classes=10))
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert (report.num_fused, report.batchnorm_calls_after, count_batchnorm_nodes(gm)) == (20, 0, 0), str(report)
    assert not any(is_batchnorm(m) for m in gm.modules())
    assert any("Conv3DSimple+BatchNorm3d" in p.kind for p in report.fused)
    close(model, gm, torch.randn(1, 3, 2, 32, 32, generator=torch.Generator().manual_seed(0)))


def test_frozen_batchnorm_resnet18_is_fully_folded_with_its_own_eps() -> None:
    model = randomize_all_batchnorms(torchvision.models.resnet18(weights=None, num_classes=10,
                                                                 norm_layer=FrozenBatchNorm2d))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert (report.num_fused, report.batchnorm_calls_before, count_batchnorm_nodes(gm)) == (20, 20, 0), str(report)
    assert {p.kind for p in report.fused} == {"Conv2d+FrozenBatchNorm2d"}
    close(model, gm, x)
    # eager: fuse_modules with the (conv, frozen bn[, relu]) names
    groups = [["conv1", "bn1", "relu"]] + [[f"layer{i}.{j}.conv{k}", f"layer{i}.{j}.bn{k}"]
                                           for i in range(1, 5) for j in range(2) for k in (1, 2)]
    fused = fuse_modules(model, groups)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in fused.modules()) == 3  # the downsample ones
    close(model, fused, x)
    # eps matters (1e-2 here, with variances down to 0.01): a fold with the default eps would be wrong
    conv, bn = model.conv1, model.bn1
    folded = fuse_known_modules([conv, bn])[0]
    wrong = F.fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, 1e-5, bn.weight, bn.bias)
    assert torch.allclose(folded.weight, F.fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                                bn.running_var, bn.eps, bn.weight, bn.bias)[0])
    assert not torch.allclose(folded.weight, wrong[0], rtol=1e-3)


def test_frozen_batchnorm_has_no_qat_form() -> None:
    conv, bn = nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4)
    with pytest.raises(F.UnsupportedFusionError, match="no trainable statistics"):
        fuse_known_modules([conv, bn], is_qat=True)


def test_maxvit_is_fully_folded_with_its_pre_norms_folded_forward() -> None:
    model = randomize_all_batchnorms(torchvision.models.maxvit_t(weights=None, num_classes=10))
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert (report.num_fused, report.batchnorm_calls_after) == (34, 0), str(report)
    assert report.directions() == {"after": 23, "before": 11}
    before = [p for p in report.fused if p.direction == "before"]
    assert all(p.bn.endswith("pre_norm") and p.layer.endswith("conv_a.0") for p in before)
    assert "BN before the conv" in str(before[0]) and "BN before conv" in str(report)
    close(model, gm, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------- BatchNorm before a conv

def _random_bn(bn: nn.Module, seed: int) -> nn.Module:
    return randomize_batchnorm(bn, seed).eval()


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv1d(8, 6, 3, stride=2), (2, 8, 11)),
    (nn.Conv2d(8, 6, 1, bias=False), (2, 8, 5, 5)),
    (nn.Conv2d(8, 12, 3, groups=4, dilation=2), (2, 8, 9, 9)),
    (nn.Conv3d(8, 4, (1, 3, 3)), (1, 8, 3, 6, 6)),
], ids=["conv1d-stride2", "conv2d-1x1-nobias", "conv2d-groups4-dilated", "conv3d"])
def test_bn_before_conv_formula(conv: nn.Module, shape: tuple[int, ...]) -> None:
    bn = _random_bn({3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](8), 1)
    conv.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    fused = fuse_bn_conv_eval(bn, conv)
    with torch.no_grad():
        reference = conv(bn(x))
        assert max_relative_error(reference, fused(x)) < 1e-5
        # the formula written out, in float64
        a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        c = bn.bias.double() - bn.running_mean.double() * a
        w = conv.weight.double()
        groups, in_per_group = conv.groups, w.shape[1]
        index = torch.arange(w.shape[0]) // (w.shape[0] // groups) * in_per_group
        channel = index[:, None] + torch.arange(in_per_group)[None, :]  # input channel of W[o, j]
        view = (w.shape[0], in_per_group) + (1,) * (w.dim() - 2)
        expected_w = w * a[channel].reshape(view)
        bias = torch.zeros(w.shape[0], dtype=torch.float64) if conv.bias is None else conv.bias.double()
        expected_b = bias + (w.flatten(2).sum(-1) * c[channel]).sum(1)
    assert torch.equal(fused.weight, expected_w.float())  # one rounding of the float64 product
    assert torch.allclose(fused.bias, expected_b.float(), rtol=1e-6, atol=1e-7)  # sums: order may differ
    weights = fuse_bn_conv_weights(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
                                   conv.weight, conv.bias, conv.groups)
    assert torch.equal(weights[0], fused.weight) and isinstance(weights[0], nn.Parameter)


def test_bn_before_conv_with_padding_is_wrong_at_the_border_only_and_refused() -> None:
    bn, conv = _random_bn(nn.BatchNorm2d(4), 3), nn.Conv2d(4, 4, 3, padding=1).eval()
    x = torch.randn(1, 4, 10, 10)
    unpadded = nn.Conv2d(4, 4, 3).eval()
    unpadded.load_state_dict(conv.state_dict())
    naive = fuse_bn_conv_eval(bn, unpadded)
    naive.padding = (1, 1)  # the same fold, used with padding anyway
    with torch.no_grad():
        error = (conv(bn(x)) - naive(x)).abs().amax(dim=(0, 1))
    assert error[1:-1, 1:-1].max() < 1e-5  # exact inside
    assert error[0].max() > 1e-3 and error[:, -1].max() > 1e-3  # wrong at the border
    with pytest.raises(FusionError, match=r"padding=\(1, 1\).*border"):
        fuse_bn_conv_eval(bn, conv)


class PreNorm(nn.Module):
    """bn -> conv in several variants (``mode``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        padding = 1 if mode == "padded" else 0
        self.pre = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3 if mode == "padded" else 1, padding=padding)
        self.post = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x * 2)
        if self.mode == "both_sides":
            return self.post(self.conv(y))
        if self.mode == "other_user":
            return self.conv(y).sum(1, keepdim=True) + y.sum(1, keepdim=True)
        return self.conv(y)


@pytest.mark.parametrize("mode,fused,directions,reason", [
    ("plain", 1, {"before": 1}, None),
    ("both_sides", 2, {"after": 1, "before": 1}, None),
    ("padded", 0, {}, "padding=(1, 1)"),
    ("other_user", 0, {}, "its output also feeds"),
])
def test_bn_before_conv_in_the_fx_pass(mode: str, fused: int, directions: dict, reason: str | None) -> None:
    model = randomize_all_batchnorms(PreNorm(mode))
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert report.num_fused == fused and report.directions() == directions, str(report)
    if reason:
        assert report.skipped[0].kind == "no Conv/Linear before it"
        assert reason in report.skipped[0].detail and "conv after it cannot absorb it" in report.skipped[0].detail
    else:
        assert count_batchnorm_nodes(gm) == 0
    close(model, gm, torch.randn(2, 4, 7, 7))


def test_densenet_batchnorms_before_relu_stay() -> None:
    # DenseNet's norm -> relu -> conv: a ReLU between them, so nothing new folds (issue 5's counts hold)
    model = randomize_all_batchnorms(torchvision.models.densenet121(weights=None, num_classes=10))
    report = fuse_conv_bn(model).fusion_report
    assert (report.num_fused, len(report.skipped)) == (59, 62)
    assert set(report.reasons()) == {"no Conv/Linear before it"}


# --------------------------------------------------------------------------- auto_fuse

def small_fasterrcnn() -> nn.Module:
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)
    return randomize_all_batchnorms(model)


def test_auto_fuse_folds_the_backbone_of_a_faster_rcnn() -> None:
    model = small_fasterrcnn()
    with pytest.raises(fx.proxy.TraceError):  # the reason auto_fuse exists
        fuse_conv_bn(model)
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))]
    before = fingerprint(model)
    fused, report = auto_fuse(model, images)
    assert_unchanged(model, before)  # inplace=False never touches the caller's model
    assert isinstance(report, AutoFuseReport)
    backbone_bns = sum(is_batchnorm(m) for m in model.backbone.modules())
    assert backbone_bns == 46 and report.num_fused == 46 and report.batchnorm_modules_after == 0, str(report)
    assert not hasattr(report, "batchnorm_calls_after")  # auto_fuse counts modules, not graph calls
    assert not any(is_batchnorm(m) for m in fused.backbone.modules())
    assert {p.kind for p in report.fused} == {"Conv2d+BatchNorm2d", "Conv2d+BatchNorm2d+ReLU"}
    assert report.comparison.passed and not report.undone
    assert report.precision == "float64" and report.comparison.max_rel < 1e-12  # the fold is exact there
    assert report.as_run is not None and "verified in float64" in str(report)
    assert "one control-flow path" in str(report)
    with torch.no_grad():
        batch, _ = model.transform(images)
        compare_outputs(model.backbone(batch.tensors), fused.backbone(batch.tensors), rtol=RTOL).check()


class Consumers(nn.Module):
    """Conv -> BN pairs whose conv output (or weight) is also read in various ways."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)  # output also added: skipped
        self.c2, self.b2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)  # weight read outside: skipped
        self.c3 = nn.Conv2d(3, 4, 1)
        self.tail = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(inplace=True))  # through a container: fused
        self.c4, self.b4 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)  # runs twice: skipped
        self.c5, self.b5 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)  # in a branch not taken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.c1(x)
        out = self.b1(y1) + y1
        out = out + self.b2(self.c2(x)) * self.c2.weight.mean()
        out = out + self.tail(self.c3(x))
        out = out + self.b4(self.c4(x)) + self.b4(self.c4(-x))
        if x.shape[0] > 8:
            out = out + self.b5(self.c5(x))
        return out


def test_auto_fuse_sees_functional_consumers_readers_and_repeated_calls() -> None:
    model = randomize_all_batchnorms(Consumers())
    x = torch.randn(2, 3, 5, 5)
    fused, report = auto_fuse(model, x)
    assert report.groups == [["c3", "tail.0", "tail.1"]], str(report)
    reasons = {s.bn: s for s in report.skipped}
    assert reasons["b1"].kind == "output has other users" and "add" in reasons["b1"].detail
    assert "also read by" in reasons["b2"].detail and "mean" in reasons["b2"].detail
    assert "ran 2 times" in reasons["b4"].detail
    assert reasons["b5"].kind == "not called"
    close(model, fused, x)


class TypeSensitive(nn.Module):
    """A forward that looks at its BatchNorm's type: dataflow cannot see it, verification can."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if isinstance(self.b2, nn.BatchNorm2d) else 3.0
        return self.b1(self.c1(x)) + scale * self.b2(self.c2(x))


def test_auto_fuse_undoes_and_reports_a_fold_that_changes_the_outputs() -> None:
    model = randomize_all_batchnorms(TypeSensitive())
    x = torch.randn(2, 3, 5, 5)
    fused, report = auto_fuse(model, x)
    assert report.groups == [["c1", "b1"]], str(report)
    assert [group for group, _ in report.undone] == [["c2", "b2"]]
    assert "FAIL" in report.undone[0][1] and "undone" in str(report)
    assert isinstance(fused.b2, nn.BatchNorm2d) and report.comparison.passed
    close(model, fused, x)


def test_auto_fuse_inplace_true_fuses_the_model_itself() -> None:
    model = randomize_all_batchnorms(Block(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    reference = randomize_all_batchnorms(Block(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    reference.load_state_dict(model.state_dict())
    fused, report = auto_fuse(model, (torch.randn(1, 3, 6, 6),), inplace=True)
    assert fused is model and isinstance(model.conv, F.ConvReLU2d) and report.num_fused == 1
    close(reference, model, torch.randn(2, 3, 6, 6))


def _hooked_block() -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    model = randomize_all_batchnorms(Block(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    seen: list[str] = []
    model.conv.register_forward_pre_hook(lambda m, args: seen.append(f"pre {type(m).__name__}"))
    model.relu.register_forward_hook(lambda m, args, out: seen.append(f"post {type(m).__name__}"))
    return model, seen


def test_auto_fuse_keeps_the_hooks_fusion_can_carry() -> None:
    model, seen = _hooked_block()
    x = torch.randn(1, 3, 6, 6)
    fused, report = auto_fuse(model, x)
    assert report.groups == [["conv", "bn", "relu"]], str(report)
    seen.clear()
    with torch.no_grad():
        fused(x)
    assert seen == ["pre ConvReLU2d", "post ConvReLU2d"]  # conv's pre-hook, relu's hook: on the fused module
    close(model, fused, x)


def test_auto_fuse_leaves_a_group_whose_hooks_would_be_dropped_and_names_them() -> None:
    model, _ = _hooked_block()
    model.bn.register_forward_hook(lambda m, args, out: None)  # reads BN's output: [conv, bn] keeps it last
    fused, report = auto_fuse(model, torch.randn(1, 3, 6, 6))
    assert report.groups == [["conv", "bn"]] and isinstance(fused.relu, nn.ReLU), str(report)
    model.conv.register_forward_hook(lambda m, args, out: None)  # reads the conv's output: nothing can keep it
    fused, report = auto_fuse(model, torch.randn(1, 3, 6, 6))
    assert report.groups == [] and isinstance(fused.bn, nn.BatchNorm2d)
    (skip,) = report.skipped
    assert skip.kind == "hooks" and "forward hook" in skip.detail and "on 'conv'" in skip.detail


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * mask


class Noisy(TwoInputs):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.bn(self.conv(x)) + torch.rand_like(x[:, :1])


def _dropout_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()


AUTO_BAD_INPUTS = {
    # name: (model factory, example inputs, exception, message pattern)
    "missing_input": (lambda: TwoInputs().eval(), (torch.randn(1, 3, 4, 4),), AutoFuseError,
                      r"TwoInputs.forward\(x: .*, mask: .*\).*cannot run on the example inputs given.*"
                      r"missing a required argument: 'mask'"),
    "dropout_in_training": (_dropout_model, torch.randn(2, 3, 4, 4), AutoFuseError,
                            r"training mode.*dropout \('2'\) is random.*running statistics.*model.eval\(\)"),
    "non_deterministic": (lambda: Noisy().eval(), torch.randn(2, 3, 4, 4), AutoFuseError,
                          r"two runs on the same inputs differ.*not deterministic"),
    "forward_fails": (lambda: TwoInputs().eval(), (torch.randn(1, 5, 4, 4), torch.ones(1)), AutoFuseError,
                      r"'TwoInputs' failed on the example inputs: RuntimeError"),
    "not_a_module": (lambda: (lambda x: x), torch.randn(1), TypeError, r"expects an nn.Module, got function"),
}


@pytest.mark.parametrize("case", list(AUTO_BAD_INPUTS))
def test_auto_fuse_bad_input_is_refused_and_nothing_changes(case: str) -> None:
    factory, inputs, error, pattern = AUTO_BAD_INPUTS[case]
    model = factory()
    before = fingerprint(model) if isinstance(model, nn.Module) else None
    with pytest.raises(error, match=pattern):
        auto_fuse(model, inputs)
    if before is not None:
        assert_unchanged(model, before)


def test_auto_fuse_negative_rtol_is_refused() -> None:
    with pytest.raises(ValueError, match="rtol must be >= 0"):
        auto_fuse(TwoInputs().eval(), (torch.randn(1, 3, 4, 4), torch.ones(1)), rtol=-1.0)


def test_fusion_does_not_reach_up_to_auto_fuse() -> None:
    """auto_fuse sits a layer above fusion (docs/design.md, Layers): fusion does not re-export it."""
    assert not hasattr(F, "auto_fuse") and "auto_fuse" not in F.__all__
