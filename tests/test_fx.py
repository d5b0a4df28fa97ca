"""Tests for fusionlib.fx: automatic BatchNorm folding on torchvision models, graph passes,
optimize_for_inference, tracing helpers and the profiling interpreter.

Every numerical check compares against the unmodified eager model with
max|a - b| / max|a| <= 1e-4 (fp32). BatchNorm running statistics and affine
parameters are randomized so that folding is not the identity.
"""
from __future__ import annotations

import copy
import operator
import sys
import types

import matplotlib
import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

import fusionlib.fx as ffx
from fusionlib.fx import FxTraceError, fuse_conv_bn, global_wrap, max_relative_error
from fusionlib.fx.layout import MkldnnConv2d
from batchnorm_stats import randomize_batchnorm

matplotlib.use("Agg")
RTOL = 1e-4



# --------------------------------------------------------------------------- helpers

def outputs_close(reference: nn.Module, candidate: nn.Module, *inputs: torch.Tensor) -> float:
    with torch.no_grad():
        err = max_relative_error(reference(*inputs), candidate(*inputs))
    assert err <= RTOL, f"max rel error {err:.3e} > {RTOL}"
    return err


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(model, seed).eval()


def vgg11_bn_small(num_classes: int = 10) -> nn.Module:
    """VGG11-BN's convolutional part (all its BatchNorms) with a small head.

    The full torchvision classifier is a 25088x4096 Linear (100M parameters) that only
    costs time here and holds no BatchNorm.
    """
    from torchvision.models.vgg import cfgs, make_layers

    return nn.Sequential(make_layers(cfgs["A"], batch_norm=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(512, num_classes))


def torchvision_model(name: str) -> nn.Module:
    if name == "vgg11_bn":
        return vgg11_bn_small()
    kwargs = {"num_classes": 10}
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(name, weights=None, **kwargs)


# (model, BatchNorm calls folded, BatchNorm calls left, why some are left)
ZOO = [
    ("resnet18", 20, 0, ""),
    ("mobilenet_v2", 52, 0, ""),
    ("mobilenet_v3_small", 34, 0, ""),
    ("efficientnet_b0", 49, 0, ""),
    ("regnet_x_400mf", 71, 0, ""),
    ("shufflenet_v2_x0_5", 56, 0, ""),
    ("mnasnet0_5", 52, 0, ""),
    ("vgg11_bn", 8, 0, ""),
    ("googlenet", 57, 0, ""),
    # DenseNet normalizes the concatenation of earlier features *before* each conv
    # (norm1 in 58 dense layers, 3 transitions, norm5): 62 BatchNorms follow a cat, not a conv.
    ("densenet121", 59, 62, "no Conv/Linear before it"),
    ("squeezenet1_0", 0, 0, ""),  # no BatchNorm at all
    ("convnext_tiny", 0, 0, ""),  # LayerNorm only: nothing to fold
]


# --------------------------------------------------------------------------- fuse_conv_bn on the zoo

@pytest.mark.parametrize("name,fused,left,reason", ZOO, ids=[z[0] for z in ZOO])
def test_fuse_conv_bn_torchvision_zoo(name: str, fused: int, left: int, reason: str) -> None:
    model = prepared(torchvision_model(name))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert isinstance(gm, fx.GraphModule)
    outputs_close(model, gm, x)
    assert report.num_fused == fused, str(report)
    assert ffx.count_batchnorm_nodes(gm) == left == report.batchnorm_calls_after
    assert len(report.skipped) == left
    if left:
        assert set(report.reasons()) == {reason}
    if report.batchnorm_calls_before == 0:
        assert "no BatchNorm" in str(report)
    else:
        assert f"fused {fused} pair(s)" in str(report)


# --------------------------------------------------------------------------- edge patterns

class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("layer,bn,shape", [
    (nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), (2, 4, 9)),
    (nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), (2, 4, 9, 9)),
    (nn.Conv3d(4, 6, 3), nn.BatchNorm3d(6), (2, 4, 5, 5, 5)),
    (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 7)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.ConvTranspose3d(4, 8, 3, groups=4, bias=False), nn.BatchNorm3d(8), (2, 4, 4, 4, 4)),
    (nn.Linear(5, 7), nn.BatchNorm1d(7), (3, 5)),
], ids=["conv1d", "conv2d-nobias", "conv3d", "convT1d", "convT2d", "convT2d-groups2", "convT3d-groups4",
        "linear"])
