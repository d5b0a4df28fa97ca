"""Exercise checks that say what is wrong, and never stop an unsolved notebook.

An exercise in a notebook is three cells (see docs/design.md, "Exercises"):

1. a **solution** cell (tag ``solution``) with the worked answer. The student
   edition replaces it by the *stub* stored in the cell's metadata
   (``metadata.fusionlib.stub``): the same names, doing nothing yet::

       def fold_conv1d_bn1d(conv, bn):
           raise NotImplementedError("Exercise 02.1: fold bn into a copy of conv")
       w_folded = exercises.TODO

2. a **check** cell (tag ``check``) that calls :func:`check` (or the
   :func:`checker` decorator) with a function of no arguments that tests the
   answer with the ``expect_*`` helpers below and returns what it verified::

       @exercises.checker("02.1", todo="write fold_conv1d_bn1d(conv, bn) above")
       def _():
           folded = fold_conv1d_bn1d(conv1d, bn1d)
           exercises.expect_unchanged(conv1d, conv_before, name="conv")
           exercises.expect_state_close(folded, reference, rtol=1e-6, name="folded conv")
           return "weight and bias match the reference fold with eps=0.5"

3. optionally a markdown **answer** cell (tag ``answer``) for "explain why".

What a check prints or raises:

==========================  ==================================================
the answer...               the check cell
==========================  ==================================================
is still the stub           prints ``Exercise 02.1: not attempted yet — <todo>``
                            (a stub raised ``NotImplementedError("Exercise
                            ...")``, a value is still :data:`TODO`, or a name
                            the check cell reads is undefined). Never an error,
                            so Run All reaches the end of a student notebook.
is right                    prints ``Exercise 02.1: correct — <what the check
                            function returned>``
is wrong                    raises :class:`ExerciseError` with the message of
                            the failed expectation (which tensor, how far off)
==========================  ==================================================

Wrong answers raise by default, so a broken solution fails the full edition
under nbval. With ``FUSIONLIB_EXERCISES=warn`` in the environment (or
``exercises.set_mode("warn")``) they print ``Exercise 02.1: not right yet —
...`` instead, and Run All goes on.

A plain ``assert cond, "message"`` inside a check function also works: its
message becomes the ExerciseError's. Any other exception raised by the
student's code becomes an ExerciseError that names it; ``hints`` maps an
exception type (or a callable ``exc -> str | None``) to advice, for mistakes a
chapter knows well (fx's forgotten ``gm.recompile()``).
"""
from __future__ import annotations

import math
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fusionlib.verify import tensor_errors

__all__ = [
    "TODO",
    "ExerciseError",
    "NotAttempted",
    "Result",
    "check",
    "checker",
    "expect",
    "expect_close",
    "expect_equal",
    "expect_state_close",
    "expect_type",
    "expect_unchanged",
    "direction",
    "fail",
    "is_todo",
    "require_attempted",
    "mode",
    "set_mode",
    "shape_problem",
    "snapshot",
]

MODE_VARIABLE = "FUSIONLIB_EXERCISES"
MODES = ("raise", "warn")
_mode_override: str | None = None


class NotAttempted(NotImplementedError):
    """The exercise has not been attempted: a stub was called, or a value is still :data:`TODO`."""


class ExerciseError(AssertionError):
    """A wrong answer. ``str(err)`` says what is wrong; Jupyter shows only that, not the helper's frames."""

    def _render_traceback_(self) -> list[str]:  # IPython: the lines shown instead of a traceback
        lines = [f"ExerciseError: {self}"]
        cause = self.__cause__
        if cause is not None and not isinstance(cause, AssertionError):
            lines += ["", "Where your code raised it:"]
            lines += "".join(traceback.format_exception(type(cause), cause, cause.__traceback__)).splitlines()
        return lines


