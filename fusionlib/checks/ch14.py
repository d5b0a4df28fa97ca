r"""Exercise checks of notebook 14 (fusion everywhere).

* 14.1 ``exercise_1(fold_bn_into_grouped_conv, seed)``: a BatchNorm folded into
  the grouped conv *after* it, ``W'[o,j] = W[o,j]·a[i(o,j)]``,
  ``b'[o] = b[o] + Σ_(j,k) W[o,j,k]·c[i(o,j)]`` with ``a = γ/√(σ²+ε)``,
  ``c = β − μ·a`` and ``i(o,j) = ⌊o/(O/g)⌋·(C/g) + j``. The BatchNorm has a
  large ``eps`` and tiny running variances, so a fold that forgets ``eps`` is
  far off.
* 14.2 ``exercise_2(corner_error, edge_error)``: the error of that fold used
  with ``padding=1``, on a one-channel example (``BN(x) = 2x + 0.5``, a 3x3 conv
  of ones): every tap on the padding adds ``W·c`` that the original never saw.
* 14.3 ``exercise_3(expected_groups, quiz)``: the groups ``auto_fuse`` fuses in
  the notebook's ``Quiz`` model.

Messages say what is wrong and in which direction, never the expected value.
"""
from __future__ import annotations

import copy
import numbers
from typing import Any, Callable

import torch
from torch import nn

from fusionlib import exercises
from fusionlib.auto_fuse import auto_fuse
from fusionlib.checks import direction
from fusionlib.folding import fuse_bn_conv_eval

__all__ = ["exercise_1", "exercise_2", "exercise_3", "padded_fold_error"]

#: the BatchNorm of 14.1: eps this large against variances this small makes a forgotten eps visible
EPS_14_1 = 0.5


def _batchnorm_14_1(seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(6, eps=EPS_14_1)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, generator=g))
        bn.running_var.copy_(torch.rand(6, generator=g) * 0.01 + 0.001)
        bn.weight.copy_(torch.rand(6, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(6, generator=g) * 0.5)
    return bn.eval()


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30))