def test_fuse_conv_bn_layer_types(layer: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> None:
    model = prepared(ConvBN(layer, bn))
    gm = fuse_conv_bn(model)
    assert gm.fusion_report.num_fused == 1
    assert ffx.count_batchnorm_nodes(gm) == 0
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    err = outputs_close(model, gm, torch.randn(*shape))
    assert err < 1e-5


class TwoUsers(nn.Module):
    """The conv output feeds BatchNorm and also the residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def test_conv_output_with_another_user_is_skipped() -> None:
    model = prepared(TwoUsers())
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert [(p.layer, p.bn) for p in report.fused] == [("conv2", "bn2")]
    assert len(report.skipped) == 1 and report.skipped[0].bn == "bn"
    assert "also used by" in report.skipped[0].reason and "add" in report.skipped[0].reason
    assert "also used by" in str(report)
    assert ffx.count_batchnorm_nodes(gm) == 1
    outputs_close(model, gm, torch.randn(2, 3, 8, 8))


class SharedModules(nn.Module):
    """Shared modules in four ways (``mode``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv_a, self.conv_b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = 2 * x
        if self.mode == "bn_twice":  # one BN after two different convs: both fold
            return self.bn_a(self.conv_a(x)) + self.bn_a(self.conv_b(y))
        if self.mode == "same_pair_twice":  # conv reused, always with the same BN: folds
            return self.bn_a(self.conv_a(x)) + self.bn_a(self.conv_a(y))
        if self.mode == "conv_also_bare":  # conv reused, once without BN: skipped
            return self.bn_a(self.conv_a(x)) + self.conv_a(y)
        if self.mode == "conv_two_bns":  # conv reused with different BNs: skipped
            return self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_a(y))
        raise ValueError(self.mode)


@pytest.mark.parametrize("mode,fused,left,reason", [
    ("bn_twice", 2, 0, None),
    ("same_pair_twice", 1, 0, None),
    ("conv_also_bare", 0, 1, "without this BatchNorm"),
    ("conv_two_bns", 0, 2, "different BatchNorms"),
])
def test_shared_modules(mode: str, fused: int, left: int, reason: str | None) -> None:
    model = prepared(SharedModules(mode))
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert report.num_fused == fused, str(report)
    assert ffx.count_batchnorm_nodes(gm) == left
    if reason:
        assert all(reason in s.reason for s in report.skipped), str(report)
    if mode == "same_pair_twice":
        assert report.fused[0].call_sites == 2
    outputs_close(model, gm, torch.randn(2, 3, 8, 8))


def test_unfoldable_batchnorms_are_left_with_reasons() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
            self.c2, self.b2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.b0 = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.b1(self.c1(x)) + self.b2(self.c2(x))  # b1: batch statistics even in eval mode
            return out.sum(1, keepdim=True) + self.b0(x)  # BatchNorm on the input: no conv before it

    model = prepared(Model())
    seen = []
    model.c2.register_forward_hook(lambda module, args, output: seen.append(output.mean().item()))
    gm = fuse_conv_bn(model)
    reasons = {s.bn: s.reason for s in gm.fusion_report.skipped}
    assert "track_running_stats=False" in reasons["b1"]
    assert reasons["b2"].startswith("hooks: a forward hook on 'c2'")
    assert reasons["b0"] == "no Conv/Linear before it: its input comes from placeholder 'x'"
    assert gm.fusion_report.num_fused == 0
    outputs_close(model, gm, torch.randn(4, 3, 5, 5))
    assert seen[0] == seen[1]  # the hook saw the same conv output in both models


def test_functional_batch_norm_is_left_alone() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.batch_norm(self.conv(x), self.mean, self.var, training=False)

    model = Model().eval()
    gm = fuse_conv_bn(model)
    assert gm.fusion_report.num_fused == 0
    assert any(n.op == "call_function" and n.target is nn.functional.batch_norm for n in gm.graph.nodes)
    outputs_close(model, gm, torch.randn(2, 3, 6, 6))


def test_linear_bn1d_on_3d_output_is_skipped_when_shapes_are_known() -> None:
    model = prepared(ConvBN(nn.Linear(4, 4), nn.BatchNorm1d(4)))  # [N, L=4, F=4]: dims happen to match
    x = torch.randn(2, 4, 4)
    gm = fuse_conv_bn(model, example_inputs=x)
    assert gm.fusion_report.num_fused == 0
    assert "not 2-D" in gm.fusion_report.skipped[0].reason
    outputs_close(model, gm, x)


# --------------------------------------------------------------------------- bad input and inplace

def test_model_without_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    gm = fuse_conv_bn(model)
    assert gm.fusion_report.num_fused == 0 and gm.fusion_report.batchnorm_calls_before == 0
    assert "no BatchNorm modules" in str(gm.fusion_report)
    outputs_close(model, gm, torch.randn(2, 3, 8, 8))


def test_training_mode_is_a_clear_error() -> None:
    model = torchvision.models.resnet18(num_classes=10)  # training mode
    for fn in (fuse_conv_bn, ffx.optimize_for_inference):
        with pytest.raises(ValueError, match=r"eval mode.*'ResNet'.*model\.eval\(\)"):
            fn(model)
    model.eval()
    model.layer1[0].bn1.train()  # one BatchNorm left in training mode is named
    with pytest.raises(ValueError, match="layer1.0.bn1"):
        fuse_conv_bn(model)


def test_inplace_false_never_touches_the_callers_model() -> None:
    model = prepared(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    state = copy.deepcopy(model.state_dict())
    structure = [(name, type(m)) for name, m in model.named_modules()]
    with torch.no_grad():
        before = model(x)
    gm = fuse_conv_bn(model)
    opt = ffx.optimize_for_inference(model, passes=("fold_batchnorm", "mkldnn"))
    assert [(name, type(m)) for name, m in model.named_modules()] == structure
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(p is q for p in model.parameters() for q in gm.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    outputs_close(model, gm, x)
    outputs_close(model, opt, x)


def test_inplace_true_rewrites_a_graph_module_in_place() -> None:
    model = prepared(torchvision.models.resnet18(num_classes=10))
    traced = ffx.symbolic_trace(model)
    gm = fuse_conv_bn(traced, inplace=True)
    assert gm is traced and ffx.count_batchnorm_nodes(traced) == 0
    outputs_close(model, gm, torch.randn(1, 3, 32, 32))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on data: not traceable
            return self.conv(x)
        return x


def test_untraceable_model_error_says_where_and_what_to_try() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), DataDependent()).eval()
    with pytest.raises(FxTraceError) as info:
        fuse_conv_bn(model)
    message = str(info.value)
    assert "could not trace 'Sequential'" in message
    assert "in module '2' (DataDependent)" in message
    assert "if x.sum() > 0" in message and "test_fx.py" in message
    assert "concrete_args" in message and "leaf_modules" in message and "global_wrap" in message
    assert isinstance(info.value, fx.proxy.TraceError) and info.value.module_path == "2"
    # the way out it names works: the data-dependent block becomes a leaf
    gm = fuse_conv_bn(model, leaf_modules=[DataDependent])
    assert gm.fusion_report.num_fused == 1
    outputs_close(model, gm, torch.randn(2, 3, 4, 4))


class Mirrored(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor, mirror: bool = False) -> torch.Tensor:
        if mirror:  # control flow on a flag: concrete_args fixes it
            x = x.flip(-1)
        return self.conv(x)


def test_trace_error_puts_the_way_out_that_fits_first() -> None:
    with pytest.raises(FxTraceError) as info:
        ffx.symbolic_trace(Mirrored())
    ways = str(info.value).split("ways out:")[1]
    assert ways.strip().startswith("1. fix the non-tensor input") and "concrete_args={'mirror': ...}" in ways
    model = Mirrored().eval()
    gm = ffx.symbolic_trace(model, concrete_args={"mirror": True})  # the way out it names works
    x = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(gm(x, True), model(x, mirror=True))
    assert not torch.allclose(gm(x, True), model(x, mirror=False))

    with pytest.raises(FxTraceError) as info:  # a branch on data: only a leaf module helps
        ffx.symbolic_trace(DataDependent())
    ways = str(info.value).split("ways out:")[1]
    assert ways.strip().startswith("1. make") and "a branch on tensor data needs a leaf module" in ways


# --------------------------------------------------------------------------- replace_ops

class ThreeAdds(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = x + y
        b = torch.add(a, y)
        return b.add(x)


def test_replace_ops_add_becomes_mul() -> None:
    model = ThreeAdds()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    gm, changed = ffx.replace_ops(model, {operator.add: operator.mul, torch.add: torch.mul, torch.Tensor.add: "mul"})
    assert changed == 3
    expected = ((x * y) * y) * x
    assert torch.allclose(gm(x, y), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(model(x, y), expected)
    assert {n.target for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output"} \
        == {operator.mul, torch.mul, "mul"}


def test_replace_ops_on_resnet18_matches_an_interpreter_oracle() -> None:
    model = prepared(torchvision.models.resnet18(num_classes=10))
    traced = ffx.symbolic_trace(model)
    gm, changed = ffx.replace_ops(traced, {operator.add: operator.mul})
    assert changed == 8  # one residual sum per BasicBlock
    assert sum(n.target is operator.add for n in traced.graph.nodes) == 8  # inplace=False: a copy

    class AddAsMul(fx.Interpreter):  # an independent path: evaluate the original graph, mul for add
        def call_function(self, target, args, kwargs):  # noqa: ANN001
            return super().call_function(operator.mul if target is operator.add else target, args, kwargs)

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, original, got = AddAsMul(traced).run(x), model(x), gm(x)
    assert max_relative_error(expected, got) <= RTOL
    assert max_relative_error(original, got) > 1e-2  # the rewrite changed the function


def test_replace_ops_module_types() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    gm, changed = ffx.replace_ops(model, {nn.ReLU: nn.GELU})
    assert changed == 2 and sum(isinstance(m, nn.GELU) for m in gm.modules()) == 2
    x = torch.randn(3, 4)
    expected = model[2](nn.functional.gelu(model[0](x)))
    assert torch.allclose(gm(x), nn.functional.gelu(expected))
    assert isinstance(model[1], nn.ReLU)  # caller's model untouched
    with pytest.raises(TypeError, match="mapping key"):
        ffx.replace_ops(model, {42: operator.mul})


# --------------------------------------------------------------------------- tracing helpers

def _third_party_module() -> types.ModuleType:
    """A module we "cannot edit": its forward calls len() on a traced tensor."""
    module = types.ModuleType("fake_third_party")
    exec(
        "import torch\n"
        "def helper(t):\n"
        "    return t\n"
        "class Block(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * len(x)\n",
        module.__dict__,
    )
    sys.modules[module.__name__] = module
    return module


def test_global_wrap_makes_len_a_leaf_and_restores_the_namespace() -> None:
    third_party = _third_party_module()
    try:
        model = third_party.Block()
        with pytest.raises(FxTraceError, match="global_wrap"):
            ffx.symbolic_trace(model)
        with global_wrap(len, module=third_party.Block):
            assert third_party.__dict__["len"] is not len
            gm = ffx.symbolic_trace(model)
        assert "len" not in third_party.__dict__  # restored: back to the builtin
        assert any(n.op == "call_function" and n.target is len for n in gm.graph.nodes)
        x = torch.randn(5, 2)
        assert torch.equal(gm(x), x * 5) and torch.equal(gm(x[:3]), x[:3] * 3)

        # restored even when tracing raises
        broken = nn.Sequential(third_party.Block(), DataDependent())
        with pytest.raises(FxTraceError):
            with global_wrap("len", module="fake_third_party"):
                ffx.symbolic_trace(broken)
        assert "len" not in third_party.__dict__

        # a function defined in the module itself (module found from fn) is put back, not deleted
        original = third_party.helper
        with pytest.raises(RuntimeError):
            with global_wrap(original):
                assert third_party.helper is not original
                raise RuntimeError("boom")
        assert third_party.helper is original
    finally:
        sys.modules.pop("fake_third_party", None)


def test_global_wrap_needs_a_module_for_builtins() -> None:
    with pytest.raises(ValueError, match="module="):
        with global_wrap(len):
            pass


def test_print_tabular_lists_every_node(capsys: pytest.CaptureFixture[str]) -> None:
    gm = ffx.symbolic_trace(torchvision.models.resnet18(num_classes=10))
    ffx.print_tabular(gm)
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].split() == ["opcode", "name", "target", "args", "kwargs"]
    assert len(lines) == len(gm.graph.nodes) + 2
    assert all(f" {n.name} " in line for n, line in zip(gm.graph.nodes, lines[2:]))
    assert "operator.add" in printed and "torch.flatten" in printed
    assert ffx.wrap is fx.wrap


# --------------------------------------------------------------------------- profiling

def test_profiling_interpreter_output_and_table() -> None:
    model = prepared(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    interp = ffx.ProfilingInterpreter(model)
    with torch.no_grad():
        out = interp.run(x)
        assert torch.equal(out, model(x))
    table = interp.profile(x, runs=2)
    assert table.runs == 3  # the run above plus two timed ones
    assert {r.node for r in table} == {n.name for n in interp.module.graph.nodes}
    assert sum(r.percent for r in table) == pytest.approx(100.0)
    assert [r.mean_seconds for r in table] == sorted((r.mean_seconds for r in table), reverse=True)
    top = interp.summary(top=5)
    assert len(top) == 5 and "op type" in str(top) and "more rows" in str(top)
    by_type = {r.op_type: r for r in interp.summary_by_op_type()}
    assert by_type["Conv2d"].count == 20 and by_type["BatchNorm2d"].count == 20
    assert by_type["operator.add"].count == 8
    assert sum(r.percent for r in by_type.values()) == pytest.approx(100.0)
    ax = interp.plot(top=6)
    assert len(ax.patches) == 6
    interp.plot(top=4, by="op_type")


# --------------------------------------------------------------------------- optimize_for_inference

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("layout", ["mkldnn", "channels_last", "auto_layout"])
def test_optimize_for_inference_matches_eager(name: str, layout: str) -> None:
    model = prepared(torchvision_model(name))
    x = torch.randn(2, 3, 64, 64)
    gm = ffx.optimize_for_inference(model, passes=("fold_batchnorm", "remove_dropout", "remove_identity", layout))
    outputs_close(model, gm, x)
    modules = dict(gm.named_modules())
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm2d)) for m in modules.values())
    steps = [s.name for s in gm.optimization_report.steps]
    assert steps == ["fold_batchnorm", "remove_dropout", "remove_identity", layout]
    if layout == "mkldnn" and name == "resnet18":  # shapes unknown: the residual adds stay dense
        assert sum(isinstance(m, MkldnnConv2d) for m in modules.values()) == 20
        adds = [n for n in gm.graph.nodes if n.target is operator.add]
        assert len(adds) == 8 and all(a.target == "to_dense" for n in adds for a in n.args)
        # with example inputs the shapes are known: one region, every conv, two conversions
        gm = ffx.optimize_for_inference(model, x, passes=("fold_batchnorm", "remove_dropout", "remove_identity",
                                                          layout))
        assert sum(isinstance(m, MkldnnConv2d) for m in gm.modules()) == 20
        assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["to_mkldnn", "to_dense"]
    if layout == "channels_last":
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in modules.values() if isinstance(m, nn.Conv2d))