class _Todo:
    """The placeholder value of a value exercise (``n_test = exercises.TODO``).

    Any use of it as a value (comparison, arithmetic, ``len``, ``bool``,
    indexing, calling, a tensor made from it) raises :class:`NotAttempted`, so
    a check cell reading it reports "not attempted yet" instead of a confusing
    ``TypeError``.
    """

    _instance: "_Todo | None" = None

    def __new__(cls) -> "_Todo":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "TODO"

    def __reduce__(self) -> str:
        return "TODO"

    def __hash__(self) -> int:
        return id(self)

    def _not_attempted(self, *args: Any, **kwargs: Any) -> Any:
        raise NotAttempted("a value is still exercises.TODO: replace it with your answer")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _not_attempted
    __bool__ = __len__ = __iter__ = __contains__ = __getitem__ = __call__ = _not_attempted
    __int__ = __float__ = __index__ = __complex__ = __round__ = __abs__ = __neg__ = __pos__ = _not_attempted
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _not_attempted
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _not_attempted
    __pow__ = __rpow__ = __matmul__ = __rmatmul__ = _not_attempted

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # IPython, pickle and copy probe for _repr_html_, __array__, ...
            raise AttributeError(name)
        return self._not_attempted()


#: Placeholder for value exercises in stubs: ``n_test = exercises.TODO``.
TODO = _Todo()


def is_todo(value: Any) -> bool:
    """True when ``value`` is the :data:`TODO` placeholder."""
    return value is TODO


def mode() -> str:
    """``"raise"`` (default) or ``"warn"``: what a check does with a wrong answer.

    :func:`set_mode` wins over the ``FUSIONLIB_EXERCISES`` environment variable.
    """
    chosen = _mode_override or os.environ.get(MODE_VARIABLE, "").strip().lower() or "raise"
    if chosen not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={chosen!r}: use one of {', '.join(MODES)}")
    return chosen


def set_mode(new_mode: str | None) -> None:
    """Set the mode for this process (``"raise"`` / ``"warn"``); ``None`` returns to the environment's."""
    global _mode_override
    if new_mode is not None and new_mode not in MODES:
        raise ValueError(f"mode {new_mode!r}: use one of {', '.join(MODES)}")
    _mode_override = new_mode


@dataclass(frozen=True)
class Result:
    """What a check found: ``status`` is ``"correct"``, ``"not attempted yet"`` or ``"not right yet"``."""

    exercise: str
    status: str
    message: str

    def __str__(self) -> str:
        return f"Exercise {self.exercise}: {self.status} — {self.message}"

    def __bool__(self) -> bool:
        return self.status == "correct"

    def _ipython_display_(self) -> None:
        """Shown already by :func:`check`; a check as a cell's last line adds nothing."""


# --- expectations: raise ExerciseError with a specific message ----------------------------------


def fail(message: str) -> None:
    """Reject the answer with ``message`` (say what is wrong and what would be right)."""
    raise ExerciseError(message)


