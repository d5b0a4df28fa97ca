"""Exercise checks of notebook 12 (R-Drop): dropout by hand, the symmetric KL term, alpha across reductions.

Each ``exercise_k`` receives the student's answer, raises
:class:`fusionlib.exercises.ExerciseError` with a message that says what is
wrong and in which direction (never the expected value), and returns what it
verified.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from fusionlib import exercises, rdrop
from fusionlib.checks import direction, forbid_calls

__all__ = ["exercise_1", "exercise_2", "exercise_3"]


def _off(actual: float, expected: float, *, name: str, rtol: float, hint: str = "") -> None:
    """Fail with ``"<name> is off (too large): <hint>"`` when ``actual`` is not within ``rtol`` of ``expected``."""
    word = direction(actual, expected, name=name, rtol=rtol)
    if word:
        how = word.removeprefix(f"{name} ").removeprefix("is ")
        exercises.fail(f"{name} is off ({how})." + (f" {hint}" if hint else ""))


def exercise_1(dropout_by_hand: Callable[..., Any]) -> str:
    """Exercise 12.1: ``dropout_by_hand(x, p, generator)`` is inverted dropout with a Bernoulli(1 - p) keep mask.

    Tested at p = 0.3 on 20,000 positive values: the kept fraction (within 3%
    of 1 - p), every kept value equal to ``x / (1 - p)``, the mean close to
    ``x``'s, the dtype and shape of ``x``, the same output for the same
    generator seed, and ``x`` itself at p = 0.
    """
    p = 0.3
    x = torch.linspace(0.5, 2.0, 20000)
    out = dropout_by_hand(x, p, torch.Generator().manual_seed(1))
    name = "dropout_by_hand(x, 0.3, generator)"
    exercises.expect_type(out, torch.Tensor, name=name)
    exercises.expect_equal(tuple(out.shape), tuple(x.shape), name="the output's shape")
    exercises.expect(out.dtype == x.dtype, f"{name} has dtype {out.dtype}, not the input's {x.dtype}: "
                                           "convert the keep mask to x.dtype before multiplying.")
    kept = out != 0
    _off(kept.float().mean().item(), 1 - p, name="the fraction of kept elements", rtol=0.03,
         hint="Keep each element with probability 1 - p (rand >= p), so that p is the drop rate.")
    ratio = (out[kept] / x[kept]).double()
    _off(ratio.mean().item(), 1 / (1 - p), name="the kept values", rtol=1e-5,
         hint="Inverted dropout scales the kept values by 1 / (1 - p), so E[output] = x.")
    exercises.expect(bool((ratio - ratio.mean()).abs().max() < 1e-5),
                     "the kept values are not all scaled by the same factor: every kept x becomes x / (1 - p).")
    again = dropout_by_hand(x, p, torch.Generator().manual_seed(1))
    exercises.expect(torch.equal(out, again), "two calls with generators seeded alike gave different masks: draw "
                                              "the mask with torch.rand(x.shape, generator=generator).")
    exercises.expect(torch.equal(dropout_by_hand(x, 0.0, torch.Generator().manual_seed(1)), x),
                     "at p = 0 dropout keeps every element unchanged, yours does not.")
    _off(out.mean().item(), x.mean().item(), name="the mean output", rtol=0.03)
    return "keeps about 1 - p of the elements at p = 0.3, scales them by 1 / (1 - p), keeps the mean, and is x at p = 0"


def exercise_2(symmetric_kl: Callable[..., Any], seed: int) -> str:
    """Exercise 12.2: ``symmetric_kl(p_logits, q_logits)`` = sum over rows of (KL(P||Q) + KL(Q||P)) / 2.

    Compared with :func:`fusionlib.rdrop.compute_kl_loss` on 6 rows of 10
    classes (``rtol`` 1e-5), which the answer must not call (nor anything else
    of ``fusionlib.rdrop``); recognises the one-directional KL and the KL
    divided by the number of rows (``reduction="batchmean"``).
    """
    generator = torch.Generator().manual_seed(seed + 2)
    p, q = torch.randn(6, 10, generator=generator) * 3, torch.randn(6, 10, generator=generator) * 3
    watched = [rdrop.compute_kl_loss, rdrop.rdrop_loss, rdrop.symmetric_kl_per_sample, rdrop.rdrop_forward]
    got = forbid_calls(watched, "the exercise asks for the KL term written without fusionlib.rdrop", symmetric_kl, p, q)
    name = "symmetric_kl(p, q)"
    exercises.expect_type(got, torch.Tensor, name=name)
    exercises.expect_equal(got.dim(), 0, name=f"{name}.dim()", hint="Sum over rows and classes to one number.")
    exercises.expect(got.is_floating_point(), f"{name} has dtype {got.dtype}: the KL is a floating-point number.")
    want = rdrop.compute_kl_loss(p, q).item()
    value = got.item()
    one_way = [F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="sum").item() for a, b in ((p, q), (q, p))]
    if any(abs(value - k) < 1e-4 * abs(k) or abs(value - 0.5 * k) < 1e-4 * abs(k) for k in one_way):
        exercises.fail(f"{name} is one-directional: it equals one KL direction alone; average both directions.")
    rows = p.shape[0]
    if abs(value * rows - want) < 1e-4 * abs(want) or any(abs(value * rows - k) < 1e-4 * abs(k) for k in one_way):
        exercises.fail(f"{name} is off (too small): it is divided by the number of rows, as "
                       "F.kl_div(..., reduction=\"batchmean\") does; the exercise asks for the sum over rows "
                       "(reduction=\"sum\").")
    _off(value, want, name=name, rtol=1e-5, hint="Both directions, halved, summed over rows: 0.5 * (KL(P||Q) + KL(Q||P)); "
                                                      "F.kl_div(input, target) takes input as log-probabilities.")
    swapped = symmetric_kl(q, p)
    exercises.expect(isinstance(swapped, torch.Tensor) and abs(swapped.item() - value) <= 1e-5 * abs(value),
                     "symmetric_kl(q, p) differs from symmetric_kl(p, q): the symmetric KL does not depend on the order.")
    return "matches compute_kl_loss (the paper's code) on 6 rows of 10 classes without calling it, and is symmetric"


def exercise_3(alpha_batchmean: Any, seed: int) -> str:
    """Exercise 12.3: the ``alpha`` with ``reduction="batchmean"`` that gives the loss of alpha = 0.5 with ``"sum"`` at batch 32.

    The check compares the two R-Drop losses of :func:`fusionlib.rdrop.rdrop_loss`
    on 32 random rows; the batchmean KL is the summed KL divided by the batch size.
    """
    exercises.expect(not isinstance(alpha_batchmean, (bool, torch.Tensor)),
                     f"alpha_batchmean should be a plain Python float, not a {type(alpha_batchmean).__name__}.")
    exercises.expect_type(alpha_batchmean, (int, float), name="alpha_batchmean")
    generator = torch.Generator().manual_seed(seed + 3)
    z1, z2 = torch.randn(32, 10, generator=generator), torch.randn(32, 10, generator=generator)
    y = torch.randint(0, 10, (32,), generator=generator)
    want = rdrop.rdrop_loss(z1, z2, y, 0.5, reduction="sum")[0].item()
    if alpha_batchmean < 0:
        exercises.fail("alpha_batchmean is negative: a negative weight would reward disagreement between the passes.")
    got = rdrop.rdrop_loss(z1, z2, y, float(alpha_batchmean), reduction="batchmean")[0].item()
    name = "the loss with batchmean and alpha_batchmean"
    if abs(alpha_batchmean - 0.5) < 1e-9:
        exercises.fail(f"{name} is off (too small): with the same alpha, batchmean divides the summed KL by the batch "
                       "size, so the KL term is weaker than in the recipe; alpha must make up for that division.")
    if abs(alpha_batchmean - 0.5 / 32) < 1e-9:
        exercises.fail("alpha_batchmean = 0.5 / 32 goes the wrong way: batchmean already divides the KL by the batch "
                       "size, so dividing alpha too makes the KL term weaker still.")
    _off(got, want, name=name, rtol=1e-6, hint="batchmean = sum / batch size: which alpha makes alpha * KL the same?")
    return "alpha_batchmean with batchmean gives the same loss as alpha = 0.5 with the summed KL at batch 32"