def test_optimize_for_inference_with_example_inputs_checks_and_reports() -> None:
    model = prepared(torchvision_model("mobilenet_v2"))
    x = torch.randn(2, 3, 64, 64)
    gm = ffx.optimize_for_inference(model, x)
    report = gm.optimization_report
    assert report.max_rel_error is not None and report.max_rel_error <= RTOL
    assert [s.name for s in report.steps] == list(ffx.DEFAULT_PASSES)
    assert "stored channels-last" in report.steps[-1].summary
    assert "removed 1 dropout" in str(report)
    outputs_close(model, gm, torch.randn(1, 3, 64, 64))
    outputs_close(model, copy.deepcopy(gm), x)  # the optimized graph survives a copy


def test_optimize_for_inference_check_catches_a_wrong_pass() -> None:
    model = prepared(torchvision.models.resnet18(num_classes=10))

    def relu_to_sigmoid(gm: fx.GraphModule) -> str:
        _, n = ffx.replace_ops(gm, {nn.ReLU: nn.Sigmoid}, inplace=True)
        return f"{n} ReLU -> Sigmoid"

    with pytest.raises(RuntimeError, match="max relative error"):
        ffx.optimize_for_inference(model, torch.randn(1, 3, 32, 32), passes=["fold_batchnorm", relu_to_sigmoid])
    with pytest.raises(ValueError, match="unknown pass 'fold_bn'"):
        ffx.optimize_for_inference(model, passes=["fold_bn"])


