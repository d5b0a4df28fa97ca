"""fusionlib.checks: the shared mechanics of the chapters' exercise checks."""
from __future__ import annotations

import pytest

from fusionlib import fusion
from fusionlib.checks import calls_to, direction, forbid_calls
from fusionlib.exercises import ExerciseError


def _uses_library(conv, bn):
    return fusion.fuse_conv_bn_eval(conv, bn)


def _by_hand(x):
    return x * 2


def test_calls_to_sees_the_outermost_watched_call_only():
    import torch
    from torch import nn
    conv, bn = nn.Conv2d(2, 3, 1).eval(), nn.BatchNorm2d(3).eval()
    _, called = calls_to([fusion.fuse_conv_bn_eval, fusion.fuse_conv_bn_weights], _uses_library, conv, bn)
    assert called == ["fusionlib.folding.fuse_conv_bn_eval"]
    result, called = calls_to([fusion.fuse_conv_bn_eval], _by_hand, torch.ones(1))
    assert called == [] and float(result) == 2.0


def test_calls_to_refuses_what_it_cannot_watch():
    with pytest.raises(TypeError, match="has no code object"):
        calls_to([len], _by_hand, 1)


def test_forbid_calls_names_the_call_and_the_rule():
    from torch import nn
    with pytest.raises(ExerciseError, match=r"fuse_conv_bn_eval: fold by hand"):
        forbid_calls([fusion.fuse_conv_bn_eval], "fold by hand", _uses_library, nn.Conv2d(2, 3, 1).eval(),
                     nn.BatchNorm2d(3).eval())
    assert forbid_calls([fusion.fuse_conv_bn_eval], "fold by hand", _by_hand, 3) == 6


@pytest.mark.parametrize("actual, expected, message", [
    (1.0, 1.0, ""), (1.0 + 1e-9, 1.0, ""), (2.0, 1.0, "x is too large"), (0.5, 1.0, "x is too small"),
    (-1.0, 1.0, "x has the wrong sign"), (0.3, 0.0, "x should be zero"), (-3.0, -1.0, "x is too large"),
])
def test_direction_never_states_the_expected_value(actual, expected, message):
    assert direction(actual, expected, name="x") == message
