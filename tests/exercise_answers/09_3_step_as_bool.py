# expect: step is a bool
step = True
worst_rounding_error = 1.0
clipped_error = 7.0
