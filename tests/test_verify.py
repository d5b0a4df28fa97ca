"""fusionlib.verify: error measures, nested outputs, verdicts and the report, on real models too."""
from __future__ import annotations

import copy
import math
from collections import namedtuple

import pytest
import torch

from fusionlib.verify import compare_models, compare_outputs, format_report, report



def test_max_abs_and_max_rel_are_relative_to_the_output_scale():
    a = torch.tensor([[10.0, -20.0], [0.001, 4.0]], dtype=torch.float64)
    b = a + torch.tensor([[0.0, 0.002], [0.001, -0.001]], dtype=torch.float64)
    c = compare_outputs(a, b, rtol=1e-4, name="toy")
    assert c.max_abs == pytest.approx(0.002)
    assert c.max_rel == pytest.approx(0.002 / 20)  # not 0.001 / 0.001 = 1 element-wise
    assert c.passed and c.rtol == 1e-4
    assert not compare_outputs(a, b, rtol=1e-5).passed


def test_string_form_and_check():
    a = torch.ones(3)
    ok = compare_outputs(a, a + 1e-7, name="fused")
    assert str(ok).startswith("PASS fused: max abs 1.19e-07, max rel 1.19e-07 (tol 1e-04)")
    assert ok.check() is ok
    bad = compare_outputs(a, a * 1.01, name="broken")
    assert str(bad).startswith("FAIL broken: max abs 0.01")
    with pytest.raises(AssertionError, match="FAIL broken"):
        bad.check()
    assert "FAIL broken" in bad._repr_html_() and str(compare_outputs(a, a)).startswith("PASS:")


def test_exact_equality_zero_reference_and_empty():
    zero = torch.zeros(4)
    assert compare_outputs(zero, zero).max_rel == 0.0
    off = compare_outputs(zero, zero + 1e-9)
    assert off.max_rel == math.inf and not off.passed
    assert compare_outputs(torch.empty(0, 3), torch.empty(0, 3)).passed


def test_nan_fails_and_equal_infinities_do_not():
    a = torch.tensor([1.0, float("inf")])
    assert compare_outputs(a, a.clone()).passed
    nan = compare_outputs(a, torch.tensor([float("nan"), float("inf")]))
    assert not nan.passed and math.isnan(nan.max_abs)


