# expect: first_bad_layer.*(earlier one already had|last layer)
_name = model_names[0]
_report = verify.layer_report(trained[_name], precision.cast_model(trained[_name], FP16), x_test[:8] * exercise_scale)
first_bad_layer = _report.layers[-1].name                                 # where the NaN shows, not where it starts
bf16_is_finite = True
