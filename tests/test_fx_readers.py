"""fuse_conv_bn and other readers of the modules it folds; modules shared under several names.

Folding replaces the conv / linear layer by one holding ``W' = W·s``, ``b' = (b − μ)·s + β``
and drops the BatchNorm call. Anything else in the graph that reads those modules (a
``get_attr`` of their parameters or buffers, a call of a module that contains them) would
see the rewritten weights, or lose sight of BatchNorm's tensors: such pairs must be left,
with a reason. Modules are told apart by identity: one module may have several names.

Tolerances: a pair that is left unfolded runs exactly the eager ops, so those outputs are
compared with ``rtol=1e-6``; folded pairs with ``rtol=1e-5`` (float32 rounding of ``W·s``).
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import fusionlib.fx as ffx
from fusionlib.fx import fuse_conv_bn
from fusionlib.verify import compare_outputs

UNFOLDED_RTOL = 1e-6  # nothing folded: the same ops as eager
FOLDED_RTOL = 1e-5  # folded weights: float32 rounding only


def with_statistics(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> nn.modules.batchnorm._BatchNorm:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
    bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
    bn.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return bn


def assert_close(reference: nn.Module, candidate: nn.Module, x: torch.Tensor, rtol: float) -> None:
    with torch.no_grad():
        check = compare_outputs(reference(x), candidate(x), rtol=rtol)
    assert check.passed, check


class ReadsTensors(nn.Module):
    """``bn(conv(x))`` plus another reader of one of the pair's tensors (``reader``)."""

    def __init__(self, reader: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.reader = reader
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = with_statistics(nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.reader == "conv.weight":
            return y + self.conv.weight.sum()
        if self.reader == "conv.bias":
            return y + self.conv.bias.view(1, 4, 1, 1)
        pooled = y.mean((2, 3))
        if self.reader == "bn.running_mean":  # a buffer: traced as get_attr when passed to an op
            return pooled + self.bn.running_mean
        if self.reader == "bn.weight":
            return pooled * self.bn.weight
        raise ValueError(self.reader)


@pytest.mark.parametrize("reader", ["conv.weight", "conv.bias", "bn.running_mean", "bn.weight"])
def test_a_pair_whose_tensors_are_read_elsewhere_is_skipped(reader: str) -> None:
    model = ReadsTensors(reader).eval()
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == [reader]
    assert report.num_fused == 0, str(report)
    assert report.reasons() == {"read elsewhere": 1}, str(report)
    assert f"'{reader}'" in report.skipped[0].detail
    assert "read elsewhere" in str(report)
    assert ffx.count_batchnorm_nodes(gm) == 1
    assert_close(model, gm, torch.randn(2, 3, 8, 8), UNFOLDED_RTOL)


def test_only_the_pair_that_is_read_elsewhere_is_skipped() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), with_statistics(nn.BatchNorm2d(4), 1)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), with_statistics(nn.BatchNorm2d(4), 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return y * self.conv2.weight.abs().mean()

    model = Model().eval()
    gm = fuse_conv_bn(model)
    report = gm.fusion_report
    assert [(p.layer, p.bn) for p in report.fused] == [("conv1", "bn1")]
    assert [(s.layer, s.bn, s.kind) for s in report.skipped] == [("conv2", "bn2", "read elsewhere")]
    assert "conv2.weight" in report.skipped[0].detail
    assert_close(model, gm, torch.randn(2, 3, 8, 8), FOLDED_RTOL)


def test_a_leaf_module_containing_the_conv_makes_the_pair_skip() -> None:
    class Gate(nn.Module):  # traced as a leaf: fx cannot see that it uses conv
        def __init__(self, conv: nn.Conv2d) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.conv(x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), with_statistics(nn.BatchNorm2d(4))
            self.gate = Gate(self.conv)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) * self.gate(x)

    model = Model().eval()
    gm = fuse_conv_bn(model, leaf_modules=[Gate])
    report = gm.fusion_report
    assert report.num_fused == 0 and report.reasons() == {"read elsewhere": 1}, str(report)
    assert "'gate'" in report.skipped[0].detail
    assert_close(model, gm, torch.randn(2, 3, 8, 8), UNFOLDED_RTOL)


# --------------------------------------------------------------------------- one module, several names

