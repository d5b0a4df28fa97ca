"""The exercise helper: not attempted is a message, right is a message, wrong is a specific error."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from fusionlib import exercises
from fusionlib.exercises import TODO, ExerciseError, NotAttempted


@pytest.fixture(autouse=True)
def default_mode(monkeypatch):
    monkeypatch.delenv(exercises.MODE_VARIABLE, raising=False)
    exercises.set_mode(None)
    yield
    exercises.set_mode(None)


def _raise(exc):
    raise exc


def _stub(conv, bn):
    raise NotImplementedError("Exercise 02.1: fold bn into a copy of conv")


# --- not attempted: never an error ----------------------------------------------------------------


@pytest.mark.parametrize(
    "checker_fn, detail",
    [
        (lambda: _stub(None, None), ""),  # a stub function raising NotImplementedError("Exercise ...")
        (lambda: exercises.expect_equal(TODO, 360, name="n_test"), "n_test is still exercises.TODO"),
        (lambda: TODO == 360, "exercises.TODO"),  # a bare comparison with the placeholder
        (lambda: torch.tensor([1.0]) * 2 + len(TODO), "exercises.TODO"),
        (lambda: undefined_name_for_the_test, "undefined_name_for_the_test"),  # noqa: F821
        (lambda: _raise(exercises.stub_error("02.1", "fold")), ""),
        (lambda: _raise(NotImplementedError()), ""),  # a bare NotImplementedError, as students write stubs
    ],
)
def test_not_attempted_is_a_message_not_an_error(checker_fn, detail, capsys):
    result = exercises.check("02.1", checker_fn, todo="write fold_conv1d_bn1d(conv, bn) above")
    out = capsys.readouterr().out
    assert result.status == "not attempted yet" and not result
    assert out.startswith("Exercise 02.1: not attempted yet — write fold_conv1d_bn1d(conv, bn) above")
    assert detail in out


def test_without_todo_the_stub_speaks(capsys):
    exercises.check("02.1", lambda: _stub(None, None))
    assert capsys.readouterr().out == "Exercise 02.1: not attempted yet — fold bn into a copy of conv\n"
    exercises.check("02.1", lambda: _raise(NotImplementedError()))
    assert capsys.readouterr().out == "Exercise 02.1: not attempted yet — replace the stub above with your answer\n"


def test_correct_answer_prints_what_was_verified(capsys):
    result = exercises.check("00.1", lambda: "n_test = 360")
    assert result and result.status == "correct"
    assert capsys.readouterr().out == "Exercise 00.1: correct — n_test = 360\n"
    assert exercises.check("00.2", lambda: None).message == "all checks passed"


def test_checker_decorator_runs_at_once(capsys):
    @exercises.checker("04.1", todo="write count_call_modules")
    def result():
        exercises.expect_equal(17, 17, name="relu calls")
        return "17 ReLU calls"

    assert isinstance(result, exercises.Result) and result.status == "correct"
    assert "Exercise 04.1: correct — 17 ReLU calls" in capsys.readouterr().out


# --- wrong answers: raise by default, print in warn mode --------------------------------------------


def test_wrong_answer_raises_with_the_specific_message():
    with pytest.raises(ExerciseError, match=r"^Exercise 04\.2: n_relu6 is 9: that is too small\. count call sites"):
        exercises.check("04.2", lambda: exercises.expect_equal(9, 17, name="n_relu6", hint="count call sites"))


def test_plain_asserts_and_other_exceptions_become_messages():
    import linecache

    source = "def bare_assert():\n    assert 1 + 1 == 3\n"  # compiled here, not by pytest: a bare assert
    linecache.cache["<cell-1>"] = (len(source), None, source.splitlines(True), "<cell-1>")  # as IPython does
    namespace = {}
    exec(compile(source, "<cell-1>", "exec"), namespace)
    bare_assert = namespace["bare_assert"]

    with pytest.raises(ExerciseError, match=r"Exercise 01\.1: this check failed: assert 1 \+ 1 == 3"):
        exercises.check("01.1", bare_assert)
    with pytest.raises(ExerciseError, match="Exercise 01.1: output size"):
        exercises.check("01.1", lambda: exercises.expect(False, "output size"))

    def student_code():
        return {}["relu"]

    with pytest.raises(ExerciseError, match=r"your code raised KeyError: 'relu'") as info:
        exercises.check("04.1", lambda: student_code())
    assert isinstance(info.value.__cause__, KeyError)


def test_a_name_error_inside_the_students_code_is_a_wrong_answer_not_a_missing_answer():
    def student_function():
        return undefined_inside_student_code  # noqa: F821

    with pytest.raises(ExerciseError, match="your code raised NameError: name 'undefined_inside_student_code'"):
        exercises.check("02.1", lambda: student_function())


def test_a_torch_not_implemented_error_is_a_wrong_answer():
    def student_function():
        raise NotImplementedError("Could not run 'aten::add' with arguments from the 'QuantizedCPU' backend")

    with pytest.raises(ExerciseError, match="your code raised NotImplementedError: Could not run"):
        exercises.check("06.1", student_function)


def test_hints_name_a_known_mistake():
    def forgot_recompile():
        raise AttributeError("'GraphModule' object has no attribute 'relu'")

    hints = {AttributeError: lambda e: "did you call gm.recompile()?" if "GraphModule" in str(e) else None}
    with pytest.raises(ExerciseError, match=r"has no attribute 'relu'.* Hint: did you call gm\.recompile\(\)\?"):
        exercises.check("04.2", forgot_recompile, hints=hints)
    with pytest.raises(ExerciseError, match="Hint: read the prompt"):
        exercises.check("04.2", lambda: exercises.fail("wrong"), hints=lambda e: "read the prompt")


@pytest.mark.parametrize("how", ["environment", "set_mode"])
def test_warn_mode_prints_wrong_answers_so_run_all_goes_on(how, monkeypatch, capsys):
    if how == "environment":
        monkeypatch.setenv(exercises.MODE_VARIABLE, "warn")
    else:
        exercises.set_mode("warn")
    assert exercises.mode() == "warn"
    result = exercises.check("02.3", lambda: exercises.expect_equal(2.5, 3.0, name="b_folded"))
    assert result.status == "not right yet"
    assert capsys.readouterr().out == "Exercise 02.3: not right yet — b_folded is 2.5: that is too small.\n"


def test_check_takes_a_function():
    with pytest.raises(TypeError, match="takes a function of no arguments .* got bool"):
        exercises.check("00.1", True)


def test_mode_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(exercises.MODE_VARIABLE, "loud")
    with pytest.raises(ValueError, match="FUSIONLIB_EXERCISES='loud': use one of raise, warn"):
        exercises.mode()
    with pytest.raises(ValueError, match="use one of raise, warn"):
        exercises.set_mode("quiet")


def test_exercise_error_renders_only_its_message_in_ipython():
    try:
        exercises.check("02.1", lambda: exercises.fail("bias is off"))
    except ExerciseError as err:
        assert err._render_traceback_() == ["ExerciseError: Exercise 02.1: bias is off"]
    try:
        exercises.check("04.1", lambda: {}["relu"])
    except ExerciseError as err:
        lines = err._render_traceback_()
        assert lines[0].startswith("ExerciseError: Exercise 04.1: your code raised KeyError")
        assert "Where your code raised it:" in lines and "KeyError: 'relu'" in lines[-1]


# --- TODO ----------------------------------------------------------------------------------------------


def test_todo_is_a_printable_singleton_that_refuses_to_be_used():
    assert repr(TODO) == "TODO" and exercises.is_todo(TODO) and not exercises.is_todo(0)
    assert copy.deepcopy(TODO) is TODO and pickle.loads(pickle.dumps(TODO)) is TODO
    assert type(TODO)() is TODO and hash(TODO) == hash(TODO)
    for use in (lambda: TODO + 1, lambda: 1 + TODO, lambda: bool(TODO), lambda: TODO[0], lambda: TODO.shape,
                lambda: float(TODO), lambda: TODO(), lambda: list(TODO)):
        with pytest.raises(NotAttempted):
            use()
    assert not hasattr(TODO, "_repr_html_")  # IPython can probe for display methods


# --- expectations -----------------------------------------------------------------------------------


def test_expect_close_says_how_far_off_and_where():
    expected = torch.tensor([3.0, -0.5])
    exercises.expect_close([3.0, -0.5], expected, name="w_folded")
    with pytest.raises(ExerciseError, match=r"w_folded has shape \(3,\): dimension 0 \(3\) is too large\. one per input"):
        exercises.expect_close([3.0, -0.5, 1.0], expected, name="w_folded", hint="one per input")
    with pytest.raises(ExerciseError) as info:
        exercises.expect_close([3.0, -0.4], expected, name="w_folded", rtol=1e-6)
    message = str(info.value)
    assert message == "w_folded is off: max rel error 0.0333 at [1] (tolerance 1e-06); there yours is too small."
    assert "-0.5" not in message  # never the expected value
    with pytest.raises(ExerciseError, match=r"^b_folded is too small\.$"):  # one number: only its direction
        exercises.expect_close(2.5, 3.0, name="b_folded")
    with pytest.raises(ExerciseError, match=r"^b_folded has the wrong sign\. hint$"):
        exercises.expect_close(-3.0, 3.0, name="b_folded", hint="hint")
    with pytest.raises(ExerciseError, match=r"k has shape \(6, 4\): too few dimensions \(2\)"):
        exercises.expect_close(torch.zeros(6, 4), torch.zeros(6, 4, 3, 3), name="k")
    with pytest.raises(ExerciseError, match="it holds nan"):
        exercises.expect_close([float("nan"), 0.0], expected, name="w")
    with pytest.raises(ExerciseError, match="should be a tensor or a list of numbers, got str"):
        exercises.expect_close("three", expected, name="w")
    with pytest.raises(NotAttempted, match="w_folded is still exercises.TODO"):
        exercises.expect_close(TODO, expected, name="w_folded")


def _folded_pair(eps: float = 0.5):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    bn = nn.BatchNorm2d(4, eps=eps).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.01, 0.1)
        bn.running_mean.normal_()
    return conv, bn


def test_expect_state_close_names_the_wrong_tensor():
    from fusionlib.fusion import fuse_conv_bn_eval

    conv, bn = _folded_pair()
    reference = fuse_conv_bn_eval(conv.eval(), bn)
    # the chapter's own mistake: forgetting eps (large eps and small running_var make it visible)
    scale = bn.weight / torch.sqrt(bn.running_var)
    forgot_eps = copy.deepcopy(conv)
    with torch.no_grad():
        forgot_eps.weight.mul_(scale[:, None, None, None])
        forgot_eps.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    with pytest.raises(ExerciseError, match=r"folded conv: weight is off by max abs .* bias is off by max abs"):
        exercises.expect_state_close(forgot_eps, reference, name="folded conv", hint="did you add eps?")
    wrong_bias = copy.deepcopy(reference)
    with torch.no_grad():
        wrong_bias.bias.add_(0.25)
    with pytest.raises(ExerciseError, match=r"bias is off by max abs 0\.25 at \[\d\].*\(weight matches\)"):
        exercises.expect_state_close(wrong_bias, reference, name="folded conv")
    no_bias = nn.Conv2d(3, 4, 3, bias=False)
    with pytest.raises(ExerciseError, match="folded conv: missing bias"):
        exercises.expect_state_close(no_bias, reference, name="folded conv")
    with pytest.raises(ExerciseError, match=r"weight has shape \(4, 3, 1, 1\): dimension 2 \(1\) is too small"):
        exercises.expect_state_close(nn.Conv2d(3, 4, 1), reference, name="folded conv")
    exercises.expect_state_close(copy.deepcopy(reference), reference, name="folded conv")
    exercises.expect_state_close({"weight": reference.weight, "bias": reference.bias}, reference, name="dict")


def test_expect_unchanged_catches_an_edited_original():
    conv, _ = _folded_pair()
    before = exercises.snapshot(conv)
    exercises.expect_unchanged(conv, before, name="conv")
    with torch.no_grad():
        conv.bias.zero_()
    with pytest.raises(ExerciseError, match=r"conv was modified \(bias changed\)\. Work on a copy"):
        exercises.expect_unchanged(conv, before, name="conv")
    seq = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
    snap = exercises.snapshot(seq)
    seq[1] = nn.ReLU6()
    with pytest.raises(ExerciseError, match="seq's submodules were changed"):
        exercises.expect_unchanged(seq, snap, name="seq")
    with pytest.raises(ExerciseError, match="was replaced: it is a ReLU6, was a ReLU"):
        exercises.expect_unchanged(nn.ReLU6(), exercises.snapshot(nn.ReLU()), name="act")


def test_expect_type_and_equal_messages():
    exercises.expect_type(nn.ReLU(), nn.Module, name="act")
    with pytest.raises(ExerciseError, match=r"gm is of type ReLU, expected GraphModule or Sequential\."):
        exercises.expect_type(nn.ReLU(), (torch.fx.GraphModule, nn.Sequential), name="gm")
    exercises.expect_equal(torch.tensor([1, 2]), [1, 2], name="t")
    with pytest.raises(ExerciseError, match=r"^groups is \[\['0', '1'\]\]: wrong at position \[0\]\.$"):
        exercises.expect_equal([["0", "1"]], [["0", "1", "2"]], name="groups")
    with pytest.raises(ExerciseError, match=r"^groups is \[\['0', '1'\]\]: too few items \(1\)\.$"):
        exercises.expect_equal([["0", "1"]], [["0", "1"], ["2"]], name="groups")
    with pytest.raises(ExerciseError, match=r"^n_test is 359: that is too small\. stratified$"):
        exercises.expect_equal(359, 360, name="n_test", hint="stratified")
    with pytest.raises(ExerciseError, match=r"^top is 'a', which is not right\.$"):
        exercises.expect_equal("a", "b", name="top")


def test_expect_equal_tells_a_bool_from_a_number():
    exercises.expect_equal(True, True, name="fused")
    exercises.expect_equal([1, (2, 3)], [1, (2, 3)], name="xs")
    for actual, expected in [(True, 1), (1, True), (0, False), ([1, True], [1, 1])]:
        with pytest.raises(ExerciseError, match="is .*(of type|wrong at)"):
            exercises.expect_equal(actual, expected, name="flag")
