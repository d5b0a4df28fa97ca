"""Exercise checks of notebook 10 (quantization-aware training).

* :func:`exercise_1` — ``ste_gradient(x, amax, unsigned=False)``: the
  straight-through gradient of fake quantization, 1 inside the grid's range
  (endpoints included), 0 where clipped; signed ``[-amax, amax]`` or unsigned
  ``[0, amax]``.
* :func:`exercise_2` — ``deployed_bias(conv, bn)``: the bias of the deployed
  conv, ``b' = beta + (b - mu_run) * s`` with ``s = gamma / sqrt(var_run + eps)``.
* :func:`exercise_3` — the correction factor ``sigma_run / sigma_B`` while
  training, and the factor once the statistics are frozen.

Each returns what it verified, or fails with a message that says what is
wrong and in which direction, never the expected value.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from fusionlib import exercises
from fusionlib.checks import direction
from fusionlib.quant import fake_quantize
from fusionlib.quant.qat import QATConvBn2d

__all__ = ["exercise_1", "exercise_2", "exercise_3"]

STE_HINT = ("The STE passes the gradient (1) where -amax <= x <= amax, endpoints included, and blocks it (0) where "
            "x is clipped.")


def _expect_float_tensor(value: Any, like: torch.Tensor, name: str) -> torch.Tensor:
    """A floating-point tensor of ``like``'s shape (a bool or integer mask is refused: the prompt asks for a float)."""
    exercises.expect_type(value, torch.Tensor, name=name)
    exercises.expect(not (value.dtype == torch.bool), f"{name} is a bool tensor: return a float tensor like x "
                     "(convert the mask with .to(x.dtype)).")
    exercises.expect(value.is_floating_point(), f"{name} has dtype {value.dtype}: return a float tensor like x.")
    exercises.expect(value.dtype == like.dtype, f"{name} has dtype {value.dtype}, but x is {like.dtype}: "
                     "return the gradient in x's dtype (.to(x.dtype)).")
    exercises.expect(tuple(value.shape) == tuple(like.shape),
                     f"{name} has shape {tuple(value.shape)}, but x has shape {tuple(like.shape)}: one gradient per x.")
    return value.detach()


def _autograd_ste(x: torch.Tensor, amax: float, unsigned: bool) -> torch.Tensor:
    """The reference: autograd through :func:`fusionlib.quant.fake_quantize` (its backward is the STE)."""
    leaf = x.detach().clone().requires_grad_(True)
    fake_quantize(leaf, amax, 8 if unsigned else 4, unsigned=unsigned, narrow_range=not unsigned).sum().backward()
    return leaf.grad


def _ste_message(name: str, mine: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, amax: float,
                 unsigned: bool) -> str:
    """What is wrong with a candidate STE gradient: where it differs, described by region, never the values."""
    wrong = mine != ref
    if not bool(wrong.any()):
        return ""
    head = f"{name} is off at {int(wrong.sum())} of {wrong.numel()} points"
    if not bool(((mine == 0) | (mine == 1)).all()):
        return f"{head}: an STE gradient is 0 or 1 at every x. {STE_HINT}"
    lower = 0.0 if unsigned else -amax
    edges = (x == amax) | (x == lower)
    if bool(wrong[~edges].logical_not().all()) and bool((mine[wrong] == 0).all()):
        where = "x = 0 and x = amax" if unsigned else "x = -amax and x = amax"
        return (f"{head}, all at the ends of the range ({where}), where your gradient is 0: the endpoints are "
                f"included, as fake_quantize's STE has it (torch.clamp's own gradient is 0 there). {STE_HINT}")
    if unsigned and bool(wrong[x >= 0].logical_not().all()) and bool((mine[x < 0] == 1).any()):
        return (f"{head}: with unsigned=True the grid is [0, amax], so every negative x is clipped to 0 "
                f"and gets gradient 0.")
    parts = []
    if bool((wrong & (ref == 0)).any()):
        parts.append("it passes the gradient where x is clipped")
    if bool((wrong & (ref == 1)).any()):
        parts.append("it blocks the gradient inside the range")
    return f"{head}: {' and '.join(parts)}. {STE_HINT}"


def exercise_1(ste_gradient: Callable[..., torch.Tensor]) -> str:
    """Exercise 10.1: ``ste_gradient(x, amax)`` (signed) and ``ste_gradient(x, amax, unsigned=True)``.

    The points include both ends of each range exactly, values just inside and
    outside them, and a float64 input (the result keeps x's dtype class: float).
    """
    amax = 2.0
    x = torch.tensor([-3.0, -2.0, -1.99, -0.4, 0.0, 0.7, 1.99, 2.0, 2.5])
    mine = _expect_float_tensor(ste_gradient(x.clone(), amax), x, "ste_gradient(x, 2.0)")
    message = _ste_message("ste_gradient(x, 2.0)", mine, _autograd_ste(x, amax, False), x, amax, False)
    exercises.expect(not message, message)

    x64 = x.to(torch.float64)
    mine64 = _expect_float_tensor(ste_gradient(x64.clone(), amax), x64, "ste_gradient(x, 2.0) for a float64 x")
    message = _ste_message("ste_gradient(x, 2.0) for a float64 x", mine64, _autograd_ste(x64, amax, False), x64,
                           amax, False)
    exercises.expect(not message, message)

    name = "ste_gradient(x, 2.0, unsigned=True)"
    mine_u = _expect_float_tensor(ste_gradient(x.clone(), amax, unsigned=True), x, name)
    message = _ste_message(name, mine_u, _autograd_ste(x, amax, True), x, amax, True)
    exercises.expect(not message, message)
    return "1 inside the range (signed [-amax, amax], unsigned [0, amax], ends included), 0 where clipped"