def test_mkldnn_pass_leaves_unsupported_configurations_dense() -> None:
    """oneDNN has no MKLDNN-tensor kernel for dilated max pooling or adaptive pooling to sizes
    that do not divide the input; those nodes must stay outside the regions."""
    model = prepared(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(3, 1, dilation=2), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.MaxPool2d(2, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(3), nn.Flatten()))
    gm = ffx.optimize_for_inference(model, passes=["mkldnn"])  # BatchNorm after a pool stays, in MKLDNN
    regions = [n.target for n in gm.graph.nodes if n.op == "call_method"]
    assert regions == ["to_mkldnn", "to_dense"] * 2
    outputs_close(model, gm, torch.randn(2, 3, 10, 10))


def test_mkldnn_pass_keeps_in_place_relu_visible_to_other_readers() -> None:
    """``F.relu(a, inplace=True)`` mutates ``a``; run on a converted MKLDNN copy, the later
    reader of ``a`` would see the old values. Such a ReLU must stay dense."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x * 2
            r = nn.functional.relu(a, inplace=True)  # a is now relu(a) as well
            y = self.conv3(self.conv2(self.conv1(r)))
            return y.mean((1, 2, 3)) + a.mean((1, 2, 3))

    model = Model().eval()
    gm = ffx.optimize_for_inference(model, passes=["mkldnn"])
    assert sum(isinstance(m, MkldnnConv2d) for m in gm.modules()) == 3
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert max_relative_error(model(x.clone()), gm(x.clone())) <= RTOL


def test_remove_dropout_covers_modules_and_eval_stochastic_depth() -> None:
    """EfficientNet-B0 in eval: 9 stochastic-depth calls (training=False) and 1 Dropout are identities."""
    model = prepared(torchvision_model("efficientnet_b0"))
    gm = ffx.symbolic_trace(model)
    depth_calls = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "stochastic_depth"]
    assert len(depth_calls) == 9
    assert ffx.remove_dropout(gm) == "removed 10 dropout node(s)"
    assert not any(getattr(n.target, "__name__", "") == "stochastic_depth" for n in gm.graph.nodes)
    assert not any(isinstance(m, nn.Dropout) for m in gm.modules())
    outputs_close(model, gm, torch.randn(1, 3, 64, 64))


def test_mkldnn_conv_matches_conv2d_after_copy_and_load_state_dict() -> None:
    torch.manual_seed(0)
    conv, other = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 4, 9, 9)
    packed = MkldnnConv2d(conv)
    with torch.no_grad():
        assert max_relative_error(conv(x), packed(x.to_mkldnn()).to_dense()) <= RTOL
        packed.load_state_dict(other.state_dict())  # the packed weight follows the new buffers
        assert max_relative_error(other(x), packed(x.to_mkldnn()).to_dense()) <= RTOL
        assert max_relative_error(other(x), copy.deepcopy(packed)(x.to_mkldnn()).to_dense()) <= RTOL
