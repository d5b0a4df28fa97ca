"""Layout passes: MKLDNN regions and binary ops, the deterministic default, the timed opt-in.

Outputs are compared with :func:`fusionlib.verify.compare_outputs` at ``rtol=1e-4`` (MKLDNN
and channels-last kernels sum in a different order than the dense NCHW ones).
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

import fusionlib.display
import fusionlib.fx as ffx
import fusionlib.fx.layout as layout
import fusionlib.fx.tracing as tracing
import fusionlib.modules
from fusionlib.bench import LatencyRow, LatencyTable
from fusionlib.fx.layout import MkldnnConv2d
from fusionlib.verify import compare_outputs

RTOL = 1e-4


def assert_close(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        check = compare_outputs(reference(x), candidate(x), rtol=RTOL)
    assert check.passed, check


class PooledAdd(nn.Module):
    """``y + pool(y)``: a broadcasting add ([N, C, H, W] + [N, C, 1, 1]) after convs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu, self.pool = nn.ReLU(), nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv2(self.relu(self.conv1(x))))
        return y + self.pool(y)


class Residual(nn.Module):
    """``relu(conv2(relu(conv1(x))) + x)``: an add of two equal shapes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv0(x))
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


def add_inputs(gm: fx.GraphModule) -> list[str]:
    """What each add reads: 'dense' (a to_dense output or plain tensor) or 'mkldnn'."""
    adds = [n for n in gm.graph.nodes if n.target in (operator.add, torch.add)]
    assert adds
    return ["dense" if all(a.target == "to_dense" or not a.name.startswith(("conv", "relu", "pool"))
                           for a in n.args) else "mkldnn" for n in adds]


@pytest.mark.parametrize("with_inputs", [False, True])
def test_mkldnn_pass_keeps_a_broadcasting_add_dense(with_inputs: bool) -> None:
    """oneDNN's sum cannot broadcast: this graph raised 'could not create a primitive
    descriptor for the sum primitive' when the add joined the MKLDNN region."""
    model = PooledAdd().eval()
    x = torch.randn(2, 3, 10, 10)
    gm = ffx.optimize_for_inference(model, x if with_inputs else None, passes=["mkldnn"])
    assert sum(isinstance(m, MkldnnConv2d) for m in gm.modules()) == 2
    assert add_inputs(gm) == ["dense"]
    assert_close(model, gm, x)


def test_an_add_of_equal_shapes_joins_the_region_only_when_shapes_are_known() -> None:
    model = Residual().eval()
    x = torch.randn(2, 3, 10, 10)
    unknown = ffx.optimize_for_inference(model, passes=["mkldnn"])
    known = ffx.optimize_for_inference(model, x, passes=["mkldnn"])
    assert add_inputs(unknown) == ["dense"]
    assert add_inputs(known) == ["mkldnn"]
    assert [n.target for n in known.graph.nodes if n.op == "call_method"] == ["to_mkldnn", "to_dense"]
    for gm in (unknown, known):
        assert_close(model, gm, x)
    direct = fx.symbolic_trace(Residual().eval())  # the pass itself propagates shapes when given inputs
    ffx.to_mkldnn(direct, example_inputs=x)
    assert add_inputs(direct) == ["mkldnn"]


def test_mkldnn_docstrings_name_the_private_torch_op() -> None:
    for doc in (ffx.to_mkldnn.__doc__, ffx.PASSES["mkldnn"].__doc__, layout.__doc__):
        assert "torch._C._nn.mkldnn_reorder_conv2d_weight" in doc


# --------------------------------------------------------------------------- the default is deterministic

def no_timing(*args: object, **kwargs: object) -> None:
    raise AssertionError("the default pipeline must not time anything")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_default_passes_time_nothing_and_give_the_same_graph(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "compare_latency", no_timing)
    assert "timed_layout" not in ffx.DEFAULT_PASSES and "auto_layout" not in ffx.DEFAULT_PASSES
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    first, second = ffx.optimize_for_inference(model, x), ffx.optimize_for_inference(model, x)
    assert first.code == second.code
    assert first.optimization_report.steps[-1].name == "channels_last"
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in first.modules() if isinstance(m, nn.Conv2d))
    assert_close(model, first, x)