def expect(condition: Any, message: str) -> None:
    """Reject the answer with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ExerciseError(message)


def require_attempted(value: Any, name: str) -> None:
    """A value still :data:`TODO` is "not attempted yet" (:class:`NotAttempted`), never a wrong answer."""
    if value is TODO:
        raise NotAttempted(f"{name} is still exercises.TODO")


def _equal(actual: Any, expected: Any) -> bool:
    """``actual == expected``, except that a bool equals only a bool (Python's ``True == 1`` is a trap here)."""
    if isinstance(actual, torch.Tensor) or isinstance(expected, torch.Tensor):
        return torch.equal(torch.as_tensor(actual), torch.as_tensor(expected))
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(actual, (list, tuple)) and type(actual) is type(expected):
        return len(actual) == len(expected) and all(map(_equal, actual, expected))
    return actual == expected


def direction(actual: float, expected: float, *, name: str, rtol: float = 1e-6) -> str:
    """What is wrong with a number, and which way, without the expected value.

    ``"step is too large"``, ``"step is too small"``, ``"step has the wrong sign"``,
    ``"step should be zero"``; an empty string when ``actual`` is within ``rtol``
    of ``expected``.
    """
    if abs(actual - expected) <= rtol * max(abs(expected), 1e-30):
        return ""
    if expected != 0 and actual != 0 and (actual > 0) != (expected > 0):
        return f"{name} has the wrong sign"
    if expected == 0:
        return f"{name} should be zero"
    return f"{name} is {'too large' if abs(actual) > abs(expected) else 'too small'}"


def shape_problem(actual: tuple[int, ...], expected: tuple[int, ...], *, name: str) -> str:
    """What is wrong with a shape, without the expected shape: the number of dims, or the first wrong dim."""
    actual, expected = tuple(actual), tuple(expected)
    if len(actual) != len(expected):
        fewer = "too few" if len(actual) < len(expected) else "too many"
        return f"{name} has shape {actual}: {fewer} dimensions ({len(actual)})"
    dim = next(i for i, (a, e) in enumerate(zip(actual, expected)) if a != e)
    size = "too small" if actual[dim] < expected[dim] else "too large"
    return f"{name} has shape {actual}: dimension {dim} ({actual[dim]}) is {size}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def expect_equal(actual: Any, expected: Any, *, name: str, hint: str = "") -> None:
    """``actual == expected`` (a bool only equals a bool); else a message that never states ``expected``.

    Numbers get a direction (``"n_test is 359: that is too small"``); sequences the
    positions that differ, or too few / too many items; other values only that
    they are not right. The ``hint`` says why.
    """
    require_attempted(actual, name)
    if _equal(actual, expected):
        return
    if _is_number(actual) and _is_number(expected):
        message = f"{name} is {actual!r}: that {direction(actual, expected, name='', rtol=0.0).strip()}."
    elif isinstance(actual, bool) != isinstance(expected, bool):
        message = f"{name} is {actual!r}, of type {type(actual).__name__}; the answer is of type {type(expected).__name__}."
    elif isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        if len(actual) != len(expected):
            count = "too few" if len(actual) < len(expected) else "too many"
            message = f"{name} is {actual!r}: {count} items ({len(actual)})."
        else:
            wrong = [i for i, (a, e) in enumerate(zip(actual, expected)) if not _equal(a, e)]
            message = f"{name} is {actual!r}: wrong at position{'s' if len(wrong) > 1 else ''} {wrong}."
    else:
        message = f"{name} is {actual!r}, which is not right."
    fail(message + (f" {hint}" if hint else ""))


def expect_type(obj: Any, expected: type | tuple[type, ...], *, name: str) -> None:
    """``isinstance(obj, expected)``, or a message naming both types."""
    require_attempted(obj, name)
    if not isinstance(obj, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        fail(f"{name} is of type {type(obj).__name__}, expected {names}.")


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    require_attempted(value, name)
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ExerciseError(f"{name} should be a tensor or a list of numbers, got {type(value).__name__}") from exc


def tensor_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, tuple[int, ...]]:
    """``(max_abs, max_rel, index of the worst element)`` of an answer against the expected tensor:
    :func:`fusionlib.verify.tensor_errors` with the expected tensor as the reference
    (``max_rel = max|a - e| / max|e|``)."""
    return tensor_errors(expected, actual)


def expect_close(actual: Any, expected: Any, *, name: str, rtol: float = 1e-5, hint: str = "") -> None:
    """Same shape, and ``max|a - e| / max|e| <= rtol``; the message never states the expected values.

    Example messages: ``w_folded is off: max rel error 0.0042 at [1]
    (tolerance 1e-05); there yours is too large. Did you forget eps?``, and for
    a single number only its direction: ``b_folded is too small.``
    """
    a, e = _as_tensor(actual, name), _as_tensor(expected, f"reference for {name}")
    if a.shape != e.shape:
        fail(f"{shape_problem(tuple(a.shape), tuple(e.shape), name=name)}." + (f" {hint}" if hint else ""))
    max_abs, max_rel, index = tensor_error(a, e)
    if math.isnan(max_rel) or max_rel > rtol:
        if math.isnan(max_rel):
            problem = f"{name} is off: it holds nan"
        elif a.numel() == 1:          # one number: only which way (its error would give the answer away)
            problem = direction(float(a.reshape(())), float(e.reshape(())), name=name, rtol=rtol)
        else:
            where = f" at {list(index)}" if index else ""
            way = direction(float(a[index]), float(e[index]), name="yours", rtol=0.0)
            problem = f"{name} is off: max rel error {max_rel:.3g}{where} (tolerance {rtol:.0e}); there {way}"
        fail(problem + "." + (f" {hint}" if hint else ""))


def _state(module_or_dict: Any) -> dict[str, torch.Tensor]:
    if isinstance(module_or_dict, nn.Module):
        return {k: v.detach() for k, v in module_or_dict.state_dict().items()}
    if isinstance(module_or_dict, Mapping):
        return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in module_or_dict.items()}
    raise TypeError(f"expected an nn.Module or a dict of tensors, got {type(module_or_dict).__name__}")


