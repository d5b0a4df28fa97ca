"""Checks of notebook 17's exercises (weight equalization: ReLU6's clip thresholds, the bias high-bias absorption moves).

Each ``exercise_k`` takes the student's answer as arguments, raises
:class:`fusionlib.exercises.ExerciseError` with a message that says what is
wrong and in which direction (never the expected value), and returns what it
verified.
"""
from __future__ import annotations

from typing import Callable

import torch

from fusionlib import exercises

__all__ = ["exercise_1", "exercise_2"]


def _tensor_answer(value, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    exercises.expect(isinstance(value, torch.Tensor),
                     f"{name} should return a tensor (one value per channel), got {type(value).__name__}.")
    exercises.expect(value.is_floating_point(), f"{name} returned a {value.dtype} tensor; it should be floating point.")
    exercises.expect(tuple(value.shape) == shape,
                     f"{name} returned shape {tuple(value.shape)}; it should have one value per channel, shape {shape}.")
    return value.detach()


def exercise_1(clip_thresholds: Callable, seed: int) -> str:
    """17.1: ``clip_thresholds(s)``: per-channel thresholds t with ``min(max(0, z/s), t)·s = ReLU6(z)``.

    CLE divides the first layer's channel i by ``s_i``, so its pre-activation is ``z_i / s_i``.
    Tested on scales above and below 1, by value and by the exactness of the rewritten pair.
    """
    g = torch.Generator().manual_seed(seed + 17)
    s = torch.cat([torch.tensor([0.25, 1.0, 4.0]), torch.rand(5, generator=g) * 3 + 0.1])
    t = _tensor_answer(clip_thresholds(s.clone()), "clip_thresholds(s)", tuple(s.shape))
    z = torch.randn(1000, s.numel(), generator=g) * 8
    exact = (torch.minimum((z / s).clamp_min(0), t) * s - torch.clamp(z, 0, 6)).abs().max()
    if float(exact) <= 1e-5 * 6:
        return "the rewritten pair min(max(0, z/s), t)·s equals ReLU6(z) on every channel, for s above and below 1"
    big, small = s > 1, s < 1
    too_high_big = bool((t[big] > 6 / s[big] * (1 + 1e-6)).any())
    too_high_small = bool((t[small] > 6 / s[small] * (1 + 1e-6)).any())
    if bool(torch.allclose(t, torch.full_like(t, 6.0))):
        exercises.fail("every threshold is 6: after equalization channel i carries z_i / s_i, so its clip moves with "
                       "s_i (a channel scaled down must clip lower).")
    if too_high_big and not too_high_small:
        exercises.fail("the thresholds are too large where s > 1 and too small where s < 1: the first layer's outputs "
                       "are divided by s, not multiplied, so the threshold goes the same way as the outputs.")
    exercises.fail("the rewritten pair does not equal ReLU6(z): the threshold of channel i must be where z_i / s_i "
                   "is when z_i reaches 6.")
    return ""


def exercise_2(absorbed_bias: Callable, seed: int) -> str:
    """17.2: ``absorbed_bias(beta, gamma, n_sigma)``: ``c = max(0, β − n_sigma·|γ|)`` per channel."""
    g = torch.Generator().manual_seed(seed + 27)
    beta = torch.cat([torch.tensor([5.0, 5.0, -1.0, 0.5]), torch.randn(6, generator=g) * 3])
    gamma = torch.cat([torch.tensor([1.0, -1.0, 0.5, 2.0]), torch.randn(6, generator=g)])
    c = _tensor_answer(absorbed_bias(beta.clone(), gamma.clone(), 3.0), "absorbed_bias(beta, gamma, 3)",
                       tuple(beta.shape))
    want = (beta - 3.0 * gamma.abs()).clamp_min(0)
    if bool(torch.allclose(c, want, rtol=1e-6, atol=1e-6)):
        return "matches c = max(0, β − n·|γ|) on channels with negative γ, negative β and small β"
    exercises.expect(bool((c >= 0).all()), "some amounts are negative: a ReLU can only pass a constant on that its "
                                           "input never goes below, and a negative one would have to be clipped first "
                                           "(clamp at 0).")
    if bool(torch.allclose(c[gamma >= 0], want[gamma >= 0], rtol=1e-6, atol=1e-6)):
        exercises.fail("wrong where γ < 0: the pre-activation's spread is |γ|, a standard deviation, whatever γ's sign "
                       "(γ < 0 makes the amount too large).")
    exercises.fail("the amounts do not match: c is how far the mean β sits above n_sigma standard deviations of the "
                   "pre-activation (clamped at 0); check which terms scale with n_sigma.")
    return ""
