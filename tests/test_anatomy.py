"""fusionlib.anatomy: the shape / parameter / MAC formulas against real torch layers and models."""
from __future__ import annotations

import itertools

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fusionlib.anatomy import (
    conv_kind,
    conv_macs,
    conv_output_size,
    conv_parameter_count,
    conv_weight_shape,
    layer_table,
    same_padding,
    separable_parameter_count,
    separable_savings_ratio,
)

KERNELS = (1, 2, 3, 5)
STRIDES = (1, 2, 3)
PADDINGS = (0, 1, 2, "same", "valid")
DILATIONS = (1, 2)
GROUPS = (1, 2, 4)
IN_SIZES = (5, 8, 13)


def _model_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flop_counts(model: nn.Module, x: torch.Tensor) -> dict:
    """FlopCounterMode's counts per module ("ResNet.layer1.0.conv1") and "Global"."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_flop_counts()


@pytest.fixture(scope="module")
def tables():
    """resnet18 / mobilenet_v2 (1000 classes, weights=None) at 1x3x224x224: model, layer table, flop counts."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    out = {}
    for name, build in (("resnet18", torchvision.models.resnet18), ("mobilenet_v2", torchvision.models.mobilenet_v2)):
        model = build(weights=None).eval()
        out[name] = (model, layer_table(model, x), _flop_counts(model, x))
    return out


# ------------------------------------------------------------------ formulas


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_output_size_and_parameter_count_match_nn_conv2d_over_a_grid():
    checked = raised = 0
    for k, s, p, d, g, n in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS, GROUPS, IN_SIZES):
        conv = None
        try:
            conv = nn.Conv2d(4, 8, k, stride=s, padding=p, dilation=d, groups=g)
            torch_out = conv(torch.zeros(1, 4, n, n)).shape[-1]
        except (ValueError, RuntimeError):
            torch_out = None
        if torch_out is None:
            # torch refuses (stride > 1 with 'same', kernel larger than padded input): so must we
            with pytest.raises(ValueError):
                conv_output_size(n, k, s, p, d)
            raised += 1
            continue
        assert conv_output_size(n, k, s, p, d) == torch_out, (k, s, p, d, g, n)
        assert conv_weight_shape(4, 8, k, g) == tuple(conv.weight.shape)
        assert conv_parameter_count(4, 8, k, g) == _model_parameter_count(conv)
        assert conv_parameter_count(4, 8, k, g, bias=False) == conv.weight.numel()
        checked += 1
    assert checked > 500 and raised > 50  # both branches really exercised


def test_same_padding_matches_torch_including_the_uneven_split():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 9, 10)
    for k, d in itertools.product((1, 2, 3, 4, 5), (1, 2, 3)):
        conv = nn.Conv2d(2, 3, k, padding="same", dilation=d)
        before, after = same_padding(k, d)
        assert before + after == d * (k - 1)
        manual = nn.functional.conv2d(nn.functional.pad(x, (before, after, before, after)), conv.weight,
                                      conv.bias, dilation=d)
        torch.testing.assert_close(manual, conv(x), rtol=0, atol=1e-6)