def expect_state_close(actual: Any, expected: Any, *, name: str, rtol: float = 1e-5, hint: str = "") -> None:
    """Compare two modules (or dicts of tensors) tensor by tensor: ``weight`` and ``bias`` separately.

    Every mismatching entry is named, with its error, and the matching ones are
    listed, so "weight matches, bias is off by 0.25" is what a student reads.
    A tensor that is ``None`` on one side only (a missing bias) is named too.
    """
    require_attempted(actual, name)
    mine, ref = _state(actual), _state(expected)
    missing = [k for k in ref if k not in mine or (mine[k] is None) != (ref[k] is None)]
    extra = [k for k in mine if k not in ref]
    problems, fine = [], []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    for key, expected_tensor in ref.items():
        if key in missing or expected_tensor is None:
            continue
        a, e = mine[key], expected_tensor
        if a.shape != e.shape:
            problems.append(shape_problem(tuple(a.shape), tuple(e.shape), name=key))
            continue
        if not (a.is_floating_point() or e.is_floating_point()):
            (fine if torch.equal(a, e) else problems).append(key if torch.equal(a, e) else f"{key} differs")
            continue
        max_abs, max_rel, index = tensor_error(a, e)
        if math.isnan(max_rel) or max_rel > rtol:
            problems.append(f"{key} is off by max abs {max_abs:.3g} at {list(index)}, max rel {max_rel:.3g}")
        else:
            fine.append(key)
    if problems:
        ok = f" ({', '.join(fine)} {'matches' if len(fine) == 1 else 'match'})" if fine else ""
        fail(f"{name}: {'; '.join(problems)}{ok}; tolerance {rtol:.0e}." + (f" {hint}" if hint else ""))


def snapshot(module: nn.Module) -> dict[str, Any]:
    """A copy of a module's type, parameters and buffers, for :func:`expect_unchanged`."""
    return {
        "type": type(module),
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "modules": [(n, type(m)) for n, m in module.named_modules()],
    }


def expect_unchanged(module: nn.Module, before: Mapping[str, Any], *, name: str) -> None:
    """The module still equals its :func:`snapshot`; else name what changed (the "modified the original" bug)."""
    if type(module) is not before["type"]:
        fail(f"{name} was replaced: it is a {type(module).__name__}, was a {before['type'].__name__}. "
             "Work on a copy (copy.deepcopy) and leave the original alone.")
    now = [(n, type(m)) for n, m in module.named_modules()]
    if now != before["modules"]:
        fail(f"{name}'s submodules were changed. Work on a copy (copy.deepcopy) and leave the original alone.")
    state = module.state_dict()
    changed = [k for k, v in before["state"].items() if k not in state or not torch.equal(state[k].detach(), v)]
    if changed:
        fail(f"{name} was modified ({', '.join(changed)} changed). Work on a copy (copy.deepcopy) "
             "and leave the original alone.")


# --- running a check ------------------------------------------------------------------------------


def _is_stub_error(exc: BaseException) -> bool:
    """NotImplementedError from a stub: ours, bare, or with a message starting 'Exercise'.

    Other NotImplementedErrors (torch's "Could not run ... with arguments from
    the QuantizedCPU backend") come from a wrong answer and are reported as one.
    """
    if isinstance(exc, NotAttempted):
        return True
    if type(exc) is NotImplementedError:
        return not exc.args or str(exc.args[0]).lstrip().lower().startswith("exercise")
    return False


def _strip_exercise_prefix(text: str) -> str:
    """``"Exercise 02.1: fold bn"`` -> ``"fold bn"``."""
    head, sep, rest = text.partition(":")
    return rest.strip() if sep and head.strip().lower().startswith("exercise") else text.strip()