class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), with_statistics(nn.BatchNorm2d(4))


class TwoCalls(nn.Module):
    """``block.bn(block.conv(x))`` and a second call of ``block.conv`` (``then_bn``: also followed by bn)."""

    def __init__(self, then_bn: bool) -> None:
        super().__init__()
        self.block, self.then_bn = Pair(), then_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        second = self.block.conv(2 * x)
        if self.then_bn:
            second = self.block.bn(second)
        return self.block.bn(self.block.conv(x)) + second


def aliased_graph_module(model: nn.Module, alias: str) -> fx.GraphModule:
    """Trace ``model``, then give the module (``alias="leaf"``: the conv; ``"parent"``: its
    container) a second name and call it through that name at its second call site."""
    gm = fx.symbolic_trace(model)
    if alias == "leaf":
        gm.block.conv2 = gm.block.conv
        new_target = "block.conv2"
    else:
        gm.block2 = gm.block
        new_target = "block2.conv"
    second = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "block.conv"][0]
    second.target = new_target
    gm.recompile()
    names = [name for name, m in gm.named_modules(remove_duplicate=False) if m is gm.block.conv]
    assert len(names) == 2 and new_target in names
    return gm


@pytest.mark.parametrize("alias", ["leaf", "parent"])
def test_a_module_called_under_two_names_is_shared(alias: str) -> None:
    """A conv called as ``block.conv`` (then BN) and as an alias (bare) is one shared module:
    folding it would change the bare call too (through the parent alias it really would)."""
    model = TwoCalls(then_bn=False).eval()
    gm = aliased_graph_module(model, alias)
    fused = fuse_conv_bn(gm)
    report = fused.fusion_report
    assert report.num_fused == 0 and report.reasons() == {"shared layer": 1}, str(report)
    assert "several names" in report.skipped[0].detail and "without this BatchNorm" in report.skipped[0].detail
    x = torch.randn(2, 3, 8, 8)
    assert_close(model, fused, x, UNFOLDED_RTOL)
    assert_close(model, gm, x, UNFOLDED_RTOL)  # inplace=False: the input graph module is untouched


@pytest.mark.parametrize("alias", ["leaf", "parent"])
def test_a_module_called_under_two_names_folds_when_every_call_is_followed_by_its_bn(alias: str) -> None:
    model = TwoCalls(then_bn=True).eval()
    gm = aliased_graph_module(model, alias)
    fused = fuse_conv_bn(gm)
    report = fused.fusion_report
    assert report.num_fused == 1 and report.fused[0].call_sites == 2, str(report)
    assert ffx.count_batchnorm_nodes(fused) == 0
    called = {n.target for n in fused.graph.nodes if n.op == "call_module"}
    assert len(called) == 2 and len({id(fused.get_submodule(t)) for t in called}) == 1
    assert_close(model, fused, torch.randn(2, 3, 8, 8), FOLDED_RTOL)


def test_a_get_attr_through_an_alias_is_a_reader() -> None:
    """``conv2.weight`` names the same tensor as ``conv.weight``: found by identity."""
    model = ReadsTensors("conv.weight").eval()
    gm = fx.symbolic_trace(model)
    gm.conv2 = gm.conv
    node = next(n for n in gm.graph.nodes if n.op == "get_attr")
    node.target = "conv2.weight"
    gm.recompile()
    fused = fuse_conv_bn(gm)
    assert fused.fusion_report.reasons() == {"read elsewhere": 1}, str(fused.fusion_report)
    assert "'conv2.weight'" in fused.fusion_report.skipped[0].detail
    assert_close(model, fused, torch.randn(2, 3, 8, 8), UNFOLDED_RTOL)


def test_passes_and_profiling_accept_aliased_module_names() -> None:
    model = TwoCalls(then_bn=False).eval()
    gm = aliased_graph_module(model, "leaf")
    assert ffx.count_batchnorm_nodes(gm) == 1
    assert ffx.remove_identity(gm) == "removed 0 Identity node(s)"
    interp = ffx.ProfilingInterpreter(gm)
    table = interp.profile(torch.randn(1, 3, 8, 8), runs=1, warmup=0)
    assert {r.op_type for r in table} >= {"Conv2d", "BatchNorm2d"}