GENERIC_BIAS_HINT = ("Start from section 2's b' with the running statistics and check each term: beta, the conv's own "
                     "bias, the running mean, and s with eps under the root.")


def _check_bias_mistakes(conv: nn.Conv2d, bn: nn.BatchNorm2d, mine: torch.Tensor) -> str:
    """Name the mistake a wrong ``b'`` matches, from a few typical wrong formulas; '' when none matches."""
    g, beta, mu, var, eps = bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    b = conv.bias
    s = g / torch.sqrt(var + eps)
    candidates = {
        "s has no eps: s = gamma / sqrt(running_var + eps), with eps, under the root.":
            beta + (b - mu) * g / torch.sqrt(var),
        "s divides by the variance: the standard deviation is sqrt(running_var + eps).":
            beta + (b - mu) * g / (var + eps),
        "the conv's own bias b is missing: the BatchNorm normalizes conv(x) + b, so (b - mu_run) is scaled by s.":
            beta - mu * s,
        "the running mean is missing: BatchNorm subtracts mu_run before scaling.":
            beta + b * s,
        "(b - mu_run) is not scaled by s.":
            beta + b - mu,
        "beta is missing: BatchNorm adds beta after scaling.":
            (b - mu) * s,
    }
    for advice, wrong in candidates.items():
        if torch.allclose(mine, wrong.detach().to(mine.dtype), rtol=1e-5, atol=1e-7):
            return advice
    return ""


def exercise_2(deployed_bias: Callable[[nn.Conv2d, nn.BatchNorm2d], torch.Tensor], seed: int = 0) -> str:
    """Exercise 10.2: ``deployed_bias(conv, bn)`` equals :meth:`QATConvBn2d.folded_bias`, changing neither module.

    The BatchNorm has ``eps = 0.3`` and running variances of 0.2-3, so a
    forgotten eps or a variance in place of a standard deviation is visible.
    """
    name = "deployed_bias(conv, bn)"
    torch.manual_seed(seed + 2)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=0.3)
    with torch.no_grad():
        bn.running_var.uniform_(0.2, 3.0)
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
    before = exercises.snapshot(conv), exercises.snapshot(bn)
    reference = QATConvBn2d(copy.deepcopy(conv), copy.deepcopy(bn))
    with torch.no_grad():
        expected = reference.folded_bias()
        mine = deployed_bias(conv, bn)
    exercises.expect_unchanged(conv, before[0], name="conv")
    exercises.expect_unchanged(bn, before[1], name="bn")
    mine = _expect_float_tensor(mine, expected, name)
    err = float((mine.double() - expected.double()).abs().max() / expected.double().abs().max())
    if err > 1e-5:
        with torch.no_grad():
            advice = _check_bias_mistakes(conv, bn, mine)
        fail = f"{name} is off: max rel error {err:.3g} (tolerance 1e-05)."
        exercises.fail(f"{fail} {advice or GENERIC_BIAS_HINT}")
    return "b' = beta + (b - mu_run) * gamma / sqrt(running_var + eps), per output channel"


def _expect_number(value: Any, name: str) -> float:
    exercises.expect_type(value, (float, int), name=name)
    exercises.expect(not isinstance(value, bool), f"{name} is a bool: it is a number.")
    return float(value)


def exercise_3(correction: Any, factor_when_frozen: Any, sigma_b: float = 2.0, sigma_run: float = 1.6) -> str:
    """Exercise 10.3: the factor on ``conv(x, fq(W s))`` while training, and once the statistics are frozen."""
    mine = _expect_number(correction, "correction")
    wrong = direction(mine, sigma_run / sigma_b, name="correction", rtol=1e-9)
    if wrong:
        inverted = abs(mine - sigma_b / sigma_run) <= 1e-9 * sigma_b / sigma_run
        advice = ("that is the paper's c = sigma_B / sigma_run, the factor the output undoes, not the one it is "
                  "multiplied by." if inverted else
                  "it is the factor in front of conv(x, fq(W s)) in section 2's formula: the weight was folded with "
                  "sigma_run, while this step normalizes with sigma_B.")
        exercises.fail(f"correction is off: it {wrong[len('correction '):]}; {advice}")
    frozen = _expect_number(factor_when_frozen, "factor_when_frozen")
    wrong = direction(frozen, 1.0, name="factor_when_frozen", rtol=1e-9)
    if wrong:
        exercises.fail(f"factor_when_frozen is off: it {wrong[len('factor_when_frozen '):]}; frozen statistics normalize with "
                       "sigma_run itself, so sigma_B is replaced by sigma_run in the factor.")
    return "sigma_run / sigma_B while training, 1 once the statistics are frozen"