def test_conv_macs_match_flop_counter_for_standard_grouped_depthwise_pointwise():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    for k, s, g in itertools.product((1, 3, 5), (1, 2), (1, 2, 8)):
        conv = nn.Conv2d(8, 16, k, stride=s, padding=k // 2, groups=g)
        out = conv(x)
        flops = _flop_counts(conv, x)["Global"][torch.ops.aten.convolution]
        per_example = conv_macs(8, 16, k, tuple(out.shape[-2:]), g)
        assert flops == 2 * x.shape[0] * per_example, (k, s, g)


def test_groups_that_do_not_divide_raise_naming_the_values():
    with pytest.raises(ValueError, match=r"groups=4.*in_channels=6"):
        conv_parameter_count(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match=r"groups=3.*out_channels=8"):
        conv_macs(6, 8, 3, 10, groups=3)
    with pytest.raises(ValueError, match=r"groups=4.*in_channels=6 and out_channels=10"):
        conv_weight_shape(6, 10, 3, groups=4)
    with pytest.raises(ValueError, match=r"groups must be a positive int, got 0"):
        conv_parameter_count(6, 8, 3, groups=0)
    with pytest.raises(ValueError, match=r"groups must be a positive int, got True"):  # one rule: a bool is no count
        conv_parameter_count(6, 8, 3, groups=True)
    with pytest.raises(ValueError, match=r"stride=2"):
        conv_output_size(10, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"padding must be .* got 'full'"):
        conv_output_size(10, 3, padding="full")


def test_separable_ratio_matches_real_depthwise_plus_pointwise_layers():
    for c_in, c_out, k in ((32, 64, 3), (16, 256, 3), (24, 40, 5), (3, 7, 7)):
        standard = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
        depthwise = nn.Conv2d(c_in, c_in, k, padding=k // 2, groups=c_in, bias=False)
        pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        separable = nn.Sequential(depthwise, pointwise)
        n_sep, n_std = _model_parameter_count(separable), _model_parameter_count(standard)
        assert separable_parameter_count(c_in, c_out, k) == n_sep
        assert separable_parameter_count(c_in, c_out, k, bias=True) == n_sep + c_in + c_out
        assert n_sep / n_std == pytest.approx(separable_savings_ratio(c_out, k), rel=1e-12)
        x = torch.randn(1, c_in, 9, 9)
        flop_ratio = _flop_counts(separable, x)["Global"][torch.ops.aten.convolution] / \
            _flop_counts(standard, x)["Global"][torch.ops.aten.convolution]
        assert flop_ratio == pytest.approx(separable_savings_ratio(c_out, k), rel=1e-12)
    assert separable_savings_ratio(256, 3) == pytest.approx(1 / 256 + 1 / 9)


def test_conv_kind():
    assert conv_kind(nn.Conv2d(8, 8, 3, groups=8)) == "depthwise"
    assert conv_kind(nn.Conv2d(8, 16, 3, groups=8)) == "depthwise"  # depth multiplier 2
    assert conv_kind(nn.Conv2d(8, 16, 1)) == "pointwise"
    assert conv_kind(nn.Conv2d(8, 16, 3, groups=2)) == "grouped"
    assert conv_kind(nn.Conv2d(8, 16, 1, groups=4)) == "grouped"
    assert conv_kind(nn.Conv2d(8, 16, 3)) == "standard"
    assert conv_kind(nn.Linear(4, 2)) == "linear"
    assert conv_kind(nn.BatchNorm2d(4)) == "batchnorm"
    with pytest.raises(TypeError, match="ReLU"):
        conv_kind(nn.ReLU())


# --------------------------------------------------------------- layer table


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_layer_table_params_equal_the_models_parameters(tables, name):
    model, table, _ = tables[name]
    assert table.total_params == _model_parameter_count(model)
    assert table.uncounted_params == 0
    named = dict(model.named_modules())
    for row in table:
        assert row.params == sum(p.numel() for p in named[row.name].parameters(recurse=False)), row.name
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) for m in model.modules())
    assert len(table) == n_layers


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_layer_table_macs_match_flop_counter_per_layer_and_in_total(tables, name):
    model, table, counts = tables[name]
    prefix = type(model).__name__
    for row in table:
        if row.kind == "batchnorm":
            continue
        op = torch.ops.aten.addmm if row.kind == "linear" else torch.ops.aten.convolution
        assert 2 * row.macs == counts[f"{prefix}.{row.name}"][op], row.name
    total_flops = sum(counts["Global"].values())
    assert abs(2 * table.conv_linear_macs - total_flops) / total_flops < 1e-3  # issue's 0.1%
    assert table.total_macs == table.conv_linear_macs + sum(r.macs for r in table.select("batchnorm"))


def test_known_figures_of_resnet18_and_mobilenet_v2(tables):
    _, resnet, _ = tables["resnet18"]
    _, mobilenet, _ = tables["mobilenet_v2"]
    # quoted as "1.82 GMACs, 11.69M params" and "0.30 GMACs, 3.50M params" (torchvision's
    # model docs list 1.81 / 0.30 "GFLOPS", which are conv + linear MACs)
    assert resnet.conv_linear_macs / 1e9 == pytest.approx(1.82, rel=0.01)
    assert round(resnet.conv_linear_macs / 1e9, 2) == 1.81
    assert round(resnet.total_macs / 1e9, 2) == 1.82  # with BatchNorm's multiply-adds
    assert round(resnet.total_params / 1e6, 2) == 11.69
    assert mobilenet.conv_linear_macs / 1e9 == pytest.approx(0.30, rel=0.01)
    assert round(mobilenet.total_params / 1e6, 2) == 3.50