def _wrong_weights(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> dict[str, torch.Tensor]:
    """The folded weight of each typical mistake, to name the one a wrong answer made."""
    var, w = bn.running_var.double(), conv.weight.double()
    a = bn.weight.double() / torch.sqrt(var + bn.eps)
    a_no_eps = bn.weight.double() / torch.sqrt(var)
    out_channels, per_group = w.shape[0], w.shape[1]
    first = torch.arange(out_channels) // (out_channels // conv.groups) * per_group
    channel = first[:, None] + torch.arange(per_group)[None, :]
    return {
        "eps": w * a_no_eps[channel][:, :, None, None],
        "groups": w * a[:per_group].reshape(1, -1, 1, 1),
        "output": w * a.repeat(out_channels // len(a) + 1)[:out_channels].reshape(-1, 1, 1, 1),
    }


WEIGHT_HINTS = {
    "eps": "It looks like a = γ/√σ²: you forgot eps, a = γ/√(σ² + eps) (this BatchNorm's eps is large).",
    "groups": "Scale each weight slice W[o, j] by a of the input channel it reads: with groups, that is not j "
              "but (o's group) * C/g + j.",
    "output": "That scales each output channel, as for a BatchNorm after the conv (notebook 02). Here the "
              "BatchNorm comes first: scale each weight slice W[o, j] by a of the input channel it reads.",
}


def exercise_1(fold_bn_into_grouped_conv: Callable[[nn.Module, nn.Module], nn.Module], seed: int = 0) -> str:
    """Check ``fold_bn_into_grouped_conv(bn, conv)`` on a 6-channel BatchNorm (eps 0.5) and a 3x3 conv, groups=2, stride 2."""
    torch.manual_seed(seed + 1)
    bn = _batchnorm_14_1(seed + 1)
    conv = nn.Conv2d(6, 4, 3, groups=2, stride=2).eval()
    bn_before, conv_before = exercises.snapshot(bn), exercises.snapshot(conv)
    folded = fold_bn_into_grouped_conv(bn, conv)
    exercises.expect_unchanged(bn, bn_before, name="bn")
    exercises.expect_unchanged(conv, conv_before, name="conv")
    exercises.expect_type(folded, nn.Conv2d, name="fold_bn_into_grouped_conv(bn, conv)")
    exercises.expect(folded is not conv, "fold_bn_into_grouped_conv returned conv itself: return a new conv.")
    reference = fuse_bn_conv_eval(bn, conv)
    for attr in ("weight", "bias"):
        got = getattr(folded, attr)
        exercises.expect(isinstance(got, torch.Tensor), f"the folded conv has no {attr}: give it one.")
        exercises.expect(tuple(got.shape) == tuple(getattr(reference, attr).shape),
                         f"folded {attr} has shape {tuple(got.shape)}; it should keep the conv's {attr} shape.")
    w = folded.weight.detach()
    error = _rel_error(w, reference.weight.detach())
    if error > 1e-5:
        mistake = next((why for why, wrong in _wrong_weights(bn, conv).items() if _rel_error(w, wrong) < 1e-5), None)
        exercises.fail(f"folded weight is off (max rel error {error:.2g}). "
                       + WEIGHT_HINTS.get(mistake, WEIGHT_HINTS["groups"]))
    error = _rel_error(folded.bias.detach(), reference.bias.detach())
    if error > 1e-5:
        shift_missing = _rel_error(folded.bias.detach(), conv.bias.detach()) < 1e-6
        exercises.fail(f"folded bias is off (max rel error {error:.2g}). "
                       + ("It is the conv's bias unchanged: " if shift_missing else "")
                       + "b' = b + Σ_(j,k) W[o,j,k]·c[i(o,j)], with c = β − μ·a the BatchNorm's shift.")
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        error = _rel_error(folded(x), conv(bn(x)))
    exercises.expect(error <= 1e-5, f"folded(x) differs from conv(bn(x)) (max rel error {error:.2g}) although the "
                                    "weight and bias match: keep the conv's stride, padding and groups.")
    return "weight, bias and outputs match conv(bn(x)) for groups=2, stride 2, and a BatchNorm with a large eps"


def padded_fold_error(a: float = 2.0, c: float = 0.5, size: int = 6) -> torch.Tensor:
    """``folded(x) − conv(bn(x))`` on a ``size x size`` image, one channel, 3x3 conv of ones with ``padding=1``.

    ``BN(x) = a·x + c``; the fold ``W' = a``, ``b' = 9·c`` assumes every tap reads ``a·x + c``; a tap on the
    padding reads 0 in the original, so each such tap adds ``c`` (``W = 1``) to the folded output.
    """
    bn = nn.BatchNorm2d(1, eps=0.0).eval()
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False).eval()
    folded = nn.Conv2d(1, 1, 3, padding=1).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.running_var.fill_(1.0); bn.running_mean.fill_(0.0); bn.weight.fill_(a); bn.bias.fill_(c)
        conv.weight.fill_(1.0)
        folded.weight.fill_(a); folded.bias.fill_(9 * c)
        x = torch.randn(1, 1, size, size, generator=g, dtype=torch.float32)
        return (folded(x) - conv(bn(x)))[0, 0].double()


def _number(value: Any, name: str) -> float:
    exercises.require_attempted(value, name)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        value = value.item()
    exercises.expect(isinstance(value, numbers.Real) and not isinstance(value, bool),
                     f"{name} is of type {type(value).__name__}: set it to a number.")
    return float(value)


def exercise_2(corner_error: Any, edge_error: Any) -> str:
    """Check the border errors of the padded fold (corner: taps of the 3x3 window on the padding times c)."""
    corner, edge = _number(corner_error, "corner_error"), _number(edge_error, "edge_error")
    error = padded_fold_error()
    true_corner, true_edge = float(error[0, 0]), float(error[0, 2])
    off = direction(corner, true_corner, name="corner_error", rtol=1e-3)
    exercises.expect(not off, f"corner_error is off: {off.split(' is ')[-1] if ' is ' in off else off}. Count the "
                     "taps of a corner pixel's 3x3 window that fall outside the image: each adds W·c = 0.5 in the "
                     "folded conv and 0 in the original.")
    off = direction(edge, true_edge, name="edge_error", rtol=1e-3)
    exercises.expect(not off, f"edge_error is off: {off.split(' is ')[-1] if ' is ' in off else off}. On an edge, "
                     "one row (or column) of the 3x3 window is outside the image.")
    return (f"corner {true_corner:.2f}, edge {true_edge:.2f}, interior {float(error[2, 2]):.2f}: "
            "only the taps on the padding err")


def _as_groups(value: Any) -> list[list[str]]:
    exercises.require_attempted(value, "expected_groups")
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(g, (list, tuple)) and all(isinstance(n, str) for n in g) for g in value)
    exercises.expect(ok, "expected_groups should be a list of lists of module names, e.g. [[\"c1\", \"b1\"]].")
    return [list(g) for g in value]


def exercise_3(expected_groups: Any, quiz: nn.Module) -> str:
    """Check the groups ``auto_fuse`` fuses in ``quiz`` (the notebook's ``Quiz()``), without showing them."""
    got = _as_groups(expected_groups)
    model = copy.deepcopy(quiz).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    _, report = auto_fuse(model, torch.randn(1, 3, 4, 4, generator=g))
    want = [list(gr) for gr in report.groups]
    if ["c2", "b2"] in got:
        exercises.fail("c2 + b2 cannot fuse: c2's output z is also added to b2(z); once c2 holds the folded "
                       "weights, that addition would read BN(z) instead of z.")
    if ["c3", "b3", "r3"] in got:
        exercises.fail("b3's output w is also read by w.mean(): with r3 in the group, w would become relu(w). "
                       "The pair c3 + b3 still fuses, without the ReLU.")
    wrong = [gr for gr in got if gr not in want]
    exercises.expect(not wrong, f"auto_fuse does not fuse {wrong}: a group is a conv, the BatchNorm it feeds and "
                                "(only when the BatchNorm's output goes nowhere else) its ReLU, in that order.")
    exercises.expect(len(set(map(tuple, got))) == len(got), "expected_groups lists a group twice.")
    missing = len(want) - len(got)
    exercises.expect(missing <= 0, f"expected_groups misses {missing} group(s) that auto_fuse fuses: look again at "
                                   "each conv whose output is read only by its BatchNorm.")
    exercises.expect(got == want, "the right groups, in the wrong order: list them in module order.")
    return f"auto_fuse fuses these {len(want)} groups and leaves {[s.bn for s in report.skipped]}"
