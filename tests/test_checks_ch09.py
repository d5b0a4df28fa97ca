"""fusionlib.checks.ch09: correct alternatives the wrong-answer fixtures cannot hold."""
from __future__ import annotations

import pytest

from fusionlib.checks import ch09
from fusionlib.exercises import ExerciseError


@pytest.mark.parametrize("clipped_error", [7.0, -7.0, 7])
def test_exercise_3_accepts_the_clipping_error_with_either_sign(clipped_error):
    assert "matches fake_quantize(14, amax=7)" in ch09.exercise_3(2, 1.0, clipped_error)


def test_exercise_3_messages_give_a_direction_never_the_value():
    with pytest.raises(ExerciseError) as caught:
        ch09.exercise_3(14 / 15, 7 / 15, 7.0)
    assert "step is too small" in str(caught.value)
    assert "0.93" not in str(caught.value) and " 2." not in str(caught.value)


def test_exercise_2_refuses_the_library_shortcut():
    from fusionlib import quant

    with pytest.raises(ExerciseError, match=r"keep_float: disable the quantizers yourself"):
        ch09.exercise_2(quant.keep_float, seed=0)