def test_mobilenet_v2_split_by_kind(tables):
    model, table, _ = tables["mobilenet_v2"]
    split = table.by_kind()
    depthwise_modules = [m for m in model.modules()
                         if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert split["depthwise"].layers == len(depthwise_modules) == 17
    assert split["depthwise"].params == sum(m.weight.numel() for m in depthwise_modules)
    assert "grouped" not in split
    assert sum(t.params for t in split.values()) == table.total_params
    assert sum(t.macs for t in split.values()) == table.total_macs
    assert sum(t.macs_share for t in split.values()) == pytest.approx(1.0)
    # MobileNetV2 spends its MACs in the 1x1 convs, not the depthwise ones
    assert split["pointwise"].macs_share > 0.8 > 0.1 > split["depthwise"].macs_share
    assert table.row("features.1.conv.0.0").kind == "depthwise"
    assert table.row("features.0.0").output_shape == (32, 112, 112)


def test_layer_table_with_a_shape_batch_and_str():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = layer_table(model, (2, 3, 64, 64))
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    single = layer_table(model, torch.zeros(1, 3, 64, 64))
    assert table.total_macs == single.total_macs  # MACs are per example
    assert table.row("conv1").output_shape == (64, 32, 32)
    assert table.row("fc").params == 512 * 10 + 10
    text = str(table)
    assert "layer4.1.conv2" in text and f"{table.total_params:,} parameters" in text
    assert "pointwise" in table.format_by_kind()
    with pytest.raises(ValueError, match="unknown kind"):
        table.select("dense")
    with pytest.raises(KeyError, match="layer9"):
        table.row("layer9")


def test_layer_table_removes_hooks_and_restores_mode_when_forward_fails():
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10).train()
    with pytest.raises(RuntimeError):
        layer_table(model, (1, 4, 32, 32))  # 4 channels into a 3-channel stem
    assert all(not m._forward_hooks for m in model.modules())
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match=r"batch dimension.*\(1, 3, 0, 32\)"):
        layer_table(model, (1, 3, 0, 32))
    with pytest.raises(TypeError, match="nn.Module"):
        layer_table(lambda x: x, (1, 3))


def test_layer_table_counts_a_shared_module_per_call_and_reports_uncounted_params():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.scale = nn.Parameter(torch.ones(1))
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.conv(self.conv(x)) * self.scale

    table = layer_table(Twice(), (1, 3, 8, 8))
    assert len(table) == 1
    assert table.row("conv").macs == 2 * conv_macs(3, 3, 3, 8)
    assert table.row("conv").params == conv_parameter_count(3, 3, 3)
    assert table.uncounted_params == 1 + 6  # scale, and the Linear that never ran
    assert "7 parameters in layers not listed" in str(table)


def _cells_by_rule(text: str) -> list[list[str]]:
    """Cut every line of a plain-text table at the column spans its dashed rule line shows."""
    lines = text.splitlines()
    rule_index = next(i for i, line in enumerate(lines) if line and set(line) <= {"-", " "})
    spans, start = [], None
    for i, char in enumerate(lines[rule_index] + " "):
        if char == "-" and start is None:
            start = i
        elif char != "-" and start is not None:
            spans.append((start, i))
            start = None
    kept = [line for i, line in enumerate(lines) if i >= rule_index - 1 and i != rule_index]
    return [[line[a:b].strip() for a, b in spans] for line in kept]


def test_printed_tables_put_every_value_under_its_header(tables):
    model, table, _ = tables["mobilenet_v2"]
    text = str(table)
    body = text.splitlines()[1:-1]  # title line and totals line around the table
    cells = _cells_by_rule("\n".join(body))
    header, rows = cells[0], [c for c in cells[1:] if any(c)]
    assert header == ["name", "type", "in", "out", "kernel", "stride", "groups", "kind", "output", "params", "MACs"]
    assert len(rows) == len(table)
    for cells_of_row, row in zip(rows, table):
        shown = dict(zip(header, cells_of_row))
        assert shown["name"] == row.name and shown["kind"] == row.kind and shown["groups"] == str(row.groups)
        assert shown["params"] == f"{row.params:,}" and shown["MACs"] == f"{row.macs:,}"
        assert shown["output"] == "x".join(map(str, row.output_shape))
    by_kind = _cells_by_rule(table.format_by_kind())
    assert by_kind[0] == ["kind", "layers", "params", "params %", "MACs", "MACs %"]
    split = table.by_kind()
    for cells_of_row in by_kind[1:-1]:
        kind_total = split[cells_of_row[0]]
        assert cells_of_row[1] == str(kind_total.layers)
        assert cells_of_row[3] == f"{100 * kind_total.params_share:.1f}"
        assert cells_of_row[5] == f"{100 * kind_total.macs_share:.1f}"
    assert by_kind[-1] == ["total", str(len(table)), "3.50M", "100.0", "307.45M", "100.0"]


def test_layer_table_gives_each_module_its_own_training_flag_back():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    seen = []
    model[1].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    layer_table(model, (1, 3, 8, 8))
    assert seen == [False]  # measured in eval mode
    assert model.training and model[0].training and not model[1].training and model[2].training
