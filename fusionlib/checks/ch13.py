"""Exercise checks of notebook 13 (LoRA): fuse an adapter into a linear layer, the conv update kernel, merge then fold.

Each ``exercise_k`` receives the student's answer, raises
:class:`fusionlib.exercises.ExerciseError` with a message that says what is
wrong and in which direction (never the expected value), and returns what it
verified. The reference values come from :mod:`fusionlib.lora` and
:mod:`fusionlib.folding`, not from formulas written here.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fusionlib import exercises, lora
from fusionlib.checks import direction
from fusionlib.folding import fuse_conv_bn_eval

__all__ = ["exercise_1", "exercise_2", "exercise_3"]


def exercise_1(fuse_lora_linear: Callable[..., Any], seed: int) -> str:
    """Exercise 13.1: ``fuse_lora_linear(linear, lora_A, lora_B, alpha, lora_scale)`` returns a new fused ``nn.Linear``.

    Reference: a :class:`fusionlib.lora.LoRALinear` on a copy of the layer with
    the same A and B, merged with ``lora_scale`` (``Linear(6, 5)``, rank 2,
    ``alpha=8``, ``lora_scale=0.5``); the original layer must stay untouched.
    Recognises a missing ``alpha / r``, ``r / alpha`` instead, and a missing ``lora_scale``.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    linear = nn.Linear(6, 5)
    lora_A, lora_B = torch.randn(2, 6, generator=generator), torch.randn(5, 2, generator=generator)
    alpha, lora_scale = 8, 0.5
    before = exercises.snapshot(linear)
    result = fuse_lora_linear(linear, lora_A.clone(), lora_B.clone(), alpha=alpha, lora_scale=lora_scale)
    exercises.expect_unchanged(linear, before, name="linear")
    exercises.expect_type(result, nn.Linear, name="fuse_lora_linear(...)")
    exercises.expect(result is not linear, "fuse_lora_linear returned the layer it was given: return a new nn.Linear.")

    reference = lora.LoRALinear(copy.deepcopy(linear), r=lora_A.shape[0], alpha=alpha)
    with torch.no_grad():
        reference.lora_A.copy_(lora_A)
        reference.lora_B.copy_(lora_B)
    expected = {"weight": lora.merge_lora_weight(linear.weight.detach(), lora_A, lora_B, reference.scaling, lora_scale),
                "bias": linear.bias.detach()}
    mine, update = result.weight.detach(), lora_B @ lora_A
    hint = "W' = W + lora_scale * (alpha / r) * (lora_B @ lora_A), with r = lora_A.shape[0]."
    # the update with each factor of lambda * alpha / r left out or inverted
    W, r = linear.weight.detach(), lora_A.shape[0]
    for factor, advice in [(lora_scale, "The update is scaled by alpha / r: you left the scaling out."),
                           (lora_scale * r / alpha, f"The scaling is alpha / r = {alpha} / {r}, not r / alpha."),
                           (alpha / r, "lora_scale multiplies the update too.")]:
        wrong = W + factor * update
        if mine.shape == wrong.shape and torch.allclose(mine, wrong, atol=1e-5):
            hint = advice
    exercises.expect_state_close(result, expected, rtol=1e-6, name="the fused linear", hint=hint)
    return "weight W + lambda * (alpha / r) * B A, bias unchanged, and the original layer untouched"


