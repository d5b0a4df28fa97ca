"""Exercise checks of notebook 06 (structural re-parameterization).

Each ``exercise_k`` receives the student's answer, tests it and returns what
it verified; a wrong answer raises :class:`fusionlib.exercises.ExerciseError`
with a message that says what is wrong and in which direction, never the
expected value (see :mod:`fusionlib.checks`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fusionlib import exercises, reparam
from fusionlib.checks import direction

__all__ = ["exercise_1", "exercise_2", "exercise_3"]


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the relative error of ``verify``)."""
    scale = float(expected.abs().max()) or 1.0
    return float((actual.detach().double() - expected.detach().double()).abs().max()) / scale


def exercise_1(identity_kernel_grouped: Callable[[int, int, int], Any]) -> str:
    """06.1: ``identity_kernel_grouped(6, 3, 5)`` is ``[6, 2, 5, 5]`` and the grouped conv with it returns its input."""
    channels, groups, k = 6, 3, 5
    kernel = identity_kernel_grouped(channels, groups, k)
    exercises.expect_type(kernel, torch.Tensor, name="identity_kernel_grouped(6, 3, 5)")
    exercises.expect(kernel.is_floating_point(),
                     f"identity_kernel_grouped(6, 3, 5) has dtype {kernel.dtype}: a conv weight is a float tensor.")
    shape = tuple(kernel.shape)
    exercises.expect(shape == (channels, channels // groups, k, k),
                     f"identity_kernel_grouped(6, 3, 5).shape is {shape}: a grouped conv's weight is "
                     "[C, C/groups, k, k], each filter sees only the C/groups channels of its group.")
    x = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(6))
    out = F.conv2d(x, kernel.float(), padding=k // 2, groups=groups)
    error = _max_error(out, x)
    exercises.expect(error <= 1e-6,
                     f"F.conv2d(x, kernel, padding=2, groups=3) is not x (max rel error {error:.3g}): output "
                     "channel o reads channel o % (C/groups) of its own group, at the centre tap (k//2, k//2), "
                     "with weight 1 and zeros elsewhere.")
    return "shape [6, 2, 5, 5], and the grouped conv with it returns its input exactly"


def exercise_2(merge_1x1_into_kxk: Callable[[nn.Conv2d, nn.Conv2d], Any], seed: int) -> str:
    """06.2: a new kxk conv (stride 2, 2 groups) computing ``conv_kxk(x) + conv_1x1(x)``; both inputs untouched."""
    g = torch.Generator().manual_seed(seed + 2)
    conv_kxk = nn.Conv2d(4, 6, 5, stride=2, padding=2, groups=2).eval()
    conv_1x1 = nn.Conv2d(4, 6, 1, stride=2, padding=0, groups=2).eval()
    with torch.no_grad():
        for conv in (conv_kxk, conv_1x1):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
        conv_1x1.weight.mul_(10)                                    # a branch too large to hide
    kxk_before, one_before = exercises.snapshot(conv_kxk), exercises.snapshot(conv_1x1)
    merged = merge_1x1_into_kxk(conv_kxk, conv_1x1)
    exercises.expect_unchanged(conv_kxk, kxk_before, name="conv_kxk")
    exercises.expect_unchanged(conv_1x1, one_before, name="conv_1x1")
    exercises.expect_type(merged, nn.Conv2d, name="merge_1x1_into_kxk(conv_kxk, conv_1x1)")
    exercises.expect(merged is not conv_kxk and merged is not conv_1x1,
                     "merge_1x1_into_kxk returned one of its inputs: return a new conv (start from a copy).")
    w_kxk, w_1x1 = conv_kxk.weight.detach(), conv_1x1.weight.detach()
    weight = w_kxk + F.pad(w_1x1, (2, 2, 2, 2))
    corner = w_kxk + F.pad(w_1x1, (0, 4, 0, 4))
    bias = conv_kxk.bias.detach() + conv_1x1.bias.detach()
    mine_w = merged.weight.detach()
    exercises.expect(tuple(mine_w.shape) == tuple(w_kxk.shape),
                     f"the merged conv's weight has shape {tuple(mine_w.shape)}, conv_kxk's is "
                     f"{tuple(w_kxk.shape)}: pad the 1x1 kernel to k x k and add it, keeping conv_kxk's shape.")
    if _max_error(mine_w, weight) > 1e-6:
        if _max_error(mine_w, corner) <= 1e-6:
            exercises.fail("the merged conv's weight is off: the 1x1 tap belongs at the centre (k//2, k//2) of the "
                           "kxk kernel, not at a corner: pad k//2 on every side.")
        if _max_error(mine_w, w_kxk) <= 1e-6:
            exercises.fail("the merged conv's weight is conv_kxk's alone: add the 1x1 kernel, padded to k x k.")
        exercises.fail("the merged conv's weight is off: W' = W_kxk + P(W_1x1), with the 1x1 tap at the centre.")
    exercises.expect(merged.bias is not None, "the merged conv has no bias: b' = b_kxk + b_1x1.")
    mine_b = merged.bias.detach()
    exercises.expect(tuple(mine_b.shape) == tuple(bias.shape),
                     f"the merged conv's bias has shape {tuple(mine_b.shape)}: one entry per output channel.")
    if _max_error(mine_b, bias) > 1e-6:
        if _max_error(mine_b, conv_kxk.bias.detach()) <= 1e-6:
            exercises.fail("the merged conv's bias is conv_kxk's alone; "
                           "b' = b_kxk + b_1x1: both convs have a bias here.")
        exercises.fail("the merged conv's bias is off; b' = b_kxk + b_1x1: both convs have a bias here.")
    x = torch.randn(2, 4, 11, 11, generator=g)
    with torch.no_grad():
        error = _max_error(merged(x), conv_kxk(x) + conv_1x1(x))
    exercises.expect(error <= 1e-5, f"merged(x) differs from conv_kxk(x) + conv_1x1(x) (max rel error {error:.3g}) "
                     "although weight and bias are right, so a conv setting changed: start from a copy of conv_kxk.")
    return "weight and bias match, and merged(x) = conv_kxk(x) + conv_1x1(x) with stride 2 and 2 groups"


def _exercise_3_block() -> reparam.RepBlock:
    """The one-channel RepBlock of the prompt: centre taps 2 and 1, the three BNs as stated, every eps 1."""
    block = reparam.RepBlock(1, 1).eval()
    settings = [(block.conv_kxk[1], 2.0, 1.0, 3.0, 0.0), (block.conv_1x1[1], 1.0, 0.0, 3.0, 1.0),
                (block.identity, 3.0, 2.0, 8.0, 0.5)]
    with torch.no_grad():
        block.conv_kxk[0].weight.zero_()
        block.conv_kxk[0].weight[0, 0, 1, 1] = 2.0
        block.conv_1x1[0].weight.fill_(1.0)
        for bn, gamma, mu, var, beta in settings:
            bn.eps = 1.0
            bn.weight.fill_(gamma); bn.running_mean.fill_(mu); bn.running_var.fill_(var); bn.bias.fill_(beta)
    return block


def _tap_and_bias(eps: float = 1.0, identity: bool = True) -> tuple[float, float]:
    """A variant of the prompt's arithmetic (for recognising mistakes): centre tap and bias."""
    k3, k1, k0 = 2 / (3 + eps) ** 0.5, 1 / (3 + eps) ** 0.5, 3 / (8 + eps) ** 0.5
    tap = 2 * k3 + 1 * k1 + (k0 if identity else 0.0)
    bias = (0 - 1 * k3) + (1 - 0 * k1) + ((0.5 - 2 * k0) if identity else 0.0)
    return tap, bias


def exercise_3(center_tap: Any, bias_merged: Any) -> str:
    """06.3: the deployed conv's centre tap and bias of the prompt's RepBlock, as plain Python floats."""
    for value, label in ((center_tap, "center_tap"), (bias_merged, "bias_merged")):
        exercises.expect(not isinstance(value, torch.Tensor), f"{label} should be a plain Python float, not a tensor.")
        exercises.expect(not isinstance(value, bool), f"{label} should be a plain Python float, not a bool.")
        exercises.expect_type(value, (float, int), name=label)
    deployed_conv = _exercise_3_block().deployed_conv()
    want_tap, want_bias = float(deployed_conv.weight.detach()[0, 0, 1, 1]), float(deployed_conv.bias.detach()[0])
    answer = (float(center_tap), float(bias_merged))

    def near(pair: tuple[float, float]) -> bool:
        return all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(answer, pair))

    if near(_tap_and_bias(eps=0.0)):
        hint = "Did you forget eps? k = γ/√(σ² + ε), and every BN here has ε = 1."
    elif near(_tap_and_bias(identity=False)):
        hint = "The identity branch is a BN too: it adds k0 to the centre tap and β0 − k0·μ0 to the bias."
    else:
        hint = "W' = Σ k_j·W_j (centre taps), b' = Σ (β_j − k_j·μ_j), with k_j = γ_j/√(σ²_j + ε)."
    for value, want, label in ((answer[0], want_tap, "center_tap"), (answer[1], want_bias, "bias_merged")):
        off = direction(value, want, name=label)
        exercises.expect(not off, f"{off}. {hint}")
    return f"center_tap = {answer[0]:g}, bias_merged = {answer[1]:g}: the block is one conv"
