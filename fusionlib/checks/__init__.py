"""The mechanics of each chapter's exercise checks, one module per chapter (``chNN.py``).

A check cell in a notebook is a line or two::

    from fusionlib.checks import ch07
    exercises.check("07.1", lambda: ch07.exercise_1(step, q_0_9, x_hat_minus_3),
                    todo="set step, q_0_9 and x_hat_minus_3 in the cell above")

``chNN.exercise_k(...)`` receives the student's answer (values, functions,
modules), tests it with the ``expect_*`` helpers of :mod:`fusionlib.exercises`
and returns a sentence saying what it verified. So a student reading the
check cell does not read the answer, and the rules of a good check live in one
place:

* a wrong answer's message names the quantity, says what is wrong and in which
  direction (too large, wrong sign, per-tensor instead of per-channel), never
  the expected value;
* a rule the prompt states ("without calling X") is enforced here, with
  :func:`calls_to` below;
* each typical wrong answer is a fixture in ``tests/exercise_answers/``
  (``tests/test_exercise_checks.py`` runs them).
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Iterable

from fusionlib import exercises
from fusionlib.exercises import direction  # one home: the exercise helper

__all__ = ["calls_to", "forbid_calls", "direction"]


def _name_of(fn: Callable) -> str:
    module = getattr(fn, "__module__", None) or ""
    return f"{module}.{fn.__qualname__}" if module else fn.__qualname__


def calls_to(watched: Iterable[Callable], fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """Run ``fn(*args, **kwargs)``; return its result and the names of the ``watched`` functions it called.

    Only Python functions can be watched (their code objects are matched, so
    an import under another name or an alias is still seen). A watched
    function called by another watched function is not reported: the list
    says what the answer called, not what the library does inside.
    """
    codes = {}
    for f in watched:
        f = inspect.unwrap(f)
        code = getattr(f, "__code__", None)
        if code is None:
            raise TypeError(f"calls_to watches Python functions; {f!r} has no code object")
        codes[code] = _name_of(f)
    called: list[str] = []

    def watch(frame, event, arg):
        if event == "call" and frame.f_code in codes and codes[frame.f_code] not in called:
            outer = frame.f_back
            while outer is not None and outer.f_code not in codes:
                outer = outer.f_back
            if outer is None:
                called.append(codes[frame.f_code])

    previous = sys.getprofile()
    sys.setprofile(watch)
    try:
        return fn(*args, **kwargs), called
    finally:
        sys.setprofile(previous)


def forbid_calls(watched: Iterable[Callable], rule: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` and fail the exercise if it called any of ``watched``.

    ``rule`` is the prompt's rule in words ("write the KL term by hand"); the
    message names the function that was called.
    """
    result, called = calls_to(watched, fn, *args, **kwargs)
    exercises.expect(not called, f"your answer calls {', '.join(called)}: {rule}")
    return result