def exercise_2(lora_conv_kernel: Callable[..., Any], seed: int) -> str:
    """Exercise 13.2: ``lora_conv_kernel(lora_A, lora_B)`` is the ``[C_out, C_in, k, k]`` kernel B (x) A.

    Tested as the prompt states it: one conv with the kernel (stride 2,
    padding 1) against the conv ``lora_A`` followed by the 1x1 conv
    ``lora_B``, in float64 (``rtol`` 1e-9), for r = 3, 4 -> 6 channels, 3x3.
    """
    generator = torch.Generator().manual_seed(seed + 2)
    lora_A = torch.randn(3, 4, 3, 3, generator=generator, dtype=torch.float64)
    lora_B = torch.randn(6, 3, 1, 1, generator=generator, dtype=torch.float64)
    kernel = lora_conv_kernel(lora_A.clone(), lora_B.clone())
    name = "lora_conv_kernel(lora_A, lora_B)"
    exercises.expect_type(kernel, torch.Tensor, name=name)
    exercises.expect(kernel.is_floating_point(), f"{name} has dtype {kernel.dtype}: the kernel holds real numbers.")
    exercises.expect_equal(tuple(kernel.shape), (6, 4, 3, 3), name=f"{name}.shape",
                           hint="The kernel is [C_out, C_in, k, k]: C_out from lora_B, C_in and k from lora_A.")
    x = torch.randn(2, 4, 9, 9, generator=generator, dtype=torch.float64)
    two_convs = F.conv2d(F.conv2d(x, lora_A, stride=2, padding=1), lora_B)
    mine = F.conv2d(x, kernel.double(), stride=2, padding=1)
    hint = ("(B (x) A)[o, i, u, v] = sum over j of B[o, j, 0, 0] * A[j, i, u, v]: lora_B as [C_out, r] times lora_A as "
            "[r, C_in*k*k].")
    centre = torch.zeros_like(kernel, dtype=torch.float64)
    centre[:, :, 1, 1] = kernel.double()[:, :, 1, 1]
    if torch.allclose(kernel.double(), centre) and torch.allclose(
            F.conv2d(x, centre, stride=2, padding=1),
            F.conv2d(F.conv2d(x, lora_A[:, :, 1:2, 1:2], stride=2), lora_B)):
        hint = "Every tap (u, v) of A's kernel is mixed by B, not only the centre one."
    max_abs, max_rel, _ = exercises.tensor_error(mine, two_convs)
    if not max_rel <= 1e-9:
        exercises.fail(f"F.conv2d(x, kernel, stride=2, padding=1) is off: max rel error {max_rel:.3g} against the two "
                       f"convs (tolerance 1e-09). {hint}")
    return "one 3x3 conv with B (x) A equals the 3x3 conv lora_A followed by the 1x1 conv lora_B (stride 2)"


def exercise_3(w_deployed: Any, b_deployed: Any) -> str:
    """Exercise 13.3: the weight and bias of the deployed 1x1 conv (adapter merged, then BatchNorm folded).

    The reference is built with :class:`fusionlib.lora.LoRAConv2d`,
    :func:`fusionlib.lora.merge_and_unload` and
    :func:`fusionlib.folding.fuse_conv_bn_eval` on the layer of the prompt
    (W = 2, r = 1, alpha = 2, A = 0.5, B = 3; gamma 2, mu 1, var 15, beta 1, eps 1).
    """
    for value, label in ((w_deployed, "w_deployed"), (b_deployed, "b_deployed")):
        exercises.expect(not isinstance(value, (torch.Tensor, bool)),
                         f"{label} should be a plain Python float, not a {type(value).__name__}.")
        exercises.expect_type(value, (float, int), name=label)
    conv = nn.Conv2d(1, 1, 1, bias=False)
    bn = nn.BatchNorm2d(1, eps=1.0).eval()
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.weight.fill_(2.0); bn.running_mean.fill_(1.0); bn.running_var.fill_(15.0); bn.bias.fill_(1.0)
    layer = lora.LoRAConv2d(conv, r=1, alpha=2.0)
    with torch.no_grad():
        layer.lora_A.fill_(0.5); layer.lora_B.fill_(3.0)
    merged = lora.merge_and_unload(layer).eval()
    deployed = fuse_conv_bn_eval(merged, bn)
    want_w, want_b = float(deployed.weight.detach()), float(deployed.bias.detach())
    folded_first = float(fuse_conv_bn_eval(copy.deepcopy(conv).eval(), bn).weight.detach()) + float(layer.scaling * 3.0 * 0.5)
    hint = ("Merge first: W' = W + (alpha / r) * B * A; then fold: w = W' * k, b = (0 - mu) * k + beta, "
            "k = gamma / sqrt(var + eps).")
    if abs(float(w_deployed) - folded_first) < 1e-6:
        hint = ("You folded BatchNorm before merging (W * k + delta W): the adapter was trained inside the BatchNorm, "
                "so the update is scaled by k too.")
    elif abs(float(w_deployed) - float(merged.weight.detach())) < 1e-6:
        hint = "That is the merged weight before folding: multiply by k = gamma / sqrt(var + eps)."
    for value, want, label, advice in ((w_deployed, want_w, "w_deployed", hint),
                                       (b_deployed, want_b, "b_deployed",
                                        "The adapter adds nothing to the bias: b = (0 - mu) * k + beta.")):
        word = direction(float(value), want, name=label, rtol=1e-6)
        if word:
            exercises.fail(f"{label} is off ({word.removeprefix(label + ' ').removeprefix('is ')}). {advice}")
    return "w_deployed and b_deployed are the merged, then folded conv's: merge, then fold"