def test_auto_layout_is_a_static_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """ResNet18: with shapes, one MKLDNN region holds all 20 convs (2 conversions); without
    shapes the residual adds cut it short. MobileNetV2: ReLU6 cuts regions: channels-last."""
    monkeypatch.setattr(layout, "compare_latency", no_timing)
    x = torch.randn(1, 3, 32, 32)
    chosen = {}
    for name in ("resnet18", "mobilenet_v2"):
        model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
        for inputs in (x, None):
            gm = ffx.optimize_for_inference(model, inputs, passes=["fold_batchnorm", "auto_layout"])
            summary = gm.optimization_report.steps[-1].summary
            assert "static rule" in summary
            chosen[name, inputs is not None] = summary.split()[1]
            assert_close(model, gm, x)
    assert chosen == {("resnet18", True): "mkldnn", ("resnet18", False): "channels_last",
                      ("mobilenet_v2", True): "channels_last", ("mobilenet_v2", False): "channels_last"}


def fake_compare_latency(medians_ms: dict[str, float]):
    def compare_latency(fns: dict, warmup: int = 1, repeats: int = 5, **kwargs: object) -> LatencyTable:
        for fn in fns.values():
            fn()  # every candidate graph runs
        rows = [LatencyRow(name, medians_ms[name], 0.0, 1.0) for name in fns]
        return LatencyTable(rows, next(iter(fns)), warmup, repeats)
    return compare_latency


def test_timed_layout_is_opt_in_and_reports_what_it_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Residual().eval()
    x = torch.randn(2, 3, 10, 10)
    with pytest.raises(ValueError, match="timed_layout.*example_inputs"):
        ffx.optimize_for_inference(model, passes=["timed_layout"])
    with pytest.raises(ValueError, match="needs example_inputs"):
        ffx.choose_layout(fx.symbolic_trace(model), timed=True)
    for fastest in ("mkldnn", "channels_last", "dense"):
        medians = {"mkldnn": 3.0, "channels_last": 2.0, "dense": 4.0, fastest: 1.5}
        monkeypatch.setattr(layout, "compare_latency", fake_compare_latency(medians))
        gm = ffx.optimize_for_inference(model, x, passes=["timed_layout"])
        summary = gm.optimization_report.steps[-1].summary
        assert summary.startswith(f"chose {fastest} (timed")
        for name, ms in medians.items():
            assert f"{name} {ms:.1f} ms" in summary
        assert_close(model, gm, x)
    gm = fx.symbolic_trace(model)
    assert ffx.choose_layout(gm, x, timed=True).startswith("chose dense (timed")


def test_timed_layout_really_times_the_candidates() -> None:
    model = Residual().eval()
    x = torch.randn(1, 3, 10, 10)
    gm = ffx.optimize_for_inference(model, x, passes=["timed_layout"])
    summary = gm.optimization_report.steps[-1].summary
    assert all(f"{name} " in summary and " ms" in summary for name in ("mkldnn", "channels_last", "dense"))
    assert_close(model, gm, x)


# --------------------------------------------------------------------------- shared helpers and tables

def test_shared_helpers_come_from_fusionlib_modules() -> None:
    assert tracing.set_submodule is fusionlib.modules.set_submodule
    assert tracing.require_eval_mode is fusionlib.modules.require_eval_mode
    assert tracing.format_table is fusionlib.display.format_table


def test_reports_print_as_tables() -> None:
    model = Residual().eval()
    x = torch.randn(1, 3, 10, 10)
    gm = ffx.optimize_for_inference(model, x)
    text = str(gm.optimization_report)
    lines = text.splitlines()
    assert lines[0] == "optimize_for_inference(Residual):"
    assert lines[1].split() == ["pass", "ms", "what", "it", "did"] and set(lines[2].split()) == {"-" * len(w) for w in
                                                                                            lines[2].split()}
    assert [line.split()[0] for line in lines[3:-1]] == list(ffx.DEFAULT_PASSES)
    assert lines[-1].startswith("  check vs eager: max rel error")
    interp = ffx.ProfilingInterpreter(model)
    interp.profile(x, runs=1, warmup=0)
    table = str(interp.summary_by_op_type())
    assert table.splitlines()[0].split() == ["op", "type", "nodes", "mean", "ms", "%", "total"]
    assert any(line.split()[:2] == ["Conv2d", "3"] for line in table.splitlines())
