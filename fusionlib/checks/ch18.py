"""Exercise checks of notebook 18 (the capstone: the int8 gate's agreement, what the ReLU6 swap changes).

* :func:`exercise_1`: ``agreement(a, b)``, the share of rows of two ``[N, classes]``
  logit tensors with the same argmax, without ``deploy.top1_agreement``.
* :func:`exercise_2`: ``clipped_share(model, x)``, the share of all ReLU6 input
  elements above 6 (every ReLU6, every call), without ``pipeline.relu6_clipped_share``.

Each wrong answer gets a message that says what is wrong and which way, never the expected value.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fusionlib import deploy, exercises, pipeline
from fusionlib.checks import forbid_calls

__all__ = ["exercise_1", "exercise_2"]


def _share_answer(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        exercises.expect(value.numel() == 1, f"{name} returned a tensor of shape {tuple(value.shape)}; it should "
                                             "return one number, the share over all rows.")
        value = value.item()
    exercises.expect(isinstance(value, (int, float)) and not isinstance(value, bool),
                     f"{name} should return a number (a float in [0, 1]), got {type(value).__name__}.")
    exercises.expect(0.0 <= float(value) <= 1.0, f"{name} returned {float(value):g}, outside [0, 1]: a share is a count "
                                                  "divided by how many there are.")
    return float(value)


# ---------------------------------------------------------------------- 18.1
def exercise_1(agreement: Callable, seed: int) -> str:
    """18.1: ``agreement(a, b)`` = mean over rows of ``argmax a == argmax b`` (10 classes, rows more than classes)."""
    g = torch.Generator().manual_seed(seed + 181)
    a = torch.randn(40, 10, generator=g)
    b = a + 0.3 * torch.randn(40, 10, generator=g)      # some rows change their argmax, most keep it
    b[:5] = -a[:5]                                       # a few certainly differ
    got = _share_answer(forbid_calls([deploy.top1_agreement], "write the comparison yourself", agreement,
                                     a.clone(), b.clone()), "agreement(a, b)")
    want = float((a.argmax(1) == b.argmax(1)).float().mean())
    if abs(got - want) < 1e-6:
        return "the share of rows with the same top-1 class, on 40 rows of 10 classes"
    by_column = float((a.argmax(0) == b.argmax(0)).float().mean())
    if abs(got - by_column) < 1e-6:
        exercises.fail("the argmax runs over the wrong dimension: each row is one image, and its class is the largest "
                       "entry of that row (dim=1).")
    exercises.fail(f"the share is too {'large' if got > want else 'small'}: compare each row's top-1 class in a with the "
                   "same row's top-1 class in b, then take the mean over rows.")
    return ""


# ---------------------------------------------------------------------- 18.2
class _TwoStage(nn.Module):
    """Convs with in-place ReLU6, one of them called twice, the stages of different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU6(inplace=True)
        self.conv2 = nn.Conv2d(8, 4, 3, stride=2, padding=1)
        self.act2 = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        y = self.act2(self.conv2(x))
        return self.act2(y * 4.0)          # the same ReLU6 again, on a larger signal


def exercise_2(clipped_share: Callable, seed: int) -> str:
    """18.2: ``clipped_share(model, x)``: every ReLU6 input element above 6 over all of them, in-place ReLU6 included."""
    torch.manual_seed(seed + 182)
    model = _TwoStage().eval()
    with torch.no_grad():
        model.conv1.weight.mul_(6.0)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(seed + 182))
    want, per_layer = pipeline.relu6_clipped_share(model, x)
    got = _share_answer(forbid_calls([pipeline.relu6_clipped_share], "count the inputs yourself", clipped_share,
                                     model, x.clone()), "clipped_share(model, x)")
    if abs(got - want) < 1e-9:
        return "the share over every ReLU6 input, with in-place ReLU6 and one ReLU6 called twice"
    exercises.expect(got > 0, "the share is 0: if you read the ReLU6 inputs with a forward hook, an in-place ReLU6 has "
                              "already clipped them; a forward pre-hook sees them first.")
    calls = pipeline.relu6_input_counts(model, x)
    mean_of_layers = sum(per_layer.values()) / len(per_layer)
    first_calls = [c for i, c in enumerate(calls) if c[0] not in [d[0] for d in calls[:i]]]
    first_only = sum(c[1] for c in first_calls) / sum(c[2] for c in first_calls)
    if abs(got - mean_of_layers) < 1e-9:
        exercises.fail("that is the mean of the per-module shares: the modules see different numbers of elements, so "
                       "add up the elements above 6 and all elements over every module, then divide once.")
    if abs(got - first_only) < 1e-9:
        exercises.fail("one ReLU6 here is called twice and your count keeps only one of its calls: count every call.")
    exercises.fail(f"the share is too {'large' if got > want else 'small'}: count every element that enters a ReLU6, "
                   "on every call (one module here is called twice), and the ones above 6 among them.")
    return ""