def _raised_in(exc: BaseException, code: Any) -> bool:
    """True when ``exc`` was raised directly in the frame running ``code`` (not deeper)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code is code


def _hint_for(exc: BaseException, hints: Any) -> str:
    if hints is None:
        return ""
    if callable(hints) and not isinstance(hints, Mapping):
        return hints(exc) or ""
    for kind, advice in hints.items():
        if isinstance(exc, kind):
            text = advice(exc) if callable(advice) else advice
            if text:
                return text
    return ""


def _assertion_message(exc: AssertionError) -> str:
    if str(exc):
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    line = frames[-1].line if frames else ""
    return f"this check failed: {line}" if line else "an assertion failed"


def check(
    exercise: str,
    checker_fn: Callable[[], Any],
    *,
    todo: str = "",
    hints: Mapping[type, Any] | Callable[[BaseException], str | None] | None = None,
) -> Result:
    """Run ``checker_fn()`` and report on exercise ``exercise`` (e.g. ``"02.1"``); see the module docstring.

    ``todo`` says what to do, for the not-attempted message. ``checker_fn``
    returns what it verified (a string) or ``None``. Prints the result and
    returns a :class:`Result`; a wrong answer raises :class:`ExerciseError`
    unless the mode is ``"warn"``.
    """
    if not callable(checker_fn):
        raise TypeError(f"check({exercise!r}, ...) takes a function of no arguments (a lambda or a def), "
                        f"got {type(checker_fn).__name__}")
    label = f"Exercise {exercise}"
    code = getattr(checker_fn, "__code__", None)
    try:
        verified = checker_fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        if _is_stub_error(exc) or (isinstance(exc, NameError) and _raised_in(exc, code)):
            detail = _strip_exercise_prefix(str(exc))
            if not todo:  # the stub's own words, else a generic instruction
                message = detail or "replace the stub above with your answer"
            elif isinstance(exc, NameError) or (detail and "TODO" in detail):
                message = f"{todo} ({detail})"  # which name is missing or still TODO
            else:
                message = todo
            result = Result(exercise, "not attempted yet", message)
            print(result)
            return result
        if isinstance(exc, AssertionError):
            message = _assertion_message(exc)
            cause = exc.__cause__ if isinstance(exc, ExerciseError) else None
        else:
            where = f"{type(exc).__name__}: {exc}"
            message = f"your code raised {where}"
            cause = exc
        advice = _hint_for(cause if cause is not None else exc, hints)
        if advice:
            message = message.rstrip()
            message += ("" if message.endswith((".", "!", "?")) else ".") + f" Hint: {advice}"
        result = Result(exercise, "not right yet", message)
        if mode() == "warn":
            print(result)
            return result
        error = ExerciseError(f"{label}: {message}")
        if cause is not None:
            raise error from cause
        raise error from None
    text = verified if isinstance(verified, str) and verified else "all checks passed"
    result = Result(exercise, "correct", text)
    print(result)
    return result


def checker(
    exercise: str,
    *,
    todo: str = "",
    hints: Mapping[type, Any] | Callable[[BaseException], str | None] | None = None,
) -> Callable[[Callable[[], Any]], Result]:
    """Decorator form of :func:`check`: runs the decorated function at once.

    ::

        @exercises.checker("00.1", todo="set n_test to the number of test images")
        def _():
            exercises.expect_equal(n_test, len(x_test_reference), name="n_test")
            return f"n_test = {n_test}"
    """

    def run(fn: Callable[[], Any]) -> Result:
        return check(exercise, fn, todo=todo, hints=hints)

    return run


def stub_error(exercise: str, what: str) -> NotAttempted:
    """The exception a stub raises: ``raise exercises.stub_error("02.1", "fold bn into conv")``.

    Plain ``raise NotImplementedError("Exercise 02.1: ...")`` works the same.
    """
    return NotAttempted(f"Exercise {exercise}: {what}")


if __name__ == "__main__":  # pragma: no cover
    print(__doc__, file=sys.stderr)