def test_computed_in_float64_across_dtypes():
    a = torch.tensor([1.0, 2.0], dtype=torch.float16)
    b = torch.tensor([1.0, 2.001], dtype=torch.float32)
    assert compare_outputs(a, b).max_abs == pytest.approx(2.001 - 2.0, rel=1e-4)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 10\).*\(2, 5\)"):
        compare_outputs(torch.zeros(2, 10), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\['logits'\]"):
        compare_outputs({"logits": torch.zeros(2)}, {"logits": torch.zeros(3)})


def test_nested_outputs_report_the_worst_leaf():
    Out = namedtuple("Out", "logits features")
    ref = {"a": Out(torch.ones(2), torch.ones(3) * 10), "b": [torch.ones(4), torch.ones(1)]}
    cand = {"b": [torch.ones(4), torch.ones(1) * 1.5], "a": Out(torch.ones(2) * 1.01, torch.ones(3) * 10)}
    c = compare_outputs(ref, cand, name="nested")
    assert c.leaves == 4 and c.worst == "['b'][1]"
    assert c.max_abs == pytest.approx(0.5) and c.max_rel == pytest.approx(0.5) and not c.passed
    assert "['b'][1]" in str(c)


@pytest.mark.parametrize(
    "ref, cand",
    [
        ((torch.ones(1), torch.ones(1)), (torch.ones(1),)),
        ({"a": torch.ones(1)}, {"b": torch.ones(1)}),
        (torch.ones(1), [torch.ones(1)]),
    ],
)
def test_structure_mismatch_is_a_value_error(ref, cand):
    with pytest.raises(ValueError, match="structures differ"):
        compare_outputs(ref, cand)


def test_compare_models_on_resnet18_and_mobilenet_v2():
    from fusionlib.data import digits_tensors
    from fusionlib.models import mobilenet_v2, resnet18

    x = digits_tensors()[2][:2]
    for build in (resnet18, mobilenet_v2):
        torch.manual_seed(0)
        model = build().train()
        same = compare_models(model, copy.deepcopy(model), x, name=build.__name__)
        assert same.passed and same.max_abs == 0.0
        assert model.training  # flags restored; and the run was in eval mode:
        assert all(float(bn.num_batches_tracked) == 0 for bn in model.modules() if hasattr(bn, "num_batches_tracked"))
        perturbed = copy.deepcopy(model)
        with torch.no_grad():
            next(perturbed.parameters()).mul_(1.01)  # the first conv's weights, +1%
        diff = compare_models(model, perturbed, x, rtol=1e-4)
        assert not diff.passed and 1e-4 < diff.max_rel < 0.5


def test_compare_models_and_latency_accept_a_frozen_torchscript_model():
    """Frozen TorchScript submodules have no training flag: eval_mode must skip them, not crash."""
    import warnings

    from fusionlib.bench import compare_models_latency
    from fusionlib.models import resnet18

    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream
        frozen = torch.jit.freeze(torch.jit.script(copy.deepcopy(model)))
    result = compare_models(model, frozen, x, rtol=1e-4)
    assert result.passed and result.max_rel < 1e-4
    table = compare_models_latency({"eager": model, "frozen": frozen}, x, warmup=0, repeats=1)
    assert [row.name for row in table.rows] == ["eager", "frozen"]


def test_report_prints_a_table(capsys):
    a = torch.tensor([1.0, -4.0])
    rows = [compare_outputs(a, a, name="resnet18"), compare_outputs(a, a * 1.5, name="mobilenet_v2")]
    assert (rows[0].max_abs, rows[0].max_rel) == (0.0, 0.0)
    assert rows[1].max_abs == pytest.approx(2.0) and rows[1].max_rel == pytest.approx(0.5)  # |-6 - -4| / 4
    report(rows[0], [rows[1]])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "name" in lines[0] and "max abs" in lines[0] and "max rel" in lines[0] and "tol" in lines[0]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["PASS", "resnet18", "0.00e+00", "0.00e+00", "1e-04"]
    assert lines[3].split() == ["FAIL", "mobilenet_v2", "2.00e+00", "5.00e-01", "1e-04"]
    assert lines[-1] == "1/2 checks passed" and out == format_report(*rows) + "\n"
    with pytest.raises(TypeError, match="Comparison"):
        report("not a comparison")


def test_mkldnn_tensors_are_compared_by_value():
    x = torch.randn(1, 4, 5, 5)
    same = compare_outputs(x, x.to_mkldnn())
    assert same.passed and same.max_abs == 0.0
    off = compare_outputs(x, (x + 0.5 * x.abs().max()).to_mkldnn())
    assert not off.passed and off.max_rel == pytest.approx(0.5)


def test_one_error_measure_for_verify_and_exercises():
    """verify.tensor_errors is the one definition; exercises.tensor_error is it with the expected tensor as reference."""
    from fusionlib import exercises
    from fusionlib.verify import tensor_errors

    e, a = torch.tensor([[1.0, -4.0], [2.0, 0.5]]), torch.tensor([[1.0, -4.5], [2.0, 0.5]])
    assert tensor_errors(e, a) == (0.5, 0.125, (0, 1)) == exercises.tensor_error(a, e)
    for nan_side in ("reference", "candidate"):  # one NaN rule, whichever side holds it
        x, y = e.clone(), a.clone()
        (x if nan_side == "reference" else y)[1, 0] = float("nan")
        max_abs, max_rel, index = tensor_errors(x, y)
        assert math.isnan(max_abs) and math.isnan(max_rel) and index == (1, 0), nan_side
        assert compare_outputs(x, y).passed is False
    assert tensor_errors(torch.zeros(2), torch.tensor([0.0, 1e-9]))[1] == math.inf
    inf = torch.tensor([float("inf"), 1.0])
    assert tensor_errors(inf, inf.clone()) == (0.0, 0.0, (0,))
